"""WS-masked sparse linear on CPU: mmattn's C++ kernels against PyTorch, same run.

Shapes (DESIGN): n = 3072 features as 3 modalities x 1024, Watts-Strogatz k=6, beta=0.3,
batch 256, float32; and seed 002's own size (3 x 64 features, k=6, batch 8).

Rows:
* forward: ``mmattn.ws_linear`` vs the fastest ``torch.sparse`` form found in the run
  (``torch.sparse.mm(W_csr, x.T)``, ``W_csr @ x.T``, ``x @ W_csr.T`` and the COO
  ``torch.sparse.mm(W_coo, x.T.contiguous())`` are timed; y comes back as the transposed
  view where the form gives ``(out, batch)``), and vs dense ``F.linear(x, W * M)``;
* forward+backward: vs dense ``F.linear(x, W * M)`` fwd+bwd (gradients for x and W);
* block 32: the same number of stored weights as the element layout, as 32 x 32 blocks
  (a WS graph over the 96 x 96 block grid keeps >= 2 blocks per row, 10x denser, so the
  same-density layout has round(nnz / 32^2) = 18 blocks placed at random, seeded); the
  WS block graph with k=2 (density 2.1%) is reported too;
* seed size: seed 002's ``WSMultiModalFusion`` (dense ``weight * mask``) vs
  ``mmattn.nn.WSMultiModalFusion`` holding the same weights, whole module calls.

Timing: every case alternates anchor and mmattn over several rounds; each round takes
the median of ``repeats`` calls, and a case reports the best round of each. On a shared
machine this keeps a burst of load on other cores from landing on one side only.
Microsecond cases time loops of calls. Writes ``results/ws_linear_cpu.{csv,md}``.

Usage: ``python benchmarks/bench_ws_linear.py [--quick]``
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Table, time_ms

import mmattn
from mmattn.layout import SparseLayout
from mmattn.nn import WSMultiModalFusion

MODALITIES, FEATURES, K, BETA, BATCH, BLOCK = 3, 1024, 6, 0.3, 256, 32
SEED_FEATURES, SEED_BATCH = 64, 8


class SeedWSMultiModalFusion(nn.Module):
    """Seed 002's module (dense weight, float mask, ``F.linear(cat, weight * mask)``); its
    networkx mask is ``mmattn.watts_strogatz_mask(n, n, k, beta, seed=42)`` exactly
    (tests/test_ws_modules.py checks this against networkx)."""

    def __init__(self, n_modalities: int, features_per_modality: int, k: int,
                 beta: float) -> None:
        super().__init__()
        total = n_modalities * features_per_modality
        self.weight = nn.Parameter(torch.randn(total, total) * 0.01)
        mask = mmattn.watts_strogatz_mask(total, total, k, beta, seed=42)
        self.register_buffer("mask", mask.float())

    def forward(self, features: list[Tensor]) -> Tensor:
        return F.linear(torch.cat(features, dim=-1), self.weight * self.mask)


def _best_of_rounds(fns: dict[str, Callable[[], object]], rounds: int, repeats: int,
                    inner: int = 1) -> dict[str, float]:
    """Best per-round median ms per call of each function, rounds alternating them."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if inner == 1:
                ms = time_ms(fn, repeats=repeats, warmup=1)
            else:
                def loop(fn=fn):
                    for _ in range(inner):
                        fn()
                ms = time_ms(loop, repeats=repeats, warmup=1) / inner
            best[name] = min(best[name], ms)
    return best


def _fwd_bwd(fn: Callable[[], Tensor], leaves: list[Tensor]) -> Callable[[], None]:
    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        fn().sum().backward()
    return step


