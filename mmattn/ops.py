"""``torch.library`` custom ops of mmattn: one per computation, whatever the backend.

Layering (as flash-attention's interface): public function (validation and
backend choice, :mod:`mmattn.attention`, :mod:`mmattn.ws`) -> entry point here
(:func:`attention`, :func:`ws_linear_apply`) -> the backend's kernel. The chosen
backend travels as a string argument.

Two routes lead to the same kernels. Under ``torch.compile`` (and for
``torch.library.opcheck``, export) the custom ops ``mmattn::*`` are called: opaque
to the tracer, with fake kernels and registered autograd. In eager mode the entry
points call the kernels through a plain ``torch.autograd.Function``, or directly
when no gradient is needed, because the custom-op dispatch adds tens of
microseconds per call, more than a whole layer takes at the seeds' sizes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mmattn import _cpu_attention, reference

if TYPE_CHECKING:
    from mmattn.block_mask import BlockMask

# ---- ws_linear launchers of the C++ CPU kernels (csrc/cpu/ws_linear_cpu.cpp) ---------------
# Same signatures as reference.ws_linear / reference.ws_linear_backward. The kernels take
# 2-D (batch, features) inputs with any strides; leading dimensions are flattened here.

def _ws_linear_cpu(
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


def _ws_linear_backward_cpu(
    grad_y: Tensor, x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor,
    row_indices: Tensor, ccol_indices: Tensor, row_indices_t: Tensor, transpose_perm: Tensor,
    out_features: int, block_size: int, has_bias: bool, *, need_dx: bool = True,
    need_d_values: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """``mmattn::ws_spmm_backward``: ``(dx like x (contiguous), d_values, d_bias)``; with
    ``need_dx`` / ``need_d_values`` False that gradient is skipped and None."""
    flat = x.dim() == 2  # the common case skips two reshapes and a view
    dx, d_values, d_bias = torch.ops.mmattn.ws_spmm_backward.default(
        grad_y if flat else grad_y.reshape(-1, out_features),
        x if flat else x.reshape(-1, x.shape[-1]), values, crow_indices, col_indices,
        ccol_indices, row_indices_t, transpose_perm, block_size, has_bias, need_dx,
        need_d_values)
    if need_dx and not flat:
        dx = dx.view(x.shape)
    return dx if need_dx else None, d_values if need_d_values else None, d_bias


# Backend name -> implementation. Kernel backends add themselves here as they
# are built (the reference entry is the fallback and always present). Whether
# a backend can run a given call is decided before, in mmattn.attention.
ATTENTION_FORWARD = {
    "reference": reference.attention_forward,
    "cpu": _cpu_attention.attention_forward,
}
ATTENTION_BACKWARD = {
    "reference": reference.attention_backward,
    "cpu": _cpu_attention.attention_backward,
}
# Backends whose kernels read a BlockMask's compressed indices (empty blocks are
# never touched, full blocks need no element mask); the others receive the block
# mask folded into a dense element mask.
BLOCK_SPARSE_BACKENDS = frozenset({"cpu"})
WS_LINEAR_FORWARD = {"reference": reference.ws_linear, "cpu": _ws_linear_cpu}
WS_LINEAR_BACKWARD = {"reference": reference.ws_linear_backward, "cpu": _ws_linear_backward_cpu}
# Backends whose WS_LINEAR_BACKWARD entry also takes ``need_dx`` / ``need_d_values``
# (keyword-only, default True) and skips the gradients no one asked for.
WS_LINEAR_BACKWARD_SKIPS_UNNEEDED = frozenset({"cpu"})


def _seed_value(dropout_seed: Tensor | None) -> int | None:
    return None if dropout_seed is None else int(dropout_seed.item()) & (2**64 - 1)


def block_mask_args(block_mask: BlockMask) -> tuple[list[Tensor], list[int]]:
    """How the attention ops carry an ``mmattn.BlockMask``: its compressed tensors
    ``[kv_num_blocks, kv_indices, q_num_blocks, q_indices, full, partial_index,
    partial_masks]`` and ``[bq, bk]`` (field meanings: :class:`mmattn.BlockMask`).
    The custom ops take the seven tensors as separate optional arguments (a schema
    has no optional tensor lists)."""
    tensors = [block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.q_num_blocks,
               block_mask.q_indices, block_mask.full, block_mask.partial_index,
               block_mask.partial_masks]
    return tensors, list(block_mask.block_size)


_NO_BLOCK_TENSORS = (None,) * 7


def _block_list(tensors: tuple[Tensor | None, ...]) -> list[Tensor] | None:
    return None if tensors[0] is None else list(tensors)


def _with_dense_blocks(attn_mask: Tensor | None, q: Tensor, k: Tensor,
                       block_mask: list[Tensor] | None,
                       block_size: list[int] | None) -> Tensor | None:
    """``attn_mask`` AND the block mask, as one element mask broadcast to (B, Hq, Lq, Lk)."""
    if block_mask is None:
        return attn_mask
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    _, _, _, _, full, partial_index, partial_masks = block_mask
    dense = reference.block_mask_to_dense(full, partial_index, partial_masks,
                                          tuple(block_size), (lq, lk))
    dense = dense.expand(b, hq, lq, lk)
    if attn_mask is None:
        return dense
    if attn_mask.dtype == torch.bool:
        return attn_mask & dense
    return attn_mask.masked_fill(~dense, -math.inf)


def _attention_forward_impl(q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale,
                            dropout_seed, return_weights, backend, *block_tensors_and_size):
    impl = ATTENTION_FORWARD[backend]
    seed = _seed_value(dropout_seed)
    block_mask = _block_list(block_tensors_and_size[:7] or _NO_BLOCK_TENSORS)
    block_size = block_tensors_and_size[7] if block_mask is not None else None
    if block_mask is not None and backend in BLOCK_SPARSE_BACKENDS:
        return impl(q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale, seed,
                    return_weights, block_mask, block_size)
    attn_mask = _with_dense_blocks(attn_mask, q, k, block_mask, block_size)
    return impl(q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale, seed,
                return_weights)


@torch.library.custom_op("mmattn::attention_forward", mutates_args=())
def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
    is_causal: bool, dropout_p: float, scale: float, dropout_seed: Tensor | None,
    return_weights: bool, backend: str, kv_num_blocks: Tensor | None = None,
    kv_indices: Tensor | None = None, q_num_blocks: Tensor | None = None,
    q_indices: Tensor | None = None, full_blocks: Tensor | None = None,
    partial_index: Tensor | None = None, partial_masks: Tensor | None = None,
    block_size: list[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused attention forward; returns ``(out, lse, weights)`` (see reference).

    The block-mask arguments are a BlockMask laid out by :func:`block_mask_args` (all
    given or all None), combined with the other masks by AND.
    """
    return _attention_forward_impl(q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p,
                                   scale, dropout_seed, return_weights, backend, kv_num_blocks,
                                   kv_indices, q_num_blocks, q_indices, full_blocks,
                                   partial_index, partial_masks, block_size)


