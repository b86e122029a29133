// CUDA attention ops: argument checks, tensor preparation and the launches of
// the kernels in attention_{fwd,bwd}_cuda.cu (plan: attention_cuda.h).
//
//   <ns>::cuda_attention_fwd -> (out, lse, out_fp32)
//   <ns>::cuda_attention_bwd -> (dq, dk, dv)
//
// <ns> is `mmattn` (CUDA tensors) in the real build and `mmattn_emu` (CPU
// tensors, kernels under the SIMT emulator) in the test extension.
//
// Inputs: q, k, v float16 or bfloat16 with head dims D, Dv multiples of 8 up
// to 128. They are read in place (any batch/head/row strides, e.g. (B, L, H, D)
// views) when the head dimension has stride 1, the other strides are multiples
// of 8 elements and the data is 16-byte aligned; otherwise they are copied
// once. attn_mask (bool, float32, float16 or bfloat16; float64 is converted)
// arrives expanded to (B, Hq, Lq, Lk) and is read through its strides. Block
// masks need block sizes that are multiples of 64. Outputs are contiguous.
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "attention_cuda.h"
#include "host.h"

namespace mmattn::attn_cuda {
namespace {

using Shape = std::vector<int64_t>;
using cuda_host::kDeviceName;
using cuda_host::on_device;

const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Double: return "float64";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Half: return "float16";
    case ScalarType::Bool: return "bool";
    case ScalarType::Int: return "int32";
    case ScalarType::Long: return "int64";
    default: return "an unsupported dtype";
  }
}

bool same_shape(const Tensor& t, const Shape& shape) {
  if (t.dim() != static_cast<int64_t>(shape.size())) return false;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (t.size(static_cast<int64_t>(i)) != shape[i]) return false;
  }
  return true;
}

// q/k/v as the kernels read them: rows of 16-byte chunks (see the file comment).
Tensor rows16(const Tensor& t) {
  bool ok = t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  for (int64_t i = 0; ok && i < t.dim() - 1; ++i) ok = t.size(i) <= 1 || t.stride(i) % 8 == 0;
  if (ok) return t;
  Tensor c = torch::stable::contiguous(t);
  // A contiguous tensor whose start is misaligned comes back as itself: copy it.
  return c.const_data_ptr() == t.const_data_ptr() ? torch::stable::clone(c) : c;
}

struct Dims {
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
  Dtype dtype;
  int dp;
};

Dims check_qkv(const Tensor& q, const Tensor& k, const Tensor& v) {
  const char* names[3] = {"q", "k", "v"};
  const Tensor* ts[3] = {&q, &k, &v};
  for (int i = 0; i < 3; ++i) {
    STD_TORCH_CHECK(ts[i]->dim() == 4, "cuda attention: ", names[i],
                    " must be 4-D (batch, heads, length, head_dim)");
    STD_TORCH_CHECK(cuda_host::same_device(*ts[i], q), "cuda attention: ", names[i],
                    " must be a ", kDeviceName, " tensor on q's device");
  }
  const ScalarType st = q.scalar_type();
  STD_TORCH_CHECK(st == ScalarType::Half || st == ScalarType::BFloat16,
                  "cuda attention: q is ", dtype_name(st), "; supported: float16, bfloat16");
  STD_TORCH_CHECK(k.scalar_type() == st && v.scalar_type() == st,
                  "cuda attention: q, k and v must share one dtype");
  Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3),
         st == ScalarType::Half ? Dtype::F16 : Dtype::BF16, 0};
  STD_TORCH_CHECK(k.size(0) == d.B && v.size(0) == d.B, "cuda attention: batch sizes differ");
  STD_TORCH_CHECK(v.size(1) == d.Hkv && v.size(2) == d.Lk && k.size(3) == d.D,
                  "cuda attention: k (B, Hkv, Lk, D) and v (B, Hkv, Lk, Dv) do not match q");
  STD_TORCH_CHECK(d.Hkv > 0 && d.Hq % d.Hkv == 0, "cuda attention: query heads (", d.Hq,
                  ") must be a multiple of key/value heads (", d.Hkv, ")");
  d.dp = head_dim_padded(d.D, d.Dv);
  STD_TORCH_CHECK(d.dp != 0, "cuda attention: head dims (D, Dv) = (", d.D, ", ", d.Dv,
                  ") unsupported; they must be multiples of 8 up to 128");
  STD_TORCH_CHECK(d.B <= 65535 && d.Hq <= 65535, "cuda attention: batch and heads must be "
                  "at most 65535 (grid limits)");
  STD_TORCH_CHECK(d.Lq < (int64_t{1} << 31) - kBlockM && d.Lk < (int64_t{1} << 31) - kBlockN,
                  "cuda attention: sequence lengths must fit in int32");
  return d;
}

