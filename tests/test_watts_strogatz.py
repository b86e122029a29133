"""Watts-Strogatz graphs and masks: exact agreement with networkx, seed 002, speed, rules."""

from __future__ import annotations

import importlib
import random
import time

import pytest
import torch

import mmattn
from mmattn import watts_strogatz, watts_strogatz_mask

nx = pytest.importorskip("networkx")
ws_module = importlib.import_module("mmattn.watts_strogatz")  # the attribute is the function


def networkx_edges(n: int, k: int, beta: float, seed) -> torch.Tensor:
    graph = nx.watts_strogatz_graph(n, k, beta, seed=seed)
    edges = sorted((min(u, v), max(u, v)) for u, v in graph.edges())
    return torch.tensor(edges, dtype=torch.int64).reshape(-1, 2)


def _cases() -> list[tuple[int, int, float, int]]:
    # Special cases networkx treats separately or that stress the rewiring loop:
    # k == n (complete graph), k odd (k // 2 neighbours a side), k < 2 (no edges),
    # n - 1 == k (every rewiring attempt hits the degree cap), beta 0 and 1.
    cases = [
        (0, 0, 0.5, 1), (1, 0, 0.5, 1), (1, 1, 0.5, 1), (2, 2, 1.0, 3), (2, 1, 1.0, 3),
        (3, 2, 1.0, 0), (3, 3, 1.0, 0), (4, 3, 1.0, 7), (5, 4, 1.0, 11), (5, 4, 0.9, 12),
        (6, 5, 1.0, 2), (10, 9, 1.0, 5), (10, 10, 0.3, 5), (10, 8, 1.0, 99), (7, 1, 1.0, 4),
        (8, 2, 0.0, 4), (8, 2, 1.0, 4), (30, 4, 0.0, 0), (30, 4, 1.0, 0), (30, 7, 0.5, -3),
        (50, 6, 0.3, 2**40 + 17), (64, 16, 1.0, 8), (100, 2, 0.05, 6), (33, 31, 0.7, 1),
    ]
    rng = random.Random(2024)
    while len(cases) < 200:
        n = rng.randint(2, 150)
        k = rng.choice([rng.randint(0, min(n, 12)), rng.randint(0, n)])
        beta = rng.choice([0.0, 1.0, round(rng.random(), 3), rng.random()])
        cases.append((n, k, beta, rng.randint(0, 10**9)))
    return cases


@pytest.mark.parametrize(("n", "k", "beta", "seed"), _cases())
def test_same_edges_as_networkx(n, k, beta, seed):
    ours = watts_strogatz(n, k, beta, seed)
    assert torch.equal(ours, networkx_edges(n, k, beta, seed)), (n, k, beta, seed)


def test_output_format():
    edges = watts_strogatz(200, 7, 0.4, seed=3)
    assert edges.dtype == torch.int64 and edges.shape == (200 * 3, 2)
    assert bool((edges[:, 0] < edges[:, 1]).all())
    keys = edges[:, 0] * 200 + edges[:, 1]
    assert torch.equal(keys, torch.unique(keys))  # sorted, no duplicates
    assert watts_strogatz(5, 1, 1.0, seed=0).shape == (0, 2)
    assert watts_strogatz(4, 4, 0.0, seed=0).tolist() == [[0, 1], [0, 2], [0, 3], [1, 2],
                                                         [1, 3], [2, 3]]


def test_seed_none_uses_the_global_random_state_like_networkx():
    random.seed(1234)
    ours = watts_strogatz(60, 6, 0.5)
    random.seed(1234)
    assert torch.equal(ours, networkx_edges(60, 6, 0.5, None))


def test_random_instance_is_advanced_in_place_like_networkx():
    ours_rng, their_rng = random.Random(9), random.Random(9)
    for _ in range(3):
        assert torch.equal(watts_strogatz(40, 4, 0.6, ours_rng),
                           networkx_edges(40, 4, 0.6, their_rng))


def test_random_subclass_takes_the_choice_path():
    class CountingRandom(random.Random):
        calls = 0

        def choice(self, seq):
            CountingRandom.calls += 1
            return super().choice(seq)

    ours = watts_strogatz(80, 6, 0.5, CountingRandom(5))
    assert CountingRandom.calls > 0
    assert torch.equal(ours, networkx_edges(80, 6, 0.5, CountingRandom(5)))


def test_inlined_draws_match_random_choice_on_this_python():
    assert ws_module._inline_draws_match_choice()


