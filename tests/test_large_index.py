"""Standing guard of issue 11: indices past 2**31 (and 2**32) on the fused CPU path.

Scores of ``Lq * Lk > 2**31`` elements are never materialised (8.6 GB in float32 here):
the kernel streams them, so peak memory stays at the inputs' size; sampled rows are
compared with a float64 oracle that rebuilds their dropout mask from the Philox counters
(``i * Lk + j``: its low word passes 2**31, and its high word is used past 2**32).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fuzz_harness import attention_math
from tolerance import assert_within_rule, max_error

import mmattn
from mmattn import BlockMask
from mmattn._extension import has_kernel
from mmattn.philox import philox_uniform

pytestmark = pytest.mark.skipif(not has_kernel("fused_attention_fwd", "CPU"),
                                reason="mmattn._C with the CPU kernels is not built")
TESTS = Path(__file__).resolve().parent
F64 = torch.float64


def _worse(refs: list[torch.Tensor], oracle: torch.Tensor) -> torch.Tensor:
    """The same-dtype reference with the larger error (SDPA's math or plain math: see
    tests/fuzz_harness.py)."""
    return max(refs, key=lambda ref: max_error(ref, oracle))


def _keep(seed: int, p: float, rows: torch.Tensor, cols: torch.Tensor, lk: int,
          head: int = 0) -> torch.Tensor:
    """Philox keep mask of elements (rows x cols) of head ``head``: global counters."""
    flat = rows[:, None].long() * lk + cols[None, :].long()
    uniform = philox_uniform(seed, flat & 0xFFFFFFFF, torch.full_like(flat, head), flat >> 32)
    return uniform >= p


# Runs in a fresh interpreter so its peak RSS measures this call alone.
_DENSE_SCRIPT = r"""
import json, math, sys, torch
sys.path[:0] = [sys.argv[1]]
import mmattn
from test_large_index import _keep
from fuzz_harness import attention_math

def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

L, p, seed = 46341, 0.25, 5  # L * L = 2**31 + 4633
gen = torch.Generator().manual_seed(0)
q, k = torch.randn(1, 1, L, 1, generator=gen), torch.randn(1, 1, L, 1, generator=gen)
v, mask = torch.randn(1, 1, L, 2, generator=gen), torch.randn(1, 1, 1, L, generator=gen)
before = peak_mb()
out, lse = mmattn.cross_attention(q, k, v, attn_mask=mask, is_causal=True, dropout_p=p,
                                  dropout_seed=seed, return_lse=True, backend="cpu")
