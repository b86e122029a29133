"""Build ``mmattn._C_emu``: mmattn's CUDA kernels compiled for the CPU SIMT emulator.

The test extension holds the same kernel and launcher sources as the real CUDA build
(``csrc/cuda/*.cu``), compiled by the host C++ compiler with ``MMATTN_CUDA_EMULATION``
so that ``csrc/cuda/device.h`` runs every launch under ``csrc/emu/emulator.cpp``;
plus the emulator's module (``csrc/emu``) and the deliberately broken test kernels
(``tests/cuda``). It registers the launchers as ``mmattn_emu::<op>`` on the CPU key.
It is never part of the wheel. ``make test`` runs this script (incremental: objects
are rebuilt when their source or any header is newer).

Usage: ``MMATTN_CUDA_EMULATION=1 python scripts/build_cuda_emu.py [--force]``
(the variable is implied; ``MMATTN_CUDA_EMULATION=0`` skips the build). Honours
``CXX`` (default g++), ``MAX_JOBS`` and ``MMATTN_EMU_OPT`` (default ``-O2``).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "mmattn" / "_C_emu.abi3.so"
BUILD = ROOT / "build" / "cuda_emu"
# Same stable-ABI targets as setup.py.
DEFINES = ["-DMMATTN_CUDA_EMULATION=1", "-DTORCH_TARGET_VERSION=0x020a000000000000",
           "-DPy_LIMITED_API=0x030A0000"]


def sources() -> list[Path]:
    return sorted([*(ROOT / "csrc" / "emu").glob("*.cpp"), *(ROOT / "csrc" / "cuda").glob("*.cu"),
                   *(ROOT / "tests" / "cuda").glob("*.cu")])


def headers() -> list[Path]:
    return [p for d in ("csrc", "tests/cuda") for p in (ROOT / d).rglob("*.h")]


def main() -> int:
    if os.environ.get("MMATTN_CUDA_EMULATION", "1") == "0":
        print("build_cuda_emu: MMATTN_CUDA_EMULATION=0, skipped")
        return 0
    from torch.utils.cpp_extension import include_paths, library_paths

    force = "--force" in sys.argv[1:]
    cxx = shlex.split(os.environ.get("CXX", "g++"))
    opt = shlex.split(os.environ.get("MMATTN_EMU_OPT", "-O2"))
    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]
    flags = ["-std=c++17", *opt, "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra",
             "-Wno-unused-parameter", "-Werror", *DEFINES, *includes]
    BUILD.mkdir(parents=True, exist_ok=True)
    newest_header = max((p.stat().st_mtime for p in headers()), default=0.0)

    def compile_one(src: Path) -> tuple[Path, bool]:
        obj = BUILD / (src.parent.name + "_" + src.stem + ".o")
        stale = force or not obj.exists() or obj.stat().st_mtime < max(
            src.stat().st_mtime, newest_header)
        if stale:
            cmd = [*cxx, "-x", "c++", "-c", str(src), "-o", str(obj), *flags]
            print(" ".join(cmd[:4]) + " ...", flush=True)
            subprocess.run(cmd, check=True)
        return obj, stale

    jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(compile_one, sources()))
    objects = [obj for obj, _ in results]
    relink = force or any(stale for _, stale in results) or not OUTPUT.exists() or (
        OUTPUT.stat().st_mtime < max(o.stat().st_mtime for o in objects))
    if relink:
        libs = [f"-L{p}" for p in library_paths()]
        cmd = [*cxx, "-shared", "-o", str(OUTPUT), *map(str, objects), *libs,
               "-ltorch", "-ltorch_cpu", "-lc10"]
        subprocess.run(cmd, check=True)
        print(f"build_cuda_emu: built {OUTPUT.relative_to(ROOT)}")
    else:
        print(f"build_cuda_emu: {OUTPUT.relative_to(ROOT)} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
