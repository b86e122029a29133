// CPU kernels of the Watts-Strogatz sparse linear layer: y = x @ W^T + b with only the
// kept entries of W stored (mmattn/layout.py describes the compressed layout).
//
// Operators (schemas below; the Python launchers live in mmattn/ops.py):
//   ws_spmm           y[n, r] = bias[r] + sum_{e in row r} W_e x[n, col[e]]
//   ws_sddmm          dW_e = sum_n dy[n, row(e)] x[n, col(e)]   (kept entries only)
//   ws_spmm_backward  (dx, dW, dbias): dx is ws_spmm over the transposed layout
//                     (ccol / row_t / transpose_perm), so it is a gather too.
//
// Element layouts (block_size 1) are processed in tiles of 16 or 32 batch rows: the tile
// of the input is transposed once to (features, rows) floats, so every kept edge becomes
// one or two 16-wide FMAs over contiguous vectors, and 16 output rows at a time are
// transposed back in registers on store. Block layouts (block_size bs > 1) run a
// register-blocked GEMM micro-kernel over each dense bs x bs block, vectorised along the
// block's output rows, 8 batch rows at a time.
//
// All arithmetic is float32 (inputs may be float32, bfloat16 or float16); the SpMM sums
// (a row of W for y, a column for dx) run in blocks of 16 products, each summed from zero
// and then added to the row's total, the bias last, which keeps long rows (hundreds of
// kept weights) at or below PyTorch's float32 linear error. Results do not
// depend on the thread count or schedule: every output element is summed by one task in
// a fixed order, and the weight gradient is reduced over a batch chunking that depends
// only on the problem size, in chunk order. Threads take tasks from a shared counter (the
// only atomic), so a thread the OS preempts on a busy machine holds up one task only.
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../stable_utils.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // Vec never crosses a non-inlined call

// Hot loops are compiled for AVX-512, AVX2 and baseline x86-64; the loader picks one at
// run time (GCC function multi-versioning), so one wheel is fast everywhere.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MMATTN_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MMATTN_CPU_CLONES
#endif
#define MMATTN_INLINE inline __attribute__((always_inline))

