"""CPU attention: mmattn's fused C++ kernels against PyTorch, anchors timed in the same run.

Cases (float32, 2 threads unless the machine has fewer cores):

* dense forward, B4 H8 Lq256 Lk1024 D64: ``F.scaled_dot_product_attention``;
* forward + backward, same shape: SDPA forward + backward;
* ``return_weights=True``, same shape: the attention math of ``nn.MultiheadAttention``
  with ``need_weights=True`` (what ``F.multi_head_attention_forward`` runs between its
  projections: ``q * scale``, ``bmm(q, k^T)``, ``softmax``, ``bmm(weights, v)``, returning
  the per-head weights; no head averaging, which would only add work to the anchor);
* block-sparse self-attention, B4 H8 L2048 D64, blocks of 128, a random layout of density
  ~0.2 (seed 004's rule, ``BlockMask.random``): against ``1.2 x density x`` mmattn's own
  dense time, and against FlexAttention compiled with ``torch.compile`` and the same
  block layout (its compile time and our first call are reported too);
* decoding, one query row against 4096 keys, B = H = 1, 2, 4, D64 (split-KV forward):
  ``F.scaled_dot_product_attention``, 50 calls per timing sample;
* memory, forward + backward at Lq = Lk = 16384 (B1 H1 D64) in a fresh subprocess each:
  peak RSS growth, against SDPA; one Lq x Lk float32 matrix would be 1024 MB.

Run: ``python benchmarks/bench_attention.py [--quick]`` (or ``python -m mmattn.bench --only
attention``); writes ``benchmarks/results/attention_cpu.{csv,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch._inductor.config
import torch.nn.functional as F
from common import Table, time_ms

import mmattn
from mmattn import BlockMask
from mmattn.backends import cpu as cpu_backend

THREADS = min(2, os.cpu_count() or 1)
DENSE = (4, 8, 256, 1024, 64)  # B, H, Lq, Lk, D
SPARSE = (4, 8, 2048, 64, 128, 6)  # B, H, L, D, block, layout seed (density 0.195)
MEMORY_L = 16384


def paired_ms(anchor, ours, repeats: int, rounds: int = 3) -> tuple[float, float]:
    """Median times of ``anchor`` and ``ours`` measured alternately ``rounds`` times; the
    best round of each. On a shared machine a burst of load then hits both, not one."""
    anchor_ms, ours_ms = [], []
    for _ in range(rounds):
        anchor_ms.append(time_ms(anchor, repeats=repeats))
        ours_ms.append(time_ms(ours, repeats=repeats))
    return min(anchor_ms), min(ours_ms)


def _qkv(b: int, h: int, lq: int, lk: int, d: int, grad: bool = False):
    q, k, v = torch.randn(b, h, lq, d), torch.randn(b, h, lk, d), torch.randn(b, h, lk, d)
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


def dense_cases(table: Table, repeats: int) -> None:
    b, h, lq, lk, d = DENSE
    shape = f"B{b} H{h} Lq{lq} Lk{lk} D{d}"
    q, k, v = _qkv(b, h, lq, lk, d)
    torch.testing.assert_close(mmattn.cross_attention(q, k, v),
                               F.scaled_dot_product_attention(q, k, v), rtol=1e-4, atol=1e-5)
    sdpa, ours = paired_ms(lambda: F.scaled_dot_product_attention(q, k, v),
                           lambda: mmattn.cross_attention(q, k, v), repeats)
    table.add(f"dense fwd {shape}", "F.scaled_dot_product_attention", sdpa, ours, ">= 1.0x")

    qg, kg, vg = _qkv(b, h, lq, lk, d, grad=True)
    grad_out = torch.randn(b, h, lq, d)

    def sdpa_fwd_bwd():
        F.scaled_dot_product_attention(qg, kg, vg).backward(grad_out)

    def ours_fwd_bwd():
        mmattn.cross_attention(qg, kg, vg).backward(grad_out)

    sdpa, ours = paired_ms(sdpa_fwd_bwd, ours_fwd_bwd, repeats)
    table.add(f"fwd+bwd {shape}", "SDPA fwd+bwd", sdpa, ours, ">= 1.0x")

    scale = 1.0 / math.sqrt(d)
    q3, k3, v3 = (t.reshape(b * h, -1, d) for t in (q, k, v))

    def mha_math():
        weights = torch.softmax(torch.bmm(q3 * scale, k3.transpose(1, 2)), dim=-1)
        return torch.bmm(weights, v3), weights.view(b, h, lq, lk)

    ref_out, ref_w = mha_math()
    out, w = mmattn.cross_attention(q, k, v, return_weights=True)
    torch.testing.assert_close(w, ref_w, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out, ref_out.view(b, h, lq, d), rtol=1e-4, atol=1e-5)
    anchor, ours = paired_ms(mha_math,
                             lambda: mmattn.cross_attention(q, k, v, return_weights=True),
                             repeats)
    table.add(f"return_weights {shape}", "MHA need_weights math (bmm, softmax, bmm)", anchor,
              ours, ">= 1.5x", "per-head weights")


DECODE_LK, DECODE_CALLS = 4096, 50


def decode_cases(table: Table, repeats: int) -> None:
    """Decoding shapes (issue 12, section 3): Lq = 1 against many keys with few (batch,
    head) pairs, where only a split of the keys keeps every thread busy."""
    for bh in (1, 2, 4):
        q, k, v = _qkv(bh, bh, 1, DECODE_LK, 64)
        torch.testing.assert_close(mmattn.cross_attention(q, k, v),
                                   F.scaled_dot_product_attention(q, k, v), rtol=1e-4, atol=1e-5)
        def calls(fn, q=q, k=k, v=v):
            return lambda: [fn(q, k, v) for _ in range(DECODE_CALLS)]

        sdpa, ours = paired_ms(calls(F.scaled_dot_product_attention),
                               calls(mmattn.cross_attention), repeats, rounds=5)
        table.add(f"decode fwd B{bh} H{bh} Lq1 Lk{DECODE_LK} D64",
                  "F.scaled_dot_product_attention", sdpa / DECODE_CALLS, ours / DECODE_CALLS,
                  ">= 1.5x", f"per call, {DECODE_CALLS} calls per sample")


def _flex(q, k, v, layout: torch.Tensor, block: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        return layout[q_idx // block, kv_idx // block]

    length = q.shape[2]
    flex_mask = create_block_mask(mask_mod, None, None, length, length, device="cpu",
                                  BLOCK_SIZE=block)
    compiled = torch.compile(flex_attention)
    # Cold compile: inductor's on-disk caches would hide it on a second run.
    with torch._inductor.config.patch(force_disable_caches=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "dynamo_pgo force disabled"
        start = time.perf_counter()
        out = compiled(q, k, v, block_mask=flex_mask)
        compile_s = time.perf_counter() - start
    return (lambda: compiled(q, k, v, block_mask=flex_mask)), out, compile_s


def sparse_cases(table: Table, repeats: int, with_flex: bool) -> None:
    b, h, length, d, block, seed = SPARSE
    q, k, v = _qkv(b, h, length, length, d)
    block_mask = BlockMask.random(length, block, 0.8, seed=seed)
    density = block_mask.density
    shape = f"B{b} H{h} L{length} D{d} block{block} density {density:.3f}"

    start = time.perf_counter()
    ours_out = mmattn.cross_attention(q, k, v, block_mask=block_mask)
    first_call_s = time.perf_counter() - start
    dense = block_mask.to_dense()
    torch.testing.assert_close(
        ours_out, mmattn.cross_attention(q, k, v, attn_mask=dense, backend="reference"),
        rtol=1e-4, atol=1e-5)

    ours_dense, ours = paired_ms(
        lambda: mmattn.cross_attention(q, k, v),
        lambda: mmattn.cross_attention(q, k, v, block_mask=block_mask), repeats)
    sdpa_dense, sdpa_masked = paired_ms(
        lambda: F.scaled_dot_product_attention(q, k, v),
        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense), repeats, rounds=1)
    table.add(f"block-sparse fwd {shape}", "1.2 x density x mmattn dense",
              1.2 * density * ours_dense, ours, "speedup >= 1.0",
              f"mmattn dense {ours_dense:.1f} ms; SDPA dense {sdpa_dense:.1f} ms, "
              f"SDPA + bool mask {sdpa_masked:.1f} ms; our first call {first_call_s:.2f} s")
    if with_flex:
        flex_fn, flex_out, compile_s = _flex(q, k, v, block_mask.layout[0, 0], block)
        empty_rows = ~dense.any(-1)  # Flex returns 0 there too, but check visible rows only
        torch.testing.assert_close(ours_out[..., ~empty_rows[0, 0], :],
                                   flex_out[..., ~empty_rows[0, 0], :], rtol=1e-4, atol=1e-4)
        flex, ours = paired_ms(
            flex_fn, lambda: mmattn.cross_attention(q, k, v, block_mask=block_mask), repeats)
        table.add(f"block-sparse fwd {shape}", "compiled FlexAttention, same layout", flex,
                  ours, ">= 1.3x",
                  f"Flex compile + first call {compile_s:.1f} s; ours {first_call_s:.2f} s")


_MEMORY_SCRIPT = r"""
import json, sys, time
import torch
import torch.nn.functional as F
import mmattn

