"""``cross_attention`` forward, backward and forward+backward against the attention
people run instead, on the same inputs.

Anchors:

- ``SDPA[<backend>]``: ``F.scaled_dot_product_attention`` pinned to each of its backends
  with ``torch.nn.attention.sdpa_kernel`` (CUDA: flash, efficient, cuDNN, math; CPU:
  flash, math); ``enable_gqa=True`` when ``Hq != Hkv``. A backend that refuses the case
  (dtype, head dim, GQA) is skipped with torch's message;
- ``naive matmul-softmax``: ``softmax(q k^T * scale) v`` (softmax in float32, GQA by
  ``repeat_interleave``): the attention ``nn.MultiheadAttention`` and the seeds compute;
- ``flash-attn`` (``flash_attn_func``) and ``xformers``
  (``memory_efficient_attention``) when importable, CUDA only.

Sweeps (each at the family's base shape otherwise): ``Lk`` with ``Lq`` small and ``Lq``
with ``Lk`` small (the cross-modal extremes: a few text queries over many image or audio
keys, and the reverse), ``head_dim``, ``gqa`` (``Hq / Hkv``), ``batch``, ``dtype`` and
``decode`` (one query over 4096 keys with ``B = H`` small: the split-KV forward).
FLOPs: ``2 B Hq Lq Lk (D + Dv)`` forward, 2.5x that backward (five matmuls instead of
two), 3.5x forward+backward.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
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

FAMILY = "cross_attention"
OPS = ("cross_attention.fwd", "cross_attention.bwd", "cross_attention.fwd+bwd")
KEYS = ("B", "Hq", "Hkv", "Lq", "Lk", "D", "dtype")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}

# (device, preset) -> base shape and sweep values. "dirs": directions of each sweep.
_CPU_BASE = {"B": 4, "Hq": 8, "Hkv": 8, "Lq": 256, "Lk": 1024, "D": 64, "dtype": "float32"}
_CUDA_BASE = {"B": 4, "Hq": 16, "Hkv": 16, "Lq": 1024, "Lk": 4096, "D": 64,
              "dtype": "bfloat16"}
_ALL = ("fwd", "bwd", "fwd+bwd")
_TRAIN = ("fwd", "fwd+bwd")
SWEEPS: dict[tuple[str, str], dict[str, Any]] = {
    ("cpu", "smoke"): {
        "base": {"B": 1, "Hq": 2, "Hkv": 2, "Lq": 16, "Lk": 32, "D": 16, "dtype": "float32"},
        "Lk": ([32, 64], {"Lq": 8}, _ALL), "Lq": ([32], {"Lk": 8}, ("fwd",)),
        "gqa": ([2], {}, ("fwd",)), "dtype": (["bfloat16"], {}, ("fwd",)),
        "headline": _TRAIN,
    },
    ("cpu", "quick"): {"base": _CPU_BASE, "headline": _TRAIN},
    ("cpu", "default"): {
        "base": _CPU_BASE,
        "Lk": ([128, 512, 2048, 8192], {"Lq": 128}, _ALL),
        "Lq": ([128, 512, 2048, 8192], {"Lk": 128}, _ALL),
        "head_dim": ([32, 64, 128], {}, _TRAIN), "gqa": ([1, 2, 4, 8], {}, _TRAIN),
        "batch": ([1, 4, 16], {}, _TRAIN),
        "dtype": (["float32", "bfloat16", "float16"], {}, _TRAIN),
        "decode": ([1, 2, 4], {"Lq": 1, "Lk": 4096}, ("fwd",)),
        "headline": _TRAIN,
    },
    ("cpu", "full"): {
        "base": _CPU_BASE,
        "Lk": ([64, 256, 1024, 4096, 16384], {"Lq": 64}, _ALL),
        "Lq": ([64, 256, 1024, 4096, 16384], {"Lk": 64}, _ALL),
        "head_dim": ([16, 32, 64, 128, 256], {}, _ALL), "gqa": ([1, 2, 4, 8], {}, _ALL),
        "batch": ([1, 2, 4, 8, 16, 32], {}, _ALL),
        "dtype": (["float32", "bfloat16", "float16"], {}, _ALL),
        "decode": ([1, 2, 4, 8], {"Lq": 1, "Lk": 4096}, ("fwd",)),
        "headline": _TRAIN,
    },
    ("cuda", "smoke"): {
        "base": {"B": 1, "Hq": 2, "Hkv": 2, "Lq": 64, "Lk": 128, "D": 64,
                 "dtype": "bfloat16"},
        "Lk": ([128, 256], {"Lq": 64}, _ALL), "headline": _TRAIN,
    },
    ("cuda", "quick"): {"base": _CUDA_BASE, "headline": _TRAIN},
    ("cuda", "default"): {
        "base": _CUDA_BASE,
        "Lk": ([512, 2048, 8192, 32768], {"Lq": 256}, _ALL),
        "Lq": ([512, 2048, 8192, 32768], {"Lk": 256}, _ALL),
        "head_dim": ([32, 64, 128, 256], {}, _TRAIN), "gqa": ([1, 2, 4, 8, 16], {}, _TRAIN),
        "batch": ([1, 4, 16, 64], {}, _TRAIN),
        "dtype": (["bfloat16", "float16", "float32"], {}, _TRAIN),
        "headline": _TRAIN,
    },
    ("cuda", "full"): {
        "base": _CUDA_BASE,
        "Lk": ([256, 1024, 4096, 16384, 65536], {"Lq": 128}, _ALL),
        "Lq": ([256, 1024, 4096, 16384, 65536], {"Lk": 128}, _ALL),
        "head_dim": ([32, 64, 96, 128, 256], {}, _ALL), "gqa": ([1, 2, 4, 8, 16], {}, _ALL),
        "batch": ([1, 2, 4, 8, 16, 32, 64], {}, _ALL),
        "dtype": (["bfloat16", "float16", "float32"], {}, _ALL),
        "headline": _TRAIN,
    },
}
# sweep name -> the parameter(s) it sets
_SWEPT = {"Lk": "Lk", "Lq": "Lq", "head_dim": "D", "batch": "B", "dtype": "dtype"}


def _case(op: str, params: dict[str, Any], sweep: str | None, headline: bool = False) -> Case:
    return Case(FAMILY, op, params, shape_label(params, KEYS),
                [sweep] if sweep else [], headline)


def cases(selection: Selection) -> list[Case]:
    spec = SWEEPS.get((selection.device, selection.preset.name))
    if spec is None:
        return []
    base = {**spec["base"], "dtype": selection.base_dtype(spec["base"]["dtype"])}
    out = [_case(f"{FAMILY}.{d}", dict(base), None, headline=True) for d in spec["headline"]]
    for sweep, value in spec.items():
        if sweep in ("base", "headline"):
            continue
        values, fixed, directions = value
        if sweep == "dtype":
            values = selection.dtype_sweep(values)
        for v in values:
            params = {**base, **fixed}
            if sweep == "gqa":
                params["Hkv"] = max(1, params["Hq"] // v)
            elif sweep == "decode":  # one new token, B = H = v: the split-KV forward's case
                params["B"] = params["Hq"] = params["Hkv"] = v
            else:
                params[_SWEPT[sweep]] = v
            out.extend(_case(f"{FAMILY}.{d}", dict(params), sweep) for d in directions)
    return out


def _sdpa_backends(device: str) -> list[tuple[str, Any]]:
    from torch.nn.attention import SDPBackend

    if device == "cuda":
        return [("flash", SDPBackend.FLASH_ATTENTION),
                ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)]
    return [("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH)]


def sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: Any = None,
         attn_mask: Tensor | None = None) -> Tensor:
    """SDPA, pinned to one of its backends when ``backend`` is given."""
    from torch.nn.attention import sdpa_kernel

    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, **gqa)


def naive(q: Tensor, k: Tensor, v: Tensor, scale: float,
          attn_mask: Tensor | None = None) -> Tensor:
    """``softmax(q k^T * scale [masked]) v``: the matmul-softmax attention of the seeds."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v)


