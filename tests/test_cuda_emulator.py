"""The SIMT emulator of the CUDA device layer (csrc/cuda/device.h, csrc/emu).

* The emulated ``mma.m16n8k16`` and ``ldmatrix`` are pinned to the PTX ISA's
  tables, written out below from the documentation (PTX ISA 9.7.14.5.8 "Matrix
  Fragments for mma.m16n8k16 with floating point type", 9.7.14.5.15 ldmatrix).
  The same probes run on a GPU (``gpu`` tests): passing both proves the emulator
  computes what the hardware does.
* Two deliberately broken kernels (tests/cuda/broken_kernels.cu) give wrong
  results under emulation while their correct twins pass.
* Kernel sources reach the hardware only through the device layer.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from cuda_emu import SEEDS, emu_seed, require_emulator

ROOT = Path(__file__).resolve().parents[1]


# ---- the PTX ISA tables, as the documentation writes them --------------------------------
# groupID = %laneid >> 2, threadID_in_group = %laneid % 4
#
# A (.f16/.bf16, 16x16, a0..a7):
#   row = groupID       for ai where 0 <= i < 2 || 4 <= i < 6
#         groupID + 8   otherwise
#   col = (threadID_in_group * 2) + (i & 0x1)       for ai where i < 4
#         (threadID_in_group * 2) + (i & 0x1) + 8   for ai where i >= 4
# B (.f16/.bf16, 16x8, b0..b3):
#   row = (threadID_in_group * 2) + (i & 0x1)       for bi where i < 2
#         (threadID_in_group * 2) + (i & 0x1) + 8   for bi where i >= 2
#   col = groupID
# C/D (.f32, 16x8, c0..c3):
#   row = groupID       for ci where i < 2
#         groupID + 8   for ci where i >= 2
#   col = (threadID_in_group * 2) + (i & 0x1)       for ci where i = {0,..,3}

def ptx_a(lane: int, i: int) -> tuple[int, int]:
    g, t = lane >> 2, lane % 4
    row = g if (0 <= i < 2 or 4 <= i < 6) else g + 8
    col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def ptx_b(lane: int, i: int) -> tuple[int, int]:
    g, t = lane >> 2, lane % 4
    return t * 2 + (i & 1) + (8 if i >= 2 else 0), g


def ptx_c(lane: int, i: int) -> tuple[int, int]:
    g, t = lane >> 2, lane % 4
    return (g if i < 2 else g + 8), t * 2 + (i & 1)


# A few cells read off the documentation's figures (Figure 79/81/83), as a check on
# the transcription of the formulas above.
FIGURE_CELLS = {
    "A": {(0, 0): (0, 0), (0, 1): (0, 1), (0, 2): (8, 0), (0, 4): (0, 8), (0, 7): (8, 9),
          (5, 0): (1, 2), (31, 7): (15, 15), (31, 0): (7, 6)},
    "B": {(0, 0): (0, 0), (0, 3): (9, 0), (5, 1): (3, 1), (31, 2): (14, 7), (31, 3): (15, 7)},
    "C": {(0, 0): (0, 0), (0, 3): (8, 1), (6, 1): (1, 5), (31, 3): (15, 7)},
}


def test_ptx_formulas_match_the_documentation_figures() -> None:
    for name, fn in (("A", ptx_a), ("B", ptx_b), ("C", ptx_c)):
        for (lane, i), cell in FIGURE_CELLS[name].items():
            assert fn(lane, i) == cell, (name, lane, i)
    # Each layout covers its matrix exactly once.
    assert sorted(ptx_a(lane, i) for lane in range(32) for i in range(8)) == [
        (r, c) for r in range(16) for c in range(16)]
    assert sorted(ptx_b(lane, i) for lane in range(32) for i in range(4)) == [
        (r, c) for r in range(16) for c in range(8)]
    assert sorted(ptx_c(lane, i) for lane in range(32) for i in range(4)) == [
        (r, c) for r in range(16) for c in range(8)]


def test_emulator_layout_tables_are_the_ptx_tables() -> None:
    require_emulator()
    for operand, (fn, count) in enumerate(((ptx_a, 8), (ptx_b, 4), (ptx_c, 4))):
        flat = torch.ops.mmattn_emu.emu_mma_layout(operand)
        got = [tuple(flat[2 * k: 2 * k + 2]) for k in range(32 * count)]
        want = [fn(lane, i) for lane in range(32) for i in range(count)]
        assert got == want, f"operand {'ABC'[operand]}"


# ---- probes: one warp runs the primitive on registers built from the tables ----------------

def _bits16(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF


def _pack_regs(values: torch.Tensor, coord, count: int) -> torch.Tensor:
    """(32, count // 2) int32 registers: element i of lane l is values[coord(l, i)],
    two 16-bit elements per register, the lower index in the low half."""
    bits = _bits16(values)
    regs = torch.zeros(32, count // 2, dtype=torch.int64)
    for lane in range(32):
        for i in range(count):
            r, c = coord(lane, i)
            regs[lane, i // 2] |= bits[r, c] << (16 * (i % 2))
    regs = torch.where(regs >= 2**31, regs - 2**32, regs)
    return regs.to(torch.int32)


def _mma_case(dtype: torch.dtype, amplitude: float = 1.0):
    a = (torch.randn(16, 16) * amplitude).to(dtype)
    b = (torch.randn(16, 8) * amplitude).to(dtype)
    c = torch.randn(16, 8)
    a_regs, b_regs = _pack_regs(a, ptx_a, 8), _pack_regs(b, ptx_b, 4)
    c_regs = torch.empty(32, 4)
    for lane in range(32):
        for i in range(4):
            c_regs[lane, i] = c[ptx_c(lane, i)]
    want = a.double() @ b.double() + c.double()
    return a_regs, b_regs, c_regs, want


def _unpack_d(d_regs: torch.Tensor) -> torch.Tensor:
    d = torch.empty(16, 8, dtype=torch.float64)
    for lane in range(32):
        for i in range(4):
            d[ptx_c(lane, i)] = float(d_regs[lane, i])
    return d


def check_mma_probe(ops, device: str) -> None:
    for dtype in (torch.float16, torch.bfloat16):
        for amplitude in (1.0, 30.0):
            a_regs, b_regs, c_regs, want = _mma_case(dtype, amplitude)
            d = ops.cuda_probe_mma(a_regs.to(device), b_regs.to(device), c_regs.to(device),
                                   dtype == torch.bfloat16).cpu()
            got = _unpack_d(d)
            # fp32 accumulation of exact products: relative error ~1e-6 of the magnitudes
            bound = 1e-5 * (want.abs().max().item() + 1.0)
            assert (got - want).abs().max().item() <= bound, (dtype, amplitude)


def _ldmatrix_want(tile: torch.Tensor, mode: int) -> torch.Tensor:
    """ldmatrix .m8n8.b16 from the documentation: matrix m's rows are the addresses of
    lanes 8m..8m+7 (here: rows 8m..8m+7 of the tile); lane l receives, in register m,
    row l/4 columns 2(l%4), 2(l%4)+1 of matrix m; with .trans column l/4 of rows
    2(l%4), 2(l%4)+1."""
    bits = _bits16(tile)
    num, trans = (4 if mode < 2 else 2), mode % 2 == 1
    out = torch.zeros(32, 4, dtype=torch.int64)
    for lane in range(32):
        for m in range(num):
            mat = bits[8 * m: 8 * m + 8]
            if trans:
                lo, hi = mat[2 * (lane % 4), lane // 4], mat[2 * (lane % 4) + 1, lane // 4]
            else:
                lo, hi = mat[lane // 4, 2 * (lane % 4)], mat[lane // 4, 2 * (lane % 4) + 1]
            out[lane, m] = lo | (hi << 16)
    out = torch.where(out >= 2**31, out - 2**32, out)
    return out.to(torch.int32)


def check_ldmatrix_probe(ops, device: str) -> None:
    tile = torch.randn(32, 8).half()
    for mode in range(4):
        got = ops.cuda_probe_ldmatrix(tile.view(torch.int16).to(device), mode).cpu()
        assert torch.equal(got, _ldmatrix_want(tile, mode)), f"mode {mode}"


def check_shfl_probe(ops, device: str) -> None:
    values = torch.randint(-2**31, 2**31 - 1, (32,), dtype=torch.int32)
    for arg in (1, 2, 5, 16, 31):
        got = ops.cuda_probe_shfl(values.to(device), arg).cpu()
        lanes = torch.arange(32)
        assert torch.equal(got[0], values[lanes ^ arg])
        assert torch.equal(got[1], values[(lanes + arg) % 32])


@pytest.mark.parametrize("seed", SEEDS)
def test_emulated_mma_probe(seed: int) -> None:
    require_emulator()
    with emu_seed(seed):
        check_mma_probe(torch.ops.mmattn_emu, "cpu")


def test_emulated_ldmatrix_and_shfl_probes() -> None:
    require_emulator()
    check_ldmatrix_probe(torch.ops.mmattn_emu, "cpu")
    check_shfl_probe(torch.ops.mmattn_emu, "cpu")


def _real_ops():
    from mmattn import _extension

    if not _extension.has_kernel("cuda_probe_mma", "CUDA"):
        pytest.skip("mmattn._C was built without CUDA kernels")
    return torch.ops.mmattn


@pytest.mark.gpu
def test_hardware_mma_matches_the_ptx_tables() -> None:
    check_mma_probe(_real_ops(), "cuda")


@pytest.mark.gpu
def test_hardware_ldmatrix_and_shfl_match_the_documentation() -> None:
    ops = _real_ops()
    check_ldmatrix_probe(ops, "cuda")
    check_shfl_probe(ops, "cuda")


# ---- the emulator catches the classic bugs -------------------------------------------------

def test_fragment_index_off_by_one_is_caught() -> None:
    require_emulator()
    a, b = torch.randn(16, 16).half(), torch.randn(16, 8).half()
    want = a.double() @ b.double()
    good = torch.ops.mmattn_emu.emu_gemm_16x8x16(a, b, False).double()
    bad = torch.ops.mmattn_emu.emu_gemm_16x8x16(a, b, True).double()
    assert (good - want).abs().max().item() < 1e-5
    assert (bad - want).abs().max().item() > 0.1


def test_missing_barrier_is_caught_under_every_seed() -> None:
    require_emulator()
    x = torch.randn(1000)
    want = x.double().sum().item()
    for seed in (*SEEDS, 12345):
        with emu_seed(seed):
            good = torch.ops.mmattn_emu.emu_block_sum(x, False).item()
            bad = torch.ops.mmattn_emu.emu_block_sum(x, True).item()
        assert abs(good - want) < 1e-4, seed
        # Readers ran before the writers they depend on: they saw the 0xFF (NaN) fill.
        assert not abs(bad - want) < 1e-4, seed


def test_emulated_philox_kernel_matches_the_reference() -> None:
    require_emulator()
    from mmattn.philox import philox_uniform

    c0 = torch.randint(-2**31, 2**31 - 1, (999,), dtype=torch.int32)
    c1 = torch.randint(-2**31, 2**31 - 1, (999,), dtype=torch.int32)
    c2 = torch.randint(0, 5, (999,), dtype=torch.int32)
    seed = 0x1234_5678_9ABC
    got = torch.ops.mmattn_emu.philox_uniform(c0, c1, seed, c2)
    assert torch.equal(got, philox_uniform(seed, c0, c1, c2))


# ---- kernels reach the hardware only through the device layer -----------------------------

_FORBIDDEN = re.compile(
    r"\b(threadIdx|blockIdx|blockDim|gridDim|__syncthreads|__syncwarp|__shfl\w*|asm\b|"
    r"__shared__|__global__|__ldg|atomic\w+)|<<<")


def test_kernel_sources_use_only_the_device_layer() -> None:
    sources = [*sorted((ROOT / "csrc" / "cuda").glob("*.cu")),
               *sorted((ROOT / "tests" / "cuda").glob("*.cu"))]
    assert sources
    for path in sources:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("//", 1)[0]
            assert not _FORBIDDEN.search(code), f"{path.name}:{number}: {line.strip()}"