after = peak_mb()
rows = torch.tensor([0, 1, 777, L // 2, L - 3, L - 2, L - 1])  # the last row passes 2**31
keys = torch.arange(L)
keep = _keep(seed, p, rows, keys, L)[None, None]
visible = (keys[None, :] <= rows[:, None])[None, None]
results = {"before_mb": before, "after_mb": after, "rows": rows.tolist()}
for name, compute, sdpa in (("oracle", torch.float64, False), ("sdpa", torch.float32, True),
                            ("plain", torch.float32, False)):
    o, _, s = attention_math(q[:, :, rows], k, v, bool_mask=visible, float_mask=mask,
                             kpm=None, causal=False, scale=1.0, keep=keep, p=p,
                             return_weights=False, compute=compute, sdpa_scaling=sdpa)
    results[name] = [o.tolist(), s.tolist()]
results["ours"] = [out[:, :, rows].tolist(), lse[:, :, rows].tolist()]
print(json.dumps(results))
"""


def test_dense_forward_past_two_to_the_31():
    """B = H = 1, Lq = Lk = 46341 (> 2**31 scores), causal, a broadcast float mask and
    dropout: the fused forward streams the scores (peak memory far below their 8.6 GB)
    and the sampled rows, the last one with counters past 2**31, match the oracle."""
    result = subprocess.run([sys.executable, "-c", _DENSE_SCRIPT, str(TESTS)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout.strip().splitlines()[-1])
    scores_mb = 46341**2 * 4 / 2**20
    assert data["after_mb"] - data["before_mb"] < 256, (data["before_mb"], data["after_mb"],
                                                        scores_mb)
    for index, name in enumerate(("out", "lse")):
        ours = torch.tensor(data["ours"][index], dtype=torch.float32)
        oracle = torch.tensor(data["oracle"][index], dtype=F64)
        refs = [torch.tensor(data[how][index], dtype=torch.float32) for how in ("sdpa", "plain")]
        assert_within_rule(ours, _worse(refs, oracle), oracle, name=name)


def test_block_sparse_forward_backward_past_two_to_the_32():
    """Lq = Lk = 65537 (Lq * Lk > 2**32) with a block mask that keeps the far corner only:
    the last block row of 1024 queries on the causal diagonal and the lone last query with
    the first and last key blocks. Dropout counters there pass 2**32 (the third counter
    word); out, lse and every gradient are compared in full with the oracle on the kept
    rows and keys (everything else must be exactly 0 / +inf)."""
    length, block, p, seed = 65537, 1024, 0.3, 11
    nb = -(-length // block)  # 65
    layout = torch.zeros(nb, nb, dtype=torch.bool)
    layout[nb - 2, nb - 2] = layout[nb - 2, nb - 1] = True
    layout[nb - 1, 0] = layout[nb - 1, nb - 1] = True
    block_mask = (BlockMask.from_layout(layout, length, block)
                  & BlockMask.causal(length, block))
    assert block_mask.num_partial_blocks == 1  # the diagonal block
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 1, length, 2, generator=gen).requires_grad_()
    k = torch.randn(1, 1, length, 2, generator=gen).requires_grad_()
    v = torch.randn(1, 1, length, 3, generator=gen).requires_grad_()
    out, lse = mmattn.cross_attention(q, k, v, block_mask=block_mask, dropout_p=p,
                                      dropout_seed=seed, return_lse=True, backend="cpu")
    grad_out = torch.randn(out.shape, generator=gen)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)

    rows = torch.arange((nb - 2) * block, length)  # 1025 rows
    keys = torch.cat([torch.arange(block), torch.arange((nb - 2) * block, length)])
    assert int(rows[-1]) * length + int(keys[-1]) >= 2**32
    # the element rule on the window (the kept blocks lie inside it): layout and causal
    visible = layout[rows // block][:, keys // block] & (keys[None, :] <= rows[:, None])
    keep = _keep(seed, p, rows, keys, length)[None, None]

    def window(compute, sdpa_scaling):
        leaves = [t.detach()[:, :, idx].to(compute if compute == F64 else torch.float32)
                  .requires_grad_() for t, idx in ((q, rows), (k, keys), (v, keys))]
        o, _, s = attention_math(*leaves, bool_mask=visible[None, None], float_mask=None,
                                 kpm=None, causal=False, scale=1 / math.sqrt(2), keep=keep,
                                 p=p, return_weights=False, compute=compute,
                                 sdpa_scaling=sdpa_scaling)
        grads = torch.autograd.grad(o, leaves, grad_out[:, :, rows].to(o.dtype))
        return [o.detach(), s.detach(), *grads]

    oracle = window(F64, False)
    refs = window(torch.float32, True), window(torch.float32, False)
    ours = [out[:, :, rows], lse[:, :, rows], dq[:, :, rows], dk[:, :, keys], dv[:, :, keys]]
    for index, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        worse = _worse([ref[index] for ref in refs], oracle[index])
        assert_within_rule(ours[index].detach(), worse, oracle[index], name=name)
    outside_rows = torch.ones(length, dtype=torch.bool)
    outside_rows[rows] = False
    outside_keys = torch.ones(length, dtype=torch.bool)
    outside_keys[keys] = False
    assert not out[:, :, outside_rows].any() and not dq[:, :, outside_rows].any()
    assert torch.isinf(lse[:, :, outside_rows]).all()
    assert not dk[:, :, outside_keys].any() and not dv[:, :, outside_keys].any()
