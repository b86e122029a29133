"""``python -m mmattn.info``: versions, built backends, what runs here and why not."""

from __future__ import annotations

import importlib
import platform
import sys

import torch

from mmattn import _extension, dispatch
from mmattn.backends import triton as triton_backend


def _build_info() -> dict[str, object]:
    try:
        module = importlib.import_module("mmattn._build_info")
    except ImportError:
        return {}
    return {k.lower(): v for k, v in vars(module).items() if k.isupper()}


def _kernels(dispatch_key: str) -> list[str]:
    names = sorted(
        name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("mmattn::")
    )
    return [n for n in names if _extension.has_kernel(n, dispatch_key)]


def _cuda_verification_lines() -> list[str]:
    """Whether the CUDA C++ kernels have run on a GPU, and what automatic choice does."""
    from mmattn.backends import cuda

    if cuda.VERIFIED_ON_HARDWARE:
        return ["             verified on GPU hardware: automatic choice prefers them on CUDA "
                "tensors"]
    return ["             not yet verified on GPU hardware (tested under the SIMT emulator "
            "only): automatic", "             choice prefers Triton; backend=\"cuda\" "
            "selects them"]


def report() -> str:
    """The text printed by ``python -m mmattn.info``."""
    import mmattn

    build = _build_info()
    lines = [
        f"mmattn {mmattn.__version__}",
        f"python {platform.python_version()} ({sys.executable})",
        f"torch {torch.__version__} (CUDA runtime in torch: {torch.version.cuda or 'none'})",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    lines.append("")
    lines.append("backends:")
    lines.append("  reference  built, usable (pure PyTorch; every device)")

    if _extension.extension_loaded():
        cpu_ops = _kernels("CPU")
        lines.append(f"  cpu        built, usable; C++ kernels: {', '.join(cpu_ops) or 'none'}")
    else:
        lines.append("  cpu        not usable: mmattn._C did not load "
                     f"({_extension.extension_error()})")

    if build.get("cuda_compiled"):
        cuda_ops = _kernels("CUDA") if _extension.extension_loaded() else []
        archs = ", ".join(build.get("cuda_archs", [])) or "none"
        ptx = ", ".join(build.get("ptx_archs", [])) or "none"
        state = "usable" if dispatch.CUDA_AVAILABLE else "not runnable here: no CUDA GPU visible"
        lines.append(
            f"  cuda       compiled with CUDA {build.get('cuda_version')} for SASS [{archs}] "
            f"PTX [{ptx}]; {state}; CUDA kernels: {', '.join(cuda_ops) or 'none'}"
        )
        lines.extend(_cuda_verification_lines())
    else:
        lines.append("  cuda       not compiled (no nvcc at build time, or MMATTN_CUDA=0)")

    if not triton_backend.INSTALLED:
        lines.append("  triton     not usable: triton is not installed")
    elif dispatch.CUDA_AVAILABLE:
        lines.append("  triton     usable on CUDA tensors (whenever the CUDA C++ kernels do not "
                     "cover a call)")
    elif triton_backend.INTERPRET:
        lines.append("  triton     interpreter available (TRITON_INTERPRET=1): runs on CPU tensors")
    else:
        lines.append("  triton     installed; no GPU here, interpreter available with "
                     "TRITON_INTERPRET=1 (CPU tensors, slow)")
    if triton_backend.INSTALLED:
        for op, text in triton_backend.KERNELS:
            lines.append(f"             {op:<10} {text}")
    lines.append("")
    forced = dispatch.forced_backend()
    lines.append(f"backend override: {forced or 'none (automatic)'}  [MMATTN_BACKEND]")
    lines.append(f"torch threads: {torch.get_num_threads()}")
    if build:
        lines.append(f"extension built against torch {build.get('torch_built_with')}, stable ABI "
                     f"target {build.get('torch_target_version')}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