def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

torch.set_num_threads(int(sys.argv[2]))
n = int(sys.argv[3])
q, k, v = (torch.randn(1, 1, n, 64, requires_grad=True) for _ in range(3))
grad = torch.randn(1, 1, n, 64)
attend = {"mmattn": mmattn.cross_attention, "sdpa": F.scaled_dot_product_attention}[sys.argv[1]]
attend(q[:, :, :64], k[:, :, :64], v[:, :, :64]).sum().backward()  # load kernels, warm up
q.grad = k.grad = v.grad = None
with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS (VmHWM) to the current RSS
    f.write("5")
before = status_kb("VmRSS")
start = time.perf_counter()
attend(q, k, v).backward(grad)
seconds = time.perf_counter() - start
print(json.dumps({"peak_mb": (status_kb("VmHWM") - before) / 1024, "ms": seconds * 1e3}))
"""


def _memory_run(which: str) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, which, str(THREADS), str(MEMORY_L)],
        capture_output=True, text=True, check=True, timeout=900)
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_case(table: Table) -> None:
    ours, sdpa = _memory_run("mmattn"), _memory_run("sdpa")
    matrix_mb = MEMORY_L * MEMORY_L * 4 / 2**20
    table.add(f"memory fwd+bwd Lq=Lk={MEMORY_L} B1 H1 D64", "SDPA fwd+bwd", sdpa["ms"],
              ours["ms"], "peak growth: a few 100 MB",
              f"peak RSS growth: mmattn {ours['peak_mb']:.0f} MB, SDPA {sdpa['peak_mb']:.0f} MB "
              f"(one Lq x Lk fp32 matrix: {matrix_mb:.0f} MB)")


def main(quick: bool = False) -> Path | None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    repeats = 3 if quick else 10
    table = Table(f"CPU attention, float32, {THREADS} threads, kernels: "
                  f"{cpu_backend.kernel_isa()}")
    dense_cases(table, repeats)
    decode_cases(table, repeats)
    sparse_cases(table, repeats, with_flex=not quick)
    if not quick:
        memory_case(table)
    print(table.render())
    if quick:  # a quick run does not overwrite the committed full results
        return None
    path = table.write("attention_cpu")
    print(f"\nwritten: {path}")
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="3 repeats, no FlexAttention compile, no memory run")
    main(quick=parser.parse_args().quick)
