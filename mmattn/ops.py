"""``torch.library`` custom ops of mmattn and their autograd: one op per computation,
whatever the backend.

Layering (as flash-attention's interface): public function (validation and backend
choice, :mod:`mmattn.attention`, :mod:`mmattn.ws`) -> entry point here
(:func:`attention`, :func:`ws_linear_apply`) -> the backend module's function
(:mod:`mmattn.backends`). The chosen backend travels as a string argument.

Two routes lead to the same kernels. Under ``torch.compile``, ``torch.export`` and
``torch.jit.trace`` (and for ``torch.library.opcheck``) the custom ops ``mmattn::*`` are
called: opaque to the tracer, with fake kernels and registered autograd. TorchScript
calls them too, with backend :data:`AUTO` (see :mod:`mmattn.nn`). In eager mode the entry
points call the backend through a plain ``torch.autograd.Function``, or directly
when no gradient is needed, because the custom-op dispatch adds tens of
microseconds per call, more than a whole layer takes at the seeds' sizes.

Gradients a backend's kernels do not compute (``BACKWARD_EXTRAS``) are computed by the
reference backward; so is every double backward (``create_graph=True``): the reference
backward is made of differentiable torch operations, so second derivatives are exact
on every backend instead of silently zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmattn import backends, dispatch
from mmattn.backends import AttentionCall, reference

_NO_BLOCK_TENSORS = (None,) * 7

AUTO = "auto"
"""The ``backend`` argument that lets the forward custom ops choose the backend per call,
as :mod:`mmattn.dispatch` would: for callers that cannot run mmattn's Python dispatch
first (TorchScript, see :mod:`mmattn.nn`). The autograd records the concrete choice."""


def _seed_value(dropout_seed: Tensor | None) -> int | None:
    return None if dropout_seed is None else int(dropout_seed.item()) & (2**64 - 1)


def _block_list(tensors: tuple[Tensor | None, ...]) -> list[Tensor] | None:
    return None if tensors[0] is None else list(tensors)


# ---- attention -----------------------------------------------------------------------------

def _concrete_backend(backend: str, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                      key_padding_mask: Tensor | None, is_causal: bool, dropout_p: float,
                      return_weights: bool, block_tensors_and_size: tuple | list) -> str:
    """``backend``, or for :data:`AUTO` the backend :mod:`mmattn.dispatch` picks for this
    call (thread context, ``MMATTN_BACKEND``, automatic choice), as
    :func:`mmattn.cross_attention` would. Deterministic, so the forward and the autograd
    set-up of one call agree."""
    if backend != AUTO:
        return backend
    block_size = (block_tensors_and_size[7] if len(block_tensors_and_size) > 7
                  and block_tensors_and_size[0] is not None else None)
    # Below autograd grad mode is off: requires_grad alone says whether a backward follows.
    grad = any(t is not None and t.requires_grad for t in (q, k, v, attn_mask))
    call = AttentionCall(q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p,
                         return_weights, None if block_size is None else tuple(block_size), grad)
    return dispatch.resolve_attention(call, None)


def _attention_forward_impl(q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale,
                            dropout_seed, return_weights, keep_fp32_out, backend,
                            *block_tensors_and_size):
    block_mask = _block_list(block_tensors_and_size[:7] or _NO_BLOCK_TENSORS)
    block_size = block_tensors_and_size[7] if block_mask is not None else None
    if backend == AUTO:
        backend = _concrete_backend(backend, q, k, v, attn_mask, key_padding_mask, is_causal,
                                    dropout_p, return_weights, block_tensors_and_size)
    return backends.get(backend).attention_forward(
        q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale,
        _seed_value(dropout_seed), return_weights, block_mask, block_size, keep_fp32_out)


@torch.library.custom_op("mmattn::attention_forward", mutates_args=())
def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
    is_causal: bool, dropout_p: float, scale: float, dropout_seed: Tensor | None,
    return_weights: bool, keep_fp32_out: bool, backend: str, kv_num_blocks: Tensor | None = None,
    kv_indices: Tensor | None = None, q_num_blocks: Tensor | None = None,
    q_indices: Tensor | None = None, full_blocks: Tensor | None = None,
    partial_index: Tensor | None = None, partial_masks: Tensor | None = None,
    block_size: list[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused attention forward; returns ``(out, lse, weights, out_fp32)`` (see
    :mod:`mmattn.backends`). ``backend``: a backend name, or :data:`AUTO`.

    The block-mask arguments are a BlockMask laid out by
    :func:`mmattn.backends.block_mask_tensors` (all given or all None), combined with the
    other masks by AND.
    """
    return _attention_forward_impl(q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p,
                                   scale, dropout_seed, return_weights, keep_fp32_out, backend,
                                   kv_num_blocks, kv_indices, q_num_blocks, q_indices,
                                   full_blocks, partial_index, partial_masks, block_size)


