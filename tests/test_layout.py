"""SparseLayout: CSR and transpose arrays against masks built independently."""

from __future__ import annotations

import pytest
import torch

from mmattn import SparseLayout, watts_strogatz_mask


def random_mask(rows: int, cols: int, density: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=generator) < density
    if rows > 2:
        mask[rows // 2] = False  # an empty row
    if cols > 2:
        mask[:, cols // 3] = False  # an empty column
    return mask


def block_grid(mask: torch.Tensor, bs: int) -> torch.Tensor:
    """Which (bs x bs) blocks hold a True entry, by loops (independent of the layout code)."""
    rows, cols = mask.shape
    grid = torch.zeros(-(-rows // bs), -(-cols // bs), dtype=torch.bool)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            grid[i, j] = bool(mask[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs].any())
    return grid


def check_layout(layout: SparseLayout, grid: torch.Tensor) -> None:
    """Every index array of ``layout`` describes the block grid ``grid``."""
    nbr, nbc = grid.shape
    for t in layout.index_tensors():
        assert t.dtype == torch.int32 and t.is_contiguous()
    crow, col, row, ccol, row_t, perm = (t.long() for t in layout.index_tensors())
    # CSR: row pointers from the row counts, sorted columns per row.
    assert crow.tolist() == [0, *torch.cumsum(grid.sum(1), 0).tolist()]
    expected_rows, expected_cols = grid.nonzero(as_tuple=True)  # row-major order
    assert torch.equal(row, expected_rows) and torch.equal(col, expected_cols)
    # CSC of the layout == CSR of the transposed grid.
    t_rows, t_cols = grid.t().nonzero(as_tuple=True)
    assert ccol.tolist() == [0, *torch.cumsum(grid.sum(0), 0).tolist()]
    assert torch.equal(row_t, t_cols)
    # transpose_perm: the t-th entry in column-major order is CSR entry perm[t].
    assert sorted(perm.tolist()) == list(range(layout.nnz))
    assert torch.equal(row[perm], t_cols) and torch.equal(col[perm], t_rows)
    assert layout.nnz == int(grid.sum())
    assert crow.numel() == nbr + 1 and ccol.numel() == nbc + 1


@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (1, 7), (7, 1), (7, 7), (97, 7), (7, 97),
                                            (97, 97), (64, 48)])
@pytest.mark.parametrize("density", [0.0, 0.2, 1.0])
def test_from_mask(rows, cols, density):
    mask = random_mask(rows, cols, density, seed=rows * 1000 + cols)
    layout = SparseLayout.from_mask(mask)
    check_layout(layout, mask)
    assert torch.equal(layout.to_dense(), mask)
    assert layout.shape == (rows, cols) and layout.block_size == 1
    assert layout.density == pytest.approx(mask.float().mean().item())
    assert layout.num_parameters == int(mask.sum())


@pytest.mark.parametrize(("rows", "cols", "bs"), [(1, 1, 4), (7, 7, 2), (97, 7, 3), (7, 97, 8),
                                                  (97, 97, 16), (64, 48, 16), (5, 9, 32)])
def test_from_mask_blocks(rows, cols, bs):
    mask = random_mask(rows, cols, 0.05, seed=rows + cols + bs)
    layout = SparseLayout.from_mask(mask, block_size=bs)
    grid = block_grid(mask, bs)
    check_layout(layout, grid)
    dense = layout.to_dense()
    assert dense.shape == (rows, cols)
    expected = grid.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:rows, :cols]
    assert torch.equal(dense, expected)
    assert bool((dense | ~mask).all())  # every True entry lies in a kept block
    assert layout.num_parameters == layout.nnz * bs * bs


def test_from_coo_merges_duplicates_and_checks_range():
    layout = SparseLayout.from_coo([2, 0, 2, 1], [1, 3, 1, 0], (3, 4))
    grid = torch.zeros(3, 4, dtype=torch.bool)
    grid[2, 1] = grid[0, 3] = grid[1, 0] = True
    check_layout(layout, grid)
    empty = SparseLayout.from_coo([], [], (4, 5))
    check_layout(empty, torch.zeros(4, 5, dtype=torch.bool))
    assert empty.density == 0.0 and not bool(empty.to_dense().any())
    with pytest.raises(ValueError, match="out of range"):
        SparseLayout.from_coo([3], [0], (3, 4))
    with pytest.raises(ValueError, match="same length"):
        SparseLayout.from_coo([0, 1], [0], (3, 4))
    with pytest.raises(ValueError, match="shape"):
        SparseLayout.from_coo([], [], (-1, 4))


def test_from_mask_rejects_bad_input():
    with pytest.raises(ValueError, match="mask"):
        SparseLayout.from_mask(torch.ones(2, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="block_size"):
        SparseLayout.from_mask(torch.ones(2, 2, dtype=torch.bool), block_size=0)


@pytest.mark.parametrize(("out_features", "in_features", "k", "beta"),
                         [(192, 192, 6, 0.3), (97, 97, 4, 1.0), (64, 200, 6, 0.5),
                          (200, 64, 5, 0.2), (7, 7, 7, 0.5), (1, 1, 0, 0.0)])
def test_from_watts_strogatz(out_features, in_features, k, beta):
    layout = SparseLayout.from_watts_strogatz(out_features, in_features, k, beta, seed=42)
    mask = watts_strogatz_mask(out_features, in_features, k, beta, seed=42)
    check_layout(layout, mask)
    assert torch.equal(layout.to_dense(), mask)


@pytest.mark.parametrize(("out_features", "in_features", "bs", "k"),
                         [(192, 192, 16, 4), (100, 97, 8, 4), (97, 300, 16, 3), (30, 30, 64, 1)])
def test_from_watts_strogatz_blocks(out_features, in_features, bs, k):
    layout = SparseLayout.from_watts_strogatz(out_features, in_features, k, 0.4, seed=1,
                                              block_size=bs)
    grid = watts_strogatz_mask(-(-out_features // bs), -(-in_features // bs), k, 0.4, seed=1)
    check_layout(layout, grid)
    dense = layout.to_dense()
    expected = grid.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    assert torch.equal(dense, expected[:out_features, :in_features])


@pytest.mark.parametrize(("args", "kwargs", "error", "name"), [
    ((0, 8, 2, 0.1), {}, ValueError, "out_features"),
    ((8, 8.0, 2, 0.1), {}, TypeError, "in_features"),
    ((8, 8, 2, 0.1), {"block_size": 0}, ValueError, "block_size"),
    ((8, 8, 3, 0.1), {"block_size": 4}, ValueError, "k"),  # k counts blocks: only 2 here
    ((8, 8, 2, 1.1), {}, ValueError, "beta"),
])
def test_from_watts_strogatz_rejects_bad_input(args, kwargs, error, name):
    with pytest.raises(error, match=rf"^{name}\b"):
        SparseLayout.from_watts_strogatz(*args, **kwargs)


def test_to_device_moves_every_index_tensor():
    layout = SparseLayout.from_mask(random_mask(9, 13, 0.3, seed=0), block_size=2)
    assert layout.to("cpu") is layout
    moved = layout.to("meta")
    assert moved.device.type == "meta" and moved.shape == layout.shape
    for before, after in zip(layout.index_tensors(), moved.index_tensors(), strict=True):
        assert after.device.type == "meta" and after.shape == before.shape
        assert after.dtype == torch.int32


@pytest.mark.gpu
def test_to_cuda_round_trip():
    layout = SparseLayout.from_watts_strogatz(100, 60, 6, 0.3, seed=0)
    on_gpu = layout.to("cuda")
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.to_dense().cpu(), layout.to_dense())
    back = on_gpu.to("cpu")
    for a, b in zip(back.index_tensors(), layout.index_tensors(), strict=True):
        assert torch.equal(a, b)


# --- hand-built layouts are checked at construction (issue 11) ----------------------------

def _fields(layout: SparseLayout) -> dict[str, torch.Tensor]:
    names = ("crow_indices", "col_indices", "row_indices", "ccol_indices", "row_indices_t",
             "transpose_perm")
    return {name: t.clone() for name, t in zip(names, layout.index_tensors(), strict=True)}


def _rebuild(layout: SparseLayout, **change) -> SparseLayout:
    return SparseLayout(layout.shape, layout.block_size, **{**_fields(layout), **change})


def test_hand_built_layout_equal_to_a_checked_one_is_accepted():
    layout = SparseLayout.from_mask(random_mask(9, 13, 0.4, seed=3), block_size=2)
    again = _rebuild(layout)
    check_layout(again, block_grid(random_mask(9, 13, 0.4, seed=3), 2))
    empty = SparseLayout.from_coo([], [], (0, 5))
    assert _rebuild(empty).nnz == 0


def test_wrong_transpose_perm_is_rejected():
    """In range and a permutation, but not column-major order: the CPU kernel would give
    a silently wrong dX."""
    layout = SparseLayout.from_mask(random_mask(8, 8, 0.5, seed=1))
    perm = layout.transpose_perm.clone()
    perm[[0, 1]] = perm[[1, 0]]
    row_t = layout.row_indices[perm.long()].clone()  # consistent with the wrong perm
    with pytest.raises(ValueError, match=r"^transpose_perm"):
        _rebuild(layout, transpose_perm=perm, row_indices_t=row_t)
    repeated = layout.transpose_perm.clone()
    repeated[1] = repeated[0]
    with pytest.raises(ValueError, match=r"^transpose_perm must be a permutation"):
        _rebuild(layout, transpose_perm=repeated)
    with pytest.raises(ValueError, match=r"^row_indices_t"):
        _rebuild(layout, row_indices_t=layout.row_indices_t.flip(0).contiguous())


def test_duplicate_column_in_a_row_is_rejected():
    """The CPU kernel summed duplicates, the reference overwrote them."""
    crow = torch.tensor([0, 2, 3], dtype=torch.int32)
    col = torch.tensor([1, 1, 0], dtype=torch.int32)
    rows = torch.tensor([0, 0, 1], dtype=torch.int32)
    ccol = torch.tensor([0, 1, 3, 3], dtype=torch.int32)
    perm = torch.tensor([2, 0, 1], dtype=torch.int32)
    rows_t = torch.tensor([1, 0, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^col_indices has a duplicate column in row 0"):
        SparseLayout((2, 3), 1, crow, col, rows, ccol, rows_t, perm)
    unsorted = torch.tensor([2, 1, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^col_indices has unsorted columns"):
        SparseLayout((2, 3), 1, crow, unsorted, rows, ccol, rows_t, perm)


def test_negative_or_out_of_range_column_is_rejected():
    """A negative column raised on CPU but wrapped silently on the reference path."""
    layout = SparseLayout.from_mask(random_mask(5, 6, 0.5, seed=2))
    for bad in (-1, 6):
        col = layout.col_indices.clone()
        col[0] = bad
        with pytest.raises(ValueError, match=r"^col_indices must be in \[0, 6\)"):
            _rebuild(layout, col_indices=col)


@pytest.mark.parametrize(("field", "edit", "error", "match"), [
    ("crow_indices", lambda t: t.flip(0).contiguous(), ValueError, "^crow_indices"),
    ("crow_indices", lambda t: t[:-1].contiguous(), ValueError, "^crow_indices must have"),
    ("crow_indices", lambda t: t.long(), TypeError, "^crow_indices must be an int32"),
    ("row_indices", lambda t: t.flip(0).contiguous(), ValueError, "^row_indices must be"),
    ("ccol_indices", lambda t: t.flip(0).contiguous(), ValueError, "^ccol_indices"),
    ("col_indices", lambda t: t.view(1, -1), ValueError, "^col_indices must be a contiguous"),
    ("transpose_perm", lambda t: t[:-1].contiguous(), ValueError, "^transpose_perm must have"),
])
def test_inconsistent_index_arrays_name_the_field(field, edit, error, match):
    layout = SparseLayout.from_mask(random_mask(7, 9, 0.5, seed=4))
    with pytest.raises(error, match=match):
        _rebuild(layout, **{field: edit(getattr(layout, field))})


def test_layout_arguments_are_checked():
    layout = SparseLayout.from_mask(random_mask(4, 4, 0.5, seed=0))
    with pytest.raises(ValueError, match=r"^block_size must be >= 1"):
        SparseLayout.from_coo([0], [0], (4, 4), block_size=0)  # was a ZeroDivisionError
    with pytest.raises(TypeError, match=r"^block_size must be an int"):
        SparseLayout.from_coo([0], [0], (4, 4), block_size=2.0)
    with pytest.raises(TypeError, match=r"^shape"):
        SparseLayout.from_coo([0], [0], 4)
    with pytest.raises(ValueError, match=r"^block_size"):
        SparseLayout(layout.shape, 0, *layout.index_tensors())
    with pytest.raises(TypeError, match=r"^shape"):
        SparseLayout([4, 4], 1, *layout.index_tensors())
