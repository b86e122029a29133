// CUDA kernel of mmattn::philox_uniform: the smallest real kernel of the
// extension, so the nvcc toolchain, the shared Philox header, the device layer
// and stable-ABI registration on the CUDA dispatch key are exercised by every
// build (and, emulated, by mmattn_emu::philox_uniform in the tests).
#include <optional>

#include "../philox.h"
#include "host.h"

namespace mmattn {
namespace {

MMATTN_KERNEL void philox_uniform_kernel(const int32_t* __restrict__ counter0,
                                         const int32_t* __restrict__ counter1,
                                         const int32_t* __restrict__ counter2,
                                         float* __restrict__ out, uint64_t seed, int64_t numel) {
  const int64_t stride = static_cast<int64_t>(dev::grid_dim_x()) * dev::block_dim_x();
  for (int64_t i = static_cast<int64_t>(dev::block_x()) * dev::block_dim_x() + dev::thread_x();
       i < numel; i += stride) {
    out[i] = philox_uniform(seed, static_cast<uint32_t>(counter0[i]),
                            static_cast<uint32_t>(counter1[i]),
                            counter2 == nullptr ? 0u : static_cast<uint32_t>(counter2[i]));
  }
}

Tensor philox_uniform_device(Tensor counter0, Tensor counter1, int64_t seed,
                             std::optional<Tensor> counter2) {
  using namespace cuda_host;
  check_int32_contiguous(counter0, "counter0");
  check_int32_contiguous(counter1, "counter1");
  STD_TORCH_CHECK(counter0.numel() == counter1.numel(),
                  "counter0 and counter1 must have the same number of elements");
  STD_TORCH_CHECK(same_device(counter0, counter1), "counter0 and counter1 must be on the same ",
                  kDeviceName, " device");
  if (counter2.has_value()) {
    check_int32_contiguous(*counter2, "counter2");
    STD_TORCH_CHECK(counter2->numel() == counter0.numel() && same_device(*counter2, counter0),
                    "counter2 must match counter0 in size and device");
  }
  const DeviceGuard guard(counter0);
  Tensor out = torch::stable::new_empty(counter0, counter0.sizes(), ScalarType::Float);
  const int64_t numel = counter0.numel();
  if (numel == 0) return out;
  constexpr int threads = 256;
  const int64_t wanted_blocks = (numel + threads - 1) / threads;
  const unsigned blocks = static_cast<unsigned>(wanted_blocks < 65535 ? wanted_blocks : 65535);
  dev::launch(philox_uniform_kernel, dev::Dim3(blocks), dev::Dim3(threads), 0,
              stream_of(counter0), "philox_uniform_kernel", counter0.const_data_ptr<int32_t>(),
              counter1.const_data_ptr<int32_t>(),
              counter2.has_value() ? counter2->const_data_ptr<int32_t>() : nullptr,
              out.mutable_data_ptr<float>(), static_cast<uint64_t>(seed), numel);
  return out;
}

}  // namespace
}  // namespace mmattn

MMATTN_CUDA_IMPL(m) { m.impl("philox_uniform", TORCH_BOX(&mmattn::philox_uniform_device)); }
