// Fused attention kernels, written once against the `Vec` interface
// (simd_avx512.h, simd_avx2.h, simd_scalar.h) and compiled once per ISA.
//
// Included (no include guard, on purpose) by attention_cpu_{avx512,avx2,generic}.cpp
// inside namespace mmattn::attn_cpu::<isa>, after `struct Vec` and inside that
// unit's target region; <algorithm>, <cmath>, <memory>, <vector>, <type_traits>,
// csrc/philox.h and attention_cpu.h are included before.
//
// Layout choice: every score tile is stored transposed, S^T[j][i] (key rows,
// query lanes), so
//   * S^T = K . Q^T needs no packing of K: K rows are broadcast scalars, and
//     Q^T (packed once per 64-query tile) is the vector operand;
//   * the softmax statistics (running max, sum, lse, delta) are vectors over
//     query lanes: no horizontal reductions anywhere;
//   * O += P . V reads P^T down its columns (broadcasts) and V rows (vectors),
//     so the output tile is row-major and leaves without a transpose.
// All five products of the backward have the same form (C += A . B with B rows
// contiguous), so one register-blocked micro-kernel serves everything.

using R = Vec::R;
using M = Vec::M;
constexpr int W = Vec::W;
constexpr float kNegInf = -__builtin_huge_valf();
constexpr float kPosInf = __builtin_huge_valf();
constexpr int kMaxGroups = static_cast<int>(kQueryTile) / W;  // vectors per query tile

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Products summed from zero before they join a running total (micro_kernel, blocked_dot,
// the softmax row sums): float32 error then grows like kSumBlock + n / kSumBlock for a
// sum of n terms instead of like n.
constexpr int kSumBlock = 16;
// Sums of at most kTwoChainMax terms (the scores and dP for D <= 32) run their block
// in two interleaved chains: one chain of 16 is about 15% less accurate than
// PyTorch's own float32 matmul there, two are as accurate (and as fast: the B panel
// is small). Longer sums are as accurate as matmul with one chain per block of 16,
// and keep the wider one-chain micro-kernel (two chains need twice the registers,
// which halves its rows and costs 5-50% for D = 64 .. 256).
constexpr int64_t kTwoChainMax = 32;
// Sums over more than 128 terms (D = 256) take blocks of 32: half the round trips
// through C (about 5% of such a forward), and still as accurate as matmul there.
inline int64_t short_block(int64_t K) { return K > 128 ? 2 * kSumBlock : kSumBlock; }
// The same for the GEMMs that sum over keys or queries of one tile (P . V, dV, dK, dQ):
// their terms carry a probability factor, so float32 partial sums grow more slowly
// than a score's sum over D, and longer blocks (fewer round trips through C) suffice.
constexpr int kSumBlockLong = 64;

// sum_k a[k] * b[k] in the order of gemm with KB = kSumBlock (fused multiply-adds in
// blocks of short_block(n); for n <= kTwoChainMax even offsets of a block in one chain and
// odd ones in another, the chains then added; each block added to the running total),
// so that a row dot product matches the GEMM's result for the same operands bit for
// bit.
inline float blocked_dot(const float* a, const float* b, int64_t n) {
  float total = 0.0f;
  const bool two = n <= kTwoChainMax;
  const int64_t kb = short_block(n);
  for (int64_t k0 = 0; k0 < n; k0 += kb) {
    const int64_t k_end = std::min<int64_t>(n, k0 + kb);
    float even = 0.0f, odd = 0.0f;
    for (int64_t k = k0; k < k_end; ++k) {
      if (!two || (k - k0) % 2 == 0) {
        even = Vec::fma1(a[k], b[k], even);
      } else {
        odd = Vec::fma1(a[k], b[k], odd);
      }
    }
    const float part = even + odd;
    total = k0 == 0 ? part : part + total;
  }
  return total;
}

// ---------------------------------------------------------------------------
// GEMM with register-blocked micro-kernels and fused epilogues.
// ---------------------------------------------------------------------------

// What the GEMM does to C before storing it (ACC == false only). Folding the
// elementwise steps of attention into the GEMM saves a load/store pass over
// each score tile:
//   kScores:  C = scale * (A.B); lane_max[n] = max(lane_max[n], max_m C[m, n])
//             (lane_max may be null);
//   kProbs:   C = exp((scale * (A.B) - lane[n]) - lane2[n])
//             (lane = lse, lane2 = lam: backward P, see BackwardParams::lam);
//   kDScores: C = scale * P[m, n] * ((A.B) [* Z[m, n]] - lane[n])
//             (lane = delta = rowsum(dO * O), P and Z laid out like C: backward dS).
enum Epi : int { kNone = 0, kScores, kProbs, kDScores };
struct Epilogue {
  float scale = 1.0f;
  float* lane_max = nullptr;
  const float* lane = nullptr;
  const float* lane2 = nullptr;
  const float* p = nullptr;
  const float* z = nullptr;
};

// Blocked summation over K: each block of KB products (short_block(K) for kSumBlock) is
// summed from zero in registers (in CH interleaved chains: products k0 + 2n in the
// first, k0 + 2n + 1 in the second, then added) and then added to a running total kept
// in C itself (the registers cannot hold another set of accumulators). One float32
// chain over all of K (e.g. a score over D = 256) has an error that grows with K;
// blocked, it grows with KB / CH + K / KB, which keeps the kernels within the
// reference's error at any input scale (issue 11). backward_prepare's blocked_dot sums
// delta in exactly this order. With ACC, C's old value is the first running total.
// (The K blocks stay inside the micro-kernel: a score tile's C does not fit L1 between
// blocks.)
template <int MR, int NV, bool ACC, bool A_COL, int EPI, int KB, int CH>
inline void micro_kernel(int64_t K, const float* __restrict a, int64_t sa,
                         const float* __restrict b, int64_t ldb, float* __restrict c,
                         int64_t ldc, int tail_lanes, const Epilogue& epi) {
  static_assert(!(ACC && EPI != kNone), "epilogues overwrite C");
  static_assert(CH == 1 || CH == 2, "one or two chains");
  const typename Vec::Tail tail = Vec::tail(tail_lanes);
  R acc[MR][NV];
  auto step = [&](R (&ch)[MR][NV], int64_t k) {
    const float* bk = b + k * ldb;
    R bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      bv[v] = v == NV - 1 ? Vec::load_t(bk + v * W, tail) : Vec::load(bk + v * W);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const R ar = Vec::set1(A_COL ? a[k * sa + r] : a[r * sa + k]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) ch[r][v] = Vec::fmadd(ar, bv[v], ch[r][v]);
    }
  };
  bool total_in_c = ACC;
  const int64_t kb = KB == kSumBlock ? short_block(K) : KB;
  for (int64_t k0 = 0;; k0 += kb) {
    const int64_t k_end = std::min(K, k0 + kb);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = Vec::zero();
    }
    if constexpr (CH == 1) {
      for (int64_t k = k0; k < k_end; ++k) step(acc, k);
    } else {
      R odd[MR][NV];
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) odd[r][v] = Vec::zero();
      }
      int64_t k = k0;
      for (; k + 1 < k_end; k += 2) {
        step(acc, k);
        step(odd, k + 1);
      }
      if (k < k_end) step(acc, k);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] = Vec::add(acc[r][v], odd[r][v]);
      }
    }
    if (total_in_c) {
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) {
          const R old = v == NV - 1 ? Vec::load_t(c + r * ldc + v * W, tail)
                                    : Vec::load(c + r * ldc + v * W);
          acc[r][v] = Vec::add(acc[r][v], old);
        }
      }
    }
    if (k_end >= K) break;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        if (v == NV - 1) {
          Vec::store_t(c + r * ldc + v * W, acc[r][v], tail);
        } else {
          Vec::store(c + r * ldc + v * W, acc[r][v]);
        }
      }
    }
    total_in_c = true;
  }
  const R scale = Vec::set1(epi.scale);
  if constexpr (EPI == kScores) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = Vec::mul(acc[r][v], scale);
    }
    if (epi.lane_max != nullptr) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        R mx = acc[0][v];
#pragma GCC unroll 8
        for (int r = 1; r < MR; ++r) mx = Vec::max(mx, acc[r][v]);
        float* lm = epi.lane_max + v * W;
        if (v == NV - 1) {
          Vec::store_t(lm, Vec::max(Vec::load_t(lm, tail), mx), tail);
        } else {
          Vec::store(lm, Vec::max(Vec::load(lm), mx));
        }
      }
    }
  } else if constexpr (EPI == kProbs) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      // lane buffers are padded to whole vectors
      const R lse = Vec::load(epi.lane + v * W), lam = Vec::load(epi.lane2 + v * W);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        acc[r][v] = Vec::exp(Vec::sub(Vec::sub(Vec::mul(acc[r][v], scale), lse), lam));
      }
    }
  } else if constexpr (EPI == kDScores) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const R delta = Vec::load(epi.lane + v * W);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        R d = acc[r][v];
        if (epi.z != nullptr) d = Vec::mul(d, Vec::load(epi.z + r * ldc + v * W));
        const R p = Vec::load(epi.p + r * ldc + v * W);
        acc[r][v] = Vec::mul(Vec::mul(p, Vec::sub(d, delta)), scale);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      if (v == NV - 1) {
        Vec::store_t(c + r * ldc + v * W, acc[r][v], tail);
      } else {
        Vec::store(c + r * ldc + v * W, acc[r][v]);
      }
    }
  }
}

// a + b as a float32 sum in `a` and the accumulated rounding errors in `c` (TwoSum):
// the softmax denominators add one partial sum per block of keys, so that for long
// rows their error stays at the level of a single rounding (a + c at the end).
template <class T>
inline void add_compensated(T& a, T& c, T b) {
  if constexpr (std::is_same_v<T, float>) {
    const float s = a + b, bp = s - a;
    c += (a - (s - bp)) + (b - bp);
    a = s;
  } else {
    const R s = Vec::add(a, b), bp = Vec::sub(s, a);
    c = Vec::add(c, Vec::add(Vec::sub(a, Vec::sub(s, bp)), Vec::sub(b, bp)));
    a = s;
  }
}

// Epilogue pointers for the block of C starting at row m0, column n0.
inline Epilogue offset_epilogue(const Epilogue& e, int64_t m0, int64_t n0, int64_t ldc) {
  Epilogue o = e;
  if (o.lane_max) o.lane_max += n0;
  if (o.lane) o.lane += n0;
  if (o.lane2) o.lane2 += n0;
  if (o.p) o.p += m0 * ldc + n0;
  if (o.z) o.z += m0 * ldc + n0;
  return o;
}