void set_qkv(AttnParams& p, const Dims& d, const Tensor& q, const Tensor& k, const Tensor& v,
             double scale) {
  p.B = static_cast<int>(d.B), p.Hq = static_cast<int>(d.Hq), p.Hkv = static_cast<int>(d.Hkv);
  p.Lq = static_cast<int>(d.Lq), p.Lk = static_cast<int>(d.Lk);
  p.D = static_cast<int>(d.D), p.Dv = static_cast<int>(d.Dv);
  p.q = q.const_data_ptr(), p.k = k.const_data_ptr(), p.v = v.const_data_ptr();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sl = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sl = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sl = v.stride(2);
  STD_TORCH_CHECK(std::isfinite(scale), "cuda attention: scale must be finite");
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
}

// attn_mask read in place through its strides; float64 is converted (the kernels
// read 16- and 32-bit floats). `keep` holds a converted mask alive.
void set_mask(AttnParams& p, const Dims& d, const std::optional<Tensor>& mask, const Tensor& q,
              Tensor& keep) {
  if (!mask.has_value()) return;
  const Tensor& m0 = *mask;
  STD_TORCH_CHECK(cuda_host::same_device(m0, q) && same_shape(m0, {d.B, d.Hq, d.Lq, d.Lk}),
                  "cuda attention: attn_mask must be a ", kDeviceName,
                  " tensor expanded to (B, Hq, Lq, Lk)");
  const ScalarType st = m0.scalar_type();
  if (st == ScalarType::Double) keep = torch::stable::to(m0, ScalarType::Float);
  const Tensor& m = st == ScalarType::Double ? keep : m0;
  switch (m.scalar_type()) {
    case ScalarType::Bool: p.mask_kind = kMaskBool; break;
    case ScalarType::Float: p.mask_kind = kMaskF32; break;
    case ScalarType::Half: p.mask_kind = kMaskF16; break;
    case ScalarType::BFloat16: p.mask_kind = kMaskBF16; break;
    default:
      STD_TORCH_CHECK(false, "cuda attention: attn_mask must be bool or floating point, got ",
                      dtype_name(st));
  }
  p.mask = m.const_data_ptr();
  p.m_sb = m.stride(0), p.m_sh = m.stride(1), p.m_si = m.stride(2), p.m_sj = m.stride(3);
}

void set_key_padding(AttnParams& p, const Dims& d, const std::optional<Tensor>& kpm,
                     const Tensor& q) {
  if (!kpm.has_value()) return;
  STD_TORCH_CHECK(cuda_host::same_device(*kpm, q) && kpm->scalar_type() == ScalarType::Bool &&
                      same_shape(*kpm, {d.B, d.Lk}),
                  "cuda attention: key_padding_mask must be a bool ", kDeviceName,
                  " tensor (B, Lk)");
  p.kpm = static_cast<const uint8_t*>(kpm->const_data_ptr());
  p.kpm_sb = kpm->stride(0), p.kpm_sj = kpm->stride(1);
}

