// Device code of the CUDA attention kernels (see attention_cuda.h for the plan).
//
// Tensor-core tiles use mma.m16n8k16 through the device layer. Naming: a warp
// owns 16 rows of a tile; `g = lane / 4` and `t = lane % 4` locate a lane's
// accumulator elements: acc[j][e] of an (rows x 8j..8j+7) tile sits at row
// g + 8 * (e / 2), column 8j + 2t + (e % 2).
#pragma once

#include <math.h>

#include "../philox.h"
#include "attention_cuda.h"

namespace mmattn::attn_cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

MMATTN_DEVICE int imin(int a, int b) { return a < b ? a : b; }
MMATTN_DEVICE int imax(int a, int b) { return a > b ? a : b; }

// ---------------------------------------------------------------- shared tiles

// ROWS x COLS tile of T (row stride COLS + kPad) from global rows row0.. of `g`
// (row stride `ld` elements): cp.async 16 bytes at a time, zero-filling rows at
// or past `rows_end` and columns at or past `cols_valid` (a multiple of 8).
template <class T, int ROWS, int COLS>
MMATTN_DEVICE void load_tile_async(T* smem, const T* g, int64_t ld, int row0, int rows_end,
                                   int cols_valid) {
  constexpr int kChunks = COLS / 8;
  for (int c = static_cast<int>(dev::thread_x()); c < ROWS * kChunks; c += kThreads) {
    const int r = c / kChunks, cc = c % kChunks;
    const int gr = row0 + r;
    const bool valid = gr < rows_end && cc * 8 < cols_valid;
    const T* src = valid ? g + gr * ld + cc * 8 : g;
    dev::cp_async_16(smem + r * (COLS + kPad) + cc * 8, src, valid);
  }
}

// A operand: the 16 x 16 block at `tile` of a row-major shared tile (row stride ld).
template <class T>
MMATTN_DEVICE void load_a(uint32_t (&a)[4], const T* tile, int ld) {
  const int lane = static_cast<int>(dev::lane_id());
  dev::ldmatrix_x4(a, tile + (lane % 16) * ld + (lane / 16) * 8);
}

// B operands of two n-tiles (n, n + 8) for one k-slice of 16, from a shared tile
// stored (n, k) row-major (B is the tile transposed, e.g. K for S = Q K^T):
// b[0..1] for columns n..n+7, b[2..3] for n+8..n+15.
template <class T>
MMATTN_DEVICE void load_b_nk(uint32_t (&b)[4], const T* tile, int ld) {
  const int lane = static_cast<int>(dev::lane_id());
  dev::ldmatrix_x4(b, tile + ((lane / 16) * 8 + lane % 8) * ld + ((lane / 8) % 2) * 8);
}

// The same from a tile stored (k, n) row-major (B is the tile, e.g. V for P V).
template <class T>
MMATTN_DEVICE void load_b_kn(uint32_t (&b)[4], const T* tile, int ld) {
  const int lane = static_cast<int>(dev::lane_id());
  dev::ldmatrix_x4_trans(b, tile + (((lane / 8) % 2) * 8 + lane % 8) * ld + (lane / 16) * 8);
}

// A fragment of a 16 x 16 k-slice made of two adjacent 16 x 8 accumulator tiles:
// the C layout of columns 0..7 and 8..15 is the A layout's (FA2 keeps P in registers).
template <class T>
MMATTN_DEVICE void acc_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = dev::pack2<T>(c0[0], c0[1]);
  a[1] = dev::pack2<T>(c0[2], c0[3]);
  a[2] = dev::pack2<T>(c1[0], c1[1]);
  a[3] = dev::pack2<T>(c1[2], c1[3]);
}

// dS as two 16-bit terms, hi + lo (lo = what rounding dS to T lost), so that dK and
// dQ see dS to ~2^-16 relative: rounding dS once would put a relative error of 2^-11
// (fp16) / 2^-8 (bf16) on every gradient term, about the size of the final rounding
// of the gradient itself (the tests' bound is twice the reference's error).
template <class T>
MMATTN_DEVICE void acc_to_a_split(uint32_t (&hi)[4], uint32_t (&lo)[4], const float (&c0)[4],
                                  const float (&c1)[4]) {
  acc_to_a<T>(hi, c0, c1);
  float r0[4], r1[4];
  dev::unpack2<T>(hi[0], &r0[0], &r0[1]);
  dev::unpack2<T>(hi[1], &r0[2], &r0[3]);
  dev::unpack2<T>(hi[2], &r1[0], &r1[1]);
  dev::unpack2<T>(hi[3], &r1[2], &r1[3]);
  MMATTN_UNROLL
  for (int e = 0; e < 4; ++e) {
    r0[e] = c0[e] - r0[e];
    r1[e] = c1[e] - r1[e];
  }
  acc_to_a<T>(lo, r0, r1);
}

