// Deliberately broken kernels and their correct twins, compiled only into the
// test extension mmattn._C_emu: the proof that the emulator catches the two
// classic bugs of hand-written CUDA. tests/test_cuda_emulator.py asserts that
// the correct twins pass and the broken ones give wrong results.
//
// * emu_gemm_16x8x16(a, b, off_by_one): one warp loads A (16x16) and B (16x8)
//   into mma.m16n8k16 fragments from the documented layouts and returns A B.
//   The broken twin puts the upper k-half of A at column offset 7 instead of 8.
// * emu_block_sum(x, skip_barrier): a block of 128 threads stores x into shared
//   memory and tree-reduces it. The broken twin omits the barrier between the
//   stores and the first reduction step.
#include "../../csrc/cuda/host.h"

namespace mmattn {
namespace {

template <bool kOffByOne>
MMATTN_KERNEL void gemm_16x8x16_kernel(const dev::f16* a, const dev::f16* b, float* d) {
  const int lane = static_cast<int>(dev::lane_id());
  const int g = lane >> 2, t = lane % 4;
  uint32_t af[4], bf[2];
  for (int r = 0; r < 4; ++r) {
    float v[2];
    for (int e = 0; e < 2; ++e) {
      const int i = 2 * r + e;  // element a_i of the fragment
      const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
      const int upper = kOffByOne ? 7 : 8;  // the bug: one column short
      const int col = 2 * t + (i & 1) + (i >= 4 ? upper : 0);
      v[e] = dev::to_float(a[row * 16 + col]);
    }
    af[r] = dev::pack2<dev::f16>(v[0], v[1]);
  }
  for (int r = 0; r < 2; ++r) {
    float v[2];
    for (int e = 0; e < 2; ++e) {
      const int i = 2 * r + e;
      const int row = 2 * t + (i & 1) + (i >= 2 ? 8 : 0);
      v[e] = dev::to_float(b[row * 8 + g]);
    }
    bf[r] = dev::pack2<dev::f16>(v[0], v[1]);
  }
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  dev::mma_m16n8k16<dev::f16>(acc, af, bf);
  for (int i = 0; i < 4; ++i) {
    const int row = i < 2 ? g : g + 8;
    const int col = 2 * t + (i & 1);
    d[row * 8 + col] = acc[i];
  }
}

template <bool kSkipBarrier>
MMATTN_KERNEL void block_sum_kernel(const float* x, int64_t n, float* out) {
  constexpr int kThreads = 128;
  MMATTN_SHARED(float, partial, kThreads);
  const int tid = static_cast<int>(dev::thread_x());
  float s = 0.f;
  for (int64_t i = tid; i < n; i += kThreads) s += x[i];
  partial[tid] = s;
  if (!kSkipBarrier) dev::sync_threads();  // the bug: readers below may run first
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (tid < stride) partial[tid] += partial[tid + stride];
    dev::sync_threads();
  }
  if (tid == 0) out[0] = partial[0];
}

Tensor emu_gemm_16x8x16(Tensor a, Tensor b, bool off_by_one) {
  STD_TORCH_CHECK(a.is_cpu() && a.scalar_type() == ScalarType::Half && a.is_contiguous() &&
                      a.dim() == 2 && a.size(0) == 16 && a.size(1) == 16,
                  "a must be a contiguous float16 (16, 16) CPU tensor");
  STD_TORCH_CHECK(b.is_cpu() && b.scalar_type() == ScalarType::Half && b.is_contiguous() &&
                      b.dim() == 2 && b.size(0) == 16 && b.size(1) == 8,
                  "b must be a contiguous float16 (16, 8) CPU tensor");
  Tensor d = torch::stable::new_empty(a, {16, 8}, ScalarType::Float);
  auto kernel = off_by_one ? gemm_16x8x16_kernel<true> : gemm_16x8x16_kernel<false>;
  dev::launch(kernel, dev::Dim3(1), dev::Dim3(32), 0, nullptr, "gemm_16x8x16_kernel",
              static_cast<const dev::f16*>(a.const_data_ptr()),
              static_cast<const dev::f16*>(b.const_data_ptr()), d.mutable_data_ptr<float>());
  return d;
}

Tensor emu_block_sum(Tensor x, bool skip_barrier) {
  STD_TORCH_CHECK(x.is_cpu() && x.scalar_type() == ScalarType::Float && x.is_contiguous(),
                  "x must be a contiguous float32 CPU tensor");
  Tensor out = torch::stable::new_empty(x, {1}, ScalarType::Float);
  auto kernel = skip_barrier ? block_sum_kernel<true> : block_sum_kernel<false>;
  dev::launch(kernel, dev::Dim3(1), dev::Dim3(128), 0, nullptr, "block_sum_kernel",
              x.const_data_ptr<float>(), x.numel(), out.mutable_data_ptr<float>());
  return out;
}

}  // namespace
}  // namespace mmattn

STABLE_TORCH_LIBRARY_FRAGMENT(mmattn_emu, m) {
  m.def("emu_gemm_16x8x16(Tensor a, Tensor b, bool off_by_one) -> Tensor");
  m.def("emu_block_sum(Tensor x, bool skip_barrier) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(mmattn_emu, CPU, m) {
  m.impl("emu_gemm_16x8x16", TORCH_BOX(&mmattn::emu_gemm_16x8x16));
  m.impl("emu_block_sum", TORCH_BOX(&mmattn::emu_block_sum));
}
