"""``mmattn.nn`` modules against the modules they replace, same weights, same inputs.

Cases (float32; whole module calls, projections included):

- ``nn.MultiheadAttention`` at a seed-like tiny size, E64 H4 B2 L8 self-attention:
  forward with ``need_weights`` True and False and forward+backward (training mode, autograd
  on), inference (eval, no autograd: PyTorch's native fast path), and a diagnostic,
  "module path only": mmattn's module with its attention op replaced by SDPA, against
  ``nn.MultiheadAttention(need_weights=False)``, the cost of the module code alone;
- ``nn.MultiheadAttention`` at DESIGN's anchor, query B4 L256, key/value L1024, E512 H8,
  ``need_weights=True``, no autograd;
- ``nn.MultiheadAttention`` decoding one token against 4096 memory tokens, B = H = 1, 2, 4,
  head dim 64 (E = 64 H), ``need_weights=False``, no autograd: whole calls, so the key and
  value projections of the 4096 tokens (E x E each) are most of the time; the attention
  alone is the ``decode`` sweep of ``benchmarks/bench_attention.py``;
- seed 000's ``CrossModalAttention`` at the VQA shape B8 Lq64 Lk197 E768 H12, forward (no
  autograd) and forward+backward, eval mode (dropout off in both);
- seed 004's ``SparseAttention``, (B*H)16 L2048 D64, block 64, keep ~0.2, the same random
  blocks (``torch.manual_seed(0)`` before every call of either module);
- seed 002's ``WSMultiModalFusion`` at its own size (3 x 64 features, k=6, batch 8),
  forward and forward+backward.

mmattn's module runs as a user gets it (``mmattn[auto]``: automatic choice) and on each
backend under ``mmattn.use_backend``; the README's modules table shows the auto row. The
reference is mmattn's module on the reference backend in float64 (CPU); forward+backward
compares the output and the input gradients.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mmattn
from benchmarks.core import REPO, Built, Case, Impl, Selection, backend_skip, directional

FAMILY = "modules"
OPS = ("modules.fwd", "modules.fwd+bwd", "modules.inference")

_TINY = {"module": "MultiheadAttention", "E": 64, "H": 4, "B": 2, "Lq": 8, "Lk": 8}
_ANCHOR_MHA = {"module": "MultiheadAttention", "E": 512, "H": 8, "B": 4, "Lq": 256,
               "Lk": 1024, "need_weights": True}
_DECODE_MHA = [{"module": "MultiheadAttention", "E": 64 * n, "H": n, "B": n, "Lq": 1,
                "Lk": 4096, "need_weights": False} for n in (1, 2, 4)]
_SEED000 = {"module": "seed 000 CrossModalAttention", "E": 768, "H": 12, "B": 8, "Lq": 64,
            "Lk": 197}
_SEED004 = {"module": "seed 004 SparseAttention", "BH": 16, "L": 2048, "D": 64, "block": 64,
            "sparsity": 0.8}
_SEED002 = {"module": "seed 002 WSMultiModalFusion", "modalities": 3, "features": 64, "k": 6,
            "beta": 0.3, "batch": 8}


def _specs(preset: str) -> list[tuple[str, dict[str, Any], bool]]:
    """(op, params, headline) of a preset."""
    tiny = [("modules.fwd", {**_TINY, "need_weights": True}, True),
            ("modules.fwd", {**_TINY, "need_weights": False}, False),
            ("modules.fwd+bwd", {**_TINY, "need_weights": True}, False),
            ("modules.inference", {**_TINY, "need_weights": True}, False)]
    path_only = [("modules.fwd", {**_TINY, "need_weights": False, "op": "sdpa"}, False)]
    seed000 = [("modules.inference", _SEED000, True), ("modules.fwd+bwd", _SEED000, True)]
    seed002 = [("modules.inference", _SEED002, True), ("modules.fwd+bwd", _SEED002, False)]
    if preset == "smoke":
        return [*tiny[:1], tiny[2], *path_only, seed002[0]]
    if preset == "quick":
        return [*tiny, *path_only, seed000[0], seed002[0]]
    return [*tiny, *path_only, ("modules.inference", _ANCHOR_MHA, False),
            *(("modules.inference", p, False) for p in _DECODE_MHA), *seed000,
            ("modules.inference", _SEED004, False), *seed002]


def _label(op: str, p: dict[str, Any]) -> str:
    module = p["module"]
    if module == "MultiheadAttention":
        shape = (f"MHA E{p['E']} H{p['H']} B{p['B']} " +
                 (f"L{p['Lq']} self" if p["Lq"] == p["Lk"] else f"Lq{p['Lq']} Lk{p['Lk']}"))
        extra = f" need_weights={p['need_weights']}"
        if p.get("op") == "sdpa":
            extra += ", module path only (op -> SDPA)"
    elif module.startswith("seed 000"):
        shape, extra = f"{module} B{p['B']} Lq{p['Lq']} Lk{p['Lk']} E{p['E']} H{p['H']}", ""
    elif module.startswith("seed 004"):
        shape = (f"{module} (B*H){p['BH']} L{p['L']} D{p['D']} block{p['block']} "
                 f"keep~{1 - p['sparsity']:.1f}")
        extra = ""
    else:
        shape = (f"{module} {p['modalities']}x{p['features']} k{p['k']} "
                 f"batch{p['batch']}")
        extra = ""
    mode = {"modules.fwd": "fwd (train, autograd)", "modules.fwd+bwd": "fwd+bwd",
            "modules.inference": "fwd (eval, no grad)"}[op]
    return f"{shape}{extra}: {mode}"


def cases(selection: Selection) -> list[Case]:
    return [Case(FAMILY, op, dict(params), _label(op, params), ["modules"], headline)
            for op, params, headline in _specs(selection.preset.name)]


def _seed_models() -> Any:
    path = str(REPO / "examples")
    if path not in sys.path:
        sys.path.insert(0, path)
    import seed_models

    return seed_models


@contextlib.contextmanager
def _op_is_sdpa() -> Iterator[None]:
    """mmattn's modules call SDPA instead of mmattn's op (the "module path only" case)."""
    import mmattn.nn.attention as module

    real = module.cross_attention

    def sdpa(q: Tensor, k: Tensor, v: Tensor, **_kwargs: Any) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    module.cross_attention = sdpa
    try:
        yield
    finally:
        module.cross_attention = real


def _pair(p: dict[str, Any]) -> tuple[str, nn.Module, nn.Module, list[Tensor],
                                      Callable[[nn.Module, list[Tensor]], Tensor]]:
    """(anchor name, anchor module, mmattn module with its weights, inputs, call)."""
    module = p["module"]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if module == "MultiheadAttention":
        theirs = nn.MultiheadAttention(p["E"], p["H"], batch_first=True)
        ours = mmattn.nn.MultiheadAttention(p["E"], p["H"], batch_first=True)
        ours.load_state_dict(theirs.state_dict())
        query = torch.randn(p["B"], p["Lq"], p["E"], generator=gen)
        memory = query if p["Lq"] == p["Lk"] else torch.randn(p["B"], p["Lk"], p["E"],
                                                              generator=gen)
        need = p["need_weights"]
        inputs = [query] if memory is query else [query, memory]

        def call(m: nn.Module, x: list[Tensor]) -> Tensor:
            kv = x[0] if len(x) == 1 else x[1]
            return m(x[0], kv, kv, need_weights=need)[0]
        return "nn.MultiheadAttention", theirs, ours, inputs, call
    seeds = _seed_models()
    if module.startswith("seed 000"):
        e = p["E"]
        theirs = seeds.CrossModalAttention(e, e, e, p["H"]).eval()
        ours = mmattn.nn.CrossModalAttention(e, e, e, p["H"]).eval()
        ours.load_state_dict(theirs.state_dict())
        inputs = [torch.randn(p["B"], p["Lq"], e, generator=gen),
                  torch.randn(p["B"], p["Lk"], e, generator=gen)]
        return ("seed 000 CrossModalAttention", theirs, ours, inputs,
                lambda m, x: m(x[0], x[1], x[1])[0])
    if module.startswith("seed 004"):
        theirs = seeds.SparseAttention(p["block"], p["sparsity"])
        ours = mmattn.nn.BlockSparseAttention(p["block"], p["sparsity"])
        inputs = [torch.randn(p["BH"], p["L"], p["D"], generator=gen) for _ in range(3)]

        def call(m: nn.Module, x: list[Tensor]) -> Tensor:
            torch.manual_seed(0)  # the same random blocks in both modules
            return m(*x)
        return "seed 004 SparseAttention", theirs, ours, inputs, call
    theirs = seeds.WSMultiModalFusion(p["modalities"], p["features"], p["k"], p["beta"])
    ours = mmattn.nn.WSMultiModalFusion(p["modalities"], p["features"], p["k"], p["beta"])
    ours.load_state_dict(theirs.state_dict())
    inputs = [torch.randn(p["batch"], p["features"], generator=gen)
              for _ in range(p["modalities"])]
    return "seed 002 WSMultiModalFusion", theirs, ours, inputs, lambda m, x: m(list(x))


def build(case: Case, selection: Selection) -> Built:
    p, device = case.params, selection.device
    anchor, theirs, ours, inputs, call = _pair(p)
    theirs, ours = theirs.to(device), ours.to(device)
    inputs = [x.to(device) for x in inputs]
    mode = case.op.split(".", 1)[1]
    direction = "fwd+bwd" if mode == "fwd+bwd" else "fwd"
    grad_inputs = mode != "inference"  # training-mode forward builds the autograd graph
    if mode == "inference":
        theirs.eval()
        ours.eval()
        # torch's fused inference kernel serves self-attention with an even head count
        native = (p["module"] == "MultiheadAttention" and p["Lq"] == p["Lk"]
                  and p["H"] % 2 == 0)
        anchor += " (native fast path)" if native else ""
    with torch.no_grad():
        grad_out = torch.ones_like(call(theirs, inputs)) if direction == "fwd+bwd" else None

    def make(name: str, kind: str, module: nn.Module, context: Callable[[], Any],
             **fields: Any) -> Impl:
        leaves = [x.detach().clone().requires_grad_(grad_inputs) for x in inputs]

        def forward() -> Tensor:
            with context(), (torch.no_grad() if mode == "inference"
                             else contextlib.nullcontext()):
                if direction == "fwd+bwd":
                    module.zero_grad(set_to_none=True)
                return call(module, leaves)
        return directional(name, kind, forward, direction,
                           leaves if direction == "fwd+bwd" else [], grad_out, **fields)

    impls = [make(anchor, "anchor", theirs, contextlib.nullcontext)]
    if p.get("op") == "sdpa":
        impls.append(make("mmattn.nn (op -> SDPA)", "mmattn", ours, _op_is_sdpa,
                          note="diagnostic: the module code without mmattn's op"))
    else:
        # what a user gets: automatic choice, no context (small plain calls run SDPA,
        # eval self-attention below NATIVE_INFERENCE_MAX_WORK torch's fused kernel)
        impls.append(make("mmattn[auto]", "mmattn", ours, contextlib.nullcontext,
                          backend="auto"))
        for backend in selection.backends:
            impl = make(f"mmattn[{backend}]", "mmattn", ours,
                        lambda backend=backend: mmattn.use_backend(backend), backend=backend)
            impl.skip = backend_skip(backend, device)
            impls.append(impl)

    oracle = torch.float64 if device == "cpu" else torch.float32

    def reference() -> list[Tensor]:
        model = copy.deepcopy(ours).to(oracle)
        leaves = [x.detach().to(oracle).requires_grad_(direction == "fwd+bwd") for x in inputs]

        def forward() -> Tensor:
            with mmattn.use_backend("reference"):
                return call(model, leaves)
        impl = directional("reference", "mmattn", forward, direction,
                           leaves if direction == "fwd+bwd" else [],
                           None if grad_out is None else grad_out.to(oracle))
        return [t.detach() for t in impl.check()]  # type: ignore[union-attr]

    return Built(impls, reference)