template <class T>
MMATTN_DEVICE void mma2(float (&c0)[4], float (&c1)[4], const uint32_t (&a)[4],
                        const uint32_t (&b)[4]) {
  const uint32_t b0[2] = {b[0], b[1]};
  const uint32_t b1[2] = {b[2], b[3]};
  dev::mma_m16n8k16<T>(c0, a, b0);
  dev::mma_m16n8k16<T>(c1, a, b1);
}

// ---------------------------------------------------------------- masks

// Where a partial block's element mask starts, for the tile being processed.
struct TileMask {
  const uint8_t* partial;  // partial_masks[index], or nullptr when the block is full
  int q_origin, k_origin;  // first query row / key of the block
};

// Additive bias (exp2 domain) of score (i, j) of head (b, h): 0 or -inf from the
// bool masks, key padding, causality, bounds and the partial block mask, plus
// log2(e) * a float attn_mask.
MMATTN_DEVICE float bias_log2(const AttnParams& p, int b, int h, const TileMask& tm, int i, int j) {
  if (i >= p.Lq || j >= p.Lk) return -INFINITY;
  if (p.causal && j > i) return -INFINITY;
  if (p.kpm != nullptr && p.kpm[b * p.kpm_sb + j * p.kpm_sj]) return -INFINITY;
  if (tm.partial != nullptr) {
    const int pi = i - tm.q_origin, pj = j - tm.k_origin;
    // partial_masks may be smaller than the block: positions past it are hidden.
    if (pi >= p.blk.pq || pj >= p.blk.pk || !tm.partial[pi * p.blk.pm_s1 + pj * p.blk.pm_s2]) {
      return -INFINITY;
    }
  }
  if (p.mask_kind == kMaskNone) return 0.f;
  const int64_t off = b * p.m_sb + h * p.m_sh + i * p.m_si + j * p.m_sj;
  switch (p.mask_kind) {
    case kMaskBool:
      return static_cast<const uint8_t*>(p.mask)[off] ? 0.f : -INFINITY;
    case kMaskF32:
      return static_cast<const float*>(p.mask)[off] * kLog2e;
    case kMaskF16:
      return dev::to_float(static_cast<const dev::f16*>(p.mask)[off]) * kLog2e;
    default:
      return dev::to_float(static_cast<const dev::bf16*>(p.mask)[off]) * kLog2e;
  }
}

MMATTN_DEVICE bool dropout_keep(const AttnParams& p, int bh, int i, int j) {
  return dropout_uniform(p.seed, static_cast<uint64_t>(i) * static_cast<uint64_t>(p.Lk) + j,
                         static_cast<uint64_t>(bh)) >= p.p_drop;
}

MMATTN_DEVICE int64_t block_head_row(const BlockMaskParams& bm, int b, int h) {
  return static_cast<int64_t>(bm.Bm == 1 ? 0 : b) * bm.Hm + (bm.Hm == 1 ? 0 : h);
}

// Key tiles (kBlockN keys, ascending) that query rows [m0, m0 + rows) may see:
// every tile below the causal limit, or only the tiles of the nonempty blocks
// of the block mask (empty blocks are never touched).
// The iterators take the kernel's parameters at every call instead of keeping a
// pointer to them: taking the address of a kernel parameter would copy the whole
// struct to local memory.
struct KeyTiles {
  int m0, n_limit;
  bool base_mask;
  int cur = 0, end = 0;
  bool full = true;
  TileMask tm{nullptr, 0, 0};
  int idx = 0, count = 0;
  int64_t row = 0;

  MMATTN_DEVICE KeyTiles(const AttnParams& params, int b, int h, int m0_, int rows) : m0(m0_) {
    const int q_end = imin(m0 + rows, params.Lq);
    n_limit = params.causal ? imin(params.Lk, q_end) : params.Lk;
    base_mask = params.kpm != nullptr || params.mask_kind != kMaskNone;
    if (!params.blk.present) {
      end = n_limit;
    } else {
      const BlockMaskParams& bm = params.blk;
      row = block_head_row(bm, b, h) * bm.nbq + m0 / bm.bq;
      count = bm.kv_num[row];
    }
  }

