"""The fused C++ CPU attention kernels against the reference, under DESIGN's rule.

Every comparison takes three results: ours (backend "cpu"), the reference in the
same dtype, and the reference in float64 (the oracle); ours must be within
``2 x |reference - oracle| + atol(dtype)`` of the oracle (tests/tolerance.py).
Gradients (dq, dk, dv) are compared the same way.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from cases import MASK_CASES, bool_mask, run_attention
from tolerance import assert_within_rule, max_error

import mmattn
from mmattn import BlockMask, _extension, backends
from mmattn.attention import cross_attention
from mmattn.backends import cpu as cpu_backend

pytestmark = pytest.mark.skipif(
    not _extension.has_kernel("fused_attention_fwd", "CPU"),
    reason="mmattn._C with the CPU attention kernels is not built",
)

# (B, Hq, Hkv, Lq, Lk, D, Dv)
SHAPES = [
    pytest.param((1, 1, 1, 1, 1, 8, 8), id="one-query-one-key"),
    pytest.param((2, 2, 2, 7, 97, 16, 16), id="odd-lengths"),
    pytest.param((1, 4, 2, 97, 7, 32, 48), id="gqa-dv-ne-d"),
    pytest.param((2, 3, 1, 65, 130, 80, 64), id="mqa-d80"),
    pytest.param((1, 2, 2, 17, 33, 3, 5), id="tiny-head-dims"),
    pytest.param((1, 2, 1, 1000, 97, 64, 64), id="lq1000"),
    pytest.param((1, 1, 1, 97, 1000, 64, 32), id="lk1000"),
]


def _qkv(shape, dtype=torch.float32, layout="bhld"):
    b, hq, hkv, lq, lk, d, dv = shape
    if layout == "blhd":  # nn.MultiheadAttention-style views: (B, L, H, D).transpose(1, 2)
        q = torch.randn(b, lq, hq, d).transpose(1, 2)
        k = torch.randn(b, lk, hkv, d).transpose(1, 2)
        v = torch.randn(b, lk, hkv, dv).transpose(1, 2)
    elif layout == "v-last-strided":  # head dim not unit-stride: the launcher copies
        q = torch.randn(b, hq, lq, d)
        k = torch.randn(b, hkv, lk, d)
        v = torch.randn(b, hkv, dv, lk).transpose(-1, -2)
    else:
        q, k, v = torch.randn(b, hq, lq, d), torch.randn(b, hkv, lk, d), torch.randn(b, hkv, lk, dv)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def check_against_reference(q, k, v, *, grads=True, dtype=torch.float32, **kwargs):
    """Assert the cpu backend obeys the tolerance rule for out, weights and grads."""
    b, hq, lq, _ = q.shape
    grad_out = torch.randn(b, hq, lq, v.shape[-1]) if grads else None
    ours = run_attention(q, k, v, "cpu", dtype, grad_out, **dict(kwargs))
    ref = run_attention(q, k, v, "reference", dtype, grad_out, **dict(kwargs))
    oracle = run_attention(q, k, v, "reference", torch.float64, grad_out, **dict(kwargs))
    assert ours[0].dtype == dtype
    assert_within_rule(ours[0], ref[0], oracle[0], name="out")
    if kwargs.get("return_weights"):
        assert_within_rule(ours[1], ref[1], oracle[1], name="weights")
    if grads:
        for name, g_ours, g_ref, g_oracle in zip(("dq", "dk", "dv"), ours[2], ref[2], oracle[2],
                                                 strict=True):
            assert g_ours.dtype == dtype
            assert_within_rule(g_ours, g_ref, g_oracle, name=name)
    return ours


# ---------------------------------------------------------------- dispatch


def test_auto_dispatch_picks_the_cpu_kernel():
    q, k, v = _qkv((1, 2, 2, 5, 6, 8, 8))

    def pick(dtype):
        return mmattn.attention.attention_backend(q.to(dtype), k.to(dtype), v.to(dtype))

    assert pick(torch.float32) == "cpu"
    assert pick(torch.bfloat16) == "cpu"
    assert pick(torch.float64) == "reference"
    with pytest.raises(mmattn.BackendUnavailableError, match="float64"):
        cross_attention(q.double(), k.double(), v.double(), backend="cpu")


# ---------------------------------------------------------------- inference op, plain calls

INFER_CASES = [
    pytest.param((1, 1, 1, 1, 4096, 64, 64), {}, id="decode"),
    pytest.param((2, 4, 2, 7, 97, 32, 48), {"is_causal": True}, id="gqa-causal"),
    pytest.param((1, 2, 2, 33, 65, 17, 5), {"masks": True}, id="masks-odd-dims"),
    pytest.param((2, 2, 1, 3, 0, 16, 16), {}, id="no-keys"),
    pytest.param((0, 2, 2, 3, 5, 16, 16), {}, id="no-rows"),
]


def _infer_inputs(shape, masks, dtype, layout):
    q, k, v = _qkv(shape, dtype, layout)
    b, hq, _, lq, lk, _, _ = shape
    mask = bool_mask(b, hq, lq, lk) if masks else None
    kpm = (torch.rand(b, lk) < 0.3) if masks else None
    return q, k, v, mask, kpm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("shape,options", INFER_CASES)
def test_inference_op_gives_the_forward_ops_bits(shape, options, dtype, layout):
    """fused_attention_infer is fused_attention_fwd's out without lse/weights: same bits."""
    q, k, v, mask, kpm = _infer_inputs(shape, options.get("masks"), dtype, layout)
    causal = options.get("is_causal", False)
    full = torch.ops.mmattn.fused_attention_fwd(q, k, v, mask, kpm, causal, 0.0, 0.3, 0, False,
                                                *cpu_backend._NO_BLOCKS)[0]
    lean = torch.ops.mmattn.fused_attention_infer(q, k, v, mask, kpm, causal, 0.3)
    assert lean.dtype == dtype and lean.shape == full.shape
    assert torch.equal(lean, full)


