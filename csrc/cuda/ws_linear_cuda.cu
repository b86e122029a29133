// CUDA kernels of the Watts-Strogatz sparse linear layer: y = x @ W^T + b with
// only the kept entries (or bs x bs blocks) of W stored (mmattn/layout.py).
//
//   <ns>::cuda_ws_spmm           y = x W^T + bias (CSR or block-CSR)
//   <ns>::cuda_ws_spmm_backward  (dx, d_values, d_bias): dx = dy W is the same SpMM
//                                over the transposed layout (ccol / row_indices_t /
//                                transpose_perm), d_values an SDDMM over kept entries
//
// Kernels (T = float32, float16 or bfloat16; float32 accumulation):
//   spmm_csr        element layouts: one thread per output feature and 8 batch rows,
//                   walking its CSR row once for the 8 rows (x gathered through L1)
//   spmm_bsr        block layouts, scalar: one thread per output feature and 8 batch
//                   rows; a block's weight row is read with 16-byte vector loads
//   spmm_bsr_mma    block layouts with bs % 16 == 0 in float16/bfloat16: tensor cores
//                   (mma.m16n8k16), one warp per 16 batch rows x 16 output features
//   sddmm_csr       one warp per weight row: lanes split the batch, butterfly sums
//   sddmm_bsr(_mma) one thread per block element / one warp per 16 x 16 block tile
//                   (tensor cores, the batch as the k dimension)
//   column_sum      d_bias, one warp per output feature
// Deterministic: every output is summed by one thread or warp in a fixed order, no
// atomics. Edge blocks of lengths that are not multiples of bs are cropped.
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "host.h"

namespace mmattn::ws_cuda {

constexpr int kThreads = 128;
constexpr int kRows = 8;  // batch rows per thread in the scalar SpMM kernels

// y (N x M) = x (N x K) A^T for a sparse A (M x K) in (block-)CSR: row r of A has
// entries ptr[r]..ptr[r+1] at columns idx[e] with values values[perm ? perm[e] : e].
// With `trans`, block values are read transposed (A is the transposed layout of W).
struct SpmmParams {
  const void* x = nullptr;
  int64_t x_ld = 0;
  void* y = nullptr;  // contiguous (N, M)
  const void* values = nullptr;
  const int32_t* ptr = nullptr;
  const int32_t* idx = nullptr;
  const int32_t* perm = nullptr;
  const void* bias = nullptr;  // (M,) or nullptr
  int N = 0, K = 0, M = 0, bs = 1;
};

// d_values of W (M x K, bs x bs blocks): entry e = perm[p] sits at block row
// row_t[p], block column col[e]; d_values[e] = sum_n dy[n, rows] x[n, cols].
struct SddmmParams {
  const void* dy = nullptr;
  int64_t dy_ld = 0;
  const void* x = nullptr;
  int64_t x_ld = 0;
  void* d_values = nullptr;  // contiguous, like values
  const int32_t* crow = nullptr;
  const int32_t* col = nullptr;
  const int32_t* row_t = nullptr;
  const int32_t* perm = nullptr;
  int N = 0, K = 0, M = 0, bs = 1, nnz = 0;
};

template <class T>
MMATTN_DEVICE float ld(const void* p, int64_t i) {
  return dev::to_float(static_cast<const T*>(p)[i]);
}

template <class T>
MMATTN_KERNEL_BOUNDS(kThreads) void spmm_csr_kernel(const SpmmParams p) {
  const int r = static_cast<int>(dev::block_x() * kThreads + dev::thread_x());
  const int n0 = static_cast<int>(dev::block_y()) * kRows;
  if (r >= p.M) return;
  float acc[kRows];
  MMATTN_UNROLL
  for (int u = 0; u < kRows; ++u) acc[u] = 0.f;
  const int rows = n0 + kRows <= p.N ? kRows : p.N - n0;
  for (int e = p.ptr[r]; e < p.ptr[r + 1]; ++e) {
    const int c = p.idx[e];
    const float w = ld<T>(p.values, p.perm != nullptr ? p.perm[e] : e);
    const T* xc = static_cast<const T*>(p.x) + c;
    MMATTN_UNROLL
    for (int u = 0; u < kRows; ++u) {
      if (u < rows) acc[u] += w * dev::to_float(xc[(n0 + u) * p.x_ld]);
    }
  }
  const float b = p.bias != nullptr ? ld<T>(p.bias, r) : 0.f;
  T* y = static_cast<T*>(p.y);
  for (int u = 0; u < rows; ++u) y[static_cast<int64_t>(n0 + u) * p.M + r] = dev::from_float<T>(acc[u] + b);
}

// 16 bytes of T as floats (4 float32 or 8 half values).
template <class T>
MMATTN_DEVICE int unpack16(const dev::Vec16& v, float* out) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  if constexpr (sizeof(T) == 4) {
    for (int i = 0; i < 4; ++i) out[i] = dev::as_float(w[i]);
    return 4;
  } else {
    for (int i = 0; i < 4; ++i) dev::unpack2<T>(w[i], &out[2 * i], &out[2 * i + 1]);
    return 8;
  }
}

