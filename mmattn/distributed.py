"""Attention over a sequence sharded across processes (context parallelism), on
``torch.distributed``.

When a modality's sequence outgrows one device, each rank of a process group keeps a
contiguous chunk of it: rank ``r`` holds queries ``[q_r, q_r + Lq_r)`` and keys / values
``[k_r, k_r + Lk_r)`` of the whole sequences, chunks in rank order.
:func:`context_parallel_attention` returns each rank's rows of the attention over the
whole key sequence, equal to the single-process :func:`mmattn.cross_attention` on the
concatenated tensors, and its backward gives every rank the gradients of its own q, k
and v chunks.

How: the key/value chunks are all-gathered (one collective for k and v together; its
backward sums each chunk's gradients back to the rank that owns it), each chunk's
partial attention runs as one :func:`mmattn.cross_attention` call with
``return_lse=True``, and :func:`mmattn.merge_attention` combines the partials through
their log-sum-exp. With ``is_causal`` the chunks wholly after a rank's queries are
skipped, those wholly before need no mask, the aligned diagonal chunk uses the
kernels' ``is_causal``, and only a misaligned chunk gets an explicit mask of its own
``Lq_r x Lk_r`` size: no ``Lq x Lk`` mask is ever built.

Backends: gloo (CPU tensors) and NCCL (CUDA tensors; the gradient reduction then uses
``reduce_scatter``). Memory per rank: the gathered keys and values (``Lk`` of them),
never an ``Lq x Lk`` matrix on the kernel backends.

Example (``torchrun --nproc-per-node 4 train.py``)::

    import torch.distributed as dist
    from mmattn.distributed import context_parallel_attention

    dist.init_process_group("gloo")          # "nccl" on GPUs
    # this rank's chunk of the sequence: (B, H, L / world, D)
    out = context_parallel_attention(q_chunk, k_chunk, v_chunk, is_causal=True)
    out.sum().backward()                     # gradients of this rank's chunks
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from mmattn.attention import cross_attention, merge_attention

__all__ = ["context_parallel_attention"]


def _exchange(values: list[int], device: torch.device, group: Any) -> list[list[int]]:
    """Every rank's ``values`` (same length everywhere), in rank order."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    return [t.tolist() for t in gathered]


class _GatherChunks(torch.autograd.Function):
    """All-gather of ``(B, H, L_r, F)`` chunks of unequal ``L_r`` along dim 2; the
    backward sums each chunk's gradients from every rank and hands them to its owner."""

    @staticmethod
    def forward(ctx, local: Tensor, lengths: list[int], group: Any) -> tuple[Tensor, ...]:
        rank = dist.get_rank(group)
        longest = max(lengths)
        padded = torch.nn.functional.pad(local, (0, 0, 0, longest - local.shape[2]))
        gathered = [torch.empty_like(padded) for _ in lengths]
        dist.all_gather(gathered, padded.contiguous(), group=group)
        ctx.lengths, ctx.group, ctx.rank = lengths, group, rank
        return tuple(t[:, :, :length] for t, length in zip(gathered, lengths, strict=True))

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, None, None]:
        lengths, group, rank = ctx.lengths, ctx.group, ctx.rank
        longest = max(lengths)
        reference = next(g for g in grads if g is not None)
        shape = (*reference.shape[:2], longest, reference.shape[3])
        stacked = reference.new_zeros(len(lengths), *shape)
        for r, grad in enumerate(grads):
            if grad is not None:
                stacked[r, :, :, : lengths[r]] = grad
        if dist.get_backend(group) == "nccl":
            mine = reference.new_empty(shape)
            dist.reduce_scatter_tensor(mine, stacked.flatten(0, 1), group=group)
        else:  # gloo has no reduce_scatter: sum everything, keep this rank's chunk
            dist.all_reduce(stacked, group=group)
            mine = stacked[rank]
        return mine[:, :, : lengths[rank]], None, None


def _chunk_masks(attn_mask: Tensor | None, is_causal: bool, q_start: int, q_len: int,
                 k_start: int, k_len: int, device: torch.device) -> dict[str, Any] | None:
    """``attn_mask`` / ``is_causal`` arguments of one key chunk, or None when no local
    query sees any of its keys."""
    if k_len == 0 or q_len == 0:
        return None
    kwargs: dict[str, Any] = {}
    mask = None if attn_mask is None else attn_mask[..., k_start:k_start + k_len]
    if is_causal:  # key j visible to query i iff j <= i, whole-sequence positions
        if k_start > q_start + q_len - 1:
            return None
        if k_start == q_start:
            kwargs["is_causal"] = True  # top-left aligned within the chunk too
        elif k_start + k_len - 1 > q_start:  # partly visible: this chunk's mask only
            rows = torch.arange(q_start, q_start + q_len, device=device)
            cols = torch.arange(k_start, k_start + k_len, device=device)
            causal = rows[:, None] >= cols[None, :]
            if mask is None:
                mask = causal
            elif mask.dtype == torch.bool:
                mask = mask & causal
            else:
                mask = mask.masked_fill(~causal, float("-inf"))
    kwargs["attn_mask"] = mask
    return kwargs


