// Fused attention on CPU: op schemas, launchers and the run-time ISA choice.
//
//   mmattn::fused_attention_fwd -> (out, lse, weights, out_fp32)
//   mmattn::fused_attention_bwd -> (dq, dk, dv)
//   mmattn::attention_cpu_isa   -> name of the kernel build a call would use
//
// The launchers check their arguments, bring q/k/v (and dout/out) to float32
// with unit stride along the head dimension (a no-op for float32 inputs with
// that layout: other strides, e.g. (B, L, H, D) views, are read in place),
// describe masks by strides (broadcast masks are never materialised), run the
// kernels of attention_cpu_impl.h on torch's thread pool and convert results
// back to the input dtype. Semantics: mmattn/reference.py.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../stable_utils.h"
#include "attention_cpu.h"

namespace mmattn::attn_cpu {
namespace {

using torch::stable::Tensor;
using Shape = std::vector<int64_t>;

// ---------------------------------------------------------------- ISA choice

bool cpu_has(const char* feature) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (std::strcmp(feature, "avx512") == 0) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma");
  }
  if (std::strcmp(feature, "avx2") == 0) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
#endif
  (void)feature;
  return false;
}

const KernelSet* best_kernels() {
  static const KernelSet* best = [] {
    if (kernels_avx512() != nullptr && cpu_has("avx512")) return kernels_avx512();
    if (kernels_avx2() != nullptr && cpu_has("avx2")) return kernels_avx2();
    return kernels_generic();
  }();
  return best;
}

// MMATTN_CPU_ISA=avx512|avx2|generic forces a build (tests use it to cover the
// fallbacks); unset or "auto" picks the best one the CPU supports.
const KernelSet& kernels() {
  const char* env = std::getenv("MMATTN_CPU_ISA");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return *best_kernels();
  if (std::strcmp(env, "generic") == 0) return *kernels_generic();
  if (std::strcmp(env, "avx2") == 0 || std::strcmp(env, "avx512") == 0) {
    const KernelSet* set = std::strcmp(env, "avx2") == 0 ? kernels_avx2() : kernels_avx512();
    STD_TORCH_CHECK(set != nullptr && cpu_has(env), "MMATTN_CPU_ISA=", env,
                    ": this CPU or this build of mmattn._C lacks that instruction set");
    return *set;
  }
  STD_TORCH_CHECK(false, "MMATTN_CPU_ISA must be auto, avx512, avx2 or generic, got '", env, "'");
  return *best_kernels();
}

// Runs worker(next) on every thread of torch's pool; workers pull items from
// the shared counter until it passes the item count.
template <class Worker>
void run_workers(int64_t num_items, const Worker& worker) {
  if (num_items <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads =
      std::max<int64_t>(1, std::min<int64_t>(torch::stable::get_num_threads(), num_items));
  torch::stable::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) worker(&next);
  });
}

// ---------------------------------------------------------------- memory

// Large outputs are fresh memory: first-touch page faults cost about as much
// as writing them (here ~0.4 ms per MB, e.g. 12 ms for the 32 MB weights of
// B4 H8 Lq256 Lk1024). Asking for transparent huge pages before the first
// write makes that one fault per 2 MB. A hint only: memory that is already
// mapped, or a kernel without THP, is unaffected.
void advise_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
  if (bytes < 2 * kHuge) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + bytes) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// A new float32 tensor for a kernel output, huge-page advised before its first
// write, zero-filled when asked.
Tensor new_output(const Tensor& like, const std::vector<int64_t>& shape, bool zero) {
  Tensor t = torch::stable::new_empty(like, shape, ScalarType::Float);
  advise_huge_pages(t);
  if (zero) torch::stable::zero_(t);
  return t;
}

// ---------------------------------------------------------------- arguments

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

bool is_kernel_dtype(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::BFloat16 || t == ScalarType::Half;
}

// float32 with unit stride on the last dimension; other strides are kept.
Tensor as_float_rows(const Tensor& t) {
  Tensor out = t.scalar_type() == ScalarType::Float ? t : torch::stable::to(t, ScalarType::Float);
  if (out.dim() > 0 && out.size(-1) > 1 && out.stride(-1) != 1) {
    out = torch::stable::contiguous(out);
  }
  return out;
}

struct Dims {
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
};

