"""``ws_linear``: ``y = x @ (W * M)^T`` over a Watts-Strogatz layout, against dense masked
``F.linear`` and ``torch.sparse``, forward and forward+backward.

Anchors (each built from the same kept weights):

- ``dense masked F.linear``: ``F.linear(x, W * M)``, what seed 002 runs (the mask multiply
  is part of every call, as in training);
- ``torch.sparse CSR`` / ``COO``: ``torch.sparse.mm(W_sparse, x.T).T``; with gradients the
  sparse matrix is rebuilt from its kept values each call (``sparse_csr_tensor`` /
  ``sparse_coo_tensor``), as a layer storing only those values must (element layouts);
- ``torch.sparse BSR`` (block layouts) and, on CUDA, ``torch.sparse BSR (Triton)``
  (``torch.sparse._triton_ops.bsr_dense_mm``).

Sweeps: ``n`` (square ``n x n``), ``density`` (through ``k``, neighbours per row),
``beta`` (rewiring), ``block`` size (at one density, ~1/12: ``k = n / (12 block)``),
``batch`` and ``dtype``. FLOPs: ``2 batch P`` forward, ``6 batch P`` forward+backward
(``P`` kept weights). Bytes (the least a kernel moves; element size ``s``, index bytes
``I = 4 (nnz + rows + 1)``): forward ``s (batch n_in + batch n_out + P) + I``;
forward+backward adds ``dx = dy W`` (``s (batch n_out + P + batch n_in) + I``) and
``dW = dy^T x`` at the kept entries (``s (batch n_out + batch n_in + P) + I``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import mmattn
from benchmarks.core import (
    DTYPES,
    Built,
    Case,
    Impl,
    Selection,
    direction_of,
    directional,
    leaves_like,
    mmattn_impls,
    oracle_dtype,
    randn,
    shape_label,
)

# torch.sparse's notices, once per process, would interleave with the progress bar
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

FAMILY = "ws_linear"
OPS = ("ws_linear.fwd", "ws_linear.fwd+bwd")
KEYS = ("n", "k", "beta", "block", "batch", "dtype")

_TRAIN = ("fwd", "fwd+bwd")
_CPU_BASE = {"n": 3072, "k": 6, "beta": 0.3, "block": 1, "batch": 256, "dtype": "float32"}
_CUDA_BASE = {"n": 12288, "k": 24, "beta": 0.3, "block": 1, "batch": 4096,
              "dtype": "bfloat16"}
SWEEPS: dict[tuple[str, str], dict[str, Any]] = {
    ("cpu", "smoke"): {
        "base": {"n": 96, "k": 6, "beta": 0.3, "block": 1, "batch": 8, "dtype": "float32"},
        "density": ([6, 24], _TRAIN), "block": ([1, 16], ("fwd",)), "headline": _TRAIN,
    },
    ("cpu", "quick"): {"base": _CPU_BASE, "headline": _TRAIN},
    ("cpu", "default"): {
        "base": _CPU_BASE, "n": ([768, 3072, 6144], _TRAIN),
        "density": ([6, 30, 154, 308, 768, 1536], _TRAIN), "beta": ([0.0, 0.3, 1.0], ("fwd",)),
        "block": ([1, 16, 32, 64], _TRAIN), "batch": ([1, 32, 256, 2048], _TRAIN),
        "dtype": (["float32", "bfloat16", "float16"], _TRAIN), "headline": _TRAIN,
    },
    ("cpu", "full"): {
        "base": _CPU_BASE, "n": ([768, 3072, 6144, 12288], _TRAIN),
        "density": ([6, 30, 154, 308, 768, 1536], _TRAIN), "beta": ([0.0, 0.3, 1.0], _TRAIN),
        "block": ([1, 8, 16, 32, 64], _TRAIN), "batch": ([1, 8, 64, 256, 1024, 4096], _TRAIN),
        "dtype": (["float32", "bfloat16", "float16"], _TRAIN), "headline": _TRAIN,
    },
    ("cuda", "smoke"): {
        "base": {"n": 768, "k": 6, "beta": 0.3, "block": 1, "batch": 64, "dtype": "bfloat16"},
        "density": ([6, 24], _TRAIN), "block": ([1, 32], ("fwd",)), "headline": _TRAIN,
    },
    ("cuda", "quick"): {"base": _CUDA_BASE, "headline": _TRAIN},
    ("cuda", "default"): {
        "base": _CUDA_BASE, "n": ([3072, 12288, 24576], _TRAIN),
        "density": ([24, 122, 614, 1228, 3072], _TRAIN), "beta": ([0.0, 0.3, 1.0], ("fwd",)),
        "block": ([1, 16, 32, 64, 128], _TRAIN), "batch": ([64, 512, 4096, 16384], _TRAIN),
        "dtype": (["bfloat16", "float16", "float32"], _TRAIN), "headline": _TRAIN,
    },
    ("cuda", "full"): {
        "base": _CUDA_BASE, "n": ([3072, 12288, 24576, 49152], _TRAIN),
        "density": ([24, 122, 614, 1228, 3072, 6144], _TRAIN),
        "beta": ([0.0, 0.3, 1.0], _TRAIN), "block": ([1, 16, 32, 64, 128], _TRAIN),
        "batch": ([1, 64, 512, 4096, 16384], _TRAIN),
        "dtype": (["bfloat16", "float16", "float32"], _TRAIN), "headline": _TRAIN,
    },
}


def _block_k(n: int, block: int) -> int:
    """Neighbours per block row giving density ~1/12 (even: networkx rounds odd k down)."""
    return max(2, 2 * round(n / block / 12 / 2))


def cases(selection: Selection) -> list[Case]:
    spec = SWEEPS.get((selection.device, selection.preset.name))
    if spec is None:
        return []
    base = {**spec["base"], "dtype": selection.base_dtype(spec["base"]["dtype"])}

    def case(direction: str, params: dict[str, Any], sweep: str | None,
             headline: bool = False) -> Case:
        return Case(FAMILY, f"{FAMILY}.{direction}", params, shape_label(params, KEYS),
                    [sweep] if sweep else [], headline)

    out = [case(d, dict(base), None, headline=True) for d in spec["headline"]]
    for sweep, value in spec.items():
        if sweep in ("base", "headline"):
            continue
        values, directions = value
        if sweep == "dtype":
            values = selection.dtype_sweep(values)
        for v in values:
            if sweep == "density":
                params = {**base, "k": v}
            elif sweep == "block":
                params = {**base, "block": v, "k": _block_k(base["n"], v)}
            else:
                params = {**base, sweep: v}
            out.extend(case(d, params, sweep) for d in directions)
    return out


def kept_values(dense: Tensor, layout: mmattn.SparseLayout) -> Tensor:
    """The entries (blocks) of ``dense`` that ``layout`` keeps, in CSR order: ``(nnz,)`` or
    ``(nnz, bs, bs)`` (the layout of ``ws_linear``'s weight)."""
    rows, cols = layout.row_indices.long(), layout.col_indices.long()
    bs = layout.block_size
    if bs == 1:
        return dense[rows, cols]
    n_out, n_in = dense.shape
    blocks = dense.view(n_out // bs, bs, n_in // bs, bs).permute(0, 2, 1, 3)
    return blocks[rows, cols]


def build(case: Case, selection: Selection) -> Built:
    p, device = case.params, selection.device
    direction = direction_of(case.op)
    dtype = DTYPES[p["dtype"]]
    n, bs, batch = p["n"], p["block"], p["batch"]
    if n % bs:
        raise ValueError(f"n ({n}) must be a multiple of the block size ({bs})")
    layout = mmattn.SparseLayout.from_watts_strogatz(n, n, p["k"], p["beta"], seed=42,
                                                     block_size=bs)
    mask = layout.to_dense()
    dense = randn((n, n), torch.float32, "cpu", 5, scale=0.01) * mask
    values = kept_values(dense, layout)
    layout = layout.to(device)
    mask_f = mask.to(device=device, dtype=dtype)
    x0 = randn((batch, n), dtype, device, 6)
    w0, dense0 = values.to(device=device, dtype=dtype), dense.to(device=device, dtype=dtype)
    grad_out = randn((batch, n), dtype, device, 7) if direction != "fwd" else None
    training = direction != "fwd"

    def make(name: str, kind: str, fn: Any, weight: Tensor = w0,
             to_kept: Any = None, **fields: Any) -> Impl:
        x, w = leaves_like([x0, weight], training)
        post = None
        if to_kept is not None:  # compare the weight gradient at the kept entries
            def post(outs: list[Tensor]) -> list[Tensor]:
                return [*outs[:-1], to_kept(outs[-1])] if len(outs) == 3 else outs
        return directional(name, kind, lambda: fn(x, w), direction, [x, w], grad_out,
                           post=post, **fields)

    impls = mmattn_impls(
        selection,
        lambda backend: (lambda x, w: mmattn.ws_linear(x, w, layout, backend=backend)),
        make)
    impls.append(make("dense masked F.linear", "anchor", lambda x, w: F.linear(x, w * mask_f),
                      weight=dense0, to_kept=lambda g: kept_values(g, layout)))
    impls += _torch_sparse(dense0, layout, w0, direction, make)

    oracle = oracle_dtype(device)

    def reference() -> list[Tensor]:
        x, w = leaves_like([x0.to(oracle), w0.to(oracle)], training)
        impl = directional("reference", "mmattn",
                           lambda: mmattn.ws_linear(x, w, layout, backend="reference"),
                           direction, [x, w], None if grad_out is None else grad_out.to(oracle))
        return [t.detach() for t in impl.check()]  # type: ignore[union-attr]

    kept = layout.num_parameters
    size = torch.finfo(dtype).bits // 8
    index = 4 * (layout.nnz + n // bs + 1)
    fwd_bytes = size * (batch * n + batch * n + kept) + index
    if direction == "fwd":
        flops, moved = 2.0 * batch * kept, fwd_bytes
    else:
        flops, moved = 6.0 * batch * kept, fwd_bytes + 2 * (size * (2 * batch * n + kept) + index)
    return Built(impls, reference, flops=flops, bytes=moved,
                 params={"density": round(kept / (n * n), 5), "nnz": layout.nnz})


def _torch_sparse(dense: Tensor, layout: mmattn.SparseLayout, values: Tensor, direction: str,
                  make: Any) -> list[Impl]:
    """torch.sparse anchors: CSR, COO, BSR (blocks), BSR Triton (CUDA blocks)."""
    impls: list[Impl] = []
    bs = layout.block_size
    if direction == "fwd":
        for name, convert in (("torch.sparse CSR", lambda w: w.to_sparse_csr()),
                              ("torch.sparse COO", lambda w: w.to_sparse().coalesce())):
            sparse = convert(dense)
            impls.append(make(name, "anchor",
                              lambda x, _w, sparse=sparse: torch.sparse.mm(sparse, x.T).T))
        if bs > 1:
            bsr = dense.to_sparse_bsr(bs)
            impls.append(make("torch.sparse BSR", "anchor",
                              lambda x, _w: torch.sparse.mm(bsr, x.T).T))
            impls.append(_bsr_triton(bsr, make))
        return impls
    if bs > 1:
        reason = ("element-wise torch.sparse with weight gradients is timed on element "
                  "layouts (block=1)")
        return [Impl("torch.sparse CSR", "anchor", skip=reason),
                Impl("torch.sparse COO", "anchor", skip=reason)]
    n_out, n_in = layout.shape
    crow = layout.crow_indices.long()
    col = layout.col_indices.long()
    coo_index = torch.stack([layout.row_indices.long(), col])

    def csr(x: Tensor, w: Tensor) -> Tensor:
        return torch.sparse.mm(torch.sparse_csr_tensor(crow, col, w, (n_out, n_in)), x.T).T

    def coo(x: Tensor, w: Tensor) -> Tensor:
        weight = torch.sparse_coo_tensor(coo_index, w, (n_out, n_in), is_coalesced=True)
        return torch.sparse.mm(weight, x.T).T

    return [make("torch.sparse CSR", "anchor", csr), make("torch.sparse COO", "anchor", coo)]


def _bsr_triton(bsr: Tensor, make: Any) -> Impl:
    name = "torch.sparse BSR (Triton)"
    if not bsr.is_cuda:
        return Impl(name, "anchor", skip="torch.sparse's Triton kernels need CUDA tensors")
    try:
        from torch.sparse._triton_ops import bsr_dense_mm
    except ImportError as exc:
        return Impl(name, "anchor", skip=f"torch.sparse._triton_ops: {exc}")
    return make(name, "anchor", lambda x, _w: bsr_dense_mm(bsr, x.T.contiguous()).T)
