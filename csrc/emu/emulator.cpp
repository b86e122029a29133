// SIMT emulator of mmattn's CUDA device layer; see emulator.h for the model.
// Compiled only into the test extension mmattn._C_emu (MMATTN_CUDA_EMULATION).
#include "emulator.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// ------------------------------------------------------------------ context switch
//
// x86-64: a minimal switch that saves the callee-saved registers and the SSE/x87
// control words on the old stack and restores them from the new one (no signal
// mask syscall, unlike swapcontext: a kernel switches fibers at every MMA).
#if defined(__x86_64__)
extern "C" void mmattn_emu_switch(void** save_sp, void* load_sp);
extern "C" void mmattn_emu_trampoline();
asm(R"(
    .text
    .globl mmattn_emu_switch
    .hidden mmattn_emu_switch
    .type mmattn_emu_switch,@function
mmattn_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size mmattn_emu_switch,.-mmattn_emu_switch

    .globl mmattn_emu_trampoline
    .hidden mmattn_emu_trampoline
    .type mmattn_emu_trampoline,@function
mmattn_emu_trampoline:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size mmattn_emu_trampoline,.-mmattn_emu_trampoline
)");
#endif

namespace mmattn::emu {

thread_local ThreadView* tls_current = nullptr;

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kStaticSmemBytes = 48 * 1024;
// sm_80 allows 163 KB of shared memory per block (sm_90: 227 KB); kernels must fit both.
constexpr size_t kMaxSmemBytes = 163 * 1024;
constexpr int kWarp = 32;

struct Stack {
  void* base = nullptr;  // mmap'ed region, lowest page is a guard page
  size_t bytes = 0;
  Stack() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    bytes = kStackBytes + page;
    base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) throw std::runtime_error("mmattn emulator: cannot map a fiber stack");
    mprotect(base, page, PROT_NONE);  // overflow faults instead of corrupting memory
  }
  ~Stack() { munmap(base, bytes); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  char* top() const { return static_cast<char*>(base) + bytes; }
};

struct PendingCopy {
  void* dst;
  std::vector<unsigned char> data;  // src bytes then zeros
};

enum class State { Ready, AtBarrier, AtCollective, Done };

struct Fiber {
  void* sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t ctx;
#endif
  std::unique_ptr<Stack> stack;
  State state = State::Ready;
  ThreadView view;
  std::vector<PendingCopy> open_group;
  std::deque<std::vector<PendingCopy>> groups;
  size_t static_decls = 0;
};

struct WarpState {
  Collective op = Collective::None;
  int arrived = 0;
  int lanes = 0;
  int first_lane = 0;
};

struct Run;
thread_local Run* tls_run = nullptr;

uint64_t initial_seed() {
  const char* env = std::getenv("MMATTN_EMU_SEED");
  return env != nullptr ? std::strtoull(env, nullptr, 10) : 0;
}
uint64_t g_seed = initial_seed();
Stats g_stats;