Dims check_qkv(const Tensor& q, const Tensor& k, const Tensor& v) {
  const char* names[3] = {"q", "k", "v"};
  const Tensor* ts[3] = {&q, &k, &v};
  for (int i = 0; i < 3; ++i) {
    STD_TORCH_CHECK(ts[i]->dim() == 4, "fused attention: ", names[i],
                    " must be 4-D (batch, heads, length, head_dim), got ", ts[i]->dim(), " dims");
    STD_TORCH_CHECK(ts[i]->is_cpu(), "fused attention (CPU kernel): ", names[i],
                    " must be a CPU tensor");
    STD_TORCH_CHECK(is_kernel_dtype(ts[i]->scalar_type()), "fused attention (CPU kernel): ",
                    names[i], " is ", dtype_name(ts[i]->scalar_type()),
                    "; supported: float32, bfloat16, float16");
  }
  STD_TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                  "fused attention: q, k and v must share one dtype");
  Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  STD_TORCH_CHECK(k.size(0) == d.B && v.size(0) == d.B, "fused attention: batch sizes differ");
  STD_TORCH_CHECK(v.size(1) == d.Hkv, "fused attention: k and v head counts differ");
  STD_TORCH_CHECK(d.Hkv > 0 && d.Hq % d.Hkv == 0, "fused attention: query heads (", d.Hq,
                  ") must be a multiple of key/value heads (", d.Hkv, ")");
  STD_TORCH_CHECK(v.size(2) == d.Lk, "fused attention: k and v lengths differ");
  STD_TORCH_CHECK(k.size(3) == d.D, "fused attention: q and k head_dim differ");
  STD_TORCH_CHECK(d.D > 0, "fused attention: head_dim must be at least 1");
  return d;
}

MaskView make_mask_view(const std::optional<Tensor>& mask, const Dims& d) {
  MaskView view;
  if (!mask.has_value()) return view;
  const Tensor& m = *mask;
  STD_TORCH_CHECK(m.is_cpu(), "fused attention: attn_mask must be a CPU tensor");
  STD_TORCH_CHECK(m.dim() == 4, "fused attention: attn_mask must be 4-D, broadcastable to "
                  "(B, Hq, Lq, Lk) (expand it), got ", m.dim(), " dims");
  switch (m.scalar_type()) {
    case ScalarType::Bool: view.kind = MaskKind::Bool; break;
    case ScalarType::Float: view.kind = MaskKind::Float32; break;
    case ScalarType::Double: view.kind = MaskKind::Float64; break;
    case ScalarType::BFloat16: view.kind = MaskKind::BFloat16; break;
    case ScalarType::Half: view.kind = MaskKind::Float16; break;
    default:
      STD_TORCH_CHECK(false, "fused attention: attn_mask must be bool or floating point, got ",
                      dtype_name(m.scalar_type()));
  }
  const int64_t target[4] = {d.B, d.Hq, d.Lq, d.Lk};
  int64_t strides[4];
  for (int i = 0; i < 4; ++i) {
    STD_TORCH_CHECK(m.size(i) == target[i] || m.size(i) == 1, "fused attention: attn_mask "
                    "dimension ", i, " has size ", m.size(i), ", which does not broadcast to ",
                    target[i]);
    strides[i] = m.size(i) == 1 ? 0 : m.stride(i);
  }
  view.data = m.const_data_ptr();
  view.sb = strides[0];
  view.sh = strides[1];
  view.si = strides[2];
  view.sj = strides[3];
  return view;
}

void set_key_padding(Problem& p, const std::optional<Tensor>& kpm) {
  if (!kpm.has_value()) return;
  const Tensor& t = *kpm;
  STD_TORCH_CHECK(t.is_cpu() && t.scalar_type() == ScalarType::Bool && t.dim() == 2 &&
                      t.size(0) == p.B && t.size(1) == p.Lk,
                  "fused attention: key_padding_mask must be a CPU bool tensor of shape (B, Lk) = (",
                  p.B, ", ", p.Lk, ")");
  p.kpm = static_cast<const uint8_t*>(t.const_data_ptr());
  p.kpm_sb = t.stride(0);
  p.kpm_sj = t.stride(1);
}

void set_dropout(Problem& p, double dropout_p, int64_t seed) {
  STD_TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0,
                  "fused attention: dropout_p must be in [0, 1], got ", dropout_p);
  if (dropout_p <= 0.0) return;
  p.dropout = true;
  // Matches the reference: `uniform >= p` compares in float32, and kept
  // elements are multiplied by the float32 value of 1 / (1 - p).
  p.keep_threshold = static_cast<float>(dropout_p);
  p.drop_scale = dropout_p >= 1.0 ? 0.0f : static_cast<float>(1.0 / (1.0 - dropout_p));
  p.seed = static_cast<uint64_t>(seed);
}