template <int NV, bool ACC, bool A_COL, int EPI, int KB, int CH>
inline void gemm_strip(int64_t M, int64_t K, const float* a, int64_t sa, const float* b,
                       int64_t ldb, float* c, int64_t ldc, int tail, const Epilogue& epi,
                       int64_t n0) {
  // Two chains need twice the accumulators: fewer rows per micro-kernel.
  constexpr int MR = CH == 2 ? Vec::kMR2 : Vec::kMR;
  const int64_t row_step = A_COL ? 1 : sa;  // distance in `a` between rows of A
  int64_t m0 = 0;
  for (; m0 + MR <= M; m0 += MR) {
    micro_kernel<MR, NV, ACC, A_COL, EPI, KB, CH>(K, a + m0 * row_step, sa, b, ldb,
                                                  c + m0 * ldc, ldc, tail,
                                                  offset_epilogue(epi, m0, n0, ldc));
  }
  const int64_t rest = M - m0;
  const float* ar = a + m0 * row_step;
  float* cr = c + m0 * ldc;
  const Epilogue e = offset_epilogue(epi, m0, n0, ldc);
#define MMATTN_REST(n) \
  micro_kernel<n, NV, ACC, A_COL, EPI, KB, CH>(K, ar, sa, b, ldb, cr, ldc, tail, e)
  switch (rest) {
    case 0: break;
    case 1: MMATTN_REST(1); break;
    case 2:
      if constexpr (MR > 2) MMATTN_REST(2);
      break;
    case 3:
      if constexpr (MR > 3) MMATTN_REST(3);
      break;
    default:
      if constexpr (MR > 4) {
        if (rest == 4) MMATTN_REST(4);
        if (rest == 5) MMATTN_REST(5);
      }
      break;
  }
#undef MMATTN_REST
}

// GEMM: C (M x N, row stride ldc) [+]= A (M x K) . B (K x N, row stride ldb), then
// the epilogue EPI. A is read as broadcast scalars: A(m, k) = a[m * sa + k] when
// A_COL is false (rows of A contiguous) or a[m + k * sa] when A_COL is true. B and
// C rows are vectors; the last vector of a strip is masked, so N needs no padding.
template <bool ACC, bool A_COL, int EPI, int KB, int CH>
void gemm_chains(int64_t M, int64_t N, int64_t K, const float* a, int64_t sa, const float* b,
                 int64_t ldb, float* c, int64_t ldc, const Epilogue& epi) {
  static_assert(Vec::kMR <= 6, "gemm_strip handles row remainders up to 5");
  constexpr int64_t strip = Vec::kNV * W;
  for (int64_t n0 = 0; n0 < N; n0 += strip) {
    const int64_t width = std::min(N - n0, strip);
    const int nv = static_cast<int>((width + W - 1) / W);
    const int tail = static_cast<int>(width - (nv - 1) * W);
#define MMATTN_STRIP(n) \
  gemm_strip<n, ACC, A_COL, EPI, KB, CH>(M, K, a, sa, b + n0, ldb, c + n0, ldc, tail, epi, n0)
    switch (nv) {
      case 1: MMATTN_STRIP(1); break;
      case 2: MMATTN_STRIP(2); break;
      case 3:
        if constexpr (Vec::kNV >= 3) MMATTN_STRIP(3);
        break;
      case 4:
        if constexpr (Vec::kNV >= 4) MMATTN_STRIP(4);
        break;
      default: break;
    }
#undef MMATTN_STRIP
  }
}

// GEMM: C (M x N, row stride ldc) [+]= A (M x K) . B (K x N, row stride ldb), then
// the epilogue EPI. A is read as broadcast scalars: A(m, k) = a[m * sa + k] when
// A_COL is false (rows of A contiguous) or a[m + k * sa] when A_COL is true. B and
// C rows are vectors; the last vector of a strip is masked, so N needs no padding.
// K is summed in blocks of KB (kSumBlock: short_block(K), with two chains when
// K <= kTwoChainMax).
template <bool ACC, bool A_COL, int EPI = kNone, int KB = kSumBlock>
void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t sa, const float* b,
          int64_t ldb, float* c, int64_t ldc, const Epilogue& epi = Epilogue{}) {
  if (M <= 0 || N <= 0) return;
  if (KB == kSumBlock && K <= kTwoChainMax) {
    gemm_chains<ACC, A_COL, EPI, KB, 2>(M, N, K, a, sa, b, ldb, c, ldc, epi);
  } else {
    gemm_chains<ACC, A_COL, EPI, KB, 1>(M, N, K, a, sa, b, ldb, c, ldc, epi);
  }
}

// ---------------------------------------------------------------------------
// Score tiles: coordinates, masking.
// ---------------------------------------------------------------------------

// One (query tile) x (key tile) score tile of head (b, h).
struct Tile {
  int64_t i0 = 0, nq = 0;  // query rows [i0, i0 + nq), lanes of the tile
  int64_t j0 = 0, nk = 0;  // key rows [j0, j0 + nk), rows of the tile
  bool causal_cut = false;  // the causal diagonal crosses the tile
  // Block-sparse partial block: visibility of (key row r, lane l) is
  // partial[r * partial_ld + l] (already offset to this tile), or nullptr.
  const uint8_t* partial = nullptr;
  int64_t partial_ld = 0;
};

inline int64_t lanes_of(int64_t nq) { return round_up(nq, W); }

// dst[c * dst_ld + r] = src[r * src_ld + c] for r < rows, c < cols: W x W blocks
// through registers (Vec::transpose_store), scalar copies at the edges. Packs
// Q^T / dO^T and writes O^T back as rows of `out`.
void transpose_rows(const float* src, int64_t src_ld, int64_t rows, int64_t cols, float* dst,
                    int64_t dst_ld) {
  const int64_t rows_full = rows / W * W, cols_full = cols / W * W;
  for (int64_t r0 = 0; r0 < rows_full; r0 += W) {
    for (int64_t c0 = 0; c0 < cols_full; c0 += W) {
      R block[W];
      for (int r = 0; r < W; ++r) block[r] = Vec::load(src + (r0 + r) * src_ld + c0);
      Vec::transpose_store(block, dst + c0 * dst_ld + r0, dst_ld);
    }
    for (int64_t c = cols_full; c < cols; ++c) {
      for (int64_t r = r0; r < r0 + W; ++r) dst[c * dst_ld + r] = src[r * src_ld + c];
    }
  }
  for (int64_t r = rows_full; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * dst_ld + r] = src[r * src_ld + c];
  }
}

// dst[r * dst_ld + c] = src[r * src_ld + c] * factor[r] for r < rows, c < cols.
inline void scale_rows(const float* src, int64_t src_ld, int64_t rows, int64_t cols,
                       const float* factor, float* dst, int64_t dst_ld) {
  const int64_t full = cols / W * W;
  const int tail = static_cast<int>(cols - full);
  for (int64_t r = 0; r < rows; ++r) {
    const R f = Vec::set1(factor[r]);
    const float* in = src + r * src_ld;
    float* out = dst + r * dst_ld;
    for (int64_t c = 0; c < full; c += W) Vec::store(out + c, Vec::mul(Vec::load(in + c), f));
    if (tail > 0) Vec::store_n(out + full, Vec::mul(Vec::load_n(in + full, tail), f), tail);
  }
}

// dst[r * dst_ld + c] += src[r * src_ld + c] for r < rows, c < cols.
inline void add_rows(const float* src, int64_t src_ld, int64_t rows, int64_t cols, float* dst,
                     int64_t dst_ld) {
  const int64_t full = cols / W * W;
  const int tail = static_cast<int>(cols - full);
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = src + r * src_ld;
    float* out = dst + r * dst_ld;
    for (int64_t c = 0; c < full; c += W) {
      Vec::store(out + c, Vec::add(Vec::load(out + c), Vec::load(in + c)));
    }
    if (tail > 0) {
      Vec::store_n(out + full, Vec::add(Vec::load_n(out + full, tail),
                                        Vec::load_n(in + full, tail)), tail);
    }
  }
}

// dst[r * ld + c] += src[r * src_ld + c] for r < rows, c < cols, compensated: the
// rounding error of each addition is added to err[r * ld + c] (add_compensated), and the
// caller adds err to dst once the sum is complete. For the running sums over tiles (O
// over key tiles; dK, dV over query tiles; dQ over key tiles): a block-sparse mask with
// blocks of a few rows or keys makes thousands of tiles, and a plain float32 running sum
// over them had 3-5x the error of the reference's matmul (issue 11). Compensated, the
// sum over tiles costs one rounding whatever their number.
inline void add_rows_compensated(const float* src, int64_t src_ld, int64_t rows, int64_t cols,
                                 float* dst, float* err, int64_t ld) {
  const int64_t full = cols / W * W;
  const int tail = static_cast<int>(cols - full);
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = src + r * src_ld;
    float* out = dst + r * ld;
    float* e = err + r * ld;
    for (int64_t c = 0; c < full; c += W) {
      R a = Vec::load(out + c), ae = Vec::load(e + c);
      add_compensated(a, ae, Vec::load(in + c));
      Vec::store(out + c, a);
      Vec::store(e + c, ae);
    }
    if (tail > 0) {
      R a = Vec::load_n(out + full, tail), ae = Vec::load_n(e + full, tail);
      add_compensated(a, ae, Vec::load_n(in + full, tail));
      Vec::store_n(out + full, a, tail);
      Vec::store_n(e + full, ae, tail);
    }
  }
}

// Query lanes [i0, i0 + n) of mask element (b, h, ., j) as additive floats.
inline void gather_mask_lanes(const MaskView& mask, int64_t offset, int64_t n, float* out) {
  const int64_t si = mask.si;
  switch (mask.kind) {
    case MaskKind::Bool: {
      const uint8_t* p = static_cast<const uint8_t*>(mask.data) + offset;
      for (int64_t l = 0; l < n; ++l) out[l] = p[l * si] ? 0.0f : kNegInf;
      break;
    }
    case MaskKind::Float32: {
      const float* p = static_cast<const float*>(mask.data) + offset;
      for (int64_t l = 0; l < n; ++l) out[l] = p[l * si];
      break;
    }
    default:
      for (int64_t l = 0; l < n; ++l) out[l] = mask.additive(offset + l * si);
      break;
  }
}

