// mmattn's CUDA device layer: the only way mmattn kernels reach the hardware.
//
// Kernels use these primitives instead of CUDA built-ins, intrinsics or inline
// PTX (tests/test_cuda_emulator.py checks that no other kernel source does), so
// the same kernel source builds two ways:
//
// * nvcc (the real build, shipped in the wheel): thin wrappers over the CUDA
//   built-ins, warp intrinsics and inline PTX (mma.sync, ldmatrix, cp.async).
// * host compiler with MMATTN_CUDA_EMULATION (the test extension mmattn._C_emu):
//   the same calls go to the SIMT emulator of emulator.h, which runs a launch on
//   the CPU, one fiber per CUDA thread, in a seeded random order between
//   barriers, and computes warp collectives from the PTX ISA's fragment layouts.
//
// Primitives:
//   MMATTN_KERNEL / MMATTN_DEVICE / MMATTN_HOST_DEVICE   function qualifiers
//   thread_x() block_x/y/z() block_dim_x() grid_dim_x/y() lane_id() warp_id()
//   sync_threads()                         block barrier (__syncthreads)
//   sync_warp()                            warp barrier (__syncwarp)
//   shfl_xor(v, mask) shfl_idx(v, src)     full-warp shuffles (float, uint32_t)
//   quad_max / quad_sum / warp_sum         reductions built on shfl_xor
//   dynamic_smem<T>() MMATTN_SHARED(T, name, n)   shared memory
//   mma_m16n8k16<T>(d, a, b)               d += A B, fp16/bf16 in, fp32 accumulate
//   ldmatrix_x4 / ldmatrix_x4_trans / ldmatrix_x2 / ldmatrix_x2_trans
//   cp_async_16(dst, src, valid) cp_async_commit() cp_async_wait<N>() cp_async_wait_all()
//   f16 / bf16, to_float(x), from_float<T>(f), pack2<T>(lo, hi), unpack2<T>(u, &lo, &hi)
//   fast_exp2(x) fast_log2(x)
//   launch(kernel, grid, block, smem, stream, args...)   host side
//
// Fragment conventions (PTX ISA, "Matrix Fragments for mma.m16n8k16 with
// floating point type"; g = lane >> 2, t = lane % 4):
//   A 16x16: a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..)
//   B 16x8 (k x n): b[0] = (k 2t..2t+1, n g), b[1] = (k 2t+8..2t+9, n g)
//   C/D 16x8: d[0], d[1] = (g, 2t), (g, 2t+1); d[2], d[3] = (g+8, 2t), (g+8, 2t+1)
// Each 32-bit A/B register holds two 16-bit elements, the lower column (A) or
// row (B) in the low half.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../stable_utils.h"

#if defined(MMATTN_CUDA_EMULATION)
#include <cmath>
#include <functional>
#include <tuple>

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include "../emu/emulator.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#if defined(MMATTN_CUDA_EMULATION)
#define MMATTN_KERNEL
#define MMATTN_KERNEL_BOUNDS(...)
#define MMATTN_DEVICE inline __attribute__((always_inline))
#define MMATTN_DEV_HOST inline
#define MMATTN_UNROLL _Pragma("GCC unroll 64")
#define MMATTN_SHARED(type, name, count)                                               \
  type* name = static_cast<type*>(                                                     \
      ::mmattn::emu::static_shared(sizeof(type) * (count), alignof(type) < 16 ? 16 : alignof(type)))
#else
#define MMATTN_KERNEL __global__
// MMATTN_KERNEL_BOUNDS(threads[, min_blocks]): min_blocks defaults to 1. Without it
// ptxas (CUDA 13) capped some kernels at 64 registers for occupancy and spilled.
#define MMATTN_KERNEL_BOUNDS_2(threads, blocks) __global__ __launch_bounds__(threads, blocks)
#define MMATTN_KERNEL_BOUNDS_1(threads) __global__ __launch_bounds__(threads, 1)
#define MMATTN_PICK_BOUNDS(_1, _2, name, ...) name
#define MMATTN_KERNEL_BOUNDS(...) \
  MMATTN_PICK_BOUNDS(__VA_ARGS__, MMATTN_KERNEL_BOUNDS_2, MMATTN_KERNEL_BOUNDS_1, )(__VA_ARGS__)