// The compressed BlockMask tensors (see mmattn.BlockMask); all or none given.
struct BlockArgs {
  std::optional<Tensor> kv_num, kv_idx, q_num, q_idx, full, partial_index, partial_masks;
  int64_t bq = 0, bk = 0;
  Tensor partial_t;  // keeps the transposed partial masks alive
};

void set_blocks(Problem& p, BlockArgs& a) {
  const bool any = a.kv_num || a.kv_idx || a.q_num || a.q_idx || a.full || a.partial_index ||
                   a.partial_masks;
  if (!any) return;
  STD_TORCH_CHECK(a.kv_num && a.kv_idx && a.q_num && a.q_idx && a.full && a.partial_index &&
                      a.partial_masks,
                  "fused attention: the block mask needs all of kv_num_blocks, kv_indices, "
                  "q_num_blocks, q_indices, full_blocks, partial_index and partial_masks");
  STD_TORCH_CHECK(a.bq > 0 && a.bk > 0, "fused attention: block sizes must be positive, got (",
                  a.bq, ", ", a.bk, ")");
  BlockView& bv = p.blocks;
  bv.present = true;
  bv.bq = a.bq;
  bv.bk = a.bk;
  bv.nbq = (p.Lq + a.bq - 1) / a.bq;
  bv.nbk = (p.Lk + a.bk - 1) / a.bk;
  const Tensor& layout = *a.full;
  STD_TORCH_CHECK(layout.dim() == 4, "fused attention: full_blocks must be (Bm, Hm, nbq, nbk)");
  bv.Bm = layout.size(0);
  bv.Hm = layout.size(1);
  STD_TORCH_CHECK((bv.Bm == 1 || bv.Bm == p.B) && (bv.Hm == 1 || bv.Hm == p.Hq),
                  "fused attention: block mask leading dims (", bv.Bm, ", ", bv.Hm,
                  ") must be (1 or B, 1 or Hq) = (", p.B, ", ", p.Hq, ")");
  auto check = [&](const Tensor& t, const char* name, ScalarType dtype, Shape shape) {
    STD_TORCH_CHECK(t.is_cpu() && t.scalar_type() == dtype && t.is_contiguous(),
                    "fused attention: block mask ", name, " must be a contiguous CPU ",
                    dtype_name(dtype), " tensor");
    bool same = t.dim() == static_cast<int64_t>(shape.size());
    for (size_t i = 0; same && i < shape.size(); ++i) same = t.size(i) == shape[i];
    STD_TORCH_CHECK(same, "fused attention: block mask ", name, " has the wrong shape for "
                    "(Lq, Lk) = (", p.Lq, ", ", p.Lk, ") and blocks (", a.bq, ", ", a.bk, ")");
  };
  check(*a.kv_num, "kv_num_blocks", ScalarType::Int, {bv.Bm, bv.Hm, bv.nbq});
  check(*a.kv_idx, "kv_indices", ScalarType::Int, {bv.Bm, bv.Hm, bv.nbq, bv.nbk});
  check(*a.q_num, "q_num_blocks", ScalarType::Int, {bv.Bm, bv.Hm, bv.nbk});
  check(*a.q_idx, "q_indices", ScalarType::Int, {bv.Bm, bv.Hm, bv.nbk, bv.nbq});
  check(*a.full, "full_blocks", ScalarType::Bool, {bv.Bm, bv.Hm, bv.nbq, bv.nbk});
  check(*a.partial_index, "partial_index", ScalarType::Int, {bv.Bm, bv.Hm, bv.nbq, bv.nbk});
  const Tensor& pm = *a.partial_masks;
  // Partial masks cover the first (pq, pk) <= (bq, bk) positions of a block; mmattn.BlockMask
  // stores (min(bq, Lq), min(bk, Lk)). Positions past them are not visible.
  STD_TORCH_CHECK(pm.is_cpu() && pm.scalar_type() == ScalarType::Bool && pm.dim() == 3 &&
                      pm.size(1) <= a.bq && pm.size(2) <= a.bk,
                  "fused attention: partial_masks must be a CPU bool tensor (P, pq, pk) with "
                  "pq <= bq and pk <= bk");
  bv.kv_num = a.kv_num->const_data_ptr<int32_t>();
  bv.kv_idx = a.kv_idx->const_data_ptr<int32_t>();
  bv.q_num = a.q_num->const_data_ptr<int32_t>();
  bv.q_idx = a.q_idx->const_data_ptr<int32_t>();
  bv.full = static_cast<const uint8_t*>(a.full->const_data_ptr());
  bv.partial_index = a.partial_index->const_data_ptr<int32_t>();
  // Score tiles hold key rows of query lanes, so partial masks are read as (P, pk, pq),
  // pq = min(bq, Lq) and pk = min(bk, Lk): every position a tile of a block can reach.
  bv.pq = std::min(a.bq, p.Lq);
  bv.pk = std::min(a.bk, p.Lk);
  const int64_t num_masks = pm.size(0), pm_q = pm.size(1), pm_k = pm.size(2);
  if (pm_q == bv.pq && pm_k == bv.pk) {
    a.partial_t = torch::stable::contiguous(torch::stable::transpose(pm, 1, 2));
  } else {  // another extent: the part inside (pq, pk), False around it
    const Tensor src = torch::stable::contiguous(pm);
    a.partial_t = torch::stable::new_empty(pm, {num_masks, bv.pk, bv.pq});
    torch::stable::zero_(a.partial_t);
    const uint8_t* from = static_cast<const uint8_t*>(src.const_data_ptr());
    uint8_t* to = static_cast<uint8_t*>(a.partial_t.mutable_data_ptr());
    const int64_t rows = std::min(pm_q, bv.pq), cols = std::min(pm_k, bv.pk);
    for (int64_t m = 0; m < num_masks; ++m) {
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < cols; ++j) {
          to[(m * bv.pk + j) * bv.pq + i] = from[(m * pm_q + i) * pm_k + j];
        }
      }
    }
  }
  bv.partial_t = static_cast<const uint8_t*>(a.partial_t.const_data_ptr());
  // Indices are trusted by the kernels; check their range once here (cheap:
  // O(number of blocks), not O(Lq x Lk)).
  const int64_t heads = bv.Bm * bv.Hm;
  const int64_t num_partial = pm.size(0);
  for (int64_t c = 0; c < heads * bv.nbq * bv.nbk; ++c) {
    STD_TORCH_CHECK(bv.partial_index[c] < num_partial && bv.partial_index[c] >= -1,
                    "fused attention: block mask partial_index out of range");
  }
  for (int64_t r = 0; r < heads * bv.nbq; ++r) {
    STD_TORCH_CHECK(bv.kv_num[r] >= 0 && bv.kv_num[r] <= bv.nbk,
                    "fused attention: block mask kv_num_blocks out of range");
    for (int64_t n = 0; n < bv.kv_num[r]; ++n) {
      const int32_t kb = bv.kv_idx[r * bv.nbk + n];
      STD_TORCH_CHECK(kb >= 0 && kb < bv.nbk, "fused attention: block mask kv_indices out of range");
    }
  }
  for (int64_t c = 0; c < heads * bv.nbk; ++c) {
    STD_TORCH_CHECK(bv.q_num[c] >= 0 && bv.q_num[c] <= bv.nbq,
                    "fused attention: block mask q_num_blocks out of range");
    for (int64_t n = 0; n < bv.q_num[c]; ++n) {
      const int32_t qb = bv.q_idx[c * bv.nbq + n];
      STD_TORCH_CHECK(qb >= 0 && qb < bv.nbq, "fused attention: block mask q_indices out of range");
    }
  }
}