inline bool tile_needs_mask(const Problem& P, const Tile& t) {
  return P.mask.kind != MaskKind::None || P.kpm != nullptr || t.causal_cut ||
         t.partial != nullptr;
}

// Applies the element masks to the scaled scores in st (t.nk rows of `lanes`
// floats); with TRACK_MAX, lane_max receives the per-lane max over the rows.
template <bool TRACK_MAX>
void mask_scores(const Problem& P, int64_t b, int64_t h, const Tile& t, float* st,
                 float* lane_max) {
  const int64_t lanes = lanes_of(t.nq);
  const int groups = static_cast<int>(lanes / W);
  const R neg_inf = Vec::set1(kNegInf);
  R mx[kMaxGroups];
  for (int g = 0; g < groups; ++g) mx[g] = neg_inf;
  const bool has_mask = P.mask.kind != MaskKind::None;
  const int64_t mask_base = b * P.mask.sb + h * P.mask.sh + t.i0 * P.mask.si;
  alignas(64) float mask_lanes[kQueryTile];
  for (int64_t j = 0; j < t.nk; ++j) {
    const int64_t key = t.j0 + j;
    float* row = st + j * lanes;
    bool row_hidden = P.kpm != nullptr && P.kpm[b * P.kpm_sb + key * P.kpm_sj] != 0;
    float row_add = 0.0f;  // mask value shared by all lanes (mask broadcast over queries)
    bool lane_mask = false;
    if (has_mask && !row_hidden) {
      const int64_t offset = mask_base + key * P.mask.sj;
      if (P.mask.si == 0) {
        row_add = P.mask.additive(offset);
        row_hidden = row_add == kNegInf;
      } else {
        gather_mask_lanes(P.mask, offset, t.nq, mask_lanes);
        for (int64_t l = t.nq; l < lanes; ++l) mask_lanes[l] = 0.0f;
        lane_mask = true;
      }
    }
    if (row_hidden) {
      for (int g = 0; g < groups; ++g) Vec::store(row + g * W, neg_inf);
      continue;
    }
    const R add = Vec::set1(row_add);
    for (int g = 0; g < groups; ++g) {
      R x = Vec::add(Vec::load(row + g * W), add);
      if (lane_mask) x = Vec::add(x, Vec::load(mask_lanes + g * W));
      if (t.causal_cut) {
        // Lanes i < key are hidden: a prefix of (key - i0 - g*W) lanes.
        x = Vec::blend(Vec::prefix(static_cast<int>(std::min<int64_t>(
                           std::max<int64_t>(key - t.i0 - g * W, 0), W))),
                       neg_inf, x);
      }
      if (t.partial) {
        const int64_t valid = std::min<int64_t>(t.nq - g * W, W);
        const M visible = Vec::bytes_nonzero(t.partial + j * t.partial_ld + g * W,
                                             static_cast<int>(std::max<int64_t>(valid, 0)));
        x = Vec::blend(visible, x, neg_inf);
      }
      Vec::store(row + g * W, x);
      if constexpr (TRACK_MAX) mx[g] = Vec::max(mx[g], x);
    }
  }
  if constexpr (TRACK_MAX) {
    for (int g = 0; g < groups; ++g) Vec::store(lane_max + g * W, mx[g]);
  }
}

// Query tiles of at most this many rows take the row path (SIMD builds only): the
// forward's forward_row, and score_tile's row order below.
constexpr int64_t kRowPathRows = W > 1 ? 4 : 0;

// Scores of W keys (rows[r], r < W) against q: lane r of the result is q . rows[r],
// one accumulator per key summed over D in blocks of kSumBlock vectors, then
// Vec::transpose_sum. All W accumulators stay in registers (fixed trip counts).
inline R row_scores_group(const float* const* rows, const float* q, int64_t d_full, int tail) {
  R total = Vec::zero();
  const int64_t d_all = d_full + (tail > 0 ? W : 0);
  for (int64_t d0 = 0; d0 < d_all; d0 += W * kSumBlock) {
    R acc[W];
#pragma GCC unroll 16
    for (int r = 0; r < W; ++r) acc[r] = Vec::zero();
    const int64_t d_end = std::min<int64_t>(d_full, d0 + W * kSumBlock);
    for (int64_t d = d0; d < d_end; d += W) {
      const R qv = Vec::load(q + d);
#pragma GCC unroll 16
      for (int r = 0; r < W; ++r) acc[r] = Vec::fmadd(Vec::load(rows[r] + d), qv, acc[r]);
    }
    if (tail > 0 && d_full >= d0 && d_full < d0 + W * kSumBlock) {
      const R qv = Vec::load(q + d_full);  // zero-padded
#pragma GCC unroll 16
      for (int r = 0; r < W; ++r) {
        acc[r] = Vec::fmadd(Vec::load_n(rows[r] + d_full, tail), qv, acc[r]);
      }
    }
    total = Vec::add(Vec::transpose_sum(acc), total);
  }
  return total;
}

// row_scores_group for the W key rows base + r * ld when D is exactly DV vectors
// (DV <= kSumBlock: one block): the same sums in the same order, so the same bits. Fixed
// trip counts keep every address one base register plus a constant (the pointer array
// of the general version spills), and each key row is read whole before the next, in
// memory order, which the hardware prefetcher follows: decoding reads K once from
// memory, and this takes it from 28 to 15 ns per key there (B*H = 16, Lk = 4096).
template <int DV>
inline R row_scores_group_fixed(const float* base, int64_t ld, const float* q) {
  static_assert(DV >= 1 && DV <= kSumBlock, "one block of kSumBlock vectors");
  R qv[DV];
#pragma GCC unroll 16
  for (int d = 0; d < DV; ++d) qv[d] = Vec::load(q + d * W);
  R acc[W];
#pragma GCC unroll 16
  for (int r = 0; r < W; ++r) {
    const float* row = base + r * ld;
    R a = Vec::fmadd(Vec::load(row), qv[0], Vec::zero());
#pragma GCC unroll 16
    for (int d = 1; d < DV; ++d) a = Vec::fmadd(Vec::load(row + d * W), qv[d], a);
    acc[r] = a;
  }
  return Vec::add(Vec::transpose_sum(acc), Vec::zero());
}

// Scores of the whole groups of W keys of tile t (row_scores) with D = DV vectors.
template <int DV>
inline void row_scores_fixed(const Problem& P, const Tile& t, const float* k_head,
                             const float* q, float* sc) {
  const R scale = Vec::set1(P.scale);
  const float* base = k_head + t.j0 * P.k_sl;
  for (int64_t jg = 0; jg + W <= t.nk; jg += W) {
    Vec::store(sc + jg, Vec::mul(row_scores_group_fixed<DV>(base + jg * P.k_sl, P.k_sl, q),
                                 scale));
  }
}

// sc[j] = scale * q . k_j for the t.nk keys of tile t, W keys at a time; q is the query
// row zero-padded to whole vectors.
inline void row_scores(const Problem& P, const Tile& t, const float* k_head, const float* q,
                       float* sc) {
  const R scale = Vec::set1(P.scale);
  const int64_t d_full = P.D / W * W;
  const int tail = static_cast<int>(P.D - d_full);
  int64_t first = 0;  // the first key left to the general loop below
  if (tail == 0 && t.nk >= W) {
    first = t.nk / W * W;
    switch (P.D / W) {
      case 1: row_scores_fixed<1>(P, t, k_head, q, sc); break;
      case 2: row_scores_fixed<2>(P, t, k_head, q, sc); break;
      case 4: row_scores_fixed<4>(P, t, k_head, q, sc); break;
      case 8: row_scores_fixed<8>(P, t, k_head, q, sc); break;
      case 16: row_scores_fixed<16>(P, t, k_head, q, sc); break;
      default: first = 0; break;
    }
  }
  for (int64_t jg = first; jg < t.nk; jg += W) {
    const int n = static_cast<int>(std::min<int64_t>(W, t.nk - jg));
    const float* rows[W];
    // A last group of n < W keys repeats its last key in the unused lanes.
    for (int r = 0; r < W; ++r) rows[r] = k_head + (t.j0 + jg + std::min(r, n - 1)) * P.k_sl;
    Vec::store_n(sc + jg, Vec::mul(row_scores_group(rows, q, d_full, tail), scale), n);
  }
}

// Unmasked scores of a tile of at most kRowPathRows query rows, in the row path's order
// (row_scores): st[j * lanes + l] = scale * q_{i0 + l} . k_{j0 + j}, 0 in lanes >= nq.
// Every score of such a tile is computed this way in both passes (forward_row,
// score_tile), so the backward's P = exp(s - lse) is made of the very scores whose
// log-sum-exp the forward stored: summed in another order (the GEMM's), a score differs
// by an ulp of sum_d |q_d k_d| * scale, which can be 1e-5 at logits of 10, and P then
// has that relative error where the reference's is an ulp (issue 11).
inline void row_order_scores(const Problem& P, int64_t b, int64_t h, const Tile& t,
                             const float* k_head, float* q_row, float* st) {
  const int64_t lanes = lanes_of(t.nq);
  const int64_t dpad = round_up(P.D, W);
  alignas(64) float sc[kMaxKeyTile];
  for (int64_t l = 0; l < lanes; ++l) {
    if (l >= t.nq) {
      for (int64_t j = 0; j < t.nk; ++j) st[j * lanes + l] = 0.0f;
      continue;
    }
    const float* q = P.q + b * P.q_sb + h * P.q_sh + (t.i0 + l) * P.q_sl;
    std::copy(q, q + P.D, q_row);
    std::fill(q_row + P.D, q_row + dpad, 0.0f);
    row_scores(P, t, k_head, q_row, sc);
    for (int64_t j = 0; j < t.nk; ++j) st[j * lanes + l] = sc[j];
  }
}