@attention_forward.register_fake
def _(q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale, dropout_seed,
      return_weights, backend, *block_tensors_and_size):
    b, hq, lq, _ = q.shape
    out = q.new_empty(b, hq, lq, v.shape[-1])
    lse = q.new_empty(b, hq, lq, dtype=torch.float32)
    weights = q.new_empty(b, hq, lq, k.shape[2]) if return_weights else q.new_empty(0)
    return out, lse, weights


@torch.library.custom_op("mmattn::attention_backward", mutates_args=())
def attention_backward(
    grad_out: Tensor, grad_weights: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
    out: Tensor, lse: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
    is_causal: bool, dropout_p: float, scale: float, dropout_seed: Tensor | None,
    mask_needs_grad: bool, backend: str, kv_num_blocks: Tensor | None = None,
    kv_indices: Tensor | None = None, q_num_blocks: Tensor | None = None,
    q_indices: Tensor | None = None, full_blocks: Tensor | None = None,
    partial_index: Tensor | None = None, partial_masks: Tensor | None = None,
    block_size: list[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused attention backward; returns ``(dq, dk, dv, d_attn_mask)``.

    ``out`` and ``lse`` are the forward's saved outputs (kernels use them instead
    of recomputing the softmax statistics). A gradient flowing into the returned
    weights, or a float mask that needs a gradient, is handled by the reference.
    """
    return _attention_backward_impl(grad_out, grad_weights, q, k, v, out, lse, attn_mask,
                                    key_padding_mask, is_causal, dropout_p, scale, dropout_seed,
                                    mask_needs_grad, backend, kv_num_blocks, kv_indices,
                                    q_num_blocks, q_indices, full_blocks, partial_index,
                                    partial_masks, block_size)


def _attention_backward_impl(grad_out, grad_weights, q, k, v, out, lse, attn_mask,
                             key_padding_mask, is_causal, dropout_p, scale, dropout_seed,
                             mask_needs_grad, backend, *block_tensors_and_size):
    if grad_weights is not None or mask_needs_grad:
        backend = "reference"
    impl = ATTENTION_BACKWARD[backend]
    seed = _seed_value(dropout_seed)
    block_mask = _block_list(block_tensors_and_size[:7] or _NO_BLOCK_TENSORS)
    block_size = block_tensors_and_size[7] if block_mask is not None else None
    if block_mask is not None and backend in BLOCK_SPARSE_BACKENDS:
        return impl(grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, is_causal,
                    dropout_p, scale, seed, block_mask, block_size)
    attn_mask = _with_dense_blocks(attn_mask, q, k, block_mask, block_size)
    if backend == "reference":
        return impl(grad_out, grad_weights, q, k, v, attn_mask, key_padding_mask, is_causal,
                    dropout_p, scale, seed, mask_needs_grad)
    return impl(grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, is_causal,
                dropout_p, scale, seed)


@attention_backward.register_fake
def _(grad_out, grad_weights, q, k, v, out, lse, attn_mask, key_padding_mask, is_causal,
      dropout_p, scale, dropout_seed, mask_needs_grad, backend, *block_tensors_and_size):
    b, hq, lq, _ = q.shape
    d_mask = q.new_empty(b, hq, lq, k.shape[2]) if mask_needs_grad else q.new_empty(0)
    if mask_needs_grad and attn_mask is not None:
        d_mask = d_mask.to(attn_mask.dtype)
    # Every backend returns contiguous gradients, whatever the inputs' strides.
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), d_mask)


def _attention_setup_context(ctx, inputs, output):
    (q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale, dropout_seed,
     _return_weights, backend, *block_tensors_and_size) = inputs
    out, lse, _weights = output
    block_tensors = tuple(block_tensors_and_size[:7]) or _NO_BLOCK_TENSORS
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, key_padding_mask, dropout_seed,
                          *block_tensors)
    ctx.is_causal, ctx.dropout_p, ctx.scale, ctx.backend = is_causal, dropout_p, scale, backend
    ctx.block_size = block_tensors_and_size[7] if len(block_tensors_and_size) > 7 else None
    ctx.num_inputs = len(inputs)
    ctx.mask_needs_grad = (
        attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.requires_grad
    )
    # An unused output must arrive as None, not as zeros: a zero gradient for the
    # weights would send the backward to the reference for nothing.
    ctx.set_materialize_grads(False)


def _attention_grads(run_backward, ctx, grad_out, grad_weights):
    """Gradients of ``attention_forward``'s inputs, computed by ``run_backward``."""
    (q, k, v, out, lse, attn_mask, key_padding_mask, dropout_seed,
     *block_tensors) = ctx.saved_tensors
    if grad_weights is not None and grad_weights.numel() == 0:
        grad_weights = None
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, d_mask = run_backward(
        grad_out.contiguous(), grad_weights, q, k, v, out, lse, attn_mask, key_padding_mask,
        ctx.is_causal, ctx.dropout_p, ctx.scale, dropout_seed, ctx.mask_needs_grad, ctx.backend,
        *block_tensors, ctx.block_size,
    )
    grads = (dq, dk, dv, d_mask if ctx.mask_needs_grad else None)
    return grads + (None,) * (ctx.num_inputs - len(grads))


def _attention_backward(ctx, grad_out, _grad_lse, grad_weights):
    return _attention_grads(attention_backward, ctx, grad_out, grad_weights)


torch.library.register_autograd(
    "mmattn::attention_forward", _attention_backward, setup_context=_attention_setup_context
)


class _EagerAttention(torch.autograd.Function):
    """Eager twin of the registered autograd: same setup and backward, no op dispatch.

    ``forward(ctx, ...)`` rather than a separate ``setup_context``: with the latter,
    ``apply`` binds its arguments through ``inspect.signature`` on every call, which
    costs more (~27 us here) than the CPU kernel at small sizes.
    """

    @staticmethod
    def forward(ctx, *inputs):
        output = _attention_forward_impl(*inputs)
        _attention_setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])
        return output

    @staticmethod
    def backward(ctx, grad_out, _grad_lse, grad_weights):
        return _attention_grads(_attention_backward_impl, ctx, grad_out, grad_weights)


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
    is_causal: bool, dropout_p: float, scale: float, dropout_seed: Tensor | None,
    return_weights: bool, backend: str, block_mask: list[Tensor] | None = None,
    block_size: list[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Entry point of the attention forward: custom op when tracing, thin path in eager.

    ``block_mask``/``block_size``: a BlockMask as :func:`block_mask_args` lays it out.
    """
    args = (q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale, dropout_seed,
            return_weights, backend, *(block_mask or _NO_BLOCK_TENSORS), block_size)
    if torch.compiler.is_compiling():
        return torch.ops.mmattn.attention_forward.default(*args)
    if _needs_grad(q, k, v, attn_mask):
        return _EagerAttention.apply(*args)
    return _attention_forward_impl(*args)


@torch.library.custom_op("mmattn::ws_linear", mutates_args=())
def ws_linear(
    x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor, row_indices: Tensor,
    ccol_indices: Tensor, row_indices_t: Tensor, transpose_perm: Tensor, out_features: int,
    block_size: int, bias: Tensor | None, backend: str,
) -> Tensor:
    """``y = x @ W^T + bias`` for W stored as a compressed layout (see SparseLayout).

    The transposed index arrays are arguments so kernel backends can run dX as a
    transposed SpMM without building them per call.
    """
    return WS_LINEAR_FORWARD[backend](x, values, crow_indices, col_indices, row_indices,
                                      ccol_indices, row_indices_t, transpose_perm, out_features,
                                      block_size, bias)


@ws_linear.register_fake
def _(x, values, crow_indices, col_indices, row_indices, ccol_indices, row_indices_t,
      transpose_perm, out_features, block_size, bias, backend):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("mmattn::ws_linear_backward", mutates_args=())
def ws_linear_backward(
    grad_y: Tensor, x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor,
    row_indices: Tensor, ccol_indices: Tensor, row_indices_t: Tensor, transpose_perm: Tensor,
    out_features: int, block_size: int, has_bias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dx, d_values, d_bias)``; ``d_values`` only on kept entries."""
    return WS_LINEAR_BACKWARD[backend](grad_y, x, values, crow_indices, col_indices,
                                       row_indices, ccol_indices, row_indices_t, transpose_perm,
                                       out_features, block_size, has_bias)


@ws_linear_backward.register_fake
def _(grad_y, x, values, crow_indices, col_indices, row_indices, ccol_indices, row_indices_t,
      transpose_perm, out_features, block_size, has_bias, backend):
    d_bias = x.new_empty(out_features) if has_bias else x.new_empty(0)
    return x.new_empty(x.shape), values.new_empty(values.shape), d_bias


def _ws_backward_table(grad_y, x, values, index, out_features, block_size, has_bias, backend,
                       need_dx, need_d_values):
    """Eager backward: the backend's function, told what to skip when it can."""
    impl = WS_LINEAR_BACKWARD[backend]
    args = (grad_y, x, values, *index, out_features, block_size, has_bias)
    if backend in WS_LINEAR_BACKWARD_SKIPS_UNNEEDED:
        return impl(*args, need_dx=need_dx, need_d_values=need_d_values)
    return impl(*args)


def _ws_backward_custom_op(grad_y, x, values, index, out_features, block_size, has_bias,
                           backend, need_dx, need_d_values):
    """Traced backward: the ``mmattn::ws_linear_backward`` custom op (all gradients)."""
    return ws_linear_backward(grad_y, x, values, *index, out_features, block_size, has_bias,
                              backend)


def _ws_grads(run_backward, grad_y: Tensor, x: Tensor, values: Tensor,
              index: tuple[Tensor, ...], out_features: int, block_size: int, has_bias: bool,
              backend: str, needs: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
    """``(dx, d_values, d_bias)`` of ws_linear, None where ``needs`` (x, values, bias)
    says no gradient is wanted: the one backward body of both autograd paths."""
    need_dx, need_d_values, need_d_bias = needs[:3]
    has_bias = has_bias and need_d_bias
    dx, d_values, d_bias = run_backward(grad_y.contiguous(), x, values, index, out_features,
                                        block_size, has_bias, backend, need_dx, need_d_values)
    return (dx if need_dx else None, d_values if need_d_values else None,
            d_bias if has_bias else None)


def _ws_setup_context(ctx, inputs, output):
    (x, values, crow, col, rows, ccol, rows_t, perm, out_features, block_size, bias,
     backend) = inputs
    ctx.save_for_backward(x, values, crow, col, rows, ccol, rows_t, perm)
    ctx.out_features, ctx.block_size, ctx.backend = out_features, block_size, backend
    ctx.has_bias = bias is not None


def _ws_backward(ctx, grad_y):
    x, values, *index = ctx.saved_tensors
    dx, d_values, d_bias = _ws_grads(_ws_backward_custom_op, grad_y, x, values, tuple(index),
                                     ctx.out_features, ctx.block_size, ctx.has_bias,
                                     ctx.backend, (True, True, True))
    return dx, d_values, None, None, None, None, None, None, None, None, d_bias, None


torch.library.register_autograd("mmattn::ws_linear", _ws_backward, setup_context=_ws_setup_context)


class _EagerWSLinear(torch.autograd.Function):
    """Eager twin of the registered autograd of ``mmattn::ws_linear``.

    Built for a seed-sized layer, where Python overhead is most of the call:
    ``forward(ctx, ...)`` rather than a separate ``setup_context`` (with which
    ``Function.apply`` binds the arguments through ``inspect.signature`` on every call,
    ~40 us in torch 2.13), and four arguments (``apply`` visits each one): the int32
    index tensors never need gradients and travel in ``meta`` on ``ctx``. Backends that
    can skip unneeded gradients (frozen weights, inputs without grad) are told which.
    """

    @staticmethod
    def forward(ctx, x, values, bias, meta):
        index, out_features, block_size, backend = meta
        ctx.save_for_backward(x, values)
        ctx.meta = meta
        ctx.has_bias = bias is not None
        return WS_LINEAR_FORWARD[backend](x, values, *index, out_features, block_size, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, values = ctx.saved_tensors
        index, out_features, block_size, backend = ctx.meta
        dx, d_values, d_bias = _ws_grads(_ws_backward_table, grad_y, x, values, index,
                                         out_features, block_size, ctx.has_bias, backend,
                                         ctx.needs_input_grad)
        return dx, d_values, d_bias, None


def ws_linear_apply(
    x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor, row_indices: Tensor,
    ccol_indices: Tensor, row_indices_t: Tensor, transpose_perm: Tensor, out_features: int,
    block_size: int, bias: Tensor | None, backend: str,
) -> Tensor:
    """Entry point of ws_linear: custom op when tracing, thin path in eager."""
    if torch.compiler.is_compiling():
        return torch.ops.mmattn.ws_linear.default(
            x, values, crow_indices, col_indices, row_indices, ccol_indices, row_indices_t,
            transpose_perm, out_features, block_size, bias, backend)
    index = (crow_indices, col_indices, row_indices, ccol_indices, row_indices_t,
             transpose_perm)
    # _needs_grad spelled out: its generator costs a microsecond at seed sizes
    if torch.is_grad_enabled() and (x.requires_grad or values.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        return _EagerWSLinear.apply(x, values, bias, (index, out_features, block_size, backend))
    return WS_LINEAR_FORWARD[backend](x, values, *index, out_features, block_size, bias)


# ---- fake kernels of the C++ operators in mmattn._C (shapes only, for tracing) -----------

def _register_extension_fakes() -> None:
    from mmattn._extension import extension_loaded

    if not extension_loaded():
        return

    @torch.library.register_fake("mmattn::philox_uniform")
    def _(counter0, counter1, seed):
        return torch.empty_like(counter0, dtype=torch.float32)

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


_register_extension_fakes()