template <class T, bool kTrans, bool kVec>
MMATTN_KERNEL_BOUNDS(kThreads) void spmm_bsr_kernel(const SpmmParams p) {
  const int o = static_cast<int>(dev::block_x() * kThreads + dev::thread_x());
  const int n0 = static_cast<int>(dev::block_y()) * kRows;
  if (o >= p.M) return;
  const int bs = p.bs, br = o / bs, i = o % bs;
  const int rows = n0 + kRows <= p.N ? kRows : p.N - n0;
  float acc[kRows];
  MMATTN_UNROLL
  for (int u = 0; u < kRows; ++u) acc[u] = 0.f;
  const T* values = static_cast<const T*>(p.values);
  const T* x = static_cast<const T*>(p.x);
  for (int e = p.ptr[br]; e < p.ptr[br + 1]; ++e) {
    const int c0 = p.idx[e] * bs;
    const int64_t vb = static_cast<int64_t>(p.perm != nullptr ? p.perm[e] : e) * bs * bs;
    const int width = c0 + bs <= p.K ? bs : p.K - c0;  // edge blocks are cropped
    constexpr int kChunk = 16 / sizeof(T);
    for (int j0 = 0; j0 < width; j0 += kChunk) {
      float w[kChunk];
      if constexpr (kVec && !kTrans) {
        // This thread's weight row of the block is contiguous: one 16-byte load.
        unpack16<T>(dev::load16(values + vb + static_cast<int64_t>(i) * bs + j0), w);
      } else {
        MMATTN_UNROLL
        for (int jj = 0; jj < kChunk; ++jj) {
          const int j = j0 + jj < bs ? j0 + jj : bs - 1;
          w[jj] = dev::to_float(kTrans ? values[vb + static_cast<int64_t>(j) * bs + i]
                                       : values[vb + static_cast<int64_t>(i) * bs + j]);
        }
      }
      const int span = width - j0 < kChunk ? width - j0 : kChunk;
      MMATTN_UNROLL
      for (int u = 0; u < kRows; ++u) {
        if (u >= rows) break;
        const T* xr = x + (n0 + u) * p.x_ld + c0 + j0;
        MMATTN_UNROLL  // constant indices into w keep it in registers
        for (int jj = 0; jj < kChunk; ++jj) {
          if (jj < span) acc[u] += w[jj] * dev::to_float(xr[jj]);
        }
      }
    }
  }
  const float b = p.bias != nullptr ? ld<T>(p.bias, o) : 0.f;
  T* y = static_cast<T*>(p.y);
  for (int u = 0; u < rows; ++u) y[static_cast<int64_t>(n0 + u) * p.M + o] = dev::from_float<T>(acc[u] + b);
}

