"""CUDA C++ ws_linear kernels (csrc/cuda/ws_linear_cuda.cu) against the reference.

Run under the SIMT emulator (``mmattn._C_emu``, CPU tensors, several scheduling
seeds) and on a GPU (``gpu`` marker). Oracle: the reference in float64; bound:
tests/tolerance.py's rule against the same-dtype reference.
"""

from __future__ import annotations

import pytest
import torch
from cuda_emu import SEEDS, TARGET_PARAMS, Target, emu_seed, make_target, require_emulator
from tolerance import assert_within_rule

from mmattn.backends import reference
from mmattn.layout import SparseLayout


@pytest.fixture(params=TARGET_PARAMS)
def target(request) -> Target:
    return make_target(request.param, "cuda_ws_spmm")


def _layout(kind: str, out_f: int, in_f: int, bs: int) -> SparseLayout:
    if kind == "ws":
        return SparseLayout.from_watts_strogatz(out_f, in_f, k=4, beta=0.3, seed=3,
                                                block_size=bs)
    return SparseLayout.from_mask(torch.rand(out_f, in_f) < 0.3, bs)


def check_ws(target: Target, layout: SparseLayout, x: torch.Tensor, bias: bool = True,
             amplitude: float = 1.0) -> None:
    dtype, dev, be = x.dtype, target.device, target.backend
    out_f, bs = layout.out_features, layout.block_size
    shape = (layout.nnz, bs, bs) if bs > 1 else (layout.nnz,)
    values = (torch.randn(shape) * amplitude).to(dtype)
    b = torch.randn(out_f).to(dtype) if bias else None
    gy = torch.randn(x.shape[0], out_f).to(dtype)
    idx = layout.index_tensors()
    lay = [t.to(dev) for t in idx]
    y = target.run(be.ws_linear_forward, x.to(dev), values.to(dev), *lay, out_f, bs,
                   None if b is None else b.to(dev)).cpu()
    raw = target.run(be.ws_linear_backward, gy.to(dev), x.to(dev), values.to(dev), *lay,
                     out_f, bs, bias, True, True)
    grads = [g.cpu() for g in raw if g is not None]

    def ref(dt):
        def cast(t):
            return (None if t is None else t.to(dt))
        yr = reference.ws_linear_forward(cast(x), cast(values), *idx, out_f, bs, cast(b))
        grads = reference.ws_linear_backward(cast(gy), cast(x), cast(values), *idx, out_f, bs,
                                             bias)
        return (yr, *(g for g in grads if g is not None))

    same, oracle = ref(dtype), ref(torch.float64)
    assert y.dtype == dtype and y.shape == (x.shape[0], out_f)
    names = ("y", "dx", "d_values", "d_bias") if bias else ("y", "dx", "d_values")
    for name, got, r, o in zip(names, (y, *grads), same, oracle, strict=False):
        assert got.dtype == dtype, name
        assert_within_rule(got, r.to(dtype), o, name=name)
    if not bias:
        assert raw[2] is None


