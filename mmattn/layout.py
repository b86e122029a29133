"""``SparseLayout``: which entries of a weight matrix exist, compressed both ways.

A layout describes an ``(out_features, in_features)`` matrix whose kept entries
(or kept ``block_size x block_size`` blocks) are stored as CSR, plus the CSR of
its transpose so kernels can run ``dX = dY @ W`` as a row-parallel SpMM too.
Weights live outside the layout, as a ``(nnz,)`` (or ``(nnz, bs, bs)``) tensor in
CSR order; ``transpose_perm`` maps transposed order back to CSR order.

A layout is checked once, when it is built (``O(nnz)``): the six index arrays must
describe one pattern, because every backend trusts them (a wrong ``transpose_perm``
would give a silently wrong dX, a duplicate column would be summed by one backend and
overwritten by another).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from mmattn.watts_strogatz import watts_strogatz_coo


def _check_size(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _validate(layout: SparseLayout) -> None:
    """Raise ValueError/TypeError naming the field unless the six index arrays describe
    one canonical pattern (CSR sorted and unique within rows, its CSC, the permutation
    between them). Vectorised, ``O(nnz + rows + cols)``."""
    shape = layout.shape
    if not isinstance(shape, tuple) or len(shape) != 2:
        raise TypeError(f"shape must be a tuple (out_features, in_features), got {shape!r}")
    out_features = _check_size("shape[0] (out_features)", shape[0], 0)
    in_features = _check_size("shape[1] (in_features)", shape[1], 0)
    bs = _check_size("block_size", layout.block_size, 1)
    nbr, nbc = -(-out_features // bs), -(-in_features // bs)
    named = dict(zip(("crow_indices", "col_indices", "row_indices", "ccol_indices",
                      "row_indices_t", "transpose_perm"), layout.index_tensors(), strict=True))
    nnz = layout.col_indices.numel() if isinstance(layout.col_indices, Tensor) else -1
    lengths = {"crow_indices": nbr + 1, "ccol_indices": nbc + 1}
    for name, t in named.items():
        if not isinstance(t, Tensor) or t.dtype != torch.int32:
            raise TypeError(f"{name} must be an int32 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if t.layout is not torch.strided or t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 1-D tensor, got shape "
                             f"{tuple(t.shape)}")
        if t.device != layout.crow_indices.device:
            raise ValueError(f"{name} is on {t.device}, crow_indices on "
                             f"{layout.crow_indices.device}")
        if t.numel() != lengths.get(name, nnz):
            raise ValueError(f"{name} must have {lengths.get(name, nnz)} entries "
                             f"({'blocks + 1' if name in lengths else 'nnz'}), got {t.numel()}")
    crow, col, row, ccol, row_t, perm = (t.long() for t in named.values())
    if int(crow[0]) != 0 or int(crow[-1]) != nnz or bool((crow[1:] < crow[:-1]).any()):
        raise ValueError(f"crow_indices must start at 0, never decrease and end at nnz = {nnz}")
    if nnz and (int(col.min()) < 0 or int(col.max()) >= nbc):
        raise ValueError(f"col_indices must be in [0, {nbc}) (block columns), got values in "
                         f"[{int(col.min())}, {int(col.max())}]")
    counts = crow[1:] - crow[:-1]
    expected_rows = torch.repeat_interleave(torch.arange(nbr, device=crow.device), counts)
    if not torch.equal(row, expected_rows):
        raise ValueError("row_indices must be the row of each entry (the COO form of "
                         "crow_indices)")
    if nnz > 1:
        same_row = row[1:] == row[:-1]
        if bool((same_row & (col[1:] <= col[:-1])).any()):
            bad = int((same_row & (col[1:] <= col[:-1])).nonzero()[0, 0])
            duplicate = int(col[bad + 1]) == int(col[bad])
            what = "a duplicate column" if duplicate else "unsorted columns"
            raise ValueError(f"col_indices has {what} in row {int(row[bad])} (columns "
                             f"{int(col[bad])}, {int(col[bad + 1])}): columns must be sorted "
                             f"and unique within a row")
    column_counts = torch.bincount(col, minlength=nbc)
    if int(ccol[0]) != 0 or not torch.equal(ccol[1:], torch.cumsum(column_counts, 0)):
        raise ValueError("ccol_indices must be the column pointers of col_indices (0, then "
                         "the running count of entries per column)")
    if nnz and (int(perm.min()) < 0 or int(perm.max()) >= nnz
                or bool((torch.bincount(perm, minlength=nnz) != 1).any())):
        raise ValueError(f"transpose_perm must be a permutation of 0..nnz-1 (nnz = {nnz})")
    if nnz:
        key = col[perm] * max(nbr, 1) + row[perm]
        if bool((key[1:] <= key[:-1]).any()):
            raise ValueError("transpose_perm must list the CSR entries in column-major order "
                             "(by column, then row)")
    if not torch.equal(row_t, row[perm]):
        raise ValueError("row_indices_t must be the row of each entry in column-major order "
                         "(row_indices[transpose_perm])")


def _csr_from_coo(rows: Tensor, cols: Tensor, num_rows: int) -> Tensor:
    counts = torch.bincount(rows, minlength=num_rows)
    crow = torch.zeros(num_rows + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(counts, 0)
    return crow


@dataclass(frozen=True, eq=False)
class SparseLayout:
    """Compressed sparsity pattern of an ``(out_features, in_features)`` weight.

    Attributes (all int32, contiguous, on ``device``):
        crow_indices: ``(num_block_rows + 1,)`` CSR row pointers.
        col_indices: ``(nnz,)`` block column of each kept entry, sorted within rows.
        row_indices: ``(nnz,)`` block row of each kept entry (COO form of the CSR).
        ccol_indices: ``(num_block_cols + 1,)`` pointers of the transpose (CSC).
        row_indices_t: ``(nnz,)`` block row of each entry in column-major order.
        transpose_perm: ``(nnz,)`` CSR index of each entry in column-major order.

    ``nnz`` counts stored blocks; with ``block_size == 1`` a block is one element.

    Built by :meth:`from_mask`, :meth:`from_coo` or :meth:`from_watts_strogatz`; a layout
    assembled by hand from its arrays is checked at construction (``O(nnz)``), and any
    inconsistency raises a ``ValueError`` / ``TypeError`` naming the field.
    """

    shape: tuple[int, int]
    block_size: int
    crow_indices: Tensor
    col_indices: Tensor
    row_indices: Tensor
    ccol_indices: Tensor
    row_indices_t: Tensor
    transpose_perm: Tensor

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def _trusted(cls, shape: tuple[int, int], block_size: int,
                 *index: Tensor) -> SparseLayout:
        """A layout from arrays known to be consistent (a checked layout's, moved or held
        as module buffers), without the check."""
        layout = cls.__new__(cls)
        for field, value in zip(fields(cls), (shape, block_size, *index), strict=True):
            object.__setattr__(layout, field.name, value)
        return layout

    @classmethod
    def from_mask(cls, mask: Tensor, block_size: int = 1) -> SparseLayout:
        """Layout of the True entries of a 2-D bool ``mask`` (out_features, in_features).

        With ``block_size > 1`` a block is kept when any of its elements is True;
        edge blocks of lengths that are not multiples of the block size are partial.
        """
        if not isinstance(mask, Tensor) or mask.dim() != 2:
            raise ValueError(f"mask must be a 2-D tensor, got {type(mask).__name__} "
                             f"{tuple(getattr(mask, 'shape', ()))}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        out_features, in_features = mask.shape
        mask = mask.detach().to("cpu", torch.bool)
        if block_size > 1:
            bs = block_size
            nbr, nbc = -(-out_features // bs), -(-in_features // bs)
            padded = torch.zeros(nbr * bs, nbc * bs, dtype=torch.bool)
            padded[:out_features, :in_features] = mask
            mask = padded.view(nbr, bs, nbc, bs).any(dim=3).any(dim=1)
        rows, cols = mask.nonzero(as_tuple=True)
        return cls.from_coo(rows, cols, (out_features, in_features), block_size)

    @classmethod
    def from_coo(cls, rows: Tensor, cols: Tensor, shape: tuple[int, int],
                 block_size: int = 1) -> SparseLayout:
        """Layout from kept (block) coordinates; duplicates are merged."""
        if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2:
            raise TypeError(f"shape must be (out_features, in_features), got {shape!r}")
        out_features = _check_size("shape[0] (out_features)", shape[0], 0)
        in_features = _check_size("shape[1] (in_features)", shape[1], 0)
        block_size = _check_size("block_size", block_size, 1)
        nbr = -(-out_features // block_size)
        nbc = -(-in_features // block_size)
        rows = torch.as_tensor(rows, dtype=torch.int64).flatten()
        cols = torch.as_tensor(cols, dtype=torch.int64).flatten()
        if rows.shape != cols.shape:
            raise ValueError("rows and cols must have the same length")
        if rows.numel() and (rows.min() < 0 or rows.max() >= nbr or cols.min() < 0
                             or cols.max() >= nbc):
            raise ValueError(f"coordinates out of range for a {nbr} x {nbc} (block) grid")
        keys = torch.unique(rows * max(nbc, 1) + cols)  # sorted: row-major, unique
        rows, cols = keys // max(nbc, 1), keys % max(nbc, 1)
        crow = _csr_from_coo(rows, cols, nbr)
        perm = torch.argsort(cols * max(nbr, 1) + rows)
        ccol = _csr_from_coo(cols, rows, nbc)

        def i32(t: Tensor) -> Tensor:
            return t.to(torch.int32).contiguous()

        return cls((out_features, in_features), block_size, i32(crow), i32(cols), i32(rows),
                   i32(ccol), i32(rows[perm]), i32(perm))

    @classmethod
    def from_watts_strogatz(cls, out_features: int, in_features: int, k: int, beta: float,
                            seed: int | None = None, block_size: int = 1) -> SparseLayout:
        """Layout of a Watts-Strogatz small-world mask (see :func:`mmattn.watts_strogatz_mask`).

        With ``block_size == 1`` the kept entries are exactly
        ``watts_strogatz_mask(out_features, in_features, k, beta, seed)``. With
        ``block_size > 1`` the graph is built over blocks instead — ``ceil(out/bs)`` block
        rows by ``ceil(in/bs)`` block columns, square (networkx's graph) when those counts
        are equal — and every kept block is dense (edge blocks clipped to the shape).
        ``k`` counts blocks then and must be ``<=`` the number of block columns.
        """
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        for name, size in (("out_features", out_features), ("in_features", in_features)):
            if isinstance(size, bool) or not isinstance(size, int):
                raise TypeError(f"{name} must be an int, got {type(size).__name__}")
            if size < 1:
                raise ValueError(f"{name} must be >= 1, got {size}")
        rows, cols = watts_strogatz_coo(-(-out_features // block_size),
                                        -(-in_features // block_size), k, beta, seed)
        return cls.from_coo(rows, cols, (out_features, in_features), block_size)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def nnz(self) -> int:
        """Number of stored entries (blocks when ``block_size > 1``)."""
        return int(self.col_indices.numel())

    @property
    def num_parameters(self) -> int:
        """Number of weight values the layout stores: ``nnz * block_size**2``."""
        return self.nnz * self.block_size**2

    @property
    def density(self) -> float:
        """Fraction of the dense matrix covered by stored entries (padding excluded)."""
        total = self.shape[0] * self.shape[1]
        return float(self.to_dense().sum()) / total if total else 0.0

    @property
    def device(self) -> torch.device:
        return self.crow_indices.device

    def to(self, device: torch.device | str) -> SparseLayout:
        """The same layout with its index tensors on ``device``."""
        device = torch.device(device)
        if device == self.device:
            return self
        return SparseLayout._trusted(self.shape, self.block_size,
                                     *(t.to(device) for t in self.index_tensors()))

    def index_tensors(self) -> tuple[Tensor, ...]:
        """``(crow, col, row, ccol, row_t, perm)``, the order the kernels take them."""
        return (self.crow_indices, self.col_indices, self.row_indices, self.ccol_indices,
                self.row_indices_t, self.transpose_perm)

    def to_dense(self) -> Tensor:
        """Bool ``(out_features, in_features)`` mask of the stored entries."""
        bs = self.block_size
        nbr = self.crow_indices.numel() - 1
        nbc = self.ccol_indices.numel() - 1
        grid = torch.zeros(nbr, nbc, dtype=torch.bool, device=self.device)
        grid[self.row_indices.long(), self.col_indices.long()] = True
        if bs > 1:
            grid = grid.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
        return grid[: self.shape[0], : self.shape[1]]

    def __repr__(self) -> str:
        return (f"SparseLayout(shape={self.shape}, block_size={self.block_size}, "
                f"nnz={self.nnz}, density={self.density:.4f})")
