// The AVX-512 (F, BW, VL, DQ) build of the fused attention kernels (attention_cpu_impl.h).
//
// The whole unit is compiled for the baseline ISA except the region below,
// which a target pragma compiles for avx512; attention_cpu.cpp picks this
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
#define MMATTN_ATTN_AVX512_BUILT 1

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx2")
#endif

namespace mmattn::attn_cpu::avx512 {
constexpr const char* kIsaName = "avx512";
#include "simd_avx512.h"
#include "attention_cpu_impl.h"
}  // namespace mmattn::attn_cpu::avx512

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // x86-64

namespace mmattn::attn_cpu {

const KernelSet* kernels_avx512() {
#if defined(MMATTN_ATTN_AVX512_BUILT)
  return &avx512::kKernelSet;
#else
  return nullptr;
#endif
}

}  // namespace mmattn::attn_cpu
