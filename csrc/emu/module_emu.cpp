// mmattn._C_emu: the test extension that runs mmattn's CUDA kernels on the CPU.
//
// Built by scripts/build_cuda_emu.py (never shipped in the wheel) from the same
// csrc/cuda sources as the real build, compiled by the host compiler with
// MMATTN_CUDA_EMULATION: the device layer (csrc/cuda/device.h) then runs every
// launch under the SIMT emulator (emulator.h). The launchers register as
// `mmattn_emu::<op>` on the CPU dispatch key, with the schemas of their
// `mmattn::<op>` twins.
#include <Python.h>

#include <cstdint>
#include <vector>

#include "../stable_utils.h"
#include "emulator.h"

namespace {

int64_t emu_set_seed(int64_t seed) {
  const auto previous = static_cast<int64_t>(mmattn::emu::get_seed());
  mmattn::emu::set_seed(static_cast<uint64_t>(seed));
  return previous;
}

std::vector<int64_t> emu_stats() {
  const mmattn::emu::Stats s = mmattn::emu::stats();
  return {static_cast<int64_t>(s.launches), static_cast<int64_t>(s.blocks),
          static_cast<int64_t>(s.switches), static_cast<int64_t>(s.collectives),
          static_cast<int64_t>(s.barriers)};
}

// Fragment coordinates of mma.m16n8k16 as the emulator computes them:
// (32 lanes, 8 elements, 2) for A, (32, 4, 2) for B and C/D; lets a test pin the
// emulator's tables against the PTX ISA's without running a kernel.
std::vector<int64_t> emu_mma_layout(int64_t operand) {
  STD_TORCH_CHECK(operand >= 0 && operand <= 2, "operand must be 0 (A), 1 (B) or 2 (C/D)");
  const int count = operand == 0 ? 8 : 4;
  std::vector<int64_t> out;
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < count; ++i) {
      int row = 0, col = 0;
      if (operand == 0) mmattn::emu::mma_a_coord(lane, i, &row, &col);
      if (operand == 1) mmattn::emu::mma_b_coord(lane, i, &row, &col);
      if (operand == 2) mmattn::emu::mma_c_coord(lane, i, &row, &col);
      out.push_back(row);
      out.push_back(col);
    }
  }
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY(mmattn_emu, m) {
  m.def("philox_uniform(Tensor counter0, Tensor counter1, int seed, Tensor? counter2=None) "
        "-> Tensor");
  // Scheduling seed of the emulator (fiber order, cp.async completion); returns the old one.
  m.def("emu_set_seed(int seed) -> int");
  // [launches, blocks, fiber switches, warp collectives, barriers] since load.
  m.def("emu_stats() -> int[]");
  m.def("emu_mma_layout(int operand) -> int[]");
}

STABLE_TORCH_LIBRARY_IMPL(mmattn_emu, CompositeExplicitAutograd, m) {
  m.impl("emu_set_seed", TORCH_BOX(&emu_set_seed));
  m.impl("emu_stats", TORCH_BOX(&emu_stats));
  m.impl("emu_mma_layout", TORCH_BOX(&emu_mma_layout));
}

extern "C" {
PyMODINIT_FUNC PyInit__C_emu(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C_emu", "mmattn CUDA kernels under the SIMT emulator (tests only)",
      -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}