def third_party(q: Tensor, k: Tensor, v: Tensor, scale: float
                ) -> list[tuple[str, Any, str | None]]:
    """(name, forward(q, k, v), skip reason) of flash-attn and xformers."""
    found = []
    on_cuda_half = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if importlib.util.find_spec("flash_attn") is not None:
        def flash(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            from flash_attn import flash_attn_func

            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                  softmax_scale=scale)
            return out.transpose(1, 2)
        found.append(("flash-attn", flash,
                      None if on_cuda_half else "flash-attn runs fp16/bf16 CUDA tensors"))
    if importlib.util.find_spec("xformers") is not None:
        def xformers(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            import xformers.ops as xops

            out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                  v.transpose(1, 2), scale=scale)
            return out.transpose(1, 2)
        reason = None if q.is_cuda else "xformers: CUDA tensors only here"
        if q.shape[1] != k.shape[1]:
            reason = "xformers takes GQA only in its 5-D (B, M, G, H, K) layout"
        found.append(("xformers", xformers, reason))
    return found


def build(case: Case, selection: Selection) -> Built:
    p, device = case.params, selection.device
    direction = direction_of(case.op)
    dtype = DTYPES[p["dtype"]]
    b, hq, hkv, lq, lk, d = p["B"], p["Hq"], p["Hkv"], p["Lq"], p["Lk"], p["D"]
    scale = 1.0 / math.sqrt(d)
    base = [randn((b, hq, lq, d), dtype, device, 1), randn((b, hkv, lk, d), dtype, device, 2),
            randn((b, hkv, lk, d), dtype, device, 3)]
    grad_out = randn((b, hq, lq, d), dtype, device, 4) if direction != "fwd" else None
    need_grad = direction != "fwd"

    def make(name: str, kind: str, fn: Any, **fields: Any) -> Impl:
        q, k, v = leaves_like(base, need_grad)  # each implementation its own leaves
        return directional(name, kind, lambda: fn(q, k, v), direction, [q, k, v], grad_out,
                           **fields)

    impls = mmattn_impls(
        selection,
        lambda backend: (lambda q, k, v: mmattn.cross_attention(q, k, v, scale=scale,
                                                                backend=backend)),
        make)
    for label, backend in _sdpa_backends(device):
        impls.append(make(f"SDPA[{label}]", "anchor",
                          lambda q, k, v, backend=backend: sdpa(q, k, v, scale, backend)))
    impls.append(make("naive matmul-softmax", "anchor",
                      lambda q, k, v: naive(q, k, v, scale)))
    for name, fn, reason in third_party(*base, scale):
        impls.append(make(name, "anchor", fn, skip=reason))

    oracle = oracle_dtype(device)

    def reference() -> list[Tensor]:
        leaves = leaves_like([t.to(oracle) for t in base], need_grad)
        impl = directional(
            "reference", "mmattn",
            lambda: mmattn.cross_attention(*leaves, scale=scale, backend="reference"),
            direction, leaves, None if grad_out is None else grad_out.to(oracle))
        return [t.detach() for t in impl.check()]  # type: ignore[union-attr]

    flops = 2.0 * b * hq * lq * lk * (d + d) * FLOP_FACTOR[direction]
    return Built(impls, reference, flops=flops)
