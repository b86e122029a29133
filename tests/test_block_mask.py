"""BlockMask: every constructor against a dense element-level rule, every index field
against the layout, the operators, display, speed, and attention with a block mask."""

from __future__ import annotations

import math
import sys
import time

import pytest
import seed_models
import torch

import mmattn
from mmattn import BlockMask, watts_strogatz_mask

# (Lq, Lk) and (bq, bk) with lengths that are not multiples of the block sizes.
ODD_SHAPES = [
    ((1, 1), (4, 4)), ((7, 7), (2, 2)), ((7, 97), (4, 16)), ((97, 7), (16, 4)),
    ((97, 97), (16, 16)), ((1000, 97), (64, 32)), ((97, 1000), (32, 64)), ((1, 1000), (1, 64)),
    ((40, 40), (8, 8)),
]


def grid(lq: int, lk: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(lq)[:, None], torch.arange(lk)[None, :]


def check_fields(mask: BlockMask, dense: torch.Tensor) -> None:
    """Every field of ``mask`` describes the element mask ``dense`` (Bm, Hm, Lq, Lk).

    Written with plain loops over blocks, independently of the library's vector code.
    """
    (lq, lk), (bq, bk) = mask.seq_lengths, mask.block_size
    nbq, nbk = -(-lq // bq), -(-lk // bk)
    bm, hm = dense.shape[:2]
    assert mask.num_blocks == (nbq, nbk)
    assert tuple(mask.layout.shape) == (bm, hm, nbq, nbk)
    for name in ("layout", "full"):
        t = getattr(mask, name)
        assert t.dtype == torch.bool and t.is_contiguous() and t.shape == mask.layout.shape
    for name in ("partial_index", "kv_num_blocks", "kv_indices", "q_num_blocks", "q_indices"):
        t = getattr(mask, name)
        assert t.dtype == torch.int32 and t.is_contiguous(), name
    assert mask.partial_masks.dtype == torch.bool and mask.partial_masks.is_contiguous()
    # only what a block can cover is stored: (min(bq, Lq), min(bk, Lk))
    pq, pk = min(bq, lq), min(bk, lk)
    assert tuple(mask.partial_masks.shape[1:]) == (pq, pk)
    # each distinct mask once, each one used
    stored = [tuple(m.flatten().tolist()) for m in mask.partial_masks]
    assert len(set(stored)) == len(stored)
    assert sorted(set(mask.partial_index[mask.partial_index >= 0].tolist())) == list(
        range(len(stored)))
    assert tuple(mask.kv_num_blocks.shape) == (bm, hm, nbq)
    assert tuple(mask.kv_indices.shape) == (bm, hm, nbq, nbk)
    assert tuple(mask.q_num_blocks.shape) == (bm, hm, nbk)
    assert tuple(mask.q_indices.shape) == (bm, hm, nbk, nbq)
    layout, full = mask.layout.tolist(), mask.full.tolist()
    partial_index = mask.partial_index.tolist()
    for b in range(bm):
        for h in range(hm):
            for a in range(nbq):
                for c in range(nbk):
                    block = dense[b, h, a * bq:(a + 1) * bq, c * bk:(c + 1) * bk]
                    visible = int(block.sum())
                    assert layout[b][h][a][c] == (visible > 0), (b, h, a, c)
                    assert full[b][h][a][c] == (visible == block.numel()), (b, h, a, c)
                    index = partial_index[b][h][a][c]
                    if 0 < visible < block.numel():
                        stored = mask.partial_masks[index]
                        padded = torch.zeros(pq, pk, dtype=torch.bool)
                        padded[:block.shape[0], :block.shape[1]] = block
                        assert torch.equal(stored, padded), (b, h, a, c)
                    else:
                        assert index == -1, (b, h, a, c)
            for a in range(nbq):
                kept = [c for c in range(nbk) if layout[b][h][a][c]]
                assert mask.kv_num_blocks[b, h, a] == len(kept)
                assert mask.kv_indices[b, h, a].tolist() == kept + [0] * (nbk - len(kept))
            for c in range(nbk):
                kept = [a for a in range(nbq) if layout[b][h][a][c]]
                assert mask.q_num_blocks[b, h, c] == len(kept)
                assert mask.q_indices[b, h, c].tolist() == kept + [0] * (nbq - len(kept))
    assert torch.equal(mask.to_dense(), dense)
    total_blocks = bm * hm * nbq * nbk
    assert mask.density == pytest.approx(sum(map(bool, mask.layout.flatten().tolist()))
                                         / total_blocks if total_blocks else 0.0)
    assert mask.element_density == pytest.approx(dense.float().mean().item()
                                                 if dense.numel() else 0.0)


def as_4d(dense: torch.Tensor) -> torch.Tensor:
    return dense[None, None] if dense.dim() == 2 else dense


# --- constructors against dense rules -------------------------------------------------------

@pytest.mark.parametrize(("lengths", "blocks"), ODD_SHAPES)
def test_from_layout(lengths, blocks):
    (lq, lk), (bq, bk) = lengths, blocks
    generator = torch.Generator().manual_seed(lq * 7 + lk)
    layout = torch.rand(-(-lq // bq), -(-lk // bk), generator=generator) > 0.6
    dense = layout.repeat_interleave(bq, 0).repeat_interleave(bk, 1)[:lq, :lk]
    mask = BlockMask.from_layout(layout, lengths, blocks)
    check_fields(mask, as_4d(dense))
    assert mask.num_partial_blocks == 0


def structured_random_mask(shape, blocks, seed):
    """Blocks that are empty, full or random, so every class occurs."""
    generator = torch.Generator().manual_seed(seed)
    *lead, lq, lk = shape
    bq, bk = blocks
    kind = torch.randint(0, 3, (*lead, -(-lq // bq), -(-lk // bk)), generator=generator)
    kind = kind.repeat_interleave(bq, -2).repeat_interleave(bk, -1)[..., :lq, :lk]
    noise = torch.rand(shape, generator=generator) > 0.5
    return (kind == 2) | ((kind == 1) & noise)


@pytest.mark.parametrize(("lengths", "blocks"), ODD_SHAPES)
def test_from_dense_mask_2d(lengths, blocks):
    dense = structured_random_mask(lengths, blocks, seed=sum(lengths))
    check_fields(BlockMask.from_dense_mask(dense, blocks), as_4d(dense))


@pytest.mark.parametrize("lead", [(1, 1), (2, 1), (1, 3), (2, 3)])
def test_from_dense_mask_batch_heads(lead):
    dense = structured_random_mask((*lead, 37, 29), (8, 4), seed=3)
    mask = BlockMask.from_dense_mask(dense, (8, 4))
    check_fields(mask, dense)
    assert mask.shape == (*lead, 37, 29)


@pytest.mark.parametrize(("lengths", "blocks"), ODD_SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 1.0])
def test_random_follows_the_seed004_rule(lengths, blocks, sparsity):
    (lq, lk), (bq, bk) = lengths, blocks
    draw = torch.rand(-(-lq // bq), -(-lk // bk), generator=torch.Generator().manual_seed(5))
    dense = (draw > sparsity).repeat_interleave(bq, 0).repeat_interleave(bk, 1)[:lq, :lk]
    mask = BlockMask.random(lengths, blocks, sparsity, generator=torch.Generator().manual_seed(5))
    check_fields(mask, as_4d(dense))
    assert torch.equal(BlockMask.random(lengths, blocks, sparsity, seed=5).layout, mask.layout)


@pytest.mark.parametrize(("length", "block", "sparsity"), [(256, 64, 0.8), (512, 32, 0.5),
                                                           (128, 16, 0.9)])
def test_random_reproduces_seed004_draw(length, block, sparsity):
    seed_module = seed_models.SparseAttention(block, sparsity)
    torch.manual_seed(123)
    seed_mask = seed_module.create_sparse_mask(length)
    torch.manual_seed(123)  # the global generator, as the seed module uses it
    ours = BlockMask.random(length, block, sparsity)
    assert torch.equal(ours.to_dense()[0, 0], seed_mask)
    generator = torch.Generator().manual_seed(9)
    expected = torch.rand(length // block, length // block,
                          generator=torch.Generator().manual_seed(9)) > sparsity
    assert torch.equal(BlockMask.random(length, block, sparsity, generator=generator)
                       .layout[0, 0], expected)


def test_random_matches_seed004_attention_where_rows_are_visible():
    """Seed 004's forward equals cross_attention with our mask (rows it leaves NaN: 0)."""
    length, block, heads = 128, 16, 2
    q, k, v = (torch.randn(heads, length, 8, dtype=torch.float64) for _ in range(3))
    torch.manual_seed(4)
    seed_out = seed_models.SparseAttention(block, 0.8)(q, k, v)
    torch.manual_seed(4)
    mask = BlockMask.random(length, block, 0.8)
    ours = mmattn.cross_attention(q[None], k[None], v[None], block_mask=mask,
                                  backend="reference")[0]
    empty_rows = ~mask.to_dense()[0, 0].any(dim=1)
    assert torch.isnan(seed_out[:, empty_rows]).all()
    assert torch.allclose(ours[:, ~empty_rows], seed_out[:, ~empty_rows], atol=1e-12)
    assert bool((ours[:, empty_rows] == 0).all())


@pytest.mark.parametrize(("lengths", "blocks"), ODD_SHAPES)
@pytest.mark.parametrize("window", [0, 1, 5, 40])
def test_local_window(lengths, blocks, window):
    lq, lk = lengths
    i, j = grid(lq, lk)
    centre = ((2 * i + 1) * lk) // (2 * lq)
    dense = (j - centre).abs() <= window
    if lq == lk:
        assert torch.equal(dense, (j - i).abs() <= window)
    check_fields(BlockMask.local_window(lengths, blocks, window), as_4d(dense))


@pytest.mark.parametrize(("lengths", "blocks"), ODD_SHAPES)
def test_global_tokens(lengths, blocks):
    lq, lk = lengths
    i, j = grid(lq, lk)
    for num_global in [(0, 0), (1, 1), (min(5, lq), min(3, lk)), (lq, 0), (0, lk)]:
        dense = (i < num_global[0]) | (j < num_global[1])
        check_fields(BlockMask.global_tokens(lengths, blocks, num_global), as_4d(dense))
    g = min(lq, lk, 2)
    assert torch.equal(BlockMask.global_tokens(lengths, blocks, g).to_dense()[0, 0],
                       (i < g) | (j < g))


@pytest.mark.parametrize(("lengths", "blocks"), ODD_SHAPES)
@pytest.mark.parametrize(("stride", "summary", "causal"),
                         [(8, 1, True), (8, 2, False), (16, 16, True), (5, 0, True),
                          (64, 8, False)])
def test_strided(lengths, blocks, stride, summary, causal):
    lq, lk = lengths
    i, j = grid(lq, lk)
    dense = (i // stride == j // stride) | (j % stride >= stride - summary)
    if causal:
        dense = dense & (j <= i)
    check_fields(BlockMask.strided(lengths, blocks, stride, summary, causal), as_4d(dense))


@pytest.mark.parametrize(("lengths", "blocks"), ODD_SHAPES)
def test_causal_is_sdpa_is_causal(lengths, blocks):
    lq, lk = lengths
    dense = torch.ones(lq, lk, dtype=torch.bool).tril()
    check_fields(BlockMask.causal(lengths, blocks), as_4d(dense))


@pytest.mark.parametrize(("lengths", "blocks"), [((64, 64), (4, 4)), ((97, 50), (8, 8)),
                                                 ((30, 200), (4, 16)), ((5, 5), (8, 8))])
@pytest.mark.parametrize(("window", "num_global", "num_random"),
                         [(1, 1, 2), (0, 0, 3), (2, 2, 0), (0, 0, 100)])
def test_bigbird(lengths, blocks, window, num_global, num_random):
    (lq, lk), (bq, bk) = lengths, blocks
    nbq, nbk = -(-lq // bq), -(-lk // bk)
    mask = BlockMask.bigbird(lengths, blocks, window, num_global, num_random, seed=3)
    a, c = grid(nbq, nbk)
    centre = ((2 * a + 1) * nbk) // (2 * nbq)
    fixed = ((c - centre).abs() <= window) | (a < num_global) | (c < num_global)
    layout = mask.layout[0, 0]
    assert bool((layout | ~fixed).all())  # window and global blocks are kept
    extra = (layout & ~fixed).sum(dim=1)
    expected = torch.clamp((~fixed).sum(dim=1), max=num_random)
    assert torch.equal(extra, expected)  # exactly num_random random blocks where possible
    dense = layout.repeat_interleave(bq, 0).repeat_interleave(bk, 1)[:lq, :lk]
    check_fields(mask, as_4d(dense))
    again = BlockMask.bigbird(lengths, blocks, window, num_global, num_random, seed=3)
    assert torch.equal(again.layout, mask.layout)


def test_bigbird_random_blocks_vary_with_the_seed():
    layouts = {tuple(BlockMask.bigbird(512, 16, 1, 1, 3, seed=s).layout.flatten().tolist())
               for s in range(4)}
    assert len(layouts) == 4


def segment_ids(lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


@pytest.mark.parametrize("block", [(1, 8), 16, (8, 32), 64])
def test_modality_self_attention(block):
    segments = {"text": 77, "image": 197, "audio": 100}
    allow = {"text": ["text", "image"], "image": ["text", "image"], "audio": ["text"]}
    matrix = torch.tensor([[True, True, False], [True, True, False], [True, False, False]])
    ids = segment_ids([77, 197, 100])
    dense = matrix[ids[:, None], ids[None, :]]
    mask = BlockMask.modality(segments, None, allow, block)
    check_fields(mask, as_4d(dense))
    as_pairs = BlockMask.modality(list(segments.items()), list(segments.items()), matrix, block)
    assert torch.equal(as_pairs.to_dense(), mask.to_dense())
    as_lengths = BlockMask.modality([77, 197, 100], None, matrix.tolist(), block)
    assert torch.equal(as_lengths.to_dense(), mask.to_dense())


def test_modality_cross_attention():
    """Text queries over image and audio keys: rectangular, one empty row block."""
    queries = {"text": 13, "summary": 4}
    keys = {"image": 50, "audio": 31}
    allow = {"text": ["image", "audio"], "summary": []}
    dense = torch.zeros(17, 81, dtype=torch.bool)
    dense[:13] = True
    mask = BlockMask.modality(queries, keys, allow, (4, 16))
    check_fields(mask, as_4d(dense))
    only_audio = BlockMask.modality(queries, keys, {"text": ["audio"]}, (4, 16))
    expected = torch.zeros(17, 81, dtype=torch.bool)
    expected[:13, 50:] = True
    check_fields(only_audio, as_4d(expected))


@pytest.mark.parametrize(("lengths", "blocks", "k"), [((256, 256), (16, 16), 4),
                                                      ((97, 97), (8, 8), 3),
                                                      ((200, 300), (16, 16), 5),
                                                      ((300, 100), (16, 8), 2)])
@pytest.mark.parametrize("self_loops", [True, False])
def test_watts_strogatz_blocks(lengths, blocks, k, self_loops):
    (lq, lk), (bq, bk) = lengths, blocks
    nbq, nbk = -(-lq // bq), -(-lk // bk)
    layout = watts_strogatz_mask(nbq, nbk, k, 0.3, seed=1)
    if self_loops:
        centres = ((2 * torch.arange(nbq) + 1) * nbk) // (2 * nbq)
        layout[torch.arange(nbq), centres] = True
        if nbq == nbk:
            assert torch.equal(centres, torch.arange(nbq))
    dense = layout.repeat_interleave(bq, 0).repeat_interleave(bk, 1)[:lq, :lk]
    mask = BlockMask.watts_strogatz(lengths, blocks, k, 0.3, seed=1, self_loops=self_loops)
    check_fields(mask, as_4d(dense))


@pytest.mark.parametrize("lengths", [(0, 0), (0, 5), (5, 0)])
def test_zero_lengths(lengths):
    for mask in (BlockMask.causal(lengths, 4), BlockMask.local_window(lengths, 4, 1),
                 BlockMask.random(lengths, 4), BlockMask.global_tokens(lengths, 4, 0),
                 BlockMask.strided(lengths, 4, 2), BlockMask.bigbird(lengths, 4, seed=0),
                 BlockMask.watts_strogatz(lengths, 4, 0, 0.0)):
        check_fields(mask, torch.zeros(1, 1, *lengths, dtype=torch.bool))
        assert "BlockMask(" in repr(mask)


# --- operators ----------------------------------------------------------------------------

@pytest.mark.parametrize(("lengths", "blocks"), ODD_SHAPES)
def test_or_and_match_dense(lengths, blocks):
    local = BlockMask.local_window(lengths, blocks, 3)
    causal = BlockMask.causal(lengths, blocks)
    glob = BlockMask.global_tokens(lengths, blocks, (min(2, lengths[0]), min(2, lengths[1])))
    rand = BlockMask.random(lengths, blocks, 0.5, seed=1)
    for a, b in ((local, causal), (glob, local), (rand, causal), (rand, glob)):
        check_fields(a | b, a.to_dense() | b.to_dense())
        check_fields(a & b, a.to_dense() & b.to_dense())


def test_partial_blocks_can_become_full_or_empty():
    lengths, blocks = (8, 10), (4, 5)
    left = BlockMask.from_dense_mask(grid(8, 10)[1].expand(8, 10) % 5 < 2, blocks)
    right = BlockMask.from_dense_mask(grid(8, 10)[1].expand(8, 10) % 5 >= 2, blocks)
    assert left.num_partial_blocks == right.num_partial_blocks == 4
    union, meet = left | right, left & right
    assert bool(union.full.all()) and union.num_partial_blocks == 0
    assert not bool(meet.layout.any()) and meet.num_partial_blocks == 0
    check_fields(union, torch.ones(1, 1, *lengths, dtype=torch.bool))
    check_fields(meet, torch.zeros(1, 1, *lengths, dtype=torch.bool))


def test_operators_broadcast_batch_and_heads():
    per_batch = BlockMask.from_dense_mask(structured_random_mask((2, 1, 21, 30), (4, 8), 1),
                                          (4, 8))
    per_head = BlockMask.from_dense_mask(structured_random_mask((1, 3, 21, 30), (4, 8), 2),
                                         (4, 8))
    shared = BlockMask.causal((21, 30), (4, 8))
    for a, b in ((per_batch, per_head), (per_head, shared), (shared, per_batch)):
        for union in (True, False):
            combined = a | b if union else a & b
            expected = a.to_dense() | b.to_dense() if union else a.to_dense() & b.to_dense()
            check_fields(combined, expected)


def test_operators_reject_mismatches():
    a = BlockMask.causal(16, 4)
    with pytest.raises(ValueError, match="seq_lengths"):
        a | BlockMask.causal(17, 4)
    with pytest.raises(ValueError, match="block_size"):
        a & BlockMask.causal(16, 8)
    two = BlockMask.from_dense_mask(torch.ones(2, 1, 16, 16, dtype=torch.bool), 4)
    three = BlockMask.from_dense_mask(torch.ones(3, 1, 16, 16, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="broadcast"):
        two | three
    with pytest.raises(TypeError):
        a | torch.ones(16, 16, dtype=torch.bool)


# --- conversions, display -----------------------------------------------------------------

def test_to_device_and_immutability():
    mask = BlockMask.local_window((37, 50), (8, 8), 4)
    assert mask.to("cpu") is mask
    # A mask needs its data (counts, indices): the meta device is refused, by name.
    with pytest.raises(ValueError, match="device is on the meta device"):
        mask.to("meta")
    with pytest.raises(AttributeError):
        mask.layout = mask.full


@pytest.mark.gpu
def test_to_cuda_round_trip():
    mask = BlockMask.strided((100, 90), (16, 16), 8, 2)
    on_gpu = mask.to("cuda")
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.to_dense().cpu(), mask.to_dense())
    check_fields(BlockMask.from_dense_mask(mask.to_dense().cuda(), (16, 16)).to("cpu"),
                 mask.to_dense())


def test_repr_draws_the_layout():
    mask = BlockMask.causal((10, 13), (4, 3))
    text = repr(mask)
    lines = text.splitlines()
    assert lines[0].startswith("BlockMask(seq_lengths=(10, 13), block_size=(4, 3)")
    assert "density=0.6000" in lines[0] and "partial_blocks=5" in lines[0]
    assert lines[2:] == ["▒▒···", "█▒▒··", "███▒·"]


def test_repr_downsamples_large_grids():
    mask = BlockMask.causal(16384, 64)  # 256 x 256 blocks
    lines = repr(mask).splitlines()
    assert "one character per 8x4 blocks" in lines[1]
    grid_lines = lines[2:]
    assert len(grid_lines) == 32 and {len(line) for line in grid_lines} == {64}
    assert grid_lines[-1].startswith("█") and grid_lines[0].endswith("·")
    per_head = BlockMask.from_dense_mask(torch.ones(2, 3, 8, 8, dtype=torch.bool), 4)
    assert "batch 0, head 0" in repr(per_head)


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    for i, mask in enumerate((BlockMask.strided(64, 8, 16, 2),
                              BlockMask.random(4096, 2, seed=0))):  # element / block level
        path = tmp_path / f"mask{i}.png"
        ax = mask.plot(path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert ax.get_title()
    with pytest.raises(ValueError, match="batch"):
        mask.plot(tmp_path / "x.png", batch=1)


def test_plot_without_matplotlib_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.colors", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        BlockMask.causal(8, 4).plot()


def test_build_time_256x256_blocks():
    """Building a 256 x 256-block mask (L = 16384, block 64) must cost milliseconds."""
    length, block = 16384, 64
    builders = {
        "random": lambda: BlockMask.random(length, block, 0.8, seed=0),
        "causal": lambda: BlockMask.causal(length, block),
        "local_window": lambda: BlockMask.local_window(length, block, 256),
        "global_tokens": lambda: BlockMask.global_tokens(length, block, 64),
        "bigbird": lambda: BlockMask.bigbird(length, block, 1, 1, 3, seed=0),
        "modality": lambda: BlockMask.modality(
            {"text": 4000, "image": 8000, "audio": 4384}, None,
            {"text": ["text", "image"], "image": ["text", "image"], "audio": ["text"]}, block),
        "watts_strogatz": lambda: BlockMask.watts_strogatz(length, block, 8, 0.3, seed=0),
        "strided": lambda: BlockMask.strided(length, block, 256, 64),
    }
    for name, build in builders.items():
        build()  # warm-up
        times = []
        for _ in range(5):
            start = time.perf_counter()
            mask = build()
            times.append(time.perf_counter() - start)
        best = min(times)
        print(f"BlockMask.{name} 16384^2 block 64: {best * 1e3:.1f} ms")
        assert mask.num_blocks == (256, 256)
        # Target < 50 ms (2-20 ms on a quiet 2-core machine). The bound is generous because
        # torch's 2-thread ops stall when other processes hold the second core.
        assert best < 2.0, name


# --- attention with a block mask ----------------------------------------------------------

def float64_attention(q, k, v, visible):
    """Masked softmax attention in float64; rows with no visible key give 0."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~visible, -math.inf)
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v


@pytest.mark.parametrize("lead", [(1, 1), (2, 1), (1, 3), (2, 3)])
def test_reference_attention_with_block_mask(lead):
    b, h, lq, lk, d = 2, 3, 37, 50, 8
    q = torch.randn(b, h, lq, d, dtype=torch.float64)
    k = torch.randn(b, h, lk, d, dtype=torch.float64)
    v = torch.randn(b, h, lk, 5, dtype=torch.float64)
    dense = structured_random_mask((*lead, lq, lk), (8, 16), seed=7)
    mask = BlockMask.from_dense_mask(dense, (8, 16)) | BlockMask.causal((lq, lk), (8, 16))
    mask = mask & BlockMask.local_window((lq, lk), (8, 16), 20)
    hide_row_3 = torch.ones(lq, lk, dtype=torch.bool)
    hide_row_3[3] = False  # a query row with no visible key
    mask = mask & BlockMask.from_dense_mask(hide_row_3, (8, 16))
    visible = mask.to_dense()
    out = mmattn.cross_attention(q, k, v, block_mask=mask, backend="reference")
    via_dense = mmattn.cross_attention(q, k, v, attn_mask=visible, backend="reference")
    assert torch.equal(out, via_dense)
    assert torch.allclose(out, float64_attention(q, k, v, visible), atol=1e-12)
    empty_rows = ~visible.expand(b, h, lq, lk).any(dim=-1)
    assert bool(empty_rows.any())
    assert bool((out[empty_rows] == 0).all()) and not bool(out.isnan().any())


def test_reference_attention_block_mask_combines_with_other_masks():
    q, k, v = (torch.randn(2, 2, 33, 8, dtype=torch.float64) for _ in range(3))
    mask = BlockMask.strided(33, 8, 8, 2, causal=False)
    padding = torch.zeros(2, 33, dtype=torch.bool)
    padding[1, 20:] = True
    out = mmattn.cross_attention(q, k, v, block_mask=mask, key_padding_mask=padding,
                                 is_causal=True, backend="reference")
    visible = mask.to_dense() & ~padding[:, None, None, :] & torch.ones(33, 33).tril().bool()
    assert torch.allclose(out, float64_attention(q, k, v, visible), atol=1e-12)


# --- validation ---------------------------------------------------------------------------

@pytest.mark.parametrize(("build", "error", "name"), [
    (lambda: BlockMask.causal(16, 0), ValueError, "block_size"),
    (lambda: BlockMask.causal(16, (4, -1)), ValueError, "block_size"),
    (lambda: BlockMask.causal(-1, 4), ValueError, "seq_lengths"),
    (lambda: BlockMask.causal(16.0, 4), TypeError, "seq_lengths"),
    (lambda: BlockMask.causal((16, 16, 16), 4), TypeError, "seq_lengths"),
    (lambda: BlockMask.from_layout(torch.ones(3, 4, dtype=torch.bool), 16, 4), ValueError,
     "layout"),
    (lambda: BlockMask.from_layout(torch.ones(4, 4), 16, 4), TypeError, "layout"),
    (lambda: BlockMask.from_layout(torch.ones(2, 4, 4, dtype=torch.bool), 16, 4), ValueError,
     "layout"),
    (lambda: BlockMask.from_dense_mask(torch.ones(3, 16, 16, dtype=torch.bool), 4),
     ValueError, "mask"),
    (lambda: BlockMask.from_dense_mask(torch.ones(16, 16), 4), TypeError, "mask"),
    (lambda: BlockMask.random(16, 4, 1.5), ValueError, "sparsity_factor"),
    (lambda: BlockMask.random(16, 4, seed=1, generator=torch.Generator()), ValueError,
     "seed or generator"),
    (lambda: BlockMask.random(16, 4, seed=1.5), TypeError, "seed"),
    (lambda: BlockMask.local_window(16, 4, -1), ValueError, "window"),
    (lambda: BlockMask.global_tokens(16, 4, 17), ValueError, "num_global"),
    (lambda: BlockMask.strided(16, 4, 0), ValueError, "stride"),
    (lambda: BlockMask.strided(16, 4, 4, 5), ValueError, "num_summary"),
    (lambda: BlockMask.bigbird(16, 4, -1), ValueError, "window_blocks"),
    (lambda: BlockMask.watts_strogatz(16, 4, 5, 0.1), ValueError, "k"),
    (lambda: BlockMask.watts_strogatz(16, 4, 2, 1.1), ValueError, "beta"),
    (lambda: BlockMask.modality({"a": 4}, None, {"b": ["a"]}, 2), ValueError, "allow"),
    (lambda: BlockMask.modality({"a": 4}, None, {"a": ["b"]}, 2), ValueError, "allow"),
    (lambda: BlockMask.modality({"a": 4}, None, {"a": "a"}, 2), TypeError, "allow"),
    (lambda: BlockMask.modality({"a": 4, "b": 2}, None, [[True]], 2), ValueError, "allow"),
    (lambda: BlockMask.modality({"a": 4}, None, [[1]], 2), TypeError, "allow"),
    (lambda: BlockMask.modality({"a": -4}, None, [[True]], 2), ValueError, "query_segments"),
    (lambda: BlockMask.modality({}, None, [[True]], 2), ValueError, "query_segments"),
    (lambda: BlockMask.modality(4, None, [[True]], 2), TypeError, "query_segments"),
    (lambda: BlockMask.modality([4], ["x"], [[True]], 2), TypeError, "key_segments"),
])
def test_constructors_reject_bad_input(build, error, name):
    with pytest.raises(error, match=name):
        build()


def test_partial_masks_cover_only_the_sequence():
    """Issue 11: a block size of 20000 over a 100x100 mask stored 400 MB of partial masks.
    Now (min(bq, Lq), min(bk, Lk)) per stored mask."""
    dense = torch.rand(100, 100, generator=torch.Generator().manual_seed(0)) > 0.5
    big = BlockMask.from_dense_mask(dense, 20000)
    assert tuple(big.partial_masks.shape) == (1, 100, 100)
    assert torch.equal(big.to_dense()[0, 0], dense)
    assert tuple(BlockMask.causal(100, 20000).partial_masks.shape) == (1, 100, 100)
    tall = BlockMask.from_dense_mask(dense, (20000, 7))
    assert tuple(tall.partial_masks.shape[1:]) == (100, 7) and tall.num_stored_masks <= 15
    check_fields(tall, as_4d(dense))
    union = big | BlockMask.causal(100, 20000)
    assert tuple(union.partial_masks.shape[1:]) == (100, 100)
    assert torch.equal(union.to_dense()[0, 0], dense | torch.ones(100, 100).tril().bool())
    assert "stored_masks=1" in repr(big)
    assert big.plot().get_images()[0].get_array().shape == (100, 100)


def test_identical_partial_masks_are_stored_once():
    """Issue 11: strided at L=16384 stored 34 MB (8320 partial blocks of 64x64)."""
    mask = BlockMask.strided(16384, 64, 256)
    assert mask.num_partial_blocks == 8320
    assert mask.num_stored_masks <= 4
    assert mask.partial_masks.numel() <= 4 * 64 * 64  # bytes: 16 KB instead of 34 MB
    small = BlockMask.strided(1000, 64, 256)  # same rule, checked element by element
    rows, cols = grid(1000, 1000)
    rule = ((rows // 256 == cols // 256) | (cols % 256 >= 255)) & (cols <= rows)
    check_fields(small, as_4d(rule))
    # masks handed to the public constructor are deduplicated too
    doubled = torch.cat([small.partial_masks, small.partial_masks])
    rebuilt = BlockMask(small.seq_lengths, small.block_size, small.layout, small.full,
                        small.partial_index + small.num_stored_masks * (small.partial_index
                                                                        >= 0).int(),
                        doubled)
    assert rebuilt.num_stored_masks == small.num_stored_masks
    assert torch.equal(rebuilt.to_dense(), small.to_dense())


def test_public_constructor_takes_block_sized_partial_masks():
    good = BlockMask.causal((10, 13), (16, 3))  # bq > Lq: stored as (10, 3)
    assert tuple(good.partial_masks.shape[1:]) == (10, 3)
    padded = torch.zeros(good.num_stored_masks, 16, 3, dtype=torch.bool)
    padded[:, :10] = good.partial_masks
    rebuilt = BlockMask((10, 13), (16, 3), good.layout, good.full, good.partial_index, padded)
    assert torch.equal(rebuilt.partial_masks, good.partial_masks)
    padded[0, 12, 0] = True  # row 12 does not exist
    with pytest.raises(ValueError, match="past the sequence lengths"):
        BlockMask((10, 13), (16, 3), good.layout, good.full, good.partial_index, padded)


def test_public_constructor_checks_consistency():
    good = BlockMask.causal((10, 13), (4, 3))
    fields = dict(layout=good.layout, full=good.full, partial_index=good.partial_index,
                  partial_masks=good.partial_masks)
    rebuilt = BlockMask((10, 13), (4, 3), **fields)
    check_fields(rebuilt, good.to_dense())

    def broken(**change):
        return lambda: BlockMask((10, 13), (4, 3), **{**fields, **change})

    full_outside = good.full.clone()
    full_outside[0, 0, 0, 4] = True
    wrong_index = good.partial_index.clone()
    wrong_index[0, 0, 2, 0] = 0
    out_of_range = good.partial_masks.clone()
    last = int(good.partial_index[0, 0, 2, 3])
    out_of_range[last, 3, 0] = True  # row 11 does not exist (Lq = 10)
    for build, match in [
        (broken(full=full_outside), "full"),
        (broken(partial_index=wrong_index), "partial_index"),
        (broken(partial_masks=out_of_range), "past the sequence lengths"),
        (broken(layout=good.layout.int()), "layout"),
        (broken(partial_masks=good.partial_masks[:, :2]), "partial_masks"),
        (broken(partial_masks=torch.zeros_like(good.partial_masks)), "no visible element"),
        (lambda: BlockMask((10, 16), (4, 3), **fields), "layout"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            build()


def test_gallery_example_runs(tmp_path):
    pytest.importorskip("matplotlib")
    import runpy
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "masks_gallery.py"
    namespace = runpy.run_path(str(example))
    panels = namespace["gallery"]()
    assert len(panels) == 8 and all(isinstance(mask, BlockMask) for _, mask in panels)
    output = tmp_path / "gallery.png"
    namespace["main"](output)
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
