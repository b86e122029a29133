"""The ``reference`` backend: pure PyTorch, the fallback on every device and the test oracle.

It materialises the full ``(B, Hq, Lq, Lk)`` score matrix and favours clarity over
speed. Arithmetic runs in float32 for half inputs and in float64 for float64
inputs, so a float64 call is the oracle every backend is measured against. Its
backward is written in differentiable torch operations, so it also serves double
backward for every backend (:mod:`mmattn.ops`).

Inputs arrive validated and normalised by :mod:`mmattn.attention` /
:mod:`mmattn.ws`; these functions do not re-check them. Interface: :mod:`mmattn.backends`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mmattn.philox import dropout_keep_mask

NAME = "reference"
BACKWARD_EXTRAS = frozenset({"grad_weights", "mask_grad", "grad_lse"})


def attention_unsupported(call) -> str | None:
    return None


def ws_linear_unsupported(x: Tensor) -> str | None:
    return None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expand_kv_heads(t: Tensor, num_q_heads: int) -> Tensor:
    """(B, Hkv, L, D) -> (B, Hq, L, D): each kv head serves Hq // Hkv query heads."""
    group = num_q_heads // t.shape[1]
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def _sum_kv_groups(grad: Tensor, num_kv_heads: int) -> Tensor:
    """Inverse of :func:`_expand_kv_heads` for gradients: sum each query-head group."""
    b, hq, length, d = grad.shape
    group = hq // num_kv_heads
    return grad if group == 1 else grad.view(b, num_kv_heads, group, length, d).sum(2)


def _scores_and_visibility(
    q: Tensor, k: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
    is_causal: bool, scale: float,
) -> tuple[Tensor, Tensor]:
    """Masked, scaled scores and the bool visibility of each (query, key) pair."""
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    dtype = _compute_dtype(q.dtype)
    k_full = _expand_kv_heads(k, hq).to(dtype)
    scores = torch.matmul(q.to(dtype), k_full.transpose(-1, -2)) * scale
    visible = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            scores = scores + attn_mask.to(dtype)
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask.view(b, 1, 1, lk)
    if is_causal:
        causal = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        visible = visible & causal
    # A float mask of -inf hides a key just as a False bool entry does.
    visible = (visible & (scores > -math.inf)).expand(b, hq, lq, lk)
    scores = scores.masked_fill(~visible, -math.inf)
    return scores, visible