// Score tile st = mask(scale * K[j0 : j0 + nk] . Q^T) for query lanes of t;
// q_t points at the tile's first lane of a (D, ldq) transposed query block. Tiles of at
// most kRowPathRows rows are scored in the row path's order (row_order_scores, q_row:
// round_up(D, W) floats of scratch), all others by the GEMM.
// With TRACK_MAX, lane_max receives the per-lane max of the tile.
template <bool TRACK_MAX>
void score_tile(const Problem& P, int64_t b, int64_t h, const Tile& t, const float* k_head,
                const float* q_t, int64_t ldq, float* q_row, float* st, float* lane_max) {
  const int64_t lanes = lanes_of(t.nq);
  const float* k_rows = k_head + t.j0 * P.k_sl;
  const bool masked = tile_needs_mask(P, t);
  if (t.nq <= kRowPathRows) {
    row_order_scores(P, b, h, t, k_head, q_row, st);
    if (masked) {
      mask_scores<TRACK_MAX>(P, b, h, t, st, lane_max);
    } else if constexpr (TRACK_MAX) {
      const int groups = static_cast<int>(lanes / W);
      for (int g = 0; g < groups; ++g) {
        R mx = Vec::set1(kNegInf);
        for (int64_t j = 0; j < t.nk; ++j) mx = Vec::max(mx, Vec::load(st + j * lanes + g * W));
        Vec::store(lane_max + g * W, mx);
      }
    }
    return;
  }
  Epilogue epi;
  epi.scale = P.scale;
  if (!masked) {
    if constexpr (TRACK_MAX) std::fill(lane_max, lane_max + lanes, kNegInf);
    epi.lane_max = TRACK_MAX ? lane_max : nullptr;
    gemm<false, false, kScores>(t.nk, lanes, P.D, k_rows, P.k_sl, q_t, ldq, st, lanes, epi);
    return;
  }
  gemm<false, false, kScores>(t.nk, lanes, P.D, k_rows, P.k_sl, q_t, ldq, st, lanes, epi);
  mask_scores<TRACK_MAX>(P, b, h, t, st, lane_max);
}

// Dropout keep-mask of key `key` for the query lanes of group g (rows i0 + g*W + lane):
// the flat element index (i * Lk + j, 64 bits) is the Philox counter.
inline M dropout_keep(const Problem& P, int64_t b, int64_t h, int64_t i0, int g, int64_t key) {
  const uint64_t base = static_cast<uint64_t>(i0 + g * W) * static_cast<uint64_t>(P.Lk) +
                        static_cast<uint64_t>(key);
  const uint32_t c1 = static_cast<uint32_t>(static_cast<uint64_t>(b * P.Hq + h));
  return Vec::dropout_keep(P.seed, base, static_cast<uint64_t>(P.Lk), c1, P.keep_threshold);
}

// Dropout factor (keep ? drop_scale : 0) for key `key` and lanes of group g.
inline R dropout_factor(const Problem& P, int64_t b, int64_t h, int64_t i0, int g, int64_t key) {
  return Vec::blend(dropout_keep(P, b, h, i0, g, key), Vec::set1(P.drop_scale), Vec::zero());
}

// ---------------------------------------------------------------------------
// Tile enumeration.
// ---------------------------------------------------------------------------

// Key tiles among keys [key_lo, key_hi) seen by query rows [i0, i0 + nq) of head (b, h)
// in q block qb.
inline void collect_key_tiles(const Problem& P, int64_t b, int64_t h, int64_t qb, int64_t i0,
                              int64_t nq, int64_t dense_tile, int64_t key_lo, int64_t key_hi,
                              std::vector<Tile>& tiles) {
  tiles.clear();
  const int64_t i_last = i0 + nq - 1;
  // Causal: keys beyond the tile's last query are hidden for all its rows.
  const int64_t key_end =
      std::min(key_hi, P.causal ? std::min(P.Lk, i_last + 1) : P.Lk);
  auto push = [&](int64_t lo, int64_t hi, const uint8_t* partial, int64_t ld) {
    for (int64_t j0 = lo; j0 < hi; j0 += dense_tile) {
      Tile t;
      t.i0 = i0;
      t.nq = nq;
      t.j0 = j0;
      t.nk = std::min(dense_tile, hi - j0);
      t.causal_cut = P.causal && t.j0 + t.nk - 1 > i0;
      if (partial) {
        t.partial = partial + (j0 - lo) * ld;
        t.partial_ld = ld;
      }
      tiles.push_back(t);
    }
  };
  if (!P.blocks.present) {
    push(key_lo, key_end, nullptr, 0);
    return;
  }
  const BlockView& bv = P.blocks;
  const int64_t row = bv.head_base(b, h) * bv.nbq + qb;
  const int64_t count = bv.kv_num[row];
  for (int64_t n = 0; n < count; ++n) {
    const int64_t kb = bv.kv_idx[row * bv.nbk + n];
    const int64_t lo = std::max(kb * bv.bk, key_lo);  // a key split may start in the block
    const int64_t hi = std::min({(kb + 1) * bv.bk, P.Lk, key_end});
    if (lo >= hi) continue;
    const int64_t pidx = bv.partial_index[row * bv.nbk + kb];
    if (bv.full[row * bv.nbk + kb]) {
      push(lo, hi, nullptr, 0);
    } else if (pidx >= 0) {
      const uint8_t* pm = bv.partial_t + pidx * bv.pk * bv.pq + (lo - kb * bv.bk) * bv.pq +
                          (i0 - qb * bv.bq);
      push(lo, hi, pm, bv.pq);
    }
  }
}

// ---------------------------------------------------------------------------
// Forward.
// ---------------------------------------------------------------------------

struct ForwardScratch {
  Buffer q_t, st;
  Buffer o;     // output accumulator, (query rows, Dv), row stride Dv
  Buffer oc;    // rounding errors of o's sum over key tiles (add_rows_compensated)
  Buffer part;  // one key tile's P . V, same layout
  Buffer row_q;  // row path: the query row, zero-padded to whole vectors
  alignas(64) float m[kQueryTile];
  alignas(64) float m_use[kQueryTile];
  alignas(64) float l[kQueryTile];
  alignas(64) float lc[kQueryTile];  // flash: rounding errors of l (add_compensated)
  alignas(64) float alpha[kQueryTile];
  alignas(64) float tile_max[kQueryTile];
  std::vector<Tile> tiles;
  std::vector<int64_t> tile_rows;  // weights mode: row offset of each tile in st
};

// Online-softmax forward of one query tile (flash: key tiles streamed, no Lq x Lk buffer).
void forward_tile_flash(const ForwardParams& F, ForwardScratch& s, int64_t b, int64_t h,
                        int64_t lanes) {
  const Problem& P = F.p;
  const int64_t hk = h / P.group();
  const float* kb = P.k + b * P.k_sb + hk * P.k_sh;
  const float* vb = P.v + b * P.v_sb + hk * P.v_sh;
  const int groups = static_cast<int>(lanes / W);
  for (const Tile& t : s.tiles) {
    float* st = s.st.get();
    score_tile<true>(P, b, h, t, kb, s.q_t.get(), lanes, s.row_q.get(), st, s.tile_max);
    bool rescale = false;
    R m_use[kMaxGroups], l[kMaxGroups], lc[kMaxGroups];
    for (int g = 0; g < groups; ++g) {
      const R m_old = Vec::load(s.m + g * W);
      const R m_new = Vec::max(m_old, Vec::load(s.tile_max + g * W));
      // A row that has seen no visible key keeps max -inf; use 0 so that
      // exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN.
      m_use[g] = Vec::blend(Vec::eq(m_new, Vec::set1(kNegInf)), Vec::zero(), m_new);
      const R alpha = Vec::exp(Vec::sub(m_old, m_use[g]));
      rescale = rescale || !Vec::mask_none(Vec::mask_not(Vec::eq(m_old, m_new)));
      Vec::store(s.alpha + g * W, alpha);
      Vec::store(s.m + g * W, m_new);
      l[g] = Vec::mul(Vec::load(s.l + g * W), alpha);
      lc[g] = Vec::mul(Vec::load(s.lc + g * W), alpha);
    }
    // Row sums in blocks of kSumBlock keys (see kSumBlock).
    for (int64_t jb = 0; jb < t.nk; jb += kSumBlock) {
      R part[kMaxGroups];
      for (int g = 0; g < groups; ++g) part[g] = Vec::zero();
      for (int64_t j = jb; j < std::min(t.nk, jb + kSumBlock); ++j) {
        float* row = st + j * lanes;
        for (int g = 0; g < groups; ++g) {
          R p = Vec::exp(Vec::sub(Vec::load(row + g * W), m_use[g]));
          part[g] = Vec::add(part[g], p);
          if (P.dropout) p = Vec::mul(p, dropout_factor(P, b, h, t.i0, g, t.j0 + j));
          Vec::store(row + g * W, p);
        }
      }
      for (int g = 0; g < groups; ++g) add_compensated(l[g], lc[g], part[g]);
    }
    for (int g = 0; g < groups; ++g) {
      Vec::store(s.l + g * W, l[g]);
      Vec::store(s.lc + g * W, lc[g]);
    }
    // O = alpha * O + P . V: P^T is read as broadcasts down its columns, V rows are
    // the vectors, and only the tile's nq query rows are computed.
    // The tile's P . V is summed apart, then O = alpha * O + part: float32
    // error grows with the tile length, not with Lk.
    gemm<false, true, kNone, kSumBlockLong>(t.nq, P.Dv, t.nk, st, lanes, vb + t.j0 * P.v_sl,
                                            P.v_sl, s.part.get(), P.Dv);
    if (rescale) {
      scale_rows(s.o.get(), P.Dv, t.nq, P.Dv, s.alpha, s.o.get(), P.Dv);
      scale_rows(s.oc.get(), P.Dv, t.nq, P.Dv, s.alpha, s.oc.get(), P.Dv);
    }
    add_rows_compensated(s.part.get(), P.Dv, t.nq, P.Dv, s.o.get(), s.oc.get(), P.Dv);
  }
  for (int g = 0; g < groups; ++g) {
    Vec::store(s.l + g * W, Vec::add(Vec::load(s.l + g * W), Vec::load(s.lc + g * W)));
  }
}

