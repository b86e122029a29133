"""mmattn's backends: one module each, with the same functions.

=============  ==========================  ============================================
backend        module                      kernels
=============  ==========================  ============================================
``reference``  :mod:`mmattn.backends.reference`  pure PyTorch (every device; the test oracle)
``cpu``        :mod:`mmattn.backends.cpu`        C++ in ``csrc/cpu/`` (ops of ``mmattn._C``)
``triton``     :mod:`mmattn.backends.triton`     Triton in ``kernels/`` (``mmattn.kernels``)
``cuda``       :mod:`mmattn.backends.cuda`       CUDA C++ in ``csrc/cuda/`` (ops of ``mmattn._C``)
=============  ==========================  ============================================

Every backend module defines, and :mod:`mmattn.dispatch` / :mod:`mmattn.ops` use only:

``NAME``
    the backend's name.
``BACKWARD_EXTRAS``
    which optional gradients its attention backward computes itself, a subset of
    ``{"grad_weights", "mask_grad", "grad_lse"}`` (a gradient flowing into the returned
    weights, the gradient of a float ``attn_mask``, a gradient flowing into the returned
    log-sum-exp). :mod:`mmattn.ops` sends a backward that needs another one to the
    reference backend.
``attention_unsupported(call: AttentionCall) -> str | None``
    why this backend cannot run the attention call, or None: the one place that says
    what the backend supports (device, dtypes, head dims, features).
``attention_forward(q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale,
dropout_seed, return_weights, block_mask, block_size, keep_fp32_out)``
    returns ``(out, lse, weights, out_fp32)``: ``out`` ``(B, Hq, Lq, Dv)`` in q's dtype;
    ``lse`` ``(B, Hq, Lq)``, float32 (float64 for float64 inputs), natural log-sum-exp of
    the masked scaled scores, +inf for a row with no visible key; ``weights`` the
    normalised post-dropout probabilities ``(B, Hq, Lq, Lk)`` in q's dtype when
    ``return_weights``, else empty; ``out_fp32`` the
    float32 output before rounding when ``keep_fp32_out`` and q is half precision (the
    backward computes ``rowsum(dO * O)`` from it), else empty.
``attention_inference(q, k, v, attn_mask, key_padding_mask, is_causal, scale) -> out``
    optional: ``out`` alone for a call without dropout, weights, block mask, lse or
    backward, which :mod:`mmattn.ops` sends here in eager mode when the backend has it
    (the CPU backend's leaner op: a decoding step's overhead).
``attention_backward(grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, is_causal,
dropout_p, scale, dropout_seed, block_mask, block_size, grad_lse, grad_weights,
mask_needs_grad)``
    returns ``(dq, dk, dv, d_mask)``, contiguous, in the inputs' dtypes (``d_mask`` None
    unless ``mask_needs_grad``). ``out`` is the saved output (``out_fp32`` when the
    forward kept one). ``grad_lse`` / ``grad_weights`` / ``mask_needs_grad`` are None /
    None / False unless named in ``BACKWARD_EXTRAS``.
``ws_linear_unsupported(x: Tensor) -> str | None``
``ws_linear_forward(x, values, crow_indices, col_indices, row_indices, ccol_indices,
row_indices_t, transpose_perm, out_features, block_size, bias) -> y``
``ws_linear_backward(grad_y, x, values, <the same six index tensors>, out_features,
block_size, has_bias, need_dx, need_d_values) -> (dx, d_values, d_bias)``
    ``dx`` / ``d_values`` are None when not needed (skipped), ``d_bias`` None without bias.

Common argument conventions (validated once by :func:`mmattn.cross_attention` and
:func:`mmattn.ws_linear` before a backend sees them): ``attn_mask`` arrives expanded to
``(B, Hq, Lq, Lk)`` (broadcast dimensions have stride 0), ``dropout_seed`` is an int or
None, ``block_mask`` is the list of :func:`block_mask_tensors` or None, with
``block_size = [bq, bk]``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, NamedTuple

from torch import Tensor

if TYPE_CHECKING:
    from mmattn.block_mask import BlockMask

NAMES = ("reference", "cpu", "triton", "cuda")


class AttentionCall(NamedTuple):
    """What a backend needs to know to say whether it can run an attention call."""

    q: Tensor
    k: Tensor
    v: Tensor
    attn_mask: Tensor | None
    key_padding_mask: Tensor | None
    is_causal: bool
    dropout_p: float
    return_weights: bool
    block_size: tuple[int, int] | None
    needs_grad: bool


_MODULES: dict[str, ModuleType] = {}


def get(name: str) -> ModuleType:
    """The backend module ``name`` (one of :data:`NAMES`), imported on first use."""
    module = _MODULES.get(name)
    if module is None:
        module = importlib.import_module(f"mmattn.backends.{name}")
        _MODULES[name] = module
    return module


def block_mask_tensors(block_mask: BlockMask) -> list[Tensor]:
    """How backends receive an :class:`mmattn.BlockMask`: ``[kv_num_blocks, kv_indices,
    q_num_blocks, q_indices, full, partial_index, partial_masks]`` (field meanings:
    :class:`mmattn.BlockMask`), with ``block_size = list(block_mask.block_size)``."""
    return [block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.q_num_blocks,
            block_mask.q_indices, block_mask.full, block_mask.partial_index,
            block_mask.partial_masks]