// Element (row, col) of a row-major matrix, 0 outside (rows, cols).
template <class T>
MMATTN_DEVICE float ld_guard(const T* base, int64_t ld_, int row, int col, int rows, int cols) {
  return row < rows && col < cols ? dev::to_float(base[row * ld_ + col]) : 0.f;
}

// Tensor-core block SpMM: warp w of the CTA computes batch rows n0..n0+15 x output
// features o0..o0+15 (two n-tiles of 8) over the k dimension of every block of its
// block row, 16 at a time. Fragments are gathered straight from global memory.
template <class T, bool kTrans>
MMATTN_KERNEL_BOUNDS(kThreads) void spmm_bsr_mma_kernel(const SpmmParams p) {
  const int lane = static_cast<int>(dev::lane_id()), warp = static_cast<int>(dev::warp_id());
  const int g = lane / 4, t = lane % 4;
  const int bs = p.bs, chunks = bs / 16;
  const int br = static_cast<int>(dev::block_x()) / chunks;
  const int ol = (static_cast<int>(dev::block_x()) % chunks) * 16;  // first feature in the block
  const int o0 = br * bs + ol;
  const int n0 = (static_cast<int>(dev::block_y()) * 4 + warp) * 16;
  if (n0 >= p.N) return;  // the whole warp leaves together
  const T* values = static_cast<const T*>(p.values);
  const T* x = static_cast<const T*>(p.x);
  float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  for (int e = p.ptr[br]; e < p.ptr[br + 1]; ++e) {
    const int c0 = p.idx[e] * bs;
    const T* vb = values + static_cast<int64_t>(p.perm != nullptr ? p.perm[e] : e) * bs * bs;
    for (int kk = 0; kk < bs; kk += 16) {
      uint32_t a[4];
      MMATTN_UNROLL
      for (int r = 0; r < 4; ++r) {  // A(m = batch row, k = input feature), documented layout
        const int row = n0 + g + (r % 2) * 8, col = c0 + kk + 2 * t + (r / 2) * 8;
        a[r] = dev::pack2<T>(ld_guard(x, p.x_ld, row, col, p.N, p.K),
                             ld_guard(x, p.x_ld, row, col + 1, p.N, p.K));
      }
      MMATTN_UNROLL
      for (int jn = 0; jn < 2; ++jn) {
        uint32_t b[2];
        const int n = ol + jn * 8 + g;  // output feature within the block
        MMATTN_UNROLL
        for (int r = 0; r < 2; ++r) {  // B(k, n) = A[n][k] of this block
          const int k = kk + 2 * t + r * 8;
          float w0, w1;
          if (kTrans) {
            w0 = dev::to_float(vb[static_cast<int64_t>(k) * bs + n]);
            w1 = dev::to_float(vb[static_cast<int64_t>(k + 1) * bs + n]);
          } else {
            w0 = dev::to_float(vb[static_cast<int64_t>(n) * bs + k]);
            w1 = dev::to_float(vb[static_cast<int64_t>(n) * bs + k + 1]);
          }
          b[r] = dev::pack2<T>(w0, w1);
        }
        dev::mma_m16n8k16<T>(acc[jn], a, b);
      }
    }
  }
  T* y = static_cast<T*>(p.y);
  MMATTN_UNROLL
  for (int jn = 0; jn < 2; ++jn) {
    MMATTN_UNROLL
    for (int e = 0; e < 4; ++e) {
      const int row = n0 + g + (e / 2) * 8, o = o0 + jn * 8 + 2 * t + (e % 2);
      if (row < p.N && o < p.M) {
        const float b = p.bias != nullptr ? ld<T>(p.bias, o) : 0.f;
        y[static_cast<int64_t>(row) * p.M + o] = dev::from_float<T>(acc[jn][e] + b);
      }
    }
  }
}