def test_opcheck_inference_op():
    q, k, v, mask, kpm = _infer_inputs((1, 4, 2, 7, 9, 8, 12), True, torch.float32, "bhld")
    torch.library.opcheck(torch.ops.mmattn.fused_attention_infer.default,
                          (q, k, v, mask, kpm, True, 0.5))


@pytest.mark.parametrize("shape,options", INFER_CASES[:3])
def test_plain_calls_give_the_general_paths_bits(shape, options):
    """A plain call (no mask, dropout, weights, lse, gradient) skips the general path's
    objects; a dropout_seed (checked, unused at p = 0) sends the same call through the
    general path, which must give the same bits."""
    q, k, v = _qkv(shape)
    for kwargs in ({"is_causal": options.get("is_causal", False)}, {"scale": 0.7}):
        fast = cross_attention(q, k, v, **kwargs)
        general = cross_attention(q, k, v, dropout_seed=0, **kwargs)
        assert torch.equal(fast, general)
        assert_within_rule(fast, cross_attention(q, k, v, backend="reference", **kwargs),
                           cross_attention(q.double(), k.double(), v.double(),
                                           backend="reference", **kwargs), name="out")


def test_plain_call_path_only_takes_what_the_cpu_backend_would_run(monkeypatch):
    taken = []
    inference = cpu_backend.attention_inference
    monkeypatch.setattr(cpu_backend, "attention_inference",
                        lambda *args: taken.append(1) or inference(*args))
    q, k, v = _qkv((1, 2, 2, 3, 40, 16, 16))
    cross_attention(q, k, v)
    cross_attention(q, k, v, backend="cpu")
    assert len(taken) == 2
    with mmattn.use_backend("reference"):
        ref = cross_attention(q, k, v)
    assert torch.equal(ref, cross_attention(q, k, v, backend="reference"))
    with torch.no_grad():
        cross_attention(q, k, v)
    assert len(taken) == 3
    qg = q.clone().requires_grad_()
    out = cross_attention(qg, k, v)
    out.sum().backward()
    assert qg.grad is not None and len(taken) == 3  # autograd: the general path
    cross_attention(q.double(), k.double(), v.double())  # float64: the reference backend
    cross_attention(torch.nn.Parameter(q), k, v)  # a subclass: the general path
    assert len(taken) == 3
    for bad in ({"scale": float("nan")}, {"is_causal": 1}, {"dropout_p": False}):
        with pytest.raises((TypeError, ValueError)):
            cross_attention(q, k, v, **bad)
    with pytest.raises(ValueError, match="head_dim"):
        cross_attention(q, k[..., :8], v)


