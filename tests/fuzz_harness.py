"""Property-based fuzzing of mmattn against a float64 oracle (driven by tests/test_fuzz.py).

A *case* is a dict of plain Python values (shapes, dtype name, views, masks, seeds): the
tensors are rebuilt from it deterministically, so a failure prints a one-line reproducer
that runs from the repository root::

    python -c "import sys; sys.path[:0] = ['tests']; import fuzz_harness as f; \
f.run('attention', {...}, 'cpu/avx2')"

Every case runs on every backend *variant* that supports it: the variants are discovered
at run time from :mod:`mmattn.backends` (``cpu`` once per instruction-set build the
machine has, via ``MMATTN_CPU_ISA``), and a variant is tested whenever its
``*_unsupported`` says None for the call. A backend that starts supporting calls is
picked up without a change here; backends that run CPU tensors through an interpreter or
emulator (Triton under ``TRITON_INTERPRET=1``, the CUDA emulation) get small cases only,
and few of them (:data:`SLOW_CASES`).

Each result (outputs, gradients) is checked with DESIGN's rule (tests/tolerance.py):
error against the float64 oracle <= 2 x the error of the same-dtype PyTorch reference +
atol. The oracle and the same-dtype reference are written here in plain PyTorch,
independently of mmattn's reference backend (which is itself under test). The oracle
computes in float64 from the same (rounded) inputs. The same-dtype reference is
PyTorch's own way in that dtype, in both of its usual formulations: attention as
``F.scaled_dot_product_attention``'s math (``sqrt(scale)`` on q and on k) and as plain
math (``(q @ k^T) * scale``), each also with the head dim summed in reverse and in a
seeded random order, half inputs in float32 with outputs rounded; ws_linear as
``F.linear`` and as a product of the transposed operands. Its error is the largest of
these: equally valid float32 computations differ by more than 2x in max error often
enough (by 10x on rows of two keys with logits near 900), on small results, to fail a
correct kernel against the luckiest one. That widens the bound only by what float32
itself leaves open: every reference is a plain float32 computation a user could have
written.

Environment: ``MMATTN_FUZZ_COLLECT=1`` records failures instead of raising (to list every
failing property); ``MMATTN_FUZZ_REPORT=path`` writes the error statistics (ours, theirs
per result) and the failures as JSON at the end of the session.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from tolerance import ATOL, rule_terms

import mmattn
from mmattn import BlockMask, SparseLayout, backends
from mmattn.dispatch import BackendUnavailableError
from mmattn.philox import dropout_keep_mask

F64 = torch.float64
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
_EMULATOR = Path(mmattn.__file__).resolve().parent / "_C_emu.abi3.so"
# Interpreted / emulated backends: at most this many cases per op and session, and only
# cases whose work (elements of the score or weight matrix times head dim) is below
# SLOW_WORK.
SLOW_CASES = 12
SLOW_WORK = 2**15
COLLECT = os.environ.get("MMATTN_FUZZ_COLLECT", "") not in ("", "0")

# statistics: key "op|variant|dtype|amplitude|result" -> [(ours, theirs), ...]
STATS: dict[str, list[tuple[float, float]]] = defaultdict(list)
CASES: Counter[str] = Counter()  # "op|variant" -> cases run
FAILURES: list[str] = []
_slow_used: Counter[str] = Counter()


# ---- backend variants -----------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """One way of running a backend: the backend name and, for ``cpu``, the forced
    instruction-set build (``cuda/emu``: the CUDA kernels on the SIMT emulator)."""

    backend: str
    isa: str | None = None

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.isa}" if self.isa else self.backend

    @property
    def slow(self) -> bool:
        """Runs CPU tensors through an interpreter or emulator (triton, cuda)."""
        return self.backend not in ("reference", "cpu")

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if self.isa is None:
            yield
            return
        if self.isa == "emu":
            from mmattn.backends import cuda

            with cuda.emulation():
                yield
            return
        before = os.environ.get("MMATTN_CPU_ISA")
        os.environ["MMATTN_CPU_ISA"] = self.isa
        try:
            yield
        finally:
            if before is None:
                del os.environ["MMATTN_CPU_ISA"]
            else:
                os.environ["MMATTN_CPU_ISA"] = before


@lru_cache(maxsize=1)
def variants() -> tuple[Variant, ...]:
    """Every backend of :data:`mmattn.backends.NAMES`, ``cpu`` once per ISA build this
    machine runs (the kernels read ``MMATTN_CPU_ISA`` on every call)."""
    found: list[Variant] = []
    for name in backends.NAMES:
        if name == "cuda" and not torch.cuda.is_available() and _EMULATOR.exists():
            found.append(Variant("cuda", "emu"))
            continue
        if name != "cpu":
            found.append(Variant(name))
            continue
        isas = []
        for isa in ("avx512", "avx2", "generic"):
            with Variant("cpu", isa).active():
                try:
                    if backends.get("cpu").kernel_isa() == isa:
                        isas.append(isa)
                except (RuntimeError, AttributeError):  # no such build / no extension
                    pass
        # no ISA build found (no extension): one plain variant, which reports unsupported
        found.extend([Variant("cpu", isa) for isa in isas] or [Variant("cpu")])
    return tuple(found)


def variant(name: str) -> Variant:
    backend, _, isa = name.partition("/")
    return Variant(backend, isa or None)


def _use_slow(op: str, v: Variant, work: int) -> bool:
    if not v.slow:
        return True
    if work > SLOW_WORK or _slow_used[f"{op}|{v.name}"] >= SLOW_CASES:
        return False
    _slow_used[f"{op}|{v.name}"] += 1
    return True


# ---- reporting ------------------------------------------------------------------------------

def reproducer(op: str, case: dict[str, Any], variant_name: str) -> str:
    return ("python -c \"import sys; sys.path[:0] = ['tests']; import fuzz_harness as f; "
            f"f.run({op!r}, {case!r}, {variant_name!r})\"")


def _fail(message: str, op: str, case: dict[str, Any], variant_name: str) -> None:
    line = f"{message}\n  reproduce: {reproducer(op, case, variant_name)}"
    if COLLECT:
        FAILURES.append(line)
        return
    raise AssertionError(line)


def _check(op: str, case: dict[str, Any], v: Variant, result: str, ours: torch.Tensor | None,
           refs: list[torch.Tensor], oracle: torch.Tensor, dtype: torch.dtype,
           repro: tuple[str, dict[str, Any]] | None = None) -> None:
    """DESIGN's rule for one result against the worse of the same-dtype references;
    records (ours, theirs) for the statistics. ``repro``: the (op, case) a reproducer
    reruns, when it is not this one."""
    repro_op, repro_case = repro or (op, case)
    if ours is None:
        _fail(f"[{op}] {v.name}: {result} missing", repro_op, repro_case, v.name)
        return
    if ours.dtype != dtype:
        _fail(f"[{op}] {v.name}: {result} has dtype {ours.dtype}, expected {dtype}",
              repro_op, repro_case, v.name)
        return
    terms = [rule_terms(ours, ref, oracle) for ref in refs]
    err, theirs, bound = max(terms, key=lambda t: t[1])
    key = f"{op}|{v.name}|{case['dtype']}|{case.get('amp', 1)}|{result}"
    if math.isfinite(err):
        STATS[key].append((err, theirs))
    if not err <= bound:  # NaN fails too
        _fail(f"[{op}] {v.name} {case['dtype']} amplitude {case.get('amp', 1)}: {result} "
              f"error {err:.3e} > 2 x reference error {theirs:.3e} + atol {ATOL[dtype]:.0e}",
              repro_op, repro_case, v.name)


def write_report(path: str) -> None:
    with open(path, "w") as handle:
        json.dump({"stats": STATS, "cases": CASES, "failures": FAILURES}, handle)


def run(op: str, case: dict[str, Any], variant_name: str | None = None) -> None:
    """Check one case (on one variant, or on every variant that supports it)."""
    chosen = [variant(variant_name)] if variant_name not in (None, "-") else None
    {"attention": check_attention, "block_mask": check_block_mask,
     "ws_linear": check_ws_linear}[op](case, chosen)


# ---- tensors from a case --------------------------------------------------------------------

def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _viewed(shape: tuple[int, int, int, int], view: str, gen: torch.Generator,
            amp: float, dtype: torch.dtype) -> tuple[torch.Tensor, Callable[[torch.Tensor],
                                                                         torch.Tensor]]:
    """A base tensor and the view of it that is fed to the op, ``(B, H, L, D)``:
    contiguous, ``blhd`` ((B, L, H, D).transpose(1, 2), as nn.MultiheadAttention makes),
    ``sliced`` (every other position of a wider tensor), ``expanded`` (stride 0 over the
    batch, or the heads when B is 1)."""
    b, h, length, d = shape
    if view == "blhd":
        base = torch.randn(b, length, h, d, generator=gen)

        def fn(t):
            return t.transpose(1, 2)
    elif view == "sliced":
        base = torch.randn(b, h, 2 * length, d + 2, generator=gen)

        def fn(t):
            return t[:, :, ::2, 1:d + 1]
    elif view == "expanded":
        small = (1, h, length, d) if b > 1 else (b, 1, length, d)
        base = torch.randn(small, generator=gen)

        def fn(t):
            return t.expand(b, h, length, d)
    else:
        base = torch.randn(b, h, length, d, generator=gen)

        def fn(t):
            return t
    return (base * amp).to(dtype), fn


# ---- block masks: constructors and independent dense rules --------------------------------

def _centres(lq: int, lk: int) -> torch.Tensor:
    i = torch.arange(lq)
    return i if lq == lk else ((2 * i + 1) * lk) // (2 * max(lq, 1))


def _structured(shape: tuple[int, ...], blocks: tuple[int, int], seed: int) -> torch.Tensor:
    """Blocks that are empty, full or random, so every block class occurs."""
    gen = _generator(seed)
    *lead, lq, lk = shape
    bq, bk = blocks
    kind = torch.randint(0, 3, (*lead, -(-lq // bq), -(-lk // bk)), generator=gen)
    kind = kind.repeat_interleave(min(bq, lq), -2).repeat_interleave(min(bk, lk), -1)
    kind = kind[..., :lq, :lk]
    return (kind == 2) | ((kind == 1) & (torch.rand(shape, generator=gen) > 0.5))


def build_block_mask(spec: dict[str, Any], lq: int, lk: int) -> tuple[BlockMask, torch.Tensor]:
    """The BlockMask of ``spec`` and its element mask ``(Bm, Hm, Lq, Lk)`` by the
    constructor's documented rule, computed here without the library."""
    if "combine" in spec:
        left, dense_l = build_block_mask(spec["left"], lq, lk)
        right, dense_r = build_block_mask(spec["right"], lq, lk)
        if spec["combine"] == "|":
            return left | right, dense_l | dense_r
        return left & right, dense_l & dense_r
    blocks = tuple(spec["blocks"])
    kind = spec["kind"]
    rows, cols = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    if kind == "dense":
        dense = _structured((*spec["lead"], lq, lk), blocks, spec["seed"])
        return BlockMask.from_dense_mask(dense, blocks), dense
    if kind == "causal":
        return BlockMask.causal((lq, lk), blocks), (cols <= rows)[None, None]
    if kind == "local_window":
        w = spec["window"]
        centres = _centres(lq, lk)[:, None]
        dense = (cols - centres).abs() <= w
        return BlockMask.local_window((lq, lk), blocks, w), dense[None, None]
    if kind == "global_tokens":
        gq, gk = min(spec["num"][0], lq), min(spec["num"][1], lk)
        dense = (rows < gq) | (cols < gk)
        return BlockMask.global_tokens((lq, lk), blocks, (gq, gk)), dense[None, None]
    if kind == "strided":
        stride, summary, causal = spec["stride"], min(spec["summary"], spec["stride"]), \
            spec["causal"]
        dense = (rows // stride == cols // stride) | (cols % stride >= stride - summary)
        if causal:
            dense = dense & (cols <= rows)
        return (BlockMask.strided((lq, lk), blocks, stride, summary, causal),
                dense[None, None])
    if kind == "modality":
        q_lengths = _split(lq, spec["parts"], spec["seed"])
        k_lengths = _split(lk, spec["parts"], spec["seed"] + 1)
        allow = torch.rand(len(q_lengths), len(k_lengths), generator=_generator(
            spec["seed"])) > 0.4
        q_seg = torch.repeat_interleave(torch.arange(len(q_lengths)), torch.tensor(q_lengths))
        k_seg = torch.repeat_interleave(torch.arange(len(k_lengths)), torch.tensor(k_lengths))
        dense = allow[q_seg[:, None], k_seg[None, :]]
        mask = BlockMask.modality(q_lengths, k_lengths, allow, blocks)
        return mask, dense[None, None]
    # kinds defined by a block layout (every kept block full): the element mask is the
    # layout repeated over each block, the layout rule checked separately
    if kind == "random":
        mask = BlockMask.random((lq, lk), blocks, spec["sparsity"], seed=spec["seed"])
        layout = torch.rand(-(-lq // blocks[0]), -(-lk // blocks[1]),
                            generator=_generator(spec["seed"])) > spec["sparsity"]
    elif kind == "bigbird":
        mask = BlockMask.bigbird((lq, lk), blocks, seed=spec["seed"])
        layout = mask.layout[0, 0]
    else:  # watts_strogatz
        nbq, nbk = -(-lq // blocks[0]), -(-lk // blocks[1])
        k = min(spec["k"], nbk)
        mask = BlockMask.watts_strogatz((lq, lk), blocks, k, spec["beta"], seed=spec["seed"])
        layout = (mmattn.watts_strogatz_mask(nbq, nbk, k, spec["beta"], spec["seed"])
                  if nbq and nbk else torch.zeros(nbq, nbk, dtype=torch.bool))
        if nbq and nbk:
            layout[torch.arange(nbq), _centres(nbq, nbk)] = True
    # each block row repeated over its rows (a block longer than L covers L)
    dense = layout.repeat_interleave(min(blocks[0], lq), 0)[:lq]
    dense = dense.repeat_interleave(min(blocks[1], lk), 1)[:, :lk]
    return mask, dense[None, None]


def _split(total: int, parts: int, seed: int) -> list[int]:
    """``total`` cut into ``parts`` lengths (some may be 0)."""
    cuts = sorted(torch.randint(0, total + 1, (parts - 1,), generator=_generator(seed)).tolist())
    bounds = [0, *cuts, total]
    return [b - a for a, b in itertools.pairwise(bounds)]


# ---- attention: the plain-PyTorch reference and oracle ---------------------------------------

REVERSED, SHUFFLED = "/reversed", "/shuffled"
# The same-dtype references: both formulations, each also with the head dim summed in
# reverse and in a seeded random order. At large logits a row's error is its scores'
# rounding times the softmax's sensitivity, and which of several equally valid float32
# sums rounds luckily varies by 10x on few-key rows (Lk 2, amplitude 30: 2.2e-4 to
# 2.3e-3 on the same input).
REFERENCES = tuple(form + order for form in ("sdpa", "plain")
                   for order in ("", REVERSED, SHUFFLED))


def attention_math(q, k, v, *, bool_mask, float_mask, kpm, causal, scale, keep, p,
                   return_weights, compute, sdpa_scaling):
    """Plain attention in ``compute`` (float32 or float64): the rule's same-dtype
    reference (float32 compute for float32/half inputs, outputs rounded to the input dtype)
    and, in float64, the oracle. Rows with no visible key give 0 and an lse of +inf.
    ``sdpa_scaling``: as SDPA's math, ``sqrt(scale)`` on q and on k before the product and
    ``torch.softmax`` / ``torch.logsumexp``; else the product times ``scale`` and an
    explicit max-shifted exp / sum (the two round differently, also in float64)."""
    in_dtype = q.dtype
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    group = qc.shape[1] // kc.shape[1]
    kc, vc = kc.repeat_interleave(group, 1), vc.repeat_interleave(group, 1)
    if sdpa_scaling and scale > 0:
        root = math.sqrt(scale)
        scores = (qc * root) @ (kc * root).transpose(-1, -2)
    else:
        scores = (qc @ kc.transpose(-1, -2)) * scale
    if float_mask is not None:
        scores = scores + float_mask.to(compute)
    lq, lk = scores.shape[-2:]
    visible = torch.ones(scores.shape, dtype=torch.bool)
    if bool_mask is not None:
        visible = visible & bool_mask
    if kpm is not None:
        visible = visible & ~kpm[:, None, None, :]
    if causal:
        visible = visible & torch.ones(lq, lk, dtype=torch.bool).tril()
    visible = visible & (scores > -math.inf)
    scores = scores.masked_fill(~visible, -math.inf)
    has = visible.any(-1, keepdim=True)
    if sdpa_scaling:
        # rows with no visible key get finite scores, so no NaN reaches the gradients
        safe_scores = torch.where(has, scores, 0.0)
        probs = torch.where(has, torch.softmax(safe_scores, -1), 0.0)
        lse = torch.where(has.squeeze(-1), torch.logsumexp(safe_scores, -1), math.inf)
    else:
        if lk:
            row_max = scores.detach().amax(-1, keepdim=True)
        else:
            row_max = scores.new_zeros(*scores.shape[:-1], 1)
        row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
        e = torch.exp(scores - row_max).masked_fill(~visible, 0.0)
        denom = e.sum(-1, keepdim=True)
        safe = torch.where(has, denom, 1.0)
        probs = torch.where(has, e / safe, 0.0)
        lse = torch.where(has, row_max + torch.log(safe), math.inf).squeeze(-1)
    if keep is not None:
        factor = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
        probs = probs * (keep.to(compute) * factor)
    out = probs @ vc
    out_dtype = in_dtype if compute != F64 or in_dtype == F64 else F64
    lse_dtype = F64 if in_dtype == F64 or compute == F64 else torch.float32
    weights = probs.to(out_dtype) if return_weights else None
    return out.to(out_dtype), weights, lse.to(lse_dtype)


def _attention_inputs(case: dict[str, Any]) -> dict[str, Any]:
    """Leaf tensors (in the case's dtype) and how to view / combine them."""
    b, hq, hkv, lq, lk, d, dv = case["shape"]
    dtype, amp = DTYPES[case["dtype"]], case["amp"]
    gen = _generator(case["seed"])
    vq, vk, vv = case["views"]
    q, fq = _viewed((b, hq, lq, d), vq, gen, amp, dtype)
    k, fk = _viewed((b, hkv, lk, d), vk, gen, amp, dtype)
    v, fv = _viewed((b, hkv, lk, dv), vv, gen, amp, dtype)
    inputs: dict[str, Any] = {"q": q, "k": k, "v": v, "views": (fq, fk, fv)}
    spec = case["mask"]
    inputs["mask"] = None
    if spec is not None:
        target = (b, hq, lq, lk)
        shape = tuple(1 if broadcast else size
                      for broadcast, size in zip(spec["broadcast"], target, strict=True))
        shape = shape[4 - spec["ndim"]:]
        if spec["kind"] == "bool":
            mask = torch.rand(shape, generator=gen) < spec["density"]
        else:
            mask = torch.randn(shape, generator=gen) * spec["amp"]
            hide = torch.rand(shape, generator=gen) < spec["density"]
            mask = mask.masked_fill(hide, -math.inf).to(DTYPES[spec["dtype"]])
        inputs["mask"] = mask
    inputs["kpm"] = (None if case["kpm"] is None
                     else torch.rand(b, lk, generator=gen) < case["kpm"])
    inputs["block"] = None
    if case["block"] is not None:
        inputs["block"] = build_block_mask(case["block"], lq, lk)
    gen_out = _generator(case["seed"] + 1)
    inputs["g_out"] = torch.randn(b, hq, lq, dv, generator=gen_out).to(dtype)
    inputs["g_w"] = torch.randn(b, hq, lq, lk, generator=gen_out).to(dtype)
    inputs["g_lse"] = torch.randn(b, hq, lq, generator=gen_out)
    return inputs


def _attention_run(case: dict[str, Any], inputs: dict[str, Any], how: str | Variant,
                   ) -> dict[str, torch.Tensor]:
    """Outputs and gradients of one implementation: a Variant, one of
    :data:`REFERENCES` (the same-dtype references) or "oracle"."""
    b, hq, _hkv, lq, lk, d, _dv = case["shape"]
    spec = case["mask"]
    oracle = how == "oracle"
    cast = (lambda t: t.to(F64)) if oracle else (lambda t: t)
    grads = set(case["grad"])
    leaves = {}
    for name in ("q", "k", "v"):
        leaves[name] = cast(inputs[name]).detach().requires_grad_(name in grads)
    mask = inputs["mask"]
    if mask is not None and mask.is_floating_point():
        mask = cast(mask).detach().requires_grad_("mask" in grads)
        leaves["mask"] = mask
    fq, fk, fv = inputs["views"]
    q, k, v = fq(leaves["q"]), fk(leaves["k"]), fv(leaves["v"])
    mask_arg = mask
    if mask is not None and spec["expanded"]:
        mask_arg = mask.expand(b, hq, lq, lk)  # the caller hands over stride-0 dims itself
    dropout = case["dropout"]
    p, seed = dropout if dropout else (0.0, None)
    scale = case["scale"] if case["scale"] is not None else 1.0 / math.sqrt(d)
    if isinstance(how, Variant):
        block = inputs["block"][0] if inputs["block"] is not None else None
        with how.active():
            res = mmattn.cross_attention(
                q, k, v, attn_mask=mask_arg, key_padding_mask=inputs["kpm"], block_mask=block,
                is_causal=case["causal"], dropout_p=p, scale=case["scale"],
                return_weights=case["weights"], return_lse=case["lse"], backend=how.backend,
                dropout_seed=seed)
            res = res if isinstance(res, tuple) else (res,)
            out = res[0]
            weights = res[1] if case["weights"] else None
            lse = res[-1] if case["lse"] else None
            results = _attention_grads(case, inputs, leaves, out, weights, lse)
        return results
    bool_mask = mask if mask is not None and mask.dtype == torch.bool else None
    float_mask = mask if mask is not None and mask.is_floating_point() else None
    if inputs["block"] is not None:
        dense = inputs["block"][1]
        bool_mask = dense if bool_mask is None else bool_mask & dense
    keep = dropout_keep_mask(seed, p, b, hq, lq, lk) if p > 0 else None
    compute = F64 if (oracle or case["dtype"] == "float64") else torch.float32
    if how.endswith(REVERSED):
        # the same scores summed in the opposite order over the head dim; flipped inside
        # the graph, so dq / dk come back in the leaves' order
        q, k = q.flip(-1), k.flip(-1)
    elif how.endswith(SHUFFLED):
        order = torch.randperm(d, generator=_generator(case["seed"] + 2))
        q, k = q[..., order], k[..., order]
    out, weights, lse = attention_math(
        q, k, v, bool_mask=bool_mask, float_mask=float_mask, kpm=inputs["kpm"],
        causal=case["causal"], scale=scale, keep=keep, p=p, return_weights=case["weights"],
        compute=compute, sdpa_scaling=how.startswith("sdpa"))
    return _attention_grads(case, inputs, leaves, out, weights, lse)


def _attention_grads(case, inputs, leaves, out, weights, lse) -> dict[str, torch.Tensor]:
    results = {"out": out.detach()}
    if case["weights"]:
        results["weights"] = weights.detach()
    if case["lse"]:
        results["lse"] = lse.detach()
    wanted = [n for n in ("q", "k", "v", "mask") if n in leaves and leaves[n].requires_grad]
    if not wanted:
        return results
    outputs, grads_out = [out], [inputs["g_out"].to(out.dtype)]
    if case["weights"]:
        outputs.append(weights)
        grads_out.append(inputs["g_w"].to(weights.dtype))
    if case["lse"]:
        outputs.append(lse)
        grads_out.append(torch.where(torch.isinf(lse.detach()), 0.0,
                                     inputs["g_lse"].to(lse.dtype)))
    grads = torch.autograd.grad(outputs, [leaves[n] for n in wanted], grads_out,
                                allow_unused=True)
    for name, g in zip(wanted, grads, strict=True):
        results["d" + name] = torch.zeros_like(leaves[name]) if g is None else g
    return results


def _attention_supported(case, inputs, v: Variant, op: str = "attention") -> bool:
    b, hq, _hkv, lq, lk, d, dv = case["shape"]
    fq, fk, fv = inputs["views"]
    needs_grad = bool(case["grad"])
    q = fq(inputs["q"].detach().requires_grad_(needs_grad))
    mask = inputs["mask"]
    if mask is not None and mask.is_floating_point():
        mask = mask.detach().requires_grad_("mask" in case["grad"])
    dropout = case["dropout"]
    try:
        with v.active():
            mmattn.attention.attention_backend(
                q, fk(inputs["k"]), fv(inputs["v"]), attn_mask=mask,
                key_padding_mask=inputs["kpm"],
                block_mask=None if inputs["block"] is None else inputs["block"][0],
                is_causal=case["causal"], dropout_p=dropout[0] if dropout else 0.0,
                scale=case["scale"], return_weights=case["weights"], backend=v.backend)
    except BackendUnavailableError:
        return False
    return _use_slow(op, v, b * hq * lq * lk * max(d, dv, 1))


def check_attention(case: dict[str, Any], chosen: list[Variant] | None = None) -> None:
    """Every result of ``cross_attention`` on every variant under the rule."""
    inputs = _attention_inputs(case)
    oracle = _attention_run(case, inputs, "oracle")
    references = [_attention_run(case, inputs, how) for how in REFERENCES]
    dtype = DTYPES[case["dtype"]]
    expected_dtype = {"out": dtype, "weights": dtype,
                      "lse": F64 if dtype == F64 else torch.float32,
                      "dq": dtype, "dk": dtype, "dv": dtype,
                      "dmask": None if inputs["mask"] is None else inputs["mask"].dtype}
    for v in chosen or variants():
        if not _attention_supported(case, inputs, v):
            continue
        CASES[f"attention|{v.name}"] += 1
        try:
            ours = _attention_run(case, inputs, v)
        except Exception as exc:  # a crash is a failed property too
            _fail(f"[attention] {v.name}: raised {type(exc).__name__}: {exc}",
                  "attention", case, v.name)
            continue
        for result, want in oracle.items():
            _check("attention", case, v, result, ours.get(result),
                   [ref[result] for ref in references], want, expected_dtype[result])


# ---- block masks ------------------------------------------------------------------------------

def check_block_mask(case: dict[str, Any], chosen: list[Variant] | None = None) -> None:
    """A BlockMask against its constructor's rule (every field, storage, ``|``/``&``),
    then attention with it against the oracle given the dense mask."""
    lq, lk = case["lengths"]
    try:
        mask, dense = build_block_mask(case["spec"], lq, lk)
    except Exception as exc:
        _fail(f"[block_mask] construction raised {type(exc).__name__}: {exc}", "block_mask",
              case, "-")
        return
    CASES["block_mask|construction"] += 1
    problems = block_mask_problems(mask, dense)
    for problem in problems:
        _fail(f"[block_mask] {problem}", "block_mask", case, "-")
    if problems or case["attention"] is None:
        return
    b, hq, hkv, d, dv = case["attention"]["shape"]
    bm, hm = mask.layout.shape[:2]
    b, hq = bm if bm > 1 else b, hm if hm > 1 else hq  # the mask's batch and heads
    hkv = math.gcd(hkv, hq)
    attention_case = {
        "shape": (b, hq, hkv, lq, lk, d, dv), "dtype": case["attention"]["dtype"],
        "amp": case["attention"]["amp"], "views": ("contiguous", "blhd", "contiguous"),
        "mask": None, "kpm": None, "causal": case["attention"]["causal"],
        "block": case["spec"], "dropout": None, "scale": None, "weights": False,
        "lse": True, "grad": ("q", "k", "v"), "seed": case["seed"]}
    inputs = _attention_inputs(attention_case)
    oracle = _attention_run(attention_case, inputs, "oracle")
    references = [_attention_run(attention_case, inputs, how) for how in REFERENCES]
    dtype = DTYPES[attention_case["dtype"]]
    for v in chosen or variants():
        if not _attention_supported(attention_case, inputs, v, "block_mask"):
            continue
        CASES[f"block_mask|{v.name}"] += 1
        try:
            ours = _attention_run(attention_case, inputs, v)
        except Exception as exc:
            _fail(f"[block_mask] attention on {v.name} raised {type(exc).__name__}: {exc}",
                  "block_mask", case, v.name)
            continue
        for result, want in oracle.items():
            expected = torch.float32 if result == "lse" and dtype != F64 else dtype
            _check("block_mask", attention_case, v, result, ours.get(result),
                   [ref[result] for ref in references], want, expected,
                   repro=("block_mask", case))


def block_mask_problems(mask: BlockMask, dense: torch.Tensor) -> list[str]:
    """What is wrong with ``mask`` as a description of ``dense`` (Bm, Hm, Lq, Lk)."""
    problems = []
    (lq, lk), (bq, bk) = mask.seq_lengths, mask.block_size
    nbq, nbk = -(-lq // bq), -(-lk // bk)
    bm, hm = mask.layout.shape[:2]
    dense = dense.expand(bm, hm, lq, lk)
    if not torch.equal(mask.to_dense(), dense):
        problems.append("to_dense() differs from the constructor's rule")
    pq, pk = min(bq, lq), min(bk, lk)
    if tuple(mask.partial_masks.shape[1:]) != (pq, pk):
        problems.append(f"partial_masks {tuple(mask.partial_masks.shape)} not (P, {pq}, {pk})")
        return problems
    # per block, from the dense mask (the grid tiled by (pq, pk): blocks past L are cut)
    padded = torch.zeros(bm, hm, nbq * pq, nbk * pk, dtype=torch.bool)
    padded[:, :, :lq, :lk] = dense
    by_block = padded.view(bm, hm, nbq, pq, nbk, pk).permute(0, 1, 2, 4, 3, 5)
    in_range = torch.zeros(nbq * pq, nbk * pk, dtype=torch.bool)
    in_range[:lq, :lk] = True
    in_range = in_range.view(nbq, pq, nbk, pk).permute(0, 2, 1, 3)
    counts = by_block.sum(dim=(4, 5))
    area = in_range.sum(dim=(2, 3))
    if not torch.equal(mask.layout, counts > 0):
        problems.append("layout differs from the blocks that hold a visible element")
    if not torch.equal(mask.full, counts == area):
        problems.append("full differs from the blocks whose in-range elements are all visible")
    partial = (counts > 0) & (counts < area)
    if not torch.equal(mask.partial_index >= 0, partial):
        problems.append("partial_index marks other blocks than the partial ones")
    elif partial.any():
        stored = mask.partial_masks[mask.partial_index[partial].long()]
        if not torch.equal(stored, by_block[partial]):
            problems.append("a stored partial mask differs from its block")
    distinct = {tuple(m.flatten().tolist()) for m in mask.partial_masks}
    if len(distinct) != mask.num_stored_masks:
        problems.append("partial_masks stores a mask twice")
    used = set(mask.partial_index[mask.partial_index >= 0].tolist())
    if used != set(range(mask.num_stored_masks)):
        problems.append("partial_masks holds a mask no block uses")
    # compressed indices, both directions
    for name, num, idx, grid in (("kv", mask.kv_num_blocks, mask.kv_indices, mask.layout),
                                 ("q", mask.q_num_blocks, mask.q_indices,
                                  mask.layout.transpose(-1, -2))):
        width = grid.shape[-1]
        if not torch.equal(num, grid.sum(-1, dtype=torch.int32)):
            problems.append(f"{name}_num_blocks differs from the layout")
            continue
        columns = torch.arange(width).expand(grid.shape)
        expected = torch.where(grid, columns, width).sort(-1).values
        expected = torch.where(expected == width, 0, expected).to(torch.int32)
        if not torch.equal(idx, expected):
            problems.append(f"{name}_indices differ from the layout")
    total = dense.numel()
    if total and abs(mask.element_density - dense.double().mean().item()) > 1e-12:
        problems.append("element_density differs from the dense mask")
    return problems


# ---- ws_linear ----------------------------------------------------------------------------

def _ws_layout(case: dict[str, Any]) -> SparseLayout:
    out_f, in_f, bs = case["out"], case["in"], case["bs"]
    spec = case["layout"]
    if spec["kind"] == "ws":
        k = min(spec["k"], -(-in_f // bs))
        return SparseLayout.from_watts_strogatz(out_f, in_f, k, spec["beta"], seed=spec["seed"],
                                                block_size=bs)
    mask = torch.rand(out_f, in_f, generator=_generator(spec["seed"])) < spec["density"]
    return SparseLayout.from_mask(mask, block_size=bs)


def _dense_weight(values: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """``(out, in)`` weight with the kept values scattered (differentiable), written
    without the library's helper."""
    bs = layout.block_size
    rows, cols = layout.row_indices.long(), layout.col_indices.long()
    nbr, nbc = -(-layout.out_features // bs), -(-layout.in_features // bs)
    grid = values.new_zeros(nbr, nbc, bs, bs)
    grid = grid.index_put((rows, cols), values.reshape(-1, bs, bs))
    dense = grid.permute(0, 2, 1, 3).reshape(nbr * bs, nbc * bs)
    return dense[:layout.out_features, :layout.in_features]


def check_ws_linear(case: dict[str, Any], chosen: list[Variant] | None = None) -> None:
    layout = _ws_layout(case)
    dtype, amp = DTYPES[case["dtype"]], case["amp"]
    gen = _generator(case["seed"])
    lead, in_f, out_f, bs = tuple(case["lead"]), case["in"], case["out"], case["bs"]
    view = case["view"]
    n = math.prod(lead)
    if view == "transposed" and len(lead) == 1:
        x = (torch.randn(in_f, n, generator=gen) * amp).to(dtype)

        def fx(t):
            return t.t()
    elif view == "sliced":
        x = (torch.randn(*lead, 2 * in_f + 1, generator=gen) * amp).to(dtype)

        def fx(t):
            return t[..., 1::2]
    elif view == "expanded" and lead:
        x = (torch.randn(*lead[:-1], 1, in_f, generator=gen) * amp).to(dtype)

        def fx(t):
            return t.expand(*lead, in_f)
    else:
        x = (torch.randn(*lead, in_f, generator=gen) * amp).to(dtype)

        def fx(t):
            return t
    shape = (layout.nnz,) if bs == 1 else (layout.nnz, bs, bs)
    values = (torch.randn(shape, generator=gen) * amp).to(dtype)
    bias = (torch.randn(out_f, generator=gen) * amp).to(dtype) if case["bias"] else None
    g_y = torch.randn(*lead, out_f, generator=gen).to(dtype)
    grads = set(case["grad"])

    def run_one(how) -> dict[str, torch.Tensor]:
        cast = (lambda t: t.to(F64)) if how == "oracle" else (lambda t: t)
        leaves = {"x": cast(x).detach().requires_grad_("x" in grads),
                  "values": cast(values).detach().requires_grad_("values" in grads)}
        if bias is not None:
            leaves["bias"] = cast(bias).detach().requires_grad_("bias" in grads)
        xin = fx(leaves["x"])
        if isinstance(how, Variant):
            with how.active():
                y = mmattn.ws_linear(xin, leaves["values"], layout, leaves.get("bias"),
                                     backend=how.backend)
                results = _ws_grads(y, leaves, g_y)
            return results
        w = _dense_weight(leaves["values"], layout)
        if how == "transposed":  # (W @ x^T)^T: the other operand order and blocking
            flat = xin.reshape(-1, in_f)
            y = (w @ flat.t()).t().reshape(*xin.shape[:-1], out_f)
            if leaves.get("bias") is not None:
                y = y + leaves["bias"]
        else:
            y = torch.nn.functional.linear(xin, w, leaves.get("bias"))
        return _ws_grads(y, leaves, g_y)

    oracle = run_one("oracle")
    references = [run_one(how) for how in ("linear", "transposed")]
    for v in chosen or variants():
        with v.active():
            unsupported = backends.get(v.backend).ws_linear_unsupported(fx(x))
        if unsupported is not None:
            continue
        if not _use_slow("ws_linear", v, max(n, 1) * out_f * in_f):
            continue
        CASES[f"ws_linear|{v.name}"] += 1
        try:
            ours = run_one(v)
        except Exception as exc:
            _fail(f"[ws_linear] {v.name}: raised {type(exc).__name__}: {exc}", "ws_linear",
                  case, v.name)
            continue
        for result, want in oracle.items():
            _check("ws_linear", case, v, result, ours.get(result),
                   [ref[result] for ref in references], want, dtype)


def _ws_grads(y, leaves, g_y) -> dict[str, torch.Tensor]:
    results = {"y": y.detach()}
    wanted = [n for n, t in leaves.items() if t.requires_grad]
    if wanted:
        grads = torch.autograd.grad(y, [leaves[n] for n in wanted], g_y.to(y.dtype),
                                    allow_unused=True)
        for name, g in zip(wanted, grads, strict=True):
            results["d" + name] = torch.zeros_like(leaves[name]) if g is None else g
    return results


# ---- the report (python tests/fuzz_harness.py report.json) -----------------------------------

def summarise(path: str) -> str:
    """A table of the error ratios ours / same-dtype reference (max and p99) per op,
    variant, dtype and amplitude, over all results, from a MMATTN_FUZZ_REPORT file."""
    with open(path) as handle:
        data = json.load(handle)
    groups: dict[tuple[str, ...], list[float]] = defaultdict(list)
    for key, pairs in data["stats"].items():
        op, name, dtype, amp, _ = key.split("|")
        for ours, theirs in pairs:
            if theirs > 0:
                groups[(op, name, dtype, amp)].append(ours / theirs)
    lines = [f"cases: {dict(sorted(data['cases'].items()))}",
             "op | variant | dtype | amplitude | results | max ratio | p99 ratio"]
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], float(k[3]))):
        ratios = torch.tensor(groups[key], dtype=F64)
        lines.append(f"{' | '.join(key)} | {ratios.numel()} | {ratios.max().item():.2f} | "
                     f"{torch.quantile(ratios, 0.99).item():.2f}")
    failing = Counter(re.sub(r"error .*", "", f.splitlines()[0]) for f in data["failures"])
    lines.append(f"failures: {len(data['failures'])}")
    lines += [f"  {count} x {what}" for what, count in failing.most_common()]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(summarise(sys.argv[1]))