void set_qkv(Problem& p, const Dims& d, const Tensor& q, const Tensor& k, const Tensor& v,
             double scale) {
  p.B = d.B;
  p.Hq = d.Hq;
  p.Hkv = d.Hkv;
  p.Lq = d.Lq;
  p.Lk = d.Lk;
  p.D = d.D;
  p.Dv = d.Dv;
  p.q = q.const_data_ptr<float>();
  p.k = k.const_data_ptr<float>();
  p.v = v.const_data_ptr<float>();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sl = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sl = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sl = v.stride(2);
  STD_TORCH_CHECK(std::isfinite(scale), "fused attention: scale must be finite");
  p.scale = static_cast<float>(scale);
}

// Everything the forward and backward launchers describe alike. `blocks` must
// outlive the kernels: it keeps the transposed partial masks alive.
void set_problem(Problem& p, const Dims& d, const Tensor& q, const Tensor& k, const Tensor& v,
                 double scale, const std::optional<Tensor>& attn_mask,
                 const std::optional<Tensor>& key_padding_mask, bool is_causal,
                 double dropout_p, int64_t dropout_seed, BlockArgs& blocks) {
  set_qkv(p, d, q, k, v, scale);
  p.mask = make_mask_view(attn_mask, d);
  set_key_padding(p, key_padding_mask);
  p.causal = is_causal;
  set_dropout(p, dropout_p, dropout_seed);
  set_blocks(p, blocks);
}

