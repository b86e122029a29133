// Forward attention kernels: instantiations and launch (see attention_cuda.h).
#include "attention_kernels.h"

namespace mmattn::attn_cuda {
namespace {

template <class T, int DP>
void forward(const AttnParams& p, dev::Stream stream) {
  const dev::Dim3 grid(static_cast<unsigned>((p.Lq + kBlockM - 1) / kBlockM),
                       static_cast<unsigned>(p.Hq), static_cast<unsigned>(p.B));
  dev::launch(attention_fwd_kernel<T, DP, DP>, grid, dev::Dim3(kThreads),
              forward_smem_bytes<DP, DP>(), stream, "attention_fwd_kernel", p);
}

}  // namespace

void launch_forward(const AttnParams& p, Dtype dtype, int dp, dev::Stream stream) {
  if (dtype == Dtype::F16) {
    dp == 64 ? forward<dev::f16, 64>(p, stream) : forward<dev::f16, 128>(p, stream);
  } else {
    dp == 64 ? forward<dev::bf16, 64>(p, stream) : forward<dev::bf16, 128>(p, stream);
  }
}

}  // namespace mmattn::attn_cuda