def _torch_sparse_forms(dense_masked: Tensor, x: Tensor) -> dict[str, Callable[[], Tensor]]:
    csr = dense_masked.to_sparse_csr()
    coo = dense_masked.to_sparse().coalesce()
    x_t = x.T.contiguous()
    return {
        "torch.sparse.mm(W_csr, x.T)": lambda: torch.sparse.mm(csr, x.T).T,
        "W_csr @ x.T": lambda: (csr @ x.T).T,
        "x @ W_csr.T": lambda: x @ csr.t(),
        "torch.sparse.mm(W_coo, x.T.contiguous())": lambda: torch.sparse.mm(coo, x_t).T,
    }


def _block_case(table: Table, name: str, layout: SparseLayout, x: Tensor, rounds: int,
                repeats: int) -> None:
    """Forward vs the fastest torch.sparse form and fwd+bwd vs dense, for a block layout."""
    n = layout.out_features
    values = torch.randn(layout.nnz, BLOCK, BLOCK) * 0.01
    dense = mmattn.backends.reference.layout_to_dense_weight(values, layout.crow_indices,
                                                    layout.col_indices, n, n, BLOCK)
    forms = _torch_sparse_forms(dense, x)
    torch.testing.assert_close(mmattn.ws_linear(x, values, layout), F.linear(x, dense),
                               rtol=1e-4, atol=1e-4)
    form_ms = _best_of_rounds(forms, 1, repeats)
    fastest = min(form_ms, key=form_ms.get)
    times = _best_of_rounds({"sparse": forms[fastest],
                             "ours": lambda: mmattn.ws_linear(x, values, layout)},
                            rounds, repeats)
    note = f"{layout.nnz} blocks, density {layout.num_parameters / n**2:.4f}"
    table.add(f"{name}, forward", f"torch.sparse: {fastest}", times["sparse"], times["ours"],
              "reported", note)
    x_g = x.clone().requires_grad_()
    w_kept = values.clone().requires_grad_()
    w_dense = dense.clone().requires_grad_()
    times = _best_of_rounds({
        "dense": _fwd_bwd(lambda: F.linear(x_g, w_dense), [x_g, w_dense]),
        "ours": _fwd_bwd(lambda: mmattn.ws_linear(x_g, w_kept, layout), [x_g, w_kept]),
    }, rounds, max(3, repeats // 2))
    table.add(f"{name}, fwd+bwd", "dense F.linear(x, W*M) fwd+bwd", times["dense"],
              times["ours"], "reported", note)


def main(quick: bool = False) -> Table:
    rounds, repeats = (2, 5) if quick else (8, 7)
    torch.manual_seed(0)
    n = MODALITIES * FEATURES
    load = os.getloadavg()[0]  # other jobs on this machine slow both sides' thread joins
    table = Table(f"ws_linear CPU: n={n} ({MODALITIES}x{FEATURES}), k={K}, beta={BETA}, "
                  f"batch {BATCH}, float32 (1-min load average at start: {load:.1f})")

    layout = SparseLayout.from_watts_strogatz(n, n, K, BETA, seed=42)
    mask = layout.to_dense()
    dense = torch.randn(n, n) * 0.01
    values = dense[mask].contiguous()  # row-major order == CSR order
    mask_f = mask.float()
    x = torch.randn(BATCH, n)
    note = f"nnz={layout.nnz}, density={layout.nnz / n**2:.4f}"

    # forward: the fastest torch.sparse form of this run, then the others
    sparse_forms = _torch_sparse_forms(dense * mask_f, x)
    reference = F.linear(x, dense * mask_f)
    for form in sparse_forms.values():
        torch.testing.assert_close(form(), reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mmattn.ws_linear(x, values, layout), reference,
                               rtol=1e-4, atol=1e-5)
    form_ms = _best_of_rounds(sparse_forms, 1, repeats)
    fastest = min(form_ms, key=form_ms.get)
    times = _best_of_rounds({
        "sparse": sparse_forms[fastest],
        "ours": lambda: mmattn.ws_linear(x, values, layout),
        "dense": lambda: F.linear(x, dense * mask_f),
    }, rounds, repeats)
    table.add("forward", f"torch.sparse: {fastest}", times["sparse"], times["ours"],
              ">= 1.5x", note)
    table.add("forward", "dense F.linear(x, W*M)", times["dense"], times["ours"], "", note)

    # forward + backward against dense masked
    x_g = x.clone().requires_grad_()
    w_dense = dense.clone().requires_grad_()
    w_kept = values.clone().requires_grad_()
    fwd_bwd = {
        "dense": _fwd_bwd(lambda: F.linear(x_g, w_dense * mask_f), [x_g, w_dense]),
        "ours": _fwd_bwd(lambda: mmattn.ws_linear(x_g, w_kept, layout), [x_g, w_kept]),
    }
    times = _best_of_rounds(fwd_bwd, rounds, max(3, repeats // 2))
    table.add("forward+backward", "dense F.linear(x, W*M) fwd+bwd", times["dense"],
              times["ours"], ">= 20x", note)

    # the same on one thread: no fork-join, so load on the other core moves it least
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = _best_of_rounds({"sparse": sparse_forms[fastest],
                                 "ours": lambda: mmattn.ws_linear(x, values, layout)},
                                rounds, repeats)
        table.add("forward, 1 thread", f"torch.sparse: {fastest}", times["sparse"],
                  times["ours"], "", note)
        times = _best_of_rounds(fwd_bwd, rounds, max(3, repeats // 2))
        table.add("forward+backward, 1 thread", "dense F.linear(x, W*M) fwd+bwd",
                  times["dense"], times["ours"], "", note)
    finally:
        torch.set_num_threads(threads)

    # block 32 at the same density, and the WS graph over blocks (k=2)
    grid = -(-n // BLOCK)
    blocks = round(layout.nnz / BLOCK**2)
    chosen = torch.randperm(grid * grid, generator=torch.Generator().manual_seed(0))[:blocks]
    same_density = SparseLayout.from_coo(chosen // grid, chosen % grid, (n, n), BLOCK)
    ws_blocks = SparseLayout.from_watts_strogatz(n, n, 2, BETA, seed=42, block_size=BLOCK)
    for name, block_layout in (("block 32, same density", same_density),
                               ("block 32, WS k=2 over blocks", ws_blocks)):
        _block_case(table, name, block_layout, x, rounds, repeats)

    # seed 002 at its own size: whole module calls
    seed = SeedWSMultiModalFusion(MODALITIES, SEED_FEATURES, K, BETA)
    ours = WSMultiModalFusion(MODALITIES, SEED_FEATURES, K, BETA)
    ours.load_state_dict(seed.state_dict())
    feats = [torch.randn(SEED_BATCH, SEED_FEATURES) for _ in range(MODALITIES)]
    torch.testing.assert_close(ours(feats), seed(feats))
    inner = 100 if quick else 300
    times = _best_of_rounds({"seed": lambda: seed(feats), "ours": lambda: ours(feats)},
                            rounds * 2, repeats, inner=inner)
    seed_note = f"3x{SEED_FEATURES} features, k={K}, batch {SEED_BATCH}, nnz={ours.nnz}"
    table.add("seed 002 size, forward", "seed WSMultiModalFusion", times["seed"],
              times["ours"], ">= 1.0x", seed_note)
    times = _best_of_rounds({
        "seed": _fwd_bwd(lambda: seed(feats), [seed.weight]),
        "ours": _fwd_bwd(lambda: ours(feats), [ours.weight]),
    }, rounds * 2, repeats, inner=inner // 3)
    table.add("seed 002 size, fwd+bwd", "seed WSMultiModalFusion", times["seed"],
              times["ours"], "reported", seed_note)

    print(table.render())
    if not quick:  # a quick run does not overwrite the committed full results
        print(f"\nwritten: {table.write('ws_linear_cpu')}")
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and repeats")
    main(quick=parser.parse_args().quick)