Tensor to_dtype(const Tensor& t, ScalarType dtype) {
  return t.scalar_type() == dtype ? t : torch::stable::to(t, dtype);
}

// ---------------------------------------------------------------- forward

// Runs the forward kernels on F, whose problem, out and lse (and weights, if any) are
// set: the split-KV plan, the work items on torch's pool, the merge of the splits.
void run_forward(ForwardParams& F) {
  const Problem& p = F.p;
  plan_splits(F);
  // Split-KV state, (splits, rows, Dv + 2) = O, m, l: splits happen only with few
  // query tiles, so this is small (a plain vector: no tensor call per decoding step).
  std::vector<float> partials;
  const int64_t rows = p.B * p.Hq * p.Lq;
  if (F.splits > 1) {
    partials.resize(static_cast<size_t>(F.splits * rows * (p.Dv + 2)));
    F.part_o = partials.data();
    F.part_m = F.part_o + F.splits * rows * p.Dv;
    F.part_l = F.part_m + F.splits * rows;
  }
  const KernelSet& ks = kernels();
  run_workers(F.num_items(), [&](std::atomic<int64_t>* next) { ks.forward_worker(F, next); });
  if (F.splits > 1) {
    // Merging costs O(splits * rows * Dv): serial unless there is real work in it
    // (waking the thread pool costs microseconds, as much as a decoding step's merge).
    if (F.splits * rows * p.Dv < (int64_t{1} << 16)) {
      ks.forward_merge(F, 0, rows);
    } else {
      torch::stable::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        ks.forward_merge(F, begin, end);
      });
    }
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_attention_fwd_cpu(
    Tensor q, Tensor k, Tensor v, std::optional<Tensor> attn_mask,
    std::optional<Tensor> key_padding_mask, bool is_causal, double dropout_p, double scale,
    int64_t dropout_seed, bool return_weights, std::optional<Tensor> kv_num_blocks,
    std::optional<Tensor> kv_indices, std::optional<Tensor> q_num_blocks,
    std::optional<Tensor> q_indices, std::optional<Tensor> full_blocks,
    std::optional<Tensor> partial_index, std::optional<Tensor> partial_masks, int64_t block_q,
    int64_t block_k, bool keep_fp32_out) {
  const Dims d = check_qkv(q, k, v);
  const ScalarType dtype = q.scalar_type();
  const Tensor qf = as_float_rows(q), kf = as_float_rows(k), vf = as_float_rows(v);

  ForwardParams F;
  Problem& p = F.p;
  BlockArgs blocks{kv_num_blocks, kv_indices, q_num_blocks, q_indices, full_blocks,
                   partial_index, partial_masks, block_q, block_k, Tensor()};
  set_problem(p, d, qf, kf, vf, scale, attn_mask, key_padding_mask, is_causal, dropout_p,
              dropout_seed, blocks);

  Tensor out = new_output(qf, Shape{d.B, d.Hq, d.Lq, d.Dv}, false);
  Tensor lse = torch::stable::new_empty(qf, Shape{d.B, d.Hq, d.Lq}, ScalarType::Float);
  Tensor weights;
  if (return_weights) {
    // Key tiles that are skipped (causal, empty blocks) leave their weights at 0.
    weights = new_output(qf, Shape{d.B, d.Hq, d.Lq, d.Lk}, p.causal || p.blocks.present);
  }
  if (d.Lk == 0) {
    torch::stable::zero_(out);
    torch::stable::fill_(lse, INFINITY);
  } else if (d.B * d.Hq * d.Lq > 0) {
    F.out = out.mutable_data_ptr<float>();
    F.lse = lse.mutable_data_ptr<float>();
    F.weights = return_weights ? weights.mutable_data_ptr<float>() : nullptr;
    run_forward(F);
  }
  Tensor weights_out = return_weights ? to_dtype(weights, dtype)
                                      : torch::stable::new_empty(q, Shape{0});
  // The kernels' float32 output before rounding, for the backward's rowsum(dO * O)
  // (rounding O to half precision first costs dq its accuracy, issue 11).
  const bool keep = keep_fp32_out && dtype != ScalarType::Float;
  Tensor out_fp32 = keep ? out : torch::stable::new_empty(q, Shape{0});
  return {to_dtype(out, dtype), lse, weights_out, out_fp32};
}

