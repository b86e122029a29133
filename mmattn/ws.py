"""``ws_linear``: ``y = x @ (W * M)^T + b`` with only the kept entries of W stored."""

from __future__ import annotations

import torch
from torch import Tensor

from mmattn import dispatch, ops
from mmattn.layout import SparseLayout

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _unsupported(backend: str, x: Tensor) -> str | None:
    if backend == "reference":
        return None
    if backend not in ops.WS_LINEAR_FORWARD:
        return f"no {backend} ws_linear kernel is built into this mmattn"
    if backend in ("cpu", "cuda") and x.device.type != backend:
        return f"the {backend} backend needs {backend} tensors, got {x.device.type}"
    if backend in ("cpu", "cuda"):
        return dispatch.extension_reason("ws_linear", x.device)
    return dispatch.triton_reason(x.device)


def ws_linear(x: Tensor, weight: Tensor, layout: SparseLayout, bias: Tensor | None = None,
              *, backend: str | None = None) -> Tensor:
    """Sparse linear layer over a compressed layout.

    Args:
        x: ``(..., in_features)``, float32/float16/bfloat16/float64.
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
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor with at least one dimension (..., in_features)")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32/float16/bfloat16/float64, got {x.dtype}")
    if x.shape[-1] != layout.in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension, the layout "
                         f"expects in_features={layout.in_features}")
    bs = layout.block_size
    expected = (layout.nnz,) if bs == 1 else (layout.nnz, bs, bs)
    if not isinstance(weight, Tensor) or tuple(weight.shape) != expected:
        raise ValueError(f"weight must have shape {expected} (the layout's kept entries), got "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise TypeError(f"weight must match x in dtype and device ({x.dtype}, {x.device}), got "
                        f"{weight.dtype}, {weight.device}")
    if bias is not None and (tuple(bias.shape) != (layout.out_features,) or
                             bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"bias must be ({layout.out_features},) with x's dtype and device, got "
                         f"{tuple(bias.shape)} {bias.dtype} {bias.device}")
    name = dispatch.resolve_backend("ws_linear", x.device, backend,
                                    lambda b: _unsupported(b, x))
    index = layout.to(x.device).index_tensors()
    return ops.ws_linear_apply(x, weight, *index, layout.out_features, bs, bias, name)
