"""mmattn.merge_attention: attention over key shards, merged through the log-sum-exp,
equals the call over all keys, forward and backward (outputs and lse).

Each shard gets its slice of every mask: attn_mask (bool / float), key_padding_mask,
a BlockMask (block columns), and the causal mask, whose top-left alignment is
relative to the whole key sequence: a shard starting at key ``s`` sees
``j_local <= i - s``, which only the first shard can say with ``is_causal=True``.
"""

from __future__ import annotations

import math

import pytest
import torch

import mmattn
from mmattn._extension import has_kernel

B, HQ, HKV, LQ, LK, D, DV = 2, 4, 2, 9, 13, 8, 6
CPU_BACKENDS = ["reference"] + (["cpu"] if has_kernel("fused_attention_fwd", "CPU") else [])
SHARDINGS = {"one": [LK], "uneven": [5, 1, 7], "blocks": [4, 4, 5]}


def _causal_slice(start: int, stop: int) -> torch.Tensor:
    """The whole-sequence causal mask (key j visible to query i iff j <= i) on keys
    [start, stop): True = may attend."""
    return torch.arange(LQ)[:, None] >= torch.arange(start, stop)[None, :]


def _case(name: str, dtype: torch.dtype) -> dict:
    """Masks over all LK keys for one case (None where unused)."""
    gen = torch.Generator().manual_seed(3)
    visible = torch.rand(B, 1, LQ, LK, generator=gen) > 0.3
    visible[0, 0, 2] = False  # a row that sees no key at all: out 0, lse +inf
    padding = torch.zeros(B, LK, dtype=torch.bool)
    padding[1, :6] = True  # batch 1: the first shards see nothing (empty shards)
    float_mask = torch.randn(B, HQ, LQ, LK, generator=gen, dtype=dtype)
    float_mask[..., 3] = -math.inf
    float_mask[1, :, 4] = -math.inf  # a row that sees no key
    dense_blocks = torch.rand(LQ, LK, generator=gen) > 0.4
    dense_blocks[5] = False
    return {
        "bool-mask-padding": {"attn_mask": visible, "key_padding_mask": padding},
        "float-mask": {"attn_mask": float_mask},
        "causal": {"is_causal": True, "key_padding_mask": padding},
        "block-mask": {"block_mask": dense_blocks},
    }[name]


def _shard_kwargs(kwargs: dict, start: int, stop: int) -> dict:
    """The masks of keys [start, stop)."""
    out = {}
    if kwargs.get("attn_mask") is not None:
        out["attn_mask"] = kwargs["attn_mask"][..., start:stop]
    if kwargs.get("key_padding_mask") is not None:
        out["key_padding_mask"] = kwargs["key_padding_mask"][:, start:stop]
    if kwargs.get("is_causal"):
        if start == 0:
            out["is_causal"] = True  # the shard at key 0: top-left alignment holds
        else:
            out["attn_mask"] = _causal_slice(start, stop)
    if kwargs.get("block_mask") is not None:
        out["block_mask"] = mmattn.BlockMask.from_dense_mask(
            kwargs["block_mask"][:, start:stop], block_size=(4, 4))
    return out


def _full_kwargs(kwargs: dict) -> dict:
    out = dict(kwargs)
    if out.get("block_mask") is not None:
        out["block_mask"] = mmattn.BlockMask.from_dense_mask(out["block_mask"], (4, 4))
    return out


def _loss(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    g_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64).to(lse.dtype)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return (out * g_out).sum() + (finite * g_lse).sum()


