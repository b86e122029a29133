// Plain descriptions of one fused attention call, shared by the launcher
// (attention_cpu.cpp) and the per-ISA kernel translation units
// (attention_cpu_{avx512,avx2,generic}.cpp).
//
// Nothing here depends on the instruction set: the ISA units include this
// header *before* their `#pragma GCC target` region, so these inline functions
// are compiled for the baseline ISA in every unit (no ODR mix-ups).
//
// Conventions (see mmattn/reference.py for the maths):
//   q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), float32, last
//   stride 1, other strides arbitrary (in elements). Head h reads kv head
//   h / (Hq / Hkv).
//   Masks combine by AND; a masked score is -inf. Bool attn_mask: True = may
//   attend. Float attn_mask: added to the scaled scores. key_padding_mask:
//   True = padding. Causal: key j visible to query i iff j <= i.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <new>

#include <torch/headeronly/util/Half.h>

namespace mmattn::attn_cpu {

// Query rows per work tile: the lane dimension of every score tile
// (4 zmm / 8 ymm registers of float32).
constexpr int64_t kQueryTile = 64;
// Keys per score tile in the dense forward (block-sparse tiles follow the
// block size, split into pieces of at most kMaxKeyTile).
constexpr int64_t kKeyTileFwd = 128;
constexpr int64_t kKeyTileBwd = 64;
constexpr int64_t kMaxKeyTile = 256;
// The backward corrects lse's float32 rounding and recomputes delta (BackwardParams::lam)
// for rows with |lse| >= kLseExact + log(Lk). Below 8 lse's rounding error is at most
// 2^-22 relative, a few ulp of P; the log(Lk) spares the flat rows of long key sets
// (lse ~ log(Lk), every P small), which need neither, the cost of the extra pass.
constexpr float kLseExact = 8.0f;

// Per-thread scratch: 64-byte aligned (a cache line, a zmm register), so the
// vector rows of the score tiles never straddle cache lines.
struct AlignedDelete {
  void operator()(float* p) const { ::operator delete[](p, std::align_val_t(64)); }
};
using Buffer = std::unique_ptr<float[], AlignedDelete>;
inline Buffer make_buffer(int64_t n) {
  return Buffer(static_cast<float*>(
      ::operator new[](static_cast<size_t>(n > 0 ? n : 1) * sizeof(float), std::align_val_t(64))));
}

enum class MaskKind : int { None = 0, Bool, Float32, Float64, BFloat16, Float16 };

// Element (b, h, i, j) of an attention mask broadcast to (B, Hq, Lq, Lk) sits
// at data + b*sb + h*sh + i*si + j*sj (strides in elements, 0 for broadcast
// dimensions): masks are read in place, never materialised.
struct MaskView {
  const void* data = nullptr;
  MaskKind kind = MaskKind::None;
  int64_t sb = 0, sh = 0, si = 0, sj = 0;

  // Additive value of one element: 0 / -inf for bool masks, the value otherwise.
  inline float additive(int64_t offset) const {
    constexpr float kNegInf = -__builtin_huge_valf();
    switch (kind) {
      case MaskKind::Bool:
        return static_cast<const uint8_t*>(data)[offset] ? 0.0f : kNegInf;
      case MaskKind::Float32:
        return static_cast<const float*>(data)[offset];
      case MaskKind::Float64:
        return static_cast<float>(static_cast<const double*>(data)[offset]);
      case MaskKind::BFloat16: {
        const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(data)[offset])
                              << 16;
        float out;
        __builtin_memcpy(&out, &bits, sizeof(out));
        return out;
      }
      case MaskKind::Float16:
        return c10::detail::fp16_ieee_to_fp32_value(static_cast<const uint16_t*>(data)[offset]);
      case MaskKind::None:
        break;
    }
    return 0.0f;
  }
};

// Compressed block-sparse mask (mmattn.BlockMask), all int32/bool tensors
// contiguous with leading (Bm, Hm), Bm in {1, B}, Hm in {1, Hq}.
struct BlockView {
  bool present = false;
  int64_t bq = 0, bk = 0, nbq = 0, nbk = 0, Bm = 1, Hm = 1;
  const int32_t* kv_num = nullptr;      // (Bm, Hm, nbq)
  const int32_t* kv_idx = nullptr;      // (Bm, Hm, nbq, nbk), ascending
  const int32_t* q_num = nullptr;       // (Bm, Hm, nbk)
  const int32_t* q_idx = nullptr;       // (Bm, Hm, nbk, nbq), ascending
  const uint8_t* full = nullptr;        // (Bm, Hm, nbq, nbk)
  const int32_t* partial_index = nullptr;  // (Bm, Hm, nbq, nbk), -1 = none
  // partial_masks transposed to (P, pk, pq), (pq, pk) = (min(bq, Lq), min(bk, Lk)):
  // a key row of a partial block holds its query lanes contiguously, as the score
  // tiles do.
  const uint8_t* partial_t = nullptr;
  int64_t pq = 0, pk = 0;

