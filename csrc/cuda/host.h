// Host-side helpers of the CUDA launchers, in both builds of csrc/cuda.
//
// Real build (nvcc): ops live in the `mmattn` namespace on the CUDA dispatch
// key, tensors are CUDA tensors, launches go to the tensor's current stream.
// Emulated build (MMATTN_CUDA_EMULATION, the test extension mmattn._C_emu): the
// same launchers are registered as `mmattn_emu::...` on the CPU key, take CPU
// tensors and run the kernels under the SIMT emulator.
#pragma once

#include "../stable_utils.h"
#include "device.h"

#if defined(MMATTN_CUDA_EMULATION)
#define MMATTN_CUDA_NS mmattn_emu
#define MMATTN_CUDA_KEY CPU
#else
#include <torch/csrc/stable/accelerator.h>

#include "stream.h"
#define MMATTN_CUDA_NS mmattn
#define MMATTN_CUDA_KEY CUDA
#endif

// Indirections so that MMATTN_CUDA_NS / MMATTN_CUDA_KEY expand before the
// library macros paste them into identifiers.
#define MMATTN_CUDA_FRAGMENT_(ns, m) STABLE_TORCH_LIBRARY_FRAGMENT(ns, m)
#define MMATTN_CUDA_FRAGMENT(m) MMATTN_CUDA_FRAGMENT_(MMATTN_CUDA_NS, m)
#define MMATTN_CUDA_IMPL_(ns, key, m) STABLE_TORCH_LIBRARY_IMPL(ns, key, m)
#define MMATTN_CUDA_IMPL(m) MMATTN_CUDA_IMPL_(MMATTN_CUDA_NS, MMATTN_CUDA_KEY, m)

namespace mmattn::cuda_host {

#if defined(MMATTN_CUDA_EMULATION)
constexpr const char* kDeviceName = "CPU (emulated CUDA)";
inline bool on_device(const Tensor& t) { return t.is_cpu(); }
struct DeviceGuard {
  explicit DeviceGuard(const Tensor&) {}
};
inline dev::Stream stream_of(const Tensor&) { return nullptr; }
#else
constexpr const char* kDeviceName = "CUDA";
inline bool on_device(const Tensor& t) { return t.is_cuda(); }
// Allocation and launches must target the inputs' GPU, not the current one.
struct DeviceGuard {
  torch::stable::accelerator::DeviceGuard guard;
  explicit DeviceGuard(const Tensor& t) : guard(t.get_device_index()) {}
};
inline dev::Stream stream_of(const Tensor& t) { return current_cuda_stream(t.get_device_index()); }
#endif

inline bool same_device(const Tensor& a, const Tensor& b) {
  return on_device(a) && on_device(b) && a.get_device_index() == b.get_device_index();
}

inline unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

}  // namespace mmattn::cuda_host