def _run(q, k, v, backend, kwargs, shards):
    """Forward + backward; one call over all keys when shards is None."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    q_, k_, v_ = leaves
    if shards is None:
        out, lse = mmattn.cross_attention(q_, k_, v_, return_lse=True, backend=backend,
                                          **_full_kwargs(kwargs))
    else:
        outs, lses, start = [], [], 0
        for length in shards:
            stop = start + length
            o, s = mmattn.cross_attention(q_, k_[:, :, start:stop], v_[:, :, start:stop],
                                          return_lse=True, backend=backend,
                                          **_shard_kwargs(kwargs, start, stop))
            outs.append(o)
            lses.append(s)
            start = stop
        out, lse = mmattn.merge_attention(outs, lses)
    _loss(out, lse).backward()
    return out, lse, [t.grad for t in leaves]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("sharding", list(SHARDINGS))
@pytest.mark.parametrize("case", ["bool-mask-padding", "float-mask", "causal", "block-mask"])
def test_merged_shards_equal_the_unsplit_call(backend: str, sharding: str, case: str) -> None:
    dtype = torch.float32
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(B, HQ, LQ, D, generator=gen, dtype=dtype)  # GQA: Hq = 2 Hkv
    k = torch.randn(B, HKV, LK, D, generator=gen, dtype=dtype)
    v = torch.randn(B, HKV, LK, DV, generator=gen, dtype=dtype)
    kwargs = _case(case, dtype)
    out, lse, grads = _run(q, k, v, backend, kwargs, None)
    m_out, m_lse, m_grads = _run(q, k, v, backend, kwargs, SHARDINGS[sharding])
    assert m_out.dtype == dtype and m_lse.dtype == torch.float32
    torch.testing.assert_close(m_out, out, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isinf(m_lse), torch.isinf(lse))
    finite = torch.isfinite(lse)
    assert (~finite).any()  # every case has rows that see no key
    torch.testing.assert_close(m_lse[finite], lse[finite], rtol=1e-5, atol=1e-5)
    assert (m_out[~finite] == 0).all()
    for name, mine, theirs in zip("qkv", m_grads, grads, strict=True):
        assert torch.isfinite(mine).all(), name
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5, msg=name)


def test_merge_is_exact_in_float64_and_passes_gradcheck() -> None:
    gen = torch.Generator().manual_seed(2)
    outs = [torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
            for _ in range(3)]
    lses = [torch.randn(2, 3, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    lses[1][0, 0, 1] = math.inf  # an empty shard for one row
    lses = [t.requires_grad_() for t in lses]
    out, lse = mmattn.merge_attention(outs, lses)
    stacked = torch.stack([torch.where(torch.isinf(t), -math.inf, t) for t in lses])
    expected_lse = torch.logsumexp(stacked, dim=0)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-12, atol=1e-12)
    weights = torch.exp(stacked - expected_lse)
    torch.testing.assert_close(out, (weights[..., None] * torch.stack(outs)).sum(0),
                               rtol=1e-12, atol=1e-12)

    def merged(*tensors):
        return mmattn.merge_attention(list(tensors[:3]), list(tensors[3:]))

    assert torch.autograd.gradcheck(merged, (*outs, *lses))


def test_all_empty_rows_give_zero_and_finite_gradients() -> None:
    outs = [torch.zeros(1, 1, 2, 3, requires_grad=True) for _ in range(2)]
    lses = [torch.full((1, 1, 2), math.inf, requires_grad=True) for _ in range(2)]
    out, lse = mmattn.merge_attention(outs, lses)
    assert (out == 0).all() and torch.isinf(lse).all() and lse.dtype == torch.float32
    out.sum().backward()
    for t in (*outs, *lses):
        assert torch.isfinite(t.grad).all()


def test_half_precision_outputs_merge_in_float32() -> None:
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.bfloat16) for _ in range(3))
    out, lse = mmattn.cross_attention(q, k, v, return_lse=True)
    first = mmattn.cross_attention(q, k[:, :, :2], v[:, :, :2], return_lse=True)
    second = mmattn.cross_attention(q, k[:, :, 2:], v[:, :, 2:], return_lse=True)
    m_out, m_lse = mmattn.merge_attention([first[0], second[0]], [first[1], second[1]])
    assert m_out.dtype == torch.bfloat16 and m_lse.dtype == torch.float32
    torch.testing.assert_close(m_out, out, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(m_lse, lse, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(("outs", "lses", "error", "match"), [
    ([], [], ValueError, "non-empty"),
    ([torch.zeros(2, 3)], [torch.zeros(2), torch.zeros(2)], ValueError, "one length"),
    ([torch.zeros(2, 3)], [torch.zeros(3)], ValueError, "shape"),
    ([torch.zeros(2, 3), torch.zeros(2, 4)], [torch.zeros(2)] * 2, ValueError, "outs\\[1\\]"),
    ([torch.zeros(2, 3)], [torch.zeros(2, dtype=torch.float16)], TypeError, "float32"),
    (torch.zeros(2, 3), [torch.zeros(2)], TypeError, "lists"),
])
def test_bad_arguments_raise_clear_errors(outs, lses, error, match) -> None:
    with pytest.raises(error, match=match):
        mmattn.merge_attention(outs, lses)
