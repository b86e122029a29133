"""Shared helpers of the CUDA kernel tests: the emulated extension and its seeds.

``mmattn._C_emu`` is built by ``scripts/build_cuda_emu.py`` (``make test`` runs it).
Without the built file the emulator tests skip with that reason; a file that exists
but does not load fails them.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import mmattn

EMU_SO = Path(mmattn.__file__).resolve().parent / "_C_emu.abi3.so"
# Scheduling seeds of the emulator that the kernel tests cycle through.
SEEDS = (0, 1, 2)


def require_emulator() -> None:
    """Load mmattn._C_emu (skip when it was never built)."""
    if not EMU_SO.exists():
        pytest.skip("mmattn._C_emu is not built (run `make test` or "
                    "`python scripts/build_cuda_emu.py`)")
    importlib.import_module("mmattn._C_emu")


@contextlib.contextmanager
def emu_seed(seed: int) -> Iterator[None]:
    """Run the block with the emulator's scheduling seed ``seed``."""
    previous = torch.ops.mmattn_emu.emu_set_seed(seed)
    try:
        yield
    finally:
        torch.ops.mmattn_emu.emu_set_seed(previous)
