// Probes of the device layer's warp primitives: one warp runs one primitive on
// register contents given by the caller and returns every lane's result. Tests
// use them to pin mma.m16n8k16 and ldmatrix to the PTX ISA's fragment tables,
// under the emulator (mmattn_emu::) and, on a GPU, on the hardware (mmattn::):
// the same test passing on both proves the emulator computes what the GPU does.
#include "host.h"

namespace mmattn {
namespace {

// a_regs (32, 4), b_regs (32, 2) int32 register bits; c (32, 4) float32 -> d (32, 4).
template <class T>
MMATTN_KERNEL void probe_mma_kernel(const uint32_t* a_regs, const uint32_t* b_regs,
                                    const float* c, float* d) {
  const unsigned lane = dev::lane_id();
  uint32_t a[4], b[2];
  float acc[4];
  for (int i = 0; i < 4; ++i) a[i] = a_regs[lane * 4 + i];
  for (int i = 0; i < 2; ++i) b[i] = b_regs[lane * 2 + i];
  for (int i = 0; i < 4; ++i) acc[i] = c[lane * 4 + i];
  dev::mma_m16n8k16<T>(acc, a, b);
  for (int i = 0; i < 4; ++i) d[lane * 4 + i] = acc[i];
}

// tile (32, 8) 16-bit rows -> (32, 4) registers of ldmatrix; lane l gives row l.
MMATTN_KERNEL void probe_ldmatrix_kernel(const uint16_t* tile, uint32_t* out, int mode) {
  const unsigned lane = dev::lane_id();
  uint16_t* rows = dev::dynamic_smem<uint16_t>();
  for (int c = 0; c < 8; ++c) rows[lane * 8 + c] = tile[lane * 8 + c];
  dev::sync_threads();
  uint32_t r[4] = {0u, 0u, 0u, 0u};
  const void* row = rows + lane * 8;
  if (mode == 0) dev::ldmatrix_x4(r, row);
  if (mode == 1) dev::ldmatrix_x4_trans(r, row);
  if (mode >= 2) {
    uint32_t r2[2] = {0u, 0u};
    // x2 reads the addresses of lanes 0..15 only; the others pass any valid one.
    const void* row2 = rows + (lane % 16) * 8;
    if (mode == 2) dev::ldmatrix_x2(r2, row2);
    if (mode == 3) dev::ldmatrix_x2_trans(r2, row2);
    r[0] = r2[0];
    r[1] = r2[1];
  }
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r[i];
}

// values (32,) uint32 -> (2, 32): shfl_xor(v, arg) and shfl_idx(v, (lane + arg) % 32).
MMATTN_KERNEL void probe_shfl_kernel(const uint32_t* values, uint32_t* out, int arg) {
  const unsigned lane = dev::lane_id();
  const uint32_t v = values[lane];
  out[lane] = dev::shfl_xor(v, arg);
  out[32 + lane] = dev::shfl_idx(v, static_cast<int>((lane + arg) % 32));
}

void check_probe_tensor(const Tensor& t, const char* name, ScalarType dtype, int64_t rows,
                        int64_t cols) {
  STD_TORCH_CHECK(cuda_host::on_device(t) && t.scalar_type() == dtype && t.is_contiguous() &&
                      t.dim() == 2 && t.size(0) == rows && t.size(1) == cols,
                  "probe: ", name, " must be a contiguous ", cuda_host::kDeviceName, " tensor (",
                  rows, ", ", cols, ")");
}

Tensor probe_mma(Tensor a_regs, Tensor b_regs, Tensor c, bool bf16) {
  check_probe_tensor(a_regs, "a_regs", ScalarType::Int, 32, 4);
  check_probe_tensor(b_regs, "b_regs", ScalarType::Int, 32, 2);
  check_probe_tensor(c, "c", ScalarType::Float, 32, 4);
  const cuda_host::DeviceGuard guard(c);
  Tensor d = torch::stable::new_empty(c, {32, 4}, ScalarType::Float);
  auto* a = static_cast<const uint32_t*>(a_regs.const_data_ptr());
  auto* b = static_cast<const uint32_t*>(b_regs.const_data_ptr());
  auto kernel = bf16 ? probe_mma_kernel<dev::bf16> : probe_mma_kernel<dev::f16>;
  dev::launch(kernel, dev::Dim3(1), dev::Dim3(32), 0, cuda_host::stream_of(c),
              "probe_mma_kernel", a, b, c.const_data_ptr<float>(), d.mutable_data_ptr<float>());
  return d;
}

Tensor probe_ldmatrix(Tensor tile, int64_t mode) {
  check_probe_tensor(tile, "tile", ScalarType::Short, 32, 8);
  STD_TORCH_CHECK(mode >= 0 && mode <= 3, "probe_ldmatrix: mode must be 0 (x4), 1 (x4.trans), "
                  "2 (x2) or 3 (x2.trans)");
  const cuda_host::DeviceGuard guard(tile);
  Tensor out = torch::stable::new_zeros(tile, {32, 4}, ScalarType::Int);
  dev::launch(probe_ldmatrix_kernel, dev::Dim3(1), dev::Dim3(32), 32 * 8 * 2,
              cuda_host::stream_of(tile), "probe_ldmatrix_kernel",
              static_cast<const uint16_t*>(tile.const_data_ptr()),
              static_cast<uint32_t*>(out.mutable_data_ptr()), static_cast<int>(mode));
  return out;
}

Tensor probe_shfl(Tensor values, int64_t arg) {
  STD_TORCH_CHECK(cuda_host::on_device(values) && values.scalar_type() == ScalarType::Int &&
                      values.is_contiguous() && values.numel() == 32,
                  "probe_shfl: values must be 32 contiguous int32");
  STD_TORCH_CHECK(arg >= 0 && arg < 32, "probe_shfl: arg must be in [0, 32)");
  const cuda_host::DeviceGuard guard(values);
  Tensor out = torch::stable::new_empty(values, {2, 32}, ScalarType::Int);
  dev::launch(probe_shfl_kernel, dev::Dim3(1), dev::Dim3(32), 0, cuda_host::stream_of(values),
              "probe_shfl_kernel", static_cast<const uint32_t*>(values.const_data_ptr()),
              static_cast<uint32_t*>(out.mutable_data_ptr()), static_cast<int>(arg));
  return out;
}

}  // namespace
}  // namespace mmattn

MMATTN_CUDA_FRAGMENT(m) {
  // Device-layer probes (one warp): see the file comment.
  m.def("cuda_probe_mma(Tensor a_regs, Tensor b_regs, Tensor c, bool bf16) -> Tensor");
  m.def("cuda_probe_ldmatrix(Tensor tile, int mode) -> Tensor");
  m.def("cuda_probe_shfl(Tensor values, int arg) -> Tensor");
}

MMATTN_CUDA_IMPL(m) {
  m.impl("cuda_probe_mma", TORCH_BOX(&mmattn::probe_mma));
  m.impl("cuda_probe_ldmatrix", TORCH_BOX(&mmattn::probe_ldmatrix));
  m.impl("cuda_probe_shfl", TORCH_BOX(&mmattn::probe_shfl));
}