// d_values of an element layout: warp per weight row, 8 entries at a time.
template <class T>
MMATTN_KERNEL_BOUNDS(kThreads) void sddmm_csr_kernel(const SddmmParams p) {
  const int lane = static_cast<int>(dev::lane_id());
  const int r = static_cast<int>(dev::block_x()) * (kThreads / 32) + static_cast<int>(dev::warp_id());
  if (r >= p.M) return;
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.d_values);
  const int end = p.crow[r + 1];
  for (int e0 = p.crow[r]; e0 < end; e0 += 8) {
    const int count = end - e0 < 8 ? end - e0 : 8;
    int cols[8];
    float acc[8];
    MMATTN_UNROLL
    for (int u = 0; u < 8; ++u) {
      cols[u] = u < count ? p.col[e0 + u] : 0;
      acc[u] = 0.f;
    }
    for (int n = lane; n < p.N; n += 32) {
      const float d = dev::to_float(dy[n * p.dy_ld + r]);
      MMATTN_UNROLL
      for (int u = 0; u < 8; ++u) {
        if (u < count) acc[u] += d * dev::to_float(x[n * p.x_ld + cols[u]]);
      }
    }
    MMATTN_UNROLL
    for (int u = 0; u < 8; ++u) {
      const float s = dev::warp_sum(acc[u]);
      if (lane == 0 && u < count) out[e0 + u] = dev::from_float<T>(s);
    }
  }
}

// d_values of a block layout, scalar: one thread per block element.
template <class T>
MMATTN_KERNEL_BOUNDS(kThreads) void sddmm_bsr_kernel(const SddmmParams p) {
  const int64_t idx = static_cast<int64_t>(dev::block_x()) * kThreads + dev::thread_x();
  const int bs = p.bs;
  const int64_t per = static_cast<int64_t>(bs) * bs;
  if (idx >= per * p.nnz) return;
  const int pos = static_cast<int>(idx / per), i = static_cast<int>(idx % per) / bs,
            j = static_cast<int>(idx % bs);
  const int e = p.perm[pos];
  const int row = p.row_t[pos] * bs + i, col = p.col[e] * bs + j;
  float acc = 0.f;
  if (row < p.M && col < p.K) {
    const T* dy = static_cast<const T*>(p.dy);
    const T* x = static_cast<const T*>(p.x);
    for (int n = 0; n < p.N; ++n) {
      acc += dev::to_float(dy[n * p.dy_ld + row]) * dev::to_float(x[n * p.x_ld + col]);
    }
  }
  static_cast<T*>(p.d_values)[static_cast<int64_t>(e) * per + static_cast<int64_t>(i) * bs + j] =
      dev::from_float<T>(acc);
}