#define MMATTN_DEVICE __device__ __forceinline__
#define MMATTN_DEV_HOST __host__ __device__ __forceinline__
#define MMATTN_UNROLL _Pragma("unroll")
#define MMATTN_SHARED(type, name, count) __shared__ __align__(16) type name[count]
#endif

namespace mmattn::dev {

// ------------------------------------------------------------------ types

#if defined(MMATTN_CUDA_EMULATION)
struct f16 {
  uint16_t bits;
};
struct bf16 {
  uint16_t bits;
};
using Stream = void*;
using Dim3 = ::mmattn::emu::Dim3;
struct alignas(16) Vec16 {
  uint32_t x, y, z, w;
};
#else
using f16 = __half;
using bf16 = __nv_bfloat16;
using Stream = cudaStream_t;
using Dim3 = dim3;
using Vec16 = uint4;
#endif

template <class T>
struct is_half16 : std::integral_constant<bool, std::is_same<T, f16>::value ||
                                                    std::is_same<T, bf16>::value> {};

// ------------------------------------------------------------------ indices

#if defined(MMATTN_CUDA_EMULATION)
MMATTN_DEVICE unsigned thread_x() { return emu::self().thread_idx.x; }
MMATTN_DEVICE unsigned block_x() { return emu::self().block_idx.x; }
MMATTN_DEVICE unsigned block_y() { return emu::self().block_idx.y; }
MMATTN_DEVICE unsigned block_z() { return emu::self().block_idx.z; }
MMATTN_DEVICE unsigned block_dim_x() { return emu::self().block_dim.x; }
MMATTN_DEVICE unsigned grid_dim_x() { return emu::self().grid_dim.x; }
MMATTN_DEVICE unsigned grid_dim_y() { return emu::self().grid_dim.y; }
#else
MMATTN_DEVICE unsigned thread_x() { return threadIdx.x; }
MMATTN_DEVICE unsigned block_x() { return blockIdx.x; }
MMATTN_DEVICE unsigned block_y() { return blockIdx.y; }
MMATTN_DEVICE unsigned block_z() { return blockIdx.z; }
MMATTN_DEVICE unsigned block_dim_x() { return blockDim.x; }
MMATTN_DEVICE unsigned grid_dim_x() { return gridDim.x; }
MMATTN_DEVICE unsigned grid_dim_y() { return gridDim.y; }
#endif
// Kernels use one-dimensional blocks: lane and warp follow from thread_x().
MMATTN_DEVICE unsigned lane_id() { return thread_x() % 32; }
MMATTN_DEVICE unsigned warp_id() { return thread_x() / 32; }

// ------------------------------------------------------------------ barriers

MMATTN_DEVICE void sync_threads() {
#if defined(MMATTN_CUDA_EMULATION)
  emu::barrier();
#else
  __syncthreads();
#endif
}

MMATTN_DEVICE void sync_warp() {
#if defined(MMATTN_CUDA_EMULATION)
  emu::warp_collective(emu::Collective::SyncWarp);
#else
  __syncwarp();
#endif
}

// ------------------------------------------------------------------ shuffles

MMATTN_DEVICE uint32_t shfl_xor(uint32_t v, int lane_mask) {
#if defined(MMATTN_CUDA_EMULATION)
  emu::LaneSlot& s = *emu::self().slot;
  s.in[0] = v;
  s.arg = lane_mask;
  emu::warp_collective(emu::Collective::ShflXor);
  return s.out[0];
#else
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
#endif
}

MMATTN_DEVICE uint32_t shfl_idx(uint32_t v, int src_lane) {
#if defined(MMATTN_CUDA_EMULATION)
  emu::LaneSlot& s = *emu::self().slot;
  s.in[0] = v;
  s.arg = src_lane;
  emu::warp_collective(emu::Collective::ShflIdx);
  return s.out[0];
#else
  return __shfl_sync(0xffffffffu, v, src_lane);
#endif
}

MMATTN_DEVICE float as_float(uint32_t u) {
#if defined(MMATTN_CUDA_EMULATION)
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#else
  return __uint_as_float(u);
#endif
}
MMATTN_DEVICE uint32_t as_uint(float f) {
#if defined(MMATTN_CUDA_EMULATION)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#else
  return __float_as_uint(f);
#endif
}

MMATTN_DEVICE float shfl_xor(float v, int lane_mask) {
  return as_float(shfl_xor(as_uint(v), lane_mask));
}
MMATTN_DEVICE float shfl_idx(float v, int src_lane) {
  return as_float(shfl_idx(as_uint(v), src_lane));
}

// Reductions over the 4 lanes of a quad (the lanes that share an MMA row).
MMATTN_DEVICE float quad_max(float v) {
  v = fmaxf(v, shfl_xor(v, 1));
  return fmaxf(v, shfl_xor(v, 2));
}
MMATTN_DEVICE float quad_sum(float v) {
  v += shfl_xor(v, 1);
  return v + shfl_xor(v, 2);
}
// Butterfly sum over the warp; every lane gets the same, order-fixed, result.
MMATTN_DEVICE float warp_sum(float v) {
  MMATTN_UNROLL
  for (int m = 16; m >= 1; m /= 2) v += shfl_xor(v, m);
  return v;
}

// ------------------------------------------------------------------ shared memory

template <class T>
MMATTN_DEVICE T* dynamic_smem() {
#if defined(MMATTN_CUDA_EMULATION)
  return reinterpret_cast<T*>(emu::self().smem);
#else
  extern __shared__ __align__(128) unsigned char mmattn_dynamic_smem[];
  return reinterpret_cast<T*>(mmattn_dynamic_smem);
#endif
}

// ------------------------------------------------------------------ 16-bit floats

#if defined(MMATTN_CUDA_EMULATION)
MMATTN_DEVICE float to_float(f16 x) { return c10::detail::fp16_ieee_to_fp32_value(x.bits); }
MMATTN_DEVICE float to_float(bf16 x) { return c10::detail::f32_from_bits(x.bits); }
MMATTN_DEVICE uint16_t bits16(f16 x) { return x.bits; }
MMATTN_DEVICE uint16_t bits16(bf16 x) { return x.bits; }
template <class T>
MMATTN_DEVICE T from_float(float f);
template <>
MMATTN_DEVICE f16 from_float<f16>(float f) {
  return f16{c10::detail::fp16_ieee_from_fp32_value(f)};
}
template <>
MMATTN_DEVICE bf16 from_float<bf16>(float f) {
  return bf16{c10::detail::round_to_nearest_even(f)};
}
template <>
MMATTN_DEVICE float from_float<float>(float f) {
  return f;
}
#else
MMATTN_DEVICE float to_float(f16 x) { return __half2float(x); }
MMATTN_DEVICE float to_float(bf16 x) { return __bfloat162float(x); }
MMATTN_DEVICE uint16_t bits16(f16 x) { return __half_as_ushort(x); }
MMATTN_DEVICE uint16_t bits16(bf16 x) { return __bfloat16_as_ushort(x); }
template <class T>
MMATTN_DEVICE T from_float(float f);
template <>
MMATTN_DEVICE f16 from_float<f16>(float f) {
  return __float2half_rn(f);
}
template <>
MMATTN_DEVICE bf16 from_float<bf16>(float f) {
  return __float2bfloat16_rn(f);
}
template <>
MMATTN_DEVICE float from_float<float>(float f) {
  return f;
}
#endif
MMATTN_DEVICE float to_float(float x) { return x; }

// Two values rounded to T and packed into one 32-bit register, `lo` in the low half.
template <class T>
MMATTN_DEVICE uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(bits16(from_float<T>(lo))) |
         (static_cast<uint32_t>(bits16(from_float<T>(hi))) << 16);
}