@attention_forward.register_fake
def _(q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale, dropout_seed,
      return_weights, keep_fp32_out, backend, *block_tensors_and_size):
    b, hq, lq, _ = q.shape
    out = q.new_empty(b, hq, lq, v.shape[-1])
    lse = q.new_empty(b, hq, lq, dtype=torch.float64 if q.dtype == torch.float64
                      else torch.float32)
    weights = q.new_empty(b, hq, lq, k.shape[2]) if return_weights else q.new_empty(0)
    half = q.dtype in (torch.float16, torch.bfloat16)
    out_fp32 = (q.new_empty(b, hq, lq, v.shape[-1], dtype=torch.float32)
                if keep_fp32_out and half else q.new_empty(0))
    return out, lse, weights, out_fp32


def _attention_backward_impl(grad_out, grad_weights, grad_lse, q, k, v, out, lse, attn_mask,
                             key_padding_mask, is_causal, dropout_p, scale, dropout_seed,
                             mask_needs_grad, backend, *block_tensors_and_size):
    module = backends.get(backend)
    extras = module.BACKWARD_EXTRAS
    if ((grad_weights is not None and "grad_weights" not in extras)
            or (mask_needs_grad and "mask_grad" not in extras)
            or (grad_lse is not None and "grad_lse" not in extras)):
        module = reference
    block_mask = _block_list(block_tensors_and_size[:7] or _NO_BLOCK_TENSORS)
    block_size = block_tensors_and_size[7] if block_mask is not None else None
    return module.attention_backward(
        grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, is_causal, dropout_p, scale,
        _seed_value(dropout_seed), block_mask, block_size, grad_lse, grad_weights,
        mask_needs_grad)


