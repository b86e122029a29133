"""Backend choice, made once per call, before any kernel runs.

Backends: ``"reference"`` (pure PyTorch, always available), ``"cpu"`` (C++ kernels
in mmattn._C), ``"triton"`` (kernels in mmattn.kernels) and ``"cuda"`` (CUDA C++
kernels in mmattn._C).

Order of precedence: the ``backend=`` argument of a call, then the innermost
:func:`use_backend` context, then the ``MMATTN_BACKEND`` environment variable
(read when mmattn is imported), then automatic choice:

* CUDA tensor: ``cuda`` if built and the call is supported, else ``triton``, else
  ``reference``;
* CPU tensor: ``cpu`` if built and the call is supported, else ``reference``.

A forced backend that cannot run a call raises :class:`BackendUnavailableError`
naming the reason; automatic choice never raises.

Everything consulted here is fixed at import time or held in plain module
globals, so ``torch.compile`` traces the choice without graph breaks.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from mmattn import _extension

BACKENDS = ("reference", "cpu", "triton", "cuda")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


class BackendUnavailableError(RuntimeError):
    """A backend was forced for a call it cannot run."""


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS} or None, got {name!r}")
    return name


_env_value = os.environ.get("MMATTN_BACKEND", "").strip().lower()
_ENV_BACKEND: str | None = _check_name(_env_value, "MMATTN_BACKEND") if _env_value else None
_forced_stack: list[str] = []

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
CUDA_AVAILABLE = torch.cuda.is_available()


@contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force ``name`` for mmattn calls in this block (``None`` restores automatic choice
    inside it). Calls that pass ``backend=`` explicitly still win."""
    if name is not None:
        _check_name(name, "use_backend(name)")
    _forced_stack.append(name or "")
    try:
        yield
    finally:
        _forced_stack.pop()


def forced_backend() -> str | None:
    """The backend forced by context or environment, or None for automatic choice."""
    if _forced_stack:
        return _forced_stack[-1] or None
    return _ENV_BACKEND


def triton_reason(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on ``device``, or None if they can."""
    if not TRITON_INSTALLED:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if TRITON_INTERPRET:
            return None
        return "Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before import)"
    return f"Triton kernels do not support device type {device.type!r}"


def extension_reason(op_name: str, device: torch.device) -> str | None:
    """Why mmattn._C has no kernel ``op_name`` for ``device``, or None."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if key is None:
        return f"mmattn._C has no kernels for device type {device.type!r}"
    if not _extension.extension_loaded():
        return f"mmattn._C is not loaded ({_extension.extension_error()})"
    if not _extension.has_kernel(op_name, key):
        return f"mmattn._C has no {key} kernel for mmattn::{op_name} in this build"
    return None


def resolve_backend(
    op: str,
    device: torch.device,
    requested: str | None,
    unsupported: Callable[[str], str | None],
) -> str:
    """Pick the backend for one call of ``op``.

    ``unsupported(backend)`` returns why that backend cannot run this particular
    call (dtype, device, feature), or None when it can.
    """
    if requested is not None:
        _check_name(requested, "backend")
    name = requested or forced_backend()
    if name is not None:
        reason = unsupported(name)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend {name!r} cannot run this call: {reason}")
        return name
    for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
        if unsupported(candidate) is None:
            return candidate
    return "reference"