  // Next tile: its first key, whether it needs element masking, its block mask.
  MMATTN_DEVICE bool next(const AttnParams& p, int* n0, bool* need_mask, TileMask* mask) {
    for (;;) {
      if (cur < end) {
        *n0 = cur;
        *need_mask = base_mask || !full || cur + kBlockN > p.Lk ||
                     (p.causal && cur + kBlockN - 1 > m0);
        *mask = tm;
        cur += kBlockN;
        return true;
      }
      if (!p.blk.present || idx >= count) return false;
      const BlockMaskParams& bm = p.blk;
      const int kb = bm.kv_idx[row * bm.nbk + idx++];
      const int64_t cell = row * bm.nbk + kb;
      full = bm.full[cell] != 0;
      const int pidx = bm.partial_index[cell];
      if (!full && pidx < 0) continue;  // not visible at all
      tm = TileMask{full ? nullptr : bm.pmask + pidx * bm.pm_s0, (m0 / bm.bq) * bm.bq,
                    kb * bm.bk};
      cur = kb * bm.bk;
      end = imin(cur + bm.bk, n_limit);
    }
  }
};

// Query tiles (ROWS rows, ascending) of head (b, h) that keys [n0, n0 + kBlockN) may
// be seen by: the dK/dV pass's loop, with the block mask's per-kv-block lists.
template <int ROWS>
struct QueryTiles {
  int n0, m_start;
  bool base_mask;
  int cur = 0, end = 0;
  bool full = true;
  TileMask tm{nullptr, 0, 0};
  int idx = 0, count = 0;
  int64_t head_row = 0, col = 0;

  MMATTN_DEVICE QueryTiles(const AttnParams& params, int b, int h, int n0_) : n0(n0_) {
    // Causal: a query tile sees some of these keys iff its last row >= n0.
    m_start = params.causal ? (n0 / ROWS) * ROWS : 0;
    base_mask = params.kpm != nullptr || params.mask_kind != kMaskNone;
    if (!params.blk.present) {
      cur = m_start;
      end = params.Lq;
    } else {
      const BlockMaskParams& bm = params.blk;
      head_row = block_head_row(bm, b, h);
      col = head_row * bm.nbk + n0 / bm.bk;
      count = bm.q_num[col];
    }
  }

  MMATTN_DEVICE bool next(const AttnParams& p, int* m0, bool* need_mask, TileMask* mask) {
    for (;;) {
      if (cur < end) {
        *m0 = cur;
        *need_mask = base_mask || !full || n0 + kBlockN > p.Lk ||
                     (p.causal && n0 + kBlockN - 1 > cur);
        *mask = tm;
        cur += ROWS;
        return true;
      }
      if (!p.blk.present || idx >= count) return false;
      const BlockMaskParams& bm = p.blk;
      const int kb = n0 / bm.bk;
      const int qb = bm.q_idx[col * bm.nbq + idx++];
      const int64_t cell = (head_row * bm.nbq + qb) * bm.nbk + kb;
      full = bm.full[cell] != 0;
      const int pidx = bm.partial_index[cell];
      if (!full && pidx < 0) continue;
      tm = TileMask{full ? nullptr : bm.pmask + pidx * bm.pm_s0, qb * bm.bq, kb * bm.bk};
      cur = imax(qb * bm.bq, m_start);
      end = imin(qb * bm.bq + bm.bq, p.Lq);
    }
  }
};

// ---------------------------------------------------------------- forward

template <int DP, int DVP>
constexpr size_t forward_smem_bytes() {
  return 2u * (kBlockM * (DP + kPad) + kBlockN * (DP + kPad) + kBlockN * (DVP + kPad));
}

