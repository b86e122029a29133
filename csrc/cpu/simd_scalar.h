// Portable one-lane "vector" for the attention kernels: the fallback on CPUs
// (or architectures) without AVX2. Included by attention_cpu_generic.cpp
// inside namespace mmattn::attn_cpu::generic; <cmath> and csrc/philox.h are
// included before. Same interface as simd_avx512.h.

struct Vec {
  static constexpr int W = 1;
  static constexpr int kMR = 4;
  static constexpr int kNV = 4;
  // Rows of the two-chain micro-kernel (twice the accumulators per row).
  static constexpr int kMR2 = 2;
  using R = float;
  using M = bool;

  static inline R zero() { return 0.0f; }
  static inline R set1(float x) { return x; }
  static inline R load(const float* p) { return *p; }
  static inline void store(float* p, R x) { *p = x; }
  static inline M prefix(int n) { return n > 0; }
  static inline R load_n(const float* p, int n) { return n > 0 ? *p : 0.0f; }
  static inline void store_n(float* p, R x, int n) {
    if (n > 0) *p = x;
  }
  using Tail = int;
  static inline Tail tail(int n) { return n; }
  static inline R load_t(const float* p, Tail t) { return t > 0 ? *p : 0.0f; }
  static inline void store_t(float* p, R x, Tail t) {
    if (t > 0) *p = x;
  }
  // Scalar a * b + c rounded as one lane of fmadd.
  static inline float fma1(float a, float b, float c) { return a * b + c; }
  static inline R add(R a, R b) { return a + b; }
  static inline R sub(R a, R b) { return a - b; }
  static inline R mul(R a, R b) { return a * b; }
  static inline R max(R a, R b) { return a > b ? a : b; }
  static inline R fmadd(R a, R b, R c) { return a * b + c; }
  static inline R blend(M m, R if_true, R if_false) { return m ? if_true : if_false; }
  static inline M from_bits(uint32_t bits) { return (bits & 1u) != 0; }
  static inline M mask_and(M a, M b) { return a && b; }
  static inline M mask_not(M a) { return !a; }
  static inline bool mask_none(M a) { return !a; }
  static inline M eq(R a, R b) { return a == b; }
  static inline M bytes_nonzero(const uint8_t* p, int n) { return n > 0 && p[0] != 0; }
  static inline R exp(R x) { return std::exp(x); }
  static inline R transpose_sum(const R* r) { return r[0]; }
  static inline void transpose_store(const R* rows, float* dst, int64_t /*ld*/) { *dst = rows[0]; }
  static inline M dropout_keep(uint64_t seed, uint64_t base, uint64_t /*step*/, uint32_t c1,
                               float threshold) {
    return mmattn::dropout_uniform(seed, base, c1) >= threshold;
  }
};