void set_dropout(AttnParams& p, double dropout_p, int64_t seed) {
  STD_TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, "cuda attention: dropout_p must be in "
                  "[0, 1], got ", dropout_p);
  p.dropout = dropout_p > 0.0;
  p.p_drop = static_cast<float>(dropout_p);
  p.drop_scale = dropout_p >= 1.0 ? 0.0f : static_cast<float>(1.0 / (1.0 - dropout_p));
  p.seed = static_cast<uint64_t>(seed);
}

struct BlockArgs {
  std::optional<Tensor> kv_num, kv_idx, q_num, q_idx, full, partial_index, partial_masks;
  int64_t bq = 0, bk = 0;
};

void set_blocks(AttnParams& p, const Dims& d, const BlockArgs& a, const Tensor& q) {
  const bool any = a.kv_num || a.kv_idx || a.q_num || a.q_idx || a.full || a.partial_index ||
                   a.partial_masks;
  if (!any) return;
  STD_TORCH_CHECK(a.kv_num && a.kv_idx && a.q_num && a.q_idx && a.full && a.partial_index &&
                      a.partial_masks,
                  "cuda attention: the block mask needs all of kv_num_blocks, kv_indices, "
                  "q_num_blocks, q_indices, full_blocks, partial_index and partial_masks");
  STD_TORCH_CHECK(a.bq > 0 && a.bk > 0 && a.bq % kBlockM == 0 && a.bk % kBlockN == 0,
                  "cuda attention: block mask block sizes must be multiples of 64, got (", a.bq,
                  ", ", a.bk, ")");
  BlockMaskParams& bm = p.blk;
  bm.present = 1;
  bm.bq = static_cast<int>(a.bq), bm.bk = static_cast<int>(a.bk);
  bm.nbq = static_cast<int>((d.Lq + a.bq - 1) / a.bq);
  bm.nbk = static_cast<int>((d.Lk + a.bk - 1) / a.bk);
  const Tensor& layout = *a.full;
  STD_TORCH_CHECK(layout.dim() == 4, "cuda attention: full_blocks must be (Bm, Hm, nbq, nbk)");
  const int64_t Bm = layout.size(0), Hm = layout.size(1);
  STD_TORCH_CHECK((Bm == 1 || Bm == d.B) && (Hm == 1 || Hm == d.Hq),
                  "cuda attention: block mask leading dims (", Bm, ", ", Hm,
                  ") must be (1 or B, 1 or Hq)");
  bm.Bm = static_cast<int>(Bm), bm.Hm = static_cast<int>(Hm);
  auto check = [&](const Tensor& t, const char* name, ScalarType dtype, const Shape& shape) {
    STD_TORCH_CHECK(cuda_host::same_device(t, q) && t.scalar_type() == dtype &&
                        t.is_contiguous() && same_shape(t, shape),
                    "cuda attention: block mask ", name, " must be a contiguous ",
                    dtype_name(dtype), " ", kDeviceName, " tensor of the shape (Lq, Lk) = (",
                    d.Lq, ", ", d.Lk, ") and blocks (", a.bq, ", ", a.bk, ") give");
  };
  const int64_t nbq = bm.nbq, nbk = bm.nbk;
  check(*a.kv_num, "kv_num_blocks", ScalarType::Int, {Bm, Hm, nbq});
  check(*a.kv_idx, "kv_indices", ScalarType::Int, {Bm, Hm, nbq, nbk});
  check(*a.q_num, "q_num_blocks", ScalarType::Int, {Bm, Hm, nbk});
  check(*a.q_idx, "q_indices", ScalarType::Int, {Bm, Hm, nbk, nbq});
  check(*a.full, "full_blocks", ScalarType::Bool, {Bm, Hm, nbq, nbk});
  check(*a.partial_index, "partial_index", ScalarType::Int, {Bm, Hm, nbq, nbk});
  const Tensor& pm = *a.partial_masks;
  STD_TORCH_CHECK(cuda_host::same_device(pm, q) && pm.scalar_type() == ScalarType::Bool &&
                      pm.dim() == 3 && pm.size(1) <= a.bq && pm.size(2) <= a.bk,
                  "cuda attention: partial_masks must be a bool ", kDeviceName,
                  " tensor (P, pq <= bq, pk <= bk)");
  bm.kv_num = a.kv_num->const_data_ptr<int32_t>();
  bm.kv_idx = a.kv_idx->const_data_ptr<int32_t>();
  bm.q_num = a.q_num->const_data_ptr<int32_t>();
  bm.q_idx = a.q_idx->const_data_ptr<int32_t>();
  bm.full = static_cast<const uint8_t*>(a.full->const_data_ptr());
  bm.partial_index = a.partial_index->const_data_ptr<int32_t>();
  bm.pmask = static_cast<const uint8_t*>(pm.const_data_ptr());
  bm.pm_s0 = pm.stride(0), bm.pm_s1 = pm.stride(1), bm.pm_s2 = pm.stride(2);
  bm.pq = static_cast<int>(pm.size(1)), bm.pk = static_cast<int>(pm.size(2));
#if defined(MMATTN_CUDA_EMULATION)
  // The kernels trust the indices (mmattn.BlockMask builds them). Under the
  // emulator they are host memory, so tests also get their ranges checked.
  const int64_t heads = Bm * Hm, num_partial = pm.size(0);
  for (int64_t c = 0; c < heads * nbq * nbk; ++c) {
    STD_TORCH_CHECK(bm.partial_index[c] >= -1 && bm.partial_index[c] < num_partial,
                    "cuda attention: partial_index out of range");
  }
  for (int64_t r = 0; r < heads * nbq; ++r) {
    STD_TORCH_CHECK(bm.kv_num[r] >= 0 && bm.kv_num[r] <= nbk, "kv_num_blocks out of range");
    for (int64_t n = 0; n < bm.kv_num[r]; ++n) {
      STD_TORCH_CHECK(bm.kv_idx[r * nbk + n] >= 0 && bm.kv_idx[r * nbk + n] < nbk,
                      "cuda attention: kv_indices out of range");
    }
  }
  for (int64_t c = 0; c < heads * nbk; ++c) {
    STD_TORCH_CHECK(bm.q_num[c] >= 0 && bm.q_num[c] <= nbq, "q_num_blocks out of range");
    for (int64_t n = 0; n < bm.q_num[c]; ++n) {
      STD_TORCH_CHECK(bm.q_idx[c * nbq + n] >= 0 && bm.q_idx[c * nbq + n] < nbq,
                      "cuda attention: q_indices out of range");
    }
  }
#endif
}

