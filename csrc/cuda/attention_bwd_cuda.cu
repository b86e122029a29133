// Backward attention kernels: instantiations and launch (see attention_cuda.h).
// Three launches on one stream: delta, then dK/dV and dQ (independent of each other).
#include "attention_kernels.h"

namespace mmattn::attn_cuda {
namespace {

// Query rows per dK/dV step: at head dim 128 the dK and dV accumulators alone take
// 128 registers per thread, so the 16 x BMQ score tiles stay small (BMQ = 32 spilled
// in bfloat16 on sm_90).
template <int DP>
constexpr int dkdv_query_rows() {
  return DP == 64 ? 64 : 16;
}

template <class T, int DP>
void backward(const AttnParams& p, dev::Stream stream) {
  const dev::Dim3 block(kThreads);
  const unsigned hq = static_cast<unsigned>(p.Hq), batch = static_cast<unsigned>(p.B);
  if (p.Lq > 0) {
    const dev::Dim3 grid_delta(static_cast<unsigned>((p.Lq + 3) / 4), hq, batch);
    if (p.o_f32) {
      dev::launch(attention_bwd_delta_kernel<T, float>, grid_delta, block, 0, stream,
                  "attention_bwd_delta_kernel", p);
    } else {
      dev::launch(attention_bwd_delta_kernel<T, T>, grid_delta, block, 0, stream,
                  "attention_bwd_delta_kernel", p);
    }
  }
  if (p.Lk > 0) {
    constexpr int kRows = dkdv_query_rows<DP>();
    const dev::Dim3 grid_kv(static_cast<unsigned>((p.Lk + kBlockN - 1) / kBlockN),
                            static_cast<unsigned>(p.Hkv), batch);
    dev::launch(attention_bwd_dkdv_kernel<T, DP, DP, kRows>, grid_kv, block,
                dkdv_smem_bytes<DP, DP, kRows>(), stream, "attention_bwd_dkdv_kernel", p);
  }
  if (p.Lq > 0) {
    const dev::Dim3 grid_q(static_cast<unsigned>((p.Lq + kBlockM - 1) / kBlockM), hq, batch);
    dev::launch(attention_bwd_dq_kernel<T, DP, DP>, grid_q, block, dq_smem_bytes<DP, DP>(),
                stream, "attention_bwd_dq_kernel", p);
  }
}

}  // namespace

void launch_backward(const AttnParams& p, Dtype dtype, int dp, dev::Stream stream) {
  if (dtype == Dtype::F16) {
    dp == 64 ? backward<dev::f16, 64>(p, stream) : backward<dev::f16, 128>(p, stream);
  } else {
    dp == 64 ? backward<dev::bf16, 64>(p, stream) : backward<dev::bf16, 128>(p, stream);
  }
}

}  // namespace mmattn::attn_cuda