def test_kernel_isa_is_reported():
    assert cpu_backend.kernel_isa() in ("avx512", "avx2", "generic")


def test_direct_op_call_rejects_bad_shapes_before_running():
    q, k, v = _qkv((1, 2, 2, 5, 6, 8, 8))
    with pytest.raises(RuntimeError, match="head_dim"):
        cpu_backend.attention_forward(q, k[..., :4], v, None, None, False, 0.0, 1.0, None,
                                         False)
    with pytest.raises(RuntimeError, match="multiple of key/value heads"):
        cpu_backend.attention_forward(q, k[:, :1].expand(1, 3, 6, 8).contiguous()[:, :3],
                                         v[:, :1].expand(1, 3, 6, 8), None, None, False, 0.0,
                                         1.0, None, False)
    with pytest.raises(RuntimeError, match="attn_mask"):
        cpu_backend.attention_forward(q, k, v, torch.ones(1, 2, 5, 7, dtype=torch.bool),
                                         None, False, 0.0, 1.0, None, False)


# ---------------------------------------------------------------- shapes, dtypes, layouts


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_forward_and_grads(shape):
    check_against_reference(*_qkv(shape))


@pytest.mark.parametrize("layout", ["blhd", "v-last-strided"])
def test_non_contiguous_inputs(layout):
    check_against_reference(*_qkv((2, 4, 2, 37, 53, 32, 24), layout=layout), return_weights=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    q, k, v = _qkv((2, 4, 2, 45, 70, 64, 32))
    mask = torch.rand(45, 70) > 0.2
    check_against_reference(q, k, v, dtype=dtype, attn_mask=mask, return_weights=True)


@pytest.mark.parametrize("lq,lk", [(0, 9), (9, 0), (0, 0)])
def test_zero_lengths(lq, lk):
    q, k, v = _qkv((2, 2, 1, lq, lk, 8, 4))
    out, weights, grads = run_attention(q, k, v, "cpu", torch.float32, torch.randn(2, 2, lq, 4),
                               return_weights=True)
    assert out.shape == (2, 2, lq, 4) and weights.shape == (2, 2, lq, lk)
    assert not out.any() and not weights.any()
    assert not any(g.any() for g in grads)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_empty_value_dim():
    q, k, v = _qkv((1, 2, 1, 5, 6, 8, 0))
    out, _, grads = run_attention(q, k, v, "cpu", torch.float32, torch.randn(1, 2, 5, 0))
    assert out.shape == (1, 2, 5, 0)
    assert not any(g.any() for g in grads)


def test_scale_and_lse():
    q, k, v = _qkv((1, 2, 2, 20, 30, 16, 16))
    out, lse, _, _ = cpu_backend.attention_forward(q, k, v, None, None, False, 0.0, 0.37,
                                                   None, False)
    ref_out, ref_lse, _ = mmattn.backends.reference.attention_math(
        q.double(), k.double(), v.double(), None, None, False, 0.0, 0.37, None, False)
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)


def test_long_key_sums_keep_reference_accuracy():
    """Nearly uniform attention over 4096 keys with large values: float32 sums of many
    terms; the tile-wise summation must keep the error at the reference's level (the
    absolute slack of the rule is small against these magnitudes)."""
    q, k, v = _qkv((1, 2, 1, 64, 4096, 32, 32))
    out = check_against_reference(q, k, v * 100, scale=0.01)[0]
    ref = cross_attention(q, k, v * 100, scale=0.01, backend="reference")
    oracle = cross_attention(q.double(), k.double(), v.double() * 100, scale=0.01,
                             backend="reference")
    # Without the rule's absolute slack: one float32 chain over all 4096 keys would be
    # several times the reference's error here.
    assert max_error(out, oracle) <= 2 * max_error(ref, oracle)


