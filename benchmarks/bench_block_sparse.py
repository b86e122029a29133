"""Block-sparse attention: ``cross_attention(..., block_mask=BlockMask)`` against dense and
masked attention and against compiled FlexAttention with the same block layout.

Anchors:

- ``SDPA dense (no mask)``: what the block mask saves, timed but not compared (it computes
  another result);
- ``SDPA + bool mask``: the mask densified to ``(Bm, Hm, Lq, Lk)`` bool;
- ``naive masked matmul-softmax``: the seeds' ``masked_fill(-inf)`` then softmax;
- ``FlexAttention (compiled)``: ``torch.compile(flex_attention, dynamic=False)`` with
  :func:`to_flex_block_mask` of the same BlockMask (its compile + first call is the
  ``compile_s`` column; cold: inductor's on-disk caches are off for that call). Not in
  ``--quick``;
- ``torch.sparse BSR SDPA (Triton)`` (CUDA): ``torch.sparse._triton_ops``'s BSR
  attention (sampled_addmm, bsr_softmax, bsr_dense_mm), forward only.

Sweeps: ``density`` (a random layout, seed 004's rule, from 0.05 to 1), ``block`` size,
``pattern`` (causal, local window, BigBird: masks with partial blocks) and ``dtype``.
FLOPs count only the computed blocks: ``2 (D + Dv)`` per element of every nonempty block,
over batch and heads, the same count for every row (so a dense anchor's TFLOP/s is its
useful rate). The density plot draws the ideal ``density x (time at density 1)``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any

import torch
from torch import Tensor

import mmattn
from benchmarks.bench_attention import naive, sdpa
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

FAMILY = "block_sparse"
OPS = ("block_sparse.fwd", "block_sparse.fwd+bwd")
KEYS = ("B", "H", "L", "D", "block", "pattern", "density", "dtype")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}

_TRAIN = ("fwd", "fwd+bwd")
_DENSITIES = [0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0]
_CPU_BASE = {"B": 1, "H": 8, "L": 2048, "D": 64, "block": 64, "pattern": "random",
             "density": 0.2, "dtype": "float32"}
_CUDA_BASE = {"B": 2, "H": 16, "L": 8192, "D": 64, "block": 128, "pattern": "random",
              "density": 0.2, "dtype": "bfloat16"}
SWEEPS: dict[tuple[str, str], dict[str, Any]] = {
    ("cpu", "smoke"): {
        "base": {"B": 1, "H": 2, "L": 128, "D": 16, "block": 32, "pattern": "random",
                 "density": 0.5, "dtype": "float32"},
        "density": ([0.5, 1.0], _TRAIN), "headline": ("fwd",),
    },
    ("cpu", "quick"): {"base": _CPU_BASE, "headline": ("fwd",)},
    ("cpu", "default"): {
        "base": _CPU_BASE, "density": (_DENSITIES, _TRAIN), "block": ([32, 64, 128], ("fwd",)),
        "pattern": (["causal", "local", "bigbird"], ("fwd",)),
        "dtype": (["float32", "bfloat16"], ("fwd",)), "headline": _TRAIN,
    },
    ("cpu", "full"): {
        "base": _CPU_BASE, "density": (_DENSITIES, _TRAIN), "block": ([32, 64, 128], _TRAIN),
        "pattern": (["causal", "local", "bigbird"], _TRAIN),
        "dtype": (["float32", "bfloat16", "float16"], _TRAIN), "headline": _TRAIN,
    },
    ("cuda", "smoke"): {
        "base": {"B": 1, "H": 2, "L": 512, "D": 64, "block": 128, "pattern": "random",
                 "density": 0.5, "dtype": "bfloat16"},
        "density": ([0.5, 1.0], _TRAIN), "headline": ("fwd",),
    },
    ("cuda", "quick"): {"base": _CUDA_BASE, "headline": ("fwd",)},
    ("cuda", "default"): {
        "base": _CUDA_BASE, "density": (_DENSITIES, _TRAIN), "block": ([64, 128], _TRAIN),
        "pattern": (["causal", "local", "bigbird"], _TRAIN),
        "dtype": (["bfloat16", "float16", "float32"], ("fwd",)), "headline": _TRAIN,
    },
    ("cuda", "full"): {
        "base": _CUDA_BASE, "density": (_DENSITIES, _TRAIN), "block": ([32, 64, 128], _TRAIN),
        "pattern": (["causal", "local", "bigbird"], _TRAIN),
        "dtype": (["bfloat16", "float16", "float32"], _TRAIN), "headline": _TRAIN,
    },
}


def cases(selection: Selection) -> list[Case]:
    spec = SWEEPS.get((selection.device, selection.preset.name))
    if spec is None:
        return []
    base = {**spec["base"], "dtype": selection.base_dtype(spec["base"]["dtype"])}

    def case(direction: str, params: dict[str, Any], sweep: str | None,
             headline: bool = False) -> Case:
        if params["pattern"] != "random":
            params = {**params, "density": None}
        keys = [k for k in KEYS if params[k] is not None]
        return Case(FAMILY, f"{FAMILY}.{direction}", params, shape_label(params, keys),
                    [sweep] if sweep else [], headline)

    out = [case(d, dict(base), None, headline=True) for d in spec["headline"]]
    for sweep, value in spec.items():
        if sweep in ("base", "headline"):
            continue
        values, directions = value
        if sweep == "dtype":
            values = selection.dtype_sweep(values)
        for v in values:
            out.extend(case(d, {**base, sweep: v}, sweep) for d in directions)
    return out


def make_block_mask(params: dict[str, Any]) -> mmattn.BlockMask:
    length, block, pattern = params["L"], params["block"], params["pattern"]
    if pattern == "random":
        return mmattn.BlockMask.random(length, block, 1.0 - params["density"], seed=0)
    if pattern == "causal":
        return mmattn.BlockMask.causal(length, block)
    if pattern == "local":
        return mmattn.BlockMask.local_window(length, block, window=length // 8)
    if pattern == "bigbird":
        return mmattn.BlockMask.bigbird(length, block, window_blocks=1, num_global_blocks=1,
                                        num_random_blocks=2, seed=0)
    raise ValueError(f"unknown pattern {pattern!r}")


def computed_elements(block_mask: mmattn.BlockMask, batch: int, heads: int) -> int:
    """Elements of the nonempty blocks (clipped at the sequence ends), over batch and heads:
    the work a block-skipping kernel does."""
    (lq, lk), (bq, bk) = block_mask.seq_lengths, block_mask.block_size
    nbq, nbk = block_mask.num_blocks
    rows = torch.full((nbq,), bq)
    rows[-1] = lq - bq * (nbq - 1)
    cols = torch.full((nbk,), bk)
    cols[-1] = lk - bk * (nbk - 1)
    layout = block_mask.layout.cpu()
    per_bh = int((layout.long() * (rows[:, None] * cols[None, :])).sum())
    bm, hm = layout.shape[:2]
    return per_bh * (batch // bm) * (heads // hm)


def to_flex_block_mask(block_mask: mmattn.BlockMask, device: str | torch.device) -> Any:
    """The same mask as a FlexAttention ``BlockMask``.

    Flex keeps two block lists per query block: "full" blocks (no ``mask_mod`` applied) and
    the others, whose elements ``mask_mod`` decides. Ours map one to one: ``full`` to full,
    ``layout & ~full`` (our partial blocks) to the masked list. ``mask_mod`` reads our dense
    mask, so it states the whole mask (Flex's eager path applies it everywhere); compiled
    kernels read it in partial blocks only, and a new mask of the same shape reuses the
    compiled kernel (the captured tensor is an input, not a constant).
    """
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

    layout, full = block_mask.layout.to(device), block_mask.full.to(device)
    partial = layout & ~full

    def compress(selected: Tensor) -> tuple[Tensor, Tensor]:
        count = selected.sum(-1, dtype=torch.int32)
        # selected block columns first, ascending (a stable sort of "not selected")
        order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True)
        return count, order.to(torch.int32).contiguous()

    kv_num, kv_indices = compress(partial)
    full_num, full_indices = compress(full)
    dense = block_mask.to_dense().to(device)
    bm, hm = dense.shape[:2]

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return dense[b if bm > 1 else 0, h if hm > 1 else 0, q_idx, kv_idx]

    return FlexBlockMask.from_kv_blocks(kv_num, kv_indices, full_num, full_indices,
                                        BLOCK_SIZE=tuple(block_mask.block_size),
                                        mask_mod=mask_mod,
                                        seq_lengths=tuple(block_mask.seq_lengths))


_COMPILED: dict[str, Any] = {}


def compiled_flex_attention() -> Any:
    """One ``torch.compile(flex_attention, dynamic=False)`` for the whole run: each new
    shape compiles once, masks of a shape reuse it (up to 256 specialisations)."""
    if "flex" not in _COMPILED:
        import torch._dynamo.config
        from torch.nn.attention.flex_attention import flex_attention

        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(256, getattr(torch._dynamo.config, name)))
        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["flex"]


@contextlib.contextmanager
def cold_compile() -> Any:
    """Inductor's on-disk caches off: the compile time a first run pays."""
    import torch._inductor.config

    with torch._inductor.config.patch(force_disable_caches=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "dynamo_pgo force disabled"
        yield


def _flex_impl(selection: Selection, block_mask: mmattn.BlockMask, scale: float,
               gqa: bool, direction: str, make: Any) -> Impl:
    name = "FlexAttention (compiled)"
    if not selection.preset.flex:
        return Impl(name, "anchor", skip=f"not compiled in --suite {selection.preset.name} "
                                         "(compiling takes about 15 s per shape on CPU)")
    if selection.device == "cpu" and direction != "fwd":
        # Asking anyway would fail inside dynamo, which then runs flex_attention uncompiled
        # (seconds per call) in every later case.
        return Impl(name, "anchor", skip="FlexAttention has no backward on CPU (torch "
                                         f"{torch.__version__})")
    flex_mask = to_flex_block_mask(block_mask, selection.device)
    flex = compiled_flex_attention()
    kwargs = {"enable_gqa": True} if gqa else {}
    impl = make(name, "anchor",
                lambda q, k, v: flex(q, k, v, block_mask=flex_mask, scale=scale, **kwargs),
                compiled=True, memory=selection.device == "cuda",
                note="" if selection.device == "cuda" else
                "memory not measured on CPU (the worker would compile again)")
    check = impl.check

    def cold_check() -> Any:
        try:
            with cold_compile():
                return check()  # type: ignore[misc]
        except Exception:
            # a failed compile leaves flex_attention's frame marked to run uncompiled:
            # forget it, so that later cases compile again
            import torch._dynamo

            torch._dynamo.reset()
            raise
    impl.check = cold_check
    return impl


def _bsr_impl(q: Tensor, dense: Tensor, block: int, direction: str, make: Any) -> Impl:
    name = "torch.sparse BSR SDPA (Triton)"
    if not q.is_cuda:
        return Impl(name, "anchor", skip="torch.sparse's Triton kernels need CUDA tensors")
    if direction != "fwd":
        return Impl(name, "anchor", skip="no autograd through torch.sparse's BSR attention")
    try:
        from torch.sparse._triton_ops import _scaled_dot_product_attention as bsr_attention
    except ImportError as exc:
        return Impl(name, "anchor", skip=f"torch.sparse._triton_ops: {exc}")
    if bsr_attention is None:
        return Impl(name, "anchor", skip="torch.sparse._triton_ops needs triton")
    b, h, lq, _ = q.shape
    mask = dense.expand(b, h, lq, dense.shape[-1]).to(q.dtype).contiguous().to_sparse_bsr(block)
    return make(name, "anchor", lambda q, k, v: bsr_attention(q, k, v, mask))


def build(case: Case, selection: Selection) -> Built:
    p, device = case.params, selection.device
    direction = direction_of(case.op)
    dtype = DTYPES[p["dtype"]]
    b, h, length, d = p["B"], p["H"], p["L"], p["D"]
    scale = 1.0 / math.sqrt(d)
    block_mask = make_block_mask(p).to(device)
    dense = block_mask.to_dense()
    base = [randn((b, h, length, d), dtype, device, seed) for seed in (1, 2, 3)]
    grad_out = randn((b, h, length, d), dtype, device, 4) if direction != "fwd" else None
    need_grad = direction != "fwd"

    def make(name: str, kind: str, fn: Any, **fields: Any) -> Impl:
        q, k, v = leaves_like(base, need_grad)
        return directional(name, kind, lambda: fn(q, k, v), direction, [q, k, v], grad_out,
                           **fields)

    impls = mmattn_impls(
        selection,
        lambda backend: (lambda q, k, v: mmattn.cross_attention(
            q, k, v, block_mask=block_mask, scale=scale, backend=backend)),
        make)
    impls += [
        make("SDPA dense (no mask)", "anchor", lambda q, k, v: sdpa(q, k, v, scale),
             comparable=False, note="computes every block: a different result"),
        make("SDPA + bool mask", "anchor",
             lambda q, k, v: sdpa(q, k, v, scale, attn_mask=dense)),
        make("naive masked matmul-softmax", "anchor",
             lambda q, k, v: naive(q, k, v, scale, attn_mask=dense),
             note="" if bool(dense.any(-1).all()) else
             "NaN for queries with no visible key (as the seeds), counted as 0 in max err; "
             "the NaN spreads into its dK/dV"),
        _flex_impl(selection, block_mask, scale, False, direction, make),
        _bsr_impl(base[0], dense, p["block"], direction, make),
    ]

    oracle = oracle_dtype(device)

    def reference() -> list[Tensor]:
        leaves = leaves_like([t.to(oracle) for t in base], need_grad)
        impl = directional(
            "reference", "mmattn",
            lambda: mmattn.cross_attention(*leaves, block_mask=block_mask, scale=scale,
                                           backend="reference"),
            direction, leaves, None if grad_out is None else grad_out.to(oracle))
        return [t.detach() for t in impl.check()]  # type: ignore[union-attr]

    flops = 2.0 * (d + d) * computed_elements(block_mask, b, h) * FLOP_FACTOR[direction]
    return Built(impls, reference, flops=flops,
                 params={"measured_density": round(block_mask.density, 4)})