// ---------------------------------------------------------------- forward

std::tuple<Tensor, Tensor, Tensor> cuda_attention_fwd(
    Tensor q, Tensor k, Tensor v, std::optional<Tensor> attn_mask,
    std::optional<Tensor> key_padding_mask, bool is_causal, double dropout_p, double scale,
    int64_t dropout_seed, bool keep_fp32_out, std::optional<Tensor> kv_num_blocks,
    std::optional<Tensor> kv_indices, std::optional<Tensor> q_num_blocks,
    std::optional<Tensor> q_indices, std::optional<Tensor> full_blocks,
    std::optional<Tensor> partial_index, std::optional<Tensor> partial_masks, int64_t block_q,
    int64_t block_k) {
  const Dims d = check_qkv(q, k, v);
  const cuda_host::DeviceGuard guard(q);
  const Tensor q16 = rows16(q), k16 = rows16(k), v16 = rows16(v);
  AttnParams p;
  Tensor mask_keep;
  set_qkv(p, d, q16, k16, v16, scale);
  set_mask(p, d, attn_mask, q, mask_keep);
  set_key_padding(p, d, key_padding_mask, q);
  p.causal = is_causal;
  set_dropout(p, dropout_p, dropout_seed);
  set_blocks(p, d,
             BlockArgs{kv_num_blocks, kv_indices, q_num_blocks, q_indices, full_blocks,
                       partial_index, partial_masks, block_q, block_k},
             q);

  Tensor out = torch::stable::new_empty(q, {d.B, d.Hq, d.Lq, d.Dv});
  Tensor lse = torch::stable::new_empty(q, {d.B, d.Hq, d.Lq}, ScalarType::Float);
  Tensor out_f32 = keep_fp32_out
                       ? torch::stable::new_empty(q, {d.B, d.Hq, d.Lq, d.Dv}, ScalarType::Float)
                       : torch::stable::new_empty(q, {0}, ScalarType::Float);
  if (d.B * d.Hq * d.Lq == 0) return {out, lse, out_f32};
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  p.out_f32 = keep_fp32_out ? out_f32.mutable_data_ptr<float>() : nullptr;
  launch_forward(p, d.dtype, d.dp, cuda_host::stream_of(q));
  return {out, lse, out_f32};
}