def test_softmax_exp_accuracy_over_a_wide_range():
    """The kernels' vectorised exp, over scores from -80 to 0 (q = 0, so the scores
    are the float mask itself). Weights relative to the largest one are
    exp(score - max) times two roundings (the 1 / sum factor cancels): they must
    be within a few ulp of float64 (the range stays above float32 denormals)."""
    lk = 4000
    scores = torch.linspace(-80.0, 0.0, lk, dtype=torch.float64)[torch.randperm(lk)]
    scores = scores.float().double()
    q = torch.zeros(1, 1, 1, 16)
    k, v = torch.randn(1, 1, lk, 16), torch.randn(1, 1, lk, 16)
    _, _, weights, _ = cpu_backend.attention_forward(
        q, k, v, scores.float().view(1, 1, 1, lk), None, False, 0.0, 1.0, None, True)
    weights = weights.double().view(-1)
    ratio = weights / weights[scores.argmax()]
    exact = torch.exp(scores - scores.max())
    assert ((ratio - exact) / exact).abs().max().item() < 4 * 2.0**-24
    assert abs(weights.sum().item() - 1.0) < 1e-5


# ---------------------------------------------------------------- masks




@pytest.mark.parametrize("kind", list(MASK_CASES))
def test_attn_mask_kinds(kind):
    b, h, lq, lk = 2, 3, 37, 75
    q, k, v = _qkv((b, h, h, lq, lk, 32, 16))
    mask = MASK_CASES[kind](b, h, lq, lk)
    check_against_reference(q, k, v, attn_mask=mask, return_weights=True)


@pytest.mark.parametrize("lq,lk", [(40, 100), (100, 40), (64, 64), (1, 7)])
def test_causal(lq, lk):
    check_against_reference(*_qkv((2, 2, 1, lq, lk, 32, 32)), is_causal=True,
                            return_weights=True)


def test_key_padding_mask_with_a_fully_padded_batch():
    q, k, v = _qkv((3, 2, 2, 19, 41, 16, 16))
    kpm = torch.rand(3, 41) < 0.3
    kpm[1] = True  # batch 1 sees no key at all
    ours = check_against_reference(q, k, v, key_padding_mask=kpm, return_weights=True)
    out, weights, (dq, _, _) = ours
    assert not out[1].any() and not weights[1].any() and not dq[1].any()


def test_all_masks_combined():
    b, h, lq, lk = 2, 4, 70, 90
    q, k, v = _qkv((b, h, 2, lq, lk, 32, 32))
    check_against_reference(q, k, v, attn_mask=bool_mask(1, h, lq, lk),
                            key_padding_mask=torch.rand(b, lk) < 0.2, is_causal=True,
                            return_weights=True)


def test_empty_rows_give_zeros_never_nan():
    q, k, v = _qkv((2, 2, 2, 12, 20, 16, 16))
    mask = bool_mask(2, 2, 12, 20)
    mask[:, :, 3] = False  # row 3 sees no key
    float_mask = torch.zeros(2, 2, 12, 20).masked_fill(~mask, -math.inf)
    for m in (mask, float_mask):
        out, weights, grads = check_against_reference(q, k, v, attn_mask=m, return_weights=True)
        assert not out[:, :, 3].any() and not weights[:, :, 3].any()
        assert not grads[0][:, :, 3].any()
        assert not any(torch.isnan(g).any() for g in grads)


