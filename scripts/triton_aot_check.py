#!/usr/bin/env python
"""Ahead-of-time compile check of mmattn's Triton kernels for sm_80 and sm_90 (no GPU needed).

For every kernel x autotune config x dtype (float16, bfloat16, float32) x arch, the kernel
is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``;
registers and spills are read from the cubin Triton built, with the ``cuobjdump
--dump-resource-usage`` bundled with Triton (spilled registers live in the stack frame:
``STACK`` + ``LOCAL`` bytes), shared memory from the compiled kernel's metadata, and
tensor-core instructions from the PTX (``mma.sync`` on sm_80; ``wgmma`` on sm_90 when a
dot of the config has M >= 64 and a warp-group multiple of warps, else ``mma.sync``).

A row FAILs when the config spills, needs more shared memory than the architecture has
(sm_80: 163 KB, sm_90: 227 KB), or an attention kernel on float16/bfloat16 lacks the
tensor-core instructions. The exit status is 1 when any row fails.

Attention kernels have "light" config lists (calls with at most key padding and causal
masking) and "heavy" ones (a mask tile, a block mask or dropout). Light configs compile
as ``light`` (key padding + causal: a superset of the plain dense call), heavy ones as
``heavy``: float ``attn_mask`` + key padding + causal + block mask + dropout +
a GQA group of 8, the most registers any call needs. Block-sparse calls cut the tiles
to the BlockMask's block sizes (``kernels/attention.py``, ``_fit_to_blocks``); the full
run also compiles the heavy tiles that block sizes 16 and 32 produce.

Usage:
    python scripts/triton_aot_check.py            # everything (``make triton-aot``)
    python scripts/triton_aot_check.py --quick    # the CI subset (see --help)
    python scripts/triton_aot_check.py --write    # also rewrite benchmarks/results/triton_aot.*

Compiles are CPU-bound; ``--jobs`` runs them in parallel processes.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# The interpreter replaces @triton.jit functions; compiling needs the real ones.
os.environ.pop("TRITON_INTERPRET", None)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = ("fp16", "bf16", "fp32")
ARCHS = (80, 90)
HEADS = (64, 128, 256)


@dataclass(frozen=True)
class Job:
    module: str          # "attention" | "ws_linear"
    kernel: str          # a KERNEL_NAMES entry of that module
    variant: str         # "plain" | "all" (attention), "T<n>" / "elem" (ws_linear)
    dtype: str
    arch: int
    head: int            # padded head dim (attention), 0 otherwise
    block_m: int
    block_n: int
    warps: int
    stages: int
    transposed: bool = False  # ws_linear spmm_block: the dX kernel
    maxnreg: int = 0          # ptxas register bound (0: ptxas chooses)

    def config(self) -> str:
        bound = f" r{self.maxnreg}" if self.maxnreg else ""
        if self.module == "ws_linear":
            return f"B{self.block_m} T{self.block_n} w{self.warps} s{self.stages}{bound}"
        return f"{self.block_m}x{self.block_n} w{self.warps} s{self.stages}{bound}"


def _torch_dtype(name: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


# ---- jobs ----------------------------------------------------------------------------------

def attention_jobs(quick: bool) -> list[Job]:
    """Light lists compile as ``light`` (key padding + causal, a superset of the plain
    dense call), heavy lists as ``heavy``; the full run adds the heavy tiles cut to
    BlockMask block sizes 16 and 32."""
    from mmattn.kernels import attention as A

    jobs: list[Job] = []
    dtypes = ("fp16", "fp32") if quick else DTYPES
    heads = (64, 128) if quick else HEADS
    for kernel in A.KERNEL_NAMES:
        for dtype in dtypes:
            for arch in ARCHS:
                for head in heads:
                    if kernel == "bwd_preprocess":
                        if head == heads[0]:  # only BLOCK_DV depends on the head dim
                            for bm, bn, warps, stages, _ in A.candidate_configs(
                                    kernel, _torch_dtype(dtype), head, head, arch=arch):
                                jobs.append(Job("attention", kernel, "plain", dtype, arch,
                                                head, bm, bn, warps, stages))
                        continue
                    tiles: list[tuple[tuple[int, ...], str]] = []
                    for heavy in (False, True):
                        dense = A.candidate_configs(kernel, _torch_dtype(dtype), head, head,
                                                    arch=arch, heavy=heavy)
                        for tile in (dense[:1] if quick else dense):
                            tiles.append((tile, "heavy" if heavy else "light"))
                    if not quick:
                        for bq in (16, 32):
                            for bk in (16, 32):
                                for tile in A.candidate_configs(kernel, _torch_dtype(dtype),
                                                                head, head, bq, bk, arch, True):
                                    if (tile, "heavy") not in tiles:
                                        tiles.append((tile, "heavy"))
                    for (bm, bn, warps, stages, maxnreg), variant in tiles:
                        jobs.append(Job("attention", kernel, variant, dtype, arch, head, bm, bn,
                                        warps, stages, maxnreg=maxnreg))
    return jobs


def ws_jobs(quick: bool) -> list[Job]:
    from mmattn.kernels import ws_linear as W

    jobs: list[Job] = []
    dtypes = ("fp16", "fp32") if quick else DTYPES
    for dtype in dtypes:
        max_tile = W.MAX_TILE[_torch_dtype(dtype)]
        tiles = [t for t in (16, 32, 64) if t <= max_tile]
        if quick:
            tiles = [16, max_tile]
        for arch in ARCHS:
            cfg = W.ELEMENT_CONFIG
            jobs.append(Job("ws_linear", "spmm", "elem", dtype, arch, 0, cfg["BLOCK_B"],
                            cfg["BLOCK_R"], cfg["num_warps"], 1))
            cfg = W.ELEMENT_SDDMM_CONFIG
            jobs.append(Job("ws_linear", "sddmm", "elem", dtype, arch, 0, cfg["BLOCK_B"],
                            cfg["BLOCK_E"], cfg["num_warps"], 1))
            for t in tiles:
                cfg = W.block_config(t, _torch_dtype(dtype))
                for kernel, transposed in (("spmm_block", False), ("spmm_block", True),
                                           ("sddmm_block", False)):
                    variant = f"T{t}" + (" dX" if transposed else "")
                    jobs.append(Job("ws_linear", kernel, variant, dtype, arch, 0,
                                    cfg["BLOCK_B"], t, cfg["num_warps"], cfg["num_stages"],
                                    transposed))
    return jobs


# ---- signatures ----------------------------------------------------------------------------

_FP32_PTRS = {"OutF32", "Lse", "LseLo", "Lam", "Delta", "GradLse"}
_I32_PTRS = {"KvNum", "KvIdx", "QNum", "QIdx", "PartIdx", "Ptr", "Idx", "Perm", "Row", "Col"}
_U8_PTRS = {"Kpm", "PartMasks"}
_DATA_PTRS = {"Q", "K", "V", "Out", "Weights", "DO", "DQ", "DK", "DV", "X", "Vals", "Bias",
              "Y", "GY", "DVals"}
_FLOATS = {"scale", "dropout_p", "drop_scale"}
_I64 = {"seed_lo", "seed_hi"}


def _signature(fn, job: Job, constexprs: dict) -> tuple[dict, dict, dict]:
    """ASTSource signature, constants and attributes as the JIT specialises a call on
    contiguous, 16-byte aligned tensors (the common case): unit last-dim strides (also
    of the masks) are the constant 1; pointers, head dims and the other q/k/v/dO/mask
    strides are divisible by 16. Other strides compile to other specialisations."""
    sig, const, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr:
            sig[name] = "constexpr"
            const[name] = constexprs[name]
            continue
        if name in _DATA_PTRS or name in _FP32_PTRS or name in _I32_PTRS or name in _U8_PTRS \
                or name == "Mask":
            if name in _DATA_PTRS:
                ty = job.dtype
            elif name in _FP32_PTRS:
                ty = "fp32"
            elif name in _I32_PTRS:
                ty = "i32"
            elif name == "Mask":
                ty = "fp32" if constexprs.get("MASK_KIND") == 2 else "u8"
            else:
                ty = "u8"
            sig[name] = "*" + ty
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOATS:
            sig[name] = "fp32"
        elif name in _I64:
            sig[name] = "i64"
        elif re.fullmatch(r"stride_(q|k|v|do|o|d)d|stride_xk|stride_mk|stride_kpl|stride_p2",
                          name):
            sig[name] = "constexpr"
            const[name] = 1
        else:
            sig[name] = "i32"
            if name in ("D", "Dv") or re.fullmatch(
                    r"stride_(q|k|v|do|o|d|m)[bhl]|stride_xn|stride_p[01]", name):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, const, attrs


# the features each variant switches on (see the module docstring)
VARIANTS = {"plain": set(), "light": {"kpm", "causal"},
            "heavy": {"float_mask", "kpm", "causal", "blocks", "dropout", "gqa"}}


def _attention_constexprs(job: Job) -> tuple[object, dict]:
    from mmattn.kernels import attention as A

    fn = A._JIT[job.kernel]
    if job.kernel == "bwd_preprocess":
        return fn, dict(HAS_GRAD_LSE=True, BLOCK_M=job.block_m, BLOCK_DV=job.head)
    on = VARIANTS[job.variant]
    flags = dict(MASK_KIND=2 if "float_mask" in on else 0, HAS_KPM="kpm" in on,
                 IS_CAUSAL="causal" in on, HAS_BLOCKS="blocks" in on,
                 HAS_DROPOUT="dropout" in on, PRECISION="ieee", BLOCK_D=job.head,
                 BLOCK_DV=job.head, BLOCK_M=job.block_m, BLOCK_N=job.block_n)
    if job.kernel == "bwd_dkdv":
        flags["G_P2"] = 8 if "gqa" in on else 1  # a GQA group of 8 query heads per kv head
    if job.kernel in ("fwd", "weights"):
        flags.update(KEEP_F32=job.dtype != "fp32",  # any call with gradients
                     WEIGHTS_PASS=job.kernel == "weights",
                     SAVE_LSE_LO=job.kernel == "fwd")  # return_weights: any call
    if job.kernel in ("bwd_stats", "bwd_dq"):
        flags.update(HAS_GRAD_LSE=True,  # a gradient of the returned lse: any call
                     STATS_PASS=job.kernel == "bwd_stats")
    return fn, flags


def _ws_constexprs(job: Job) -> tuple[object, dict]:
    from mmattn.kernels import ws_linear as W

    if job.kernel == "spmm":
        return W._ws_spmm_kernel, dict(HAS_PERM=False, HAS_BIAS=True, BLOCK_B=job.block_m,
                                       BLOCK_R=job.block_n)
    if job.kernel == "sddmm":
        return W._ws_sddmm_kernel, dict(BLOCK_B=job.block_m, BLOCK_E=job.block_n)
    if job.kernel == "spmm_block":
        return W._ws_spmm_block_kernel, dict(TRANSPOSED=job.transposed,
                                             HAS_BIAS=not job.transposed, PRECISION="ieee",
                                             BLOCK_B=job.block_m, T=job.block_n)
    return W._ws_sddmm_block_kernel, dict(PRECISION="ieee", BLOCK_B=job.block_m,
                                          T=job.block_n)


def _nvidia_bin(tool: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def compile_job(job: Job) -> dict:
    """Compile one job; returns its table row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, constexprs = (_attention_constexprs(job) if job.module == "attention"
                      else _ws_constexprs(job))
    sig, const, attrs = _signature(fn, job, constexprs)
    row = dict(kernel=f"{job.module}.{job.kernel}", variant=job.variant, dtype=job.dtype,
               arch=f"sm_{job.arch}", head=job.head or "", config=job.config())
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn, sig, const, attrs),
                                  target=GPUTarget("cuda", job.arch, 32),
                                  options=dict(num_warps=job.warps, num_stages=job.stages,
                                               **({"maxnreg": job.maxnreg} if job.maxnreg
                                                  else {})))
    except Exception as exc:  # a config that does not compile fails the check
        row.update(regs="", spill_bytes="", smem_bytes="", tensor_cores="", seconds="",
                   status=f"FAIL: compile error {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:120] if str(exc) else ''}")
        return row
    seconds = time.perf_counter() - start
    ptx = compiled.asm["ptx"]
    # Registers and spills of the cubin Triton built (its ptxas flags differ between
    # versions, e.g. 3.8 adds --regAllocOptLevel=2): spilled registers live in the stack
    # frame (Triton inlines every call, so nothing else does).
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        out = subprocess.run([_nvidia_bin("cuobjdump"), "--dump-resource-usage", str(cubin)],
                             capture_output=True, text=True)
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out.stdout)
    regs = int(usage.group(1)) if usage else None
    spill = int(usage.group(2)) + int(usage.group(4)) if usage else 0
    smem = int(compiled.metadata.shared)
    cores = ("wgmma" if "wgmma.mma_async" in ptx else
             "mma.sync" if "mma.sync" in ptx else "none")
    problems = []
    if regs is None:
        problems.append("cuobjdump gave no resource usage")
    if spill:
        problems.append(f"spills ({spill} bytes of stack)")
    if smem > SMEM_LIMIT[job.arch]:
        problems.append(f"shared memory {smem} > {SMEM_LIMIT[job.arch]}")
    if job.module == "attention" and job.kernel != "bwd_preprocess" and job.dtype != "fp32":
        big_dot = (max(job.block_m, job.block_n) >= 64 if job.kernel == "bwd_dkdv"
                   else job.block_m >= 64)
        want = "wgmma" if job.arch == 90 and big_dot and job.warps % 4 == 0 else "mma.sync"
        if cores == "none" or (want == "wgmma" and cores != "wgmma"):
            problems.append(f"no {want} tensor-core instructions")
    row.update(regs=regs if regs is not None else "", spill_bytes=spill,
               smem_bytes=smem, tensor_cores=cores, seconds=f"{seconds:.1f}",
               status="FAIL: " + "; ".join(problems) if problems else "ok")
    return row


