"""Shared helpers of the CUDA kernel tests: the emulated extension and its seeds.

``mmattn._C_emu`` is built by ``scripts/build_cuda_emu.py`` (``make test`` runs it).
Without the built file the emulator tests skip with that reason; a file that exists
but does not load fails them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import mmattn

EMU_SO = Path(mmattn.__file__).resolve().parent / "_C_emu.abi3.so"
# Scheduling seeds of the emulator that the kernel tests cycle through.
SEEDS = (0, 1, 2)


def require_emulator() -> None:
    """Load mmattn._C_emu and its fake kernels (skip when it was never built)."""
    if not EMU_SO.exists():
        pytest.skip("mmattn._C_emu is not built (run `make test` or "
                    "`python scripts/build_cuda_emu.py`)")
    from mmattn.backends import cuda

    cuda.emulated()


@contextlib.contextmanager
def emu_seed(seed: int) -> Iterator[None]:
    """Run the block with the emulator's scheduling seed ``seed``."""
    previous = torch.ops.mmattn_emu.emu_set_seed(seed)
    try:
        yield
    finally:
        torch.ops.mmattn_emu.emu_set_seed(previous)


@dataclass
class Target:
    """A build of the CUDA backend and the device its tensors live on."""

    backend: Any
    device: str
    seed: int | None  # emulator scheduling seed (None on a GPU)

    def run(self, fn, *args, **kwargs):
        if self.seed is None:
            return fn(*args, **kwargs)
        with emu_seed(self.seed):
            return fn(*args, **kwargs)


# Parameters of a `target` fixture: the emulator under each seed, then the GPU.
TARGET_PARAMS = [*(f"emu{s}" for s in SEEDS), pytest.param("gpu", marks=pytest.mark.gpu)]


def make_target(param: str, op_name: str) -> Target:
    """The Target of a TARGET_PARAMS entry (skips when that build is missing)."""
    from mmattn.backends import cuda

    if param == "gpu":
        if not cuda._REAL._has(op_name):
            pytest.skip("mmattn._C was built without the CUDA kernels")
        return Target(cuda, "cuda", None)
    require_emulator()
    return Target(cuda.emulated(), "cpu", int(param[3:]))