def test_float_mask_gradient_routes_to_reference():
    q, k, v = _qkv((1, 2, 2, 9, 11, 8, 8))
    mask = torch.randn(1, 2, 9, 11, requires_grad=True)
    out = cross_attention(q, k, v, attn_mask=mask, backend="cpu")
    out.sum().backward()
    mask_ref = mask.detach().clone().requires_grad_()
    cross_attention(q, k, v, attn_mask=mask_ref, backend="reference").sum().backward()
    torch.testing.assert_close(mask.grad, mask_ref.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- dropout


@pytest.mark.parametrize("shape,p", [((2, 4, 2, 33, 70, 16, 24), 0.3),
                                     ((1, 2, 1, 80, 50, 64, 64), 0.7)])
def test_dropout_matches_reference_bit_for_bit(shape, p):
    q, k, v = _qkv(shape)
    kwargs = dict(dropout_p=p, dropout_seed=1234567, return_weights=True, is_causal=False)
    ours = check_against_reference(q, k, v, **kwargs)
    ref = run_attention(q, k, v, "reference", torch.float32, None, **kwargs)
    # Same seed, same Philox mask: the zeros of the weights sit at the same places.
    assert torch.equal(ours[1] == 0, ref[1] == 0)
    assert (ours[1] == 0).float().mean().item() > 0.5 * p


def test_dropout_without_weights_and_with_masks():
    q, k, v = _qkv((2, 2, 2, 45, 67, 32, 32))
    check_against_reference(q, k, v, dropout_p=0.25, dropout_seed=2**40 + 17, is_causal=True,
                            key_padding_mask=torch.rand(2, 67) < 0.2)


def test_dropout_one_drops_everything():
    q, k, v = _qkv((1, 2, 2, 9, 13, 8, 8))
    out, weights, grads = run_attention(q, k, v, "cpu", torch.float32, torch.randn(1, 2, 9, 8),
                               dropout_p=1.0, dropout_seed=3, return_weights=True)
    assert not out.any() and not weights.any() and not any(g.any() for g in grads)


# ---------------------------------------------------------------- instruction sets


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_every_instruction_set_agrees(isa, monkeypatch):
    q, k, v = _qkv((2, 3, 3, 41, 77, 24, 20))
    kwargs = dict(attn_mask=bool_mask(1, 3, 41, 77), is_causal=True, dropout_p=0.2,
                  dropout_seed=99, return_weights=True)
    monkeypatch.setenv("MMATTN_CPU_ISA", isa)
    try:
        assert cpu_backend.kernel_isa() == isa
    except RuntimeError:
        pytest.skip(f"this CPU has no {isa}")
    ours = check_against_reference(q, k, v, **kwargs)
    ref = run_attention(q, k, v, "reference", torch.float32, None, **kwargs)
    assert torch.equal(ours[1] == 0, ref[1] == 0)
    block_mask = BlockMask.from_dense_mask(_block_structured_mask(1, 3, 41, 77, 16, 32, 5),
                                           (16, 32))
    _check_block_mask(q, k, v, block_mask, return_weights=True)


# ---------------------------------------------------------------- torch.library integration


def test_opcheck_kernel_ops():
    q, k, v = _qkv((1, 4, 2, 7, 9, 8, 12))
    mask = bool_mask(1, 1, 7, 9).expand(1, 4, 7, 9)
    args = (q, k, v, mask, torch.rand(1, 9) < 0.2, True, 0.2, 0.5, 11, True,
            *cpu_backend._NO_BLOCKS)
    torch.library.opcheck(torch.ops.mmattn.fused_attention_fwd.default, args)
    out, lse, _, out_fp32 = torch.ops.mmattn.fused_attention_fwd(*args)
    assert out_fp32.numel() == 0  # float32 inputs: nothing extra to keep
    grad_out = torch.randn_like(out)
    torch.library.opcheck(torch.ops.mmattn.fused_attention_bwd.default,
                          (grad_out, q, k, v, out, lse, *args[3:9], *cpu_backend._NO_BLOCKS))
    torch.library.opcheck(torch.ops.mmattn.fused_attention_bwd.default,
                          (grad_out, q, k, v, out, lse, *args[3:9], *cpu_backend._NO_BLOCKS,
                           torch.randn_like(lse)))
    half_args = (q.bfloat16(), k.bfloat16(), v.bfloat16(), *args[3:], True)
    torch.library.opcheck(torch.ops.mmattn.fused_attention_fwd.default, half_args)
    out, lse, _, out_fp32 = torch.ops.mmattn.fused_attention_fwd(*half_args)
    assert out_fp32.dtype == torch.float32 and out_fp32.shape == out.shape
    torch.testing.assert_close(out_fp32.bfloat16(), out, rtol=0, atol=0)


def test_opcheck_attention_forward_with_cpu_backend():
    q, k, v = (t.requires_grad_() for t in _qkv((2, 2, 1, 6, 10, 8, 8)))
    seed = torch.tensor(5, dtype=torch.int64)
    args = (q, k, v, None, torch.rand(2, 10) < 0.2, False, 0.1, 0.35, seed, False, False, "cpu")
    torch.library.opcheck(torch.ops.mmattn.attention_forward.default, args)


def test_torch_compile_fullgraph():
    q, k, v = _qkv((2, 4, 2, 16, 24, 16, 16))
    mask = bool_mask(2, 1, 16, 24)

    def f(q, k, v):
        return cross_attention(q, k, v, attn_mask=mask, backend="cpu").sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


@pytest.mark.skipif(os.environ.get("MMATTN_SKIP_INDUCTOR") == "1", reason="inductor disabled")
def test_torch_compile_inductor_with_grads():
    q, k, v = (t.requires_grad_() for t in _qkv((1, 2, 2, 8, 12, 16, 16)))

    def f(q, k, v):
        return cross_attention(q, k, v, is_causal=True, backend="cpu")

    out = torch.compile(f, fullgraph=True)(q, k, v)
    out.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    f(q, k, v).sum().backward()
    for g, t in zip(grads, (q, k, v), strict=True):
        torch.testing.assert_close(g, t.grad)


# ---------------------------------------------------------------- block-sparse masks


def _block_structured_mask(bm, hm, lq, lk, bq, bk, seed):
    """Dense bool mask whose blocks are, at random, empty, full or partial."""
    g = torch.Generator().manual_seed(seed)
    nbq, nbk = -(-lq // bq), -(-lk // bk)
    kind = torch.randint(0, 3, (bm, hm, nbq, nbk), generator=g)  # 0 empty, 1 partial, 2 full
    kind = kind.repeat_interleave(bq, 2).repeat_interleave(bk, 3)[..., :lq, :lk]
    elements = torch.rand(bm, hm, lq, lk, generator=g) < 0.5
    return (kind == 2) | ((kind == 1) & elements)


def _check_block_mask(q, k, v, block_mask, grads=True, **kwargs):
    """cpu with the BlockMask (kernel reads its indices) against the reference given the
    equivalent dense mask, under the tolerance rule."""
    b, hq, lq, _ = q.shape
    dense = block_mask.to_dense()
    grad_out = torch.randn(b, hq, lq, v.shape[-1]) if grads else None
    ours = run_attention(q, k, v, "cpu", torch.float32, grad_out, block_mask=block_mask, **kwargs)
    ref = run_attention(q, k, v, "reference", torch.float32, grad_out, attn_mask=dense, **kwargs)
    oracle = run_attention(q, k, v, "reference", torch.float64, grad_out, attn_mask=dense, **kwargs)
    assert_within_rule(ours[0], ref[0], oracle[0], name="out")
    if kwargs.get("return_weights"):
        assert_within_rule(ours[1], ref[1], oracle[1], name="weights")
    if grads:
        for name, *g in zip(("dq", "dk", "dv"), ours[2], ref[2], oracle[2], strict=True):
            assert_within_rule(*g, name=name)
    return ours, ref


# (B, Hq, Hkv, Lq, Lk, D, Dv, bq, bk, Bm, Hm)
BLOCK_CASES = [
    pytest.param((2, 4, 2, 200, 330, 32, 32, 64, 64, 1, 1), id="b64-gqa"),
    pytest.param((1, 2, 2, 150, 250, 16, 24, 128, 32, 1, 2), id="bq128-bk32-per-head"),
    pytest.param((2, 2, 1, 97, 700, 32, 32, 32, 300, 2, 1), id="bq32-bk300-per-batch"),
    pytest.param((2, 3, 3, 130, 130, 64, 64, 48, 80, 2, 3), id="odd-blocks-per-batch-head"),
]


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_block_mask_equals_dense_mask(case):
    b, hq, hkv, lq, lk, d, dv, bq, bk, bm, hm = case
    q, k, v = _qkv((b, hq, hkv, lq, lk, d, dv))
    block_mask = BlockMask.from_dense_mask(_block_structured_mask(bm, hm, lq, lk, bq, bk, 7),
                                           (bq, bk))
    assert block_mask.num_partial_blocks > 0 and 0 < block_mask.density < 1
    _check_block_mask(q, k, v, block_mask, return_weights=True)


@pytest.mark.parametrize("case", BLOCK_CASES[:2])
def test_block_mask_with_other_masks_and_dropout(case):
    b, hq, hkv, lq, lk, d, dv, bq, bk, bm, hm = case
    q, k, v = _qkv((b, hq, hkv, lq, lk, d, dv))
    block_mask = BlockMask.from_dense_mask(_block_structured_mask(bm, hm, lq, lk, bq, bk, 3),
                                           (bq, bk))
    ours, ref = _check_block_mask(
        q, k, v, block_mask, is_causal=True, key_padding_mask=torch.rand(b, lk) < 0.2,
        dropout_p=0.3, dropout_seed=77, return_weights=True)
    assert torch.equal(ours[1] == 0, ref[1] == 0)


def test_block_mask_causal_skips_query_tiles_inside_partial_blocks():
    """Query blocks of 128 rows hold two 64-row tiles; causal masking skips the first
    tile for keys past it, and the partial masks must still be read at the right rows."""
    lq = lk = 256
    dense = torch.rand(1, 1, lq, lk, generator=torch.Generator().manual_seed(5)) < 0.7
    block_mask = BlockMask.from_dense_mask(dense, (128, 32))
    assert block_mask.num_partial_blocks == block_mask.layout.sum()
    q, k, v = _qkv((1, 2, 2, lq, lk, 16, 16))
    _check_block_mask(q, k, v, block_mask, is_causal=True, return_weights=True)


@pytest.mark.parametrize(("lengths", "blocks"), [((100, 100), (20000, 20000)),
                                                ((37, 90), (64, 16)), ((90, 37), (16, 64))])
def test_block_mask_blocks_larger_than_the_sequence(lengths, blocks):
    """Partial masks are stored as (min(bq, Lq), min(bk, Lk)) (issue 11): the kernel reads
    them with that row length, not the block's."""
    lq, lk = lengths
    dense = torch.rand(2, 1, lq, lk, generator=torch.Generator().manual_seed(3)) < 0.6
    block_mask = BlockMask.from_dense_mask(dense, blocks)
    assert tuple(block_mask.partial_masks.shape[1:]) == (min(blocks[0], lq), min(blocks[1], lk))
    q, k, v = _qkv((2, 2, 1, lq, lk, 16, 8))
    _check_block_mask(q, k, v, block_mask, is_causal=True, return_weights=True)


def test_kernel_reads_partial_masks_of_any_extent():
    """The op contract: partial_masks (P, pq, pk) with pq <= bq, pk <= bk; positions past
    them are not visible. Smaller, stored (min(bq, Lq), min(bk, Lk)) and block-sized
    extents all give what the equivalent dense mask gives."""
    lq, lk, bq, bk = 40, 50, 64, 32  # bq > Lq: stored masks are (40, 32)
    block_mask = BlockMask.from_dense_mask(
        _block_structured_mask(1, 1, lq, lk, bq, bk, 9), (bq, bk))
    q, k, v = _qkv((1, 2, 2, lq, lk, 8, 8))
    tensors = mmattn.backends.block_mask_tensors(block_mask)
    stored = block_mask.partial_masks
    assert tuple(stored.shape[1:]) == (40, 32)
    block_sized = torch.zeros(stored.shape[0], bq, bk, dtype=torch.bool)
    block_sized[:, :40] = stored
    for masks in (stored[:, :11, :20], stored, block_sized):
        dense = backends.reference.block_mask_to_dense(
            block_mask.full, block_mask.partial_index, masks, (bq, bk), (lq, lk))
        # the cut masks hide elements the stored ones show: the extent is read
        assert torch.equal(dense, block_mask.to_dense()) == (masks.shape[1:] != (11, 20))
        args = (*tensors[:6], masks, bq, bk)
        out, lse, _, _ = torch.ops.mmattn.fused_attention_fwd(
            q, k, v, None, None, False, 0.0, 0.3, 0, False, *args)
        ref, ref_lse, _, _ = backends.reference.attention_forward(
            q, k, v, dense.expand(1, 2, lq, lk), None, False, 0.0, 0.3, None, False)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, ref_lse)
        grad = torch.randn_like(out)
        dq, dk, dv = torch.ops.mmattn.fused_attention_bwd(
            grad, q, k, v, out, lse, None, None, False, 0.0, 0.3, 0, *args)
        rq, rk, rv, _ = backends.reference.attention_backward(
            grad, q, k, v, ref, ref_lse, dense.expand(1, 2, lq, lk), None, False, 0.0, 0.3,
            None)
        for ours, theirs in ((dq, rq), (dk, rk), (dv, rv)):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["causal", "local_window", "bigbird"])
