// SIMT emulator of mmattn's CUDA device layer (host build, MMATTN_CUDA_EMULATION).
//
// A launch <<<grid, block, shared>>> runs on the calling CPU thread, one block
// after another. Every CUDA thread of a block is a fiber with its own stack;
// the block's shared memory is one buffer that all its fibers see. Scheduling:
//
// * A fiber runs without interruption until it reaches a block barrier, a warp
//   collective (shuffle, MMA, ldmatrix) or its end. The next fiber to run is
//   drawn at random (seeded, see set_seed) among the runnable ones, so between
//   two barriers the threads of a block run one after another in a random
//   order: a missing __syncthreads changes the result instead of hiding.
// * A warp collective waits until all 32 lanes of the warp have reached it
//   (the same collective: a mismatch is reported as divergence), then computes
//   every lane's result at once from the lanes' inputs, exactly as the PTX ISA
//   defines the instruction (fragment layouts of mma.m16n8k16, ldmatrix).
// * A barrier releases when every thread of the block that has not exited
//   reached it. A block in which nothing can run any more (threads waiting at a
//   collective that some lane never reaches) is reported as a deadlock.
// * Shared memory starts filled with 0xFF bytes (NaN in every float format), so
//   reading what no thread wrote shows in the results. cp.async copies land
//   either when issued or only at the cp.async.wait that covers them (a seeded
//   coin flip per copy), so a missing wait shows too.
//
// Errors (bad shared-memory address, divergence, deadlock, launch limits) abort
// the launch: launch() throws std::runtime_error naming the kernel.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

namespace mmattn::emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr Dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The warp-wide operations the emulator computes once all lanes arrived.
enum class Collective : uint32_t {
  None = 0,
  ShflXor,          // out[0] = in[0] of lane (lane ^ arg)
  ShflIdx,          // out[0] = in[0] of lane (arg & 31)
  SyncWarp,         // no data
  MmaF16,           // mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32
  MmaBF16,          // same with .bf16 inputs
  LdMatrixX4,       // ldmatrix.sync.aligned.m8n8.x4.shared.b16
  LdMatrixX4Trans,  // ... .x4.trans
  LdMatrixX2,       // ... .x2
  LdMatrixX2Trans,  // ... .x2.trans
};

// One lane's inputs and outputs of the collective it is waiting at.
// MMA: in[0..3] = A registers, in[4..5] = B registers, in[6..9] = C (float bits);
// out[0..3] = D (float bits). ldmatrix: ptr = this lane's row address; out = registers.
struct LaneSlot {
  uint32_t in[10];
  const void* ptr;
  int32_t arg;
  uint32_t out[4];
};

// What the running fiber sees as its CUDA built-in variables.
struct ThreadView {
  Dim3 thread_idx, block_idx, block_dim, grid_dim;
  unsigned linear = 0;  // linear thread index within the block
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  LaneSlot* slot = nullptr;
};

// The fiber running on this CPU thread (set by the scheduler before each switch).
extern thread_local ThreadView* tls_current;
inline const ThreadView& self() { return *tls_current; }

void barrier();
// Waits for all lanes of the caller's warp at `op`; the caller fills its slot first.
void warp_collective(Collective op);
// Aborts the launch with `message` (from inside a kernel); never returns.
[[noreturn]] void fail(const char* message);
// The k-th static __shared__ declaration a thread executes maps to the k-th region.
void* static_shared(size_t bytes, size_t align);
// cp.async of `total` bytes (4, 8 or 16): `src_bytes` are read, the rest zero-filled.
void cp_async(void* dst, const void* src, unsigned src_bytes, unsigned total);
void cp_async_commit();
// Completes all committed groups but the newest `allowed_pending` ones.
void cp_async_wait(int allowed_pending);

void launch(Dim3 grid, Dim3 block, size_t dynamic_smem, const std::function<void()>& body,
            const char* kernel_name);

// Scheduling seed: the order of fibers and of cp.async completions. Blocks get
// independent streams derived from (seed, block index). Default: MMATTN_EMU_SEED or 0.
void set_seed(uint64_t seed);
uint64_t get_seed();

struct Stats {
  uint64_t launches = 0, blocks = 0, switches = 0, collectives = 0, barriers = 0;
};
Stats stats();

// Documented fragment layouts of mma.m16n8k16 with .f16/.bf16 inputs (PTX ISA,
// "Matrix Fragments for mma.m16n8k16 with floating point type"): element i of a
// lane's fragment sits at (row, col) of A (16x16), B (16x8) or C/D (16x8).
void mma_a_coord(int lane, int i, int* row, int* col);
void mma_b_coord(int lane, int i, int* row, int* col);
void mma_c_coord(int lane, int i, int* row, int* col);

}  // namespace mmattn::emu
