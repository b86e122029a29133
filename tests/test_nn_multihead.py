"""mmattn.nn.MultiheadAttention against torch.nn.MultiheadAttention (the spec).

Every case runs PyTorch's module and ours with the same weights, in float64
(tight) and float32 (DESIGN's tolerance rule against PyTorch in float64), forward
and backward (inputs and parameters).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tolerance import assert_within_rule
from torch import nn

import mmattn
from mmattn.nn import MultiheadAttention

E, H, N, L, S = 8, 2, 2, 3, 5


def _bool_mask(*shape: int) -> torch.Tensor:
    """Random PyTorch-convention bool mask (True = hidden); key 0 always visible."""
    mask = torch.rand(*shape) > 0.6
    mask[..., 0] = False
    return mask


def _float_mask(*shape: int) -> torch.Tensor:
    mask = torch.randn(*shape)
    return mask.masked_fill(_bool_mask(*shape), float("-inf"))


def _causal(length: int, src: int) -> torch.Tensor:
    return torch.ones(length, src, dtype=torch.bool).triu(1)


# name -> (constructor kwargs, forward-input recipe)
CASES: dict[str, tuple[dict, dict]] = {
    "self": ({}, {"self": True}),
    "self-batch-first": ({"batch_first": True}, {"self": True}),
    "cross-shared-kv": ({"batch_first": True}, {"kv_same": True}),
    "cross-distinct": ({}, {}),
    "kdim-vdim": ({"kdim": 6, "vdim": 5, "batch_first": True}, {}),
    "kdim-vdim-seq-first-mask3d": ({"kdim": 6, "vdim": 5},
                                   {"attn_mask": lambda: _float_mask(N * H, L, S)}),
    "no-bias": ({"bias": False}, {"self": True}),
    "bias-kv": ({"add_bias_kv": True}, {"kv_same": True}),
    "zero-attn": ({"add_zero_attn": True, "batch_first": True}, {}),
    "bias-kv-zero-attn-masks": (
        {"add_bias_kv": True, "add_zero_attn": True},
        {"attn_mask": lambda: _bool_mask(L, S), "key_padding_mask": lambda: _bool_mask(N, S)}),
    "bias-kv-3d-float-mask": ({"add_bias_kv": True, "batch_first": True},
                              {"attn_mask": lambda: _float_mask(N * H, L, S)}),
    "mask2d-bool": ({}, {"attn_mask": lambda: _bool_mask(L, S)}),
    "mask2d-float": ({"batch_first": True}, {"attn_mask": lambda: _float_mask(L, S)}),
    "mask3d-bool": ({"batch_first": True}, {"attn_mask": lambda: _bool_mask(N * H, L, S)}),
    "mask3d-float": ({}, {"attn_mask": lambda: _float_mask(N * H, L, S)}),
    "kpm-bool": ({"batch_first": True}, {"key_padding_mask": lambda: _bool_mask(N, S)}),
    "kpm-float": ({}, {"key_padding_mask": lambda: _float_mask(N, S)}),
    "mask-and-kpm-bool": ({}, {"attn_mask": lambda: _bool_mask(N * H, L, S),
                               "key_padding_mask": lambda: _bool_mask(N, S)}),
    "mask-float-kpm-bool": ({"batch_first": True},
                            {"attn_mask": lambda: _float_mask(L, S),
                             "key_padding_mask": lambda: _bool_mask(N, S)}),
    "mask-bool-kpm-float": ({}, {"attn_mask": lambda: _bool_mask(L, S),
                                 "key_padding_mask": lambda: _float_mask(N, S)}),
    "no-weights": ({"batch_first": True}, {"need_weights": False,
                                           "attn_mask": lambda: _bool_mask(L, S)}),
    "per-head-weights": ({}, {"average_attn_weights": False,
                              "key_padding_mask": lambda: _bool_mask(N, S)}),
    "unbatched-self": ({"batch_first": True}, {"self": True, "unbatched": True}),
    "unbatched-cross-masks": ({}, {"unbatched": True, "attn_mask": lambda: _bool_mask(H, L, S),
                                   "key_padding_mask": lambda: _bool_mask(S)}),
    "unbatched-kdim-per-head": ({"kdim": 6, "vdim": 5},
                                {"unbatched": True, "average_attn_weights": False}),
    "causal-hint-no-weights": ({"batch_first": True},
                               {"self": True, "need_weights": False, "is_causal": True,
                                "attn_mask": lambda: _causal(L, L)}),
    "causal-hint-with-weights": ({}, {"self": True, "is_causal": True,
                                      "attn_mask": lambda: _causal(L, L)}),
    # PyTorch 2.13 ignores attn_mask when the hint applies (no weights, no padding mask).
    "causal-hint-overrides-mask": ({"batch_first": True},
                                   {"need_weights": False, "is_causal": True,
                                    "attn_mask": lambda: _bool_mask(L, S)}),
    "causal-hint-with-kpm": ({}, {"self": True, "need_weights": False, "is_causal": True,
                                  "attn_mask": lambda: _causal(L, L),
                                  "key_padding_mask": lambda: _bool_mask(N, L)}),
}


def _inputs(ctor: dict, recipe: dict) -> tuple[tuple[torch.Tensor, ...], dict]:
    """float64 leaf inputs (q, k, v, possibly the same tensor) and forward kwargs."""
    unbatched = recipe.get("unbatched", False)
    batch_first = ctor.get("batch_first", False)
    src = L if recipe.get("self") else S

    def seq(length: int, dim: int) -> torch.Tensor:
        if unbatched:
            shape = (length, dim)
        else:
            shape = (N, length, dim) if batch_first else (length, N, dim)
        return torch.randn(*shape, dtype=torch.float64)

    query = seq(L, E)
    if recipe.get("self"):
        tensors = (query,)
    elif recipe.get("kv_same"):
        tensors = (query, seq(src, ctor.get("kdim", E)))
    else:
        tensors = (query, seq(src, ctor.get("kdim", E)), seq(src, ctor.get("vdim", E)))
    kwargs = {}
    for name in ("attn_mask", "key_padding_mask"):
        if name in recipe:
            mask = recipe[name]()
            if unbatched and name == "key_padding_mask":
                mask = mask.reshape(-1)[:src]
            kwargs[name] = mask.double() if mask.is_floating_point() else mask
    for name in ("need_weights", "average_attn_weights", "is_causal"):
        if name in recipe:
            kwargs[name] = recipe[name]
    return tensors, kwargs


def _run(module: nn.Module, tensors: tuple[torch.Tensor, ...], kwargs: dict, dtype: torch.dtype,
         seed: int) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """Forward + backward of a weighted sum; returns output, weights and all gradients."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
    q, k, v = (leaves * 3)[:3] if len(leaves) == 1 else (
        (leaves[0], leaves[1], leaves[1]) if len(leaves) == 2 else leaves)
    kw = {n: (m.to(dtype) if m.is_floating_point() else m) if isinstance(m, torch.Tensor) else m
          for n, m in kwargs.items()}
    module.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch: mixed mask dtypes are deprecated
        out, weights = module(q, k, v, **kw)
    gen = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)).sum()
    if weights is not None:
        gw = torch.randn(weights.shape, generator=gen, dtype=torch.float64).to(dtype)
        loss = loss + (weights * gw).sum()
    loss.backward()
    grads = {f"input{i}": t.grad for i, t in enumerate(leaves)}
    grads.update({n: p.grad for n, p in module.named_parameters()})
    return out, weights, grads


