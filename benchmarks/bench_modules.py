"""CPU modules: mmattn.nn against the modules they replace, anchors timed in the same run.

Cases (float32; modules in training mode with dropout 0 unless noted):

* ``MultiheadAttention`` at seed-like tiny size, E64 H4 B2 L8 self-attention: forward
  (``need_weights`` True and False), forward+backward, and inference (eval, no autograd,
  where PyTorch takes its native fast path); anchor ``nn.MultiheadAttention``;
* the module path alone at that size: mmattn's ``MultiheadAttention`` with the attention
  op swapped for ``F.scaled_dot_product_attention`` against ``nn.MultiheadAttention``
  (``need_weights=False``), i.e. the cost of the module code itself (projections,
  head views, mask handling), without mmattn's op and backends;
* ``MultiheadAttention`` at DESIGN's anchor, query B4 L256, key/value L1024, E512 H8,
  ``need_weights=True``;
* seed 000's ``CrossModalAttention`` at B8 Lq64 Lk197 E768 H12, forward and
  forward+backward, eval mode (dropout off: the reference backend draws dropout masks
  with PyTorch integer ops, far slower than a kernel); anchor the seed's module;
* seed 004's ``SparseAttention``, (B*H)=16 L2048 D64, block 64, keep ~0.2, same random
  blocks (same ``torch.manual_seed``); anchor the seed's module (full run only);
* the attention part alone, the op the modules call (``mmattn.attention.attend``, the
  pre-validated entry), at the tiny MHA shape (train-mode forward with weights,
  forward+backward, inference) and seed 000's VQA shape; anchor what the replaced
  module computes there: ``bmm, softmax, bmm`` with the weights (target >= 1.5x);
* decoding: ``MultiheadAttention`` cross-attention of one new query token over
  Lk=4096 memory tokens, B = H = 1, 2, 4, E = 64 H, inference ``need_weights=False``
  (as ``nn.TransformerDecoderLayer`` calls it).

Run: ``python benchmarks/bench_modules.py [--quick]`` (or ``python -m mmattn.bench --only
modules``); a full run writes ``benchmarks/results/modules_cpu.{csv,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from common import Table, time_ms
from torch import nn

import mmattn
import mmattn.nn.attention as mmattn_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import seed_models


@contextlib.contextmanager
def _attention_op_is_sdpa() -> Iterator[None]:
    """Swap the op the modules call for SDPA, to time the module code alone."""
    real = mmattn_attention.attend

    def sdpa(q, k, v, *_args, **_kwargs):
        return F.scaled_dot_product_attention(q, k, v), None

    mmattn_attention.attend = sdpa
    try:
        yield
    finally:
        mmattn_attention.attend = real


def _pair(*args, **kwargs) -> tuple[nn.MultiheadAttention, mmattn.nn.MultiheadAttention]:
    theirs = nn.MultiheadAttention(*args, **kwargs)
    ours = mmattn.nn.MultiheadAttention(*args, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def tiny_mha(table: Table, repeats: int) -> None:
    theirs, ours = _pair(64, 4, batch_first=True)
    x = torch.randn(2, 8, 64, requires_grad=True)
    torch.testing.assert_close(ours(x, x, x)[0], theirs(x, x, x)[0])
    case = "MHA E64 H4 B2 L8 self"
    for label, call in (
        ("fwd need_weights=True", lambda m: m(x, x, x)),
        ("fwd need_weights=False", lambda m: m(x, x, x, need_weights=False)),
        ("fwd+bwd", lambda m: m(x, x, x)[0].sum().backward()),
    ):
        anchor = time_ms(lambda call=call: call(theirs), repeats=repeats, warmup=20)
        mine = time_ms(lambda call=call: call(ours), repeats=repeats, warmup=20)
        table.add(f"{case} {label}", "nn.MultiheadAttention", anchor, mine, ">= 1.0x")
    theirs.eval()
    ours.eval()
    with torch.no_grad():
        anchor = time_ms(lambda: theirs(x, x, x), repeats=repeats, warmup=20)
        mine = time_ms(lambda: ours(x, x, x), repeats=repeats, warmup=20)
    table.add(f"{case} inference (eval, no grad)", "nn.MultiheadAttention (native fast path)",
              anchor, mine, ">= 1.0x")
    theirs.train()
    ours.train()
    with _attention_op_is_sdpa():
        anchor = time_ms(lambda: theirs(x, x, x, need_weights=False), repeats=repeats,
                         warmup=20)
        mine = time_ms(lambda: ours(x, x, x, need_weights=False), repeats=repeats, warmup=20)
    table.add(f"{case} module path only", "nn.MultiheadAttention need_weights=False", anchor,
              mine, ">= 1.0x", "diagnostic: mmattn's op replaced by SDPA")


def anchor_mha(table: Table, repeats: int) -> None:
    theirs, ours = _pair(512, 8, batch_first=True)
    query, memory = torch.randn(4, 256, 512), torch.randn(4, 1024, 512)
    with torch.no_grad():
        anchor = time_ms(lambda: theirs(query, memory, memory), repeats=repeats)
        mine = time_ms(lambda: ours(query, memory, memory), repeats=repeats)
    table.add("MHA Lq256 Lk1024 E512 H8 B4 need_weights=True fwd", "nn.MultiheadAttention",
              anchor, mine, ">= 1.0x")


def seed_cross_modal(table: Table, repeats: int) -> None:
    seed = seed_models.CrossModalAttention(768, 768, 768, 12).eval()
    ours = mmattn.nn.CrossModalAttention(768, 768, 768, 12).eval()
    ours.load_state_dict(seed.state_dict())
    query = torch.randn(8, 64, 768, requires_grad=True)
    memory = torch.randn(8, 197, 768, requires_grad=True)
    case = "seed 000 CrossModalAttention B8 Lq64 Lk197 E768 H12"
    with torch.no_grad():
        anchor = time_ms(lambda: seed(query, memory, memory), repeats=repeats)
        mine = time_ms(lambda: ours(query, memory, memory), repeats=repeats)
    table.add(f"{case} fwd", "seed module", anchor, mine, ">= 1.0x", "eval (dropout off)")

    def step(module: nn.Module) -> None:
        out, _weights = module(query, memory, memory)
        out.sum().backward()

    anchor = time_ms(lambda: step(seed), repeats=repeats)
    mine = time_ms(lambda: step(ours), repeats=repeats)
    table.add(f"{case} fwd+bwd", "seed module", anchor, mine, ">= 1.0x", "eval (dropout off)")


def seed_sparse(table: Table, repeats: int) -> None:
    seed, ours = seed_models.SparseAttention(64, 0.8), mmattn.nn.BlockSparseAttention(64, 0.8)
    q, k, v = (torch.randn(16, 2048, 64) for _ in range(3))

    def call(module: nn.Module) -> None:
        torch.manual_seed(0)  # the same random blocks in both modules
        module(q, k, v)

    with torch.no_grad():
        anchor = time_ms(lambda: call(seed), repeats=repeats)
        mine = time_ms(lambda: call(ours), repeats=repeats)
    table.add("seed 004 SparseAttention (B*H)16 L2048 D64 block64 keep~0.2 fwd", "seed module",
              anchor, mine, ">= 1.0x")


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention nn.MultiheadAttention (need_weights=True) and seed 000 compute:
    scores, softmax, weights @ v."""
    weights = torch.softmax(torch.matmul(q * scale, k.transpose(-2, -1)), dim=-1)
    return torch.matmul(weights, v), weights