  inline int64_t head_base(int64_t b, int64_t h) const {
    return ((Bm == 1 ? 0 : b) * Hm + (Hm == 1 ? 0 : h));
  }
};

// What both passes read.
struct Problem {
  int64_t B = 0, Hq = 0, Hkv = 0, Lq = 0, Lk = 0, D = 0, Dv = 0;
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  int64_t q_sb = 0, q_sh = 0, q_sl = 0;
  int64_t k_sb = 0, k_sh = 0, k_sl = 0;
  int64_t v_sb = 0, v_sh = 0, v_sl = 0;
  float scale = 1.0f;
  MaskView mask;
  const uint8_t* kpm = nullptr;  // key_padding_mask (B, Lk), True = padding
  int64_t kpm_sb = 0, kpm_sj = 0;
  bool causal = false;
  // Dropout: element kept iff dropout_uniform(seed, i*Lk + j, b*Hq + h) >= keep_threshold
  // (csrc/philox.h), kept elements scaled by drop_scale (0 when p == 1).
  bool dropout = false;
  float keep_threshold = 0.0f;
  float drop_scale = 1.0f;
  uint64_t seed = 0;
  BlockView blocks;

  inline int64_t group() const { return Hq / Hkv; }
  // Query rows of one "q block": the BlockMask's bq, or one tile when dense.
  inline int64_t q_block_rows() const { return blocks.present ? blocks.bq : kQueryTile; }
  inline int64_t num_q_blocks() const {
    const int64_t rows = q_block_rows();
    return (Lq + rows - 1) / rows;
  }
  inline int64_t tiles_per_q_block() const {
    return (q_block_rows() + kQueryTile - 1) / kQueryTile;
  }
};

struct ForwardParams {
  Problem p;
  float* out = nullptr;      // (B, Hq, Lq, Dv) contiguous
  float* lse = nullptr;      // (B, Hq, Lq) contiguous, +inf for rows with no visible key
  float* weights = nullptr;  // (B, Hq, Lq, Lk) contiguous, or nullptr
  // Split-KV (decoding shapes: few query tiles, many keys): the keys are cut into
  // `splits` ranges of split_keys (a multiple of the key tile or block), each work
  // item handles one range and leaves its partial softmax state per row,
  //   part_m = max score, part_l = sum exp(s - part_m), part_o = sum exp(s - part_m) Z V,
  // each (splits, B * Hq * Lq[, Dv]) contiguous; forward_merge then combines the
  // ranges through their log-sum-exp, in range order. The split depends on the
  // shape only (plan_splits), never on threads or timing: results are the same
  // bits for any thread count.
  int64_t splits = 1;
  int64_t split_keys = 0;
  float* part_o = nullptr;
  float* part_m = nullptr;
  float* part_l = nullptr;
  inline int64_t num_tiles() const {
    return p.B * p.Hq * p.num_q_blocks() * p.tiles_per_q_block();
  }
  // Work items: (b, h, q block, tile within block, key range).
  inline int64_t num_items() const { return num_tiles() * splits; }
};

// Backward: (batch, kv head) pairs below which the keys are split into chunks, and
// the most floats of the chunks' dq accumulators together (unless one chunk).
constexpr int64_t kBwdTargetItems = 16;
constexpr int64_t kBwdChunkFloats = int64_t{1} << 23;

// Work items below which the forward splits the keys, and the fewest keys per split.
constexpr int64_t kSplitTargetItems = 32;
constexpr int64_t kMinSplitKeys = 256;

// Splits the keys of a forward with few work items (see ForwardParams); none when the
// weights are returned (they need each row's final statistics in one item).
inline void plan_splits(ForwardParams& F) {
  const Problem& p = F.p;
  F.splits = 1;
  F.split_keys = p.Lk;
  const int64_t tiles = F.num_tiles();
  if (F.weights != nullptr || tiles <= 0 || tiles >= kSplitTargetItems) return;
  const int64_t unit = p.blocks.present ? p.blocks.bk : kKeyTileFwd;
  const int64_t min_keys = (kMinSplitKeys + unit - 1) / unit * unit;
  const int64_t most = (p.Lk + min_keys - 1) / min_keys;
  const int64_t wanted = std::min((kSplitTargetItems + tiles - 1) / tiles, most);
  if (wanted <= 1) return;
  const int64_t per = (p.Lk + wanted - 1) / wanted;
  F.split_keys = (per + unit - 1) / unit * unit;
  F.splits = (p.Lk + F.split_keys - 1) / F.split_keys;
}