def _pair(ctor: dict, dtype: torch.dtype) -> tuple[nn.MultiheadAttention, MultiheadAttention]:
    theirs = nn.MultiheadAttention(E, H, dtype=torch.float64, **ctor)
    with torch.no_grad():  # non-zero biases, so every parameter matters
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = MultiheadAttention(E, H, dtype=torch.float64, **ctor)
    ours.load_state_dict(theirs.state_dict())
    return theirs.to(dtype), ours.to(dtype)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch_float64_and_float32(name: str) -> None:
    ctor, recipe = CASES[name]
    tensors, kwargs = _inputs(ctor, recipe)
    theirs64, ours64 = _pair(ctor, torch.float64)
    ref_out, ref_w, ref_g = _run(theirs64, tensors, kwargs, torch.float64, 1)
    out, w, g = _run(ours64, tensors, kwargs, torch.float64, 1)
    assert out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    assert (w is None) == (ref_w is None)
    if w is not None:
        torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-10)
    assert g.keys() == ref_g.keys()
    for key in g:
        torch.testing.assert_close(g[key], ref_g[key], rtol=1e-9, atol=1e-9, msg=key)

    theirs32, ours32 = _pair(ctor, torch.float32)
    theirs32.load_state_dict(theirs64.state_dict())
    ours32.load_state_dict(theirs64.state_dict())
    t_out, t_w, t_g = _run(theirs32, tensors, kwargs, torch.float32, 1)
    o_out, o_w, o_g = _run(ours32, tensors, kwargs, torch.float32, 1)
    assert o_out.dtype == torch.float32
    assert_within_rule(o_out, t_out, ref_out, name="output")
    if o_w is not None:
        assert_within_rule(o_w, t_w, ref_w, name="weights")
    for key in o_g:
        assert_within_rule(o_g[key], t_g[key], ref_g[key], name=key)


