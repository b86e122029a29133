"""Launchers of the C++ CPU attention kernels (``csrc/cpu/attention_cpu.cpp``).

The kernels are the ops ``mmattn::fused_attention_fwd`` / ``mmattn::fused_attention_bwd``
of ``mmattn._C``; this module gives them fake (meta) kernels, so they trace under
``torch.compile`` and pass ``torch.library.opcheck``, and adapts them to the backend
signatures of :data:`mmattn.ops.ATTENTION_FORWARD` / ``ATTENTION_BACKWARD``.
Arguments arrive validated by :func:`mmattn.cross_attention`; the C++ launchers
check them again (for direct op calls) before any kernel runs.

Kernel facts (see the C++ sources for the why):

* inputs float32, bfloat16 or float16, accumulation in float32; q/k/v with unit
  stride on the head dimension are read in place whatever their other strides
  (e.g. ``(B, L, H, D)`` views), others are copied once;
* ``attn_mask`` (bool or float) is read through its strides, broadcast dimensions
  stride 0, never materialised;
* instruction set picked at run time: AVX-512, AVX2+FMA or portable C++;
  ``MMATTN_CPU_ISA=avx512|avx2|generic`` forces one (tests use it), and
  :func:`kernel_isa` tells which one runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmattn import _extension

FORWARD_OP = "fused_attention_fwd"
BACKWARD_OP = "fused_attention_bwd"


_NO_BLOCKS = (None, None, None, None, None, None, None, 0, 0)


def _block_args(block_mask: list[Tensor] | None, block_size: list[int] | None) -> tuple:
    """The op's block-mask arguments: the 7 tensors of ``ops.block_mask_args`` and (bq, bk)."""
    if block_mask is None:
        return _NO_BLOCKS
    return (*block_mask, int(block_size[0]), int(block_size[1]))


def kernel_isa() -> str:
    """The instruction-set build the CPU attention kernels use now (avx512, avx2, generic)."""
    return torch.ops.mmattn.attention_cpu_isa()


def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
    is_causal: bool, dropout_p: float, scale: float, dropout_seed: int | None,
    return_weights: bool, block_mask: list[Tensor] | None = None,
    block_size: list[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(out, lse, weights)`` from the fused CPU kernel; see ``reference.attention_forward``.

    ``block_mask``/``block_size``: a BlockMask laid out by ``ops.block_mask_args``; the
    kernel visits only its nonempty blocks and skips element masking in full ones.
    """
    return torch.ops.mmattn.fused_attention_fwd(
        q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale,
        _seed_int(dropout_seed), return_weights, *_block_args(block_mask, block_size))


def attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool,
    dropout_p: float, scale: float, dropout_seed: int | None,
    block_mask: list[Tensor] | None = None, block_size: list[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, d_mask)`` from the fused CPU kernel (``d_mask`` is always empty:
    float-mask gradients are routed to the reference by ``mmattn::attention_backward``)."""
    dq, dk, dv = torch.ops.mmattn.fused_attention_bwd(
        grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, is_causal, dropout_p, scale,
        _seed_int(dropout_seed), *_block_args(block_mask, block_size))
    return dq, dk, dv, q.new_empty(0)


def _seed_int(dropout_seed: int | None) -> int:
    """The Philox key as the int64 the op schema carries (same 64 bits)."""
    if dropout_seed is None:
        return 0
    seed = int(dropout_seed) & (2**64 - 1)
    return seed - 2**64 if seed >= 2**63 else seed


def _register_fakes() -> None:
    @torch.library.register_fake(f"mmattn::{FORWARD_OP}")
    def _(q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale, dropout_seed,
          return_weights, kv_num_blocks, kv_indices, q_num_blocks, q_indices, full_blocks,
          partial_index, partial_masks, block_q, block_k):
        b, hq, lq, _ = q.shape
        out = q.new_empty(b, hq, lq, v.shape[-1])
        lse = q.new_empty(b, hq, lq, dtype=torch.float32)
        weights = q.new_empty(b, hq, lq, k.shape[2]) if return_weights else q.new_empty(0)
        return out, lse, weights

    @torch.library.register_fake(f"mmattn::{BACKWARD_OP}")
    def _(grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, is_causal, dropout_p,
          scale, dropout_seed, kv_num_blocks, kv_indices, q_num_blocks, q_indices, full_blocks,
          partial_index, partial_masks, block_q, block_k):
        return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


if _extension.extension_loaded() and _extension.has_kernel(FORWARD_OP, "CPU"):
    _register_fakes()