# ---- report --------------------------------------------------------------------------------

COLUMNS = ("kernel", "variant", "dtype", "arch", "head", "config", "regs", "spill_bytes",
           "smem_bytes", "tensor_cores", "seconds", "status")


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |",
             "| " + " | ".join("---" for _ in COLUMNS) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="CI subset: float16 and float32, head dims 64 and 128, the first "
                             "config of each light and heavy list, ws_linear tiles 16 and 64 "
                             "(bfloat16 shares float16's lists and code path)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--write", action="store_true",
                        help="write the table to OUT.md and OUT.csv")
    parser.add_argument("--out", default="benchmarks/results/triton_aot",
                        help="path prefix of --write's files (default %(default)s)")
    parser.add_argument("--only", default="", help="run kernels whose name contains this")
    parser.add_argument("--progress", action="store_true", help="print each row as it is done")
    args = parser.parse_args(argv)

    import triton

    jobs = attention_jobs(args.quick) + ws_jobs(args.quick)
    if args.only:
        jobs = [j for j in jobs if args.only in f"{j.module}.{j.kernel}"]
    start = time.perf_counter()
    rows = []
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for i, row in enumerate(pool.map(compile_job, jobs), 1):
            rows.append(row)
            if args.progress:
                print(f"[{i}/{len(jobs)}] {row['kernel']} {row['variant']} {row['dtype']} "
                      f"{row['arch']} {row['head']} {row['config']}: regs {row['regs']} "
                      f"spills {row['spill_bytes']} smem {row['smem_bytes']} "
                      f"{row['tensor_cores']} {row['status']}", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - start
    failed = [r for r in rows if r["status"] != "ok"]
    header = (f"# Triton AOT compile check (triton {triton.__version__}, "
              f"{'quick subset' if args.quick else 'every config'})\n\n"
              f"{len(rows)} compiles in {elapsed:.0f} s with {args.jobs} processes; "
              f"{len(failed)} failed. Limits: no spills; shared memory <= 163 KB (sm_80), "
              f"227 KB (sm_90); float16/bfloat16 attention kernels must use mma.sync (sm_80) "
              f"or wgmma (sm_90, tiles with M >= 64). Regenerate: `make triton-aot`.")
    text = markdown(rows, header)
    print(text)
    if args.write:
        prefix = ROOT / args.out
        prefix.with_suffix(".md").write_text(text)
        with open(prefix.with_suffix(".csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    for row in failed:
        print(f"FAIL {row['kernel']} {row['variant']} {row['dtype']} {row['arch']} "
              f"head {row['head']} {row['config']}: {row['status']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
