// CUDA kernel of mmattn::philox_uniform: the smallest real kernel of the
// extension, so the nvcc toolchain, the shared Philox header and stable-ABI
// registration on the CUDA dispatch key are exercised by every build.
#include <cuda_runtime.h>

#include <optional>

#include "../philox.h"
#include "../stable_utils.h"
#include "stream.h"

namespace mmattn {

__global__ void philox_uniform_kernel(const int32_t* __restrict__ counter0,
                                      const int32_t* __restrict__ counter1,
                                      const int32_t* __restrict__ counter2, float* __restrict__ out,
                                      uint64_t seed, int64_t numel) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    out[i] = philox_uniform(seed, static_cast<uint32_t>(counter0[i]),
                            static_cast<uint32_t>(counter1[i]),
                            counter2 == nullptr ? 0u : static_cast<uint32_t>(counter2[i]));
  }
}

Tensor philox_uniform_cuda(Tensor counter0, Tensor counter1, int64_t seed,
                           std::optional<Tensor> counter2) {
  check_int32_contiguous(counter0, "counter0");
  check_int32_contiguous(counter1, "counter1");
  STD_TORCH_CHECK(counter0.numel() == counter1.numel(),
                  "counter0 and counter1 must have the same number of elements");
  if (counter2.has_value()) {
    check_int32_contiguous(*counter2, "counter2");
    STD_TORCH_CHECK(counter2->numel() == counter0.numel() && counter2->is_cuda() &&
                        counter2->get_device_index() == counter0.get_device_index(),
                    "counter2 must match counter0 in size and device");
  }
  STD_TORCH_CHECK(counter0.is_cuda() && counter1.is_cuda() &&
                      counter0.get_device_index() == counter1.get_device_index(),
                  "counter0 and counter1 must be on the same CUDA device");
  // Allocation and launch must target the inputs' GPU, not the current one.
  const torch::stable::accelerator::DeviceGuard device_guard(counter0.get_device_index());
  Tensor out = torch::stable::new_empty(counter0, counter0.sizes(), ScalarType::Float);
  const int64_t numel = counter0.numel();
  if (numel == 0) return out;
  constexpr int threads = 256;
  const int64_t wanted_blocks = (numel + threads - 1) / threads;
  const int blocks = static_cast<int>(wanted_blocks < 65535 ? wanted_blocks : 65535);
  cudaStream_t stream = current_cuda_stream(counter0.get_device_index());
  philox_uniform_kernel<<<blocks, threads, 0, stream>>>(
      counter0.const_data_ptr<int32_t>(), counter1.const_data_ptr<int32_t>(),
      counter2.has_value() ? counter2->const_data_ptr<int32_t>() : nullptr,
      out.mutable_data_ptr<float>(), static_cast<uint64_t>(seed), numel);
  check_cuda_launch("philox_uniform_kernel");
  return out;
}

}  // namespace mmattn

STABLE_TORCH_LIBRARY_IMPL(mmattn, CUDA, m) {
  m.impl("philox_uniform", TORCH_BOX(&mmattn::philox_uniform_cuda));
}
