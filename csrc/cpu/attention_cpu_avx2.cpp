// The AVX2 + FMA build of the fused attention kernels (attention_cpu_impl.h).
//
// The whole unit is compiled for the baseline ISA except the region below,
// which a target pragma compiles for avx2; attention_cpu.cpp picks this
// version at run time only when the CPU reports the features. Standard and
// shared headers are included before the region so their inline functions
// stay baseline code in every unit.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "../philox.h"
#include "attention_cpu.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MMATTN_ATTN_AVX2_BUILT 1

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace mmattn::attn_cpu::avx2 {
constexpr const char* kIsaName = "avx2";
#include "simd_avx2.h"
#include "attention_cpu_impl.h"
}  // namespace mmattn::attn_cpu::avx2

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // x86-64

namespace mmattn::attn_cpu {

const KernelSet* kernels_avx2() {
#if defined(MMATTN_ATTN_AVX2_BUILT)
  return &avx2::kKernelSet;
#else
  return nullptr;
#endif
}

}  // namespace mmattn::attn_cpu