CASES = [  # (kind, out_features, in_features, block_size)
    ("ws", 96, 64, 1),
    ("random", 50, 37, 1),
    ("random", 70, 45, 3),    # scalar block path, cropped edge blocks
    ("random", 64, 64, 8),    # vectorised weight rows
    ("ws", 96, 80, 16),       # tensor cores (half types), edge blocks
    ("random", 100, 70, 32),  # tensor cores, bigger blocks
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_layouts(target: Target, case, dtype) -> None:
    kind, out_f, in_f, bs = case
    layout = _layout(kind, out_f, in_f, bs)
    for n in (1, 13):
        check_ws(target, layout, torch.randn(n, in_f).to(dtype), bias=n == 13)


@pytest.mark.parametrize("amplitude", [3.0, 30.0])
def test_amplitudes_and_long_batch(target: Target, amplitude: float) -> None:
    for bs in (1, 16):
        layout = _layout("ws", 64, 64, bs)
        check_ws(target, layout, (torch.randn(97, 64) * amplitude).half(), amplitude=amplitude)


def test_strided_and_misaligned_inputs(target: Target) -> None:
    layout = _layout("random", 64, 48, 8)
    wide = torch.randn(13, 56).half()
    check_ws(target, layout, wide[:, :48])                      # row stride 56, read in place
    check_ws(target, layout, torch.randn(48, 13).half().t())    # feature stride != 1: copied
    # values starting off a 16-byte boundary take the scalar path
    dev, be = target.device, target.backend
    flat = torch.randn(layout.nnz * 64 + 1).half()
    values = flat[1:].view(layout.nnz, 8, 8)
    x = torch.randn(5, 48).half()
    lay = [t.to(dev) for t in layout.index_tensors()]
    y = target.run(be.ws_linear_forward, x.to(dev), values.to(dev), *lay, 64, 8, None)
    want = reference.ws_linear_forward(x.double(), values.double(), *layout.index_tensors(), 64,
                                       8, None)
    assert (y.cpu().double() - want).abs().max().item() < 2e-2


def test_skipped_gradients_are_none(target: Target) -> None:
    layout = _layout("ws", 32, 32, 1)
    dev, be = target.device, target.backend
    x = torch.randn(4, 32).to(dev)
    values = torch.randn(layout.nnz).to(dev)
    lay = [t.to(dev) for t in layout.index_tensors()]
    dx, dv, db = target.run(be.ws_linear_backward, torch.randn(4, 32).to(dev), x, values, *lay,
                            32, 1, False, False, False)
    assert dx is None and dv is None and db is None
    empties = target.run(be.ops.cuda_ws_spmm_backward, torch.randn(4, 32).to(dev), x, values,
                         lay[0], lay[1], lay[3], lay[4], lay[5], 1, False, False, False)
    assert all(t.numel() == 0 for t in empties)


def test_bitwise_deterministic_across_schedules() -> None:
    require_emulator()
    from mmattn.backends import cuda

    be = cuda.emulated()
    for bs in (1, 4, 16):
        layout = _layout("ws", 64, 64, bs)
        idx = layout.index_tensors()
        shape = (layout.nnz, bs, bs) if bs > 1 else (layout.nnz,)
        values, x, gy = torch.randn(shape).half(), torch.randn(33, 64).half(), \
            torch.randn(33, 64).half()
        runs = []
        for seed in (*SEEDS, 99):
            with emu_seed(seed):
                y = be.ws_linear_forward(x, values, *idx, 64, bs, None)
                runs.append((y, *be.ws_linear_backward(gy, x, values, *idx, 64, bs, True, True,
                                                       True)))
        for other in runs[1:]:
            for a, b in zip(runs[0], other, strict=True):
                assert torch.equal(a, b)


def test_unsupported_reasons() -> None:
    require_emulator()
    from mmattn.backends import cuda

    be = cuda.emulated()
    assert be.ws_linear_unsupported(torch.randn(2, 3)) is None
    assert "float32/float16/bfloat16" in be.ws_linear_unsupported(torch.randn(2, 3).double())
    assert "cuda tensors" in cuda.ws_linear_unsupported(torch.randn(2, 3))


def test_opcheck_emulated_ops() -> None:
    require_emulator()
    ops = torch.ops.mmattn_emu
    layout = _layout("ws", 16, 16, 1)
    idx = layout.index_tensors()
    x, values = torch.randn(3, 16), torch.randn(layout.nnz)
    torch.library.opcheck(ops.cuda_ws_spmm.default,
                          (x, values, idx[0], idx[1], 16, 1, torch.randn(16)))
    torch.library.opcheck(ops.cuda_ws_spmm_backward.default,
                          (torch.randn(3, 16), x, values, idx[0], idx[1], idx[3], idx[4], idx[5],
                           1, True, True, True))
