"""``torch.library`` custom ops of mmattn: one per computation, whatever the backend.

Layering (as flash-attention's interface): public function (validation and
backend choice, :mod:`mmattn.attention`, :mod:`mmattn.ws`) -> custom op here (fake
kernel for tracing, registered autograd) -> the backend's kernel. The chosen
backend travels as a string argument, so ``torch.compile`` sees one opaque op per
call and ``torch.library.opcheck`` can test each backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmattn import reference

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
# are built (the reference entry is the fallback and always present).
ATTENTION_FORWARD = {"reference": reference.attention_forward}
ATTENTION_BACKWARD = {"reference": reference.attention_backward}
WS_LINEAR_FORWARD = {"reference": reference.ws_linear, "cpu": _ws_linear_cpu}
WS_LINEAR_BACKWARD = {"reference": reference.ws_linear_backward, "cpu": _ws_linear_backward_cpu}
# Backends whose WS_LINEAR_BACKWARD entry also takes ``need_dx`` / ``need_d_values``
# (keyword-only, default True) and skips the gradients no one asked for.
WS_LINEAR_BACKWARD_SKIPS_UNNEEDED = {"cpu"}


def _seed_value(dropout_seed: Tensor | None) -> int | None:
    return None if dropout_seed is None else int(dropout_seed.item()) & (2**64 - 1)


@torch.library.custom_op("mmattn::attention_forward", mutates_args=())
def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
    is_causal: bool, dropout_p: float, scale: float, dropout_seed: Tensor | None,
    return_weights: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused attention forward; returns ``(out, lse, weights)`` (see reference)."""
    impl = ATTENTION_FORWARD[backend]
    return impl(q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale,
                _seed_value(dropout_seed), return_weights)