// d_values of a block layout on tensor cores: warp per 16 x 16 tile of one block,
// D(i, j) = sum_n dy[n, row0 + i] x[n, col0 + j] with the batch as k.
template <class T>
MMATTN_KERNEL_BOUNDS(kThreads) void sddmm_bsr_mma_kernel(const SddmmParams p) {
  const int lane = static_cast<int>(dev::lane_id()), warp = static_cast<int>(dev::warp_id());
  const int g = lane / 4, t = lane % 4;
  const int bs = p.bs, side = bs / 16;
  const int tile = static_cast<int>(dev::block_y()) * 4 + warp;
  if (tile >= side * side) return;
  const int pos = static_cast<int>(dev::block_x());
  const int e = p.perm[pos];
  const int i0 = (tile / side) * 16, j0 = (tile % side) * 16;
  const int row0 = p.row_t[pos] * bs + i0, col0 = p.col[e] * bs + j0;
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  for (int n0 = 0; n0 < p.N; n0 += 16) {
    uint32_t a[4];
    MMATTN_UNROLL
    for (int r = 0; r < 4; ++r) {  // A(m = i, k = n) = dy[n][row0 + i]
      const int m = g + (r % 2) * 8, k = n0 + 2 * t + (r / 2) * 8;
      a[r] = dev::pack2<T>(ld_guard(dy, p.dy_ld, k, row0 + m, p.N, p.M),
                           ld_guard(dy, p.dy_ld, k + 1, row0 + m, p.N, p.M));
    }
    MMATTN_UNROLL
    for (int jn = 0; jn < 2; ++jn) {
      uint32_t b[2];
      MMATTN_UNROLL
      for (int r = 0; r < 2; ++r) {  // B(k = n, n = j) = x[n][col0 + j]
        const int k = n0 + 2 * t + r * 8, c = col0 + jn * 8 + g;
        b[r] = dev::pack2<T>(ld_guard(x, p.x_ld, k, c, p.N, p.K),
                             ld_guard(x, p.x_ld, k + 1, c, p.N, p.K));
      }
      dev::mma_m16n8k16<T>(acc[jn], a, b);
    }
  }
  T* out = static_cast<T*>(p.d_values) + static_cast<int64_t>(e) * bs * bs;
  MMATTN_UNROLL
  for (int jn = 0; jn < 2; ++jn) {
    MMATTN_UNROLL
    for (int q = 0; q < 4; ++q) {
      const int i = i0 + g + (q / 2) * 8, j = j0 + jn * 8 + 2 * t + (q % 2);
      // Padding of edge blocks gets 0, as in the reference.
      out[static_cast<int64_t>(i) * bs + j] = dev::from_float<T>(acc[jn][q]);
    }
  }
}

// d_bias[r] = sum_n dy[n, r]: warp per output feature.
template <class T>
MMATTN_KERNEL_BOUNDS(kThreads) void column_sum_kernel(const void* dy_, int64_t ld_, int n_rows,
                                                      int cols, void* out_) {
  const int lane = static_cast<int>(dev::lane_id());
  const int r = static_cast<int>(dev::block_x()) * (kThreads / 32) + static_cast<int>(dev::warp_id());
  if (r >= cols) return;
  const T* dy = static_cast<const T*>(dy_);
  float acc = 0.f;
  for (int n = lane; n < n_rows; n += 32) acc += dev::to_float(dy[n * ld_ + r]);
  acc = dev::warp_sum(acc);
  if (lane == 0) static_cast<T*>(out_)[r] = dev::from_float<T>(acc);
}

// ---------------------------------------------------------------- launchers

namespace {

using cuda_host::kDeviceName;

enum class Kind { F32, F16, BF16 };

Kind kind_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case ScalarType::Float: return Kind::F32;
    case ScalarType::Half: return Kind::F16;
    case ScalarType::BFloat16: return Kind::BF16;
    default:
      STD_TORCH_CHECK(false, "cuda ws_linear: x must be float32, float16 or bfloat16");
  }
  return Kind::F32;
}

// Calls f(T{}) with T the device type of `kind`.
template <class F>
void with_type(Kind kind, F&& f) {
  if (kind == Kind::F32) f(float{});
  if (kind == Kind::F16) f(dev::f16{});
  if (kind == Kind::BF16) f(dev::bf16{});
}

// Rows with unit stride along features (other strides are kept).
Tensor unit_rows(const Tensor& t) {
  return t.size(1) <= 1 || t.stride(1) == 1 ? t : torch::stable::contiguous(t);
}

void check_index(const Tensor& t, const char* name, const Tensor& x) {
  STD_TORCH_CHECK(cuda_host::same_device(t, x) && t.scalar_type() == ScalarType::Int &&
                      t.is_contiguous() && t.dim() == 1,
                  "cuda ws_linear: ", name, " must be a contiguous 1-D int32 ", kDeviceName,
                  " tensor on x's device");
}

void check_values(const Tensor& values, const Tensor& x, int64_t nnz, int64_t bs) {
  STD_TORCH_CHECK(cuda_host::same_device(values, x) && values.scalar_type() == x.scalar_type() &&
                      values.is_contiguous(),
                  "cuda ws_linear: values must be contiguous, on x's device, in x's dtype");
  const bool ok = bs == 1 ? values.dim() == 1 && values.size(0) == nnz
                          : values.dim() == 3 && values.size(0) == nnz && values.size(1) == bs &&
                                values.size(2) == bs;
  STD_TORCH_CHECK(ok, "cuda ws_linear: values must be (nnz,) or (nnz, bs, bs) for the layout");
}