// fused_attention_fwd without dropout, weights, block mask or lse: the output alone, for
// calls no backward follows. Same kernels, same bits; it saves the op what a decoding
// step notices (13 arguments to convert, three tensors to allocate and return).
Tensor fused_attention_infer_cpu(Tensor q, Tensor k, Tensor v, std::optional<Tensor> attn_mask,
                                 std::optional<Tensor> key_padding_mask, bool is_causal,
                                 double scale) {
  const Dims d = check_qkv(q, k, v);
  const ScalarType dtype = q.scalar_type();
  const Tensor qf = as_float_rows(q), kf = as_float_rows(k), vf = as_float_rows(v);

  ForwardParams F;
  BlockArgs blocks{};
  set_problem(F.p, d, qf, kf, vf, scale, attn_mask, key_padding_mask, is_causal, 0.0, 0,
              blocks);
  Tensor out = new_output(qf, Shape{d.B, d.Hq, d.Lq, d.Dv}, false);
  const int64_t rows = d.B * d.Hq * d.Lq;
  if (d.Lk == 0) {
    torch::stable::zero_(out);
  } else if (rows > 0) {
    std::vector<float> lse(static_cast<size_t>(rows));
    F.out = out.mutable_data_ptr<float>();
    F.lse = lse.data();
    run_forward(F);
  }
  return to_dtype(out, dtype);
}

// ---------------------------------------------------------------- backward