def _attention_part(table: Table, case: str, shape: tuple[int, ...], repeats: int) -> None:
    b, h, lq, lk, d = shape
    # heads as strided views of (B, L, E) projections, as the modules produce them
    q = torch.randn(b, lq, h, d).transpose(1, 2).requires_grad_()
    k = torch.randn(b, lk, h, d).transpose(1, 2).requires_grad_()
    v = torch.randn(b, lk, h, d).transpose(1, 2).requires_grad_()
    scale = d ** -0.5

    def ours() -> tuple[torch.Tensor, torch.Tensor]:
        return mmattn_attention.attend(q, k, v, None, None, False, 0.0, scale, True)

    def theirs() -> tuple[torch.Tensor, torch.Tensor]:
        return _math_attention(q, k, v, scale)

    def step(fn) -> None:
        out, _weights = fn()
        out.sum().backward()

    torch.testing.assert_close(ours()[0], theirs()[0], rtol=1e-4, atol=1e-5)
    anchor = "bmm, softmax, bmm (need_weights math)"
    table.add(f"{case} fwd with weights", anchor, time_ms(theirs, repeats=repeats, warmup=3),
              time_ms(ours, repeats=repeats, warmup=3), ">= 1.5x",
              "mmattn.attention.attend: the modules' entry")
    table.add(f"{case} fwd+bwd", anchor, time_ms(lambda: step(theirs), repeats=repeats,
                                                 warmup=3),
              time_ms(lambda: step(ours), repeats=repeats, warmup=3), ">= 1.5x")
    with torch.no_grad():
        table.add(f"{case} inference (no grad)", anchor,
                  time_ms(theirs, repeats=repeats, warmup=3),
                  time_ms(ours, repeats=repeats, warmup=3), ">= 1.5x")


