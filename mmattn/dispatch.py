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

:mod:`mmattn.nn`'s modules add one rule for small plain calls (:func:`module_call_to_sdpa`).

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


MODULE_SDPA_MAX_WORK = 1 << 18
"""Plain module calls without autograd below this work run ``F.scaled_dot_product_attention``."""
MODULE_SDPA_MAX_WORK_GRAD = 1 << 21
"""The same for calls that record autograd (forward and backward)."""


def module_call_to_sdpa(call: AttentionCall) -> bool:
    """Whether an attention call from an :mod:`mmattn.nn` module runs PyTorch's
    ``F.scaled_dot_product_attention`` instead of a backend: automatic choice (no
    ``use_backend`` context or ``MMATTN_BACKEND``), CPU, eager, no mask but
    ``is_causal``, no dropout, no weights, ``Hq == Hkv``, at least one query and key, and
    work ``B * Hq * Lq * Lk * max(D, Dv)`` below :data:`MODULE_SDPA_MAX_WORK`
    (:data:`MODULE_SDPA_MAX_WORK_GRAD` with autograd).

    Why: a custom op with its autograd function costs ~14 us per call on the dev VM
    (forward; ~50 us forward+backward) over SDPA's C++ entry, more than the whole
    attention of a tiny module call; measured crossovers (2-core EPYC, 2 threads):
    forward 0.4-0.9x of SDPA below 2**18, 1.2x at 2**21; forward+backward 0.6x at 2**13,
    1.0x at 2**21. SDPA computes the same function (top-left causal, fp32 accumulation)
    and has no mmattn-only semantics these calls use. Calls with masks, dropout (mmattn's
    Philox draws), weights, block masks or GQA always go to a backend.
    """
    q, k, v = call.q, call.k, call.v
    if (call.attn_mask is not None or call.key_padding_mask is not None
            or call.block_size is not None or call.dropout_p != 0.0 or call.return_weights
            or q.device.type != "cpu" or q.shape[1] != k.shape[1]):
        return False
    b, h, lq, d = q.shape
    lk = k.shape[2]
    if lq == 0 or lk == 0 or forced_backend() is not None:
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False  # traced graphs hold mmattn's custom op
    limit = MODULE_SDPA_MAX_WORK_GRAD if call.needs_grad else MODULE_SDPA_MAX_WORK
    return b * h * lq * lk * max(d, v.shape[3]) < limit


def resolve_attention(call: AttentionCall, requested: str | None) -> str:
    """:func:`resolve_backend` for one attention call, asking each backend module's
    ``attention_unsupported(call)``."""
    return resolve_backend("cross_attention", call.q.device, requested,
                           lambda candidate: _backends.get(candidate).attention_unsupported(call))


def resolve_ws_linear(x: torch.Tensor, requested: str | None) -> str:
    """:func:`resolve_backend` for one ws_linear call on input ``x``."""
    return resolve_backend("ws_linear", x.device, requested,
                           lambda candidate: _backends.get(candidate).ws_linear_unsupported(x))
