"""Watts-Strogatz small-world graphs and weight masks.

``watts_strogatz(n, k, beta, seed)`` returns exactly the edge set of
``networkx.watts_strogatz_graph(n, k, beta, seed=seed)``: the same ring lattice, the same
rewiring order and the same draws from ``random.Random(seed)``, without building a
networkx graph (about 0.1 s instead of several seconds for ``n = 65536, k = 16``).

``watts_strogatz_mask(out_features, in_features, k, beta, seed)`` turns it into a bool
weight mask: the symmetric adjacency matrix for a square mask (bit-for-bit what seed 002's
``create_ws_cross_modal_mask`` builds with ``nx.to_numpy_array``), and a ring lattice over
scaled positions with per-row rewiring for a rectangular one (see its docstring).
"""

from __future__ import annotations

import math
import numbers
import random

import torch
from torch import Tensor


def _check_int(name: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_beta(beta: object) -> float:
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta must be a float in [0, 1], got {type(beta).__name__}")
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:  # also rejects NaN
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return beta


def _python_rng(seed: object) -> random.Random:
    """The generator networkx's ``@py_random_state`` would hand the graph builder."""
    if seed is None:
        return random._inst  # networkx draws from the global `random` state for None
    if isinstance(seed, random.Random):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, a random.Random or None, got "
                        f"{type(seed).__name__}")
    return random.Random(int(seed))


def _inline_draws_match_choice() -> bool:
    """Whether ``getrandbits`` rejection sampling reproduces ``Random.choice`` here.

    CPython's ``Random.choice(seq)`` is ``seq[_randbelow(len(seq))]`` and ``_randbelow``
    draws ``getrandbits(len.bit_length())`` until the value is below ``len``. Inlining
    that halves the cost of the rewiring loop; this check keeps the result exact if a
    Python version ever changes the algorithm (the slow path is then used).
    """
    for size in (1, 2, 3, 5, 64, 1000, 65536, 100003):
        reference, inline = random.Random(size), random.Random(size)
        bits = size.bit_length()
        for _ in range(20):
            drawn = inline.getrandbits(bits)
            while drawn >= size:
                drawn = inline.getrandbits(bits)
            if reference.choice(range(size)) != drawn:
                return False
    return True


_INLINE_DRAWS: bool | None = None


def _rewire_ring(n: int, half_k: int, beta: float, rng: random.Random
                 ) -> tuple[list[int], list[int]]:
    """Replay networkx's rewiring loop; return the rewired slots and their new ends.

    Slot ``(j - 1) * n + u`` is the lattice edge ``(u, (u + j) % n)``. Each slot is
    rewired at most once, at its own turn, and no other slot can remove the edge it holds
    (for ``k < n``), so the final graph has exactly one edge per slot: ``(u, w)`` if
    rewired, else the lattice edge. The graph is kept as its differences from the lattice
    (two sets of edge keys ``min * n + max`` and a degree change per node) because
    building 65536 adjacency sets costs more than the whole loop.
    """
    global _INLINE_DRAWS
    if _INLINE_DRAWS is None:
        _INLINE_DRAWS = _inline_draws_match_choice()
    rand = rng.random
    getrandbits = rng.getrandbits
    bits = n.bit_length()
    # A subclass may override choice/random/getrandbits; then call choice as networkx does.
    plain = _INLINE_DRAWS and type(rng) is random.Random
    nodes = list(range(n))
    choice = rng.choice

    added: set[int] = set()  # non-lattice edges present now
    removed: set[int] = set()  # lattice edges absent now
    degree_change = [0] * n
    far = n - half_k  # ring offsets d with half_k < d < far are not lattice neighbours
    slots: list[int] = []
    new_ends: list[int] = []

    def is_free(u: int, w: int) -> bool:
        """Neither u itself nor a current neighbour of u."""
        if w == u:
            return False
        key = u * n + w if u < w else w * n + u
        if half_k < (w - u) % n < far:
            return key not in added
        return key in removed

    for j in range(1, half_k + 1):
        slot_base = (j - 1) * n
        for u in range(n):
            if rand() >= beta:
                continue
            # networkx: draw w until it is neither u nor a neighbour of u; after each
            # redraw, give up on this edge if u already neighbours every other node.
            if plain:
                w = getrandbits(bits)
                while w >= n:
                    w = getrandbits(bits)
            else:
                w = choice(nodes)
            rewire = True
            while not is_free(u, w):
                if plain:
                    w = getrandbits(bits)
                    while w >= n:
                        w = getrandbits(bits)
                else:
                    w = choice(nodes)
                if 2 * half_k + degree_change[u] >= n - 1:
                    rewire = False
                    break
            if not rewire:
                continue
            # Remove lattice edge (u, v): no earlier turn can have removed it.
            v = u + j - n if u + j >= n else u + j
            removed.add(u * n + v if u < v else v * n + u)
            # Add (u, w): a new shortcut, or a lost lattice edge coming back.
            key = u * n + w if u < w else w * n + u
            if half_k < (w - u) % n < far:
                added.add(key)
            else:
                removed.discard(key)
            degree_change[v] -= 1
            degree_change[w] += 1
            slots.append(slot_base + u)
            new_ends.append(w)
    return slots, new_ends