namespace mmattn {
namespace {

using torch::headeronly::BFloat16;
using torch::headeronly::Half;

constexpr int64_t kLanes = 16;         // floats per vector
constexpr int64_t kBatchGroup = 8;     // batch rows per block micro-kernel call
constexpr int64_t kBlockCols = 8;      // weight-block columns per dW micro-kernel call
constexpr int64_t kMaxChunks = 8;      // batch chunks over which dW is reduced
constexpr int64_t kChunkBytes = 1 << 20;  // transposed input of one chunk stays in L2
constexpr int64_t kSerialWork = 1 << 15;  // multiply-adds below which threads do not pay
constexpr int64_t kSumBlock = 16;      // products summed from zero before joining a total

typedef float Vec __attribute__((vector_size(64)));  // 16 floats: 1 zmm, 2 ymm or 4 xmm

MMATTN_INLINE Vec vload(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
MMATTN_INLINE void vstore(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }
MMATTN_INLINE Vec vsplat(float s) { return Vec{} + s; }

typedef int32_t Index16 __attribute__((vector_size(64)));  // lane indices for shuffles

MMATTN_INLINE float vsum(Vec v) {
  // Pairwise halving (lane i += lane i + width) in registers: a fixed order, so the
  // result is the same whatever the vector width the compiler splits Vec into.
  v += __builtin_shuffle(v, Index16{8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15});
  v += __builtin_shuffle(v, Index16{4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7});
  v += __builtin_shuffle(v, Index16{2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3});
  v += __builtin_shuffle(v, Index16{1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1});
  return v[0];
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Per-thread scratch memory that grows to the largest call's need and is kept, so repeated
// calls do not pay for page faults of fresh allocations. One slot per use, because the
// backward runs SpMM and SDDMM tasks on the same threads.
enum ScratchSlot { kSpmmTile = 0, kSddmmX = 1, kSddmmDy = 2 };

float* scratch(ScratchSlot slot, int64_t floats) {
  struct Buffer {
    std::unique_ptr<float[]> data;
    int64_t capacity = 0;
  };
  thread_local Buffer buffers[3];
  Buffer& b = buffers[slot];
  if (b.capacity < floats) {
    b.data.reset(new float[static_cast<size_t>(floats)]);
    b.capacity = floats;
  }
  return b.data.get();
}

// A 2-D input read with any strides: element (n, c) is data[n * row_stride + c * col_stride].
template <typename T>
struct Strided {
  const T* data;
  int64_t row_stride;
  int64_t col_stride;
  MMATTN_INLINE float at(int64_t n, int64_t c) const {
    return static_cast<float>(data[n * row_stride + c * col_stride]);
  }
};

template <typename T>
Strided<T> strided(const Tensor& t) {
  return {static_cast<const T*>(t.const_data_ptr()), t.stride(0), t.stride(1)};
}

// ---- 16-float rows: loads with conversion, stores with rounding, 16 x 16 transposes --

typedef uint16_t Half16 __attribute__((vector_size(32)));  // 16 raw bfloat16 / float16
typedef uint32_t Bits16 __attribute__((vector_size(64)));

// 16 consecutive values of a row (col_stride apart) as floats.
template <typename T>
MMATTN_INLINE Vec load_row16(const T* p, int64_t col_stride) {
  alignas(64) float v[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) v[i] = static_cast<float>(p[i * col_stride]);
  return vload(v);
}
template <>
MMATTN_INLINE Vec load_row16<float>(const float* p, int64_t col_stride) {
  if (col_stride == 1) return vload(p);
  alignas(64) float v[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) v[i] = p[i * col_stride];
  return vload(v);
}
template <>
MMATTN_INLINE Vec load_row16<BFloat16>(const BFloat16* p, int64_t col_stride) {
  Half16 h;
  if (col_stride == 1) {
    std::memcpy(&h, p, sizeof h);
  } else {
    for (int64_t i = 0; i < kLanes; ++i) h[i] = p[i * col_stride].x;
  }
  // bfloat16 is the high half of a float32.
  const Bits16 bits = __builtin_convertvector(h, Bits16) << 16;
  Vec v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// Stores the first `count` lanes of v as T (round to nearest even for bfloat16).
template <typename T>
MMATTN_INLINE void store_row16(T* p, Vec v, int64_t count) {
  alignas(64) float f[kLanes];
  vstore(f, v);
  for (int64_t i = 0; i < count; ++i) p[i] = static_cast<T>(f[i]);
}
template <>
MMATTN_INLINE void store_row16<float>(float* p, Vec v, int64_t count) {
  if (count == kLanes) {
    vstore(p, v);
  } else {
    alignas(64) float f[kLanes];
    vstore(f, v);
    std::memcpy(p, f, sizeof(float) * count);
  }
}
template <>
MMATTN_INLINE void store_row16<BFloat16>(BFloat16* p, Vec v, int64_t count) {
  Bits16 bits;
  std::memcpy(&bits, &v, sizeof bits);
  Bits16 rounded = (bits + (((bits >> 16) & 1u) + 0x7FFFu)) >> 16;
  rounded = (v != v) ? Bits16{} + 0x7FC0u : rounded;  // NaN stays a quiet NaN
  const Half16 h = __builtin_convertvector(rounded, Half16);
  std::memcpy(p, &h, sizeof(uint16_t) * count);
}

// In-place transpose of a 16 x 16 matrix held as 16 row vectors: after it, r[i][j] is
// the old r[j][i]. Four stages swap off-diagonal h x h sub-blocks, h = 8, 4, 2, 1.
MMATTN_INLINE void transpose16(Vec r[kLanes]) {
  static constexpr Index16 lo8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  static constexpr Index16 hi8 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  static constexpr Index16 lo4 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
  static constexpr Index16 hi4 = {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31};
  static constexpr Index16 lo2 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
  static constexpr Index16 hi2 = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
  static constexpr Index16 lo1 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
  static constexpr Index16 hi1 = {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};
#define MMATTN_TRANSPOSE_STAGE(h, lo, hi)                  \
  for (int64_t i = 0; i < kLanes; ++i) {                   \
    if (i & (h)) continue;                                 \
    const Vec a = r[i], b = r[i + (h)];                    \
    r[i] = __builtin_shuffle(a, b, lo);                    \
    r[i + (h)] = __builtin_shuffle(a, b, hi);              \
  }
  MMATTN_TRANSPOSE_STAGE(8, lo8, hi8)
  MMATTN_TRANSPOSE_STAGE(4, lo4, hi4)
  MMATTN_TRANSPOSE_STAGE(2, lo2, hi2)
  MMATTN_TRANSPOSE_STAGE(1, lo1, hi1)
#undef MMATTN_TRANSPOSE_STAGE
}

// dst[c * ld + lane] = src(n0 + lane, c0 + c) for c < ncols, lane < nrows; lanes in
// [nrows, ld) are zero. ld >= nrows is a multiple of kLanes.
template <typename T>
MMATTN_INLINE void load_transposed(const Strided<T>& src, int64_t n0, int64_t nrows, int64_t c0,
                                   int64_t ncols, float* dst, int64_t ld) {
  const int64_t cs = src.col_stride;
  for (int64_t lb = 0; lb < ld; lb += kLanes) {
    const int64_t lanes = std::max<int64_t>(0, std::min(kLanes, nrows - lb));
    const T* row0 = src.data + (n0 + lb) * src.row_stride + c0 * cs;
    int64_t c = 0;
    for (; c + kLanes <= ncols; c += kLanes) {
      Vec r[kLanes];
      for (int64_t l = 0; l < kLanes; ++l) {
        r[l] = l < lanes ? load_row16(row0 + l * src.row_stride + c * cs, cs) : Vec{};
      }
      transpose16(r);
      for (int64_t k = 0; k < kLanes; ++k) vstore(dst + (c + k) * ld + lb, r[k]);
    }
    for (; c < ncols; ++c) {  // the last ncols % 16 columns
      alignas(64) float v[kLanes] = {};
      for (int64_t l = 0; l < lanes; ++l) {
        v[l] = static_cast<float>(row0[l * src.row_stride + c * cs]);
      }
      std::memcpy(dst + c * ld + lb, v, sizeof v);
    }
  }
}

// ---- SpMM: out[n, r] = bias[r] + sum_e W_e in[n, idx[e]] ---------------------------------

template <typename T>
struct SpmmProblem {
  Strided<T> in;
  int64_t batch, in_dim, out_dim, block_size;
  const int32_t* ptr;     // (num_block_rows + 1,) row pointers
  const int32_t* idx;     // (nnz,) block column of each entry
  const float* weights;   // element: (nnz,); block: packed (nnz, bs, padded_bs), see below
  const float* bias;      // (out_dim,) or, for blocks, zero-padded to rows*bs + padded_bs
  T* out;                 // (batch, out_dim) contiguous
  int64_t padded_bs;      // block: bs rounded up to kLanes
  int64_t rows_per_task;  // (block) rows of the layout per task
  int64_t row_tasks;      // tasks along the layout's rows
};

// One task: batch tile `tile` (kTileRows = 16 * V rows) times one range of output rows.
// Each kept edge costs V FMAs of contiguous vectors; V = 2 halves the index and weight
// loads per FMA, which bound this loop, V = 1 wastes less on batches of <= 16 rows.
// `loaded_tile` is the calling thread's tile in kSpmmTile scratch (-1: none yet).
template <typename T, int64_t V>
MMATTN_CPU_CLONES void spmm_element_task(const SpmmProblem<T>& p, int64_t task,
                                         int64_t& loaded_tile) {
  constexpr int64_t kTileRows = kLanes * V;
  float* tile_t = scratch(kSpmmTile, p.in_dim * kTileRows);  // (in_dim, kTileRows)
  Vec acc[V][kLanes];  // [batch vector][output row in group] -> 16 batch lanes
  const int64_t tile = task / p.row_tasks;
  const int64_t r_begin = (task % p.row_tasks) * p.rows_per_task;
  const int64_t r_end = std::min(p.out_dim, r_begin + p.rows_per_task);
  const int64_t n0 = tile * kTileRows;
  const int64_t nrows = std::min(kTileRows, p.batch - n0);
  if (tile != loaded_tile) {
    load_transposed(p.in, n0, nrows, 0, p.in_dim, tile_t, kTileRows);
    loaded_tile = tile;
  }
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kLanes) {
    const int64_t cnt = std::min(kLanes, r_end - r0);
    for (int64_t i = 0; i < cnt; ++i) {
      const int64_t r = r0 + i;
      // The row's products in blocks of kSumBlock edges, each summed from zero and then
      // added to the running total, the bias last: one float32 chain over a long row
      // (in_features ~ 300) had 1.2-1.3x the error of PyTorch's float32 linear (issue 11).
      // Rows of at most kSumBlock edges (Watts-Strogatz layouts) are one block.
      Vec total[V];
      const int64_t e_end = p.ptr[r + 1];
      int64_t e = p.ptr[r];
      {
        const int64_t e1 = std::min(e_end, e + kSumBlock);
        for (int64_t v = 0; v < V; ++v) total[v] = Vec{};
        for (; e < e1; ++e) {
          const float* src = tile_t + static_cast<int64_t>(p.idx[e]) * kTileRows;
          for (int64_t v = 0; v < V; ++v) total[v] += p.weights[e] * vload(src + v * kLanes);
        }
      }
      while (e < e_end) {
        const int64_t e1 = std::min(e_end, e + kSumBlock);
        Vec part[V] = {};
        for (; e < e1; ++e) {
          const float* src = tile_t + static_cast<int64_t>(p.idx[e]) * kTileRows;
          for (int64_t v = 0; v < V; ++v) part[v] += p.weights[e] * vload(src + v * kLanes);
        }
        for (int64_t v = 0; v < V; ++v) total[v] += part[v];
      }
      for (int64_t v = 0; v < V; ++v) acc[v][i] = total[v] + vsplat(p.bias ? p.bias[r] : 0.f);
    }
    for (int64_t v = 0; v < V; ++v) {
      const int64_t lanes = std::min(kLanes, nrows - v * kLanes);
      if (lanes <= 0) break;
      for (int64_t i = cnt; i < kLanes; ++i) acc[v][i] = Vec{};
      transpose16(acc[v]);  // acc[v][l] = outputs r0 .. r0 + 15 of batch row n0 + 16 v + l
      for (int64_t l = 0; l < lanes; ++l) {
        store_row16(p.out + (n0 + v * kLanes + l) * p.out_dim + r0, acc[v][l], cnt);
      }
    }
  }
}

// Block rows rb's outputs i0 .. i0 + 16 * NV for kBatchGroup batch rows (`rows`, of which
// the first nb are real). Block e at (R, C) adds sum_j B_e[i][j] in[n, C*bs + j] to
// out[n, R*bs + i]; weights hold P_e[j][i] = B_e[i][j] with i padded to padded_bs, so a
// column j of a block is NV vector loads, each FMA'd with kBatchGroup broadcast inputs.
template <typename T, int64_t NV>
MMATTN_INLINE void spmm_block_rows(const SpmmProblem<T>& p, const T* const* rows, int64_t n0,
                                   int64_t nb, int64_t rb, int64_t i0) {
  const int64_t bs = p.block_size, ip = p.padded_bs, cs = p.in.col_stride;
  // Products summed from zero over at least kSumBlock columns (whole blocks), then
  // added to a running total kept in L1 (no registers left for it), the bias last: one
  // float32 chain over a long row had 1.2-1.3x the error of PyTorch's linear.
  Vec acc[kBatchGroup][NV] = {};
  alignas(64) float total[kBatchGroup][NV * kLanes] = {};
  int64_t pending = 0;  // columns summed into acc since the last flush
  auto flush = [&] {
    for (int64_t b = 0; b < kBatchGroup; ++b) {
      for (int64_t v = 0; v < NV; ++v) {
        vstore(total[b] + v * kLanes, vload(total[b] + v * kLanes) + acc[b][v]);
        acc[b][v] = Vec{};
      }
    }
    pending = 0;
  };
  for (int64_t e = p.ptr[rb]; e < p.ptr[rb + 1]; ++e) {
    const int64_t c0 = static_cast<int64_t>(p.idx[e]) * bs;
    const int64_t jmax = std::min(bs, p.in_dim - c0);
    const float* w = p.weights + e * bs * ip + i0;
    for (int64_t j = 0; j < jmax; ++j) {
      Vec wv[NV];
      for (int64_t v = 0; v < NV; ++v) wv[v] = vload(w + j * ip + v * kLanes);
      const int64_t off = (c0 + j) * cs;
      for (int64_t b = 0; b < kBatchGroup; ++b) {
        const float xv = static_cast<float>(rows[b][off]);
        for (int64_t v = 0; v < NV; ++v) acc[b][v] += xv * wv[v];
      }
    }
    pending += jmax;
    if (pending >= kSumBlock) flush();
  }
  if (pending > 0) flush();
  for (int64_t v = 0; v < NV; ++v) {
    const Vec b0 = vload(p.bias + rb * bs + i0 + v * kLanes);
    for (int64_t b = 0; b < kBatchGroup; ++b) acc[b][v] = vload(total[b] + v * kLanes) + b0;
  }
  for (int64_t v = 0; v < NV; ++v) {
    const int64_t o0 = rb * bs + i0 + v * kLanes;
    const int64_t cnt = std::min({kLanes, bs - i0 - v * kLanes, p.out_dim - o0});
    if (cnt <= 0) break;
    for (int64_t b = 0; b < nb; ++b) store_row16(p.out + (n0 + b) * p.out_dim + o0, acc[b][v], cnt);
  }
}

// One task: kBatchGroup batch rows times one range of block rows.
template <typename T>
MMATTN_CPU_CLONES void spmm_block_task(const SpmmProblem<T>& p, int64_t task) {
  const int64_t bs = p.block_size;
  const int64_t num_block_rows = ceil_div(p.out_dim, bs);
  const int64_t n0 = (task / p.row_tasks) * kBatchGroup;
  const int64_t nb = std::min(kBatchGroup, p.batch - n0);
  const int64_t rb_begin = (task % p.row_tasks) * p.rows_per_task;
  const int64_t rb_end = std::min(num_block_rows, rb_begin + p.rows_per_task);
  // Rows past the batch repeat the last one; their results are not stored.
  const T* rows[kBatchGroup];
  for (int64_t b = 0; b < kBatchGroup; ++b) {
    rows[b] = p.in.data + (n0 + std::min(b, nb - 1)) * p.in.row_stride;
  }
  for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
    // 32 outputs at a time while more than 16 remain; rows past out_dim are skipped.
    for (int64_t i0 = 0; i0 < bs && rb * bs + i0 < p.out_dim;) {
      if (i0 + kLanes < bs) {
        spmm_block_rows<T, 2>(p, rows, n0, nb, rb, i0);
        i0 += 2 * kLanes;
      } else {
        spmm_block_rows<T, 1>(p, rows, n0, nb, rb, i0);
        i0 += kLanes;
      }
    }
  }
}

// ---- SDDMM: dW_e = sum_n dy[n, row(e)] x[n, col(e)], and dbias = sum_n dy[n, :] --------

template <typename T>
struct SddmmProblem {
  Strided<T> dy, x;
  int64_t batch, in_dim, out_dim, block_size;
  const int32_t* ptr;
  const int32_t* idx;
  int64_t values_per_entry;  // bs * bs
  int64_t chunk_rows;        // batch rows per chunk (a multiple of kLanes)
  int64_t rows_per_task;     // block rows per task
  int64_t row_tasks;
  float* partial_w;          // (chunks, nnz * bs * bs); a block's values as [j][i]
  float* partial_bias;       // (chunks, out_dim) or null
};

// Batch rows per chunk: depends only on the problem size, never on the thread count, so
// the chunked reduction of dW gives the same bits everywhere.
int64_t chunk_rows_for(int64_t batch, int64_t in_dim) {
  const int64_t by_count = round_up(ceil_div(batch, kMaxChunks), kLanes);
  const int64_t by_cache = kChunkBytes / (static_cast<int64_t>(sizeof(float)) *
                                          std::max<int64_t>(in_dim, 1)) / kLanes * kLanes;
  return std::max(kLanes, std::min(by_count, std::max(kLanes, by_cache)));
}

template <typename T>
MMATTN_CPU_CLONES void sddmm_element_task(const SddmmProblem<T>& p, int64_t task) {
  const int64_t chunk = task / p.row_tasks;
  const int64_t r_begin = (task % p.row_tasks) * p.rows_per_task;
  const int64_t r_end = std::min(p.out_dim, r_begin + p.rows_per_task);
  const int64_t n0 = chunk * p.chunk_rows;
  const int64_t nrows = std::min(p.chunk_rows, p.batch - n0);
  const int64_t ld = round_up(nrows, kLanes);  // lanes past nrows are zero
  const bool with_w = p.partial_w != nullptr;  // else only dbias is wanted
  float* x_t = scratch(kSddmmX, with_w ? p.in_dim * ld : 0);  // (in_dim, ld)
  float* dy_t = scratch(kSddmmDy, (r_end - r_begin) * ld);    // (rows of this task, ld)
  if (with_w) load_transposed(p.x, n0, nrows, 0, p.in_dim, x_t, ld);
  load_transposed(p.dy, n0, nrows, r_begin, r_end - r_begin, dy_t, ld);
  float* pw = with_w ? p.partial_w + chunk * p.ptr[p.out_dim] : nullptr;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const float* d = dy_t + (r - r_begin) * ld;
    for (int64_t e = p.ptr[r]; with_w && e < p.ptr[r + 1]; ++e) {
      const float* xs = x_t + static_cast<int64_t>(p.idx[e]) * ld;
      Vec a = vload(d) * vload(xs);
      for (int64_t v = kLanes; v < ld; v += kLanes) a += vload(d + v) * vload(xs + v);
      pw[e] = vsum(a);
    }
    if (p.partial_bias) {
      Vec a = vload(d);
      for (int64_t v = kLanes; v < ld; v += kLanes) a += vload(d + v);
      p.partial_bias[chunk * p.out_dim + r] = vsum(a);
    }
  }
}

// dst[n * ld + c] = src(n0 + n, c0 + c) as float32 for n < nrows, c < ncols; columns
// [ncols, ld) are zero.
template <typename T>
MMATTN_INLINE void copy_rows(const Strided<T>& src, int64_t n0, int64_t nrows, int64_t c0,
                             int64_t ncols, float* dst, int64_t ld) {
  const int64_t cs = src.col_stride;
  for (int64_t n = 0; n < nrows; ++n) {
    const T* row = src.data + (n0 + n) * src.row_stride + c0 * cs;
    float* out = dst + n * ld;
    int64_t c = 0;
    for (; c + kLanes <= ncols; c += kLanes) vstore(out + c, load_row16(row + c * cs, cs));
    for (; c < ncols; ++c) out[c] = static_cast<float>(row[c * cs]);
    std::memset(out + ncols, 0, sizeof(float) * (ld - ncols));
  }
}

// dW of one block for its rows i0 .. i0 + 16 * NV and columns j0 .. j0 + kBlockCols over
// nrows batch rows: dw_t[j][i] = sum_n dy[n, i] x[n, j], vectorised along i and stored
// transposed (whole vectors); SddmmPlan::finish transposes back. `d` / `xs` point at
// (row 0, i0) of the dy chunk and (row 0, j0) of the x chunk.
template <int64_t NV>
MMATTN_INLINE void block_dw_tile(const float* d, int64_t ldd, const float* xs, int64_t ldx,
                                 int64_t nrows, int64_t bs, int64_t i0, int64_t j0, float* dw) {
  Vec acc[kBlockCols][NV] = {};
  for (int64_t n = 0; n < nrows; ++n) {
    Vec dv[NV];
    for (int64_t v = 0; v < NV; ++v) dv[v] = vload(d + n * ldd + v * kLanes);
    const float* xr = xs + n * ldx;
    for (int64_t jj = 0; jj < kBlockCols; ++jj) {
      const float xv = xr[jj];
      for (int64_t v = 0; v < NV; ++v) acc[jj][v] += xv * dv[v];
    }
  }
  const int64_t jcnt = std::min(kBlockCols, bs - j0);
  for (int64_t v = 0; v < NV; ++v) {
    const int64_t ib = i0 + v * kLanes;
    const int64_t icnt = std::min(kLanes, bs - ib);
    for (int64_t jj = 0; jj < jcnt; ++jj) store_row16(dw + (j0 + jj) * bs + ib, acc[jj][v], icnt);
  }
}

// Block dW: per chunk the batch rows of x (all columns) and of dy (this task's block rows)
// are copied to float32 row-major buffers, zero-padded so that full vectors can be read
// past the matrix edges; then each block is a (bs x rows) @ (rows x bs) product,
// vectorised along the block's rows i, kBlockCols block columns j per accumulator set.
template <typename T>
MMATTN_CPU_CLONES void sddmm_block_task(const SddmmProblem<T>& p, int64_t task) {
  const int64_t bs = p.block_size;
  const int64_t num_block_rows = ceil_div(p.out_dim, bs);
  const int64_t ldx = round_up(p.in_dim, bs) + kBlockCols;
  const int64_t chunk = task / p.row_tasks;
  const int64_t rb_begin = (task % p.row_tasks) * p.rows_per_task;
  const int64_t rb_end = std::min(num_block_rows, rb_begin + p.rows_per_task);
  const int64_t col0 = rb_begin * bs;
  const int64_t ncols = std::min(p.out_dim, rb_end * bs) - col0;
  const int64_t ldd = (rb_end - rb_begin) * bs + 2 * kLanes;
  const int64_t n0 = chunk * p.chunk_rows;
  const int64_t nrows = std::min(p.chunk_rows, p.batch - n0);
  const bool with_w = p.partial_w != nullptr;  // else only dbias is wanted
  float* xc = scratch(kSddmmX, with_w ? nrows * ldx : 0);
  float* dyc = scratch(kSddmmDy, nrows * ldd);
  if (with_w) copy_rows(p.x, n0, nrows, 0, p.in_dim, xc, ldx);
  copy_rows(p.dy, n0, nrows, col0, ncols, dyc, ldd);
  const int64_t nnz = p.ptr[num_block_rows];
  float* pw = with_w ? p.partial_w + chunk * nnz * p.values_per_entry : nullptr;
  for (int64_t rb = rb_begin; with_w && rb < rb_end; ++rb) {
    for (int64_t e = p.ptr[rb]; e < p.ptr[rb + 1]; ++e) {
      const int64_t c0 = static_cast<int64_t>(p.idx[e]) * bs;
      float* dw = pw + e * p.values_per_entry;  // dw_t[j * bs + i]
      for (int64_t i0 = 0; i0 < bs;) {
        const float* d = dyc + (rb - rb_begin) * bs + i0;
        const bool two = i0 + kLanes < bs;  // 32 rows at a time while more than 16 remain
        for (int64_t j0 = 0; j0 < bs; j0 += kBlockCols) {
          if (two) {
            block_dw_tile<2>(d, ldd, xc + c0 + j0, ldx, nrows, bs, i0, j0, dw);
          } else {
            block_dw_tile<1>(d, ldd, xc + c0 + j0, ldx, nrows, bs, i0, j0, dw);
          }
        }
        i0 += two ? 2 * kLanes : kLanes;
      }
    }
  }
  if (p.partial_bias) {
    float* db = p.partial_bias + chunk * p.out_dim + col0;
    std::fill(db, db + ncols, 0.f);
    for (int64_t n = 0; n < nrows; ++n) {
      for (int64_t c = 0; c < ncols; ++c) db[c] += dyc[n * ldd + c];
    }
  }
}

// ---- input checks and operator entry points ------------------------------------------

bool is_float_type(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::BFloat16 || t == ScalarType::Half;
}

void check_matrix(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.is_cpu(), name, " must be a CPU tensor");
  STD_TORCH_CHECK(t.dim() == 2, name, " must be 2-D (batch, features), got ", t.dim(), "-D");
  STD_TORCH_CHECK(is_float_type(t.scalar_type()), name,
                  " must be float32, bfloat16 or float16");
}

// Checks a compressed index (ptr, idx) of `rows` x `cols` blocks, so a malformed layout
// raises instead of reading out of bounds. O(nnz), negligible next to the kernels.
void check_compressed(const Tensor& ptr, const Tensor& idx, int64_t rows, int64_t cols,
                      const char* ptr_name, const char* idx_name) {
  check_int32_contiguous(ptr, ptr_name);
  check_int32_contiguous(idx, idx_name);
  STD_TORCH_CHECK(ptr.is_cpu() && idx.is_cpu(), ptr_name, " and ", idx_name,
                  " must be CPU tensors");
  STD_TORCH_CHECK(ptr.dim() == 1 && ptr.numel() == rows + 1, ptr_name, " must have ", rows + 1,
                  " entries, got ", ptr.numel());
  const int32_t* p = ptr.const_data_ptr<int32_t>();
  const int32_t* c = idx.const_data_ptr<int32_t>();
  const int64_t nnz = idx.numel();
  STD_TORCH_CHECK(p[0] == 0 && p[rows] == nnz, ptr_name, " must run from 0 to ", nnz);
  bool decreasing = false, out_of_range = false;  // branch-free loops: they vectorise
  for (int64_t r = 0; r < rows; ++r) decreasing |= p[r] > p[r + 1];
  for (int64_t e = 0; e < nnz; ++e) {
    out_of_range |= static_cast<uint32_t>(c[e]) >= static_cast<uint64_t>(cols);
  }
  STD_TORCH_CHECK(!decreasing, ptr_name, " must be non-decreasing");
  STD_TORCH_CHECK(!out_of_range, idx_name, " has an entry out of [0, ", cols, ")");
}

void check_values(const Tensor& values, const Tensor& x, int64_t nnz, int64_t block_size) {
  STD_TORCH_CHECK(values.is_cpu(), "values must be a CPU tensor");
  STD_TORCH_CHECK(values.scalar_type() == x.scalar_type(), "values must have x's dtype");
  STD_TORCH_CHECK(values.is_contiguous(), "values must be contiguous");
  if (block_size == 1) {
    STD_TORCH_CHECK(values.dim() == 1 && values.size(0) == nnz, "values must be (nnz,) = (",
                    nnz, ",)");
  } else {
    STD_TORCH_CHECK(values.dim() == 3 && values.size(0) == nnz && values.size(1) == block_size &&
                        values.size(2) == block_size,
                    "values must be (nnz, block_size, block_size) = (", nnz, ", ", block_size,
                    ", ", block_size, ")");
  }
}

// Float32 weights in the layout the SpMM kernels read. `perm` (may be null) gathers
// entries into transposed order; a transposed block also swaps its two indices.
//   element: w[e] = values[perm ? perm[e] : e]
//   block:   P_e[j][i] = B_e[i][j], i padded to a multiple of kLanes with zeros, where B_e
//            is values[e] (forward) or values[perm[e]]^T (transposed layout).
template <typename T>
std::vector<float> pack_weights(const Tensor& values, int64_t nnz, int64_t bs,
                                const int32_t* perm) {
  const T* v = static_cast<const T*>(values.const_data_ptr());
  if (bs == 1) {
    std::vector<float> w(static_cast<size_t>(nnz));
    for (int64_t e = 0; e < nnz; ++e) w[e] = static_cast<float>(v[perm ? perm[e] : e]);
    return w;
  }
  const int64_t ip = round_up(bs, kLanes);
  std::vector<float> w(static_cast<size_t>(nnz * bs * ip), 0.f);
  for (int64_t e = 0; e < nnz; ++e) {
    const int64_t src = (perm ? perm[e] : e) * bs * bs;
    float* dst = w.data() + e * bs * ip;
    for (int64_t a = 0; a < bs; ++a) {
      for (int64_t b = 0; b < bs; ++b) {
        // V[a][b], the stored value at (a, b): forward B = V gives P[b][a] = V[a][b];
        // transposed B = V^T gives P[a][b] = B[b][a] = V[a][b].
        const float value = static_cast<float>(v[src + a * bs + b]);
        if (perm) {
          dst[a * ip + b] = value;
        } else {
          dst[b * ip + a] = value;
        }
      }
    }
  }
  return w;
}

template <typename T>
std::vector<float> pack_bias(const std::optional<Tensor>& bias, int64_t out_dim, int64_t bs) {
  const int64_t padded = bs == 1 ? out_dim : round_up(out_dim, bs) + round_up(bs, kLanes);
  std::vector<float> b(static_cast<size_t>(padded), 0.f);
  if (bias.has_value()) {
    const T* src = static_cast<const T*>(bias->const_data_ptr());
    for (int64_t r = 0; r < out_dim; ++r) b[r] = static_cast<float>(src[r]);
  }
  return b;
}

// ---- scheduling: task partitions and the shared task queue -----------------------------

// Runs `thread_body(next)` on up to get_num_threads() threads; each body takes task ids
// from `next` until they exceed the task count. Which thread runs a task never changes
// its result, so the dynamic schedule keeps results deterministic.
template <class F>
void run_queue(int64_t num_tasks, int64_t work, const F& thread_body) {
  if (num_tasks <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads =
      std::min<int64_t>(num_tasks, std::max<uint32_t>(1, torch::stable::get_num_threads()));
  if (threads == 1 || work < kSerialWork) {
    thread_body(next);
  } else {
    torch::stable::parallel_for(0, threads, 1, [&](int64_t, int64_t) { thread_body(next); });
  }
}

// Threads a call of `work` multiply-adds will use (run_queue's rule).
int64_t threads_for(int64_t work) {
  return work < kSerialWork ? 1 : std::max<uint32_t>(1, torch::stable::get_num_threads());
}

// Splits `rows` layout rows into tasks so that, with `batch_tasks` tasks along the batch,
// there are about four tasks per thread (one per batch task when the call runs serially,
// as the tasks of a batch tile or chunk each prepare its input). Only the task shape
// depends on the thread count, never a result.
void split_rows(int64_t batch_tasks, int64_t rows, int64_t granule, int64_t threads,
                int64_t* rows_per_task, int64_t* row_tasks) {
  int64_t wanted = threads == 1 || batch_tasks >= 4 * threads
                       ? 1 : ceil_div(4 * threads, batch_tasks);
  wanted = std::max<int64_t>(1, std::min(wanted, ceil_div(rows, granule)));
  *rows_per_task = std::max<int64_t>(1, round_up(ceil_div(rows, wanted), granule));
  *row_tasks = std::max<int64_t>(1, ceil_div(rows, *rows_per_task));
}

// An SpMM ready to run: float32 weights and bias in the kernels' layout, and its tasks.
template <typename T>
struct SpmmPlan {
  SpmmProblem<T> p{};
  std::vector<float> packed_weights, packed_bias;
  bool wide = false;  // element layouts: 32-row batch tiles (else 16)
  int64_t num_tasks = 0;
  int64_t work = 0;   // multiply-adds, to decide whether threads pay

  // out = in @ W^T (+ bias): `in` (N, in_dim) any strides, `out` (N, out_dim) contiguous.
  // With `perm`, the index (ptr, idx) is the transposed layout and values are gathered.
  SpmmPlan(const Tensor& in, const Tensor& values, const int32_t* ptr, const int32_t* idx,
           int64_t nnz, int64_t out_dim, int64_t bs, const std::optional<Tensor>& bias,
           const int32_t* perm, Tensor& out) {
    p = {strided<T>(in), in.size(0), in.size(1), out_dim, bs, ptr, idx, nullptr, nullptr,
         static_cast<T*>(out.mutable_data_ptr()), round_up(bs, kLanes), 1, 1};
    // float32 element weights and bias in CSR order are read in place; everything else
    // is converted / packed once per call (O(weights), small next to the batch work).
    constexpr bool is_f32 = std::is_same_v<T, float>;
    if (is_f32 && bs == 1 && perm == nullptr) {
      p.weights = static_cast<const float*>(values.const_data_ptr());
    } else {
      packed_weights = pack_weights<T>(values, nnz, bs, perm);
      p.weights = packed_weights.data();
    }
    if (is_f32 && bs == 1 && bias.has_value()) {
      p.bias = static_cast<const float*>(bias->const_data_ptr());
    } else if (bs > 1 || bias.has_value()) {
      packed_bias = pack_bias<T>(bias, out_dim, bs);
      p.bias = packed_bias.data();
    }
    if (p.batch == 0 || out_dim == 0) return;
    work = p.batch * std::max<int64_t>(nnz * bs * bs, out_dim);
    if (bs == 1) {
      wide = p.batch > kLanes;
      const int64_t tiles = ceil_div(p.batch, wide ? 2 * kLanes : kLanes);
      split_rows(tiles, out_dim, kLanes, threads_for(work), &p.rows_per_task, &p.row_tasks);
      num_tasks = tiles * p.row_tasks;
    } else {
      const int64_t groups = ceil_div(p.batch, kBatchGroup);
      split_rows(groups, ceil_div(out_dim, bs), 1, threads_for(work), &p.rows_per_task,
                 &p.row_tasks);
      num_tasks = groups * p.row_tasks;
    }
  }
  SpmmPlan(const SpmmPlan&) = delete;  // p points into the packed vectors

  void run(int64_t task, int64_t& loaded_tile) const {
    if (p.block_size > 1) {
      spmm_block_task<T>(p, task);
    } else if (wide) {
      spmm_element_task<T, 2>(p, task, loaded_tile);
    } else {
      spmm_element_task<T, 1>(p, task, loaded_tile);
    }
  }
};

// An SDDMM (and optionally dbias) ready to run: per-chunk partial sums, then a reduction.
template <typename T>
struct SddmmPlan {
  SddmmProblem<T> p{};
  std::unique_ptr<float[]> partial_w, partial_bias;  // every entry is written by a task
  int64_t num_values = 0;  // nnz * bs * bs
  int64_t chunks = 0;
  int64_t num_tasks = 0;
  int64_t work = 0;

  // dW (with_w) and / or dbias (with_bias) of y = x @ W^T + b for output gradient dy.
  SddmmPlan(const Tensor& dy, const Tensor& x, int64_t bs, const int32_t* ptr,
            const int32_t* idx, int64_t nnz, bool with_w, bool with_bias) {
    const int64_t batch = x.size(0), in_dim = x.size(1), out_dim = dy.size(1);
    p = {strided<T>(dy), strided<T>(x), batch, in_dim, out_dim, bs, ptr, idx, bs * bs,
         chunk_rows_for(batch, in_dim), 1, 1, nullptr, nullptr};
    num_values = with_w ? nnz * bs * bs : 0;
    if (batch == 0 || !(with_w || with_bias)) return;
    chunks = ceil_div(batch, p.chunk_rows);
    if (with_w) {
      partial_w.reset(new float[static_cast<size_t>(chunks * num_values)]);
      p.partial_w = partial_w.get();
    }
    if (with_bias) {
      partial_bias.reset(new float[static_cast<size_t>(chunks * out_dim)]);
      p.partial_bias = partial_bias.get();
    }
    work = batch * (num_values + out_dim);
    const int64_t rows = bs == 1 ? out_dim : ceil_div(out_dim, bs);
    split_rows(chunks, rows, bs == 1 ? kLanes : 1, threads_for(work), &p.rows_per_task,
               &p.row_tasks);
    num_tasks = chunks * p.row_tasks;
  }
  SddmmPlan(const SddmmPlan&) = delete;  // p points into the partial vectors

  void run(int64_t task) const {
    if (p.block_size > 1) {
      sddmm_block_task<T>(p, task);
    } else {
      sddmm_element_task<T>(p, task);
    }
  }

  // Sums the chunks' partials in chunk order into dw and d_bias (each if planned); blocks
  // are transposed back from their [j][i] partial layout.
  void finish(T* dw, T* d_bias) const {
    const int64_t bs = p.block_size, nw = num_values;
    const int64_t nb = d_bias ? p.out_dim : 0;
    if (chunks == 0) {  // no batch rows: every gradient is zero
      if (dw) std::fill(dw, dw + nw, static_cast<T>(0.f));
      if (d_bias) std::fill(d_bias, d_bias + p.out_dim, static_cast<T>(0.f));
      return;
    }
    // Spans of whole blocks, so a span can transpose its blocks.
    const int64_t span = round_up(4096, bs * bs);
    const int64_t w_tasks = ceil_div(nw, span);
    const int64_t total = w_tasks + ceil_div(nb, span);
    run_queue(total, chunks * (nw + nb), [&](std::atomic<int64_t>& next) {
      std::unique_ptr<float[]> sum(new float[static_cast<size_t>(span)]);
      for (int64_t t; (t = next.fetch_add(1)) < total;) {
        const bool is_w = t < w_tasks;
        const float* src = is_w ? partial_w.get() : partial_bias.get();
        const int64_t count = is_w ? nw : nb;
        const int64_t begin = (is_w ? t : t - w_tasks) * span;
        const int64_t len = std::min(span, count - begin);
        std::memcpy(sum.get(), src + begin, sizeof(float) * len);
        for (int64_t c = 1; c < chunks; ++c) {  // contiguous adds: they vectorise
          const float* part = src + c * count + begin;
          for (int64_t i = 0; i < len; ++i) sum[i] += part[i];
        }
        T* dst = (is_w ? dw : d_bias) + begin;
        if (!is_w || bs == 1) {
          for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<T>(sum[i]);
        } else {
          for (int64_t b = 0; b < len; b += bs * bs) {
            for (int64_t i = 0; i < bs; ++i) {
              for (int64_t j = 0; j < bs; ++j) {
                dst[b + i * bs + j] = static_cast<T>(sum[b + j * bs + i]);
              }
            }
          }
        }
      }
    });
  }
};

#define MMATTN_DISPATCH_FLOAT_TYPES(dtype, ...)                        \
  switch (dtype) {                                                    \
    case ScalarType::Float: {                                         \
      using scalar_t = float;                                         \
      __VA_ARGS__();                                                  \
      break;                                                          \
    }                                                                 \
    case ScalarType::BFloat16: {                                      \
      using scalar_t = BFloat16;                                      \
      __VA_ARGS__();                                                  \
      break;                                                          \
    }                                                                 \
    case ScalarType::Half: {                                          \
      using scalar_t = Half;                                          \
      __VA_ARGS__();                                                  \
      break;                                                          \
    }                                                                 \
    default:                                                          \
      STD_TORCH_CHECK(false, "unsupported dtype (float32, bfloat16, float16 only)"); \
  }

void check_block_size(int64_t block_size) {
  STD_TORCH_CHECK(block_size >= 1, "block_size must be >= 1, got ", block_size);
}

}  // namespace

// x: (N, in) float32/bfloat16/float16, any strides; values: (nnz,) or (nnz, bs, bs) in x's
// dtype; crow (rows + 1,), col (nnz,) int32 with rows = ceil(out_features / bs);
// bias: (out_features,) or None. Returns (N, out_features) contiguous in x's dtype.
Tensor ws_spmm_cpu(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices,
                   int64_t out_features, int64_t block_size, std::optional<Tensor> bias) {
  check_matrix(x, "x");
  check_block_size(block_size);
  STD_TORCH_CHECK(out_features >= 0, "out_features must be >= 0");
  const int64_t in_dim = x.size(1);
  const int64_t rows = ceil_div(out_features, block_size);
  const int64_t nnz = col_indices.numel();
  check_compressed(crow_indices, col_indices, rows, ceil_div(in_dim, block_size),
                   "crow_indices", "col_indices");
  check_values(values, x, nnz, block_size);
  if (bias.has_value()) {
    STD_TORCH_CHECK(bias->is_cpu() && bias->dim() == 1 && bias->size(0) == out_features &&
                        bias->is_contiguous() && bias->scalar_type() == x.scalar_type(),
                    "bias must be a contiguous CPU (out_features,) tensor of x's dtype");
  }
  Tensor out = torch::stable::new_empty(x, {x.size(0), out_features});
  MMATTN_DISPATCH_FLOAT_TYPES(x.scalar_type(), [&] {
    const SpmmPlan<scalar_t> plan(x, values, crow_indices.const_data_ptr<int32_t>(),
                                  col_indices.const_data_ptr<int32_t>(), nnz, out_features,
                                  block_size, bias, nullptr, out);
    run_queue(plan.num_tasks, plan.work, [&](std::atomic<int64_t>& next) {
      int64_t loaded_tile = -1;
      for (int64_t t; (t = next.fetch_add(1)) < plan.num_tasks;) plan.run(t, loaded_tile);
    });
  });
  return out;
}

// grad_y: (N, out_features), x: (N, in); returns the gradient of the kept values,
// shaped like them: (nnz,) or (nnz, bs, bs), in x's dtype.
Tensor ws_sddmm_cpu(Tensor grad_y, Tensor x, Tensor crow_indices, Tensor col_indices,
                    int64_t block_size) {
  check_matrix(grad_y, "grad_y");
  check_matrix(x, "x");
  check_block_size(block_size);
  STD_TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "grad_y must have x's dtype");
  STD_TORCH_CHECK(grad_y.size(0) == x.size(0), "grad_y and x must have the same batch size");
  const int64_t out_dim = grad_y.size(1);
  const int64_t nnz = col_indices.numel();
  check_compressed(crow_indices, col_indices, ceil_div(out_dim, block_size),
                   ceil_div(x.size(1), block_size), "crow_indices", "col_indices");
  Tensor d_values = block_size == 1
                        ? torch::stable::new_empty(x, {nnz})
                        : torch::stable::new_empty(x, {nnz, block_size, block_size});
  MMATTN_DISPATCH_FLOAT_TYPES(x.scalar_type(), [&] {
    const SddmmPlan<scalar_t> plan(grad_y, x, block_size, crow_indices.const_data_ptr<int32_t>(),
                                   col_indices.const_data_ptr<int32_t>(), nnz, true, false);
    run_queue(plan.num_tasks, plan.work, [&](std::atomic<int64_t>& next) {
      for (int64_t t; (t = next.fetch_add(1)) < plan.num_tasks;) plan.run(t);
    });
    plan.finish(static_cast<scalar_t*>(d_values.mutable_data_ptr()), nullptr);
  });
  return d_values;
}