template <class T>
MMATTN_DEVICE T from_bits16(uint16_t b) {
#if defined(MMATTN_CUDA_EMULATION)
  return T{b};
#else
  if constexpr (std::is_same<T, f16>::value) {
    return __ushort_as_half(b);
  } else {
    return __ushort_as_bfloat16(b);
  }
#endif
}

template <class T>
MMATTN_DEVICE void unpack2(uint32_t u, float* lo, float* hi) {
  *lo = to_float(from_bits16<T>(static_cast<uint16_t>(u & 0xffffu)));
  *hi = to_float(from_bits16<T>(static_cast<uint16_t>(u >> 16)));
}

// ------------------------------------------------------------------ math

MMATTN_DEVICE float fast_exp2(float x) {
#if defined(MMATTN_CUDA_EMULATION)
  return std::exp2(x);
#else
  return exp2f(x);  // ex2.approx under --use_fast_math; exp2(-inf) = 0
#endif
}
MMATTN_DEVICE float fast_log2(float x) {
#if defined(MMATTN_CUDA_EMULATION)
  return std::log2(x);
#else
  return log2f(x);
#endif
}

// ------------------------------------------------------------------ tensor cores

// d (16x8, fp32) += A (16x16) B (16x8), fragments as documented above; T is f16 or bf16.
template <class T>
MMATTN_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(is_half16<T>::value, "mma_m16n8k16 takes f16 or bf16 inputs");
#if defined(MMATTN_CUDA_EMULATION)
  emu::LaneSlot& s = *emu::self().slot;
  for (int i = 0; i < 4; ++i) s.in[i] = a[i];
  s.in[4] = b[0];
  s.in[5] = b[1];
  for (int i = 0; i < 4; ++i) s.in[6 + i] = as_uint(d[i]);
  emu::warp_collective(std::is_same<T, f16>::value ? emu::Collective::MmaF16
                                                   : emu::Collective::MmaBF16);
  for (int i = 0; i < 4; ++i) d[i] = as_float(s.out[i]);
