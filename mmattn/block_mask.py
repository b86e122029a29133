"""``BlockMask``: an element-level attention mask stored per blocks, for block-sparse kernels.

A mask over ``(Lq, Lk)`` (True = the query may attend the key, as a bool ``attn_mask``) is
cut into blocks of ``(bq, bk)``; the last block row/column is cut short when a length is
not a multiple of its block size. Every block is one of

* **empty** — no visible element: kernels skip it;
* **full** — every in-range element visible: kernels need no element mask;
* **partial** — anything else: its element mask is stored in ``partial_masks``.

Partial masks cover only the region a block can reach, ``(pq, pk) = (min(bq, Lq),
min(bk, Lk))`` (a block larger than the sequence costs the sequence, not the block), and
identical masks are stored once: ``partial_index`` of several blocks may point at one
entry (positions past ``Lq``/``Lk`` are False).

The block grid has leading dimensions ``(Bm, Hm)`` with ``Bm`` in ``{1, B}`` and ``Hm``
in ``{1, H}``, broadcast over batch and heads. Both directions of compressed indices are
kept: per query block its nonempty kv blocks (forward and dQ) and per kv block its
query blocks (dK/dV).

Constructors are classmethods that compute block classes with vectorised torch ops from
the rule (no dense ``(Lq, Lk)`` mask, no compilation); element masks are built only for
the partial blocks, in chunks of bounded size, and deduplicated as they are made.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mmattn.backends.reference import block_mask_to_dense
from mmattn.watts_strogatz import _lattice_centres, watts_strogatz_mask

_FULL, _PARTIAL, _EMPTY = "█", "▒", "·"
_REPR_MAX_ROWS, _REPR_MAX_COLS = 32, 64
# Element masks are evaluated (and deduplicated) for at most this many elements at a time,
# so building a mask never holds all partial blocks' elements at once.
_CHUNK_ELEMENTS = 2**22

# (query positions (P, bq, 1), key positions (P, 1, bk)) -> bool visibility (P, bq, bk)
ElementRule = Callable[[Tensor, Tensor], Tensor]


# --- argument checks ----------------------------------------------------------------------

def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(name: str, value: object, minimum: int = 0) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _int_pair(name: str, value: object, minimum: int) -> tuple[int, int]:
    """``value`` as ``(query, key)``: an int means the same for both."""
    if _is_int(value):
        value = (value, value)
    if not isinstance(value, (tuple, list, torch.Size)) or len(value) != 2:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    first = _check_int(f"{name}[0]", value[0], minimum)
    second = _check_int(f"{name}[1]", value[1], minimum)
    return first, second


def _check_probability(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _make_generator(seed: object, generator: object) -> torch.Generator | None:
    """A seeded CPU generator, the given one, or None (torch's global generator)."""
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got "
                            f"{type(generator).__name__}")
        return generator
    if seed is None:
        return None
    if not _is_int(seed):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    return torch.Generator().manual_seed(int(seed) & (2**64 - 1))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_device(name: str, device: torch.device) -> None:
    if device.type == "meta":
        raise ValueError(f"{name} is on the meta device: a BlockMask needs its data (block "
                         f"counts, indices), so it lives on a real device (cpu, cuda)")


def _mask_extent(lengths: tuple[int, int], blocks: tuple[int, int]) -> tuple[int, int]:
    """``(pq, pk) = (min(bq, Lq), min(bk, Lk))``: the part of a block that any block of the
    grid can cover. A block larger than its sequence is cut to the sequence, so tiling the
    grid with ``(pq, pk)`` places every element exactly where ``(bq, bk)`` does."""
    return min(blocks[0], lengths[0]), min(blocks[1], lengths[1])


# --- block geometry -----------------------------------------------------------------------

def _block_extents(length: int, block: int) -> Tensor:
    """int64 ``(ceil(length / block),)``: in-range size of each block."""
    starts = torch.arange(0, length, block, dtype=torch.int64)
    return torch.clamp(length - starts, max=block)


def _positions(block_index: Tensor, block: int, length: int) -> tuple[Tensor, Tensor]:
    """Positions ``(P, min(block, length))`` covered by blocks ``block_index (P,)``, and
    their validity.

    Positions past ``length`` (in the last, short block) are clamped to ``length - 1`` so
    rules may index with them; the validity mask marks them False.
    """
    positions = block_index[:, None].long() * block + torch.arange(
        min(block, length), dtype=torch.int64, device=block_index.device)
    valid = positions < length
    return positions.clamp(max=max(length - 1, 0)), valid


# --- the class ----------------------------------------------------------------------------

