"""Build of mmattn and its one extension, mmattn._C.

The extension uses only the PyTorch stable ABI and Py_LIMITED_API, so one abi3
wheel serves CPython >= 3.10 and torch >= 2.10. C++ CPU sources always build;
CUDA sources build whenever nvcc is found, also against a CPU-only torch, because
stable-ABI code needs no CUDA headers from torch. nvcc is driven here rather than
through torch.utils.cpp_extension.CUDAExtension, which links c10_cuda/torch_cuda
(absent from CPU wheels) and refuses an nvcc whose major differs from torch's.

Environment:
  MMATTN_CUDA=auto|0|1     build CUDA sources: when nvcc exists / never / always (error if no nvcc)
  TORCH_CUDA_ARCH_LIST     e.g. "8.0;9.0+PTX" (the default); "+PTX" also embeds PTX
  MAX_JOBS                 parallel compile jobs (default: CPU count)
  NVCC_THREADS             nvcc --threads per job (default 2)
  MMATTN_LOCAL_VERSION     local version tag; default "cu<major>" when CUDA is compiled
  MMATTN_SANITIZE=1        AddressSanitizer + UndefinedBehaviorSanitizer on the host C++
                           (for `make sanitize`; loading needs LD_PRELOAD of libasan)
  MMATTN_CUDA_WERROR=1     nvcc, ptxas and host-compiler warnings of .cu files are errors (CI)
  CUDA_HOME                CUDA toolkit root (default: from nvcc on PATH)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
BASE_VERSION = "0.1.0"
# Oldest torch whose stable ABI we compile against; see csrc/cuda/stream.h for
# the one newer entry point, which is resolved at run time.
TORCH_TARGET_VERSION = "0x020a000000000000"
PY_LIMITED_API = "0x030A0000"
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
# The fused attention kernels spell every fused multiply-add out (Vec::fmadd): the
# compiler must not contract a product and a sum on its own. A contraction skips the
# product's rounding in one place and not in another, so the backward's probabilities
# exp(s - lse) would not be computed from the same rounded scores as lse and its
# correction (attention_cpu_impl.h, BackwardParams::lam): at logits of 1000 that put
# errors of 1e-5 into P = 1 (issue 11). ws_linear keeps GCC's default (it relies on it).
_NO_CONTRACT = ["-ffp-contract=off"]
PER_SOURCE_FLAGS = {name: _NO_CONTRACT for name in (
    "attention_cpu_avx512.cpp", "attention_cpu_avx2.cpp", "attention_cpu_generic.cpp")}


def _find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cuda_home(nvcc: str) -> Path:
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"])
    # nvcc on PATH may be a wrapper script; its dry run names the real bin folder.
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / "mmattn_nvcc_probe.cu"
    probe.write_text("int main() { return 0; }\n")
    out = subprocess.run([nvcc, "--dryrun", "-c", str(probe), "-o", os.devnull],
                         capture_output=True, text=True)
    match = re.search(r"_HERE_=(\S+)", out.stderr + out.stdout)
    if match:
        return Path(match.group(1)).resolve().parent
    return Path(nvcc).resolve().parent.parent


def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    if not match:
        raise RuntimeError(f"cannot parse the CUDA version from `{nvcc} --version`:\n{out}")
    return f"{match.group(1)}.{match.group(2)}"


def _want_cuda() -> tuple[bool, str | None]:
    mode = os.environ.get("MMATTN_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"MMATTN_CUDA must be auto, 0 or 1, got {mode!r}")
    nvcc = _find_nvcc()
    if mode == "0":
        return False, None
    if mode == "1" and nvcc is None:
        raise RuntimeError("MMATTN_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
    return nvcc is not None, nvcc


def parse_arch_list(arch_list: str) -> tuple[list[str], list[str]]:
    """Turn TORCH_CUDA_ARCH_LIST into nvcc -gencode flags and the list of SASS archs."""
    flags: list[str] = []
    sass: list[str] = []
    entries = [e for e in re.split(r"[;\s,]+", arch_list.strip()) if e]
    if not entries:
        raise ValueError("TORCH_CUDA_ARCH_LIST is empty")
    for entry in entries:
        ptx = entry.endswith("+PTX")
        arch = entry[: -len("+PTX")] if ptx else entry
        if not re.fullmatch(r"\d+\.\d+[af]?", arch):
            raise ValueError(f"TORCH_CUDA_ARCH_LIST entry {entry!r} is not like '8.0' or '9.0+PTX'")
        major, minor = arch.split(".")
        num = major + minor
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        sass.append(f"sm_{num}")
        if ptx:
            flags += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
    return flags, sass


class MMAttnBuildExt(build_ext):
    """Compile C++ with the host compiler and .cu with nvcc, then link one abi3 .so."""

    def build_extension(self, ext: Extension) -> None:
        import torch
        from torch.utils.cpp_extension import include_paths, library_paths

        build_cuda, nvcc = _want_cuda()
        jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
        self.parallel = max(1, jobs)

        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        torch_includes = include_paths()
        common_defines = [
            f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}",
            f"-DPy_LIMITED_API={PY_LIMITED_API}",
            "-DMMATTN_WITH_CUDA=1" if build_cuda else "-DMMATTN_WITH_CUDA=0",
        ]
        ext.include_dirs = [*ext.include_dirs, *torch_includes]
        ext.extra_compile_args = ["-std=c++17", "-O3", "-fvisibility=hidden", *common_defines]
        if _sanitize():
            # Host C++ only (nvcc code is not instrumented). -O1 -g: readable reports;
            # -fno-sanitize-recover=undefined stops at the first UB so a test fails.
            flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
            ext.extra_compile_args += [*flags, "-O1", "-fno-sanitize-recover=undefined"]
            ext.extra_link_args = [*ext.extra_link_args, *flags]
        ext.library_dirs = [*ext.library_dirs, *library_paths()]
        ext.libraries = [*ext.libraries, "torch", "torch_cpu", "c10"]
        self._per_source_flags()

        info: dict[str, object] = {
            "cuda_compiled": False,
            "cuda_version": None,
            "cuda_archs": [],
            "ptx_archs": [],
            "torch_built_with": torch.__version__,
            "torch_target_version": TORCH_TARGET_VERSION,
        }
        if build_cuda and cu_sources:
            assert nvcc is not None
            cuda_home = _cuda_home(nvcc)
            arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST
            gencode, sass = parse_arch_list(arch_list)
            nvcc_threads = os.environ.get("NVCC_THREADS", "2")
            obj_dir = Path(self.build_temp) / "cuda"
            obj_dir.mkdir(parents=True, exist_ok=True)
            includes = [f"-I{p}" for p in [*ext.include_dirs, str(cuda_home / "include")]]
            werror = (["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Werror"]
                      if os.environ.get("MMATTN_CUDA_WERROR") == "1" else [])

            def compile_cu(src: str) -> str:
                obj = obj_dir / (Path(src).stem + ".o")
                cmd = [
                    nvcc, "-c", src, "-o", str(obj), "-std=c++17", "-O3", "--use_fast_math",
                    "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
                    "--threads", nvcc_threads, *common_defines, *gencode, *includes, *werror,
                ]
                print(" ".join(cmd), flush=True)
                subprocess.run(cmd, check=True)
                return str(obj)

            with ThreadPoolExecutor(max_workers=self.parallel) as pool:
                ext.extra_objects = [*ext.extra_objects, *pool.map(compile_cu, cu_sources)]
            # Static cudart: the .so then needs only the driver (libcuda), not a
            # particular libcudart soname, so it runs under other CUDA runtimes.
            ext.library_dirs = [*ext.library_dirs, str(cuda_home / "lib64"), str(cuda_home / "lib")]
            ext.libraries = [*ext.libraries, "cudart_static", "rt", "dl", "pthread"]
            ptx = [f"compute_{a.split('.')[0]}{a.split('.')[1][:1]}"
                   for a in re.split(r"[;\s,]+", arch_list) if a.endswith("+PTX")]
            info.update(cuda_compiled=True, cuda_version=_nvcc_version(nvcc),
                        cuda_archs=sass, ptx_archs=ptx)
        self._write_build_info(info)
        super().build_extension(ext)

    def _per_source_flags(self) -> None:
        """Adds PER_SOURCE_FLAGS to the compile commands of the sources they name."""
        compile_one = self.compiler._compile  # distutils' per-source step (unix compiler)

        def patched(obj, src, ext, cc_args, extra_postargs, pp_opts):
            extra = PER_SOURCE_FLAGS.get(Path(src).name, [])
            compile_one(obj, src, ext, cc_args, [*extra_postargs, *extra], pp_opts)

        self.compiler._compile = patched

    def _write_build_info(self, info: dict[str, object]) -> None:
        text = (
            '"""Written by setup.py at build time: what mmattn._C was compiled with."""\n\n'
            + "".join(f"{k.upper()} = {v!r}\n" for k, v in info.items())
        )
        # A sanitizer build goes to its own build dir and leaves the source tree's record
        # (that of the dev install) alone.
        targets = [] if _sanitize() else [ROOT / "mmattn" / "_build_info.py"]
        if not self.inplace:
            targets.append(Path(self.build_lib) / "mmattn" / "_build_info.py")
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)

    def get_ext_filename(self, ext_name: str) -> str:
        # abi3 name so one .so serves every CPython >= 3.10.
        return os.path.join(*ext_name.split(".")) + ".abi3.so"


def _sanitize() -> bool:
    return os.environ.get("MMATTN_SANITIZE", "0").strip() not in ("", "0")


def _version() -> str:
    local = os.environ.get("MMATTN_LOCAL_VERSION")
    if local is None:
        build_cuda, nvcc = _want_cuda()
        local = f"cu{_nvcc_version(nvcc).split('.')[0]}" if build_cuda and nvcc else ""
    return f"{BASE_VERSION}+{local}" if local else BASE_VERSION


def _sources() -> list[str]:
    # csrc/emu is the CPU emulator of the CUDA device layer: it builds only into the
    # test extension mmattn._C_emu (scripts/build_cuda_emu.py), never into mmattn._C.
    def listed(pattern: str) -> list[str]:
        return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob(pattern)
                      if "emu" not in p.relative_to(ROOT / "csrc").parts[:1])

    return listed("*.cpp") + listed("*.cu")


setup(
    version=_version(),
    packages=[*find_packages(include=["mmattn", "mmattn.*"]), "mmattn.kernels"],
    package_dir={"mmattn.kernels": "kernels"},
    ext_modules=[
        Extension(
            "mmattn._C",
            sources=_sources(),
            depends=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.h")),
            py_limited_api=True,
        )
    ],
    cmdclass={"build_ext": MMAttnBuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    zip_safe=False,
)

if __name__ == "__main__" and "--help" in sys.argv:
    print(__doc__)
