"""Registers, stack (spills) and shared memory of every CUDA kernel in a built ``.so``.

Reads ``cuobjdump --dump-resource-usage`` and prints one row per (arch, kernel). A
kernel with a stack frame or local memory has spilled (mmattn kernels keep no arrays
in local memory by design); ``--fail-on-spill sm_90`` exits 1 when any mmattn kernel
spills on that arch. Dynamic shared memory is set at launch and is not in the
binary: the attention kernels' sizes are listed from their tile shapes.

Usage: ``python scripts/cuda_resources.py [--cuobjdump PATH] [--fail-on-spill ARCH] SO``
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

# Dynamic shared memory (bytes) of the attention kernels: 16-bit tiles padded by 8
# elements per row (csrc/cuda/attention_kernels.h), plus float rows of lse/delta.
DYNAMIC_SMEM = {
    ("attention_fwd_kernel", 64): 2 * (64 * 72 * 3),
    ("attention_fwd_kernel", 128): 2 * (64 * 136 * 3),
    ("attention_bwd_dkdv_kernel", 64): 2 * (64 * 72 * 2 + 64 * 72 * 2) + 4 * 2 * 64,
    ("attention_bwd_dkdv_kernel", 128): 2 * (64 * 136 * 2 + 16 * 136 * 2) + 4 * 2 * 16,
    ("attention_bwd_dq_kernel", 64): 2 * (64 * 72 * 4),
    ("attention_bwd_dq_kernel", 128): 2 * (64 * 136 * 4),
}


def find_cuobjdump(explicit: str | None) -> str:
    if explicit:
        return explicit
    found = shutil.which("cuobjdump")
    if found:
        return found
    here = Path(sys.prefix)  # the venv: triton and nvidia-cuda-cuobjdump carry one
    for candidate in sorted(here.rglob("cuobjdump")):
        if candidate.is_file():
            return str(candidate)
    raise SystemExit("cuobjdump not found: pip install nvidia-cuda-cuobjdump (or triton)")


def demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    return out.stdout.splitlines() if out.returncode == 0 else names


def short(name: str) -> str:
    name = name.replace("mmattn::", "").replace("(anonymous namespace)::", "")
    name = re.sub(r"\(.*\)$", "", name)
    name = name.replace("__nv_bfloat16", "bf16").replace("__half", "f16")
    return re.sub(r"^void ", "", name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("so")
    parser.add_argument("--cuobjdump")
    parser.add_argument("--fail-on-spill", action="append", default=[], metavar="ARCH")
    args = parser.parse_args()
    tool = find_cuobjdump(args.cuobjdump)
    text = subprocess.run([tool, "--dump-resource-usage", args.so], capture_output=True,
                          text=True, check=True).stdout
    rows, arch, function = [], None, None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (\S+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            function = m.group(1)
        elif function and (m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)",
                                          line)):
            rows.append((arch, function, *map(int, m.groups())))
            function = None
    if not rows:
        print(f"no CUDA kernels in {args.so}")
        return 1
    names = demangle([r[1] for r in rows])
    print(f"{'arch':6} {'regs':>4} {'stack':>5} {'local':>5} {'smem':>6}  kernel")
    failed = []
    for (arch_, _mangled, reg, stack, shared, local), name in zip(rows, names, strict=True):
        label = short(name)
        smem = shared
        for (kernel, dp), size in DYNAMIC_SMEM.items():
            if kernel in label and re.search(rf"\b{dp}\b", label):
                smem += size
        spilled = stack > 0 or local > 0
        flag = "  SPILL" if spilled else ""
        print(f"{arch_:6} {reg:4d} {stack:5d} {local:5d} {smem:6d}  {label}{flag}")
        if spilled and arch_ in args.fail_on_spill and "mmattn" in name:
            failed.append(f"{arch_} {label}")
    print("(smem: static + the dynamic shared memory the launcher asks for)")
    if failed:
        print("FAIL: kernels spill registers: " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