#else
  if constexpr (std::is_same<T, f16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

#if !defined(MMATTN_CUDA_EMULATION)
MMATTN_DEVICE uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// ldmatrix .m8n8 .b16 from shared memory: lanes 8m..8m+7 give the row addresses
// (16 bytes each, 16-byte aligned) of matrix m; register m of lane l receives row
// l/4, columns 2(l%4) and 2(l%4)+1 of matrix m (.trans: column l/4 of rows 2(l%4)
// and 2(l%4)+1). With x2 only lanes 0..15 give addresses.
MMATTN_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if defined(MMATTN_CUDA_EMULATION)
  emu::LaneSlot& s = *emu::self().slot;
  s.ptr = row;
  emu::warp_collective(emu::Collective::LdMatrixX4);
  for (int i = 0; i < 4; ++i) r[i] = s.out[i];
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
#endif
}
MMATTN_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
#if defined(MMATTN_CUDA_EMULATION)
  emu::LaneSlot& s = *emu::self().slot;
  s.ptr = row;
  emu::warp_collective(emu::Collective::LdMatrixX4Trans);
  for (int i = 0; i < 4; ++i) r[i] = s.out[i];
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
#endif
}
MMATTN_DEVICE void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
#if defined(MMATTN_CUDA_EMULATION)
  emu::LaneSlot& s = *emu::self().slot;
  s.ptr = row;
  emu::warp_collective(emu::Collective::LdMatrixX2);
  r[0] = s.out[0];
  r[1] = s.out[1];
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(row)));
#endif
}
MMATTN_DEVICE void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
#if defined(MMATTN_CUDA_EMULATION)
  emu::LaneSlot& s = *emu::self().slot;
  s.ptr = row;
  emu::warp_collective(emu::Collective::LdMatrixX2Trans);
  r[0] = s.out[0];
  r[1] = s.out[1];
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(row)));
#endif
}