def test_block_mask_constructors(name):
    q, k, v = _qkv((1, 2, 2, 300, 300, 32, 32))
    block_mask = {
        "causal": lambda: BlockMask.causal(300, 64),
        "local_window": lambda: BlockMask.local_window(300, 64, 70),
        "bigbird": lambda: BlockMask.bigbird(300, 64, seed=1),
    }[name]()
    _check_block_mask(q, k, v, block_mask)


def test_key_split_backward_with_block_mask():
    """Few (batch, kv head) pairs for the threads: the backward splits the keys into
    chunks with separate dq accumulators, summed at the end."""
    q, k, v = _qkv((1, 3, 1, 90, 300, 16, 16))
    block_mask = BlockMask.from_dense_mask(_block_structured_mask(1, 3, 90, 300, 32, 32, 4),
                                           32)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        _check_block_mask(q, k, v, block_mask, is_causal=True)
    finally:
        torch.set_num_threads(threads)


def test_block_mask_never_touches_empty_blocks():
    """Keys in blocks that every query block skips are NaN: a kernel that read them (even
    to multiply by 0) would return NaN."""
    lq, lk, bq, bk = 128, 256, 64, 64
    layout = torch.tensor([[True, False, True, False], [False, False, True, True]])
    block_mask = BlockMask.from_layout(layout, (lq, lk), (bq, bk))
    q, k, v = _qkv((1, 2, 2, lq, lk, 32, 32))
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, :, 64:128] = math.nan
    v_nan[:, :, 64:128] = math.nan
    grad_out = torch.randn(1, 2, lq, 32)
    out, _, (dq, dk, dv) = run_attention(q, k_nan, v_nan, "cpu", torch.float32, grad_out,
                                block_mask=block_mask)
    ref_out, _, (rq, rk, rv) = run_attention(q, k, v, "reference", torch.float64, grad_out,
                                    attn_mask=block_mask.to_dense())
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dq.double(), rq, rtol=1e-4, atol=1e-5)
    assert not dk[:, :, 64:128].any() and not dv[:, :, 64:128].any()
    torch.testing.assert_close(dk.double(), rk, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dv.double(), rv, rtol=1e-4, atol=1e-5)