// (Asking for 3 CTAs per SM at head dim 64, i.e. 168 registers, spilled on sm_80.)
template <class T, int DP, int DVP>
MMATTN_KERNEL_BOUNDS(kThreads) void attention_fwd_kernel(const AttnParams p) {
  constexpr int QS = DP + kPad, KS = DP + kPad, VS = DVP + kPad;
  T* q_s = dev::dynamic_smem<T>();
  T* k_s = q_s + kBlockM * QS;
  T* v_s = k_s + kBlockN * KS;
  const int lane = static_cast<int>(dev::lane_id()), warp = static_cast<int>(dev::warp_id());
  const int g = lane / 4, t = lane % 4;
  const int h = static_cast<int>(dev::block_y()), b = static_cast<int>(dev::block_z());
  const int hk = h / (p.Hq / p.Hkv), bh = b * p.Hq + h;
  const int m0 = static_cast<int>(dev::block_x()) * kBlockM;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;

  load_tile_async<T, kBlockM, DP>(q_s, qg, p.q_sl, m0, p.Lq, p.D);
  dev::cp_async_wait_all();
  dev::sync_threads();
  uint32_t qf[DP / 16][4];  // this warp's 16 query rows, kept in registers
  MMATTN_UNROLL
  for (int kk = 0; kk < DP / 16; ++kk) load_a(qf[kk], q_s + warp * 16 * QS + kk * 16, QS);

  float o[DVP / 8][4];
  MMATTN_UNROLL
  for (int j = 0; j < DVP / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const int rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};

  KeyTiles tiles(p, b, h, m0, kBlockM);
  int n0;
  bool need_mask;
  TileMask tm;
  while (tiles.next(p, &n0, &need_mask, &tm)) {
    dev::sync_threads();  // all warps are done with the previous K/V tile
    load_tile_async<T, kBlockN, DP>(k_s, kg, p.k_sl, n0, p.Lk, p.D);
    load_tile_async<T, kBlockN, DVP>(v_s, vg, p.v_sl, n0, p.Lk, p.Dv);
    dev::cp_async_wait_all();
    dev::sync_threads();

    float s[kBlockN / 8][4];
    MMATTN_UNROLL
    for (int j = 0; j < kBlockN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
    MMATTN_UNROLL
    for (int kk = 0; kk < DP / 16; ++kk) {
      MMATTN_UNROLL
      for (int jn = 0; jn < kBlockN / 16; ++jn) {
        uint32_t kb[4];
        load_b_nk(kb, k_s + jn * 16 * KS + kk * 16, KS);
        mma2<T>(s[2 * jn], s[2 * jn + 1], qf[kk], kb);
      }
    }
    // Scores in the exp2 domain, masked; then the online softmax of each row.
    MMATTN_UNROLL
    for (int j = 0; j < kBlockN / 8; ++j) {
      MMATTN_UNROLL
      for (int e = 0; e < 4; ++e) {
        float x = s[j][e] * p.scale_log2;
        if (need_mask) x += bias_log2(p, b, h, tm, rows[e / 2], n0 + 8 * j + 2 * t + (e % 2));
        s[j][e] = x;
      }
    }
    MMATTN_UNROLL
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
      MMATTN_UNROLL
      for (int j = 0; j < kBlockN / 8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
      mx = dev::quad_max(mx);
      const float m_new = fmaxf(row_max[r], mx);
      // A row with nothing visible yet keeps max -inf; exp2(-inf - 0) = 0 keeps it empty.
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = dev::fast_exp2(row_max[r] - m_use);
      row_max[r] = m_new;
      float sum = 0.f;
      MMATTN_UNROLL
      for (int j = 0; j < kBlockN / 8; ++j) {
        s[j][2 * r] = dev::fast_exp2(s[j][2 * r] - m_use);
        s[j][2 * r + 1] = dev::fast_exp2(s[j][2 * r + 1] - m_use);
        sum += s[j][2 * r] + s[j][2 * r + 1];
      }
      // Each lane keeps its partial sum; the quad's sums are added once, at the end.
      row_sum[r] = row_sum[r] * alpha + sum;
      MMATTN_UNROLL
      for (int j = 0; j < DVP / 8; ++j) {
        o[j][2 * r] *= alpha;
        o[j][2 * r + 1] *= alpha;
      }
    }
    if (p.dropout) {  // the normaliser counts every probability; only P V sees the drops
      MMATTN_UNROLL
      for (int j = 0; j < kBlockN / 8; ++j) {
        MMATTN_UNROLL
        for (int e = 0; e < 4; ++e) {
          const bool keep = dropout_keep(p, bh, rows[e / 2], n0 + 8 * j + 2 * t + (e % 2));
          s[j][e] = keep ? s[j][e] * p.drop_scale : 0.f;
        }
      }
    }
    MMATTN_UNROLL
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t pa[4];
      acc_to_a<T>(pa, s[2 * kk], s[2 * kk + 1]);
      MMATTN_UNROLL
      for (int jd = 0; jd < DVP / 16; ++jd) {
        uint32_t vb[4];
        load_b_kn(vb, v_s + kk * 16 * VS + jd * 16, VS);
        mma2<T>(o[2 * jd], o[2 * jd + 1], pa, vb);
      }
    }
  }

  T* out = static_cast<T*>(p.out);
  MMATTN_UNROLL
  for (int r = 0; r < 2; ++r) {
    const float l = dev::quad_sum(row_sum[r]);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int row = rows[r];
    if (row >= p.Lq) continue;
    const int64_t base = static_cast<int64_t>(bh) * p.Lq + row;
    if (t == 0) p.lse[base] = l > 0.f ? (row_max[r] + dev::fast_log2(l)) * kLn2 : INFINITY;
    MMATTN_UNROLL
    for (int j = 0; j < DVP / 8; ++j) {
      const int c = 8 * j + 2 * t;
      if (c >= p.Dv) continue;
      const float v0 = o[j][2 * r] * inv, v1 = o[j][2 * r + 1] * inv;
      dev::store_u32(out + base * p.Dv + c, dev::pack2<T>(v0, v1));
      if (p.out_f32 != nullptr) {
        p.out_f32[base * p.Dv + c] = v0;
        p.out_f32[base * p.Dv + c + 1] = v1;
      }
    }
  }
}