bool half_type(Kind k) { return k != Kind::F32; }

// y (N x M) = x A^T for the (block-)CSR A in p; p.y allocated by the caller.
void run_spmm(const SpmmParams& p, Kind kind, bool trans, dev::Stream stream) {
  if (p.N == 0 || p.M == 0) return;
  const dev::Dim3 block(kThreads);
  if (p.bs == 1) {
    const dev::Dim3 grid(cuda_host::ceil_div(p.M, kThreads), cuda_host::ceil_div(p.N, kRows));
    with_type(kind, [&](auto tag) {
      using T = decltype(tag);
      dev::launch(spmm_csr_kernel<T>, grid, block, 0, stream, "spmm_csr_kernel", p);
    });
    return;
  }
  if (half_type(kind) && p.bs % 16 == 0) {
    const dev::Dim3 grid(static_cast<unsigned>(cuda_host::ceil_div(p.M, p.bs) * (p.bs / 16)),
                         cuda_host::ceil_div(p.N, 64));
    with_type(kind, [&](auto tag) {
      using T = decltype(tag);
      if constexpr (!std::is_same<T, float>::value) {
        if (trans) {
          dev::launch(spmm_bsr_mma_kernel<T, true>, grid, block, 0, stream, "spmm_bsr_mma_kernel", p);
        } else {
          dev::launch(spmm_bsr_mma_kernel<T, false>, grid, block, 0, stream, "spmm_bsr_mma_kernel", p);
        }
      }
    });
    return;
  }
  const dev::Dim3 grid(cuda_host::ceil_div(p.M, kThreads), cuda_host::ceil_div(p.N, kRows));
  with_type(kind, [&](auto tag) {
    using T = decltype(tag);
    // Whole 16-byte chunks of a weight row: bs a multiple of 16 bytes (values is contiguous).
    const bool vec = (p.bs * sizeof(T)) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(p.values) % 16 == 0;
    if (trans) {
      dev::launch(spmm_bsr_kernel<T, true, false>, grid, block, 0, stream, "spmm_bsr_kernel", p);
    } else if (vec) {
      dev::launch(spmm_bsr_kernel<T, false, true>, grid, block, 0, stream, "spmm_bsr_kernel", p);
    } else {
      dev::launch(spmm_bsr_kernel<T, false, false>, grid, block, 0, stream, "spmm_bsr_kernel", p);
    }
  });
}