uint64_t mix(uint64_t x) {  // splitmix64 finaliser: independent streams per block
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// One launch, executed block by block on this CPU thread.
struct Run {
  Dim3 grid, block;
  size_t smem_bytes = 0;
  const std::function<void()>* body = nullptr;
  const char* name = "";
  std::vector<Fiber> fibers;
  std::vector<LaneSlot> slots;
  std::vector<WarpState> warps;
  std::vector<int> ready;
  std::vector<unsigned char> smem, static_smem;
  std::vector<std::pair<size_t, size_t>> static_regions;  // (offset, bytes)
  size_t static_used = 0;
  std::mt19937_64 rng;
  void* sched_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t sched_ctx;
#endif
  Fiber* current = nullptr;
  std::string error;

  unsigned char* smem_base() {
    // 128-byte alignment as on the device (vector loads, ldmatrix rows).
    auto p = reinterpret_cast<uintptr_t>(smem.data());
    return reinterpret_cast<unsigned char*>((p + 127) & ~uintptr_t{127});
  }

  void to_scheduler(Fiber* f) {
    g_stats.switches++;
#if defined(__x86_64__)
    mmattn_emu_switch(&f->sp, sched_sp);
#else
    swapcontext(&f->ctx, &sched_ctx);
#endif
  }
  void to_fiber(Fiber* f) {
    current = f;
    tls_current = &f->view;
#if defined(__x86_64__)
    mmattn_emu_switch(&sched_sp, f->sp);
#else
    swapcontext(&sched_ctx, &f->ctx);
#endif
    tls_current = nullptr;
    current = nullptr;
  }

  void make_ready(int index) { ready.push_back(index); }

  void abort_with(const std::string& message) {
    if (error.empty()) error = message;
    Fiber* f = current;
    f->state = State::Done;
    to_scheduler(f);  // the scheduler never resumes an aborted fiber
    std::abort();
  }

  void run_block(Dim3 block_idx, unsigned block_linear);
};

void perform(PendingCopy& c) { std::memcpy(c.dst, c.data.data(), c.data.size()); }

void flush_copies(Fiber& f) {
  for (auto& group : f.groups)
    for (auto& c : group) perform(c);
  for (auto& c : f.open_group) perform(c);
  f.groups.clear();
  f.open_group.clear();
}

[[noreturn]] void fiber_main(void* arg) {
  Run* run = tls_run;
  Fiber* f = static_cast<Fiber*>(arg);
  (*run->body)();
  flush_copies(*f);  // copies still in flight complete after the thread exits
  f->state = State::Done;
  run->to_scheduler(f);
  std::abort();  // a finished fiber is never resumed
}

#if !defined(__x86_64__)
void fiber_main_ucontext(unsigned hi, unsigned lo) {
  fiber_main(reinterpret_cast<void*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
#endif

void init_fiber(Fiber& f) {
  if (!f.stack) f.stack = std::make_unique<Stack>();
#if defined(__x86_64__)
  // Frame popped by mmattn_emu_switch: control words, r15..r12, rbx, rbp, then
  // `ret` into the trampoline, which calls fiber_main(r12) with rsp 16-aligned.
  auto top = reinterpret_cast<uintptr_t>(f.stack->top()) & ~uintptr_t{15};
  uintptr_t after_ret = top - 16;
  auto* s = reinterpret_cast<uint64_t*>(after_ret);
  s[-1] = reinterpret_cast<uint64_t>(&mmattn_emu_trampoline);
  s[-2] = 0;                                           // rbp
  s[-3] = 0;                                           // rbx
  s[-4] = reinterpret_cast<uint64_t>(&f);              // r12: argument
  s[-5] = reinterpret_cast<uint64_t>(&fiber_main);     // r13: entry
  s[-6] = 0;                                           // r14
  s[-7] = 0;                                           // r15
  uint32_t mxcsr = 0;
  uint16_t fpucw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  auto* cw = reinterpret_cast<uint32_t*>(&s[-8]);
  cw[0] = mxcsr;
  cw[1] = fpucw;
  f.sp = &s[-8];
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = static_cast<char*>(f.stack->base) + sysconf(_SC_PAGESIZE);
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  const auto p = reinterpret_cast<uintptr_t>(&f);
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(&fiber_main_ucontext), 2,
              static_cast<unsigned>(p >> 32), static_cast<unsigned>(p & 0xffffffffu));
#endif
}

std::string collective_name(Collective op) {
  switch (op) {
    case Collective::ShflXor: return "shfl.xor";
    case Collective::ShflIdx: return "shfl.idx";
    case Collective::SyncWarp: return "bar.warp.sync";
    case Collective::MmaF16: return "mma.m16n8k16 (f16)";
    case Collective::MmaBF16: return "mma.m16n8k16 (bf16)";
    case Collective::LdMatrixX4: return "ldmatrix.x4";
    case Collective::LdMatrixX4Trans: return "ldmatrix.x4.trans";
    case Collective::LdMatrixX2: return "ldmatrix.x2";
    case Collective::LdMatrixX2Trans: return "ldmatrix.x2.trans";
    case Collective::None: break;
  }
  return "none";
}

float half_bits_to_float(uint16_t bits, bool bf16) {
  return bf16 ? c10::detail::f32_from_bits(bits) : c10::detail::fp16_ieee_to_fp32_value(bits);
}

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// D = A B + C for one warp, every operand read from / written to the lanes'
// fragments through the documented layouts.
void compute_mma(LaneSlot* lanes, bool bf16) {
  float a[16][16], b[16][8], c[16][8];
  for (int lane = 0; lane < kWarp; ++lane) {
    const LaneSlot& s = lanes[lane];
    for (int i = 0; i < 8; ++i) {
      int r, col;
      mma_a_coord(lane, i, &r, &col);
      const uint16_t bits = static_cast<uint16_t>(s.in[i / 2] >> (16 * (i % 2)));
      a[r][col] = half_bits_to_float(bits, bf16);
    }
    for (int i = 0; i < 4; ++i) {
      int r, col;
      mma_b_coord(lane, i, &r, &col);
      const uint16_t bits = static_cast<uint16_t>(s.in[4 + i / 2] >> (16 * (i % 2)));
      b[r][col] = half_bits_to_float(bits, bf16);
    }
    for (int i = 0; i < 4; ++i) {
      int r, col;
      mma_c_coord(lane, i, &r, &col);
      c[r][col] = bits_float(s.in[6 + i]);
    }
  }
  float d[16][8];
  for (int m = 0; m < 16; ++m) {
    for (int n = 0; n < 8; ++n) {
      // Products of 16-bit floats are exact in double; one rounding at the end.
      double acc = c[m][n];
      for (int k = 0; k < 16; ++k) acc += static_cast<double>(a[m][k]) * b[k][n];
      d[m][n] = static_cast<float>(acc);
    }
  }
  for (int lane = 0; lane < kWarp; ++lane) {
    for (int i = 0; i < 4; ++i) {
      int r, col;
      mma_c_coord(lane, i, &r, &col);
      lanes[lane].out[i] = float_bits(d[r][col]);
    }
  }
}

}  // namespace

void mma_a_coord(int lane, int i, int* row, int* col) {
  const int group = lane >> 2, tig = lane % 4;
  *row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
  *col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
}
void mma_b_coord(int lane, int i, int* row, int* col) {
  const int group = lane >> 2, tig = lane % 4;
  *row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
  *col = group;
}
void mma_c_coord(int lane, int i, int* row, int* col) {
  const int group = lane >> 2, tig = lane % 4;
  *row = i < 2 ? group : group + 8;
  *col = tig * 2 + (i & 1);
}

namespace {

void check_smem_row(Run& run, const void* p, int lane) {
  auto* base = run.smem_base();
  const auto* q = static_cast<const unsigned char*>(p);
  const bool in_dynamic = q >= base && q + 16 <= base + run.smem_bytes;
  const bool in_static =
      q >= run.static_smem.data() && q + 16 <= run.static_smem.data() + run.static_smem.size();
  if (!in_dynamic && !in_static) {
    run.abort_with("ldmatrix: lane " + std::to_string(lane) +
                   " passed an address outside the block's shared memory");
  }
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    run.abort_with("ldmatrix: lane " + std::to_string(lane) +
                   " passed a row address that is not 16-byte aligned");
  }
}

// ldmatrix .m8n8 .b16: matrix m's 8 rows come from the addresses of lanes
// 8m..8m+7; lane l receives, in register m, row l/4 columns 2(l%4), 2(l%4)+1
// (with .trans: column l/4 of rows 2(l%4), 2(l%4)+1), low half first.
void compute_ldmatrix(Run& run, LaneSlot* lanes, int num, bool trans) {
  for (int lane = 0; lane < 8 * num; ++lane) check_smem_row(run, lanes[lane].ptr, lane);
  for (int lane = 0; lane < kWarp; ++lane) {
    for (int m = 0; m < num; ++m) {
      uint16_t h[2];
      for (int e = 0; e < 2; ++e) {
        int r, col;
        if (!trans) {
          r = lane / 4;
          col = 2 * (lane % 4) + e;
        } else {
          r = 2 * (lane % 4) + e;
          col = lane / 4;
        }
        const auto* row = static_cast<const unsigned char*>(lanes[8 * m + r].ptr);
        std::memcpy(&h[e], row + 2 * col, 2);
      }
      lanes[lane].out[m] = static_cast<uint32_t>(h[0]) | (static_cast<uint32_t>(h[1]) << 16);
    }
  }
}

void compute_collective(Run& run, int warp, Collective op) {
  LaneSlot* lanes = &run.slots[static_cast<size_t>(warp) * kWarp];
  const int n = run.warps[warp].lanes;
  switch (op) {
    case Collective::ShflXor:
    case Collective::ShflIdx: {
      uint32_t vals[kWarp];
      for (int l = 0; l < n; ++l) vals[l] = lanes[l].in[0];
      for (int l = 0; l < n; ++l) {
        const int src = op == Collective::ShflXor ? (l ^ lanes[l].arg) : (lanes[l].arg & 31);
        lanes[l].out[0] = src < n ? vals[src] : vals[l];
      }
      break;
    }
    case Collective::SyncWarp:
      break;
    case Collective::MmaF16:
    case Collective::MmaBF16:
      compute_mma(lanes, op == Collective::MmaBF16);
      break;
    case Collective::LdMatrixX4:
    case Collective::LdMatrixX4Trans:
      compute_ldmatrix(run, lanes, 4, op == Collective::LdMatrixX4Trans);
      break;
    case Collective::LdMatrixX2:
    case Collective::LdMatrixX2Trans:
      compute_ldmatrix(run, lanes, 2, op == Collective::LdMatrixX2Trans);
      break;
    case Collective::None:
      break;
  }
}

void Run::run_block(Dim3 block_idx, unsigned block_linear) {
  const unsigned nthreads = block.x * block.y * block.z;
  const unsigned nwarps = (nthreads + kWarp - 1) / kWarp;
  rng.seed(mix(g_seed ^ mix(block_linear + 1)));
  std::fill(smem.begin(), smem.end(), 0xFF);
  std::fill(static_smem.begin(), static_smem.end(), 0xFF);
  static_regions.clear();
  static_used = 0;
  warps.assign(nwarps, WarpState{});
  for (unsigned w = 0; w < nwarps; ++w) {
    warps[w].lanes = static_cast<int>(std::min<unsigned>(kWarp, nthreads - w * kWarp));
  }
  ready.clear();
  for (unsigned t = 0; t < nthreads; ++t) {
    Fiber& f = fibers[t];
    f.state = State::Ready;
    f.open_group.clear();
    f.groups.clear();
    f.static_decls = 0;
    ThreadView& v = f.view;
    v.thread_idx = Dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
    v.block_idx = block_idx;
    v.block_dim = block;
    v.grid_dim = grid;
    v.linear = t;
    v.smem = smem_base();
    v.smem_bytes = smem_bytes;
    v.slot = &slots[t];
    init_fiber(f);
    ready.push_back(static_cast<int>(t));
  }
  for (;;) {
    while (!ready.empty()) {
      // Draw the next fiber at random among the runnable ones.
      const size_t pick = static_cast<size_t>(rng() % ready.size());
      const int t = ready[pick];
      ready[pick] = ready.back();
      ready.pop_back();
      g_stats.switches++;
      to_fiber(&fibers[t]);
      if (!error.empty()) return;
    }
    unsigned done = 0, at_barrier = 0, at_collective = 0;
    for (unsigned t = 0; t < nthreads; ++t) {
      switch (fibers[t].state) {
        case State::Done: ++done; break;
        case State::AtBarrier: ++at_barrier; break;
        case State::AtCollective: ++at_collective; break;
        case State::Ready: break;
      }
    }
    if (done == nthreads) return;
    if (at_collective > 0) {
      for (unsigned w = 0; w < nwarps; ++w) {
        if (warps[w].arrived > 0) {
          error = "deadlock: " + std::to_string(warps[w].arrived) + " of " +
                  std::to_string(warps[w].lanes) + " lanes of warp " + std::to_string(w) +
                  " wait at " + collective_name(warps[w].op) +
                  " (other lanes exited, diverged or wait at a barrier)";
          return;
        }
      }
    }
    // Every live thread is at the barrier (exited threads do not hold it up).
    g_stats.barriers++;
    for (unsigned t = 0; t < nthreads; ++t) {
      if (fibers[t].state == State::AtBarrier) {
        fibers[t].state = State::Ready;
        ready.push_back(static_cast<int>(t));
      }
    }
  }
}

}  // namespace

