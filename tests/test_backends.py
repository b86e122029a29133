"""The backend interface: every backend module has the same functions; gradients that a
backend's kernels do not compute (lse, double backward) are exact, never zero; backend
choice is thread-local."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

import mmattn
from mmattn import backends, dispatch
from mmattn._extension import has_kernel

F64 = torch.float64
INTERFACE = ("NAME", "BACKWARD_EXTRAS", "attention_unsupported", "attention_forward",
             "attention_backward", "ws_linear_unsupported", "ws_linear_forward",
             "ws_linear_backward")
CPU_BACKENDS = ["reference"] + (["cpu"] if has_kernel("fused_attention_fwd", "CPU") else [])


@pytest.mark.parametrize("name", backends.NAMES)
def test_every_backend_module_has_the_interface(name):
    module = backends.get(name)
    assert module.NAME == name
    for attribute in INTERFACE:
        assert hasattr(module, attribute), f"{name} lacks {attribute}"
    assert module.BACKWARD_EXTRAS <= {"grad_weights", "mask_grad", "grad_lse"}


def _qkv(dtype=torch.float32, shape=(2, 4, 2, 5, 7, 8, 6)):
    b, hq, hkv, lq, lk, d, dv = shape
    q = torch.randn(b, hq, lq, d, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hkv, lk, d, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hkv, lk, dv, dtype=dtype, requires_grad=True)
    return q, k, v


def _cast(tensors, dtype):
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lse_is_returned_and_differentiable(backend):
    q, k, v = _qkv()
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1] = True  # batch 1 sees no key: out 0, lse +inf, gradients 0
    kwargs = dict(key_padding_mask=kpm, is_causal=True, dropout_p=0.3, dropout_seed=7)
    out, lse = mmattn.cross_attention(q, k, v, return_lse=True, backend=backend, **kwargs)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 5)
    assert torch.isinf(lse[1]).all() and (out[1] == 0).all()
    q64, k64, v64 = _cast((q, k, v), F64)
    out64, lse64 = mmattn.cross_attention(q64, k64, v64, return_lse=True, backend="reference",
                                          **kwargs)
    torch.testing.assert_close(lse[0].double(), lse64[0], rtol=1e-5, atol=1e-5)
    # gradients through out and the finite lse entries only
    g_out, g_lse = torch.randn_like(out), torch.randn(2, 4, 5)
    g_lse[1] = 0

    def loss(o, s):
        return (o * g_out.to(o.dtype)).sum() + (torch.where(torch.isinf(s), 0, s)
                                                 * g_lse.to(s.dtype)).sum()

    grads = torch.autograd.grad(loss(out, lse), (q, k, v))
    grads64 = torch.autograd.grad(loss(out64, lse64), (q64, k64, v64))
    for g, g64 in zip(grads, grads64, strict=True):
        torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-5)
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_through_lse_alone(backend, dtype):
    """A loss of the lse only (out unused: its gradient arrives as None), with GQA, a
    block mask and dropout: the gradients obey the tolerance rule against float64; on the
    cpu backend the kernel computes them (grad_lse is in its BACKWARD_EXTRAS)."""
    from tolerance import assert_within_rule

    torch.manual_seed(3)
    q, k, v = _qkv(shape=(2, 4, 2, 37, 50, 16, 8))
    block_mask = mmattn.BlockMask.from_dense_mask(torch.rand(37, 50) < 0.7, (16, 16))
    kwargs = dict(block_mask=block_mask, dropout_p=0.2, dropout_seed=9)
    g_lse = torch.randn(2, 4, 37)

    def grads(backend_, dt):
        qc, kc, vc = _cast((q, k, v), dt)
        _, lse = mmattn.cross_attention(qc, kc, vc, return_lse=True, backend=backend_, **kwargs)
        finite = torch.isfinite(lse)
        return torch.autograd.grad((lse[finite] * g_lse.to(lse.dtype)[finite]).sum(),
                                   (qc, kc, vc))

    ours, ref, oracle = grads(backend, dtype), grads("reference", dtype), grads("reference", F64)
    for name, *g in zip(("dq", "dk", "dv"), ours, ref, oracle, strict=True):
        assert_within_rule(*g, name=name)
    assert not ours[2].any()  # v does not enter the lse


def test_lse_gradient_passes_gradcheck_on_the_reference():
    q, k, v = _qkv(F64, shape=(1, 2, 1, 3, 4, 5, 3))
    mask = torch.randn(1, 2, 3, 4, dtype=F64, requires_grad=True)

    def fn(q, k, v, mask):
        out, lse = mmattn.cross_attention(q, k, v, attn_mask=mask, return_lse=True,
                                          backend="reference")
        return out, lse

    assert torch.autograd.gradcheck(fn, (q, k, v, mask))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward_is_exact_not_zero(backend):
    """Second derivatives through any backend equal float64 second derivatives."""
    q, k, v = _qkv(shape=(1, 2, 1, 4, 6, 5, 3))
    mask = torch.randn(1, 1, 4, 6)

    def grad_norm(q, k, v):
        out = mmattn.cross_attention(q, k, v, attn_mask=mask.to(q.dtype), backend=backend
                                     if q.dtype != F64 else "reference")
        gq, gk, gv = torch.autograd.grad((out.sin()).sum(), (q, k, v), create_graph=True)
        return (gq.pow(2).sum() + gk.pow(2).sum() + gv.pow(2).sum())

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "backward returned zeros" style warning either
        second = torch.autograd.grad(grad_norm(q, k, v), (q, k, v))
    q64, k64, v64 = _cast((q, k, v), F64)
    second64 = torch.autograd.grad(grad_norm(q64, k64, v64), (q64, k64, v64))
    for g, g64 in zip(second, second64, strict=True):
        assert g.abs().max() > 0
        torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-5)


def test_double_backward_passes_gradgradcheck_on_the_reference():
    q, k, v = _qkv(F64, shape=(1, 2, 1, 3, 4, 3, 2))

    def fn(q, k, v):
        return mmattn.cross_attention(q, k, v, is_causal=True, backend="reference")

    assert torch.autograd.gradgradcheck(fn, (q, k, v))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("block_size", [1, 2])
def test_ws_linear_double_backward_is_exact(backend, block_size):
    mask = torch.rand(6, 9) < 0.4
    layout = mmattn.SparseLayout.from_mask(mask, block_size=block_size)
    x = torch.randn(3, 9, requires_grad=True)
    shape = (layout.nnz,) if block_size == 1 else (layout.nnz, block_size, block_size)
    values = torch.randn(shape, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)

    def second(x, values, bias, backend):
        y = mmattn.ws_linear(x, values, layout, bias, backend=backend)
        gx, gw = torch.autograd.grad(y.pow(2).sum(), (x, values), create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum() + gw.pow(2).sum(), (x, values, bias))

    ours = second(x, values, bias, backend)
    x64, v64, b64 = _cast((x, values, bias), F64)
    oracle = second(x64, v64, b64, "reference")
    for g, g64 in zip(ours, oracle, strict=True):
        assert g.abs().max() > 0
        torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-5)


def test_use_backend_is_thread_local():
    """A use_backend block in one thread never changes another thread's calls."""
    q, k, v = (t.detach() for t in _qkv())
    entered, release = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def forcing_thread():
        with mmattn.use_backend("cuda"):
            seen["forced"] = dispatch.forced_backend()
            entered.set()
            release.wait(10)

    worker = threading.Thread(target=forcing_thread)
    worker.start()
    try:
        assert entered.wait(10)
        assert dispatch.forced_backend() is None
        seen["plain_call"] = mmattn.cross_attention(q, k, v)  # must not raise
    finally:
        release.set()
        worker.join()
    assert seen["forced"] == "cuda"
    assert seen["plain_call"].shape == (2, 4, 5, 6)