Tensor cuda_ws_spmm(Tensor x, Tensor values, Tensor crow, Tensor col, int64_t out_features,
                    int64_t block_size, std::optional<Tensor> bias) {
  STD_TORCH_CHECK(cuda_host::on_device(x) && x.dim() == 2, "cuda ws_linear: x must be a 2-D ",
                  kDeviceName, " tensor (N, in_features)");
  const Kind kind = kind_of(x);
  STD_TORCH_CHECK(block_size >= 1 && out_features >= 0, "cuda ws_linear: bad block_size or "
                  "out_features");
  check_index(crow, "crow_indices", x);
  check_index(col, "col_indices", x);
  const int64_t bs = block_size, nbr = (out_features + bs - 1) / bs;
  STD_TORCH_CHECK(crow.size(0) == nbr + 1, "cuda ws_linear: crow_indices must have ", nbr + 1,
                  " entries");
  check_values(values, x, col.size(0), bs);
  if (bias.has_value()) {
    STD_TORCH_CHECK(cuda_host::same_device(*bias, x) && bias->scalar_type() == x.scalar_type() &&
                        bias->dim() == 1 && bias->size(0) == out_features,
                    "cuda ws_linear: bias must be (out_features,) in x's dtype and device");
  }
  STD_TORCH_CHECK(x.size(0) < (int64_t{1} << 31) && x.size(1) < (int64_t{1} << 31) &&
                      out_features < (int64_t{1} << 31),
                  "cuda ws_linear: sizes must fit in int32");
  const cuda_host::DeviceGuard guard(x);
  const Tensor xr = unit_rows(x);
  Tensor b;  // the bias, contiguous, when given
  if (bias.has_value()) b = torch::stable::contiguous(*bias);
  Tensor y = torch::stable::new_empty(x, {x.size(0), out_features});
  SpmmParams p;
  p.x = xr.const_data_ptr(), p.x_ld = xr.stride(0);
  p.y = y.mutable_data_ptr();
  p.values = values.const_data_ptr();
  p.ptr = crow.const_data_ptr<int32_t>(), p.idx = col.const_data_ptr<int32_t>();
  p.bias = bias.has_value() ? b.const_data_ptr() : nullptr;
  p.N = static_cast<int>(x.size(0)), p.K = static_cast<int>(x.size(1));
  p.M = static_cast<int>(out_features), p.bs = static_cast<int>(bs);
  run_spmm(p, kind, false, cuda_host::stream_of(x));
  return y;
}

