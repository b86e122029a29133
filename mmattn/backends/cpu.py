"""The ``cpu`` backend: C++ kernels of ``mmattn._C`` (``csrc/cpu/``) on CPU tensors.

Attention: ``mmattn::fused_attention_fwd`` / ``fused_attention_bwd``
(``csrc/cpu/attention_cpu.cpp``). ws_linear: ``mmattn::ws_spmm`` /
``ws_spmm_backward`` (``csrc/cpu/ws_linear_cpu.cpp``). This module adapts them to the
backend interface (:mod:`mmattn.backends`) and gives the attention ops fake (meta)
kernels, so they trace under ``torch.compile`` and pass ``torch.library.opcheck``.
Arguments arrive validated by :func:`mmattn.cross_attention` / :func:`mmattn.ws_linear`;
the C++ launchers check them again (for direct op calls) before any kernel runs.

Kernel facts (see the C++ sources for the why):

* inputs float32, bfloat16 or float16, accumulation in float32; q/k/v with unit
  stride on the head dimension are read in place whatever their other strides
  (e.g. ``(B, L, H, D)`` views), others are copied once;
* ``attn_mask`` (bool or float) is read through its strides, broadcast dimensions
  stride 0, never materialised; a BlockMask's empty blocks are never visited;
* instruction set picked at run time: AVX-512, AVX2+FMA or portable C++;
  ``MMATTN_CPU_ISA=avx512|avx2|generic`` forces one (tests use it), and
  :func:`kernel_isa` tells which one runs;
* float32 sums in blocks (errors at or below PyTorch's float32 math for logits up to
  thousands); the backward corrects the saved lse's rounding and recomputes
  ``delta = rowsum(P * dP)`` for rows with ``|lse| >= 8``;
* few query tiles (decoding) split the keys and merge through the log-sum-exp;
  forward and backward are bitwise deterministic for any thread count (the work
  split depends on the shape only);
* ws_linear kernels take 2-D ``(batch, features)`` inputs with any strides (leading
  dimensions are flattened here) and are deterministic for any thread count;
* attention is bitwise deterministic run to run (threads pull work items from a counter,
  but every output element has one writer and partial sums are added in a fixed
  order, so no result depends on which thread ran what). The forward, dk and dv do not
  depend on the thread count either; dq does, in its last bits, when the backward splits
  the keys into chunks -- fewer (batch, kv head) pairs than ``2 x threads`` and not a
  multiple of ``threads`` -- because the chunks' dq partials are then grouped otherwise
  (tests/test_determinism_threads.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmattn import _extension
from mmattn.backends import AttentionCall

NAME = "cpu"
BACKWARD_EXTRAS: frozenset[str] = frozenset({"grad_lse"})

FORWARD_OP = "fused_attention_fwd"
INFERENCE_OP = "fused_attention_infer"
BACKWARD_OP = "fused_attention_bwd"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _ops_reason(op_names: tuple[str, ...]) -> str | None:
    if not _extension.extension_loaded():
        return f"mmattn._C is not loaded ({_extension.extension_error()})"
    for op_name in op_names:
        if not _extension.has_kernel(op_name, "CPU"):
            return f"mmattn._C has no CPU kernel for mmattn::{op_name} in this build"
    return None


# Fixed once the extension is imported: read once here, so that backend choice (also
# under torch.compile) reads a constant instead of asking the dispatcher per call.
ATTENTION_REASON = _ops_reason((FORWARD_OP, INFERENCE_OP, BACKWARD_OP))
_WS_REASON = _ops_reason(("ws_spmm", "ws_spmm_backward"))


def _common_reason(t: Tensor, op: str) -> str | None:
    if t.device.type != "cpu":
        return f"the cpu backend needs CPU tensors, got {t.device.type}"
    if t.dtype not in KERNEL_DTYPES:
        return (f"the cpu {op} kernels support float32, bfloat16 and float16, got {t.dtype} "
                f"(float64 runs on the reference backend only)")
    return None


def attention_unsupported(call: AttentionCall) -> str | None:
    return _common_reason(call.q, "attention") or ATTENTION_REASON


def ws_linear_unsupported(x: Tensor) -> str | None:
    return _common_reason(x, "ws_linear") or _WS_REASON


# ---- attention ---------------------------------------------------------------------------

_NO_BLOCKS = (None, None, None, None, None, None, None, 0, 0)


def _block_args(block_mask: list[Tensor] | None, block_size: list[int] | None) -> tuple:
    """The op's block-mask arguments: the 7 tensors of ``block_mask_tensors`` and (bq, bk)."""
    if block_mask is None:
        return _NO_BLOCKS
    return (*block_mask, int(block_size[0]), int(block_size[1]))


def _seed_int(dropout_seed: int | None) -> int:
    """The Philox key as the int64 the op schema carries (same 64 bits)."""
    if dropout_seed is None:
        return 0
    seed = int(dropout_seed) & (2**64 - 1)
    return seed - 2**64 if seed >= 2**63 else seed


def kernel_isa() -> str:
    """The instruction-set build the CPU attention kernels use now (avx512, avx2, generic)."""
    return torch.ops.mmattn.attention_cpu_isa()


