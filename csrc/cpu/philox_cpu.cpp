// CPU kernel of mmattn::philox_uniform.
#include <optional>

#include "../philox.h"
#include "../stable_utils.h"

namespace mmattn {

Tensor philox_uniform_cpu(Tensor counter0, Tensor counter1, int64_t seed,
                          std::optional<Tensor> counter2) {
  check_int32_contiguous(counter0, "counter0");
  check_int32_contiguous(counter1, "counter1");
  STD_TORCH_CHECK(counter0.numel() == counter1.numel(),
                  "counter0 and counter1 must have the same number of elements");
  if (counter2.has_value()) {
    check_int32_contiguous(*counter2, "counter2");
    STD_TORCH_CHECK(counter2->numel() == counter0.numel(),
                    "counter2 must have as many elements as counter0");
  }
  Tensor out = torch::stable::new_empty(counter0, counter0.sizes(), ScalarType::Float);
  const auto* c0 = counter0.const_data_ptr<int32_t>();
  const auto* c1 = counter1.const_data_ptr<int32_t>();
  const int32_t* c2 = counter2.has_value() ? counter2->const_data_ptr<int32_t>() : nullptr;
  float* dst = out.mutable_data_ptr<float>();
  const uint64_t key = static_cast<uint64_t>(seed);
  torch::stable::parallel_for(0, counter0.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      dst[i] = philox_uniform(key, static_cast<uint32_t>(c0[i]), static_cast<uint32_t>(c1[i]),
                              c2 == nullptr ? 0u : static_cast<uint32_t>(c2[i]));
    }
  });
  return out;
}

}  // namespace mmattn

STABLE_TORCH_LIBRARY_IMPL(mmattn, CPU, m) {
  m.impl("philox_uniform", TORCH_BOX(&mmattn::philox_uniform_cpu));
}
