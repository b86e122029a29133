"""The Triton ws_linear kernels against the float64 dense masked oracle, under DESIGN's rule.

CPU tensors run under ``TRITON_INTERPRET=1`` (tests/conftest.py), CUDA tensors when a GPU
is present (cases marked ``gpu``); the matrix mirrors tests/test_ws_linear_cpu.py.
"""

from __future__ import annotations

import pytest
import torch
from cases import run_ws_linear, ws_layout, ws_values
from tolerance import assert_within_rule

import mmattn
from mmattn import ops
from mmattn.backends import triton as triton_backend
from mmattn.layout import SparseLayout

F64 = torch.float64
CPU_OK = triton_backend.device_reason(torch.device("cpu")) is None
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not CPU_OK,
                                                 reason="Triton interpreter unavailable")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]




def _check(layout, leading, dtype, device="cpu", with_bias=True, x_view=None, amplitude=1.0):
    """ws_linear with backend "triton" in ``dtype`` against the float64 reference; the
    same-dtype reference sets the bound; ``x_view`` makes x strided."""
    base = torch.randn(*leading, layout.in_features, dtype=F64) * amplitude
    view = x_view or (lambda t: t)
    values64 = ws_values(layout)
    bias64 = torch.randn(layout.out_features, dtype=F64) if with_bias else None
    x64 = view(base)
    grad64 = torch.randn(*x64.shape[:-1], layout.out_features, dtype=F64)
    oracle = run_ws_linear(x64, values64, layout, bias64, grad64, "reference")

    def cast(t, dev):
        return None if t is None else t.to(device=dev, dtype=dtype)

    ref = run_ws_linear(view(base.to(dtype)), cast(values64, "cpu"), layout, cast(bias64, "cpu"),
               cast(grad64, "cpu"), "reference")
    ours = run_ws_linear(view(base.to(device=device, dtype=dtype)), cast(values64, device), layout,
                cast(bias64, device), cast(grad64, device), "triton")
    for name, a, r, o in zip(("y", "dx", "dweight", "dbias"), ours, ref, oracle, strict=True):
        if o is None:
            assert a is None
            continue
        assert a.dtype == dtype and a.device.type == device, name
        assert_within_rule(a.cpu(), r, o, name=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_features,in_features,density", [
    (1, 1, 1.0), (7, 7, 0.5), (97, 97, 0.1), (300, 300, 0.02), (7, 97, 0.2), (97, 7, 0.4)])