struct BackwardParams {
  Problem p;
  const float* dout = nullptr;  // (B, Hq, Lq, Dv) rows, strides below
  int64_t do_sb = 0, do_sh = 0, do_sl = 0;
  const float* out = nullptr;   // forward output, same layout as dout
  int64_t o_sb = 0, o_sh = 0, o_sl = 0;
  const float* lse = nullptr;   // (B, Hq, Lq) contiguous
  // Gradient flowing into lse, (B, Hq, Lq) contiguous, or nullptr: since
  // d lse_i / d s_ij = P_ij it enters as delta_i -= grad_lse_i.
  const float* grad_lse = nullptr;
  // Workspace filled by backward_prepare: per (b, h) the transposes of q and
  // dout, (D, Lq_pad) and (Dv, Lq_pad), and delta = rowsum(dout * out) - grad_lse,
  // (Lq,).
  int64_t lq_pad = 0;
  float* q_t = nullptr;
  float* do_t = nullptr;
  float* delta = nullptr;
  // Per row (B, Hq, Lq): lam = log sum_j exp(s_ij - lse_i), the correction for
  // lse's float32 rounding, so that P = exp((s - lse) - lam) sums to 1 to float32
  // accuracy. lse is rounded to half an ulp of |lse|: for large |lse|
  // (e.g. 3000 for logits of randn * 30) that alone would put relative errors of
  // 1e-4 into every P of the row, while plain softmax math gets P's largest
  // entries right to an ulp. Filled by backward_stats for query tiles that have
  // such rows, 0 elsewhere; for those tiles backward_stats also recomputes delta
  // from the same P and dP that dS uses (see there).
  float* lam = nullptr;
  // Outputs (float32, contiguous): dq accumulates per kv chunk,
  // (num_chunks, B, Hq, Lq, D); dk (B, Hkv, Lk, D); dv (B, Hkv, Lk, Dv); zeroed.
  float* dq = nullptr;
  // Rounding errors of dq's running sums over key tiles (same layout as dq, zeroed),
  // added to dq by the item that completes them.
  float* dq_err = nullptr;
  float* dk = nullptr;
  float* dv = nullptr;
  int64_t num_chunks = 1;

  // Key tiles (dense) or key blocks (block-sparse) along Lk.
  inline int64_t key_units() const {
    if (p.blocks.present) return p.blocks.nbk;
    return (p.Lk + kKeyTileBwd - 1) / kKeyTileBwd;
  }
  inline int64_t units_per_chunk() const {
    return (key_units() + num_chunks - 1) / num_chunks;
  }
  // Work items: (b, kv head, chunk of key units); an item owns its dk/dv rows
  // and its dq chunk slice, so items never race.
  inline int64_t num_items() const { return p.B * p.Hkv * num_chunks; }
  // Work items of backward_stats: (b, h, q block, tile within block), as the forward.
  inline int64_t num_stat_items() const {
    return p.B * p.Hq * p.num_q_blocks() * p.tiles_per_q_block();
  }
};

// One instruction-set version of the kernels. `next` is a shared work-queue
// counter: each call takes items until none is left, so calling it from every
// thread of a parallel region balances uneven items (causal, block-sparse).
struct KernelSet {
  const char* name;
  void (*forward_worker)(const ForwardParams&, std::atomic<int64_t>* next);
  // Split-KV: combines the partial states of rows [begin, end) of B * Hq * Lq.
  void (*forward_merge)(const ForwardParams&, int64_t begin, int64_t end);
  // Fills q_t, do_t and delta for the (b, h) pairs in [begin, end).
  void (*backward_prepare)(const BackwardParams&, int64_t begin, int64_t end);
  // Fills lam and refines delta (see BackwardParams) for the query tiles it takes;
  // runs after backward_prepare.
  void (*backward_stats)(const BackwardParams&, std::atomic<int64_t>* next);
  void (*backward_worker)(const BackwardParams&, std::atomic<int64_t>* next);
  // Test hook (op attention_cpu_dropout_keep): the build's dropout keep-mask of the
  // `lanes` counters base + lane * step (64 bits), 1 / 0 into keep[lane].
  int lanes;
  void (*dropout_lanes)(uint64_t seed, uint64_t base, uint64_t step, uint32_t counter1,
                        float threshold, uint8_t* keep);
};

// Defined in the ISA units; nullptr when that unit was built without the ISA.
const KernelSet* kernels_avx512();
const KernelSet* kernels_avx2();
const KernelSet* kernels_generic();

}  // namespace mmattn::attn_cpu