def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
    is_causal: bool, dropout_p: float, scale: float, dropout_seed: int | None,
    return_weights: bool, block_mask: list[Tensor] | None = None,
    block_size: list[int] | None = None, keep_fp32_out: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(out, lse, weights, out_fp32)`` from the fused CPU kernel (interface:
    :mod:`mmattn.backends`); the kernel visits only a block mask's nonempty blocks and
    skips element masking in full ones."""
    return torch.ops.mmattn.fused_attention_fwd.default(
        q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale,
        _seed_int(dropout_seed), return_weights, *_block_args(block_mask, block_size),
        keep_fp32_out)


def attention_inference(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                        key_padding_mask: Tensor | None, is_causal: bool,
                        scale: float) -> Tensor:
    """``out`` of :func:`attention_forward` for a call without dropout, weights, block
    mask, lse or backward (interface: :mod:`mmattn.backends`): the same kernels through
    an op with 7 arguments and one output, ~5 us less per call."""
    return torch.ops.mmattn.fused_attention_infer.default(q, k, v, attn_mask, key_padding_mask,
                                                          is_causal, scale)


def attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool,
    dropout_p: float, scale: float, dropout_seed: int | None,
    block_mask: list[Tensor] | None = None, block_size: list[int] | None = None,
    grad_lse: Tensor | None = None, grad_weights: Tensor | None = None,
    mask_needs_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor, None]:
    """``(dq, dk, dv, None)`` from the fused CPU kernel (interface: :mod:`mmattn.backends`);
    ``out`` may be the forward's float32 ``out_fp32`` for half inputs, and ``grad_lse``
    enters as ``delta_i = rowsum(dO_i * O_i) - grad_lse_i``."""
    dq, dk, dv = torch.ops.mmattn.fused_attention_bwd.default(
        grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, is_causal, dropout_p, scale,
        _seed_int(dropout_seed), *_block_args(block_mask, block_size), grad_lse)
    return dq, dk, dv, None


# ---- ws_linear ---------------------------------------------------------------------------

def ws_linear_forward(
    x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor, row_indices: Tensor,
    ccol_indices: Tensor, row_indices_t: Tensor, transpose_perm: Tensor, out_features: int,
    block_size: int, bias: Tensor | None,
) -> Tensor:
    """``mmattn::ws_spmm`` on ``x.reshape(-1, in_features)``; returns ``(..., out_features)``."""
    if x.dim() == 2:
        return torch.ops.mmattn.ws_spmm.default(x, values, crow_indices, col_indices,
                                                out_features, block_size, bias)
    y = torch.ops.mmattn.ws_spmm.default(x.reshape(-1, x.shape[-1]), values, crow_indices,
                                         col_indices, out_features, block_size, bias)
    return y.view(*x.shape[:-1], out_features)


def ws_linear_backward(
    grad_y: Tensor, x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor,
    row_indices: Tensor, ccol_indices: Tensor, row_indices_t: Tensor, transpose_perm: Tensor,
    out_features: int, block_size: int, has_bias: bool, need_dx: bool = True,
    need_d_values: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``mmattn::ws_spmm_backward``: ``(dx like x (contiguous), d_values, d_bias)``, each
    None when not needed (the kernel skips it)."""
    flat = x.dim() == 2  # the common case skips two reshapes and a view
    dx, d_values, d_bias = torch.ops.mmattn.ws_spmm_backward.default(
        grad_y if flat else grad_y.reshape(-1, out_features),
        x if flat else x.reshape(-1, x.shape[-1]), values, crow_indices, col_indices,
        ccol_indices, row_indices_t, transpose_perm, block_size, has_bias, need_dx,
        need_d_values)
    if need_dx and not flat:
        dx = dx.view(x.shape)
    return (dx if need_dx else None, d_values if need_d_values else None,
            d_bias if has_bias else None)


def _register_fakes() -> None:
    @torch.library.register_fake(f"mmattn::{FORWARD_OP}")
    def _(q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale, dropout_seed,
          return_weights, kv_num_blocks, kv_indices, q_num_blocks, q_indices, full_blocks,
          partial_index, partial_masks, block_q, block_k, keep_fp32_out=False):
        b, hq, lq, _ = q.shape
        out = q.new_empty(b, hq, lq, v.shape[-1])
        lse = q.new_empty(b, hq, lq, dtype=torch.float32)
        weights = q.new_empty(b, hq, lq, k.shape[2]) if return_weights else q.new_empty(0)
        keep = keep_fp32_out and q.dtype != torch.float32
        out_fp32 = (q.new_empty(b, hq, lq, v.shape[-1], dtype=torch.float32) if keep
                    else q.new_empty(0))
        return out, lse, weights, out_fp32

    @torch.library.register_fake(f"mmattn::{INFERENCE_OP}")
    def _(q, k, v, attn_mask, key_padding_mask, is_causal, scale):
        return q.new_empty(*q.shape[:3], v.shape[-1])

    @torch.library.register_fake(f"mmattn::{BACKWARD_OP}")
    def _(grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, is_causal, dropout_p,
          scale, dropout_seed, kv_num_blocks, kv_indices, q_num_blocks, q_indices, full_blocks,
          partial_index, partial_masks, block_q, block_k, grad_lse=None):
        return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _register_ws_fakes() -> None:
    @torch.library.register_fake("mmattn::ws_spmm")
    def _(x, values, crow_indices, col_indices, out_features, block_size, bias):
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("mmattn::ws_sddmm")
    def _(grad_y, x, crow_indices, col_indices, block_size):
        nnz = col_indices.shape[0]
        return x.new_empty((nnz,) if block_size == 1 else (nnz, block_size, block_size))

    @torch.library.register_fake("mmattn::ws_spmm_backward")
    def _(grad_y, x, values, crow_indices, col_indices, ccol_indices, row_indices_t,
          transpose_perm, block_size, has_bias, need_dx=True, need_d_values=True):
        dx = x.new_empty(x.shape if need_dx else (0,))
        d_values = values.new_empty(values.shape if need_d_values else (0,))
        return dx, d_values, x.new_empty(grad_y.shape[1] if has_bias else 0)


if ATTENTION_REASON is None:
    _register_fakes()
if _WS_REASON is None:
    _register_ws_fakes()
