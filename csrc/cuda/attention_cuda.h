// FlashAttention-2-style CUDA attention: what the launchers (attention_cuda.cu)
// hand to the kernels (attention_fwd_cuda.cu, attention_bwd_cuda.cu).
//
// Semantics are mmattn/reference.py's: q (B, Hq, Lq, D), k (B, Hkv, Lk, D),
// v (B, Hkv, Lk, Dv), head h reads kv head h / (Hq / Hkv); masks combine by AND
// (a float attn_mask adds to the scaled scores); a row with no visible key gives
// out 0 and lse +inf. Dropout keeps element (b, h, i, j) iff
// dropout_uniform(seed, i * Lk + j, b * Hq + h) >= p (csrc/philox.h).
//
// Kernels (T = f16 or bf16, fp32 accumulation on tensor cores, mma.m16n8k16):
//   forward   one CTA per (64 query rows, head, batch); 4 warps of 16 rows; online
//             softmax over key tiles of 64; writes out (T), lse and optionally out (fp32)
//   bwd_delta delta_i = rowsum(dO_i * O_i) - grad_lse_i (one warp per row)
//   bwd_dkdv  one CTA per (64 keys, kv head, batch): sums dK, dV over the query tiles
//             of every query head of its GQA group (no atomics)
//   bwd_dq    one CTA per (64 query rows, head, batch): dQ over the key tiles
// Head dims are padded to the specialisation: DP = 64 when D, Dv <= 64, else 128
// (D, Dv multiples of 8 up to 128); padded columns are zero-filled in shared memory.
#pragma once

#include <cstdint>

#include "device.h"

namespace mmattn::attn_cuda {

constexpr int kThreads = 128;  // 4 warps
constexpr int kPad = 8;        // shared rows padded by 16 bytes: ldmatrix rows hit distinct banks
constexpr int kBlockM = 64;    // query rows per CTA (forward, dQ)
constexpr int kBlockN = 64;    // keys per tile (forward, dQ) and per CTA (dK/dV)

enum MaskKind : int { kMaskNone = 0, kMaskBool = 1, kMaskF32 = 2, kMaskF16 = 3, kMaskBF16 = 4 };

// mmattn.BlockMask's compressed form; Bm in {1, B}, Hm in {1, Hq}. The kernels
// need bq % kBlockM == 0 and bk % kBlockN == 0 (a CTA's rows lie in one block).
struct BlockMaskParams {
  int present = 0;
  int bq = 0, bk = 0, nbq = 0, nbk = 0, Bm = 1, Hm = 1;
  const int32_t* kv_num = nullptr;         // (Bm, Hm, nbq)
  const int32_t* kv_idx = nullptr;         // (Bm, Hm, nbq, nbk), ascending
  const int32_t* q_num = nullptr;          // (Bm, Hm, nbk)
  const int32_t* q_idx = nullptr;          // (Bm, Hm, nbk, nbq), ascending
  const uint8_t* full = nullptr;           // (Bm, Hm, nbq, nbk)
  const int32_t* partial_index = nullptr;  // (Bm, Hm, nbq, nbk), -1 = not partial
  const uint8_t* pmask = nullptr;          // partial_masks (P, pq, pk), any strides
  int64_t pm_s0 = 0, pm_s1 = 0, pm_s2 = 0;
  int pq = 0, pk = 0;
};

struct AttnParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  // Element strides of batch, head and row; the head dimension has stride 1 and
  // every stride is a multiple of 8 (16-byte rows for cp.async).
  int64_t q_sb = 0, q_sh = 0, q_sl = 0;
  int64_t k_sb = 0, k_sh = 0, k_sl = 0;
  int64_t v_sb = 0, v_sh = 0, v_sl = 0;
  int B = 0, Hq = 0, Hkv = 0, Lq = 0, Lk = 0, D = 0, Dv = 0;
  float scale = 1.f;       // softmax scale
  float scale_log2 = 1.f;  // scale * log2(e): scores live in the exp2 domain
  // attn_mask element (b, h, i, j) at mask + b*m_sb + h*m_sh + i*m_si + j*m_sj
  const void* mask = nullptr;
  int mask_kind = kMaskNone;
  int64_t m_sb = 0, m_sh = 0, m_si = 0, m_sj = 0;
  const uint8_t* kpm = nullptr;  // key_padding_mask (B, Lk), True = padding
  int64_t kpm_sb = 0, kpm_sj = 0;
  int causal = 0;
  int dropout = 0;
  float p_drop = 0.f, drop_scale = 1.f;
  uint64_t seed = 0;
  BlockMaskParams blk;
  // Forward outputs (contiguous): out (B, Hq, Lq, Dv) in T, out_f32 the same in
  // fp32 (or nullptr), lse (B, Hq, Lq). The backward reads lse.
  void* out = nullptr;
  float* out_f32 = nullptr;
  float* lse = nullptr;
  // Backward (contiguous): dout and o (B, Hq, Lq, Dv), o in T or fp32 (o_f32);
  // grad_lse (B, Hq, Lq) or nullptr; delta (B, Hq, Lq) workspace;
  // dq (B, Hq, Lq, D), dk (B, Hkv, Lk, D), dv (B, Hkv, Lk, Dv) in T.
  const void* dout = nullptr;
  const void* o = nullptr;
  int o_f32 = 0;
  const float* grad_lse = nullptr;
  float* delta = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
};

enum class Dtype { F16, BF16 };

// Head-dim specialisation for (D, Dv): 64 or 128; 0 when unsupported.
inline int head_dim_padded(int64_t d, int64_t dv) {
  if (d <= 0 || dv <= 0 || d % 8 != 0 || dv % 8 != 0) return 0;
  const int64_t m = d > dv ? d : dv;
  return m <= 64 ? 64 : (m <= 128 ? 128 : 0);
}

// Defined in attention_fwd_cuda.cu / attention_bwd_cuda.cu.
void launch_forward(const AttnParams& p, Dtype dtype, int dp, dev::Stream stream);
void launch_backward(const AttnParams& p, Dtype dtype, int dp, dev::Stream stream);

}  // namespace mmattn::attn_cuda
