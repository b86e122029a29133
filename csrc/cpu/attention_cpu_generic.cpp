// The portable build of the fused attention kernels (attention_cpu_impl.h),
// one float per "vector": the fallback for CPUs without AVX2 and for other
// architectures. Same algorithm and tiling as the SIMD builds.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "../philox.h"
#include "attention_cpu.h"

namespace mmattn::attn_cpu::generic {
constexpr const char* kIsaName = "generic";
#include "simd_scalar.h"
#include "attention_cpu_impl.h"
}  // namespace mmattn::attn_cpu::generic

namespace mmattn::attn_cpu {

const KernelSet* kernels_generic() { return &generic::kKernelSet; }

}  // namespace mmattn::attn_cpu