@torch.library.custom_op("mmattn::attention_backward", mutates_args=())
def attention_backward(
    grad_out: Tensor, grad_weights: Tensor | None, grad_lse: Tensor | None, q: Tensor,
    k: Tensor, v: Tensor, out: Tensor, lse: Tensor, attn_mask: Tensor | None,
    key_padding_mask: Tensor | None, is_causal: bool, dropout_p: float, scale: float,
    dropout_seed: Tensor | None, mask_needs_grad: bool, backend: str,
    kv_num_blocks: Tensor | None = None, kv_indices: Tensor | None = None,
    q_num_blocks: Tensor | None = None, q_indices: Tensor | None = None,
    full_blocks: Tensor | None = None, partial_index: Tensor | None = None,
    partial_masks: Tensor | None = None, block_size: list[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused attention backward; returns ``(dq, dk, dv, d_attn_mask)`` (the last empty
    unless ``mask_needs_grad``).

    ``out`` and ``lse`` are the forward's saved outputs (kernels use them instead of
    recomputing the softmax statistics); ``out`` is the float32 output when the forward
    kept one.
    """
    dq, dk, dv, d_mask = _attention_backward_impl(
        grad_out, grad_weights, grad_lse, q, k, v, out, lse, attn_mask, key_padding_mask,
        is_causal, dropout_p, scale, dropout_seed, mask_needs_grad, backend,
        kv_num_blocks, kv_indices, q_num_blocks, q_indices, full_blocks, partial_index,
        partial_masks, block_size)
    return dq, dk, dv, q.new_empty(0) if d_mask is None else d_mask


@attention_backward.register_fake
def _(grad_out, grad_weights, grad_lse, q, k, v, out, lse, attn_mask, key_padding_mask,
      is_causal, dropout_p, scale, dropout_seed, mask_needs_grad, backend,
      *block_tensors_and_size):
    b, hq, lq, _ = q.shape
    d_mask = q.new_empty(b, hq, lq, k.shape[2]) if mask_needs_grad else q.new_empty(0)
    if mask_needs_grad and attn_mask is not None:
        d_mask = d_mask.to(attn_mask.dtype)
    # Every backend returns contiguous gradients, whatever the inputs' strides.
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), d_mask)


def _attention_setup_context(ctx, inputs, output):
    (q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale, dropout_seed,
     _return_weights, _keep_fp32_out, backend, *block_tensors_and_size) = inputs
    out, lse, _weights, out_fp32 = output
    block_tensors = tuple(block_tensors_and_size[:7]) or _NO_BLOCK_TENSORS
    # The float32 output, when kept, gives the backward an exact rowsum(dO * O).
    saved_out = out_fp32 if out_fp32.numel() else out
    ctx.save_for_backward(q, k, v, saved_out, lse, attn_mask, key_padding_mask, dropout_seed,
                          *block_tensors)
    ctx.is_causal, ctx.dropout_p, ctx.scale = is_causal, dropout_p, scale
    ctx.backend = _concrete_backend(backend, q, k, v, attn_mask, key_padding_mask, is_causal,
                                    dropout_p, _return_weights, block_tensors_and_size)
    ctx.block_size = block_tensors_and_size[7] if len(block_tensors_and_size) > 7 else None
    ctx.num_inputs = len(inputs)
    ctx.mask_needs_grad = _mask_needs_grad(attn_mask)
    # An unused output must arrive as None, not as zeros: a zero gradient for the
    # weights or the lse would send the backward to the reference for nothing.
    ctx.set_materialize_grads(False)


def _mask_needs_grad(attn_mask: Tensor | None) -> bool:
    return attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.requires_grad


def _attention_grads(run_backward, saved: tuple, settings: tuple, grad_out, grad_lse,
                     grad_weights):
    """``(dq, dk, dv, d_mask)`` of ``attention_forward``, computed by ``run_backward``, or
    by the differentiable reference backward when a graph of the gradients is wanted.

    ``saved``: ``(q, k, v, out, lse, attn_mask, key_padding_mask, dropout_seed,
    *block_tensors)``; ``settings``: ``(is_causal, dropout_p, scale, backend, block_size,
    mask_needs_grad)``. One body for both autograd paths.
    """
    (q, k, v, out, lse, attn_mask, key_padding_mask, dropout_seed, *block_tensors) = saved
    is_causal, dropout_p, scale, backend, block_size, mask_needs_grad = settings
    if grad_weights is not None and grad_weights.numel() == 0:
        grad_weights = None
    if grad_out is None:
        grad_out = q.new_zeros(out.shape)
    if torch.is_grad_enabled():  # create_graph=True: double backward must be exact
        run_backward = _attention_backward_differentiable
    dq, dk, dv, d_mask = run_backward(
        grad_out.contiguous(), grad_weights, grad_lse, q, k, v, out, lse, attn_mask,
        key_padding_mask, is_causal, dropout_p, scale, dropout_seed, mask_needs_grad, backend,
        *block_tensors, block_size,
    )
    return dq, dk, dv, d_mask if mask_needs_grad else None


def _attention_backward_differentiable(grad_out, grad_weights, grad_lse, q, k, v, out, lse,
                                       attn_mask, key_padding_mask, is_causal, dropout_p, scale,
                                       dropout_seed, mask_needs_grad, _backend,
                                       *block_tensors_and_size):
    return _attention_backward_impl(grad_out, grad_weights, grad_lse, q, k, v, out, lse,
                                    attn_mask, key_padding_mask, is_causal, dropout_p, scale,
                                    dropout_seed, mask_needs_grad, "reference",
                                    *block_tensors_and_size)


def _attention_backward(ctx, grad_out, grad_lse, grad_weights, _grad_out_fp32):
    settings = (ctx.is_causal, ctx.dropout_p, ctx.scale, ctx.backend, ctx.block_size,
                ctx.mask_needs_grad)
    grads = _attention_grads(attention_backward, ctx.saved_tensors, settings, grad_out,
                             grad_lse, grad_weights)
    return grads + (None,) * (ctx.num_inputs - len(grads))


torch.library.register_autograd(
    "mmattn::attention_forward", _attention_backward, setup_context=_attention_setup_context
)


class _EagerAttention(torch.autograd.Function):
    """Eager twin of the registered autograd: same backward body, no op dispatch.

    Built for seed-sized calls, where ``Function.apply``'s own cost is a large share of
    the time: ``forward(ctx, ...)`` rather than a separate ``setup_context`` (with which
    ``apply`` binds its arguments through ``inspect.signature`` on every call), five
    arguments (``apply`` visits each one; everything that never needs a gradient
    travels in ``spec``, see :func:`attention`), one attribute on ``ctx``, and only the
    outputs the caller asked for (each output costs a wrapper): ``(out, [weights],
    [lse])``.
    """

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, spec):
        (key_padding_mask, is_causal, dropout_p, scale, dropout_seed, return_weights,
         return_lse, keep_fp32_out, backend, block_tensors, block_size) = spec
        out, lse, weights, out_fp32 = _attention_forward_impl(
            q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale, dropout_seed,
            return_weights, keep_fp32_out, backend, *block_tensors, block_size)
        # The float32 output, when kept, gives the backward an exact rowsum(dO * O).
        # Tensors that never need gradients travel in spec, off save_for_backward.
        ctx.save_for_backward(q, k, v, out_fp32 if out_fp32.numel() else out, lse, attn_mask)
        ctx.spec = spec
        ctx.set_materialize_grads(False)
        if return_weights:
            return (out, weights, lse) if return_lse else (out, weights)
        return (out, lse) if return_lse else (out,)

    @staticmethod
    def backward(ctx, grad_out, *more):
        (key_padding_mask, is_causal, dropout_p, scale, dropout_seed, return_weights,
         return_lse, _keep, backend, block_tensors, block_size) = ctx.spec
        grad_weights = more[0] if return_weights else None
        grad_lse = more[-1] if return_lse else None
        q, k, v, out, lse, attn_mask = ctx.saved_tensors
        saved = (q, k, v, out, lse, attn_mask, key_padding_mask, dropout_seed, *block_tensors)
        # a float attn_mask that requires grad is the only mask with a gradient
        settings = (is_causal, dropout_p, scale, backend, block_size, ctx.needs_input_grad[3])
        dq, dk, dv, d_mask = _attention_grads(_attention_backward_impl, saved, settings,
                                              grad_out, grad_lse, grad_weights)
        return dq, dk, dv, d_mask, None


# Function.apply's Python wrapper exists for functorch transforms (vmap, grad, ...),
# which _EagerAttention does not support (no setup_context: they would raise there);
# outside them the C implementation below is what it calls, ~3 us sooner.
_eager_attention_apply = super(torch.autograd.Function, _EagerAttention).apply


def needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_HALF = (torch.float16, torch.bfloat16)


def attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
    is_causal: bool, dropout_p: float, scale: float, dropout_seed: Tensor | None,
    return_weights: bool, backend: str, block_mask: list[Tensor] | None = None,
    block_size: list[int] | None = None, return_lse: bool = True,
    grad_wanted: bool | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Entry point of attention: custom op when tracing, thin path in eager.

    Returns ``(out, lse, weights)``, ``lse`` None unless ``return_lse`` and ``weights``
    None unless ``return_weights``; gradients flow into all three. ``block_mask`` /
    ``block_size``: a BlockMask as :func:`mmattn.backends.block_mask_tensors` lays it out.
    ``grad_wanted``: :func:`needs_grad` of q, k, v, attn_mask when the caller knows it.
    """
    if grad_wanted is None:
        grad_wanted = needs_grad(q, k, v, attn_mask)
    keep_fp32_out = grad_wanted and q.dtype in _HALF
    block_tensors = _NO_BLOCK_TENSORS if block_mask is None else tuple(block_mask)
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        # Traced graphs (torch.compile, torch.export, torch.jit.trace) hold the custom
        # op, whose registered autograd serves their backward.
        out, lse, weights, _ = torch.ops.mmattn.attention_forward.default(
            q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale, dropout_seed,
            return_weights, keep_fp32_out, backend, *block_tensors, block_size)
    elif grad_wanted:
        spec = (key_padding_mask, is_causal, dropout_p, scale, dropout_seed, return_weights,
                return_lse, keep_fp32_out, backend, block_tensors, block_size)
        apply = (_EagerAttention.apply if torch._C._are_functorch_transforms_active()
                 else _eager_attention_apply)
        result = apply(q, k, v, attn_mask, spec)
        out = result[0]
        weights = result[1] if return_weights else None
        lse = result[-1] if return_lse else None
        return out, lse, weights
    else:
        if not (return_lse or return_weights or dropout_p or block_mask) and backend != AUTO:
            inference = getattr(backends.get(backend), "attention_inference", None)
            if inference is not None:
                return (inference(q, k, v, attn_mask, key_padding_mask, is_causal, scale),
                        None, None)
        out, lse, weights, _ = _attention_forward_impl(
            q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale, dropout_seed,
            return_weights, False, backend, *block_tensors, block_size)
    return out, lse if return_lse else None, weights if return_weights else None


# ---- ws_linear -----------------------------------------------------------------------------

@torch.library.custom_op("mmattn::ws_linear", mutates_args=())
def ws_linear(
    x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor, row_indices: Tensor,
    ccol_indices: Tensor, row_indices_t: Tensor, transpose_perm: Tensor, out_features: int,
    block_size: int, bias: Tensor | None, backend: str,
) -> Tensor:
    """``y = x @ W^T + bias`` for W stored as a compressed layout (see SparseLayout).

    The transposed index arrays are arguments so kernel backends can run dX as a
    transposed SpMM without building them per call. ``backend``: a name or :data:`AUTO`.
    """
    if backend == AUTO:
        backend = dispatch.resolve_ws_linear(x, None)
    return backends.get(backend).ws_linear_forward(
        x, values, crow_indices, col_indices, row_indices, ccol_indices, row_indices_t,
        transpose_perm, out_features, block_size, bias)


@ws_linear.register_fake
def _(x, values, crow_indices, col_indices, row_indices, ccol_indices, row_indices_t,
      transpose_perm, out_features, block_size, bias, backend):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("mmattn::ws_linear_backward", mutates_args=())
def ws_linear_backward(
    grad_y: Tensor, x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor,
    row_indices: Tensor, ccol_indices: Tensor, row_indices_t: Tensor, transpose_perm: Tensor,
    out_features: int, block_size: int, has_bias: bool, need_dx: bool, need_d_values: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dx, d_values, d_bias)``; ``d_values`` only on kept entries; a gradient
    not asked for is an empty tensor."""
    dx, d_values, d_bias = backends.get(backend).ws_linear_backward(
        grad_y, x, values, crow_indices, col_indices, row_indices, ccol_indices,
        row_indices_t, transpose_perm, out_features, block_size, has_bias, need_dx,
        need_d_values)
    empty = x.new_empty(0)
    return (empty if dx is None else dx, empty if d_values is None else d_values,
            empty if d_bias is None else d_bias)


@ws_linear_backward.register_fake
def _(grad_y, x, values, crow_indices, col_indices, row_indices, ccol_indices, row_indices_t,
      transpose_perm, out_features, block_size, has_bias, need_dx, need_d_values, backend):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    d_values = values.new_empty(values.shape) if need_d_values else x.new_empty(0)
    d_bias = x.new_empty(out_features) if has_bias else x.new_empty(0)
    return dx, d_values, d_bias


def _ws_backward_backend(grad_y, x, values, index, out_features, block_size, has_bias, backend,
                         need_dx, need_d_values):
    """Eager backward: the backend module's function (the reference one, differentiable,
    when a graph of the gradients is wanted)."""
    module = reference if torch.is_grad_enabled() else backends.get(backend)
    return module.ws_linear_backward(grad_y, x, values, *index, out_features, block_size,
                                     has_bias, need_dx, need_d_values)


def _ws_backward_custom_op(grad_y, x, values, index, out_features, block_size, has_bias,
                           backend, need_dx, need_d_values):
    """Traced backward: the ``mmattn::ws_linear_backward`` custom op."""
    if torch.is_grad_enabled():
        return _ws_backward_backend(grad_y, x, values, index, out_features, block_size,
                                    has_bias, backend, need_dx, need_d_values)
    return ws_linear_backward(grad_y, x, values, *index, out_features, block_size, has_bias,
                              need_dx, need_d_values, backend)


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
    if backend == AUTO:
        backend = dispatch.resolve_ws_linear(x, None)
    ctx.out_features, ctx.block_size, ctx.backend = out_features, block_size, backend
    ctx.has_bias = bias is not None


def _ws_backward(ctx, grad_y):
    x, values, *index = ctx.saved_tensors
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[10])
    dx, d_values, d_bias = _ws_grads(_ws_backward_custom_op, grad_y, x, values, tuple(index),
                                     ctx.out_features, ctx.block_size, ctx.has_bias,
                                     ctx.backend, needs)
    return dx, d_values, None, None, None, None, None, None, None, None, d_bias, None


torch.library.register_autograd("mmattn::ws_linear", _ws_backward, setup_context=_ws_setup_context)


class _EagerWSLinear(torch.autograd.Function):
    """Eager twin of the registered autograd of ``mmattn::ws_linear``.

    Built for a seed-sized layer, where Python overhead is most of the call:
    ``forward(ctx, ...)`` rather than a separate ``setup_context`` (with which
    ``Function.apply`` binds the arguments through ``inspect.signature`` on every call,
    ~40 us in torch 2.13), and four arguments (``apply`` visits each one): the int32
    index tensors never need gradients and travel in ``meta`` on ``ctx``. Backends are
    told which gradients are needed (frozen weights, inputs without grad).
    """

    @staticmethod
    def forward(ctx, x, values, bias, meta):
        index, out_features, block_size, backend = meta
        ctx.save_for_backward(x, values)
        ctx.meta = meta
        ctx.has_bias = bias is not None
        return backends.get(backend).ws_linear_forward(x, values, *index, out_features,
                                                       block_size, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, values = ctx.saved_tensors
        index, out_features, block_size, backend = ctx.meta
        dx, d_values, d_bias = _ws_grads(_ws_backward_backend, grad_y, x, values, index,
                                         out_features, block_size, ctx.has_bias, backend,
                                         ctx.needs_input_grad)
        return dx, d_values, d_bias, None


def ws_linear_apply(
    x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor, row_indices: Tensor,
    ccol_indices: Tensor, row_indices_t: Tensor, transpose_perm: Tensor, out_features: int,
    block_size: int, bias: Tensor | None, backend: str,
) -> Tensor:
    """Entry point of ws_linear: custom op when tracing, thin path in eager."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return torch.ops.mmattn.ws_linear.default(
            x, values, crow_indices, col_indices, row_indices, ccol_indices, row_indices_t,
            transpose_perm, out_features, block_size, bias, backend)
    index = (crow_indices, col_indices, row_indices, ccol_indices, row_indices_t,
             transpose_perm)
    # needs_grad spelled out: its generator costs a microsecond at seed sizes
    if torch.is_grad_enabled() and (x.requires_grad or values.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        return _EagerWSLinear.apply(x, values, bias, (index, out_features, block_size, backend))
    return backends.get(backend).ws_linear_forward(x, values, *index, out_features, block_size,
                                                   bias)


# ---- fake kernel of the Philox op of mmattn._C (shapes only, for tracing) -----------------

def _register_philox_fake() -> None:
    from mmattn._extension import has_kernel

    if not has_kernel("philox_uniform", "CPU"):
        return

    @torch.library.register_fake("mmattn::philox_uniform")
    def _(counter0, counter1, seed, counter2=None):
        return torch.empty_like(counter0, dtype=torch.float32)


_register_philox_fake()
