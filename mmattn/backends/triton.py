"""The ``triton`` backend: Triton kernels of ``mmattn.kernels`` (``kernels/``).

Runs CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1`` (set before the first
kernel module is imported). Attention and ws_linear kernels are not built yet: only the
Philox kernel exists (``mmattn.kernels.philox``), so every call is declared unsupported
here and automatic choice moves on. Interface: :mod:`mmattn.backends`.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from mmattn.backends import AttentionCall

NAME = "triton"
BACKWARD_EXTRAS: frozenset[str] = frozenset()

INSTALLED = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_reason(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on ``device``, or None if they can."""
    if not INSTALLED:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if INTERPRET:
            return None
        return "Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before import)"
    return f"Triton kernels do not support device type {device.type!r}"


def attention_unsupported(call: AttentionCall) -> str | None:
    return device_reason(call.q.device) or "no Triton attention kernel is built into this mmattn"


def ws_linear_unsupported(x: Tensor) -> str | None:
    return device_reason(x.device) or "no Triton ws_linear kernel is built into this mmattn"


def _not_built(*_args, **_kwargs):
    raise NotImplementedError("mmattn's Triton attention and ws_linear kernels are not built yet")


attention_forward = attention_backward = ws_linear_forward = ws_linear_backward = _not_built