def test_sort_without_numpy_gives_the_same_edges(monkeypatch):
    expected = watts_strogatz(300, 8, 0.5, seed=1)
    monkeypatch.setattr(ws_module, "_sort_int64", lambda values: torch.sort(values).values)
    assert torch.equal(watts_strogatz(300, 8, 0.5, seed=1), expected)


def test_large_graph_matches_networkx():
    assert torch.equal(watts_strogatz(5000, 10, 0.3, seed=77),
                       networkx_edges(5000, 10, 0.3, 77))


def test_speed_n65536_k16():
    watts_strogatz(1024, 16, 0.3, seed=0)  # warm up torch's allocator and kernels
    start = time.perf_counter()
    edges = watts_strogatz(65536, 16, 0.3, seed=0)
    elapsed = time.perf_counter() - start
    print(f"watts_strogatz(65536, 16, 0.3): {elapsed * 1e3:.0f} ms")
    assert edges.shape == (65536 * 8, 2)
    assert elapsed < 3.0  # target < 1 s; the bound leaves room for a busy CI machine


# --- seed 002: WSMultiModalFusion's mask --------------------------------------------------

def create_ws_cross_modal_mask(n_modalities, features_per_modality, k=4, beta=0.3):
    """Seed 002's function, verbatim apart from this docstring."""
    total_features = n_modalities * features_per_modality
    G = nx.watts_strogatz_graph(total_features, k, beta, seed=42)
    adj = nx.to_numpy_array(G)
    return torch.FloatTensor(adj)


@pytest.mark.parametrize(("n_modalities", "features", "k", "beta"),
                         [(3, 64, 6, 0.3), (3, 64, 4, 0.3), (2, 50, 5, 1.0), (4, 8, 0, 0.5)])
def test_seed002_mask_bit_for_bit(n_modalities, features, k, beta):
    seed_mask = create_ws_cross_modal_mask(n_modalities, features, k, beta)
    total = n_modalities * features
    ours = watts_strogatz_mask(total, total, k, beta, seed=42)
    assert ours.dtype == torch.bool
    assert torch.equal(ours.float(), seed_mask)
    assert not bool(ours.diagonal().any())
    assert torch.equal(ours, ours.t())


def test_seed002_module_output():
    """WSMultiModalFusion(3, 64, k=6, beta=0.3): y = x @ (W * M)^T with our mask."""
    weight = torch.randn(192, 192) * 0.01
    features = torch.randn(8, 192)
    seed_out = torch.nn.functional.linear(features, weight * create_ws_cross_modal_mask(3, 64, 6))
    mask = watts_strogatz_mask(192, 192, 6, 0.3, seed=42)
    assert torch.equal(torch.nn.functional.linear(features, weight * mask), seed_out)
    sparsity = 1 - mask.sum().item() / mask.numel()
    assert sparsity == pytest.approx(1 - 192 * 6 / 192**2)


# --- rectangular masks --------------------------------------------------------------------

