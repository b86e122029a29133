"""mmattn.nn.BlockSparseAttention against seed 004's SparseAttention (the oracle)."""

from __future__ import annotations

import pytest
import seed_models
import torch

import mmattn
from mmattn import BlockMask
from mmattn.nn import BlockSparseAttention

B, L, D, BLOCK = 2, 128, 8, 16  # 8 x 8 blocks


def _qkv(dtype=torch.float64, requires_grad=False):
    gen = torch.Generator().manual_seed(11)
    return [torch.randn(B, L, D, generator=gen, dtype=dtype).requires_grad_(requires_grad)
            for _ in range(3)]


def _compare_rows(out: torch.Tensor, ref: torch.Tensor) -> int:
    """Rows where the seed gives NaN (no visible key) must be 0 here; others equal.
    Returns the number of such empty rows."""
    empty = torch.isnan(ref).all(-1)
    assert not torch.isnan(out).any()
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    torch.testing.assert_close(out[~empty], ref[~empty], rtol=1e-10, atol=1e-10)
    return int(empty.sum())


@pytest.mark.parametrize("rng_seed", [0, 1, 2])
def test_same_random_blocks_as_seed_after_manual_seed(rng_seed: int) -> None:
    q, k, v = _qkv()
    seed_module, ours = seed_models.SparseAttention(BLOCK, 0.8), BlockSparseAttention(BLOCK, 0.8)
    torch.manual_seed(rng_seed)
    ref = seed_module(q, k, v)
    next_draw_seed = torch.rand(1)
    torch.manual_seed(rng_seed)
    out = ours(q, k, v)
    next_draw_ours = torch.rand(1)
    _compare_rows(out, ref)
    assert torch.equal(next_draw_ours, next_draw_seed)  # the same draws were consumed
    torch.manual_seed(rng_seed)
    expected = seed_module.create_sparse_mask(L)
    torch.manual_seed(rng_seed)
    assert torch.equal(ours.create_sparse_mask(L), expected)


def test_fixed_block_mask_matches_seed_and_its_empty_rows_are_zero() -> None:
    q, k, v = _qkv()
    fixed = BlockMask.random(L, BLOCK, 0.8, seed=3)  # a fresh generator seeded 3
    ours = BlockSparseAttention(block_mask=fixed)
    torch.manual_seed(3)  # the global generator seeded 3 draws the same layout
    ref = seed_models.SparseAttention(BLOCK, 0.8)(q, k, v)
    out = ours(q, k, v)
    assert _compare_rows(out, ref) > 0  # this layout has rows with no kept block
    torch.testing.assert_close(ours(q, k, v), out)  # fixed: the same on every call


def test_gradients_match_seed() -> None:
    q, k, v = _qkv(requires_grad=True)
    torch.manual_seed(5)
    ref = seed_models.SparseAttention(BLOCK, 0.5)(q, k, v)
    assert not torch.isnan(ref).any()  # this draw leaves no query row empty
    grads_ref = torch.autograd.grad((ref * ref).sum(), (q, k, v))
    torch.manual_seed(5)
    out = BlockSparseAttention(BLOCK, 0.5)(q, k, v)
    grads = torch.autograd.grad((out * out).sum(), (q, k, v))
    torch.testing.assert_close(out, ref)
    for mine, theirs in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(mine, theirs)


def test_generator_argument_and_per_head_inputs() -> None:
    q = torch.randn(2, 3, 64, 8)
    ours = BlockSparseAttention(16, 0.5, generator=torch.Generator().manual_seed(7))
    out = ours(q, q, q)
    assert out.shape == (2, 3, 64, 8)
    expected = mmattn.cross_attention(q, q, q, block_mask=BlockMask.random(64, 16, 0.5, seed=7))
    torch.testing.assert_close(out, expected)


def test_rectangular_and_uneven_lengths() -> None:
    """Extensions over the seed (which needs Lq == Lk, multiples of block_size)."""
    q, kv = torch.randn(2, 40, 8), torch.randn(2, 70, 8)
    mask = BlockMask.local_window((40, 70), 16, window=20)
    out = BlockSparseAttention(16)(q, kv, kv, block_mask=mask)
    allowed = mask.to_dense()[0, 0]
    scores = (q @ kv.transpose(1, 2) / 8 ** 0.5).masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ kv)
    assert BlockSparseAttention(16, 0.3)(q, kv, kv).shape == (2, 40, 8)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="block_size"):
        BlockSparseAttention(0)
    with pytest.raises(ValueError, match="sparsity_factor"):
        BlockSparseAttention(16, 1.5)
    with pytest.raises(TypeError, match="block_mask"):
        BlockSparseAttention(block_mask=torch.ones(4, 4, dtype=torch.bool))
    q = torch.randn(1, 32, 8)
    with pytest.raises(ValueError, match="block_mask covers"):
        BlockSparseAttention(block_mask=BlockMask.random(64, 16, 0.5, seed=0))(q, q, q)
    with pytest.raises(ValueError, match="3-D"):
        BlockSparseAttention()(q[0], q[0], q[0])


def test_convert_swaps_seed_sparse_attention_and_back() -> None:
    model = torch.nn.Sequential(seed_models.SparseAttention(BLOCK, 0.7))
    report = mmattn.convert(model)
    assert [(s.path, s.to_type) for s in report] == [("0", "mmattn.nn.BlockSparseAttention")]
    assert model[0].block_size == BLOCK and model[0].sparsity_factor == 0.7
    q, k, v = _qkv()
    torch.manual_seed(4)
    out = model[0](q, k, v)
    assert mmattn.revert(model).swapped and type(model[0]) is seed_models.SparseAttention
    torch.manual_seed(4)
    _compare_rows(out, model[0](q, k, v))
    mmattn.convert(model)
    model[0].block_mask = BlockMask.causal(L, BLOCK)
    kept = mmattn.revert(model)
    assert len(kept) == 0 and "fixed block_mask" in kept.skipped[0][2]
    kept = mmattn.revert(torch.nn.Sequential(BlockSparseAttention()))
    assert len(kept) == 0 and "no original class" in kept.skipped[0][2]