class BlockMask:
    """Block-sparse attention mask over ``(Lq, Lk)`` in blocks of ``(bq, bk)``.

    Fields (read-only; bool or int32, contiguous, on one device):
        seq_lengths: ``(Lq, Lk)``.
        block_size: ``(bq, bk)``.
        num_blocks: ``(nbq, nbk) = (ceil(Lq / bq), ceil(Lk / bk))``.
        layout: bool ``(Bm, Hm, nbq, nbk)``: the block holds at least one visible element.
        full: bool ``(Bm, Hm, nbq, nbk)``: every in-range element of the block is visible
            (``full`` implies ``layout``).
        partial_index: int32 ``(Bm, Hm, nbq, nbk)``: -1 for empty and full blocks, else the
            index of the block's element mask in ``partial_masks`` (blocks with the same
            element mask share one entry).
        partial_masks: bool ``(P, pq, pk)`` with ``(pq, pk) = (min(bq, Lq), min(bk, Lk))``:
            the distinct element masks of the partial blocks, each stored once, covering
            only what a block can reach; positions past ``Lq``/``Lk`` are False.
        kv_num_blocks: int32 ``(Bm, Hm, nbq)``: nonempty kv blocks of each query block.
        kv_indices: int32 ``(Bm, Hm, nbq, nbk)``: those kv blocks, ascending, then 0s.
        q_num_blocks: int32 ``(Bm, Hm, nbk)``: nonempty query blocks of each kv block.
        q_indices: int32 ``(Bm, Hm, nbk, nbq)``: those query blocks, ascending, then 0s.

    ``Bm`` is 1 or the batch size and ``Hm`` 1 or the number of query heads; both broadcast.
    Build one with a classmethod (``from_layout``, ``from_dense_mask``, ``random``,
    ``local_window``, ``global_tokens``, ``strided``, ``bigbird``, ``causal``,
    ``modality``, ``watts_strogatz``) and combine them with ``|`` and ``&``.

    The constructor itself takes the block classification directly and checks that it is
    consistent: ``BlockMask(seq_lengths, block_size, layout, full, partial_index,
    partial_masks)`` (``partial_masks`` ``(P, pq, pk)``, or ``(P, bq, bk)`` as before, cut
    to ``(pq, pk)``); the index fields are derived and duplicate masks merged.
    """

    __slots__ = ("block_size", "full", "kv_indices", "kv_num_blocks", "layout", "num_blocks",
                 "partial_index", "partial_masks", "q_indices", "q_num_blocks", "seq_lengths")

    seq_lengths: tuple[int, int]
    block_size: tuple[int, int]
    num_blocks: tuple[int, int]
    layout: Tensor
    full: Tensor
    partial_index: Tensor
    partial_masks: Tensor
    kv_num_blocks: Tensor
    kv_indices: Tensor
    q_num_blocks: Tensor
    q_indices: Tensor

    def __init__(self, seq_lengths: int | tuple[int, int], block_size: int | tuple[int, int],
                 layout: Tensor, full: Tensor, partial_index: Tensor,
                 partial_masks: Tensor) -> None:
        lengths = _int_pair("seq_lengths", seq_lengths, 0)
        blocks = _int_pair("block_size", block_size, 1)
        grid = (_ceil_div(lengths[0], blocks[0]), _ceil_div(lengths[1], blocks[1]))
        for name, t, dtype in (("layout", layout, torch.bool), ("full", full, torch.bool),
                               ("partial_index", partial_index, torch.int32)):
            if not isinstance(t, Tensor) or t.dtype != dtype:
                raise TypeError(f"{name} must be a {dtype} tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
            if t.dim() != 4 or tuple(t.shape[2:]) != grid:
                raise ValueError(f"{name} must have shape (Bm, Hm, {grid[0]}, {grid[1]}), got "
                                 f"{tuple(t.shape)}")
        if not (layout.shape == full.shape == partial_index.shape):
            raise ValueError(f"layout, full and partial_index must have one shape, got "
                             f"{tuple(layout.shape)}, {tuple(full.shape)}, "
                             f"{tuple(partial_index.shape)}")
        if not (layout.device == full.device == partial_index.device):
            raise ValueError("layout, full and partial_index must be on one device")
        _check_device("layout", layout.device)
        if not isinstance(partial_masks, Tensor) or partial_masks.dtype != torch.bool:
            raise TypeError("partial_masks must be a bool tensor")
        extent = _mask_extent(lengths, blocks)
        if partial_masks.dim() != 3 or tuple(partial_masks.shape[1:]) not in (extent, blocks):
            raise ValueError(f"partial_masks must have shape (P, pq, pk) = (P, {extent[0]}, "
                             f"{extent[1]}) (pq = min(bq, Lq), pk = min(bk, Lk)), or "
                             f"(P, bq, bk), got {tuple(partial_masks.shape)}")
        if tuple(partial_masks.shape[1:]) != extent:
            if bool(partial_masks[:, extent[0]:].any() or partial_masks[:, :, extent[1]:].any()):
                raise ValueError("partial_masks must be False past the sequence lengths")
            partial_masks = partial_masks[:, :extent[0], :extent[1]]
        if bool((full & ~layout).any()):
            raise ValueError("full marks a block that layout marks empty")
        partial = layout & ~full
        count = partial_masks.shape[0]
        if bool((partial_index[~partial] != -1).any()):
            raise ValueError("partial_index must be -1 for empty and full blocks")
        used = partial_index[partial].long()
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= count):
            raise ValueError(f"partial_index of a partial block must be in [0, {count})")
        used_masks = partial_masks.to(layout.device)[used]
        blocks_q, blocks_k = partial.nonzero(as_tuple=True)[2:]
        in_range = _in_range_masks(lengths, blocks, blocks_q, blocks_k)
        if bool((used_masks & ~in_range).any()):
            raise ValueError("partial_masks must be False past the sequence lengths")
        if used.numel() and bool((~used_masks.flatten(1).any(1)).any()):
            raise ValueError("a partial block's mask has no visible element (mark it empty)")
        if used.numel() and bool(((used_masks == in_range).flatten(1).all(1)).any()):
            raise ValueError("a partial block's mask shows every in-range element (mark it "
                             "full)")
        self._set(lengths, blocks, layout, full, partial_index, partial_masks.to(layout.device))

    def _set(self, lengths: tuple[int, int], blocks: tuple[int, int], layout: Tensor,
             full: Tensor, partial_index: Tensor, partial_masks: Tensor) -> None:
        """Store the classification and derive both directions of block indices.

        ``partial_masks`` ``(P, pq, pk)`` may hold duplicates and unused entries: each
        distinct mask that a block uses is stored once, in order of first use.
        """
        partial_index, partial_masks = _deduplicate(partial_index.to(torch.int32),
                                                    partial_masks)
        set_field = object.__setattr__
        set_field(self, "seq_lengths", lengths)
        set_field(self, "block_size", blocks)
        set_field(self, "num_blocks", tuple(layout.shape[2:]))
        set_field(self, "layout", layout.contiguous())
        set_field(self, "full", full.contiguous())
        set_field(self, "partial_index", partial_index.to(torch.int32).contiguous())
        set_field(self, "partial_masks", partial_masks.contiguous())
        kv_num, kv_indices = _compress_rows(layout)
        q_num, q_indices = _compress_rows(layout.transpose(-1, -2))
        set_field(self, "kv_num_blocks", kv_num)
        set_field(self, "kv_indices", kv_indices)
        set_field(self, "q_num_blocks", q_num)
        set_field(self, "q_indices", q_indices)

    @classmethod
    def _assemble(cls, lengths: tuple[int, int], blocks: tuple[int, int], layout: Tensor,
                  full: Tensor, partial_index: Tensor, partial_masks: Tensor) -> BlockMask:
        """Build without the consistency checks (the internal constructors' path)."""
        mask = cls.__new__(cls)
        mask._set(lengths, blocks, layout, full, partial_index, partial_masks)
        return mask

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"BlockMask is immutable; cannot set {name}")

    # --- internal builders ------------------------------------------------------------

    @classmethod
    def _from_classes(cls, lengths: tuple[int, int], blocks: tuple[int, int], layout: Tensor,
                      full: Tensor, rule: ElementRule | None) -> BlockMask:
        """Mask from block classes; ``rule`` gives the element masks of partial blocks.

        ``layout``/``full`` are bool ``(Bm, Hm, nbq, nbk)`` and must be exact (a partial
        block has at least one visible and one hidden in-range element).
        """
        partial = layout & ~full
        coords = partial.nonzero()
        extent = _mask_extent(lengths, blocks)
        partial_index = torch.full(layout.shape, -1, dtype=torch.int32, device=layout.device)
        if coords.shape[0] == 0 or rule is None:
            masks = torch.zeros(0, *extent, dtype=torch.bool, device=layout.device)
            return cls._assemble(lengths, blocks, layout, full, partial_index, masks)
        # The rule runs on chunks of blocks, each chunk deduplicated at once: memory stays
        # O(chunk + distinct masks), not O(partial blocks x pq x pk).
        per_chunk = max(1, _CHUNK_ELEMENTS // max(1, extent[0] * extent[1]))
        pieces, indices, stored = [], [], 0
        for chunk in coords.split(per_chunk):
            q_pos, q_valid = _positions(chunk[:, 2], blocks[0], lengths[0])
            k_pos, k_valid = _positions(chunk[:, 3], blocks[1], lengths[1])
            masks = rule(q_pos[:, :, None], k_pos[:, None, :])
            masks = masks & q_valid[:, :, None] & k_valid[:, None, :]
            inverse, first = _distinct_rows(masks)
            pieces.append(masks[first])
            indices.append(inverse + stored)
            stored += first.numel()
        partial_index[partial] = torch.cat(indices).to(torch.int32)
        return cls._assemble(lengths, blocks, layout, full, partial_index, torch.cat(pieces))

    @classmethod
    def _from_counts(cls, lengths: tuple[int, int], blocks: tuple[int, int], counts: Tensor,
                     rule: ElementRule) -> BlockMask:
        """Mask from the number of visible elements in each block ``(Bm, Hm, nbq, nbk)``."""
        area = (_block_extents(lengths[0], blocks[0])[:, None]
                * _block_extents(lengths[1], blocks[1])[None, :]).to(counts.device)
        return cls._from_classes(lengths, blocks, counts > 0, counts == area, rule)

    @classmethod
    def _from_row_intervals(cls, lengths: tuple[int, int], blocks: tuple[int, int],
                            first: Tensor, last: Tensor) -> BlockMask:
        """Query ``i`` sees keys ``first[i] <= j <= last[i]`` (int64 ``(Lq,)``; may be empty).

        Block counts without a per-row table: for a query block ``a`` the number of visible
        elements left of key position ``x`` is ``F_a(x) = sum_i relu(x - s_i) - relu(x - e_i)``
        over its rows' interval starts ``s_i`` and ends ``e_i`` (exclusive), a piecewise
        linear function evaluated at the kv block boundaries from the sorted starts/ends
        and their prefix sums: ``O(Lq log bq + nbq * nbk * log bq)`` instead of ``Lq * nbk``.
        """
        (lq, lk), (bq, bk) = lengths, blocks
        nbq, nbk = _ceil_div(lq, bq), _ceil_div(lk, bk)
        starts = torch.zeros(nbq * bq, dtype=torch.int64)  # padding rows: empty intervals
        ends = torch.zeros(nbq * bq, dtype=torch.int64)
        starts[:lq] = first.clamp(0, lk)
        ends[:lq] = torch.maximum((last + 1).clamp(0, lk), starts[:lq])
        boundaries = torch.clamp(torch.arange(nbk + 1, dtype=torch.int64) * bk, max=lk)
        boundaries = boundaries.expand(nbq, nbk + 1).contiguous()

        def relu_sums(thresholds: Tensor) -> Tensor:
            """``sum_i relu(x - t_i)`` per query block at every boundary ``x``."""
            ordered = thresholds.view(nbq, bq).sort(dim=1).values
            prefix = torch.zeros(nbq, bq + 1, dtype=torch.int64)
            prefix[:, 1:] = ordered.cumsum(dim=1)
            below = torch.searchsorted(ordered, boundaries)  # how many t_i < x
            return below * boundaries - prefix.gather(1, below)

        left_of = relu_sums(starts) - relu_sums(ends)  # (nbq, nbk + 1)
        counts = left_of[:, 1:] - left_of[:, :-1]

        def rule(q: Tensor, k: Tensor) -> Tensor:
            return (k >= first[q]) & (k <= last[q])

        return cls._from_counts(lengths, blocks, counts[None, None], rule)

    @classmethod
    def _from_row_classes(cls, lengths: tuple[int, int], blocks: tuple[int, int],
                          row_class: Tensor, class_columns: Tensor) -> BlockMask:
        """Query ``i`` sees keys ``j`` with ``class_columns[row_class[i], j]``.

        ``row_class``: int64 ``(Lq,)`` in ``[0, R)``; ``class_columns``: bool ``(R, Lk)``.
        Block counts are (rows of each class per query block) @ (visible columns of each
        class per kv block): ``O(nbq * R * nbk)``.
        """
        (lq, lk), (bq, bk) = lengths, blocks
        nbq, nbk = _ceil_div(lq, bq), _ceil_div(lk, bk)
        classes = class_columns.shape[0]
        rows_of_class = torch.zeros(nbq * bq, classes, dtype=torch.float64)
        rows_of_class[torch.arange(lq), row_class] = 1.0
        rows_of_class = rows_of_class.view(nbq, bq, classes).sum(dim=1)
        padded = torch.zeros(classes, nbk * bk, dtype=torch.float64)
        padded[:, :lk] = class_columns
        columns_of_class = padded.view(classes, nbk, bk).sum(dim=2)
        counts = (rows_of_class @ columns_of_class).round().long()  # exact below 2**53

        def rule(q: Tensor, k: Tensor) -> Tensor:
            return class_columns[row_class[q], k]

        return cls._from_counts(lengths, blocks, counts[None, None], rule)

    # --- public constructors ------------------------------------------------------------

    @classmethod
    def from_layout(cls, layout: Tensor, seq_lengths: int | tuple[int, int],
                    block_size: int | tuple[int, int]) -> BlockMask:
        """Mask from a block-level bool layout; every nonempty block is full.

        Rule: element ``(i, j)`` is visible iff ``layout[..., i // bq, j // bk]``.

        Args:
            layout: bool ``(nbq, nbk)`` or ``(Bm, Hm, nbq, nbk)`` with
                ``nbq = ceil(Lq / bq)``, ``nbk = ceil(Lk / bk)``.
            seq_lengths: ``Lq`` and ``Lk`` (an int for both).
            block_size: ``bq`` and ``bk`` (an int for both).
        """
        lengths = _int_pair("seq_lengths", seq_lengths, 0)
        blocks = _int_pair("block_size", block_size, 1)
        if not isinstance(layout, Tensor):
            raise TypeError(f"layout must be a bool tensor, got {type(layout).__name__}")
        if layout.dtype != torch.bool:
            raise TypeError(f"layout must be a bool tensor, got {layout.dtype}")
        _check_device("layout", layout.device)
        grid = (_ceil_div(lengths[0], blocks[0]), _ceil_div(lengths[1], blocks[1]))
        if layout.dim() == 2:
            layout = layout[None, None]
        if layout.dim() != 4 or tuple(layout.shape[2:]) != grid:
            raise ValueError(f"layout must have shape {grid} or (Bm, Hm, {grid[0]}, {grid[1]}) "
                             f"for seq_lengths {lengths} and block_size {blocks}, got "
                             f"{tuple(layout.shape)}")
        layout = layout.contiguous()
        return cls._from_classes(lengths, blocks, layout, layout, None)

    @classmethod
    def from_dense_mask(cls, mask: Tensor, block_size: int | tuple[int, int]) -> BlockMask:
        """Mask from an element-level bool mask (True = may attend).

        Rule: a block is empty, full or partial by counting its visible in-range elements.

        Args:
            mask: bool ``(Lq, Lk)`` or ``(Bm, Hm, Lq, Lk)`` with ``Bm``/``Hm`` 1 or the
                batch size/number of heads. Built on the mask's device.
            block_size: ``bq`` and ``bk`` (an int for both).
        """
        blocks = _int_pair("block_size", block_size, 1)
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a bool tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = may attend), got {mask.dtype}")
        _check_device("mask", mask.device)
        if mask.dim() == 2:
            mask = mask[None, None]
        if mask.dim() != 4:
            raise ValueError(f"mask must be (Lq, Lk) or (Bm, Hm, Lq, Lk), got shape "
                             f"{tuple(mask.shape)}")
        bm, hm, lq, lk = mask.shape
        (bq, bk) = blocks
        nbq, nbk = _ceil_div(lq, bq), _ceil_div(lk, bk)
        pq, pk = _mask_extent((lq, lk), blocks)  # the grid tiled by what blocks cover
        padded = torch.zeros(bm, hm, nbq * pq, nbk * pk, dtype=torch.bool, device=mask.device)
        padded[:, :, :lq, :lk] = mask
        by_block = padded.view(bm, hm, nbq, pq, nbk, pk).permute(0, 1, 2, 4, 3, 5)
        counts = by_block.sum(dim=(4, 5))
        area = (_block_extents(lq, bq)[:, None] * _block_extents(lk, bk)[None, :])
        layout, full = counts > 0, counts == area.to(mask.device)
        partial = layout & ~full
        partial_index = torch.full(layout.shape, -1, dtype=torch.int32, device=mask.device)
        partial_index[partial] = torch.arange(int(partial.sum()), dtype=torch.int32,
                                              device=mask.device)
        return cls._assemble((lq, lk), blocks, layout, full, partial_index, by_block[partial])

    @classmethod
    def random(cls, seq_lengths: int | tuple[int, int], block_size: int | tuple[int, int],
               sparsity_factor: float = 0.8, *, seed: int | None = None,
               generator: torch.Generator | None = None) -> BlockMask:
        """Random block layout, seed 004's rule: keep a block iff ``rand() > sparsity_factor``.

        Draws ``torch.rand(nbq, nbk, generator=...)`` once, so for square lengths that are
        multiples of the block size it reproduces seed 004's
        ``torch.rand(num_blocks, num_blocks) > sparsity_factor`` draw exactly (pass the
        generator it used, or nothing after ``torch.manual_seed`` for the global one).
        Kept blocks are full. About ``1 - sparsity_factor`` of the blocks are kept; query
        rows whose blocks are all dropped attend nothing and return 0 (seed 004 gives NaN).

        Args:
            seq_lengths, block_size: ints or ``(query, key)`` pairs.
            sparsity_factor: in ``[0, 1]``.
            seed: seeds a fresh CPU ``torch.Generator``; or pass ``generator``; neither
                uses torch's global generator.
        """
        lengths = _int_pair("seq_lengths", seq_lengths, 0)
        blocks = _int_pair("block_size", block_size, 1)
        sparsity_factor = _check_probability("sparsity_factor", sparsity_factor)
        gen = _make_generator(seed, generator)
        grid = (_ceil_div(lengths[0], blocks[0]), _ceil_div(lengths[1], blocks[1]))
        layout = torch.rand(grid, generator=gen) > sparsity_factor
        return cls.from_layout(layout, lengths, blocks)

    @classmethod
    def local_window(cls, seq_lengths: int | tuple[int, int], block_size: int | tuple[int, int],
                     window: int) -> BlockMask:
        """Sliding window: query ``i`` sees keys ``j`` with ``|j - c_i| <= window``.

        ``c_i = i`` for equal lengths. For ``Lq != Lk`` the query position is scaled to the
        key axis, ``c_i = ((2i + 1) * Lk) // (2 * Lq)`` (the centre of the keys aligned with
        query ``i``), so the window follows the diagonal of the rectangle; ``window`` counts
        key positions.
        """
        lengths = _int_pair("seq_lengths", seq_lengths, 0)
        blocks = _int_pair("block_size", block_size, 1)
        window = _check_int("window", window)
        lq, lk = lengths
        centres = _lattice_centres(lq, lk) if lq else torch.zeros(0, dtype=torch.int64)
        return cls._from_row_intervals(lengths, blocks, centres - window, centres + window)

    @classmethod
    def global_tokens(cls, seq_lengths: int | tuple[int, int],
                      block_size: int | tuple[int, int],
                      num_global: int | tuple[int, int]) -> BlockMask:
        """Global tokens: the first queries see every key; every query sees the first keys.

        Rule: ``(i, j)`` is visible iff ``i < gq`` or ``j < gk``, with
        ``(gq, gk) = num_global`` (an int for both). Combine with ``|`` (e.g. with
        :meth:`local_window`) for Longformer/BigBird-style patterns.
        """
        lengths = _int_pair("seq_lengths", seq_lengths, 0)
        blocks = _int_pair("block_size", block_size, 1)
        global_q, global_k = _int_pair("num_global", num_global, 0)
        if global_q > lengths[0] or global_k > lengths[1]:
            raise ValueError(f"num_global ({global_q}, {global_k}) exceeds seq_lengths "
                             f"{lengths}")
        rows = torch.arange(lengths[0], dtype=torch.int64)
        first = torch.zeros_like(rows)
        last = torch.where(rows < global_q, lengths[1] - 1, global_k - 1)
        return cls._from_row_intervals(lengths, blocks, first, last)

    @classmethod
    def strided(cls, seq_lengths: int | tuple[int, int], block_size: int | tuple[int, int],
                stride: int, num_summary: int = 1, causal: bool = True) -> BlockMask:
        """Sparse Transformer "fixed" pattern (Child et al. 2019).

        Rule: ``(i, j)`` is visible iff (``i // stride == j // stride``: same chunk, or
        ``j % stride >= stride - num_summary``: a summary position of its chunk), and, when
        ``causal``, ``j <= i``. Positions are indices on their own axis (no scaling for
        ``Lq != Lk``). A stride and summary count that are multiples of the block sizes keep
        blocks full; others make partial blocks.
        """
        lengths = _int_pair("seq_lengths", seq_lengths, 0)
        blocks = _int_pair("block_size", block_size, 1)
        stride = _check_int("stride", stride, 1)
        num_summary = _check_int("num_summary", num_summary)
        if num_summary > stride:
            raise ValueError(f"num_summary must be <= stride ({stride}), got {num_summary}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        lq, lk = lengths
        rows = torch.arange(lq, dtype=torch.int64)
        chunk_first = rows // stride * stride
        chunk_last = chunk_first + stride - 1
        if causal:
            chunk_last = torch.minimum(chunk_last, rows)
        chunks = cls._from_row_intervals(lengths, blocks, chunk_first, chunk_last)
        summary_columns = (torch.arange(lk) % stride >= stride - num_summary)[None]
        summaries = cls._from_row_classes(lengths, blocks, torch.zeros_like(rows),
                                          summary_columns)
        if causal:
            summaries = summaries & cls.causal(lengths, blocks)
        return chunks | summaries

    @classmethod
    def bigbird(cls, seq_lengths: int | tuple[int, int], block_size: int | tuple[int, int],
                window_blocks: int = 1, num_global_blocks: int = 1, num_random_blocks: int = 1,
                seed: int | None = None, *, generator: torch.Generator | None = None
                ) -> BlockMask:
        """BigBird block pattern (Zaheer et al. 2020): window + global + random blocks.

        Rule, on the block grid: query block ``a`` keeps kv block ``b`` if
        ``|b - c_a| <= window_blocks`` (``c_a = a`` for square grids, else
        ``((2a + 1) * nbk) // (2 * nbq)``), or ``a < num_global_blocks`` or
        ``b < num_global_blocks`` (global rows and columns), or ``b`` is one of
        ``num_random_blocks`` blocks drawn uniformly for row ``a`` among the blocks the
        first two rules left out. Kept blocks are full.
        """
        lengths = _int_pair("seq_lengths", seq_lengths, 0)
        blocks = _int_pair("block_size", block_size, 1)
        window_blocks = _check_int("window_blocks", window_blocks)
        num_global_blocks = _check_int("num_global_blocks", num_global_blocks)
        num_random_blocks = _check_int("num_random_blocks", num_random_blocks)
        gen = _make_generator(seed, generator)
        nbq, nbk = _ceil_div(lengths[0], blocks[0]), _ceil_div(lengths[1], blocks[1])
        centres = _lattice_centres(nbq, nbk) if nbq else torch.zeros(0, dtype=torch.int64)
        columns = torch.arange(nbk, dtype=torch.int64)
        layout = (columns[None, :] - centres[:, None]).abs() <= window_blocks
        layout[:num_global_blocks] = True
        layout[:, :num_global_blocks] = True
        if num_random_blocks and nbq and nbk:
            # Rank the left-out blocks of each row by a uniform score; keep the lowest.
            scores = torch.rand(nbq, nbk, generator=gen).masked_fill_(layout, math.inf)
            count = min(num_random_blocks, nbk)
            lowest, picked = scores.topk(count, dim=1, largest=False)
            drawn = torch.zeros_like(layout)
            drawn.scatter_(1, picked, lowest < math.inf)  # rows with too few left-out blocks
            layout |= drawn
        return cls.from_layout(layout, lengths, blocks)

    @classmethod
    def causal(cls, seq_lengths: int | tuple[int, int],
               block_size: int | tuple[int, int]) -> BlockMask:
        """Causal mask, top-left aligned: key ``j`` is visible to query ``i`` iff ``j <= i``.

        The same as ``F.scaled_dot_product_attention(is_causal=True)`` for any
        ``Lq``, ``Lk``: ``torch.ones(Lq, Lk, dtype=torch.bool).tril()``.
        """
        lengths = _int_pair("seq_lengths", seq_lengths, 0)
        blocks = _int_pair("block_size", block_size, 1)
        rows = torch.arange(lengths[0], dtype=torch.int64)
        return cls._from_row_intervals(lengths, blocks, torch.zeros_like(rows), rows)

    @classmethod
    def modality(cls, query_segments: Mapping[str, int] | Sequence[Any],
                 key_segments: Mapping[str, int] | Sequence[Any] | None,
                 allow: Mapping[Any, Iterable[Any]] | Tensor | Sequence[Sequence[bool]],
                 block_size: int | tuple[int, int]) -> BlockMask:
        """Multimodal mask: which query modality may attend which key modality.

        The query sequence is the concatenation of its segments in order, and so is the
        key sequence. Rule: ``(i, j)`` is visible iff ``allow`` lets the modality of query
        ``i`` attend the modality of key ``j``.

        Args:
            query_segments: ``{"text": 77, "image": 197, "audio": 100}`` (ordered), a list
                of ``(name, length)`` pairs, or a list of lengths (named 0, 1, ...).
            key_segments: the same for keys; None for the query segments (self-attention
                over one concatenated sequence).
            allow: ``{query_name: [key_names it may attend]}`` (a query modality that is
                absent attends nothing), or a bool matrix
                ``(num_query_segments, num_key_segments)``.
            block_size: ``bq`` and ``bk`` (an int for both).

        Example: text and image see each other and themselves, audio sees only text::

            BlockMask.modality({"text": 77, "image": 197, "audio": 100}, None,
                               {"text": ["text", "image"], "image": ["text", "image"],
                                "audio": ["text"]}, 64)
        """
        blocks = _int_pair("block_size", block_size, 1)
        q_names, q_lengths = _segments("query_segments", query_segments)
        if key_segments is None:
            k_names, k_lengths = q_names, q_lengths
        else:
            k_names, k_lengths = _segments("key_segments", key_segments)
        allowed = _allow_matrix(allow, q_names, k_names)
        lengths = (sum(q_lengths), sum(k_lengths))
        row_class = torch.repeat_interleave(torch.arange(len(q_lengths)),
                                            torch.tensor(q_lengths, dtype=torch.int64))
        key_segment = torch.repeat_interleave(torch.arange(len(k_lengths)),
                                              torch.tensor(k_lengths, dtype=torch.int64))
        class_columns = allowed[:, key_segment]
        return cls._from_row_classes(lengths, blocks, row_class, class_columns)

    @classmethod
    def watts_strogatz(cls, seq_lengths: int | tuple[int, int],
                       block_size: int | tuple[int, int], k: int, beta: float,
                       seed: int | None = None, self_loops: bool = True) -> BlockMask:
        """Watts-Strogatz small-world graph over blocks; kept blocks are full.

        Rule: the block layout is :func:`mmattn.watts_strogatz_mask` ``(nbq, nbk, k, beta,
        seed)`` — networkx's graph for a square grid, the scaled ring lattice otherwise —
        plus, when ``self_loops``, each query block's own block (``(a, a)``, or its scaled
        centre ``((2a + 1) * nbk) // (2 * nbq)`` on a rectangular grid), which the graph
        lacks but attention usually wants. ``k`` counts blocks (``<= nbk``).
        """
        lengths = _int_pair("seq_lengths", seq_lengths, 0)
        blocks = _int_pair("block_size", block_size, 1)
        if not isinstance(self_loops, bool):
            raise TypeError(f"self_loops must be a bool, got {type(self_loops).__name__}")
        k = _check_int("k", k)
        nbq, nbk = _ceil_div(lengths[0], blocks[0]), _ceil_div(lengths[1], blocks[1])
        if nbq == 0 or nbk == 0:
            return cls.from_layout(torch.zeros(nbq, nbk, dtype=torch.bool), lengths, blocks)
        if k > nbk:
            raise ValueError(f"k must be <= the number of key blocks ceil(Lk / bk) = "
                             f"ceil({lengths[1]} / {blocks[1]}) = {nbk}, got k={k}")
        layout = watts_strogatz_mask(nbq, nbk, k, beta, seed)
        if self_loops:
            layout[torch.arange(nbq), _lattice_centres(nbq, nbk)] = True
        return cls.from_layout(layout, lengths, blocks)

    # --- views and conversions ----------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(Bm, Hm, Lq, Lk)``: the shape of :meth:`to_dense`."""
        return (*self.layout.shape[:2], *self.seq_lengths)

    @property
    def device(self) -> torch.device:
        return self.layout.device

    @property
    def num_partial_blocks(self) -> int:
        """Number of partial blocks (over ``Bm``, ``Hm`` too)."""
        return int((self.partial_index >= 0).sum())

    @property
    def num_stored_masks(self) -> int:
        """Number of distinct element masks stored, ``P`` (partial blocks share them)."""
        return int(self.partial_masks.shape[0])

    @property
    def density(self) -> float:
        """Nonempty blocks / all blocks (over ``Bm``, ``Hm`` too): the fraction of work."""
        total = self.layout.numel()
        return float(self.layout.sum()) / total if total else 0.0

    @property
    def element_density(self) -> float:
        """Visible elements / ``Bm * Hm * Lq * Lk``."""
        (lq, lk), (bq, bk) = self.seq_lengths, self.block_size
        total = self.layout.shape[0] * self.layout.shape[1] * lq * lk
        if total == 0:
            return 0.0
        area = (_block_extents(lq, bq)[:, None] * _block_extents(lk, bk)[None, :])
        visible = int((self.full * area.to(self.device)).sum())
        partial = self.partial_index[self.partial_index >= 0].long()
        per_mask = self.partial_masks.flatten(1).sum(dim=1)  # masks are shared: count once
        visible += int(per_mask[partial].sum())
        return visible / total

    def to(self, device: torch.device | str) -> BlockMask:
        """The same mask with every tensor on ``device`` (not ``meta``: a mask needs data)."""
        device = torch.device(device)
        if device == self.device:
            return self
        _check_device("device", device)
        moved = self.__class__.__new__(self.__class__)
        for name in self.__slots__:
            value = getattr(self, name)
            object.__setattr__(moved, name, value.to(device) if isinstance(value, Tensor)
                               else value)
        return moved

    def to_dense(self) -> Tensor:
        """Bool ``(Bm, Hm, Lq, Lk)`` element mask (True = may attend)."""
        return block_mask_to_dense(self.full, self.partial_index, self.partial_masks,
                                   self.block_size, self.seq_lengths).contiguous()

    def block_classes(self) -> Tensor:
        """int8 ``(Bm, Hm, nbq, nbk)``: 0 empty, 1 partial, 2 full."""
        return self.layout.to(torch.int8) + self.full.to(torch.int8)

    # --- combination --------------------------------------------------------------------

    def __or__(self, other: object) -> BlockMask:
        """Union: visible in either mask."""
        if not isinstance(other, BlockMask):
            return NotImplemented
        return self._combine(other, union=True)

    def __and__(self, other: object) -> BlockMask:
        """Intersection: visible in both masks."""
        if not isinstance(other, BlockMask):
            return NotImplemented
        return self._combine(other, union=False)

    def _combine(self, other: BlockMask, union: bool) -> BlockMask:
        if self.seq_lengths != other.seq_lengths:
            raise ValueError(f"seq_lengths differ: {self.seq_lengths} and {other.seq_lengths}")
        if self.block_size != other.block_size:
            raise ValueError(f"block_size differs: {self.block_size} and {other.block_size}")
        if self.device != other.device:
            raise ValueError(f"the masks are on different devices: {self.device} and "
                             f"{other.device}")
        try:
            leading = torch.broadcast_shapes(self.layout.shape[:2], other.layout.shape[:2])
        except RuntimeError:
            leading = None
        if leading is None or any(size not in (1, max(a, b)) for size, a, b in zip(
                leading, self.layout.shape[:2], other.layout.shape[:2], strict=True)):
            raise ValueError(f"the masks' (Bm, Hm) {tuple(self.layout.shape[:2])} and "
                             f"{tuple(other.layout.shape[:2])} do not broadcast")
        shape = (*leading, *self.num_blocks)
        layout_a, layout_b = self.layout.expand(shape), other.layout.expand(shape)
        full_a, full_b = self.full.expand(shape), other.full.expand(shape)
        if union:
            layout, full = layout_a | layout_b, full_a | full_b
        else:
            layout, full = layout_a & layout_b, full_a & full_b
        # Blocks whose class the block rules cannot decide: compare their elements, once per
        # distinct (mask of self, mask of other, edge position) -- blocks share masks, so
        # this is O(distinct combinations x pq x pk), not O(blocks x pq x pk).
        undecided = (layout & ~full).nonzero()
        nbq, nbk = self.num_blocks
        key = torch.stack([self._block_codes(undecided), other._block_codes(undecided),
                           (undecided[:, 2] == nbq - 1).long(),
                           (undecided[:, 3] == nbk - 1).long()], dim=1)
        if key.shape[0]:
            keys, inverse = torch.unique(key, dim=0, return_inverse=True)
        else:
            keys, inverse = key, key[:, 0]
        first = _first_occurrence(inverse, keys.shape[0])
        in_range = _in_range_masks(self.seq_lengths, self.block_size, undecided[first, 2],
                                   undecided[first, 3])
        elements_a = self._code_elements(keys[:, 0], in_range)
        elements_b = other._code_elements(keys[:, 1], in_range)
        elements = elements_a | elements_b if union else elements_a & elements_b
        now_full = (elements == in_range).flatten(1).all(dim=1)[inverse]
        now_empty = (~elements.flatten(1).any(dim=1))[inverse]
        full = full.clone()
        layout = layout.clone()
        full[tuple(undecided[now_full].t())] = True
        layout[tuple(undecided[now_empty].t())] = False
        still_partial = ~now_full & ~now_empty
        partial_index = torch.full(shape, -1, dtype=torch.int32, device=self.device)
        partial_index[tuple(undecided[still_partial].t())] = inverse[still_partial].to(
            torch.int32)
        return BlockMask._assemble(self.seq_lengths, self.block_size, layout, full,
                                   partial_index, elements)

    def _block_codes(self, where: Tensor) -> Tensor:
        """int64 ``(U,)`` for blocks ``where (U, 4)`` (broadcast indices): the index of the
        block's stored mask, -1 for an empty block, -2 for a full one."""
        bm, hm = self.layout.shape[:2]
        b, h, a, c = where.t()
        b, h = b if bm > 1 else torch.zeros_like(b), h if hm > 1 else torch.zeros_like(h)
        index = self.partial_index[b, h, a, c].long()
        return torch.where(self.full[b, h, a, c], -2, index)

    def _code_elements(self, codes: Tensor, in_range: Tensor) -> Tensor:
        """Element masks ``(U, pq, pk)`` of blocks given by :meth:`_block_codes`."""
        elements = in_range & (codes == -2)[:, None, None]
        stored = codes >= 0
        elements[stored] = self.partial_masks[codes[stored]]
        return elements

    # --- display ------------------------------------------------------------------------

    def __repr__(self) -> str:
        bm, hm = self.layout.shape[:2]
        header = (f"BlockMask(seq_lengths={self.seq_lengths}, block_size={self.block_size}, "
                  f"num_blocks={self.num_blocks}, batch_heads=({bm}, {hm}), "
                  f"density={self.density:.4f}, element_density={self.element_density:.4f}, "
                  f"partial_blocks={self.num_partial_blocks}, "
                  f"stored_masks={self.num_stored_masks})")
        if self.layout.numel() == 0:
            return header
        grid, (rows_per_char, cols_per_char) = self._text_grid()
        which = " of batch 0, head 0" if bm * hm > 1 else ""
        if rows_per_char == cols_per_char == 1:
            legend = f"layout{which}: {_FULL} full, {_PARTIAL} partial, {_EMPTY} empty"
        else:
            legend = (f"layout{which}, one character per {rows_per_char}x{cols_per_char} "
                      f"blocks: {_FULL} all full, ▓ half or more nonempty, ░ some nonempty, "
                      f"{_EMPTY} all empty")
        return "\n".join([header, legend, *grid])

    def _text_grid(self) -> tuple[list[str], tuple[int, int]]:
        """Rows of characters for layout[0, 0], shrunk to at most 32 x 64 characters."""
        nbq, nbk = self.num_blocks
        rows_per_char = _ceil_div(nbq, _REPR_MAX_ROWS)
        cols_per_char = _ceil_div(nbk, _REPR_MAX_COLS)
        if rows_per_char == cols_per_char == 1:
            symbols = [_EMPTY, _PARTIAL, _FULL]
            return (["".join(symbols[c] for c in row)
                     for row in self.block_classes()[0, 0].tolist()], (1, 1))
        char_rows, char_cols = _ceil_div(nbq, rows_per_char), _ceil_div(nbk, cols_per_char)

        def cells(t: Tensor, fill: int) -> Tensor:
            padded = torch.full((char_rows * rows_per_char, char_cols * cols_per_char), fill,
                                dtype=torch.int64)
            padded[:nbq, :nbk] = t.cpu()
            return padded.view(char_rows, rows_per_char, char_cols, cols_per_char)

        in_grid = cells(torch.ones(nbq, nbk, dtype=torch.int64), 0).sum(dim=(1, 3))
        nonempty = cells(self.layout[0, 0].long(), 0).sum(dim=(1, 3))
        all_full = cells(self.full[0, 0].long(), 1).amin(dim=(1, 3)).bool()
        lines = []
        for count_row, total_row, full_row in zip(nonempty.tolist(), in_grid.tolist(),
                                                  all_full.tolist(), strict=True):
            line = []
            for count, total, full in zip(count_row, total_row, full_row, strict=True):
                if full:
                    line.append(_FULL)
                elif count == 0:
                    line.append(_EMPTY)
                else:
                    line.append("▓" if 2 * count >= total else "░")
            lines.append("".join(line))
        return lines, (rows_per_char, cols_per_char)

    def plot(self, path: str | os.PathLike[str] | None = None, *, batch: int = 0, head: int = 0,
             ax: Any = None, title: str | None = None) -> Any:
        """Draw the mask of ``(batch, head)`` with matplotlib; write a PNG if ``path``.

        Up to 4M elements the picture is element-level: white = empty block, light grey /
        orange = hidden / visible element of a partial block, dark blue = full block.
        Larger masks are drawn per block (white empty, orange partial, blue full). Draws
        into ``ax`` when given (for galleries), else into a new figure (no pyplot state).
        Returns the matplotlib ``Axes``.
        """
        try:
            from matplotlib.colors import ListedColormap
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError("BlockMask.plot needs matplotlib: pip install matplotlib") from exc
        bm, hm = self.layout.shape[:2]
        batch = _check_int("batch", batch)
        head = _check_int("head", head)
        if batch >= bm or head >= hm:
            raise ValueError(f"(batch, head) = ({batch}, {head}) is outside the mask's "
                             f"(Bm, Hm) = ({bm}, {hm})")
        picture = self._picture(batch, head)
        element_level = picture.shape == self.seq_lengths
        if ax is None:
            aspect = max(picture.shape[0], 1) / max(picture.shape[1], 1)
            ax = Figure(figsize=(6, min(max(6 * aspect, 2), 12))).add_subplot()
        colours = ListedColormap(["#ffffff", "#e4e4e4", "#f28e2b", "#1f4e79"])
        ax.imshow(picture.numpy(), cmap=colours, vmin=0, vmax=3, interpolation="nearest",
                  aspect="auto")
        ax.set_xlabel("key" if element_level else "key block")
        ax.set_ylabel("query" if element_level else "query block")
        ax.set_title(title if title is not None else
                     f"{self.seq_lengths[0]}x{self.seq_lengths[1]}, block "
                     f"{self.block_size[0]}x{self.block_size[1]}, density {self.density:.2f}")
        if path is not None:
            ax.figure.savefig(os.fspath(path), dpi=100, bbox_inches="tight")
        return ax

    def _picture(self, batch: int, head: int) -> Tensor:
        """int64 image for :meth:`plot`: classes 0..3 per element, or per block if large."""
        (lq, lk), (bq, bk) = self.seq_lengths, self.block_size
        classes = self.block_classes()[batch, head].cpu().long()  # 0 empty, 1 partial, 2 full
        if lq * lk > 4 * 2**20:
            return torch.tensor([0, 2, 3])[classes]
        pq, pk = _mask_extent((lq, lk), (bq, bk))  # a block larger than L covers L
        per_element = classes.repeat_interleave(pq, 0).repeat_interleave(pk, 1)[:lq, :lk]
        visible = self.to("cpu").to_dense()[batch, head]
        picture = torch.zeros(lq, lk, dtype=torch.int64)
        picture[per_element == 1] = 1
        picture[(per_element == 1) & visible] = 2
        picture[per_element == 2] = 3
        return picture


# --- helpers ------------------------------------------------------------------------------

def _compress_rows(layout: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of the last two dims: count of True and their column indices, padded with 0.

    A scatter by running counts instead of a sort: True columns go to positions
    ``0 .. count-1`` in order, False columns fill the rest and are then zeroed.
    """
    width = layout.shape[-1]
    counts = layout.sum(dim=-1, dtype=torch.int32)
    if width == 0:
        return counts, torch.zeros(layout.shape, dtype=torch.int32, device=layout.device)
    true_rank = layout.cumsum(dim=-1, dtype=torch.int32) - 1
    false_rank = (~layout).cumsum(dim=-1, dtype=torch.int32) - 1 + counts[..., None]
    position = torch.where(layout, true_rank, false_rank).long()
    columns = torch.arange(width, dtype=torch.int32, device=layout.device)
    values = torch.where(layout, columns, 0)
    indices = torch.empty(layout.shape, dtype=torch.int32, device=layout.device)
    indices.scatter_(-1, position, values)
    return counts.contiguous(), indices.contiguous()


def _first_occurrence(inverse: Tensor, count: int) -> Tensor:
    """int64 ``(count,)``: the first position of each value ``0 .. count-1`` in ``inverse``."""
    positions = torch.arange(inverse.numel(), dtype=torch.int64, device=inverse.device)
    first = torch.full((count,), inverse.numel(), dtype=torch.int64, device=inverse.device)
    return first.scatter_reduce_(0, inverse, positions, "amin")


def _distinct_rows(masks: Tensor) -> tuple[Tensor, Tensor]:
    """``(inverse, first)`` for bool ``masks (P, ...)``: ``masks[first]`` are the distinct
    masks in order of first occurrence and ``masks[i] == masks[first][inverse[i]]``."""
    count = masks.shape[0]
    flat = masks.reshape(count, -1)
    if count <= 1 or flat.shape[1] == 0:
        inverse = torch.zeros(count, dtype=torch.int64, device=masks.device)
        return inverse, torch.zeros(min(count, 1), dtype=torch.int64, device=masks.device)
    # Rows read as int64 words (a bool is a byte: eight elements a word) and hashed:
    # sorting one int64 per row is much faster than torch.unique(dim=0) on the rows. Equal
    # hashes are checked word by word; a collision falls back to the exact row sort.
    data = flat.contiguous().view(torch.uint8)
    pad = -data.shape[1] % 8
    if pad:
        data = torch.cat([data, data.new_zeros(count, pad)], dim=1)
    words = data.view(torch.int64)
    multipliers = torch.arange(words.shape[1], dtype=torch.int64, device=masks.device)
    multipliers = (multipliers * 0x2545F4914F6CDD1D + 0x1B873593) | 1  # odd; products wrap
    hashes = (words * multipliers).sum(dim=1)
    _, inverse = torch.unique(hashes, return_inverse=True)
    first = _first_occurrence(inverse, int(inverse.max()) + 1)
    if not bool((words == words[first[inverse]]).all()):
        _, inverse = torch.unique(words, dim=0, return_inverse=True)
        first = _first_occurrence(inverse, int(inverse.max()) + 1)
    order = first.argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), dtype=torch.int64, device=masks.device)
    return rank[inverse], first[order]


def _deduplicate(partial_index: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """``partial_index`` int32 and ``masks (P, pq, pk)`` with each distinct mask that some
    block uses stored once (in their original order); unused entries are dropped."""
    used = partial_index >= 0
    ids = partial_index[used].long()
    if ids.numel() == 0:
        return partial_index, masks[:0]
    referenced, ids = torch.unique(ids, return_inverse=True)
    if referenced.numel() == masks.shape[0] and referenced.numel() <= 1:
        return partial_index, masks
    inverse, first = _distinct_rows(masks[referenced])
    masks = masks[referenced][first]
    partial_index = partial_index.clone()
    partial_index[used] = inverse[ids].to(torch.int32)
    return partial_index, masks


def _in_range_masks(lengths: tuple[int, int], blocks: tuple[int, int], block_rows: Tensor,
                    block_cols: Tensor) -> Tensor:
    """bool ``(P, pq, pk)``: which positions of each block lie inside ``(Lq, Lk)``."""
    _, q_valid = _positions(block_rows, blocks[0], lengths[0])
    _, k_valid = _positions(block_cols, blocks[1], lengths[1])
    return q_valid[:, :, None] & k_valid[:, None, :]


def _segments(name: str, segments: object) -> tuple[list[Any], list[int]]:
    """Names and lengths of ``segments`` (a mapping, (name, length) pairs, or lengths)."""
    if isinstance(segments, Mapping):
        pairs = list(segments.items())
    elif isinstance(segments, (list, tuple)):
        if all(_is_int(item) for item in segments):
            pairs = list(enumerate(segments))
        elif all(isinstance(item, (list, tuple)) and len(item) == 2 for item in segments):
            pairs = [tuple(item) for item in segments]
        else:
            raise TypeError(f"{name} must hold lengths or (name, length) pairs, got "
                            f"{segments!r}")
    else:
        raise TypeError(f"{name} must be a dict of name -> length, a list of (name, length) "
                        f"pairs or a list of lengths, got {type(segments).__name__}")
    if not pairs:
        raise ValueError(f"{name} must name at least one segment")
    names = [segment_name for segment_name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"{name} repeats a segment name: {names}")
    lengths = [_check_int(f"{name}[{segment_name!r}]", length) for segment_name, length in pairs]
    return names, lengths


def _allow_matrix(allow: object, q_names: list[Any], k_names: list[Any]) -> Tensor:
    """bool ``(num_query_segments, num_key_segments)`` from a dict or a matrix."""
    shape = (len(q_names), len(k_names))
    if isinstance(allow, Mapping):
        matrix = torch.zeros(shape, dtype=torch.bool)
        for q_name, k_list in allow.items():
            if q_name not in q_names:
                raise ValueError(f"allow names query modality {q_name!r}, not one of {q_names}")
            if isinstance(k_list, (str, bytes)) or not isinstance(k_list, Iterable):
                raise TypeError(f"allow[{q_name!r}] must be a list of key modalities, got "
                                f"{k_list!r}")
            for k_name in k_list:
                if k_name not in k_names:
                    raise ValueError(f"allow[{q_name!r}] names key modality {k_name!r}, not "
                                     f"one of {k_names}")
                matrix[q_names.index(q_name), k_names.index(k_name)] = True
        return matrix
    try:
        matrix = torch.as_tensor(allow)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"allow must be a dict of query -> key modalities or a bool matrix, "
                        f"got {type(allow).__name__}") from exc
    if matrix.dtype != torch.bool:
        raise TypeError(f"allow as a matrix must be bool, got {matrix.dtype}")
    if tuple(matrix.shape) != shape:
        raise ValueError(f"allow must have shape (num_query_segments, num_key_segments) = "
                         f"{shape}, got {tuple(matrix.shape)}")
    return matrix.cpu()
