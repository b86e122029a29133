// AVX2 + FMA float32 vector for the attention kernels (8 lanes).
//
// Included by attention_cpu_avx2.cpp inside namespace mmattn::attn_cpu::avx2
// and a `#pragma GCC target("avx2,fma")` region (see simd_avx512.h). Masks
// are all-ones / all-zeros float lanes, as AVX2 compares produce them.

struct Vec {
  static constexpr int W = 8;
  // 6 x 2 accumulators + 2 B vectors + 1 broadcast = 15 of the 16 ymm registers.
  static constexpr int kMR = 6;
  static constexpr int kNV = 2;
  // Rows of the two-chain micro-kernel (twice the accumulators per row).
  static constexpr int kMR2 = 3;
  using R = __m256;
  using M = __m256;

  static inline R zero() { return _mm256_setzero_ps(); }
  static inline R set1(float x) { return _mm256_set1_ps(x); }
  static inline R load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, R x) { _mm256_storeu_ps(p, x); }
  static inline __m256i prefix_i(int n) {
    alignas(32) static const int32_t table[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                  0,  0,  0,  0,  0,  0,  0,  0};
    n = n < 0 ? 0 : (n > W ? W : n);
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + W - n));
  }
  static inline M prefix(int n) { return _mm256_castsi256_ps(prefix_i(n)); }
  static inline R load_n(const float* p, int n) {
    return n >= W ? load(p) : _mm256_maskload_ps(p, prefix_i(n));
  }
  static inline void store_n(float* p, R x, int n) {
    if (n >= W) {
      store(p, x);
    } else {
      _mm256_maskstore_ps(p, prefix_i(n), x);
    }
  }
  using Tail = __m256i;
  static inline Tail tail(int n) { return prefix_i(n); }
  static inline R load_t(const float* p, Tail t) { return _mm256_maskload_ps(p, t); }
  static inline void store_t(float* p, R x, Tail t) { _mm256_maskstore_ps(p, t, x); }
  // Scalar a * b + c rounded as one lane of fmadd.
  static inline float fma1(float a, float b, float c) { return std::fma(a, b, c); }
  static inline R add(R a, R b) { return _mm256_add_ps(a, b); }
  static inline R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static inline R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static inline R max(R a, R b) { return _mm256_max_ps(a, b); }
  static inline R fmadd(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static inline R blend(M m, R if_true, R if_false) { return _mm256_blendv_ps(if_false, if_true, m); }
  static inline M from_bits(uint32_t bits) {
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i set = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), lane_bit);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(set, lane_bit));
  }
  static inline M mask_and(M a, M b) { return _mm256_and_ps(a, b); }
  static inline M mask_not(M a) {
    return _mm256_xor_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(-1)));
  }
  static inline bool mask_none(M a) { return _mm256_movemask_ps(a) == 0; }
  static inline M eq(R a, R b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  static inline M bytes_nonzero(const uint8_t* p, int n) {
    uint32_t bits = 0;
    for (int lane = 0; lane < n && lane < W; ++lane) bits |= (p[lane] != 0 ? 1u : 0u) << lane;
    return from_bits(bits);
  }

  // dst[l * ld + r] = rows[r][l] for r, l < 8: the 8 x 8 register transpose.
  static inline void transpose_store(const R* rows, float* dst, int64_t ld) {
    R t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(rows[i], rows[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(rows[i], rows[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
      u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
      u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
      u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
      _mm256_storeu_ps(dst + c * ld, _mm256_permute2f128_ps(u[c], u[4 + c], 0x20));
      _mm256_storeu_ps(dst + (4 + c) * ld, _mm256_permute2f128_ps(u[c], u[4 + c], 0x31));
    }
  }

  // Lane l of the result is the sum of the 8 lanes of r[l]: 8 horizontal sums at once
  // (the row path's dot products, keys on lanes). A fixed tree: pairs within 128-bit
  // lanes (unpack 32-bit, then 64-bit), then the two 128-bit halves.
  static inline R transpose_sum(const R* r) {
    R t[4], u[2];
    for (int i = 0; i < 4; ++i) {
      t[i] = _mm256_add_ps(_mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]),
                           _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]));
    }
    for (int i = 0; i < 2; ++i) {
      const __m256d a = _mm256_castps_pd(t[2 * i]), b = _mm256_castps_pd(t[2 * i + 1]);
      u[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)),
                           _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
    }
    return _mm256_add_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20),
                         _mm256_permute2f128_ps(u[0], u[1], 0x31));
  }

  // exp(x) to about 1 ulp; same reduction and polynomial as the AVX-512 version,
  // 2^n built from exponent bits. Inputs below -88 give exactly 0 (n = -127
  // makes the exponent field 0), so -inf maps to 0; max(c, x) keeps NaN.
  static inline R exp(R x) {
    x = _mm256_max_ps(_mm256_set1_ps(-88.0f), x);
    const R n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    R r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    R p = _mm256_set1_ps(1.382942051e-03f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.374771520e-03f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166835803e-02f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666642083e-01f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.999999149e-01f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.000000036e+00f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.000000001e+00f));
    const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23)));
  }

  static inline __m256i mulhi_u32(__m256i a, __m256i b) {
    const __m256i even = _mm256_mul_epu32(a, b);
    const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), _mm256_srli_epi64(b, 32));
    return _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  }
  // See simd_avx512.h.
  // High words of the lanes' 64-bit counters base + lane * step (counter2 of the
  // dropout definition): one broadcast unless the lanes straddle a 2^32 boundary.
  static inline __m256i counter_high_words(uint64_t base, uint64_t step) {
    const uint32_t first = static_cast<uint32_t>(base >> 32);
    if (static_cast<uint32_t>((base + step * (W - 1)) >> 32) == first) {
      return _mm256_set1_epi32(static_cast<int>(first));
    }
    uint32_t high[W];
    for (int lane = 0; lane < W; ++lane) {
      high[lane] = static_cast<uint32_t>((base + step * static_cast<uint64_t>(lane)) >> 32);
    }
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(high));
  }
  static inline M dropout_keep(uint64_t seed, uint64_t base, uint64_t step, uint32_t c1,
                               float threshold) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i x0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(base)),
                                  _mm256_mullo_epi32(lane, _mm256_set1_epi32(static_cast<int>(step))));
    __m256i x1 = _mm256_set1_epi32(static_cast<int>(c1));
    __m256i x2 = counter_high_words(base, step), x3 = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(seed & 0xffffffffull);
    uint32_t k1 = static_cast<uint32_t>(seed >> 32);
    const __m256i mul_a = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
    const __m256i mul_b = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
    for (int round = 0; round < 10; ++round) {
      const __m256i hi_b = mulhi_u32(mul_b, x2), lo_b = _mm256_mullo_epi32(mul_b, x2);
      const __m256i hi_a = mulhi_u32(mul_a, x0), lo_a = _mm256_mullo_epi32(mul_a, x0);
      x0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, x1), _mm256_set1_epi32(static_cast<int>(k0)));
      x2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, x3), _mm256_set1_epi32(static_cast<int>(k1)));
      x1 = lo_b;
      x3 = lo_a;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const __m256i folded = _mm256_xor_si256(x0, _mm256_srai_epi32(x0, 31));
    const R uniform = _mm256_mul_ps(_mm256_cvtepi32_ps(folded), _mm256_set1_ps(4.6566127342e-10f));
    return _mm256_cmp_ps(uniform, _mm256_set1_ps(threshold), _CMP_GE_OQ);
  }
};