std::tuple<Tensor, Tensor, Tensor> fused_attention_bwd_cpu(
    Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
    std::optional<Tensor> attn_mask, std::optional<Tensor> key_padding_mask, bool is_causal,
    double dropout_p, double scale, int64_t dropout_seed, std::optional<Tensor> kv_num_blocks,
    std::optional<Tensor> kv_indices, std::optional<Tensor> q_num_blocks,
    std::optional<Tensor> q_indices, std::optional<Tensor> full_blocks,
    std::optional<Tensor> partial_index, std::optional<Tensor> partial_masks, int64_t block_q,
    int64_t block_k, std::optional<Tensor> grad_lse) {
  const Dims d = check_qkv(q, k, v);
  const ScalarType dtype = q.scalar_type();
  const Shape out_shape{d.B, d.Hq, d.Lq, d.Dv};
  for (const Tensor* t : {&grad_out, &out}) {
    bool same = t->dim() == 4;
    for (int i = 0; same && i < 4; ++i) same = t->size(i) == out_shape[i];
    STD_TORCH_CHECK(same && t->is_cpu() && is_kernel_dtype(t->scalar_type()),
                    "fused attention backward: grad_out and out must be CPU float tensors of "
                    "shape (B, Hq, Lq, Dv)");
  }
  STD_TORCH_CHECK(lse.is_cpu() && lse.scalar_type() == ScalarType::Float && lse.dim() == 3 &&
                      lse.size(0) == d.B && lse.size(1) == d.Hq && lse.size(2) == d.Lq,
                  "fused attention backward: lse must be float32 (B, Hq, Lq)");
  const Tensor qf = as_float_rows(q), kf = as_float_rows(k), vf = as_float_rows(v);
  const Tensor gf = as_float_rows(grad_out), of = as_float_rows(out);
  const Tensor lse_c = torch::stable::contiguous(lse);
  Tensor grad_lse_c;
  if (grad_lse.has_value()) {
    const Tensor& g = *grad_lse;
    STD_TORCH_CHECK(g.is_cpu() && g.dim() == 3 && g.size(0) == d.B && g.size(1) == d.Hq &&
                        g.size(2) == d.Lq && is_kernel_dtype(g.scalar_type()),
                    "fused attention backward: grad_lse must be a CPU float tensor (B, Hq, Lq)");
    grad_lse_c = torch::stable::contiguous(to_dtype(g, ScalarType::Float));
  }

  BackwardParams G;
  Problem& p = G.p;
  BlockArgs blocks{kv_num_blocks, kv_indices, q_num_blocks, q_indices, full_blocks,
                   partial_index, partial_masks, block_q, block_k, Tensor()};
  set_problem(p, d, qf, kf, vf, scale, attn_mask, key_padding_mask, is_causal, dropout_p,
              dropout_seed, blocks);

  // Items are (b, kv head, chunk of keys); the keys are split when there are
  // fewer than kBwdTargetItems (b, kv head) pairs. Each chunk needs its own dq
  // accumulator (summed below, in chunk order), so chunks stay few and their
  // memory bounded. The split depends on the shape only, never on the thread
  // count: gradients are the same bits for any number of threads.
  const int64_t pairs = std::max<int64_t>(1, d.B * d.Hkv);
  const int64_t dq_numel = std::max<int64_t>(1, d.B * d.Hq * d.Lq * d.D);
  int64_t chunks = (kBwdTargetItems + pairs - 1) / pairs;
  chunks = std::min({chunks, G.key_units(), std::max<int64_t>(1, kBwdChunkFloats / dq_numel)});
  chunks = std::max<int64_t>(1, chunks);
  G.num_chunks = chunks;

  Tensor dq_acc = new_output(qf, Shape{chunks, d.B, d.Hq, d.Lq, d.D}, true);
  Tensor dq_err = new_output(qf, Shape{chunks, d.B, d.Hq, d.Lq, d.D}, true);
  Tensor dk = new_output(qf, Shape{d.B, d.Hkv, d.Lk, d.D}, true);
  Tensor dv = new_output(qf, Shape{d.B, d.Hkv, d.Lk, d.Dv}, true);
  if (d.B * d.Hq * d.Lq > 0 && d.Lk > 0) {
    G.dout = gf.const_data_ptr<float>();
    G.do_sb = gf.stride(0), G.do_sh = gf.stride(1), G.do_sl = gf.stride(2);
    G.out = of.const_data_ptr<float>();
    G.o_sb = of.stride(0), G.o_sh = of.stride(1), G.o_sl = of.stride(2);
    G.lse = lse_c.const_data_ptr<float>();
    G.grad_lse = grad_lse.has_value() ? grad_lse_c.const_data_ptr<float>() : nullptr;
    // Lanes of a query tile may run up to W - 1 past Lq: pad by 16 (zeros).
    G.lq_pad = (d.Lq + 16 + 15) / 16 * 16;
    Tensor q_t = new_output(qf, Shape{d.B * d.Hq, d.D, G.lq_pad}, false);
    Tensor do_t = new_output(qf, Shape{d.B * d.Hq, std::max<int64_t>(d.Dv, 1), G.lq_pad}, false);
    Tensor delta = torch::stable::new_empty(qf, Shape{d.B * d.Hq, d.Lq}, ScalarType::Float);
    Tensor lam = torch::stable::new_empty(qf, Shape{d.B * d.Hq, d.Lq}, ScalarType::Float);
    G.q_t = q_t.mutable_data_ptr<float>();
    G.do_t = do_t.mutable_data_ptr<float>();
    G.delta = delta.mutable_data_ptr<float>();
    G.lam = lam.mutable_data_ptr<float>();
    G.dq = dq_acc.mutable_data_ptr<float>();
    G.dq_err = dq_err.mutable_data_ptr<float>();
    G.dk = dk.mutable_data_ptr<float>();
    G.dv = dv.mutable_data_ptr<float>();
    const KernelSet& ks = kernels();
    torch::stable::parallel_for(0, d.B * d.Hq, 1, [&](int64_t begin, int64_t end) {
      ks.backward_prepare(G, begin, end);
    });
    run_workers(G.num_stat_items(),
                [&](std::atomic<int64_t>* next) { ks.backward_stats(G, next); });
    run_workers(G.num_items(), [&](std::atomic<int64_t>* next) { ks.backward_worker(G, next); });
  }
  Tensor dq = torch::stable::select(dq_acc, 0, 0);
  if (chunks > 1) {
    // dq = sum of the chunks' accumulators in chunk order (each element by one task).
    dq = torch::stable::new_empty(qf, Shape{d.B, d.Hq, d.Lq, d.D}, ScalarType::Float);
    const float* acc = dq_acc.const_data_ptr<float>();
    float* sum = dq.mutable_data_ptr<float>();
    const int64_t n = d.B * d.Hq * d.Lq * d.D;
    torch::stable::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
      std::copy(acc + begin, acc + end, sum + begin);
      for (int64_t c = 1; c < chunks; ++c) {
        const float* part = acc + c * n;
        for (int64_t e = begin; e < end; ++e) sum[e] += part[e];
      }
    });
  }
  return {to_dtype(dq, dtype), to_dtype(dk, dtype), to_dtype(dv, dtype)};
}

std::string attention_cpu_isa() { return kernels().name; }