// ------------------------------------------------------------------ async copies

// 16 bytes global -> shared without passing through registers; `valid` false
// writes 16 zero bytes instead (nothing is read from `src`). Both addresses
// 16-byte aligned. Completes only at a cp_async_wait covering its group.
MMATTN_DEVICE void cp_async_16(void* dst, const void* src, bool valid) {
#if defined(MMATTN_CUDA_EMULATION)
  emu::cp_async(dst, src, valid ? 16u : 0u, 16u);
#else
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
               "l"(src), "r"(src_bytes));
#endif
}
MMATTN_DEVICE void cp_async_commit() {
#if defined(MMATTN_CUDA_EMULATION)
  emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most N committed groups of this thread are still in flight.
template <int N>
MMATTN_DEVICE void cp_async_wait() {
#if defined(MMATTN_CUDA_EMULATION)
  emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}
MMATTN_DEVICE void cp_async_wait_all() {
  cp_async_commit();
  cp_async_wait<0>();
}

// ------------------------------------------------------------------ vector memory

MMATTN_DEVICE Vec16 load16(const void* p) {
#if defined(MMATTN_CUDA_EMULATION)
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) emu::fail("16-byte load from a misaligned address");
  Vec16 v;
  std::memcpy(&v, p, 16);
  return v;
#else
  return *reinterpret_cast<const uint4*>(p);
#endif
}
MMATTN_DEVICE void store16(void* p, const Vec16& v) {
#if defined(MMATTN_CUDA_EMULATION)
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) emu::fail("16-byte store to a misaligned address");
  std::memcpy(p, &v, 16);
#else
  *reinterpret_cast<uint4*>(p) = v;
#endif
}
MMATTN_DEVICE uint32_t load_u32(const void* p) {
#if defined(MMATTN_CUDA_EMULATION)
  if (reinterpret_cast<uintptr_t>(p) % 4 != 0) emu::fail("4-byte access at a misaligned address");
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
#else
  return *reinterpret_cast<const uint32_t*>(p);
#endif
}
MMATTN_DEVICE void store_u32(void* p, uint32_t v) {
#if defined(MMATTN_CUDA_EMULATION)
  if (reinterpret_cast<uintptr_t>(p) % 4 != 0) emu::fail("4-byte access at a misaligned address");
  std::memcpy(p, &v, 4);
#else
  *reinterpret_cast<uint32_t*>(p) = v;
#endif
}

// ------------------------------------------------------------------ launch (host)

#if defined(MMATTN_CUDA_EMULATION)
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), Dim3 grid, Dim3 block, size_t smem, Stream,
            const char* name, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel argument count");
  // Arguments are converted once, as a launch copies them to the device;
  // every thread then calls the kernel with its own copy.
  std::tuple<std::decay_t<Params>...> packed(static_cast<Params>(args)...);
  const std::function<void()> body = [&]() { std::apply(kernel, packed); };
  emu::launch(grid, block, smem, body, name);
}
#else
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), Dim3 grid, Dim3 block, size_t smem, Stream stream,
            const char* name, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel argument count");
  if (smem > 48 * 1024) {
    // Dynamic shared memory above 48 KB must be opted into per kernel.
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) {
      STD_TORCH_CHECK(false, "mmattn: cannot give ", name, " ", smem,
                      " bytes of shared memory: ", cudaGetErrorString(err));
    }
  }
  kernel<<<grid, block, smem, stream>>>(static_cast<Params>(args)...);
  const cudaError_t err = cudaGetLastError();
  STD_TORCH_CHECK(err == cudaSuccess, "mmattn: CUDA launch of ", name, " failed: ",
                  cudaGetErrorString(err));
}
#endif

}  // namespace mmattn::dev