def watts_strogatz(n: int, k: int, beta: float, seed: int | random.Random | None = None
                   ) -> Tensor:
    """Edges of a Watts-Strogatz small-world graph, identical to networkx.

    Builds the ring lattice where node ``u`` joins ``u ± 1 .. u ± k // 2`` (``k`` odd
    behaves as ``k - 1``, as in networkx), then rewires each lattice edge ``(u, u + j)``,
    for ``j = 1 .. k // 2`` and ``u = 0 .. n - 1`` in that order, with probability ``beta``
    to ``(u, w)`` with ``w`` uniform among nodes that are not ``u`` and not yet neighbours
    of ``u``. ``k == n`` gives the complete graph (networkx's special case).

    Args:
        n: number of nodes, ``>= 0``.
        k: lattice degree, ``0 <= k <= n``. (networkx accepts ``k < 0`` and returns an
            empty graph; here it is an error.)
        beta: rewiring probability in ``[0, 1]`` (networkx accepts any float).
        seed: an int (``random.Random(seed)``, as networkx), a ``random.Random`` that is
            advanced in place, or None for Python's global ``random`` state (as networkx).

    Returns:
        int64 ``(E, 2)`` tensor of undirected edges ``(u, v)`` with ``u < v``, sorted
        lexicographically. ``E = n * (k // 2)`` for ``k < n``.
    """
    n = _check_int("n", n)
    k = _check_int("k", k)
    beta = _check_beta(beta)
    if k > n:
        raise ValueError(f"k must be <= n (each node has at most n - 1 neighbours), got k={k}, "
                         f"n={n}")
    rng = _python_rng(seed)
    if k == n:  # networkx returns the complete graph without drawing random numbers
        return torch.triu_indices(n, n, 1, dtype=torch.int64).t().contiguous()
    half_k = k // 2
    if half_k == 0:
        return torch.zeros(0, 2, dtype=torch.int64)
    slots, new_ends = _rewire_ring(n, half_k, beta, rng) if beta > 0.0 else ([], [])

    # One edge per lattice slot (j, u): (u, u + j) unless the slot was rewired to (u, w).
    nodes = torch.arange(n, dtype=torch.int64)
    sources = nodes.repeat(half_k)
    offsets = torch.arange(1, half_k + 1, dtype=torch.int64).repeat_interleave(n)
    targets = (sources + offsets) % n
    if slots:
        targets[torch.tensor(slots, dtype=torch.int64)] = torch.tensor(new_ends,
                                                                       dtype=torch.int64)
    low, high = torch.minimum(sources, targets), torch.maximum(sources, targets)
    keys = _sort_int64(low * n + high)
    return torch.stack((keys // n, keys % n), dim=1)


def _sort_int64(values: Tensor) -> Tensor:
    """Ascending copy of a 1-D int64 CPU tensor.

    numpy's sort when numpy is installed: torch's parallel CPU sort took 0.19 s instead of
    0.01 s for 524288 keys on the busy 2-core development machine.
    """
    try:
        import numpy
    except ImportError:
        return torch.sort(values).values
    return torch.from_numpy(numpy.sort(values.numpy(), kind="stable"))


def _lattice_centres(out_features: int, in_features: int) -> Tensor:
    """Input position of each output row, scaled to the input axis: the centre of its span."""
    rows = torch.arange(out_features, dtype=torch.int64)
    return ((2 * rows + 1) * in_features) // (2 * out_features)


def _rectangular_ws_targets(out_features: int, in_features: int, k: int, beta: float,
                            seed: int | None) -> Tensor:
    """int64 ``(out_features, k)`` kept inputs of each row: scaled ring lattice, rewired.

    Row ``i`` has centre ``c_i = ((2i + 1) * in_features) // (2 * out_features)`` and keeps
    inputs ``c_i ± 1 .. c_i ± k // 2`` (mod ``in_features``), plus ``c_i`` itself when
    ``k`` is odd, so every row has exactly ``k`` edges (all inputs when
    ``k == in_features``). Then each edge is independently rewired with probability
    ``beta``; a row's rewired edges move to distinct inputs drawn uniformly, without
    replacement, from the inputs its lattice does not use. Draws come from a
    ``torch.Generator`` seeded with ``seed`` (torch's global generator for None).
    """
    if k >= in_features:
        return torch.arange(in_features, dtype=torch.int64).expand(out_features, -1).clone()
    half_k = k // 2
    steps = torch.arange(1, half_k + 1, dtype=torch.int64)
    offsets = torch.cat((torch.zeros(k % 2, dtype=torch.int64), -steps.flip(0), steps))
    lattice = (_lattice_centres(out_features, in_features)[:, None] + offsets) % in_features
    targets = lattice.clone()
    if beta > 0.0 and k > 0:
        generator = None
        if seed is not None:
            generator = torch.Generator().manual_seed(int(seed) & (2**64 - 1))
        rewire = torch.rand(out_features, k, generator=generator) < beta
        if 4 * k <= in_features:
            _rewire_by_rejection(targets, lattice, rewire, in_features, generator)
        else:
            _rewire_by_ranking(targets, lattice, rewire, in_features, generator)
    return targets


def _rewire_by_rejection(targets: Tensor, lattice: Tensor, rewire: Tensor, in_features: int,
                         generator: torch.Generator | None) -> None:
    """Rewire ``targets`` in place where ``rewire``; for sparse rows (``4k <= in``).

    Rounds of candidates: a candidate is accepted when the row's lattice does not use it,
    no earlier accepted edge of the row holds it, and no earlier pending slot of the row
    drew it this round. Accepted values are therefore a uniform sample without
    replacement from the unused inputs; each round accepts at least 3/4 of the slots on
    average, so few rounds run.
    """
    k = targets.shape[1]
    earlier_slot = torch.ones(k, k, dtype=torch.bool).tril(-1)  # [s, t]: t < s
    pending = rewire.clone()
    while True:
        rows = pending.any(dim=1).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        waiting = pending[rows]
        current, original = targets[rows], lattice[rows]
        candidates = torch.randint(0, in_features, waiting.shape, generator=generator)
        taken = ((candidates[:, :, None] == original[:, None, :]).any(-1)
                 | (candidates[:, :, None] == current[:, None, :]).any(-1))
        drawn_before = ((candidates[:, :, None] == candidates[:, None, :])
                        & waiting[:, None, :] & earlier_slot).any(-1)
        accepted = waiting & ~taken & ~drawn_before
        targets[rows] = torch.where(accepted, candidates, current)
        pending[rows] = waiting & ~accepted


def _rewire_by_ranking(targets: Tensor, lattice: Tensor, rewire: Tensor, in_features: int,
                       generator: torch.Generator | None) -> None:
    """Rewire ``targets`` in place where ``rewire``; for dense rows (``4k > in``).

    Each row ranks its unused inputs by a uniform random score and hands the lowest-scored
    ones to its rewired slots: a uniform sample without replacement. Costs
    ``out * in`` scores, which is below ``4 * out * k`` here.
    """
    out_features, k = targets.shape
    scores = torch.rand(out_features, in_features, generator=generator)
    scores.scatter_(1, lattice, math.inf)
    # Lattice inputs score inf and sort last; slots beyond the in - k unused inputs keep
    # their lattice input (checked below).
    order = scores.argsort(dim=1)[:, :k]
    # The s-th rewired slot of a row takes the s-th lowest-scored unused input.
    rank = rewire.long().cumsum(dim=1) - 1
    picked = order.gather(1, rank.clamp(min=0))
    valid = rewire & (scores.gather(1, picked) < math.inf)
    targets.copy_(torch.where(valid, picked, targets))


def _check_mask_args(out_features: object, in_features: object, k: object, beta: object,
                     seed: object) -> tuple[int, int, int, float]:
    out_features = _check_int("out_features", out_features, 1)
    in_features = _check_int("in_features", in_features, 1)
    k = _check_int("k", k)
    beta = _check_beta(beta)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if k > in_features:
        raise ValueError(f"k must be <= in_features, got k={k}, in_features={in_features}")
    return out_features, in_features, k, beta


def watts_strogatz_coo(out_features: int, in_features: int, k: int, beta: float,
                       seed: int | None = None) -> tuple[Tensor, Tensor]:
    """int64 ``(rows, cols)`` of the True entries of :func:`watts_strogatz_mask`.

    Same arguments and rule; avoids the dense mask, so layouts of large layers are cheap.
    Entries are unordered (square: each undirected edge appears as both ``(u, v)`` and
    ``(v, u)``).
    """
    out_features, in_features, k, beta = _check_mask_args(out_features, in_features, k, beta,
                                                          seed)
    if out_features != in_features:
        targets = _rectangular_ws_targets(out_features, in_features, k, beta, seed)
        rows = torch.arange(out_features, dtype=torch.int64).repeat_interleave(targets.shape[1])
        return rows, targets.flatten()
    edges = watts_strogatz(out_features, k, beta, seed)
    return torch.cat((edges[:, 0], edges[:, 1])), torch.cat((edges[:, 1], edges[:, 0]))


def watts_strogatz_mask(out_features: int, in_features: int, k: int, beta: float,
                        seed: int | None = None) -> Tensor:
    """Bool ``(out_features, in_features)`` Watts-Strogatz connectivity mask (True = kept).

    Square (``out_features == in_features == n``): the symmetric adjacency matrix of
    :func:`watts_strogatz` ``(n, k, beta, seed)``, no self-loops — exactly what seed 002's
    ``create_ws_cross_modal_mask`` builds with networkx, e.g.
    ``watts_strogatz_mask(192, 192, 6, 0.3, seed=42)`` is ``WSMultiModalFusion``'s mask.
    Rows have ``2 * (k // 2)`` entries on average (rewiring moves edges between rows).

    Rectangular: output ``i`` sits at input position
    ``c_i = ((2i + 1) * in_features) // (2 * out_features)`` (the centre of its span) and
    connects to the ring-lattice inputs ``c_i ± 1 .. c_i ± k // 2`` (mod ``in_features``),
    plus ``c_i`` itself when ``k`` is odd; each edge is then rewired with probability
    ``beta`` to an input the row's lattice does not use (distinct, uniform, drawn from a
    ``torch.Generator`` seeded with ``seed``; torch's global generator for None). Every
    row keeps exactly ``k`` edges (``k == in_features`` keeps all), so the density is
    ``k / in_features``. With ``beta = 0`` and even ``k`` the rule gives the square ring
    lattice when the sizes are equal.

    Args:
        out_features, in_features: mask shape, ``>= 1``.
        k: ring-lattice degree, ``0 <= k <= in_features``.
        beta: rewiring probability in ``[0, 1]``.
        seed: int or None (see :func:`watts_strogatz` for the square case).
    """
    rows, cols = watts_strogatz_coo(out_features, in_features, k, beta, seed)
    mask = torch.zeros(int(out_features), int(in_features), dtype=torch.bool)
    mask[rows, cols] = True
    return mask
