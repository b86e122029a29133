"""``ws_linear``: ``y = x @ (W * M)^T + b`` with only the kept entries of W stored."""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from mmattn import backends, dispatch, ops
from mmattn.layout import SparseLayout

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# SparseLayout -> its copies on other devices, so a layout used with CUDA tensors is
# copied once, not per call. Weak keys: a copy lives as long as its layout.
_DEVICE_COPIES: weakref.WeakKeyDictionary[SparseLayout, dict[torch.device, SparseLayout]] = (
    weakref.WeakKeyDictionary())


def _layout_on(layout: SparseLayout, device: torch.device) -> SparseLayout:
    if layout.crow_indices.device == device:
        return layout
    copies = _DEVICE_COPIES.setdefault(layout, {})
    if device not in copies:
        copies[device] = layout.to(device)
    return copies[device]


def _dense_error(name: str, t: Tensor) -> TypeError:
    kind = "nested" if t.is_nested else str(t.layout).replace("torch.", "")
    return TypeError(f"{name} must be a dense (strided) tensor, got a {kind} tensor")


def _check_dense(name: str, t: Tensor) -> None:
    """Sparse, mkldnn or nested tensors reach no kernel: a clear error instead."""
    if t.layout is not torch.strided or t.is_nested:
        raise _dense_error(name, t)


def _check_input(x: Tensor, in_features: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.layout is not torch.strided:  # sparse, mkldnn, jagged nested
        raise _dense_error("x", x)
    if x.dim() < 1:
        raise ValueError("x must be a tensor with at least one dimension (..., in_features)")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32/float16/bfloat16/float64, got {x.dtype}")
    try:
        width = x.shape[-1]
    except RuntimeError:  # a strided nested tensor has no sizes
        raise _dense_error("x", x) from None
    if width != in_features:
        raise ValueError(f"x has {width} features in its last dimension, the layout "
                         f"expects in_features={in_features}")


def _check_parameters(x: Tensor, weight: Tensor, bias: Tensor | None,
                      weight_shape: tuple[int, ...], out_features: int) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    _check_dense("weight", weight)
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        _check_dense("bias", bias)
    if tuple(weight.shape) != weight_shape:
        raise ValueError(f"weight must have shape {weight_shape} (the layout's kept entries), "
                         f"got {tuple(getattr(weight, 'shape', ()))}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise TypeError(f"weight must match x in dtype and device ({x.dtype}, {x.device}), got "
                        f"{weight.dtype}, {weight.device}")
    if bias is not None and (not isinstance(bias, Tensor) or
                             tuple(bias.shape) != (out_features,) or
                             bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"bias must be ({out_features},) with x's dtype and device, got "
                         f"{tuple(getattr(bias, 'shape', ()))} {getattr(bias, 'dtype', None)} "
                         f"{getattr(bias, 'device', None)}")


def ws_linear(x: Tensor, weight: Tensor, layout: SparseLayout, bias: Tensor | None = None,
              *, backend: str | None = None) -> Tensor:
    """Sparse linear layer over a compressed layout.

    Args:
        x: ``(..., in_features)``, float32/float16/bfloat16/float64, any strides.
        weight: the kept values in CSR order: ``(layout.nnz,)``, or
            ``(layout.nnz, bs, bs)`` for a block layout (``bs = layout.block_size``).
        layout: a :class:`SparseLayout` of shape ``(out_features, in_features)``.
        bias: ``(out_features,)`` or None.
        backend: force a backend (see :mod:`mmattn.dispatch`).

    Returns:
        ``(..., out_features)`` in x's dtype. Gradients reach ``x``, ``weight`` (kept
        entries only) and ``bias``.
    """
    if not isinstance(layout, SparseLayout):
        raise TypeError(f"layout must be an mmattn.SparseLayout, got {type(layout).__name__}")
    _check_input(x, layout.in_features)
    bs = layout.block_size
    nnz = layout.col_indices.shape[0]
    _check_parameters(x, weight, bias, (nnz,) if bs == 1 else (nnz, bs, bs),
                      layout.out_features)
    index = _layout_on(layout, x.device).index_tensors()
    return _call(x, weight, index, layout.out_features, bs, bias, backend)


def ws_linear_indexed(x: Tensor, weight: Tensor, index: tuple[Tensor, ...],
                      shape: tuple[int, int], block_size: int, bias: Tensor | None = None, *,
                      backend: str | None = None) -> Tensor:
    """:func:`ws_linear` for a layout given as its index tensors, already on x's device.

    For modules that hold a layout as buffers (:mod:`mmattn.nn`): ``index`` is
    :meth:`SparseLayout.index_tensors` of a valid layout of ``shape = (out_features,
    in_features)``, and ``weight`` / ``bias`` have the layout's shapes. Those are trusted,
    which keeps a seed-sized call a few microseconds above the kernel; ``x`` is checked,
    also against the weight's dtype and device.
    """
    _check_input(x, shape[1])
    if weight.dtype != x.dtype or weight.device != x.device:
        raise TypeError(f"x must match the weight in dtype and device ({weight.dtype}, "
                        f"{weight.device}), got {x.dtype}, {x.device}")
    return _call(x, weight, index, shape[0], block_size, bias, backend)


def ws_linear_scripted(x: Tensor, weight: Tensor, crow_indices: Tensor, col_indices: Tensor,
                       row_indices: Tensor, ccol_indices: Tensor, row_indices_t: Tensor,
                       transpose_perm: Tensor, out_features: int, in_features: int,
                       block_size: int, bias: Tensor | None) -> Tensor:
    """:func:`ws_linear_indexed` for TorchScript (which cannot run mmattn's Python
    dispatch): the same check of ``x``, then the custom op ``mmattn::ws_linear`` with
    backend ``"auto"``, which picks the backend per call as eager mode does."""
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have in_features={in_features} features in its last "
                         f"dimension, got shape {list(x.shape)}")
    if x.dtype != weight.dtype or x.device != weight.device:
        raise TypeError(f"x must match the weight in dtype and device ({weight.dtype}, "
                        f"{weight.device}), got {x.dtype}, {x.device}")
    return torch.ops.mmattn.ws_linear(x, weight, crow_indices, col_indices, row_indices,
                                      ccol_indices, row_indices_t, transpose_perm,
                                      out_features, block_size, bias, "auto")


# (device type, dtype) -> the automatic backend choice, which depends on nothing else
# (the backends' ws_linear_unsupported); filled by eager calls, saving a microsecond
# per seed-sized call.
_AUTO_CHOICE: dict[tuple[str, torch.dtype], str] = {}


def _call(x: Tensor, weight: Tensor, index: tuple[Tensor, ...], out_features: int,
          block_size: int, bias: Tensor | None, backend: str | None) -> Tensor:
    automatic = backend is None and dispatch.forced_backend() is None
    key = (x.device.type, x.dtype)
    name = _AUTO_CHOICE.get(key) if automatic else None
    if name is None:
        name = dispatch.resolve_backend(
            "ws_linear", x.device, backend,
            lambda candidate: backends.get(candidate).ws_linear_unsupported(x))
        if automatic and not torch.compiler.is_compiling():
            _AUTO_CHOICE[key] = name
    return ops.ws_linear_apply(x, weight, *index, out_features, block_size, bias, name)