// Test hook: the active build's dropout keep-mask for counters base[n] + lane * step,
// (N, lanes) bool, so tests can check lanes that straddle a 2**32 boundary of the
// 64-bit flat index against mmattn.philox.
Tensor attention_cpu_dropout_keep(Tensor base, int64_t step, int64_t seed, int64_t counter1,
                                  double dropout_p) {
  STD_TORCH_CHECK(base.is_cpu() && base.scalar_type() == ScalarType::Long && base.dim() == 1,
                  "attention_cpu_dropout_keep: base must be a 1-D CPU int64 tensor");
  const KernelSet& ks = kernels();
  const Tensor b = torch::stable::contiguous(base);
  Tensor keep = torch::stable::new_empty(b, Shape{b.size(0), ks.lanes}, ScalarType::Bool);
  const int64_t* src = b.const_data_ptr<int64_t>();
  uint8_t* dst = static_cast<uint8_t*>(keep.mutable_data_ptr());
  for (int64_t n = 0; n < b.size(0); ++n) {
    ks.dropout_lanes(static_cast<uint64_t>(seed), static_cast<uint64_t>(src[n]),
                     static_cast<uint64_t>(step), static_cast<uint32_t>(counter1),
                     static_cast<float>(dropout_p), dst + n * ks.lanes);
  }
  return keep;
}

}  // namespace
}  // namespace mmattn::attn_cpu

STABLE_TORCH_LIBRARY_FRAGMENT(mmattn, m) {
  // Fused attention (CPU kernels here; other devices may register later).
  // Shapes: q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv); masks as in
  // mmattn.cross_attention (attn_mask 4-D broadcastable, key_padding_mask
  // (B, Lk) True = pad); the block-mask tensors are mmattn.BlockMask's
  // compressed fields (all given or all None) with block sizes block_q, block_k.
  // Returns out (B, Hq, Lq, Dv) in q's dtype, lse (B, Hq, Lq) float32 (+inf for
  // rows with no visible key), weights (B, Hq, Lq, Lk) or an empty tensor, and
  // out_fp32: with keep_fp32_out and half-precision q the float32 output before
  // rounding (B, Hq, Lq, Dv), else an empty tensor.
  m.def(
      "fused_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, "
      "Tensor? key_padding_mask, bool is_causal, float dropout_p, float scale, "
      "int dropout_seed, bool return_weights, Tensor? kv_num_blocks, Tensor? kv_indices, "
      "Tensor? q_num_blocks, Tensor? q_indices, Tensor? full_blocks, Tensor? partial_index, "
      "Tensor? partial_masks, int block_q, int block_k, bool keep_fp32_out=False) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // fused_attention_fwd's out alone, for calls without dropout, weights, block mask,
  // lse or a backward (fewer arguments and outputs: a decoding step's overhead).
  m.def(
      "fused_attention_infer(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, "
      "Tensor? key_padding_mask, bool is_causal, float scale) -> Tensor");
  // Gradients (dq, dk, dv) from the forward's out and lse; dropout regenerates
  // the forward's Philox mask from the same seed. `out` may be float32 for half
  // inputs (the forward's out_fp32); grad_lse (B, Hq, Lq), the gradient flowing
  // into lse, or None.
  m.def(
      "fused_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor? attn_mask, Tensor? key_padding_mask, bool is_causal, "
      "float dropout_p, float scale, int dropout_seed, Tensor? kv_num_blocks, "
      "Tensor? kv_indices, Tensor? q_num_blocks, Tensor? q_indices, Tensor? full_blocks, "
      "Tensor? partial_index, Tensor? partial_masks, int block_q, int block_k, "
      "Tensor? grad_lse=None) -> (Tensor, Tensor, Tensor)");
  // Which kernel build (avx512, avx2, generic) the CPU attention ops use now.
  m.def("attention_cpu_isa() -> str");
  // Test hook: keep-mask (N, lanes) of the active build's vectorised dropout for the
  // counters base[n] + lane * step; counter1 = b * H + h, p the dropout probability.
  m.def("attention_cpu_dropout_keep(Tensor base, int step, int seed, int counter1, float p) "
        "-> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(mmattn, CPU, m) {
  m.impl("fused_attention_fwd", TORCH_BOX(&mmattn::attn_cpu::fused_attention_fwd_cpu));
  m.impl("fused_attention_infer", TORCH_BOX(&mmattn::attn_cpu::fused_attention_infer_cpu));
  m.impl("fused_attention_bwd", TORCH_BOX(&mmattn::attn_cpu::fused_attention_bwd_cpu));
  m.impl("attention_cpu_dropout_keep", TORCH_BOX(&mmattn::attn_cpu::attention_cpu_dropout_keep));
}

STABLE_TORCH_LIBRARY_IMPL(mmattn, CompositeExplicitAutograd, m) {
  m.impl("attention_cpu_isa", TORCH_BOX(&mmattn::attn_cpu::attention_cpu_isa));
}
