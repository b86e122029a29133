"""The ``triton`` backend: Triton kernels of ``mmattn.kernels`` (``kernels/``).

Runs CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1`` (set before the first
kernel module is imported; slow, for tests). Interface: :mod:`mmattn.backends`.

Attention (``kernels/attention.py``, FlashAttention-2 style, no atomics):

* float16 / bfloat16 (float32 accumulation) and float32 (IEEE dots; TF32 only when
  ``torch.backends.cuda.matmul.allow_tf32`` is True); bfloat16 needs a GPU (the
  interpreter has no bfloat16 arithmetic); float64 runs on the reference;
* head dims D and Dv up to 256 (padded to powers of two), Lq != Lk, GQA / MQA, any
  strides (``(B, L, H, D)`` views read in place);
* bool / float ``attn_mask`` read through its strides, ``key_padding_mask``, causal,
  a BlockMask's compressed indices (empty blocks never visited), dropout (Philox,
  bit-identical to the reference), ``return_weights`` (second pass), ``return_lse``
  with its gradient (``grad_lse``). Gradients of the returned weights and of a float
  mask go to the reference backward (:mod:`mmattn.ops`).

ws_linear (``kernels/ws_linear.py``): CSR SpMM forward, transposed SpMM for dX and SDDMM
for the kept weights, block layouts with ``tl.dot``; deterministic, each gradient
computed only when needed.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from types import ModuleType

import torch
from torch import Tensor

from mmattn.backends import AttentionCall

NAME = "triton"
BACKWARD_EXTRAS: frozenset[str] = frozenset({"grad_lse"})

INSTALLED = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
MAX_HEAD_DIM = 256  # kernels/attention.py pads head dims to powers of two up to this
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension


# What `python -m mmattn.info` prints about the kernels (one place: this module says
# what the backend supports).
KERNELS = (
    ("attention", "kernels/attention.py: fwd (+ lse), weights pass, bwd preprocess / dK,dV "
     "(GQA group summed in-program) / dQ; no atomics"),
    ("", "float16, bfloat16, float32 (IEEE dots; TF32 if allowed); head dims <= 256; "
     "Lq != Lk; GQA/MQA; any strides"),
    ("", "bool/float attn_mask (strided, broadcast in place), key padding, causal, "
     "BlockMask (empty blocks skipped), Philox dropout, return_weights, grad of lse"),
    ("ws_linear", "kernels/ws_linear.py: CSR SpMM forward, transposed SpMM dX, SDDMM dW "
     "(kept entries only); element and block layouts (tl.dot); deterministic"),
)


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


def _dtype_reason(t: Tensor, op: str) -> str | None:
    if t.dtype not in _DTYPES:
        return (f"the triton {op} kernels support float32, float16 and bfloat16, got "
                f"{t.dtype} (float64 runs on the reference backend only)")
    if t.dtype == torch.bfloat16 and t.device.type == "cpu":
        return "the Triton interpreter has no bfloat16 arithmetic (bfloat16 needs a GPU)"
    return None


def attention_unsupported(call: AttentionCall) -> str | None:
    reason = device_reason(call.q.device) or _dtype_reason(call.q, "attention")
    if reason:
        return reason
    b, hq, _, d = call.q.shape
    dv = call.v.shape[-1]
    if b * hq > _MAX_GRID_Y:
        return (f"the triton attention kernels launch one grid row per (batch, head): "
                f"B * Hq = {b * hq} exceeds {_MAX_GRID_Y}")
    if d > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        return (f"the triton attention kernels support head dims up to {MAX_HEAD_DIM}, got "
                f"D={d}, Dv={dv}")
    return None


def ws_linear_unsupported(x: Tensor) -> str | None:
    return device_reason(x.device) or _dtype_reason(x, "ws_linear")


_KERNELS: dict[str, ModuleType] = {}


def _on_device(t: Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _kernels(name: str) -> ModuleType:
    """``mmattn.kernels.<name>``, imported on first use (importing it imports Triton)."""
    module = _KERNELS.get(name)
    if module is None:
        module = importlib.import_module(f"mmattn.kernels.{name}")
        _KERNELS[name] = module
    return module


# ---- attention ---------------------------------------------------------------------------

def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
    is_causal: bool, dropout_p: float, scale: float, dropout_seed: int | None,
    return_weights: bool, block_mask: list[Tensor] | None = None,
    block_size: list[int] | None = None, keep_fp32_out: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(out, lse, weights, out_fp32)`` from the Triton forward (and weights pass)."""
    with _on_device(q):
        return _kernels("attention").attention_forward(
            q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale, dropout_seed,
            return_weights, block_mask, block_size, keep_fp32_out)


def attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool,
    dropout_p: float, scale: float, dropout_seed: int | None,
    block_mask: list[Tensor] | None = None, block_size: list[int] | None = None,
    grad_lse: Tensor | None = None, grad_weights: Tensor | None = None,
    mask_needs_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor, None]:
    """``(dq, dk, dv, None)`` from the Triton backward (``grad_weights`` and mask gradients
    are not in BACKWARD_EXTRAS: :mod:`mmattn.ops` never sends them here)."""
    if grad_weights is not None or mask_needs_grad:
        raise NotImplementedError("the triton attention backward computes neither the "
                                  "gradient of the weights nor that of a float mask")
    with _on_device(q):
        dq, dk, dv = _kernels("attention").attention_backward(
            grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, is_causal, dropout_p,
            scale, dropout_seed, block_mask, block_size, grad_lse)
    return dq, dk, dv, None


# ---- ws_linear ---------------------------------------------------------------------------

def ws_linear_forward(
    x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor, row_indices: Tensor,
    ccol_indices: Tensor, row_indices_t: Tensor, transpose_perm: Tensor, out_features: int,
    block_size: int, bias: Tensor | None,
) -> Tensor:
    """``y (..., out_features)`` by CSR SpMM over ``x.reshape(-1, in_features)``."""
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    with _on_device(x):
        y = _kernels("ws_linear").ws_linear_forward(x2d, values, crow_indices, col_indices,
                                                    out_features, block_size, bias)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], out_features)


def ws_linear_backward(
    grad_y: Tensor, x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor,
    row_indices: Tensor, ccol_indices: Tensor, row_indices_t: Tensor, transpose_perm: Tensor,
    out_features: int, block_size: int, has_bias: bool, need_dx: bool = True,
    need_d_values: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, d_values, d_bias)``: dx by transposed SpMM, d_values by SDDMM over the kept
    entries; each None when not needed."""
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    gy = grad_y if grad_y.dim() == 2 else grad_y.reshape(-1, out_features)
    with _on_device(x):
        dx, d_values, d_bias = _kernels("ws_linear").ws_linear_backward(
            gy, x2d, values, crow_indices, col_indices, row_indices, ccol_indices,
            row_indices_t, transpose_perm, block_size, has_bias, need_dx, need_d_values)
    if dx is not None and x.dim() != 2:
        dx = dx.view(x.shape)
    return dx, d_values, d_bias