// Gradients of ws_spmm: (dx (N, in), d_values like values, d_bias (out,)); each one not
// asked for (need_dx, need_d_values, has_bias) is an empty (0,) tensor and costs nothing.
std::tuple<Tensor, Tensor, Tensor> ws_spmm_backward_cpu(
    Tensor grad_y, Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices,
    Tensor ccol_indices, Tensor row_indices_t, Tensor transpose_perm, int64_t block_size,
    bool has_bias, bool need_dx, bool need_d_values) {
  check_matrix(grad_y, "grad_y");
  check_matrix(x, "x");
  check_block_size(block_size);
  STD_TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "grad_y must have x's dtype");
  STD_TORCH_CHECK(grad_y.size(0) == x.size(0), "grad_y and x must have the same batch size");
  const int64_t out_dim = grad_y.size(1), in_dim = x.size(1);
  const int64_t rows = ceil_div(out_dim, block_size), cols = ceil_div(in_dim, block_size);
  const int64_t nnz = col_indices.numel();
  check_compressed(crow_indices, col_indices, rows, cols, "crow_indices", "col_indices");
  const int32_t* perm = nullptr;
  if (need_dx) {  // only dx reads the transposed layout
    check_compressed(ccol_indices, row_indices_t, cols, rows, "ccol_indices", "row_indices_t");
    check_int32_contiguous(transpose_perm, "transpose_perm");
    STD_TORCH_CHECK(row_indices_t.numel() == nnz && transpose_perm.numel() == nnz,
                    "the transposed layout must have as many entries as the layout");
    perm = transpose_perm.const_data_ptr<int32_t>();
    bool perm_out_of_range = false;
    for (int64_t e = 0; e < nnz; ++e) {
      perm_out_of_range |= static_cast<uint32_t>(perm[e]) >= static_cast<uint64_t>(nnz);
    }
    STD_TORCH_CHECK(!perm_out_of_range, "transpose_perm has an entry out of [0, nnz)");
  }
  check_values(values, x, nnz, block_size);

  const int64_t empty = 0;
  Tensor dx = need_dx ? torch::stable::new_empty(x, {x.size(0), in_dim})
                      : torch::stable::new_empty(x, {empty});
  Tensor d_values = need_d_values ? torch::stable::new_empty(values, values.sizes())
                                  : torch::stable::new_empty(values, {empty});
  Tensor d_bias = torch::stable::new_empty(x, {has_bias ? out_dim : empty});
  // dx (SpMM over the transposed layout) and dW (SDDMM) tasks share one parallel region.
  MMATTN_DISPATCH_FLOAT_TYPES(x.scalar_type(), [&] {
    std::optional<SpmmPlan<scalar_t>> dx_plan;
    if (need_dx) {
      dx_plan.emplace(grad_y, values, ccol_indices.const_data_ptr<int32_t>(),
                      row_indices_t.const_data_ptr<int32_t>(), nnz, in_dim, block_size,
                      std::nullopt, perm, dx);
    }
    const SddmmPlan<scalar_t> dw_plan(grad_y, x, block_size,
                                      crow_indices.const_data_ptr<int32_t>(),
                                      col_indices.const_data_ptr<int32_t>(), nnz, need_d_values,
                                      has_bias);
    const int64_t dx_tasks = dx_plan ? dx_plan->num_tasks : 0;
    const int64_t total = dx_tasks + dw_plan.num_tasks;
    run_queue(total, (dx_plan ? dx_plan->work : 0) + dw_plan.work,
              [&](std::atomic<int64_t>& next) {
                int64_t loaded_tile = -1;
                for (int64_t t; (t = next.fetch_add(1)) < total;) {
                  if (t < dx_tasks) {
                    dx_plan->run(t, loaded_tile);
                  } else {
                    dw_plan.run(t - dx_tasks);
                  }
                }
              });
    dw_plan.finish(need_d_values ? static_cast<scalar_t*>(d_values.mutable_data_ptr()) : nullptr,
                   has_bias ? static_cast<scalar_t*>(d_bias.mutable_data_ptr()) : nullptr);
  });
  return {dx, d_values, d_bias};
}

}  // namespace mmattn