// Forward of one query tile that also returns the weights: all key tiles'
// scores are kept (nq x Lk at most, per thread) so each weight is normalised
// with the row's final max and sum before it is written, exactly once.
void forward_tile_weights(const ForwardParams& F, ForwardScratch& s, int64_t b, int64_t h,
                          int64_t lanes) {
  const Problem& P = F.p;
  const int64_t hk = h / P.group();
  const float* kb = P.k + b * P.k_sb + hk * P.k_sh;
  const float* vb = P.v + b * P.v_sb + hk * P.v_sh;
  const int groups = static_cast<int>(lanes / W);
  s.tile_rows.clear();
  int64_t rows = 0;
  for (const Tile& t : s.tiles) {
    s.tile_rows.push_back(rows);
    float* st = s.st.get() + rows * lanes;
    rows += t.nk;
    score_tile<true>(P, b, h, t, kb, s.q_t.get(), lanes, s.row_q.get(), st, s.tile_max);
    for (int g = 0; g < groups; ++g) {
      Vec::store(s.m + g * W,
                 Vec::max(Vec::load(s.m + g * W), Vec::load(s.tile_max + g * W)));
    }
  }
  R m_use[kMaxGroups], sum[kMaxGroups], sum_c[kMaxGroups];
  for (int g = 0; g < groups; ++g) {
    const R m = Vec::load(s.m + g * W);
    m_use[g] = Vec::blend(Vec::eq(m, Vec::set1(kNegInf)), Vec::zero(), m);
    sum[g] = Vec::zero();
    sum_c[g] = Vec::zero();
  }
  // Sums in blocks of kSumBlock keys, then over blocks, compensated (see kSumBlock).
  float* st_all = s.st.get();
  for (size_t ti = 0; ti < s.tiles.size(); ++ti) {
    float* st = st_all + s.tile_rows[ti] * lanes;
    const int64_t nk = s.tiles[ti].nk;
    for (int64_t jb = 0; jb < nk; jb += kSumBlock) {
      R part[kMaxGroups];
      for (int g = 0; g < groups; ++g) part[g] = Vec::zero();
      for (int64_t j = jb; j < std::min(nk, jb + kSumBlock); ++j) {
        float* row = st + j * lanes;
        for (int g = 0; g < groups; ++g) {
          const R p = Vec::exp(Vec::sub(Vec::load(row + g * W), m_use[g]));
          part[g] = Vec::add(part[g], p);
          Vec::store(row + g * W, p);
        }
      }
      for (int g = 0; g < groups; ++g) add_compensated(sum[g], sum_c[g], part[g]);
    }
  }
  for (int g = 0; g < groups; ++g) sum[g] = Vec::add(sum[g], sum_c[g]);
  // 1 / sum per lane, 0 for rows with no visible key (their p are all 0).
  R inv[kMaxGroups];
  for (int g = 0; g < groups; ++g) {
    Vec::store(s.l + g * W, sum[g]);
    alignas(64) float tmp[W];
    Vec::store(tmp, sum[g]);
    for (int l = 0; l < W; ++l) tmp[l] = tmp[l] > 0.0f ? 1.0f / tmp[l] : 0.0f;
    inv[g] = Vec::load(tmp);
  }
  const int64_t ld = P.Lk;
  float* wbase = F.weights + ((b * P.Hq + h) * P.Lq) * P.Lk;
  for (size_t ti = 0; ti < s.tiles.size(); ++ti) {
    const Tile& t = s.tiles[ti];
    float* st = st_all + s.tile_rows[ti] * lanes;
    // weights = p * Z / sum, written transposed (lane i of key row j is
    // weights[i][j]) one W x W block at a time; p * Z stays in st for P.V,
    // whose result is divided by the sum at the end as in flash mode.
    for (int64_t jb = 0; jb < t.nk; jb += W) {
      const int jn = static_cast<int>(std::min<int64_t>(W, t.nk - jb));
      for (int g = 0; g < groups; ++g) {
        R rows[W];
        for (int r = 0; r < W; ++r) {
          if (r >= jn) {
            rows[r] = Vec::zero();
            continue;
          }
          float* src = st + (jb + r) * lanes + g * W;
          R p = Vec::load(src);
          if (P.dropout) {
            p = Vec::mul(p, dropout_factor(P, b, h, t.i0, g, t.j0 + jb + r));
            Vec::store(src, p);
          }
          rows[r] = Vec::mul(p, inv[g]);
        }
        const int64_t valid = std::min<int64_t>(W, t.nq - g * W);
        float* dst = wbase + (t.i0 + g * W) * ld + t.j0 + jb;
        if (jn == W && valid == W) {
          Vec::transpose_store(rows, dst, ld);
        } else {
          alignas(64) float block[W * W];
          for (int r = 0; r < jn; ++r) Vec::store(block + r * W, rows[r]);
          for (int64_t l = 0; l < valid; ++l) {
            for (int r = 0; r < jn; ++r) dst[l * ld + r] = block[r * W + l];
          }
        }
      }
    }
    gemm<false, true, kNone, kSumBlockLong>(t.nq, P.Dv, t.nk, st, lanes, vb + t.j0 * P.v_sl,
                                            P.v_sl, s.part.get(), P.Dv);
    add_rows_compensated(s.part.get(), P.Dv, t.nq, P.Dv, s.o.get(), s.oc.get(), P.Dv);
  }
}

// ---------------------------------------------------------------------------
// Row path: one query row, keys on the vector lanes. A query tile of one or a few
// rows (decoding: Lq = 1) would leave most lanes of the transposed tiles idle, and its
// exponentials would run W times over; here every lane holds a key.
// ---------------------------------------------------------------------------

// Output vectors per P . V strip (accumulators and running totals in registers).
constexpr int kRowNV = W >= 16 ? 8 : 4;

inline float lanes_max(R x, int n) {
  alignas(64) float v[W];
  Vec::store(v, x);
  float m = v[0];
  for (int l = 1; l < n; ++l) m = std::max(m, v[l]);
  return m;
}

inline float lanes_sum(R x) {
  alignas(64) float v[W];
  Vec::store(v, x);
  float sum = v[0];
  for (int l = 1; l < W; ++l) sum += v[l];
  return sum;
}

// The element masks of row i on the scores of tile t (scalar: the row path is for few rows).
inline void row_mask(const Problem& P, int64_t b, int64_t h, int64_t i, const Tile& t,
                     float* sc) {
  const bool has_mask = P.mask.kind != MaskKind::None;
  const int64_t mask_base = b * P.mask.sb + h * P.mask.sh + i * P.mask.si;
  for (int64_t j = 0; j < t.nk; ++j) {
    const int64_t key = t.j0 + j;
    bool hidden = (P.kpm != nullptr && P.kpm[b * P.kpm_sb + key * P.kpm_sj] != 0) ||
                  (t.causal_cut && key > i) ||
                  (t.partial != nullptr && t.partial[j * t.partial_ld] == 0);
    if (!hidden && has_mask) {
      const float add = P.mask.additive(mask_base + key * P.mask.sj);
      hidden = add == kNegInf;
      sc[j] += add;
    }
    if (hidden) sc[j] = kNegInf;
  }
}

// part[c] = sum_j p[j] * V[j][c] for c < Dv over the nk keys of V rows `v` (stride v_sl):
// kRowNV vectors of outputs at a time, summed in blocks of kSumBlockLong keys.
template <int NV>
inline void row_pv_strip(const float* p, int64_t nk, const float* v, int64_t v_sl, int tail,
                         float* part) {
  const typename Vec::Tail last = Vec::tail(tail);
  R total[NV], acc[NV];
  for (int c = 0; c < NV; ++c) total[c] = Vec::zero();
  for (int64_t j0 = 0; j0 < nk; j0 += kSumBlockLong) {
    for (int c = 0; c < NV; ++c) acc[c] = Vec::zero();
    for (int64_t j = j0; j < std::min<int64_t>(nk, j0 + kSumBlockLong); ++j) {
      const R pj = Vec::set1(p[j]);
      const float* vr = v + j * v_sl;
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c) {
        const R x = c == NV - 1 ? Vec::load_t(vr + c * W, last) : Vec::load(vr + c * W);
        acc[c] = Vec::fmadd(pj, x, acc[c]);
      }
    }
    for (int c = 0; c < NV; ++c) total[c] = Vec::add(acc[c], total[c]);
  }
  for (int c = 0; c < NV; ++c) {
    if (c == NV - 1) {
      Vec::store_t(part + c * W, total[c], last);
    } else {
      Vec::store(part + c * W, total[c]);
    }
  }
}

inline void row_pv(const float* p, int64_t nk, const float* v, int64_t v_sl, int64_t dv,
                   float* part) {
  constexpr int64_t strip = kRowNV * W;
  for (int64_t c0 = 0; c0 < dv; c0 += strip) {
    const int64_t width = std::min(dv - c0, strip);
    const int nv = static_cast<int>((width + W - 1) / W);
    const int tail = static_cast<int>(width - (nv - 1) * W);
    switch (nv) {
#define MMATTN_ROW_PV(n) \
  case n: row_pv_strip<n>(p, nk, v + c0, v_sl, tail, part + c0); break;
      MMATTN_ROW_PV(1) MMATTN_ROW_PV(2) MMATTN_ROW_PV(3) MMATTN_ROW_PV(4)
#undef MMATTN_ROW_PV
      default:
        if constexpr (kRowNV > 4) {
          if (nv == 5) row_pv_strip<5>(p, nk, v + c0, v_sl, tail, part + c0);
          if (nv == 6) row_pv_strip<6>(p, nk, v + c0, v_sl, tail, part + c0);
          if (nv == 7) row_pv_strip<7>(p, nk, v + c0, v_sl, tail, part + c0);
          if (nv == 8) row_pv_strip<8>(p, nk, v + c0, v_sl, tail, part + c0);
        }
        break;
    }
  }
}