@pytest.mark.parametrize("batch_first", [False, True])
def test_eval_mode_matches_torch_fast_path(batch_first: bool) -> None:
    """In eval mode without autograd PyTorch takes its native fast path; same result."""
    theirs, ours = _pair({"batch_first": batch_first}, torch.float32)
    theirs.eval()
    ours.eval()
    x = torch.randn(N, L, E) if batch_first else torch.randn(L, N, E)
    kpm = _bool_mask(N, L)
    with torch.no_grad():
        for kwargs in ({}, {"key_padding_mask": kpm}, {"need_weights": False}):
            ref, ref_w = theirs(x, x, x, **kwargs)
            out, w = ours(x, x, x, **kwargs)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            if ref_w is not None:
                torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-5)


def test_same_parameters_init_and_state_dict_both_ways() -> None:
    for ctor in ({}, {"kdim": 6, "vdim": 5}, {"add_bias_kv": True, "bias": False}):
        torch.manual_seed(3)
        theirs = nn.MultiheadAttention(E, H, **ctor)
        torch.manual_seed(3)
        ours = MultiheadAttention(E, H, **ctor)
        assert isinstance(ours, nn.MultiheadAttention)
        assert ours._qkv_same_embed_dim == theirs._qkv_same_embed_dim
        assert type(ours.out_proj) is type(theirs.out_proj)
        ref = theirs.state_dict()
        mine = ours.state_dict()
        assert list(ref) == list(mine)
        for key in ref:  # same seed, same initial weights
            assert torch.equal(ref[key], mine[key]), key
        with torch.no_grad():
            for p in ours.parameters():
                p.add_(1.0)
        theirs.load_state_dict(ours.state_dict())
        for key, value in ours.state_dict().items():
            assert torch.equal(theirs.state_dict()[key], value)


def test_fully_masked_rows_give_zero_not_nan() -> None:
    """The one documented difference: PyTorch returns NaN for rows with no key."""
    theirs, ours = _pair({"batch_first": True}, torch.float64)
    x = torch.randn(N, L, E, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(L, L, dtype=torch.bool)
    mask[1] = True  # query 1 may attend to nothing
    ref, ref_w = theirs(x, x, x, attn_mask=mask)
    out, w = ours(x, x, x, attn_mask=mask)
    assert torch.isnan(ref[:, 1]).all() and torch.isnan(ref_w[:, 1]).all()
    assert torch.equal(w[:, 1], torch.zeros_like(w[:, 1]))
    # the attention output is 0, so the module returns out_proj's bias there
    torch.testing.assert_close(out[:, 1], ours.out_proj.bias.expand(N, E))
    keep = [0, 2]
    torch.testing.assert_close(out[:, keep], ref[:, keep])
    torch.testing.assert_close(w[:, keep], ref_w[:, keep])
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters())