// ---------------------------------------------------------------- backward

std::tuple<Tensor, Tensor, Tensor> cuda_attention_bwd(
    Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
    std::optional<Tensor> grad_lse, std::optional<Tensor> attn_mask,
    std::optional<Tensor> key_padding_mask, bool is_causal, double dropout_p, double scale,
    int64_t dropout_seed, std::optional<Tensor> kv_num_blocks, std::optional<Tensor> kv_indices,
    std::optional<Tensor> q_num_blocks, std::optional<Tensor> q_indices,
    std::optional<Tensor> full_blocks, std::optional<Tensor> partial_index,
    std::optional<Tensor> partial_masks, int64_t block_q, int64_t block_k) {
  const Dims d = check_qkv(q, k, v);
  const cuda_host::DeviceGuard guard(q);
  const ScalarType st = q.scalar_type();
  const Shape out_shape{d.B, d.Hq, d.Lq, d.Dv}, row_shape{d.B, d.Hq, d.Lq};
  for (const Tensor* t : {&grad_out, &out}) {
    STD_TORCH_CHECK(cuda_host::same_device(*t, q) && same_shape(*t, out_shape) &&
                        (t->scalar_type() == st || t->scalar_type() == ScalarType::Float),
                    "cuda attention backward: grad_out and out must be ", kDeviceName,
                    " tensors (B, Hq, Lq, Dv) in q's dtype or float32");
  }
  STD_TORCH_CHECK(cuda_host::same_device(lse, q) && lse.scalar_type() == ScalarType::Float &&
                      same_shape(lse, row_shape),
                  "cuda attention backward: lse must be float32 (B, Hq, Lq)");
  if (grad_lse.has_value()) {
    STD_TORCH_CHECK(cuda_host::same_device(*grad_lse, q) && same_shape(*grad_lse, row_shape),
                    "cuda attention backward: grad_lse must be (B, Hq, Lq) on q's device");
  }
  const Tensor q16 = rows16(q), k16 = rows16(k), v16 = rows16(v);
  // dO rows are read with cp.async too: contiguous and 16-byte aligned.
  const Tensor dout = rows16(torch::stable::contiguous(
      grad_out.scalar_type() == st ? grad_out : torch::stable::to(grad_out, st)));
  const Tensor o = torch::stable::contiguous(out);
  const Tensor lse_c = torch::stable::contiguous(lse);
  std::optional<Tensor> glse;
  if (grad_lse.has_value()) {
    glse = torch::stable::contiguous(grad_lse->scalar_type() == ScalarType::Float
                                         ? *grad_lse
                                         : torch::stable::to(*grad_lse, ScalarType::Float));
  }

  AttnParams p;
  Tensor mask_keep;
  set_qkv(p, d, q16, k16, v16, scale);
  set_mask(p, d, attn_mask, q, mask_keep);
  set_key_padding(p, d, key_padding_mask, q);
  p.causal = is_causal;
  set_dropout(p, dropout_p, dropout_seed);
  set_blocks(p, d,
             BlockArgs{kv_num_blocks, kv_indices, q_num_blocks, q_indices, full_blocks,
                       partial_index, partial_masks, block_q, block_k},
             q);

  Tensor dq = torch::stable::new_empty(q, {d.B, d.Hq, d.Lq, d.D});
  Tensor dk = torch::stable::new_empty(q, {d.B, d.Hkv, d.Lk, d.D});
  Tensor dv = torch::stable::new_empty(q, {d.B, d.Hkv, d.Lk, d.Dv});
  Tensor delta = torch::stable::new_empty(q, row_shape, ScalarType::Float);
  if (d.B * d.Hq == 0) return {dq, dk, dv};
  p.dout = dout.const_data_ptr();
  p.o = o.const_data_ptr();
  p.o_f32 = o.scalar_type() == ScalarType::Float;
  p.lse = const_cast<float*>(lse_c.const_data_ptr<float>());
  p.grad_lse = glse.has_value() ? glse->const_data_ptr<float>() : nullptr;
  p.delta = delta.mutable_data_ptr<float>();
  p.dq = dq.mutable_data_ptr();
  p.dk = dk.mutable_data_ptr();
  p.dv = dv.mutable_data_ptr();
  launch_backward(p, d.dtype, d.dp, cuda_host::stream_of(q));
  return {dq, dk, dv};
}

}  // namespace
}  // namespace mmattn::attn_cuda