// ---------------------------------------------------------------- backward

// delta_i = rowsum(dO_i * O_i) - grad_lse_i, one warp per row (0 for rows with no
// visible key, whose probabilities are all 0 anyway).
template <class T, class O>
MMATTN_KERNEL_BOUNDS(kThreads) void attention_bwd_delta_kernel(const AttnParams p) {
  const int lane = static_cast<int>(dev::lane_id()), warp = static_cast<int>(dev::warp_id());
  const int h = static_cast<int>(dev::block_y()), b = static_cast<int>(dev::block_z());
  const int row = static_cast<int>(dev::block_x()) * (kThreads / 32) + warp;
  if (row >= p.Lq) return;
  const int64_t base = (static_cast<int64_t>(b) * p.Hq + h) * p.Lq + row;
  const T* dout = static_cast<const T*>(p.dout) + base * p.Dv;
  const O* o = static_cast<const O*>(p.o) + base * p.Dv;
  float acc = 0.f;
  for (int c = lane; c < p.Dv; c += 32) acc += dev::to_float(dout[c]) * dev::to_float(o[c]);
  acc = dev::warp_sum(acc);
  if (lane == 0) {
    const float g = p.grad_lse != nullptr ? p.grad_lse[base] : 0.f;
    p.delta[base] = p.lse[base] == INFINITY ? 0.f : acc - g;
  }
}

template <int DP, int DVP, int BMQ>
constexpr size_t dkdv_smem_bytes() {
  return 2u * (kBlockN * (DP + kPad) + kBlockN * (DVP + kPad) + BMQ * (DP + kPad) +
               BMQ * (DVP + kPad)) +
         4u * 2 * BMQ;
}