def test_use_backend_under_torch_compile_follows_the_context():
    q, k, v = (t.detach() for t in _qkv(F64))
    compiled = torch.compile(lambda q, k, v: mmattn.cross_attention(q, k, v), fullgraph=True,
                             backend="aot_eager")
    compiled(q, k, v)
    with mmattn.use_backend("cuda"), pytest.raises(Exception, match="cuda"):
        compiled(q, k, v)  # recompiled under the new context: the forced backend is seen
    torch.testing.assert_close(compiled(q, k, v), mmattn.cross_attention(q, k, v))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward_through_weights_and_float_mask(backend):
    """create_graph through every output (out, weights, lse) and into a float mask that
    requires grad: second derivatives equal float64 ones, never zeros."""
    q, k, v = _qkv(shape=(1, 2, 1, 4, 6, 5, 3))
    mask = torch.randn(1, 2, 4, 1, requires_grad=True)  # broadcast over keys

    def second(q, k, v, mask, backend):
        out, weights, lse = mmattn.cross_attention(q, k, v, attn_mask=mask, backend=backend,
                                                    return_weights=True, return_lse=True)
        loss = out.sin().sum() + (weights * weights).sum() + lse.cos().sum()
        grads = torch.autograd.grad(loss, (q, k, v, mask), create_graph=True)
        return torch.autograd.grad(sum(g.pow(2).sum() for g in grads), (q, k, v, mask))

    ours = second(q, k, v, mask, backend)
    oracle = second(*_cast((q, k, v, mask), F64), "reference")
    for g, g64 in zip(ours, oracle, strict=True):
        assert g.abs().max() > 0
        torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_mask_gradient_is_summed_in_float32(backend, mask_dtype):
    """Issue 11: a bf16 mask broadcast over keys has an exact gradient of 0 (softmax is
    shift invariant per row); rounding every element to bf16 before the broadcast sum gave
    ~1e-3. The sum runs in float32 and the result is rounded once."""
    q = torch.randn(2, 4, 33, 16, requires_grad=True)
    k, v = torch.randn(2, 4, 47, 16), torch.randn(2, 4, 47, 16)
    row = torch.randn(2, 4, 33, 1).to(mask_dtype).requires_grad_()
    out = mmattn.cross_attention(q, k, v, attn_mask=row, backend=backend)
    grad, = torch.autograd.grad(out.pow(2).sum(), row)
    assert grad.dtype == mask_dtype and grad.shape == row.shape
    assert grad.abs().max() < 1e-5  # was ~5e-3
    # A mask shared by batch and heads: the float32 sum rounded once is within one
    # rounding of the exact float64 sum.
    shared = torch.randn(1, 1, 33, 47).to(mask_dtype).requires_grad_()
    out = mmattn.cross_attention(q, k, v, attn_mask=shared, backend=backend)
    grad, = torch.autograd.grad(out.pow(2).sum(), shared)
    q64, k64, v64, s64 = _cast((q, k, v, shared), F64)
    out64 = mmattn.cross_attention(q64, k64, v64, attn_mask=s64, backend="reference")
    exact, = torch.autograd.grad(out64.pow(2).sum(), s64)
    ulp = torch.finfo(mask_dtype).eps
    assert bool(((grad.double() - exact).abs() <= exact.abs() * ulp + 1e-5).all())
    # expanded by the caller (stride 0) rather than broadcast: summed in float32 too
    row = row.detach().requires_grad_()
    out = mmattn.cross_attention(q, k, v, attn_mask=row.expand(2, 4, 33, 47), backend=backend)
    grad, = torch.autograd.grad(out.pow(2).sum(), row)
    assert grad.abs().max() < 1e-5