def _softmax_rows(scores: Tensor, visible: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over keys and its logsumexp; rows with no visible key give 0 and +inf.

    The +inf logsumexp makes ``exp(score - lse)`` vanish for such rows, which is
    how the fused kernels recompute probabilities in their backward pass.
    """
    if scores.shape[-1] == 0:
        lse = torch.full(scores.shape[:-1], math.inf, dtype=scores.dtype, device=scores.device)
        return torch.zeros_like(scores), lse
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    exp = torch.exp(scores - row_max).masked_fill(~visible, 0.0)
    denom = exp.sum(dim=-1, keepdim=True)
    has_key = denom > 0
    probs = torch.where(has_key, exp / torch.where(has_key, denom, torch.ones_like(denom)), 0.0)
    lse = torch.where(has_key, row_max + torch.log(torch.where(has_key, denom, 1.0)), math.inf)
    return probs, lse.squeeze(-1)


def _dropout_scale(probs: Tensor, dropout_p: float, seed: int | None) -> Tensor | None:
    """Per-element factor ``keep / (1 - p)`` of the Philox dropout mask, or None."""
    if dropout_p <= 0.0:
        return None
    b, h, lq, lk = probs.shape
    keep = dropout_keep_mask(seed or 0, dropout_p, b, h, lq, lk, device=probs.device)
    factor = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
    return keep.to(probs.dtype) * factor


def block_mask_to_dense(full: Tensor, partial_index: Tensor, partial_masks: Tensor,
                        block_size: tuple[int, int], seq_lengths: tuple[int, int]) -> Tensor:
    """Element mask of a block mask from its classification (see :class:`mmattn.BlockMask`).

    Args:
        full: bool ``(Bm, Hm, nbq, nbk)``, True where every element of the block is visible.
        partial_index: int32 ``(Bm, Hm, nbq, nbk)``, index into ``partial_masks`` or -1
            (several blocks may share an entry).
        partial_masks: bool ``(P, pq, pk)`` with ``pq <= bq``, ``pk <= bk``: the element
            mask of a block's first ``pq`` query and ``pk`` key positions; positions past
            them (or past ``Lq``/``Lk``) are not visible. :class:`mmattn.BlockMask` stores
            ``(min(bq, Lq), min(bk, Lk))``.
        block_size: ``(bq, bk)``; seq_lengths: ``(Lq, Lk)``.

    Returns:
        bool ``(Bm, Hm, Lq, Lk)``, True = may attend; empty blocks are False.
    """
    (bq, bk), (lq, lk) = block_size, seq_lengths
    bm, hm, nbq, nbk = full.shape
    # A block larger than its sequence covers the sequence: tiling the grid with
    # (min(bq, Lq), min(bk, Lk)) puts every element where (bq, bk) would, without
    # materialising the part of a block past the lengths.
    pq, pk = min(bq, lq), min(bk, lk)
    masks = partial_masks[:, :pq, :pk]
    if masks.shape[1:] != (pq, pk):
        masks = torch.nn.functional.pad(masks, (0, pk - masks.shape[2], 0, pq - masks.shape[1]))
    blocks = full[..., None, None].expand(bm, hm, nbq, nbk, pq, pk).clone()
    partial = partial_index >= 0
    blocks[partial] = masks[partial_index[partial].long()]
    dense = blocks.permute(0, 1, 2, 4, 3, 5).reshape(bm, hm, nbq * pq, nbk * pk)
    return dense[:, :, :lq, :lk]


def with_dense_blocks(attn_mask: Tensor | None, q: Tensor, k: Tensor,
                      block_mask: list[Tensor] | None,
                      block_size: list[int] | None) -> Tensor | None:
    """``attn_mask`` AND a block mask (as :func:`mmattn.backends.block_mask_tensors` lays
    it out), as one element mask broadcast to (B, Hq, Lq, Lk); for backends without
    block-sparse kernels."""
    if block_mask is None:
        return attn_mask
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    _, _, _, _, full, partial_index, partial_masks = block_mask
    dense = block_mask_to_dense(full, partial_index, partial_masks, tuple(block_size), (lq, lk))
    dense = dense.expand(b, hq, lq, lk)
    if attn_mask is None:
        return dense
    if attn_mask.dtype == torch.bool:
        return attn_mask & dense
    return attn_mask.masked_fill(~dense, -math.inf)


def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
    is_causal: bool, dropout_p: float, scale: float, dropout_seed: int | None,
    return_weights: bool, block_mask: list[Tensor] | None = None,
    block_size: list[int] | None = None, keep_fp32_out: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backend interface (:mod:`mmattn.backends`): :func:`attention_math` with the block
    mask folded into the element mask."""
    attn_mask = with_dense_blocks(attn_mask, q, k, block_mask, block_size)
    out, lse, weights = attention_math(q, k, v, attn_mask, key_padding_mask, is_causal,
                                       dropout_p, scale, dropout_seed, return_weights)
    keep = keep_fp32_out and q.dtype in (torch.float16, torch.bfloat16)
    return out.to(q.dtype), lse, weights, out if keep else q.new_empty(0)


def attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool,
    dropout_p: float, scale: float, dropout_seed: int | None,
    block_mask: list[Tensor] | None = None, block_size: list[int] | None = None,
    grad_lse: Tensor | None = None, grad_weights: Tensor | None = None,
    mask_needs_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Backend interface (:mod:`mmattn.backends`): :func:`attention_backward_math` with the
    block mask folded into the element mask (``out`` and ``lse`` are not needed)."""
    attn_mask = with_dense_blocks(attn_mask, q, k, block_mask, block_size)
    dq, dk, dv, d_mask = attention_backward_math(
        grad_out, grad_weights, q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p,
        scale, dropout_seed, mask_needs_grad, grad_lse)
    return dq, dk, dv, d_mask if mask_needs_grad else None


def attention_math(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
    is_causal: bool, dropout_p: float, scale: float, dropout_seed: int | None,
    return_weights: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference attention forward.

    Args:
        q: (B, Hq, Lq, D); k: (B, Hkv, Lk, D); v: (B, Hkv, Lk, Dv); Hq % Hkv == 0.
        attn_mask: bool (True = may attend) or float (added to scores), broadcastable
            to (B, Hq, Lq, Lk), or None.
        key_padding_mask: (B, Lk) bool, True = padding, or None.
        is_causal: top-left aligned causal mask (key j visible to query i iff j <= i).
        dropout_p, dropout_seed: Philox dropout on the probabilities (mmattn.philox).
        scale: multiplier of q @ k^T.
        return_weights: also return the (dropped-out) probabilities.

    Returns:
        ``out`` (B, Hq, Lq, Dv) in the compute dtype (float64 for float64 inputs, else
        float32; not yet rounded to q's dtype), ``lse`` (B, Hq, Lq) in the compute dtype
        (+inf for rows with no visible key) and ``weights`` (B, Hq, Lq, Lk) in q's dtype, or an
        empty tensor when ``return_weights`` is False.
    """
    scores, visible = _scores_and_visibility(q, k, attn_mask, key_padding_mask, is_causal, scale)
    probs, lse = _softmax_rows(scores, visible)
    drop = _dropout_scale(probs, dropout_p, dropout_seed)
    if drop is not None:
        probs = probs * drop
    v_full = _expand_kv_heads(v, q.shape[1]).to(probs.dtype)
    out = torch.matmul(probs, v_full)
    weights = probs.to(q.dtype) if return_weights else q.new_empty(0)
    return out, lse.to(_compute_dtype(q.dtype)), weights


def attention_backward_math(
    grad_out: Tensor, grad_weights: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool,
    dropout_p: float, scale: float, dropout_seed: int | None, mask_needs_grad: bool,
    grad_lse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference attention backward, written out as the fused kernels compute it.

    With ``P`` the softmax, ``Z`` the dropout factor, ``dW`` the gradient of the
    returned weights and ``dL`` the gradient of the log-sum-exp:
    ``dV = (P*Z)^T dO``, ``dP = (dO V^T + dW) * Z``,
    ``dS = P * (dP - rowsum(dP * P) + dL)``, ``dQ = scale * dS K``,
    ``dK = scale * dS^T Q``; for a float ``attn_mask`` the mask gradient is ``dS``.
    Rows with no visible key have ``P = 0`` and so contribute no gradient.

    Returns:
        dq, dk, dv in the input dtypes, and the (B, Hq, Lq, Lk) mask gradient (an
        empty tensor unless ``mask_needs_grad``).
    """
    hq, hkv = q.shape[1], k.shape[1]
    scores, visible = _scores_and_visibility(q, k, attn_mask, key_padding_mask, is_causal, scale)
    probs, _ = _softmax_rows(scores, visible)
    dtype = probs.dtype
    drop = _dropout_scale(probs, dropout_p, dropout_seed)
    dropped = probs if drop is None else probs * drop
    d_out = grad_out.to(dtype)
    v_full = _expand_kv_heads(v, hq).to(dtype)
    k_full = _expand_kv_heads(k, hq).to(dtype)
    dv = torch.matmul(dropped.transpose(-1, -2), d_out)
    d_dropped = torch.matmul(d_out, v_full.transpose(-1, -2))
    if grad_weights is not None:
        d_dropped = d_dropped + grad_weights.to(dtype)
    d_probs = d_dropped if drop is None else d_dropped * drop
    row_term = (d_probs * probs).sum(dim=-1, keepdim=True)
    if grad_lse is not None:
        row_term = row_term - grad_lse.to(dtype).unsqueeze(-1)
    d_scores = probs * (d_probs - row_term)
    dq = torch.matmul(d_scores, k_full) * scale
    dk = torch.matmul(d_scores.transpose(-1, -2), q.to(dtype)) * scale
    d_mask = d_scores if mask_needs_grad else q.new_empty(0)
    return (
        dq.to(q.dtype),
        _sum_kv_groups(dk, hkv).to(k.dtype),
        _sum_kv_groups(dv, hkv).to(v.dtype),
        d_mask.to(attn_mask.dtype) if mask_needs_grad and attn_mask is not None else d_mask,
    )


def layout_to_dense_weight(
    values: Tensor, crow_indices: Tensor, col_indices: Tensor, out_features: int,
    in_features: int, block_size: int = 1,
) -> Tensor:
    """Scatter compressed weights into a dense ``(out_features, in_features)`` matrix.

    ``values`` is ``(nnz,)`` for an element layout, or ``(nnz_blocks, bs, bs)`` for a
    block layout whose CSR indices count blocks. Differentiable in ``values``.
    Lengths that are not multiples of the block size are cropped at the edge.
    """
    rows = torch.repeat_interleave(
        torch.arange(crow_indices.numel() - 1, device=values.device),
        (crow_indices[1:] - crow_indices[:-1]).to(torch.int64),
    )
    cols = col_indices.to(torch.int64)
    if block_size == 1:
        dense = values.new_zeros(out_features, in_features)
        return dense.index_put((rows, cols), values)
    nbr = crow_indices.numel() - 1
    nbc = -(-in_features // block_size)
    blocks = values.new_zeros(nbr, nbc, block_size, block_size)
    blocks = blocks.index_put((rows, cols), values)
    dense = blocks.permute(0, 2, 1, 3).reshape(nbr * block_size, nbc * block_size)
    return dense[:out_features, :in_features]


def ws_linear_forward(
    x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor, row_indices: Tensor,
    ccol_indices: Tensor, row_indices_t: Tensor, transpose_perm: Tensor, out_features: int,
    block_size: int, bias: Tensor | None,
) -> Tensor:
    """Reference ``y = x @ W^T + bias`` with W given by a compressed layout.

    Only the CSR arrays are read; the transposed ones exist for kernel backends.
    """
    weight = layout_to_dense_weight(
        values, crow_indices, col_indices, out_features, x.shape[-1], block_size
    )
    return torch.nn.functional.linear(x, weight.to(x.dtype), bias)


def ws_linear_backward(
    grad_y: Tensor, x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor,
    row_indices: Tensor, ccol_indices: Tensor, row_indices_t: Tensor, transpose_perm: Tensor,
    out_features: int, block_size: int, has_bias: bool, need_dx: bool = True,
    need_d_values: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Reference gradients of :func:`ws_linear_forward`: ``(dx, d_values, d_bias)``.

    ``d_values`` is the dense ``dy^T x`` read at the kept entries (blocks), so
    dropped entries never receive a gradient. A gradient not asked for (``need_*``
    False, or no bias) is None. Differentiable torch operations only, so it serves
    double backward too.
    """
    in_features = x.shape[-1]
    dtype = _compute_dtype(x.dtype)
    gy = grad_y.reshape(-1, out_features).to(dtype)
    d_bias = gy.sum(0).to(x.dtype) if has_bias else None
    dx = d_values = None
    if need_dx:
        weight = layout_to_dense_weight(
            values.to(dtype), crow_indices, col_indices, out_features, in_features, block_size)
        dx = (gy @ weight).reshape(x.shape).to(x.dtype)
    if not need_d_values:
        return dx, None, d_bias
    d_dense = gy.t() @ x.reshape(-1, in_features).to(dtype)
    if block_size == 1:
        d_values = d_dense[row_indices.long(), col_indices.long()]
    else:
        bs = block_size
        nbr, nbc = crow_indices.numel() - 1, -(-in_features // bs)
        padded = d_dense.new_zeros(nbr * bs, nbc * bs)
        padded[:out_features, :in_features] = d_dense
        blocks = padded.view(nbr, bs, nbc, bs).permute(0, 2, 1, 3)
        d_values = blocks[row_indices.long(), col_indices.long()]
    return dx, d_values.to(values.dtype), d_bias