STABLE_TORCH_LIBRARY_FRAGMENT(mmattn, m) {
  // y = x @ W^T + bias for W in a compressed layout; x (N, in) 2-D.
  m.def("ws_spmm(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, "
        "int out_features, int block_size, Tensor? bias) -> Tensor");
  // Gradient of the kept values: dW_e = sum_n grad_y[n, row(e)] x[n, col(e)].
  m.def("ws_sddmm(Tensor grad_y, Tensor x, Tensor crow_indices, Tensor col_indices, "
        "int block_size) -> Tensor");
  // (dx, d_values, d_bias) of ws_spmm; each is empty (0,) unless need_dx / need_d_values /
  // has_bias asks for it.
  m.def("ws_spmm_backward(Tensor grad_y, Tensor x, Tensor values, Tensor crow_indices, "
        "Tensor col_indices, Tensor ccol_indices, Tensor row_indices_t, "
        "Tensor transpose_perm, int block_size, bool has_bias, bool need_dx=True, "
        "bool need_d_values=True) -> (Tensor, Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(mmattn, CPU, m) {
  m.impl("ws_spmm", TORCH_BOX(&mmattn::ws_spmm_cpu));
  m.impl("ws_sddmm", TORCH_BOX(&mmattn::ws_sddmm_cpu));
  m.impl("ws_spmm_backward", TORCH_BOX(&mmattn::ws_spmm_backward_cpu));
}