void barrier() {
  Run* run = tls_run;
  Fiber* f = run->current;
  f->state = State::AtBarrier;
  run->to_scheduler(f);
}

void warp_collective(Collective op) {
  Run* run = tls_run;
  Fiber* f = run->current;
  const unsigned t = f->view.linear;
  const int w = static_cast<int>(t / kWarp);
  WarpState& ws = run->warps[w];
  if (ws.lanes != kWarp) run->abort_with(collective_name(op) + " in a partial warp");
  if (ws.arrived == 0) {
    ws.op = op;
  } else if (ws.op != op) {
    run->abort_with("warp divergence: lane " + std::to_string(t % kWarp) + " of warp " +
                    std::to_string(w) + " reached " + collective_name(op) +
                    " while other lanes wait at " + collective_name(ws.op));
  }
  g_stats.collectives++;
  if (++ws.arrived == ws.lanes) {
    compute_collective(*run, w, op);
    ws.arrived = 0;
    ws.op = Collective::None;
    for (int l = 0; l < ws.lanes; ++l) {
      Fiber& lane = run->fibers[static_cast<size_t>(w) * kWarp + l];
      if (&lane == f) continue;
      lane.state = State::Ready;
      run->make_ready(static_cast<int>(w * kWarp + l));
    }
    // The completing lane yields too, so the released lanes resume in random order.
    f->state = State::Ready;
    run->make_ready(static_cast<int>(t));
  } else {
    f->state = State::AtCollective;
  }
  run->to_scheduler(f);
}

