// Small helpers shared by the stable-ABI kernels of mmattn._C.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>

namespace mmattn {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

inline void check_int32_contiguous(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.scalar_type() == ScalarType::Int, name, " must be int32");
  STD_TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace mmattn