// dK, dV of kBlockN keys of one kv head: each warp owns 16 keys and computes the
// transposed scores S^T = K Q^T of its keys against every query tile of every
// query head of the GQA group, so the group's sum needs no atomics.
template <class T, int DP, int DVP, int BMQ>
MMATTN_KERNEL_BOUNDS(kThreads) void attention_bwd_dkdv_kernel(const AttnParams p) {
  constexpr int KS = DP + kPad, VS = DVP + kPad, QS = DP + kPad, OS = DVP + kPad;
  T* k_s = dev::dynamic_smem<T>();
  T* v_s = k_s + kBlockN * KS;
  T* q_s = v_s + kBlockN * VS;
  T* do_s = q_s + BMQ * QS;
  float* lse_s = reinterpret_cast<float*>(do_s + BMQ * OS);
  float* delta_s = lse_s + BMQ;
  const int tid = static_cast<int>(dev::thread_x());
  const int lane = static_cast<int>(dev::lane_id()), warp = static_cast<int>(dev::warp_id());
  const int g = lane / 4, t = lane % 4;
  const int hk = static_cast<int>(dev::block_y()), b = static_cast<int>(dev::block_z());
  const int group = p.Hq / p.Hkv;
  const int n0 = static_cast<int>(dev::block_x()) * kBlockN;
  const int keys[2] = {n0 + warp * 16 + g, n0 + warp * 16 + g + 8};

  load_tile_async<T, kBlockN, DP>(k_s, static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh,
                                  p.k_sl, n0, p.Lk, p.D);
  load_tile_async<T, kBlockN, DVP>(v_s, static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh,
                                   p.v_sl, n0, p.Lk, p.Dv);
  dev::cp_async_commit();

  float dk[DP / 8][4], dv[DVP / 8][4];
  MMATTN_UNROLL
  for (int j = 0; j < DP / 8; ++j) dk[j][0] = dk[j][1] = dk[j][2] = dk[j][3] = 0.f;
  MMATTN_UNROLL
  for (int j = 0; j < DVP / 8; ++j) dv[j][0] = dv[j][1] = dv[j][2] = dv[j][3] = 0.f;

  for (int gh = 0; gh < group; ++gh) {
    const int h = hk * group + gh, bh = b * p.Hq + h;
    const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
    const T* dog = static_cast<const T*>(p.dout) + static_cast<int64_t>(bh) * p.Lq * p.Dv;
    QueryTiles<BMQ> tiles(p, b, h, n0);
    int m0;
    bool need_mask;
    TileMask tm;
    while (tiles.next(p, &m0, &need_mask, &tm)) {
      dev::sync_threads();  // all warps are done with the previous query tile
      load_tile_async<T, BMQ, DP>(q_s, qg, p.q_sl, m0, p.Lq, p.D);
      load_tile_async<T, BMQ, DVP>(do_s, dog, p.Dv, m0, p.Lq, p.Dv);
      if (tid < BMQ) {
        const int r = m0 + tid;
        // Rows past Lq get lse +inf: their probabilities vanish.
        lse_s[tid] = r < p.Lq ? p.lse[static_cast<int64_t>(bh) * p.Lq + r] * kLog2e : INFINITY;
        delta_s[tid] = r < p.Lq ? p.delta[static_cast<int64_t>(bh) * p.Lq + r] : 0.f;
      }
      dev::cp_async_wait_all();
      dev::sync_threads();

      // S^T (16 keys x BMQ queries of this warp)
      float st[BMQ / 8][4];
      MMATTN_UNROLL
      for (int j = 0; j < BMQ / 8; ++j) st[j][0] = st[j][1] = st[j][2] = st[j][3] = 0.f;
      MMATTN_UNROLL
      for (int kk = 0; kk < DP / 16; ++kk) {
        uint32_t ka[4];
        load_a(ka, k_s + warp * 16 * KS + kk * 16, KS);
        MMATTN_UNROLL
        for (int jq = 0; jq < BMQ / 16; ++jq) {
          uint32_t qb[4];
          load_b_nk(qb, q_s + jq * 16 * QS + kk * 16, QS);
          mma2<T>(st[2 * jq], st[2 * jq + 1], ka, qb);
        }
      }
      // P^T, and the dropout keep bits of this lane's elements.
      uint32_t keep_bits = 0xffffffffu;
      MMATTN_UNROLL
      for (int j = 0; j < BMQ / 8; ++j) {
        MMATTN_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int qi = 8 * j + 2 * t + (e % 2);
          float x = st[j][e] * p.scale_log2;
          if (need_mask) x += bias_log2(p, b, h, tm, m0 + qi, keys[e / 2]);
          st[j][e] = dev::fast_exp2(x - lse_s[qi]);
          if (p.dropout && !dropout_keep(p, bh, m0 + qi, keys[e / 2])) {
            keep_bits &= ~(1u << (4 * j + e));
          }
        }
      }
      // dV += (P^T * Z) dO
      MMATTN_UNROLL
      for (int kq = 0; kq < BMQ / 16; ++kq) {
        float z0[4], z1[4];
        MMATTN_UNROLL
        for (int e = 0; e < 4; ++e) {
          const float zf0 = (keep_bits >> (4 * (2 * kq) + e)) & 1u ? p.drop_scale : 0.f;
          const float zf1 = (keep_bits >> (4 * (2 * kq + 1) + e)) & 1u ? p.drop_scale : 0.f;
          z0[e] = st[2 * kq][e] * (p.dropout ? zf0 : 1.f);
          z1[e] = st[2 * kq + 1][e] * (p.dropout ? zf1 : 1.f);
        }
        uint32_t pa[4];
        acc_to_a<T>(pa, z0, z1);
        MMATTN_UNROLL
        for (int jd = 0; jd < DVP / 16; ++jd) {
          uint32_t ob[4];
          load_b_kn(ob, do_s + kq * 16 * OS + jd * 16, OS);
          mma2<T>(dv[2 * jd], dv[2 * jd + 1], pa, ob);
        }
      }
      // dP^T = V dO^T (16 keys x BMQ queries)
      float dpt[BMQ / 8][4];
      MMATTN_UNROLL
      for (int j = 0; j < BMQ / 8; ++j) dpt[j][0] = dpt[j][1] = dpt[j][2] = dpt[j][3] = 0.f;
      MMATTN_UNROLL
      for (int kd = 0; kd < DVP / 16; ++kd) {
        uint32_t va[4];
        load_a(va, v_s + warp * 16 * VS + kd * 16, VS);
        MMATTN_UNROLL
        for (int jq = 0; jq < BMQ / 16; ++jq) {
          uint32_t ob[4];
          load_b_nk(ob, do_s + jq * 16 * OS + kd * 16, OS);
          mma2<T>(dpt[2 * jq], dpt[2 * jq + 1], va, ob);
        }
      }
      // dS^T = P^T * (dP^T * Z - delta), into st
      MMATTN_UNROLL
      for (int j = 0; j < BMQ / 8; ++j) {
        MMATTN_UNROLL
        for (int e = 0; e < 4; ++e) {
          float dp = dpt[j][e];
          if (p.dropout) dp = (keep_bits >> (4 * j + e)) & 1u ? dp * p.drop_scale : 0.f;
          st[j][e] = st[j][e] * (dp - delta_s[8 * j + 2 * t + (e % 2)]);
        }
      }
      // dK += dS^T Q
      MMATTN_UNROLL
      for (int kq = 0; kq < BMQ / 16; ++kq) {
        uint32_t da[4], da_lo[4];
        acc_to_a_split<T>(da, da_lo, st[2 * kq], st[2 * kq + 1]);
        MMATTN_UNROLL
        for (int jd = 0; jd < DP / 16; ++jd) {
          uint32_t qb[4];
          load_b_kn(qb, q_s + kq * 16 * QS + jd * 16, QS);
          mma2<T>(dk[2 * jd], dk[2 * jd + 1], da, qb);
          mma2<T>(dk[2 * jd], dk[2 * jd + 1], da_lo, qb);
        }
      }
    }
  }
  dev::cp_async_wait_all();  // no group is left in flight when no query tile was visited

  T* dk_out = static_cast<T*>(p.dk) + (static_cast<int64_t>(b) * p.Hkv + hk) * p.Lk * p.D;
  T* dv_out = static_cast<T*>(p.dv) + (static_cast<int64_t>(b) * p.Hkv + hk) * p.Lk * p.Dv;
  MMATTN_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int key = keys[r];
    if (key >= p.Lk) continue;
    MMATTN_UNROLL
    for (int j = 0; j < DP / 8; ++j) {
      const int c = 8 * j + 2 * t;
      if (c < p.D) {
        dev::store_u32(dk_out + static_cast<int64_t>(key) * p.D + c,
                       dev::pack2<T>(dk[j][2 * r] * p.scale, dk[j][2 * r + 1] * p.scale));
      }
    }
    MMATTN_UNROLL
    for (int j = 0; j < DVP / 8; ++j) {
      const int c = 8 * j + 2 * t;
      if (c < p.Dv) {
        dev::store_u32(dv_out + static_cast<int64_t>(key) * p.Dv + c,
                       dev::pack2<T>(dv[j][2 * r], dv[j][2 * r + 1]));
      }
    }
  }
}

