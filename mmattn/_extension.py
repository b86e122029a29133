"""Loading of the compiled extension ``mmattn._C``, once, with one warning if absent."""

from __future__ import annotations

import importlib
import warnings

import torch

_LOAD_ERROR: str | None = None
_LOADED = False


def _load() -> None:
    global _LOAD_ERROR, _LOADED
    try:
        importlib.import_module("mmattn._C")
        _LOADED = True
    except ImportError as exc:  # a missing or unloadable .so: fall back to PyTorch
        _LOAD_ERROR = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            "mmattn: the compiled extension mmattn._C could not be loaded "
            f"({_LOAD_ERROR}); using the PyTorch reference implementations. "
            "Build it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )


_load()


def extension_loaded() -> bool:
    """True when mmattn._C is imported and its operators are registered."""
    return _LOADED


def extension_error() -> str | None:
    """Why mmattn._C could not be loaded, or None."""
    return _LOAD_ERROR


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """True when ``mmattn::<op_name>`` has a kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    if not _LOADED:
        return False
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"mmattn::{op_name}", dispatch_key))