// Online softmax of query row i of head (b, h) over s.tiles (collect_key_tiles with
// nq = 1): leaves the row's max score in *m (-inf: no visible key), its sum
// sum_j exp(s_j - m) in *l and sum_j exp(s_j - m) Z_j V_j in o (Dv floats; oc: Dv floats
// of scratch for the rounding errors of o's sum over tiles).
void forward_row(const Problem& P, ForwardScratch& s, int64_t b, int64_t h, int64_t i,
                 float* m_out, float* l_out, float* o, float* oc) {
  const int64_t hk = h / P.group();
  const float* kb = P.k + b * P.k_sb + hk * P.k_sh;
  const float* vb = P.v + b * P.v_sb + hk * P.v_sh;
  const int64_t dpad = round_up(P.D, W);
  float* q = s.row_q.get();
  std::copy(P.q + b * P.q_sb + h * P.q_sh + i * P.q_sl,
            P.q + b * P.q_sb + h * P.q_sh + i * P.q_sl + P.D, q);
  std::fill(q + P.D, q + dpad, 0.0f);
  const uint32_t c1 = static_cast<uint32_t>(static_cast<uint64_t>(b * P.Hq + h));
  float m = kNegInf, l = 0.0f, lc = 0.0f;
  std::fill(o, o + P.Dv, 0.0f);
  std::fill(oc, oc + P.Dv, 0.0f);
  float* sc = s.st.get();
  float* part = s.part.get();
  for (const Tile& t : s.tiles) {
    row_scores(P, t, kb, q, sc);
    if (tile_needs_mask(P, t)) row_mask(P, b, h, i, t, sc);
    R mx = Vec::set1(kNegInf);
    for (int64_t j = 0; j < t.nk; j += W) {
      const int n = static_cast<int>(std::min<int64_t>(W, t.nk - j));
      mx = Vec::max(mx, Vec::blend(Vec::prefix(n), Vec::load_n(sc + j, n), Vec::set1(kNegInf)));
    }
    const float m_new = std::max(m, lanes_max(mx, W));
    // As in the tile path: a row with no visible key yet keeps -inf and uses 0.
    const float m_use = m_new == kNegInf ? 0.0f : m_new;
    const float alpha = m == m_new ? 1.0f : std::exp(m - m_use);
    const R mu = Vec::set1(m_use);
    R sum = Vec::zero();
    for (int64_t j = 0; j < t.nk; j += W) {
      const int n = static_cast<int>(std::min<int64_t>(W, t.nk - j));
      R p = Vec::blend(Vec::prefix(n), Vec::exp(Vec::sub(Vec::load_n(sc + j, n), mu)),
                       Vec::zero());
      sum = Vec::add(sum, p);
      if (P.dropout) {
        const uint64_t base = static_cast<uint64_t>(i) * static_cast<uint64_t>(P.Lk) +
                              static_cast<uint64_t>(t.j0 + j);
        const M keep = Vec::dropout_keep(P.seed, base, 1, c1, P.keep_threshold);
        p = Vec::blend(keep, Vec::mul(p, Vec::set1(P.drop_scale)), Vec::zero());
      }
      Vec::store_n(sc + j, p, n);
    }
    l *= alpha;
    lc *= alpha;
    add_compensated(l, lc, lanes_sum(sum));
    row_pv(sc, t.nk, vb + t.j0 * P.v_sl, P.v_sl, P.Dv, part);
    if (alpha != 1.0f) {
      scale_rows(o, P.Dv, 1, P.Dv, &alpha, o, P.Dv);
      scale_rows(oc, P.Dv, 1, P.Dv, &alpha, oc, P.Dv);
    }
    add_rows_compensated(part, P.Dv, 1, P.Dv, o, oc, P.Dv);
    m = m_new;
  }
  add_rows(oc, P.Dv, 1, P.Dv, o, P.Dv);
  *m_out = m;
  *l_out = l + lc;
}

// The result of rows [i0, i0 + nq) of head bh over key range `split`: m, l (one per
// row) and O (rows of Dv, stride Dv). One range: out = O / l and lse = m + log(l)
// (+inf and 0 for rows with no visible key); several: the partial state (ForwardParams).
inline void finish_rows(const ForwardParams& F, int64_t bh, int64_t i0, int64_t nq,
                        int64_t split, const float* m, const float* l, const float* o) {
  const Problem& P = F.p;
  const int64_t row0 = bh * P.Lq + i0;
  if (F.splits > 1) {
    const int64_t rows = P.B * P.Hq * P.Lq;
    std::copy(m, m + nq, F.part_m + split * rows + row0);
    std::copy(l, l + nq, F.part_l + split * rows + row0);
    std::copy(o, o + nq * P.Dv, F.part_o + (split * rows + row0) * P.Dv);
    return;
  }
  alignas(64) float inv[kQueryTile];
  for (int64_t i = 0; i < nq; ++i) {
    inv[i] = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
    F.lse[row0 + i] = l[i] > 0.0f ? m[i] + std::log(l[i]) : kPosInf;
  }
  scale_rows(o, P.Dv, nq, P.Dv, inv, F.out + row0 * P.Dv, P.Dv);
}

void forward_worker(const ForwardParams& F, std::atomic<int64_t>* next) {
  const Problem& P = F.p;
  ForwardScratch s;
  const int64_t key_tile = P.blocks.present ? std::min(P.blocks.bk, kMaxKeyTile) : kKeyTileFwd;
  s.q_t = make_buffer(P.D * kQueryTile);
  s.o = make_buffer(std::max<int64_t>(P.Dv, 1) * kQueryTile);
  s.oc = make_buffer(std::max<int64_t>(P.Dv, 1) * kQueryTile);
  s.part = make_buffer(std::max<int64_t>(P.Dv, 1) * kQueryTile);
  s.row_q = make_buffer(round_up(P.D, W));
  const int64_t st_rows = F.weights ? P.Lk + key_tile : key_tile;
  s.st = make_buffer(st_rows * kQueryTile);

  const int64_t nqb = P.num_q_blocks(), tpb = P.tiles_per_q_block(), qrows = P.q_block_rows();
  const int64_t total = F.num_items();
  for (int64_t item = next->fetch_add(1); item < total; item = next->fetch_add(1)) {
    const int64_t split = item % F.splits;
    const int64_t tile = item / F.splits;
    const int64_t t_in_block = tile % tpb;
    int64_t qb = (tile / tpb) % nqb;
    const int64_t bh = tile / (tpb * nqb);
    // Causal rows get heavier with i: hand out the heavy tiles first.
    if (P.causal) qb = nqb - 1 - qb;
    const int64_t b = bh / P.Hq, h = bh % P.Hq;
    const int64_t i0 = qb * qrows + t_in_block * kQueryTile;
    const int64_t i_end = std::min({qb * qrows + std::min((t_in_block + 1) * kQueryTile, qrows), P.Lq});
    const int64_t nq = i_end - i0;
    if (nq <= 0) continue;
    const int64_t key_lo = split * F.split_keys;
    const int64_t key_hi = std::min(P.Lk, key_lo + F.split_keys);

    if (nq <= kRowPathRows && F.weights == nullptr) {
      for (int64_t r = 0; r < nq; ++r) {
        collect_key_tiles(P, b, h, qb, i0 + r, 1, key_tile, key_lo, key_hi, s.tiles);
        forward_row(P, s, b, h, i0 + r, s.m + r, s.l + r, s.o.get() + r * P.Dv,
                    s.oc.get() + r * P.Dv);
      }
      finish_rows(F, bh, i0, nq, split, s.m, s.l, s.o.get());
      continue;
    }
    const int64_t lanes = lanes_of(nq);
    // Q^T tile, zero lanes beyond nq.
    float* qt = s.q_t.get();
    if (nq < lanes) {
      for (int64_t d = 0; d < P.D; ++d) std::fill(qt + d * lanes + nq, qt + (d + 1) * lanes, 0.f);
    }
    transpose_rows(P.q + b * P.q_sb + h * P.q_sh + i0 * P.q_sl, P.q_sl, nq, P.D, qt, lanes);
    std::fill(s.m, s.m + lanes, kNegInf);
    std::fill(s.l, s.l + lanes, 0.0f);
    std::fill(s.lc, s.lc + lanes, 0.0f);
    std::fill(s.o.get(), s.o.get() + P.Dv * nq, 0.0f);
    std::fill(s.oc.get(), s.oc.get() + P.Dv * nq, 0.0f);

    collect_key_tiles(P, b, h, qb, i0, nq, key_tile, key_lo, key_hi, s.tiles);
    if (F.weights) {
      forward_tile_weights(F, s, b, h, lanes);
    } else {
      forward_tile_flash(F, s, b, h, lanes);
    }
    add_rows(s.oc.get(), P.Dv, nq, P.Dv, s.o.get(), P.Dv);
    finish_rows(F, bh, i0, nq, split, s.m, s.l, s.o.get());
  }
}

// Split-KV: rows [begin, end) of B * Hq * Lq from their key ranges' partial states, in
// range order: M = max_r m_r, l = sum_r exp(m_r - M) l_r, O = sum_r exp(m_r - M) O_r,
// out = O / l, lse = M + log(l).
void forward_merge(const ForwardParams& F, int64_t begin, int64_t end) {
  const Problem& P = F.p;
  const int64_t rows = P.B * P.Hq * P.Lq;
  const int64_t dv = P.Dv, full = dv / W * W;
  const int tail = static_cast<int>(dv - full);
  for (int64_t row = begin; row < end; ++row) {
    float mx = kNegInf;
    for (int64_t r = 0; r < F.splits; ++r) mx = std::max(mx, F.part_m[r * rows + row]);
    float* out = F.out + row * dv;
    if (mx == kNegInf) {
      std::fill(out, out + dv, 0.0f);
      F.lse[row] = kPosInf;
      continue;
    }
    float l = 0.0f;
    std::fill(out, out + dv, 0.0f);
    for (int64_t r = 0; r < F.splits; ++r) {
      const float m_r = F.part_m[r * rows + row];
      if (m_r == kNegInf) continue;  // no visible key in the range: nothing to add
      const float w = std::exp(m_r - mx);
      l += w * F.part_l[r * rows + row];
      const float* o = F.part_o + (r * rows + row) * dv;
      const R wv = Vec::set1(w);
      for (int64_t c = 0; c < full; c += W) {
        Vec::store(out + c, Vec::fmadd(wv, Vec::load(o + c), Vec::load(out + c)));
      }
      if (tail > 0) {
        Vec::store_n(out + full, Vec::fmadd(wv, Vec::load_n(o + full, tail),
                                            Vec::load_n(out + full, tail)), tail);
      }
    }
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    F.lse[row] = l > 0.0f ? mx + std::log(l) : kPosInf;
    const R iv = Vec::set1(inv);
    for (int64_t c = 0; c < full; c += W) Vec::store(out + c, Vec::mul(Vec::load(out + c), iv));
    if (tail > 0) Vec::store_n(out + full, Vec::mul(Vec::load_n(out + full, tail), iv), tail);
  }
}

// ---------------------------------------------------------------------------
// Backward.
// ---------------------------------------------------------------------------