def context_parallel_attention(
    q: Tensor, k: Tensor, v: Tensor, *, group: Any = None, attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None, is_causal: bool = False,
    scale: float | None = None, return_lse: bool = False, backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of this rank's query chunk over the key/value chunks of every rank.

    Collective: every rank of ``group`` must call it, with the same options.

    Args:
        q: this rank's queries ``(B, Hq, Lq_r, D)``: rows ``[q_r, q_r + Lq_r)`` of the
            whole query sequence, ``q_r`` = the ``Lq`` of the lower ranks.
        k, v: this rank's keys / values ``(B, Hkv, Lk_r, D)`` / ``(B, Hkv, Lk_r, Dv)``;
            chunk lengths may differ between ranks (and from ``Lq_r``); B, heads and
            head dims may not. ``Hq % Hkv == 0``.
        group: the process group (default: the world).
        attn_mask: bool (True = may attend) or float (added), broadcastable to
            ``(B, Hq, Lq_r, Lk)``: this rank's query rows against *all* ``Lk`` keys.
        key_padding_mask: ``(B, Lk_r)`` bool, True = padding, for this rank's keys
            (given on every rank or on none).
        is_causal: causal over whole-sequence positions, top-left aligned (query ``i``
            sees keys ``j <= i``), as :func:`mmattn.cross_attention`.
        scale: multiplier of ``q @ k^T``; default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp ``(B, Hq, Lq_r)`` (float32).
        backend: forwarded to :func:`mmattn.cross_attention`.

    Returns:
        This rank's output rows ``(B, Hq, Lq_r, Dv)`` (and the lse): the rows
        ``[q_r, q_r + Lq_r)`` of ``cross_attention(cat(q), cat(k), cat(v), ...)``.
        No dropout: its Philox counters number the keys of one call, so a chunked call
        could not drop what the whole call drops; apply dropout outside, or use
        ``dropout_p=0``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context_parallel_attention needs an initialised torch.distributed "
                           "process group (dist.init_process_group)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, L, D), got "
                             f"{tuple(getattr(t, 'shape', ()))}")
    if key_padding_mask is not None and (
            not isinstance(key_padding_mask, Tensor) or key_padding_mask.dim() != 2):
        raise ValueError("key_padding_mask must be a (B, Lk_r) bool tensor")
    rank = dist.get_rank(group)
    # One small collective: every rank's lengths, and what must agree across ranks
    # (checked on every rank alike, so all raise together instead of hanging).
    meta = [q.shape[2], k.shape[2], *q.shape[:2], q.shape[3], *k.shape[:2], k.shape[3],
            v.shape[3], int(key_padding_mask is not None), int(bool(is_causal))]
    table = _exchange(meta, q.device, group)
    if any(row[2:] != table[0][2:] for row in table):
        raise ValueError(f"context_parallel_attention: ranks disagree on batch, heads, head "
                         f"dims, key_padding_mask or is_causal: {[row[2:] for row in table]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length, got {k.shape[2]} and "
                         f"{v.shape[2]}")
    q_lengths, k_lengths = [row[0] for row in table], [row[1] for row in table]
    q_start, q_len = sum(q_lengths[:rank]), q.shape[2]
    d = k.shape[3]
    kv_chunks = _GatherChunks.apply(torch.cat([k, v], dim=3), k_lengths, group)
    pad_chunks: list[Tensor | None] = [None] * len(k_lengths)
    if key_padding_mask is not None:
        padded = _GatherChunks.apply(key_padding_mask.to(torch.uint8)[:, None, :, None],
                                     k_lengths, group)
        pad_chunks = [t[:, 0, :, 0].bool() for t in padded]
    outs, lses = [], []
    k_start = 0
    for chunk, pad, k_len in zip(kv_chunks, pad_chunks, k_lengths, strict=True):
        kwargs = _chunk_masks(attn_mask, is_causal, q_start, q_len, k_start, k_len, q.device)
        if kwargs is not None:
            out, lse = cross_attention(q, chunk[..., :d], chunk[..., d:], scale=scale,
                                       key_padding_mask=pad, return_lse=True,
                                       backend=backend, **kwargs)
            outs.append(out)
            lses.append(lse)
        k_start += k_len
    if not outs:  # no local query sees any key (e.g. Lq_r == 0)
        out = q.new_zeros(*q.shape[:3], v.shape[3])
        lse = torch.full(q.shape[:3], float("inf"), device=q.device,
                         dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
        # Connect q and the gathered chunks with zero weight, so that this rank's
        # backward runs the gather's collective like every other rank's.
        out = out + 0 * (q.sum() + kv_chunks[0].sum())
    else:
        out, lse = merge_attention(outs, lses)
    return (out, lse) if return_lse else out