template <int DP, int DVP>
constexpr size_t dq_smem_bytes() {
  return 2u * (kBlockM * (DP + kPad) + kBlockM * (DVP + kPad) + kBlockN * (DP + kPad) +
               kBlockN * (DVP + kPad));
}

// dQ of kBlockM query rows: S, P, dP = dO V^T and dS recomputed per key tile.
template <class T, int DP, int DVP>
MMATTN_KERNEL_BOUNDS(kThreads) void attention_bwd_dq_kernel(const AttnParams p) {
  constexpr int QS = DP + kPad, OS = DVP + kPad, KS = DP + kPad, VS = DVP + kPad;
  T* q_s = dev::dynamic_smem<T>();
  T* do_s = q_s + kBlockM * QS;
  T* k_s = do_s + kBlockM * OS;
  T* v_s = k_s + kBlockN * KS;
  const int lane = static_cast<int>(dev::lane_id()), warp = static_cast<int>(dev::warp_id());
  const int g = lane / 4, t = lane % 4;
  const int h = static_cast<int>(dev::block_y()), b = static_cast<int>(dev::block_z());
  const int hk = h / (p.Hq / p.Hkv), bh = b * p.Hq + h;
  const int m0 = static_cast<int>(dev::block_x()) * kBlockM;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;

  load_tile_async<T, kBlockM, DP>(q_s, static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh,
                                  p.q_sl, m0, p.Lq, p.D);
  load_tile_async<T, kBlockM, DVP>(
      do_s, static_cast<const T*>(p.dout) + static_cast<int64_t>(bh) * p.Lq * p.Dv, p.Dv, m0,
      p.Lq, p.Dv);
  dev::cp_async_commit();
  const int rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
  float lse2[2], delta[2];
  MMATTN_UNROLL
  for (int r = 0; r < 2; ++r) {
    const bool in = rows[r] < p.Lq;
    const int64_t idx = static_cast<int64_t>(bh) * p.Lq + rows[r];
    lse2[r] = in ? p.lse[idx] * kLog2e : INFINITY;
    delta[r] = in ? p.delta[idx] : 0.f;
  }

  float dq[DP / 8][4];
  MMATTN_UNROLL
  for (int j = 0; j < DP / 8; ++j) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.f;

  KeyTiles tiles(p, b, h, m0, kBlockM);
  int n0;
  bool need_mask;
  TileMask tm;
  while (tiles.next(p, &n0, &need_mask, &tm)) {
    dev::sync_threads();
    load_tile_async<T, kBlockN, DP>(k_s, kg, p.k_sl, n0, p.Lk, p.D);
    load_tile_async<T, kBlockN, DVP>(v_s, vg, p.v_sl, n0, p.Lk, p.Dv);
    dev::cp_async_wait_all();
    dev::sync_threads();

    float s[kBlockN / 8][4], dp[kBlockN / 8][4];
    MMATTN_UNROLL
    for (int j = 0; j < kBlockN / 8; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
      dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.f;
    }
    MMATTN_UNROLL
    for (int kk = 0; kk < DP / 16; ++kk) {
      uint32_t qa[4];
      load_a(qa, q_s + warp * 16 * QS + kk * 16, QS);
      MMATTN_UNROLL
      for (int jn = 0; jn < kBlockN / 16; ++jn) {
        uint32_t kb[4];
        load_b_nk(kb, k_s + jn * 16 * KS + kk * 16, KS);
        mma2<T>(s[2 * jn], s[2 * jn + 1], qa, kb);
      }
    }
    MMATTN_UNROLL
    for (int kd = 0; kd < DVP / 16; ++kd) {
      uint32_t oa[4];
      load_a(oa, do_s + warp * 16 * OS + kd * 16, OS);
      MMATTN_UNROLL
      for (int jn = 0; jn < kBlockN / 16; ++jn) {
        uint32_t vb[4];
        load_b_nk(vb, v_s + jn * 16 * VS + kd * 16, VS);
        mma2<T>(dp[2 * jn], dp[2 * jn + 1], oa, vb);
      }
    }
    // dS = P * (dP * Z - delta)
    MMATTN_UNROLL
    for (int j = 0; j < kBlockN / 8; ++j) {
      MMATTN_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int col = n0 + 8 * j + 2 * t + (e % 2);
        float x = s[j][e] * p.scale_log2;
        if (need_mask) x += bias_log2(p, b, h, tm, rows[e / 2], col);
        const float prob = dev::fast_exp2(x - lse2[e / 2]);
        float d = dp[j][e];
        if (p.dropout) d = dropout_keep(p, bh, rows[e / 2], col) ? d * p.drop_scale : 0.f;
        s[j][e] = prob * (d - delta[e / 2]);
      }
    }
    // dQ += dS K
    MMATTN_UNROLL
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t da[4], da_lo[4];
      acc_to_a_split<T>(da, da_lo, s[2 * kk], s[2 * kk + 1]);
      MMATTN_UNROLL
      for (int jd = 0; jd < DP / 16; ++jd) {
        uint32_t kb[4];
        load_b_kn(kb, k_s + kk * 16 * KS + jd * 16, KS);
        mma2<T>(dq[2 * jd], dq[2 * jd + 1], da, kb);
        mma2<T>(dq[2 * jd], dq[2 * jd + 1], da_lo, kb);
      }
    }
  }
  dev::cp_async_wait_all();

  T* dq_out = static_cast<T*>(p.dq) + static_cast<int64_t>(bh) * p.Lq * p.D;
  MMATTN_UNROLL
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= p.Lq) continue;
    MMATTN_UNROLL
    for (int j = 0; j < DP / 8; ++j) {
      const int c = 8 * j + 2 * t;
      if (c < p.D) {
        dev::store_u32(dq_out + static_cast<int64_t>(rows[r]) * p.D + c,
                       dev::pack2<T>(dq[j][2 * r] * p.scale, dq[j][2 * r + 1] * p.scale));
      }
    }
  }
}

}  // namespace mmattn::attn_cuda