void backward_prepare(const BackwardParams& G, int64_t begin, int64_t end) {
  const Problem& P = G.p;
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / P.Hq, h = bh % P.Hq;
    const float* q = P.q + b * P.q_sb + h * P.q_sh;
    const float* dout = G.dout + b * G.do_sb + h * G.do_sh;
    const float* out = G.out + b * G.o_sb + h * G.o_sh;
    float* qt = G.q_t + bh * P.D * G.lq_pad;
    float* dot = G.do_t + bh * P.Dv * G.lq_pad;
    for (int64_t d = 0; d < P.D; ++d) std::fill(qt + d * G.lq_pad + P.Lq, qt + (d + 1) * G.lq_pad, 0.f);
    for (int64_t d = 0; d < P.Dv; ++d) {
      std::fill(dot + d * G.lq_pad + P.Lq, dot + (d + 1) * G.lq_pad, 0.f);
    }
    transpose_rows(q, P.q_sl, P.Lq, P.D, qt, G.lq_pad);
    transpose_rows(dout, G.do_sl, P.Lq, P.Dv, dot, G.lq_pad);
    for (int64_t i = 0; i < P.Lq; ++i) {
      const float* gi = dout + i * G.do_sl;
      const float* oi = out + i * G.o_sl;
      // The same fused multiply-add order as the dP GEMM: when O equals a row of V (or,
      // with dropout, of drop_scale * V: a single visible key) dP - delta is then
      // exactly 0, as in exact arithmetic.
      float delta = blocked_dot(gi, oi, P.Dv);
      if (G.grad_lse != nullptr) delta -= G.grad_lse[bh * P.Lq + i];
      G.delta[bh * P.Lq + i] = delta;
    }
  }
}

// For the query tiles it takes that hold a row with |lse| >= kLseExact + log(Lk) (a peaked
// softmax of large logits), two per-row quantities from one extra pass over the row's
// key tiles, computed exactly as backward_tile computes P and dP (other tiles: lam 0,
// delta as backward_prepare left it):
//   lam_i   = log c_i with c_i = sum_j exp(s_ij - lse_i): the correction for lse's
//             float32 rounding (see BackwardParams::lam);
//   delta_i = sum_j P_ij Z_ij dP_ij - grad_lse_i with P = exp(s - lse) / c, from the
//             same dP values that dS = P (dP Z - delta) then uses. In a peaked row dS
//             is a small difference of large terms; with delta from rowsum(dO * O) the
//             rounding errors of dP and of that sum do not cancel, and dq had twice
//             the reference's error at logits of 20 and more.
// Key tiles whose scores all lie 40 or more below lse add less than exp(-40) each and
// are skipped.
void backward_stats(const BackwardParams& G, std::atomic<int64_t>* next) {
  const Problem& P = G.p;
  const int64_t key_tile = P.blocks.present ? std::min(P.blocks.bk, kMaxKeyTile) : kKeyTileFwd;
  Buffer st, dp, vz, q_row;
  alignas(64) float lse[kQueryTile];
  alignas(64) float tile_max[kQueryTile];
  std::vector<Tile> tiles;
  const int64_t nqb = P.num_q_blocks(), tpb = P.tiles_per_q_block(), qrows = P.q_block_rows();
  const int64_t total = G.num_stat_items();
  const float limit = kLseExact + std::log(static_cast<float>(std::max<int64_t>(P.Lk, 1)));
  for (int64_t item = next->fetch_add(1); item < total; item = next->fetch_add(1)) {
    const int64_t t_in_block = item % tpb;
    const int64_t qb = (item / tpb) % nqb;
    const int64_t bh = item / (tpb * nqb);
    const int64_t b = bh / P.Hq, h = bh % P.Hq;
    const int64_t i0 = qb * qrows + t_in_block * kQueryTile;
    const int64_t i_end =
        std::min({qb * qrows + std::min((t_in_block + 1) * kQueryTile, qrows), P.Lq});
    const int64_t nq = i_end - i0;
    if (nq <= 0) continue;
    float* lam = G.lam + bh * P.Lq + i0;
    const float* row_lse = G.lse + bh * P.Lq + i0;
    std::fill(lam, lam + nq, 0.0f);
    bool needed = false;
    for (int64_t i = 0; i < nq; ++i) {
      needed = needed || (std::isfinite(row_lse[i]) && std::fabs(row_lse[i]) >= limit);
    }
    if (!needed) continue;
    const int64_t lanes = lanes_of(nq);
    const int groups = static_cast<int>(lanes / W);
    for (int64_t i = 0; i < lanes; ++i) lse[i] = i < nq ? row_lse[i] : kPosInf;
    if (!st) {
      st = make_buffer(key_tile * kQueryTile);
      dp = make_buffer(key_tile * kQueryTile);
      vz = make_buffer(key_tile * std::max<int64_t>(P.Dv, 1));
      q_row = make_buffer(round_up(P.D, W));
    }
    const int64_t hk = h / P.group();
    const float* kb = P.k + b * P.k_sb + hk * P.k_sh;
    const float* vb = P.v + b * P.v_sb + hk * P.v_sh;
    const float* q_t = G.q_t + bh * P.D * G.lq_pad + i0;
    const float* do_t = G.do_t + bh * P.Dv * G.lq_pad + i0;
    collect_key_tiles(P, b, h, qb, i0, nq, key_tile, 0, P.Lk, tiles);
    // c and sum_j e_ij dP_ij in float64: delta = t / c rounds once. In a peaked row dP at
    // the dominant key and delta agree to a few digits and dS is their difference, so a
    // float32 t (products and sums each rounded at |dP|'s ulp) gave dq 3-5x the
    // reference's error at logits near 100; errors in e itself cancel in t / c.
    alignas(64) double c[kQueryTile], t_sum[kQueryTile];
    alignas(64) float e_row[kQueryTile], d_row[kQueryTile];
    std::fill(c, c + lanes, 0.0);
    std::fill(t_sum, t_sum + lanes, 0.0);
    for (const Tile& t : tiles) {
      score_tile<true>(P, b, h, t, kb, q_t, G.lq_pad, q_row.get(), st.get(), tile_max);
      bool significant = false;
      for (int64_t i = 0; i < nq; ++i) significant = significant || tile_max[i] - lse[i] > -40.0f;
      if (!significant) continue;
      // dP^T = V . dO^T (with dropout drop_scale * V, then the keep-mask), as in
      // backward_tile / backward_worker.
      const float* v_rows = vb + t.j0 * P.v_sl;
      int64_t v_ld = P.v_sl;
      if (P.dropout) {
        const float scale[1] = {P.drop_scale};
        for (int64_t j = 0; j < t.nk; ++j) {
          scale_rows(v_rows + j * P.v_sl, P.v_sl, 1, P.Dv, scale, vz.get() + j * P.Dv, P.Dv);
        }
        v_rows = vz.get();
        v_ld = P.Dv;
      }
      gemm<false, false>(t.nk, lanes, P.Dv, v_rows, v_ld, do_t, G.lq_pad, dp.get(), lanes);
      for (int64_t j = 0; j < t.nk; ++j) {
        const float* row = st.get() + j * lanes;
        const float* dprow = dp.get() + j * lanes;
        for (int g = 0; g < groups; ++g) {
          const R e = Vec::exp(Vec::sub(Vec::load(row + g * W), Vec::load(lse + g * W)));
          R d = Vec::load(dprow + g * W);
          if (P.dropout) d = Vec::blend(dropout_keep(P, b, h, t.i0, g, t.j0 + j), d, Vec::zero());
          Vec::store(e_row + g * W, e);
          Vec::store(d_row + g * W, d);
        }
        for (int64_t i = 0; i < lanes; ++i) {
          c[i] += e_row[i];
          t_sum[i] += static_cast<double>(e_row[i]) * d_row[i];
        }
      }
    }
    for (int64_t i = 0; i < nq; ++i) {
      if (!std::isfinite(row_lse[i]) || !(c[i] > 0.0)) continue;
      lam[i] = static_cast<float>(std::log(c[i]));
      double delta = t_sum[i] / c[i];
      if (G.grad_lse != nullptr) delta -= G.grad_lse[bh * P.Lq + i0 + i];
      G.delta[bh * P.Lq + i0 + i] = static_cast<float>(delta);
    }
  }
}

struct BackwardScratch {
  Buffer st, pd, dp, z, vz;
  Buffer row_q;  // score_tile's scratch for tiles of few rows
  // Rounding errors of the key tile's dK and dV sums over query tiles
  // (add_rows_compensated), (key_tile, D) and (key_tile, Dv).
  Buffer dk_err, dv_err;
  Buffer part;  // one (key tile x query tile) contribution to dK, dV or dQ
  alignas(64) float lse[kQueryTile];
  alignas(64) float lam[kQueryTile];
  alignas(64) float delta[kQueryTile];
  std::vector<Tile> tiles;
};

// Query tiles of head (b, h) that see key rows [j0, j0 + nk) (key block kb).
inline void collect_query_tiles(const Problem& P, int64_t b, int64_t h, int64_t kb, int64_t j0,
                                int64_t nk, std::vector<Tile>& tiles) {
  tiles.clear();
  // Query rows [row0, hi) in tiles of kQueryTile from row0; `partial` (if any) is
  // the block's mask at its row for key j0, lanes counted from row0.
  auto push = [&](int64_t row0, int64_t hi, const uint8_t* partial, int64_t ld) {
    int64_t first = row0;
    // Causal: queries before j0 see none of these keys; skip their whole tiles.
    if (P.causal && j0 > row0) first = row0 + (j0 - row0) / kQueryTile * kQueryTile;
    for (int64_t i0 = first; i0 < hi; i0 += kQueryTile) {
      Tile t;
      t.i0 = i0;
      t.nq = std::min(kQueryTile, hi - i0);
      t.j0 = j0;
      t.nk = nk;
      if (P.causal && j0 > i0 + t.nq - 1) continue;
      t.causal_cut = P.causal && j0 + nk - 1 > i0;
      if (partial) {
        t.partial = partial + (i0 - row0);
        t.partial_ld = ld;
      }
      tiles.push_back(t);
    }
  };
  if (!P.blocks.present) {
    push(0, P.Lq, nullptr, 0);
    return;
  }
  const BlockView& bv = P.blocks;
  const int64_t base = bv.head_base(b, h);
  const int64_t col = base * bv.nbk + kb;
  const int64_t count = bv.q_num[col];
  for (int64_t n = 0; n < count; ++n) {
    const int64_t qb = bv.q_idx[col * bv.nbq + n];
    const int64_t lo = qb * bv.bq;
    const int64_t hi = std::min((qb + 1) * bv.bq, P.Lq);
    const int64_t cell = (base * bv.nbq + qb) * bv.nbk + kb;
    const int64_t pidx = bv.partial_index[cell];
    if (bv.full[cell]) {
      push(lo, hi, nullptr, 0);
    } else if (pidx >= 0) {
      const uint8_t* pm = bv.partial_t + pidx * bv.pk * bv.pq + (j0 - kb * bv.bk) * bv.pq;
      push(lo, hi, pm, bv.pq);
    }
  }
}