def test_dropout_is_applied_in_training_only() -> None:
    ours = MultiheadAttention(16, 2, dropout=0.5, batch_first=True)
    x = torch.randn(4, 32, 16)
    ours.train()
    _, w = ours(x, x, x, average_attn_weights=False)
    dropped = (w == 0).float().mean().item()
    assert 0.4 < dropped < 0.6
    # kept weights are scaled by 1 / (1 - p): each row sums to about 1 on average
    assert abs(w.sum(-1).mean().item() - 1.0) < 0.1
    ours.eval()
    theirs = nn.MultiheadAttention(16, 2, dropout=0.5, batch_first=True).eval()
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x, x, x)[0], theirs(x, x, x)[0], rtol=1e-5, atol=1e-5)


def test_invalid_arguments_raise_clear_errors() -> None:
    ours = MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(N, L, E)
    with pytest.raises(ValueError, match="attn_mask"):
        ours(x, x, x, attn_mask=torch.zeros(L, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        ours(x, x, x, attn_mask=torch.zeros(N, L, L, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask"):
        ours(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.int64))
    with pytest.raises(ValueError, match="key_padding_mask"):
        ours(x, x, x, key_padding_mask=torch.zeros(N, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_causal"):
        ours(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="embed_dim"):
        ours(torch.randn(N, L, E + 2), x, x)
    with pytest.raises(ValueError, match="query"):
        ours(torch.randn(E), x, x)
    with pytest.raises(ValueError, match="block_mask"):
        MultiheadAttention(E, H, add_zero_attn=True)(x, x, x, block_mask=object())


def test_block_mask_keyword_matches_attn_mask() -> None:
    """block_mask (True = may attend) combines with the other masks by AND."""
    ours = MultiheadAttention(E, H, batch_first=True)
    q, kv = torch.randn(N, L, E), torch.randn(N, S, E)
    hidden = _bool_mask(L, S)
    kpm = _bool_mask(N, S)
    ref, ref_w = ours(q, kv, kv, attn_mask=hidden, key_padding_mask=kpm)
    block_mask = mmattn.BlockMask.from_dense_mask(~hidden, block_size=2)
    out, w = ours(q, kv, kv, key_padding_mask=kpm, block_mask=block_mask)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(w, ref_w)


def test_exported_from_package() -> None:
    assert mmattn.nn.MultiheadAttention is MultiheadAttention


def test_small_inference_takes_pytorchs_fused_kernel_larger_runs_mmattn(monkeypatch) -> None:
    """Inference that PyTorch's module sends to its native fast path runs that kernel
    up to NATIVE_INFERENCE_MAX_WORK; bigger calls, masks, training and autograd run
    mmattn's kernels (never slower than the module replaced, see the constant)."""
    import mmattn.nn.attention as module_file
    from mmattn import ops

    calls = []
    real = ops.attention
    monkeypatch.setattr(ops, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    theirs, ours = _pair({"batch_first": True}, torch.float32)
    theirs.eval()
    ours.eval()
    x = torch.randn(N, L, E)
    with torch.no_grad():
        ref, ref_w = theirs(x, x, x)
        out, w = ours(x, x, x)
        assert calls == []  # PyTorch's fused kernel: PyTorch's result
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        torch.testing.assert_close(w, ref_w, rtol=0, atol=0)
        ours(x, x, x, key_padding_mask=_bool_mask(N, L))
        assert calls == [1]  # masks: mmattn (rows with no key give 0, not NaN)
        monkeypatch.setattr(module_file, "NATIVE_INFERENCE_MAX_WORK", 0)
        out, w = ours(x, x, x)
        assert calls == [1, 1]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)
    ours(x, x, x)[0].sum().backward()  # autograd: mmattn
    assert len(calls) == 3