@pytest.mark.parametrize("leading", [(1,), (40,)])
def test_element_layout_forward_and_gradients(out_features, in_features, density, leading,
                                              device):
    _check(ws_layout(out_features, in_features, density), leading, torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("leading", [(), (2, 3), (100,)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_leading_shapes_and_bias(leading, with_bias, device):
    _check(ws_layout(97, 64, 0.1), leading, torch.float32, device, with_bias=with_bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size,out_features,in_features", [
    (3, 7, 7), (3, 97, 70), (16, 97, 70), (32, 7, 7), (16, 130, 250), (32, 130, 250),
    (100, 130, 250)])
def test_block_layout(block_size, out_features, in_features, device):
    """Block sizes below, at and above the 64-wide tile (100: 2 x 2 sub-tiles per block),
    edge blocks cropped."""
    layout = ws_layout(out_features, in_features, 0.1, block_size=block_size, empty_rows=False)
    _check(layout, (2, 11), torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amplitude", [1.0, 3.0, 10.0])
@pytest.mark.parametrize("block_size", [1, 16])
def test_half_precision_and_amplitudes(block_size, amplitude, device):
    layout = ws_layout(97, 130, 0.05, block_size=block_size)
    dtypes = [torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    for dtype in dtypes:
        _check(layout, (37,), dtype, device, amplitude=amplitude)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    def leading_transposed(t):  # (6, 4, in) -> a (4, 6, in) view
        return t.transpose(0, 1)

    def every_other_column(t):  # feature stride 2
        return t.repeat_interleave(2, dim=-1)[..., ::2]

    layout = ws_layout(33, 50, 0.1)
    _check(layout, (6, 4), torch.float32, device, x_view=leading_transposed)
    _check(layout, (20,), torch.float32, device, x_view=every_other_column)
    _check(ws_layout(33, 50, 0.1, block_size=8), (20,), torch.float32, device,
           x_view=every_other_column)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_empty_layout(device):
    layout = ws_layout(9, 5, 0.5).to(device)
    x = torch.randn(0, 5, device=device, requires_grad=True)
    values = torch.randn(layout.nnz, device=device, requires_grad=True)
    bias = torch.randn(9, device=device, requires_grad=True)
    y = mmattn.ws_linear(x, values, layout, bias, backend="triton")
    assert y.shape == (0, 9)
    y.sum().backward()
    assert values.grad.abs().sum() == 0 and bias.grad.abs().sum() == 0
    empty = SparseLayout.from_mask(torch.zeros(4, 6, dtype=torch.bool))
    x = torch.randn(3, 6, device=device)
    y = mmattn.ws_linear(x, torch.randn(0, device=device), empty,
                         torch.ones(4, device=device), backend="triton")
    torch.testing.assert_close(y.cpu(), torch.ones(3, 4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [1, 8])
@pytest.mark.parametrize("wanted", ["x", "weight", "bias", "weight+bias"])
def test_only_the_wanted_gradients_are_computed(block_size, wanted, device, monkeypatch):
    layout = ws_layout(40, 56, 0.1, block_size=block_size)
    x = torch.randn(3, 56, dtype=F64)
    values64, bias64 = ws_values(layout), torch.randn(40, dtype=F64)
    grad = torch.randn(3, 40, dtype=F64)
    oracle = run_ws_linear(x, values64, layout, bias64, grad, "reference")[1:]
    leaves = [t.float().to(device) for t in (x, values64, bias64)]
    names = ("x", "weight", "bias")
    wanted = wanted.split("+")
    for leaf, name in zip(leaves, names, strict=True):
        leaf.requires_grad_(name in wanted)
    from mmattn.kernels import ws_linear as kernels

    launched = []
    for kernel in ("_ws_sddmm_kernel", "_ws_sddmm_block_kernel"):
        original = getattr(kernels, kernel)

        class Spy:
            def __init__(self, name, fn):
                self.name, self.fn = name, fn

            def __getitem__(self, grid):
                launched.append(self.name)
                return self.fn[grid]

        monkeypatch.setattr(kernels, kernel, Spy(kernel, original))
    mmattn.ws_linear(*leaves[:2], layout, leaves[2], backend="triton").backward(
        grad.float().to(device))
    for leaf, name, expected in zip(leaves, names, oracle, strict=True):
        if name in wanted:
            torch.testing.assert_close(leaf.grad.double().cpu(), expected, rtol=1e-4,
                                       atol=1e-4)
        else:
            assert leaf.grad is None
    assert bool(launched) == ("weight" in wanted)  # the SDDMM runs only for weights


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [1, 16])
def test_results_are_bitwise_reproducible(block_size, device):
    layout = ws_layout(100, 80, 0.1, block_size=block_size)
    x = torch.randn(70, 80, device=device, requires_grad=True)
    values = ws_values(layout).float().to(device).requires_grad_()
    bias = torch.randn(100, device=device, requires_grad=True)
    results = []
    for _ in range(2):
        for t in (x, values, bias):
            t.grad = None
        y = mmattn.ws_linear(x, values, layout, bias, backend="triton")
        y.backward(torch.ones_like(y))
        results.append([y.detach().clone(), x.grad.clone(), values.grad.clone()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_unsupported_dtypes_name_the_reason():
    if not CPU_OK:
        pytest.skip("Triton interpreter unavailable")
    layout = SparseLayout.from_mask(torch.eye(4, dtype=torch.bool))
    x64 = torch.randn(2, 4, dtype=F64)
    assert "float64" in triton_backend.ws_linear_unsupported(x64)
    with pytest.raises(mmattn.BackendUnavailableError, match="float64"):
        mmattn.ws_linear(x64, torch.ones(4, dtype=F64), layout, backend="triton")
    with pytest.raises(mmattn.BackendUnavailableError, match="bfloat16"):
        mmattn.ws_linear(x64.bfloat16(), torch.ones(4, dtype=torch.bfloat16), layout,
                         backend="triton")


def test_opcheck_ws_linear_with_triton_backend():
    if not CPU_OK:
        pytest.skip("Triton interpreter unavailable")
    layout = ws_layout(6, 9, 0.4, empty_rows=False)
    x = torch.randn(2, 4, 9, requires_grad=True)
    values = torch.randn(layout.nnz, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    index = layout.index_tensors()
    torch.library.opcheck(torch.ops.mmattn.ws_linear.default,
                          (x, values, *index, 6, 1, bias, "triton"))
    grad_y = torch.randn(2, 4, 6)
    for need_dx, need_d_values in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(torch.ops.mmattn.ws_linear_backward.default,
                              (grad_y, x.detach(), values.detach(), *index, 6, 1, True, need_dx,
                               need_d_values, "triton"))
    eager = ops.ws_linear_apply(x, values, *index, 6, 1, bias, "triton")
    torch.testing.assert_close(eager, ops.ws_linear(x, values, *index, 6, 1, bias, "triton"),
                               rtol=0, atol=0)