def attention_parts(table: Table, repeats: int, quick: bool) -> None:
    """The attention alone: mmattn's module entry against the math it replaces."""
    _attention_part(table, "MHA E64 H4 B2 L8 attention part", (2, 4, 8, 8, 16), repeats)
    if not quick:
        _attention_part(table, "seed 000 VQA B8 H12 Lq64 Lk197 attention part",
                        (8, 12, 64, 197, 64), max(3, repeats // 20))


def _decode_row(table: Table, heads: int, repeats: int) -> None:
    batch, embed = heads, 64 * heads
    theirs, ours = _pair(embed, heads, batch_first=True)
    theirs.eval()
    ours.eval()
    query, memory = torch.randn(batch, 1, embed), torch.randn(batch, 4096, embed)

    def call(module: nn.Module) -> torch.Tensor:
        return module(query, memory, memory, need_weights=False)[0]

    with torch.no_grad():
        torch.testing.assert_close(call(ours), call(theirs), rtol=1e-4, atol=1e-5)
        anchor = time_ms(lambda: call(theirs), repeats=repeats, warmup=3)
        mine = time_ms(lambda: call(ours), repeats=repeats, warmup=3)
    table.add(f"MHA decode Lq1 Lk4096 B{batch} H{heads} E{embed} inference",
              "nn.MultiheadAttention", anchor, mine, ">= 1.0x",
              "need_weights=False; the memory projection dominates")


def decoding(table: Table, repeats: int, quick: bool) -> None:
    """One new query token cross-attending Lk=4096 memory tokens (captioning / VQA
    decoders), inference, as nn.TransformerDecoderLayer calls it (need_weights=False)."""
    for heads in ((1, 4) if quick else (1, 2, 4)):
        _decode_row(table, heads, repeats)


def main(quick: bool = False) -> Table:
    table = Table("mmattn.nn modules vs the modules they replace (CPU, float32)")
    tiny_mha(table, repeats=50 if quick else 200)
    seed_cross_modal(table, repeats=3 if quick else 10)
    attention_parts(table, repeats=50 if quick else 200, quick=quick)
    decoding(table, repeats=5 if quick else 20, quick=quick)
    if not quick:
        anchor_mha(table, repeats=5)
        seed_sparse(table, repeats=3)
    print(table.render())
    if not quick:  # a quick run measures a subset: it does not replace the results
        print(f"written: {table.write('modules_cpu')}")
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    main(quick=parser.parse_args().quick)