def lattice_inputs(out_features: int, in_features: int, k: int) -> list[set[int]]:
    """The rule from the docstring, written out per row."""
    rows = []
    for i in range(out_features):
        centre = ((2 * i + 1) * in_features) // (2 * out_features)
        offsets = [d for j in range(1, k // 2 + 1) for d in (j, -j)] + ([0] if k % 2 else [])
        rows.append({(centre + d) % in_features for d in offsets})
    return rows


@pytest.mark.parametrize(("out_features", "in_features", "k"),
                         [(10, 37, 4), (37, 10, 3), (1, 7, 2), (7, 1, 1), (97, 1000, 7),
                          (100, 40, 15), (5, 3, 0), (3, 8, 8)])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_rectangular_degrees_and_density(out_features, in_features, k, beta):
    mask = watts_strogatz_mask(out_features, in_features, k, beta, seed=5)
    assert mask.shape == (out_features, in_features) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [k] * out_features
    assert mask.float().mean().item() == pytest.approx(k / in_features)
    if beta == 0.0 or k == in_features:
        expected = [set(range(in_features)) if k == in_features else row
                    for row in lattice_inputs(out_features, in_features, k)]
        assert [set(row.nonzero().flatten().tolist()) for row in mask] == expected


@pytest.mark.parametrize(("out_features", "in_features", "k"),
                         [(300, 1000, 8), (300, 20, 8), (300, 12, 10)])
def test_rectangular_rewiring_rule(out_features, in_features, k):
    """beta = 1 moves every edge off the lattice while enough unused inputs exist.

    (300, 1000, 8) runs the rejection path, the other two the ranking path; with 12
    inputs and k = 10 only 2 inputs are unused, so 8 edges per row stay on the lattice.
    """
    mask = watts_strogatz_mask(out_features, in_features, k, 1.0, seed=1)
    lattice = lattice_inputs(out_features, in_features, k)
    for row, kept in zip(mask, lattice, strict=True):
        chosen = set(row.nonzero().flatten().tolist())
        assert len(chosen) == k
        assert len(chosen & kept) == max(0, 2 * k - in_features)


def test_rectangular_rewiring_is_uniform_and_seeded():
    out_features, in_features, k, beta = 2000, 5000, 8, 0.5
    mask = watts_strogatz_mask(out_features, in_features, k, beta, seed=11)
    lattice = torch.zeros_like(mask)
    for i, kept in enumerate(lattice_inputs(out_features, in_features, k)):
        lattice[i, list(kept)] = True
    moved = mask & ~lattice
    fraction = moved.sum().item() / (out_features * k)
    assert abs(fraction - beta) < 0.02  # 16000 Bernoulli(0.5): std 0.004
    per_tenth = moved.sum(dim=0).view(10, -1).sum(dim=1).float()  # ~800 each
    assert float((per_tenth - per_tenth.mean()).abs().max()) < 0.2 * float(per_tenth.mean())
    assert torch.equal(mask, watts_strogatz_mask(out_features, in_features, k, beta, seed=11))
    assert not torch.equal(mask, watts_strogatz_mask(out_features, in_features, k, beta,
                                                     seed=12))


def test_rectangular_rule_reduces_to_the_square_lattice():
    for n, k in ((20, 4), (64, 6), (9, 8)):
        targets = ws_module._rectangular_ws_targets(n, n, k, 0.0, None)
        rectangular = torch.zeros(n, n, dtype=torch.bool)
        rectangular[torch.arange(n)[:, None], targets] = True
        assert torch.equal(rectangular, watts_strogatz_mask(n, n, k, 0.0))


def test_coo_matches_mask():
    for shape in ((50, 50), (30, 70)):
        rows, cols = ws_module.watts_strogatz_coo(*shape, 6, 0.4, seed=2)
        dense = torch.zeros(shape, dtype=torch.bool)
        dense[rows, cols] = True
        assert rows.numel() == int(dense.sum())  # no duplicate entries
        assert torch.equal(dense, watts_strogatz_mask(*shape, 6, 0.4, seed=2))


def test_exported():
    assert mmattn.watts_strogatz is watts_strogatz
    assert mmattn.watts_strogatz_mask is watts_strogatz_mask


# --- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "error", "name"), [
    ((-1, 0, 0.1), ValueError, "n"),
    ((10, 11, 0.1), ValueError, "k"),
    ((10, -2, 0.1), ValueError, "k"),
    ((10, 4, 1.5), ValueError, "beta"),
    ((10, 4, -0.1), ValueError, "beta"),
    ((10, 4, float("nan")), ValueError, "beta"),
    ((10.0, 4, 0.1), TypeError, "n"),
    ((10, 4.0, 0.1), TypeError, "k"),
    ((True, 0, 0.1), TypeError, "n"),
    ((10, 4, "0.1"), TypeError, "beta"),
    ((10, 4, 0.1, 1.5), TypeError, "seed"),
    ((10, 4, 0.1, "seed"), TypeError, "seed"),
])
def test_graph_rejects_bad_input(args, error, name):
    with pytest.raises(error, match=rf"^{name}\b"):
        watts_strogatz(*args)


@pytest.mark.parametrize(("args", "error", "name"), [
    ((0, 5, 2, 0.1), ValueError, "out_features"),
    ((5, 0, 2, 0.1), ValueError, "in_features"),
    ((5, 3, 4, 0.1), ValueError, "k"),
    ((5, 5, -1, 0.1), ValueError, "k"),
    ((5, 5, 2, 2.0), ValueError, "beta"),
    ((5.5, 5, 2, 0.1), TypeError, "out_features"),
    ((5, 5, 2, 0.1, 0.5), TypeError, "seed"),
])
def test_mask_rejects_bad_input(args, error, name):
    with pytest.raises(error, match=rf"^{name}\b"):
        watts_strogatz_mask(*args)