// One (query tile) x (key tile) step of the backward. `v_rows` (row stride v_ld) are the
// tile's key rows of V, or with dropout of drop_scale * V (see backward_worker).
void backward_tile(const BackwardParams& G, BackwardScratch& s, int64_t b, int64_t h,
                   const Tile& t, const float* v_rows, int64_t v_ld, float* dq, float* dq_err,
                   float* dk, float* dv) {
  const Problem& P = G.p;
  const int64_t hk = h / P.group();
  const int64_t bh = b * P.Hq + h;
  const float* kb = P.k + b * P.k_sb + hk * P.k_sh;
  const int64_t lanes = lanes_of(t.nq);
  const int groups = static_cast<int>(lanes / W);

  for (int64_t i = 0; i < lanes; ++i) {
    const bool valid = i < t.nq;
    s.lse[i] = valid ? G.lse[bh * P.Lq + t.i0 + i] : kPosInf;
    s.lam[i] = valid ? G.lam[bh * P.Lq + t.i0 + i] : 0.0f;
    s.delta[i] = valid ? G.delta[bh * P.Lq + t.i0 + i] : 0.0f;
  }
  // P = exp((scale * S - lse) - lam): 0 for rows with no visible key (lse = +inf).
  float* st = s.st.get();
  const float* q_t = G.q_t + bh * P.D * G.lq_pad + t.i0;
  if (!tile_needs_mask(P, t) && t.nq > kRowPathRows) {
    Epilogue probs;
    probs.scale = P.scale;
    probs.lane = s.lse;
    probs.lane2 = s.lam;
    gemm<false, false, kProbs>(t.nk, lanes, P.D, kb + t.j0 * P.k_sl, P.k_sl, q_t, G.lq_pad, st,
                               lanes, probs);
  } else {
    score_tile<false>(P, b, h, t, kb, q_t, G.lq_pad, s.row_q.get(), st, nullptr);
    for (int64_t j = 0; j < t.nk; ++j) {
      float* row = st + j * lanes;
      for (int g = 0; g < groups; ++g) {
        const R x = Vec::sub(Vec::load(row + g * W), Vec::load(s.lse + g * W));
        Vec::store(row + g * W, Vec::exp(Vec::sub(x, Vec::load(s.lam + g * W))));
      }
    }
  }
  // Dropout: the keep-mask regenerated from the seed; Pd = P * Z (Z = keep * drop_scale)
  // is what multiplied V. The z buffer holds keep as 1 / 0: the scale is already in
  // v_rows, so dP * Z = keep * (dO . (drop_scale * V)), rounded as the forward rounded O.
  float* pd = P.dropout ? s.pd.get() : st;
  float* z = P.dropout ? s.z.get() : nullptr;
  if (P.dropout) {
    const R one = Vec::set1(1.0f), drop_scale = Vec::set1(P.drop_scale);
    for (int64_t j = 0; j < t.nk; ++j) {
      for (int g = 0; g < groups; ++g) {
        const int64_t o = j * lanes + g * W;
        const M keep = dropout_keep(P, b, h, t.i0, g, t.j0 + j);
        Vec::store(z + o, Vec::blend(keep, one, Vec::zero()));
        Vec::store(pd + o, Vec::blend(keep, Vec::mul(Vec::load(st + o), drop_scale),
                                      Vec::zero()));
      }
    }
  }
  const float* dout = G.dout + b * G.do_sb + h * G.do_sh + t.i0 * G.do_sl;
  // dV[j] += sum_i Pd[j][i] dO[i]. Each tile's contribution is summed apart and
  // then added, so float32 sums grow with the tile, not with Lq (likewise dK, dQ).
  float* part = s.part.get();
  gemm<false, false, kNone, kSumBlockLong>(t.nk, P.Dv, t.nq, pd, lanes, dout, G.do_sl, part, P.Dv);
  add_rows_compensated(part, P.Dv, t.nk, P.Dv, dv + t.j0 * P.Dv, s.dv_err.get(), P.Dv);
  // dS = scale * P * (dP * Z - delta) with dP^T = V . dO^T, in the GEMM's epilogue
  // (scale applied once here for both dQ and dK). Its sum over D runs in the order of
  // backward_prepare's delta, so one visible key gives dS = 0 exactly.
  float* dp = s.dp.get();
  Epilogue dscores;
  dscores.scale = P.scale;
  dscores.lane = s.delta;
  dscores.p = st;
  dscores.z = z;
  gemm<false, false, kDScores>(t.nk, lanes, P.Dv, v_rows, v_ld,
                               G.do_t + bh * P.Dv * G.lq_pad + t.i0, G.lq_pad, dp, lanes,
                               dscores);
  // dK[j] += sum_i dS[j][i] Q[i];  dQ[i] += sum_j dS[j][i] K[j]
  gemm<false, false, kNone, kSumBlockLong>(t.nk, P.D, t.nq, dp, lanes,
                                           P.q + b * P.q_sb + h * P.q_sh + t.i0 * P.q_sl,
                                           P.q_sl, part, P.D);
  add_rows_compensated(part, P.D, t.nk, P.D, dk + t.j0 * P.D, s.dk_err.get(), P.D);
  gemm<false, true, kNone, kSumBlockLong>(t.nq, P.D, t.nk, dp, lanes, kb + t.j0 * P.k_sl,
                                          P.k_sl, part, P.D);
  const int64_t dq_row = (bh * P.Lq + t.i0) * P.D;
  add_rows_compensated(part, P.D, t.nq, P.D, dq + dq_row, dq_err + dq_row, P.D);
}

void backward_worker(const BackwardParams& G, std::atomic<int64_t>* next) {
  const Problem& P = G.p;
  BackwardScratch s;
  const int64_t key_tile = P.blocks.present ? std::min(P.blocks.bk, kMaxKeyTile) : kKeyTileBwd;
  s.st = make_buffer(key_tile * kQueryTile);
  s.dp = make_buffer(key_tile * kQueryTile);
  s.row_q = make_buffer(round_up(P.D, W));
  s.dk_err = make_buffer(key_tile * std::max<int64_t>(P.D, 1));
  s.dv_err = make_buffer(key_tile * std::max<int64_t>(P.Dv, 1));
  s.part = make_buffer(std::max(key_tile, kQueryTile) * std::max<int64_t>({P.D, P.Dv, 1}));
  if (P.dropout) {
    s.pd = make_buffer(key_tile * kQueryTile);
    s.z = make_buffer(key_tile * kQueryTile);
    s.vz = make_buffer(key_tile * std::max<int64_t>(P.Dv, 1));
  }
  const int64_t units = G.key_units(), per_chunk = G.units_per_chunk();
  const int64_t total = G.num_items();
  const int64_t unit_rows = P.blocks.present ? P.blocks.bk : kKeyTileBwd;
  for (int64_t item = next->fetch_add(1); item < total; item = next->fetch_add(1)) {
    const int64_t chunk = item % G.num_chunks;
    const int64_t bhk = item / G.num_chunks;
    const int64_t b = bhk / P.Hkv, hk = bhk % P.Hkv;
    float* dq = G.dq + chunk * P.B * P.Hq * P.Lq * P.D;
    float* dq_err = G.dq_err + chunk * P.B * P.Hq * P.Lq * P.D;
    float* dk = G.dk + bhk * P.Lk * P.D;
    float* dv = G.dv + bhk * P.Lk * P.Dv;
    const int64_t u_end = std::min(units, (chunk + 1) * per_chunk);
    for (int64_t u = chunk * per_chunk; u < u_end; ++u) {
      const int64_t lo = u * unit_rows, hi = std::min((u + 1) * unit_rows, P.Lk);
      for (int64_t j0 = lo; j0 < hi; j0 += key_tile) {
        const int64_t nk = std::min(key_tile, hi - j0);
        // V rows of the tile; with dropout drop_scale * V, rounded as the forward's
        // P * Z . V rounds them when one key is visible (then dS is exactly 0).
        const float* v_rows = P.v + b * P.v_sb + hk * P.v_sh + j0 * P.v_sl;
        int64_t v_ld = P.v_sl;
        if (P.dropout) {
          const float scale[1] = {P.drop_scale};
          for (int64_t j = 0; j < nk; ++j) {
            scale_rows(v_rows + j * P.v_sl, P.v_sl, 1, P.Dv, scale, s.vz.get() + j * P.Dv,
                       P.Dv);
          }
          v_rows = s.vz.get();
          v_ld = P.Dv;
        }
        std::fill(s.dk_err.get(), s.dk_err.get() + nk * P.D, 0.0f);
        std::fill(s.dv_err.get(), s.dv_err.get() + nk * P.Dv, 0.0f);
        for (int64_t g = 0; g < P.group(); ++g) {
          const int64_t h = hk * P.group() + g;
          collect_query_tiles(P, b, h, u, j0, nk, s.tiles);
          for (const Tile& t : s.tiles) {
            backward_tile(G, s, b, h, t, v_rows, v_ld, dq, dq_err, dk, dv);
          }
        }
        // The key tile's dK and dV rows are complete (no other item touches them).
        add_rows(s.dk_err.get(), P.D, nk, P.D, dk + j0 * P.D, P.D);
        add_rows(s.dv_err.get(), P.Dv, nk, P.Dv, dv + j0 * P.Dv, P.Dv);
      }
    }
    // This item's dQ chunk for the group's heads is complete.
    for (int64_t g = 0; g < P.group(); ++g) {
      const int64_t rows = (b * P.Hq + hk * P.group() + g) * P.Lq * P.D;
      add_rows(dq_err + rows, P.D, P.Lq, P.D, dq + rows, P.D);
    }
  }
}

void dropout_lanes(uint64_t seed, uint64_t base, uint64_t step, uint32_t counter1,
                   float threshold, uint8_t* keep) {
  const M m = Vec::dropout_keep(seed, base, step, counter1, threshold);
  alignas(64) float v[W];
  Vec::store(v, Vec::blend(m, Vec::set1(1.0f), Vec::zero()));
  for (int l = 0; l < W; ++l) keep[l] = v[l] != 0.0f;
}

const KernelSet kKernelSet = {kIsaName,         &forward_worker,  &forward_merge,
                               &backward_prepare, &backward_stats, &backward_worker,
                               W,                 &dropout_lanes};