MMATTN_CUDA_FRAGMENT(m) {
  // FlashAttention-2-style fused attention on tensor cores (float16/bfloat16).
  // Shapes and mask conventions as mmattn.cross_attention; attn_mask arrives
  // expanded to (B, Hq, Lq, Lk); the seven block-mask tensors are
  // mmattn.BlockMask's compressed fields (all given or all None), block sizes
  // multiples of 64. Returns out (B, Hq, Lq, Dv) in q's dtype, lse (B, Hq, Lq)
  // float32 (+inf for rows with no visible key) and, with keep_fp32_out, out in
  // float32 (else an empty tensor).
  m.def(
      "cuda_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, "
      "Tensor? key_padding_mask, bool is_causal, float dropout_p, float scale, "
      "int dropout_seed, bool keep_fp32_out, Tensor? kv_num_blocks, Tensor? kv_indices, "
      "Tensor? q_num_blocks, Tensor? q_indices, Tensor? full_blocks, Tensor? partial_index, "
      "Tensor? partial_masks, int block_q, int block_k) -> (Tensor, Tensor, Tensor)");
  // Gradients (dq, dk, dv), contiguous, in q's dtype, dk/dv summed over each GQA
  // group; `out` may be the float32 output; grad_lse (B, Hq, Lq) enters as
  // delta = rowsum(dO * O) - grad_lse. Deterministic: no atomics.
  m.def(
      "cuda_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor? grad_lse, Tensor? attn_mask, Tensor? key_padding_mask, "
      "bool is_causal, float dropout_p, float scale, int dropout_seed, "
      "Tensor? kv_num_blocks, Tensor? kv_indices, Tensor? q_num_blocks, Tensor? q_indices, "
      "Tensor? full_blocks, Tensor? partial_index, Tensor? partial_masks, int block_q, "
      "int block_k) -> (Tensor, Tensor, Tensor)");
}

MMATTN_CUDA_IMPL(m) {
  m.impl("cuda_attention_fwd", TORCH_BOX(&mmattn::attn_cuda::cuda_attention_fwd));
  m.impl("cuda_attention_bwd", TORCH_BOX(&mmattn::attn_cuda::cuda_attention_bwd));
}
