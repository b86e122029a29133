// AVX-512 float32 vector for the attention kernels (16 lanes).
//
// Included by attention_cpu_avx512.cpp inside namespace
// mmattn::attn_cpu::avx512 and a `#pragma GCC target("avx512f,...")` region;
// <immintrin.h> and <cstdint> are included before that region. No include
// guard on purpose: each ISA unit gets its own copy in its own namespace.

struct Vec {
  static constexpr int W = 16;
  // Register block of the GEMM micro-kernel: kMR rows x kNV vectors of
  // accumulators (6 x 4 = 24 of the 32 zmm registers, 4 for B, 1 broadcast).
  static constexpr int kMR = 6;
  static constexpr int kNV = 4;
  // Rows of the two-chain micro-kernel (twice the accumulators per row).
  static constexpr int kMR2 = 3;
  using R = __m512;
  using M = __mmask16;

  static inline R zero() { return _mm512_setzero_ps(); }
  static inline R set1(float x) { return _mm512_set1_ps(x); }
  static inline R load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, R x) { _mm512_storeu_ps(p, x); }
  // Lanes [0, n) set, n clamped to [0, W].
  static inline M prefix(int n) {
    if (n <= 0) return 0;
    if (n >= W) return 0xFFFF;
    return static_cast<M>((1u << n) - 1u);
  }
  static inline R load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(prefix(n), p); }
  static inline void store_n(float* p, R x, int n) { _mm512_mask_storeu_ps(p, prefix(n), x); }
  // Loads/stores of the first lanes of a vector with a mask computed once.
  using Tail = M;
  static inline Tail tail(int n) { return prefix(n); }
  static inline R load_t(const float* p, Tail t) { return _mm512_maskz_loadu_ps(t, p); }
  static inline void store_t(float* p, R x, Tail t) { _mm512_mask_storeu_ps(p, t, x); }
  // Scalar a * b + c rounded as one lane of fmadd.
  static inline float fma1(float a, float b, float c) { return std::fma(a, b, c); }
  static inline R add(R a, R b) { return _mm512_add_ps(a, b); }
  static inline R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static inline R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static inline R max(R a, R b) { return _mm512_max_ps(a, b); }
  static inline R fmadd(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static inline R blend(M m, R if_true, R if_false) {
    return _mm512_mask_blend_ps(m, if_false, if_true);
  }
  static inline M from_bits(uint32_t bits) { return static_cast<M>(bits); }
  static inline M mask_and(M a, M b) { return static_cast<M>(a & b); }
  static inline M mask_not(M a) { return static_cast<M>(~a); }
  static inline bool mask_none(M a) { return a == 0; }
  static inline M eq(R a, R b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  // Lanes whose byte in p[0, n) is nonzero (lanes >= n are clear).
  static inline M bytes_nonzero(const uint8_t* p, int n) {
    const __m128i bytes = _mm_maskz_loadu_epi8(prefix(n), p);
    return _mm_test_epi8_mask(bytes, bytes);
  }

  // dst[l * ld + r] = rows[r][l] for r, l < 16: a 16 x 16 register transpose
  // (unpack 32-bit, unpack 64-bit, two 128-bit lane shuffles), so a tile of
  // query lanes leaves as whole 64-byte rows of the weights matrix.
  static inline void transpose_store(const R* rows, float* dst, int64_t ld) {
    R t[16], u[16], v[16];
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_ps(rows[i], rows[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(rows[i], rows[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  // u[i + c]: rows i..i+3 of columns 4L + c
      const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 2]);
      const __m512d c = _mm512_castps_pd(t[i + 1]), d = _mm512_castps_pd(t[i + 3]);
      u[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      u[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
      u[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
      u[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
    }
    for (int c = 0; c < 4; ++c) {
      v[c] = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);
      v[4 + c] = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xdd);
      v[8 + c] = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
      v[12 + c] = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xdd);
    }
    for (int c = 0; c < 4; ++c) {
      _mm512_storeu_ps(dst + (c) * ld, _mm512_shuffle_f32x4(v[c], v[8 + c], 0x88));
      _mm512_storeu_ps(dst + (8 + c) * ld, _mm512_shuffle_f32x4(v[c], v[8 + c], 0xdd));
      _mm512_storeu_ps(dst + (4 + c) * ld, _mm512_shuffle_f32x4(v[4 + c], v[12 + c], 0x88));
      _mm512_storeu_ps(dst + (12 + c) * ld, _mm512_shuffle_f32x4(v[4 + c], v[12 + c], 0xdd));
    }
  }

  // Lane l of the result is the sum of the 16 lanes of r[l]: 16 horizontal sums at once
  // (the row path's dot products, keys on lanes). A fixed tree: pairs within 128-bit
  // lanes (unpack 32-bit, then 64-bit), then across them (two 128-bit shuffle stages).
  static inline R transpose_sum(const R* r) {
    R t[8], u[4];
    for (int i = 0; i < 8; ++i) {
      t[i] = _mm512_add_ps(_mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]),
                           _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]));
    }
    for (int i = 0; i < 4; ++i) {  // u[i], 128-bit lane L: lane-L sums of r[4i .. 4i+3]
      const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
      u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                           _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    const R z0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88),
                               _mm512_shuffle_f32x4(u[0], u[1], 0xdd));
    const R z1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88),
                               _mm512_shuffle_f32x4(u[2], u[3], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, 0x88), _mm512_shuffle_f32x4(z0, z1, 0xdd));
  }

  // exp(x) to about 1 ulp: n = round(x / ln2), r = x - n*ln2 in two parts
  // (Cody-Waite, so r is exact enough even for large |x|), e^r by a degree-6
  // minimax polynomial on [-ln2/2, ln2/2] (relative error 1e-7 in float32
  // Horner), times 2^n by scalef, which also covers the denormal range. The
  // clamp maps -inf (masked scores) to exactly 0; max(c, x) keeps NaN.
  static inline R exp(R x) {
    x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
    const R n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    R r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    R p = _mm512_set1_ps(1.382942051e-03f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.374771520e-03f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166835803e-02f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.666642083e-01f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.999999149e-01f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.000000036e+00f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.000000001e+00f));
    return _mm512_scalef_ps(p, n);
  }

  // Philox4x32-10 keep-mask of dropout for W lanes with counter0 = base + lane * step
  // (mod 2^32) and counter1 = c1; bit-identical to philox_uniform in csrc/philox.h.
  static inline __m512i mulhi_u32(__m512i a, __m512i b) {
    const __m512i even = _mm512_mul_epu32(a, b);
    const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), _mm512_srli_epi64(b, 32));
    return _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  }
  // High words of the lanes' 64-bit counters base + lane * step (counter2 of the
  // dropout definition): one broadcast unless the lanes straddle a 2^32 boundary.
  static inline __m512i counter_high_words(uint64_t base, uint64_t step) {
    const uint32_t first = static_cast<uint32_t>(base >> 32);
    if (static_cast<uint32_t>((base + step * (W - 1)) >> 32) == first) {
      return _mm512_set1_epi32(static_cast<int>(first));
    }
    uint32_t high[W];
    for (int lane = 0; lane < W; ++lane) {
      high[lane] = static_cast<uint32_t>((base + step * static_cast<uint64_t>(lane)) >> 32);
    }
    return _mm512_loadu_si512(reinterpret_cast<const __m512i*>(high));
  }
  static inline M dropout_keep(uint64_t seed, uint64_t base, uint64_t step, uint32_t c1,
                               float threshold) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i x0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(base)),
                                  _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(step))));
    __m512i x1 = _mm512_set1_epi32(static_cast<int>(c1));
    __m512i x2 = counter_high_words(base, step), x3 = _mm512_setzero_si512();
    uint32_t k0 = static_cast<uint32_t>(seed & 0xffffffffull);
    uint32_t k1 = static_cast<uint32_t>(seed >> 32);
    const __m512i mul_a = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
    const __m512i mul_b = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
    for (int round = 0; round < 10; ++round) {
      const __m512i hi_b = mulhi_u32(mul_b, x2), lo_b = _mm512_mullo_epi32(mul_b, x2);
      const __m512i hi_a = mulhi_u32(mul_a, x0), lo_a = _mm512_mullo_epi32(mul_a, x0);
      x0 = _mm512_xor_si512(_mm512_xor_si512(hi_b, x1), _mm512_set1_epi32(static_cast<int>(k0)));
      x2 = _mm512_xor_si512(_mm512_xor_si512(hi_a, x3), _mm512_set1_epi32(static_cast<int>(k1)));
      x1 = lo_b;
      x3 = lo_a;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    // tl.rand's map: int32, negatives folded with ~x (x ^ (x >> 31)), one multiply.
    const __m512i folded = _mm512_xor_si512(x0, _mm512_srai_epi32(x0, 31));
    const R uniform = _mm512_mul_ps(_mm512_cvtepi32_ps(folded), _mm512_set1_ps(4.6566127342e-10f));
    return _mm512_cmp_ps_mask(uniform, _mm512_set1_ps(threshold), _CMP_GE_OQ);
  }
};