void fail(const char* message) {
  tls_run->abort_with(message);
  std::abort();
}

void* static_shared(size_t bytes, size_t align) {
  Run* run = tls_run;
  Fiber* f = run->current;
  const size_t k = f->static_decls++;
  if (k < run->static_regions.size()) {
    if (run->static_regions[k].second != bytes) {
      run->abort_with("threads of a block declared different static shared arrays");
    }
    return run->static_smem.data() + run->static_regions[k].first;
  }
  const size_t offset = (run->static_used + align - 1) / align * align;
  if (offset + bytes > run->static_smem.size()) {
    run->abort_with("static shared memory exceeds 48 KB");
  }
  run->static_regions.emplace_back(offset, bytes);
  run->static_used = offset + bytes;
  return run->static_smem.data() + offset;
}

void cp_async(void* dst, const void* src, unsigned src_bytes, unsigned total) {
  Run* run = tls_run;
  Fiber* f = run->current;
  if (total != 4 && total != 8 && total != 16) run->abort_with("cp.async: size must be 4, 8 or 16");
  if (src_bytes > total) run->abort_with("cp.async: src-size larger than the copy");
  auto* d = static_cast<unsigned char*>(dst);
  auto* base = run->smem_base();
  const bool in_dynamic = d >= base && d + total <= base + run->smem_bytes;
  const bool in_static = d >= run->static_smem.data() &&
                         d + total <= run->static_smem.data() + run->static_smem.size();
  if (!in_dynamic && !in_static) run->abort_with("cp.async: destination outside shared memory");
  if (reinterpret_cast<uintptr_t>(dst) % total != 0 ||
      (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % total != 0)) {
    run->abort_with("cp.async: misaligned source or destination");
  }
  PendingCopy c{dst, std::vector<unsigned char>(total, 0)};
  if (src_bytes > 0) std::memcpy(c.data.data(), src, src_bytes);
  // The copy may land any time between issue and the wait that covers it.
  if (run->rng() & 1) {
    perform(c);
  } else {
    f->open_group.push_back(std::move(c));
  }
}