def test_opcheck_attention_forward_with_block_mask():
    q, k, v = (t.requires_grad_() for t in _qkv((1, 2, 2, 40, 50, 8, 8)))
    block_mask = BlockMask.from_dense_mask(_block_structured_mask(1, 1, 40, 50, 16, 16, 1),
                                           16)
    tensors, size = backends.block_mask_tensors(block_mask), list(block_mask.block_size)
    args = (q, k, v, None, None, False, 0.0, 0.35, None, False, False, "cpu", *tensors, size)
    torch.library.opcheck(torch.ops.mmattn.attention_forward.default, args)
    args = (q, k, v, None, None, False, 0.0, 0.35, None, False, False, "reference", *tensors,
            size)
    torch.library.opcheck(torch.ops.mmattn.attention_forward.default, args)


def test_torch_compile_with_block_mask_and_grads():
    q, k, v = (t.requires_grad_() for t in _qkv((1, 2, 2, 64, 96, 16, 16)))
    block_mask = BlockMask.from_dense_mask(_block_structured_mask(1, 1, 64, 96, 32, 32, 2), 32)

    def f(q, k, v):
        return cross_attention(q, k, v, block_mask=block_mask, backend="cpu")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    out.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    expected = f(q, k, v)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    for g, t in zip(grads, (q, k, v), strict=True):
        torch.testing.assert_close(g, t.grad)