std::tuple<Tensor, Tensor, Tensor> cuda_ws_spmm_backward(
    Tensor grad_y, Tensor x, Tensor values, Tensor crow, Tensor col, Tensor ccol,
    Tensor row_indices_t, Tensor transpose_perm, int64_t block_size, bool has_bias,
    bool need_dx, bool need_d_values) {
  STD_TORCH_CHECK(cuda_host::on_device(x) && x.dim() == 2 && cuda_host::same_device(grad_y, x) &&
                      grad_y.dim() == 2 && grad_y.size(0) == x.size(0) &&
                      grad_y.scalar_type() == x.scalar_type(),
                  "cuda ws_linear backward: grad_y (N, out) and x (N, in) must be 2-D ",
                  kDeviceName, " tensors of one dtype");
  const Kind kind = kind_of(x);
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&crow, "crow_indices"},
                         {&col, "col_indices"},
                         {&ccol, "ccol_indices"},
                         {&row_indices_t, "row_indices_t"},
                         {&transpose_perm, "transpose_perm"}}) {
    check_index(*t, name, x);
  }
  const int64_t bs = block_size, out_features = grad_y.size(1), in_features = x.size(1);
  const int64_t nnz = col.size(0);
  STD_TORCH_CHECK(bs >= 1 && crow.size(0) == (out_features + bs - 1) / bs + 1 &&
                      ccol.size(0) == (in_features + bs - 1) / bs + 1 &&
                      row_indices_t.size(0) == nnz && transpose_perm.size(0) == nnz,
                  "cuda ws_linear backward: index arrays do not match the shapes");
  check_values(values, x, nnz, bs);
  const cuda_host::DeviceGuard guard(x);
  const dev::Stream stream = cuda_host::stream_of(x);
  const Tensor gy = unit_rows(grad_y), xr = unit_rows(x);
  const int n = static_cast<int>(x.size(0));
  Tensor dx = need_dx ? torch::stable::new_empty(x, {x.size(0), in_features})
                      : torch::stable::new_empty(x, {0});
  Tensor d_values = need_d_values ? torch::stable::new_empty(values, values.sizes())
                                  : torch::stable::new_empty(values, {0});
  Tensor d_bias = has_bias ? torch::stable::new_empty(x, {out_features})
                           : torch::stable::new_empty(x, {0});
  if (need_dx) {
    SpmmParams p;  // dx = dy W: the SpMM of the transposed layout
    p.x = gy.const_data_ptr(), p.x_ld = gy.stride(0);
    p.y = dx.mutable_data_ptr();
    p.values = values.const_data_ptr();
    p.ptr = ccol.const_data_ptr<int32_t>(), p.idx = row_indices_t.const_data_ptr<int32_t>();
    p.perm = transpose_perm.const_data_ptr<int32_t>();
    p.N = n, p.K = static_cast<int>(out_features), p.M = static_cast<int>(in_features);
    p.bs = static_cast<int>(bs);
    run_spmm(p, kind, true, stream);
  }
  if (need_d_values && nnz > 0) {
    SddmmParams p;
    p.dy = gy.const_data_ptr(), p.dy_ld = gy.stride(0);
    p.x = xr.const_data_ptr(), p.x_ld = xr.stride(0);
    p.d_values = d_values.mutable_data_ptr();
    p.crow = crow.const_data_ptr<int32_t>(), p.col = col.const_data_ptr<int32_t>();
    p.row_t = row_indices_t.const_data_ptr<int32_t>();
    p.perm = transpose_perm.const_data_ptr<int32_t>();
    p.N = n, p.K = static_cast<int>(in_features), p.M = static_cast<int>(out_features);
    p.bs = static_cast<int>(bs), p.nnz = static_cast<int>(nnz);
    const dev::Dim3 block(kThreads);
    with_type(kind, [&](auto tag) {
      using T = decltype(tag);
      if (bs == 1) {
        dev::launch(sddmm_csr_kernel<T>, dev::Dim3(cuda_host::ceil_div(out_features, 4)), block,
                    0, stream, "sddmm_csr_kernel", p);
      } else if (!std::is_same<T, float>::value && bs % 16 == 0) {
        if constexpr (!std::is_same<T, float>::value) {
          const int64_t tiles = (bs / 16) * (bs / 16);
          dev::launch(sddmm_bsr_mma_kernel<T>,
                      dev::Dim3(static_cast<unsigned>(nnz), cuda_host::ceil_div(tiles, 4)), block,
                      0, stream, "sddmm_bsr_mma_kernel", p);
        }
      } else {
        dev::launch(sddmm_bsr_kernel<T>, dev::Dim3(cuda_host::ceil_div(nnz * bs * bs, kThreads)),
                    block, 0, stream, "sddmm_bsr_kernel", p);
      }
    });
  }
  if (has_bias && out_features > 0) {
    with_type(kind, [&](auto tag) {
      using T = decltype(tag);
      dev::launch(column_sum_kernel<T>, dev::Dim3(cuda_host::ceil_div(out_features, 4)),
                  dev::Dim3(kThreads), 0, stream, "column_sum_kernel", gy.const_data_ptr(),
                  gy.stride(0), n, static_cast<int>(out_features), d_bias.mutable_data_ptr());
    });
  }
  return {dx, d_values, d_bias};
}

}  // namespace
}  // namespace mmattn::ws_cuda

MMATTN_CUDA_FRAGMENT(m) {
  // y = x @ W^T + bias for W in a compressed layout (mmattn.SparseLayout); x (N, in)
  // float32/float16/bfloat16, unit stride along features; y contiguous in x's dtype.
  m.def("cuda_ws_spmm(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, "
        "int out_features, int block_size, Tensor? bias) -> Tensor");
  // (dx, d_values, d_bias); each is empty (0,) unless need_dx / need_d_values / has_bias.
  m.def("cuda_ws_spmm_backward(Tensor grad_y, Tensor x, Tensor values, Tensor crow_indices, "
        "Tensor col_indices, Tensor ccol_indices, Tensor row_indices_t, "
        "Tensor transpose_perm, int block_size, bool has_bias, bool need_dx, "
        "bool need_d_values) -> (Tensor, Tensor, Tensor)");
}

MMATTN_CUDA_IMPL(m) {
  m.impl("cuda_ws_spmm", TORCH_BOX(&mmattn::ws_cuda::cuda_ws_spmm));
  m.impl("cuda_ws_spmm_backward", TORCH_BOX(&mmattn::ws_cuda::cuda_ws_spmm_backward));
}