@attention_forward.register_fake
def _(q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale, dropout_seed,
      return_weights, backend):
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
    mask_needs_grad: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused attention backward; returns ``(dq, dk, dv, d_attn_mask)``.

    ``out`` and ``lse`` are the forward's saved outputs (kernels use them instead
    of recomputing the softmax statistics). A gradient flowing into the returned
    weights, or a float mask that needs a gradient, is handled by the reference.
    """
    if grad_weights is not None or mask_needs_grad:
        backend = "reference"
    impl = ATTENTION_BACKWARD[backend]
    if backend == "reference":
        return impl(grad_out, grad_weights, q, k, v, attn_mask, key_padding_mask, is_causal,
                    dropout_p, scale, _seed_value(dropout_seed), mask_needs_grad)
    return impl(grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, is_causal,
                dropout_p, scale, _seed_value(dropout_seed))


@attention_backward.register_fake
def _(grad_out, grad_weights, q, k, v, out, lse, attn_mask, key_padding_mask, is_causal,
      dropout_p, scale, dropout_seed, mask_needs_grad, backend):
    b, hq, lq, _ = q.shape
    d_mask = q.new_empty(b, hq, lq, k.shape[2]) if mask_needs_grad else q.new_empty(0)
    if mask_needs_grad and attn_mask is not None:
        d_mask = d_mask.to(attn_mask.dtype)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), d_mask


def _attention_setup_context(ctx, inputs, output):
    (q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale, dropout_seed,
     _return_weights, backend) = inputs
    out, lse, _weights = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, key_padding_mask, dropout_seed)
    ctx.is_causal, ctx.dropout_p, ctx.scale, ctx.backend = is_causal, dropout_p, scale, backend
    ctx.mask_needs_grad = (
        attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.requires_grad
    )


def _attention_backward(ctx, grad_out, _grad_lse, grad_weights):
    q, k, v, out, lse, attn_mask, key_padding_mask, dropout_seed = ctx.saved_tensors
    if grad_weights is not None and grad_weights.numel() == 0:
        grad_weights = None
    dq, dk, dv, d_mask = attention_backward(
        grad_out.contiguous(), grad_weights, q, k, v, out, lse, attn_mask, key_padding_mask,
        ctx.is_causal, ctx.dropout_p, ctx.scale, dropout_seed, ctx.mask_needs_grad, ctx.backend,
    )
    return (dq, dk, dv, d_mask if ctx.mask_needs_grad else None,
            None, None, None, None, None, None, None)


torch.library.register_autograd(
    "mmattn::attention_forward", _attention_backward, setup_context=_attention_setup_context
)


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
    impl = WS_LINEAR_FORWARD[backend]
    return impl(x, values, crow_indices, col_indices, row_indices, ccol_indices, row_indices_t,
                transpose_perm, out_features, block_size, bias)


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
    impl = WS_LINEAR_BACKWARD[backend]
    return impl(grad_y, x, values, crow_indices, col_indices, row_indices, ccol_indices,
                row_indices_t, transpose_perm, out_features, block_size, has_bias)


@ws_linear_backward.register_fake
def _(grad_y, x, values, crow_indices, col_indices, row_indices, ccol_indices, row_indices_t,
      transpose_perm, out_features, block_size, has_bias, backend):
    d_bias = x.new_empty(out_features) if has_bias else x.new_empty(0)
    return x.new_empty(x.shape), values.new_empty(values.shape), d_bias


def _ws_setup_context(ctx, inputs, output):
    (x, values, crow, col, rows, ccol, rows_t, perm, out_features, block_size, bias,
     backend) = inputs
    ctx.save_for_backward(x, values, crow, col, rows, ccol, rows_t, perm)
    ctx.out_features, ctx.block_size, ctx.backend = out_features, block_size, backend
    ctx.has_bias = bias is not None


def _ws_backward(ctx, grad_y):
    x, values, *index = ctx.saved_tensors
    dx, d_values, d_bias = ws_linear_backward(
        grad_y.contiguous(), x, values, *index, ctx.out_features, ctx.block_size,
        ctx.has_bias, ctx.backend)
    return (dx, d_values, None, None, None, None, None, None, None, None,
            d_bias if ctx.has_bias else None, None)


torch.library.register_autograd("mmattn::ws_linear", _ws_backward, setup_context=_ws_setup_context)


class _WSLinearEager(torch.autograd.Function):
    """Eager twin of ``mmattn::ws_linear``: the same backend tables, the same gradients.

    In torch 2.13 the autograd wrapper of a ``torch.library.custom_op`` with a
    ``setup_context`` costs ~50 us per call (``torch._library.utils.fill_defaults`` re-reads
    the 12-argument schema once per argument), twice the whole seed-002 layer. Eager calls
    therefore run through this Function; traced calls (``torch.compile``,
    ``torch.export``) use the custom op, see :func:`ws_linear_call`. ``forward(ctx, ...)``
    rather than a separate ``setup_context`` (with which ``apply`` binds arguments through
    ``inspect.signature`` on every call), and few arguments (``apply`` visits each one):
    the int32 index tensors never need gradients, so they travel in ``meta`` on ``ctx``.
    Backends that can skip unneeded gradients (frozen weights, inputs without grad) are
    told which ones are needed.
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
        need_dx, need_d_values, need_d_bias = ctx.needs_input_grad[:3]
        impl = WS_LINEAR_BACKWARD[backend]
        args = (grad_y.contiguous(), x, values, *index, out_features, block_size,
                ctx.has_bias and need_d_bias)
        if backend in WS_LINEAR_BACKWARD_SKIPS_UNNEEDED:
            dx, d_values, d_bias = impl(*args, need_dx=need_dx, need_d_values=need_d_values)
        else:
            dx, d_values, d_bias = impl(*args)
        return (dx if need_dx else None, d_values if need_d_values else None,
                d_bias if ctx.has_bias and need_d_bias else None, None)


def ws_linear_call(
    x: Tensor, values: Tensor, index: tuple[Tensor, ...], out_features: int, block_size: int,
    bias: Tensor | None, backend: str,
) -> Tensor:
    """Runs ``mmattn::ws_linear`` for validated arguments (``index``: the layout's six
    index tensors, :meth:`SparseLayout.index_tensors` order) on the cheapest eager path.

    Traced: the custom op. Eager with autograd: :class:`_WSLinearEager`. Eager without
    anything needing a gradient: the backend's forward directly.
    """
    if torch.compiler.is_compiling():
        return ws_linear(x, values, *index, out_features, block_size, bias, backend)
    if torch.is_grad_enabled() and (x.requires_grad or values.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        return _WSLinearEager.apply(x, values, bias, (index, out_features, block_size, backend))
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