void cp_async_commit() {
  Fiber* f = tls_run->current;
  f->groups.push_back(std::move(f->open_group));
  f->open_group.clear();
}

void cp_async_wait(int allowed_pending) {
  Fiber* f = tls_run->current;
  while (static_cast<int>(f->groups.size()) > allowed_pending) {
    for (auto& c : f->groups.front()) perform(c);
    f->groups.pop_front();
  }
}

void launch(Dim3 grid, Dim3 block, size_t dynamic_smem, const std::function<void()>& body,
            const char* kernel_name) {
  auto fail_launch = [&](const std::string& why) {
    throw std::runtime_error(std::string("mmattn emulator: launch of ") + kernel_name + ": " + why);
  };
  const uint64_t nthreads = uint64_t{block.x} * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024) fail_launch("block size must be 1..1024 threads");
  if (block.z > 64) fail_launch("blockDim.z > 64");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail_launch("empty grid");
  if (grid.y > 65535 || grid.z > 65535) fail_launch("gridDim.y/z > 65535");
  if (dynamic_smem > kMaxSmemBytes) fail_launch("dynamic shared memory above 163 KB (sm_80)");
  if (tls_run != nullptr) fail_launch("nested launch");

  thread_local Run run;  // fibers and stacks are reused across launches
  run.grid = grid;
  run.block = block;
  run.smem_bytes = dynamic_smem;
  run.body = &body;
  run.name = kernel_name;
  run.error.clear();
  run.smem.assign(dynamic_smem + 128, 0);
  run.static_smem.assign(kStaticSmemBytes, 0);
  if (run.fibers.size() < nthreads) run.fibers.resize(nthreads);
  run.slots.assign((nthreads + kWarp - 1) / kWarp * kWarp, LaneSlot{});
  tls_run = &run;
  g_stats.launches++;
  const uint64_t nblocks = uint64_t{grid.x} * grid.y * grid.z;
  for (uint64_t b = 0; b < nblocks && run.error.empty(); ++b) {
    const Dim3 idx(static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                   static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y)));
    g_stats.blocks++;
    run.run_block(idx, static_cast<unsigned>(b));
  }
  tls_run = nullptr;
  if (!run.error.empty()) fail_launch(run.error);
}

void set_seed(uint64_t seed) { g_seed = seed; }
uint64_t get_seed() { return g_seed; }
Stats stats() { return g_stats; }

}  // namespace mmattn::emu
