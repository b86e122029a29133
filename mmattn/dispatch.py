"""Backend choice, made once per call, before any kernel runs.

Backends: ``"reference"`` (pure PyTorch, always available), ``"cpu"`` (C++ kernels
in mmattn._C), ``"triton"`` (kernels in mmattn.kernels) and ``"cuda"`` (CUDA C++
kernels in mmattn._C); each is a module of :mod:`mmattn.backends` that says which
calls it supports.

Order of precedence: the ``backend=`` argument of a call, then the innermost
:func:`use_backend` context of the calling thread, then the ``MMATTN_BACKEND``
environment variable (read when mmattn is imported), then automatic choice:

* CUDA tensor: ``cuda`` if built, the call is supported and the CUDA kernels have
  passed the GPU tests on real hardware (:data:`mmattn.backends.cuda.VERIFIED_ON_HARDWARE`);
  else ``triton``, then ``cuda``, then ``reference``;
* CPU tensor: ``cpu`` if built and the call is supported, else ``reference``.

A forced backend that cannot run a call raises :class:`BackendUnavailableError`
naming the reason; automatic choice never raises.

:func:`use_backend` is thread-local: a context entered in one thread never changes
another thread's calls. ``torch.compile`` traces the choice without graph breaks (it
guards on the thread's context, so a change recompiles).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from mmattn import backends as _backends
from mmattn.backends import NAMES as BACKENDS
from mmattn.backends import AttentionCall
from mmattn.backends import cuda as _cuda_backend


class BackendUnavailableError(RuntimeError):
    """A backend was forced for a call it cannot run."""


def _check_name(name: str, source: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS} or None, got {name!r}")
    return name


_env_value = os.environ.get("MMATTN_BACKEND", "").strip().lower()
_ENV_BACKEND: str | None = _check_name(_env_value, "MMATTN_BACKEND") if _env_value else None
_forced = threading.local()  # .stack: this thread's use_backend contexts, innermost last

CUDA_AVAILABLE = torch.cuda.is_available()
_AUTO_ORDER = {
    "cuda": (("cuda", "triton", "reference") if _cuda_backend.VERIFIED_ON_HARDWARE
             else ("triton", "cuda", "reference")),
    "cpu": ("cpu", "reference"),
}


@contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force ``name`` for this thread's mmattn calls in this block (``None`` restores
    automatic choice inside it). Calls that pass ``backend=`` explicitly still win."""
    if name is not None:
        _check_name(name, "use_backend(name)")
    stack = getattr(_forced, "stack", None)
    if stack is None:
        stack = _forced.stack = []
    stack.append(name or "")
    try:
        yield
    finally:
        stack.pop()


def forced_backend() -> str | None:
    """The backend forced by this thread's context or the environment, or None."""
    stack = getattr(_forced, "stack", None)
    if stack:
        return stack[-1] or None
    return _ENV_BACKEND


def auto_order(device: torch.device) -> tuple[str, ...]:
    """Backends automatic choice tries for tensors on ``device``, first choice first."""
    return _AUTO_ORDER.get(device.type, ("reference",))


def resolve_backend(
    op: str,
    device: torch.device,
    requested: str | None,
    unsupported: Callable[[str], str | None],
) -> str:
    """Pick the backend for one call of ``op``.

    ``unsupported(backend)`` returns why that backend cannot run this particular
    call (dtype, device, feature), or None when it can; it is the backend module's
    ``*_unsupported`` function applied to the call.
    """
    if requested is not None:
        _check_name(requested, "backend")
    name = requested or forced_backend()
    if name is not None:
        reason = unsupported(name)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend {name!r} cannot run this call: {reason}")
        return name
    for candidate in auto_order(device):
        if unsupported(candidate) is None:
            return candidate
    return "reference"


def resolve_attention(call: AttentionCall, requested: str | None) -> str:
    """:func:`resolve_backend` for one attention call, asking each backend module's
    ``attention_unsupported(call)``."""
    return resolve_backend("cross_attention", call.q.device, requested,
                           lambda candidate: _backends.get(candidate).attention_unsupported(call))


def resolve_ws_linear(x: torch.Tensor, requested: str | None) -> str:
    """:func:`resolve_backend` for one ws_linear call on input ``x``."""
    return resolve_backend("ws_linear", x.device, requested,
                           lambda candidate: _backends.get(candidate).ws_linear_unsupported(x))
