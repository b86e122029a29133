"""Numerics of the fused CPU attention kernels (issue 11 items 2, 3, standing guards 3 and 5;
issue 12 section 3): accuracy at every input scale on each instruction-set build,
half-precision and lse gradients, exact zeros where the exact answer is 0, split-KV
decoding, bitwise determinism across thread counts and 64-bit dropout counters.

Errors are measured against the float64 reference (the oracle) and compared with the
float32 reference under DESIGN's rule (tests/tolerance.py). Inputs are ``randn * amp``:
with amp 30 the logits reach thousands, so one float32 rounding of a score moves the
softmax visibly. At such scales the tensor-wide maximum error is set by the one row
whose two best keys are nearly tied, and the ratio of two implementations' errors on
that row is heavy-tailed: even the reference with only its sum over D reordered (as
accurate, different roundings) breaks the 2x rule on some seeds from amp 6 on. So the
tensor-wide rule is asserted at amp 1 and 3, and above that on the per-row error
distribution (median and 90th percentile of the rows' errors), which a systematic
excess (a float32 sum over D = 256 in one chain, P recomputed from a rounded lse,
delta from rowsum(dO * O) in a peaked row) fails and a tie's luck does not.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from tolerance import ATOL, assert_within_rule, max_error

from mmattn import BlockMask, _extension, philox
from mmattn.attention import cross_attention
from mmattn.backends import cpu as cpu_backend
from mmattn.backends import reference

pytestmark = pytest.mark.skipif(
    not _extension.has_kernel("fused_attention_fwd", "CPU"),
    reason="mmattn._C with the CPU attention kernels is not built",
)

ISAS = ("avx512", "avx2", "generic")


def _available_isas() -> list[str]:
    """The instruction-set builds this CPU can run (MMATTN_CPU_ISA values)."""
    import os

    found = []
    old = os.environ.get("MMATTN_CPU_ISA")
    try:
        for isa in ISAS:
            os.environ["MMATTN_CPU_ISA"] = isa
            try:
                if cpu_backend.kernel_isa() == isa:
                    found.append(isa)
            except RuntimeError:
                pass
    finally:
        if old is None:
            os.environ.pop("MMATTN_CPU_ISA", None)
        else:
            os.environ["MMATTN_CPU_ISA"] = old
    return found


AVAILABLE_ISAS = _available_isas() if _extension.has_kernel("fused_attention_fwd", "CPU") else []


def _case(amp: float, d: int, lk: int, shape=(2, 4, 33)):
    b, h, lq = shape
    g = torch.Generator().manual_seed(int(amp) * 100000 + d * 1000 + lk)
    q, k, v = (torch.randn(b, h, n, d, generator=g) * amp for n in (lq, lk, lk))
    grad_out = torch.randn(b, h, lq, d, generator=g)
    grad_lse = torch.randn(b, h, lq, generator=g)
    return q, k, v, grad_out, grad_lse


def _run(q, k, v, grad_out, grad_lse, backend, dtype, **kwargs):
    """out, lse, weights and (dq, dk, dv) of loss = <out, grad_out> + <lse, grad_lse>."""
    qc, kc, vc = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = cross_attention(qc, kc, vc, backend=backend, return_lse=True, **kwargs)
    _, weights = cross_attention(qc.detach(), kc.detach(), vc.detach(), backend=backend,
                                 return_weights=True, **kwargs)
    loss = (out * grad_out.to(dtype)).sum()
    if grad_lse is not None:
        loss = loss + (lse * grad_lse.to(lse.dtype)).sum()
    loss.backward()
    return {"out": out.detach(), "lse": lse.detach(), "weights": weights, "dq": qc.grad,
            "dk": kc.grad, "dv": vc.grad}


def _results(case, isa, monkeypatch, **kwargs):
    """(ours on `isa`, float32 reference, float64 oracle) for one case."""
    ref = _run(*case, "reference", torch.float32, **kwargs)
    oracle = _run(*case, "reference", torch.float64, **kwargs)
    monkeypatch.setenv("MMATTN_CPU_ISA", isa)
    ours = _run(*case, "cpu", torch.float32, **kwargs)
    monkeypatch.delenv("MMATTN_CPU_ISA")
    return ours, ref, oracle


# (D, Lk) pairs: few keys (one visible key, near ties) to long rows, head dims to 256.
ACCURACY_MATRIX = list(itertools.product((16, 64, 256), (1, 7, 97, 1000)))


@pytest.mark.parametrize("amp", [1, 3])
def test_tolerance_rule_at_every_head_dim_and_length(amp, monkeypatch):
    """The tensor-wide rule for out, lse, weights and dq/dk/dv (with a gradient into
    lse too), every build."""
    assert AVAILABLE_ISAS
    for (d, lk), isa in itertools.product(ACCURACY_MATRIX, AVAILABLE_ISAS):
        ours, ref, oracle = _results(_case(amp, d, lk), isa, monkeypatch)
        for name in ours:
            assert_within_rule(ours[name], ref[name], oracle[name],
                               name=f"{name} {isa} amp {amp} D {d} Lk {lk}")


def _row_errors(actual: torch.Tensor, oracle: torch.Tensor, name: str) -> torch.Tensor:
    """Max abs error per row: query rows for out/lse/weights/dq, key rows for dk/dv."""
    err = (actual.double() - oracle.double()).abs()
    if name == "lse":
        return err.flatten()
    return err.amax(-1).flatten()


@pytest.mark.parametrize("amp", [6, 10, 30])
def test_error_distribution_at_large_logits(amp, monkeypatch):
    """Logits up to thousands: the rule on the median and 90th percentile of the rows'
    errors (module docstring). The kernels before the blocked sums and the lse / delta
    refinement failed it at every one of these amplitudes (out with D = 256: one float32
    chain over D; dq, dk, dv: P from the rounded lse, delta from rowsum(dO * O))."""
    assert AVAILABLE_ISAS
    for (d, lk), isa in itertools.product(ACCURACY_MATRIX, AVAILABLE_ISAS):
        if lk == 1:
            continue  # one key: nothing to distribute, covered by the exact-zero tests
        ours, ref, oracle = _results(_case(amp, d, lk), isa, monkeypatch)
        for name in ours:
            e_ours = _row_errors(ours[name], oracle[name], name)
            e_ref = _row_errors(ref[name], oracle[name], name)
            # the 90th percentile of a few dozen rows (dk, dv with Lk = 7) is one tie's luck
            for quantile in (0.5, 0.9) if e_ours.numel() >= 128 else (0.5,):
                got = torch.quantile(e_ours, quantile).item()
                bound = 2 * torch.quantile(e_ref, quantile).item() + ATOL[torch.float32]
                assert got <= bound, (f"{name} {isa} amp {amp} D {d} Lk {lk}: q{quantile} "
                                      f"row error {got:.3e} > {bound:.3e}")


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_one_visible_key_gives_exactly_zero_dq_dk(dropout_p, monkeypatch):
    """With one visible key the softmax is constant: dq = dk = 0 exactly (issue 12,
    section 3: with dropout the kernel gave 1.5e-5). Lk = 1, and Lk = 5 with all but one
    key masked."""
    torch.manual_seed(0)
    for isa, amp, d in itertools.product(AVAILABLE_ISAS, (1, 10), (7, 64, 300)):
        monkeypatch.setenv("MMATTN_CPU_ISA", isa)
        q = (torch.randn(2, 3, 37, d) * amp).requires_grad_()
        for lk in (1, 5):
            k = (torch.randn(2, 3, lk, d) * amp).requires_grad_()
            v = (torch.randn(2, 3, lk, d + 3) * amp).requires_grad_()
            mask = torch.zeros(lk, dtype=torch.bool)
            mask[lk // 2] = True
            out = cross_attention(q, k, v, attn_mask=mask.expand(37, lk), dropout_p=dropout_p,
                                  dropout_seed=11, backend="cpu")
            dq, dk, _ = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
            assert not dq.any() and not dk.any(), (isa, amp, d, lk)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_backward_with_identical_keys(dtype):
    """Two identical keys: the exact dq is 0 (the reference gives ~0). delta =
    rowsum(dO * O) must use the kernel's float32 O, not O rounded to half precision
    (which gives |dq| of 0.08 in bfloat16 and 0.013 in float16 here, issue 11 item 3)."""
    torch.manual_seed(0)
    q, key = torch.randn(2, 4, 29, 64) * 3, torch.randn(2, 4, 1, 64)
    v = torch.randn(2, 4, 2, 48) * 4
    k = key.expand(2, 4, 2, 64).contiguous()
    grad_out = torch.randn(2, 4, 29, 48) * 2

    def dq_of(backend, dt):
        qc = q.to(dt).requires_grad_()
        out = cross_attention(qc, k.to(dt), v.to(dt), backend=backend)
        out.backward(grad_out.to(dt))
        return qc.grad

    ours, ref, oracle = dq_of("cpu", dtype), dq_of("reference", dtype), dq_of("reference",
                                                                               torch.float64)
    assert oracle.abs().max() < 1e-12
    assert_within_rule(ours, ref, oracle, name=f"dq {dtype}")


def test_forward_keeps_the_float32_output_for_half_inputs():
    q, k, v = (torch.randn(1, 2, 9, 16, dtype=torch.bfloat16) for _ in range(3))
    out, _, _, out_fp32 = cpu_backend.attention_forward(q, k, v, None, None, False, 0.0, 0.25,
                                                        None, False, keep_fp32_out=True)
    assert out_fp32.dtype == torch.float32 and torch.equal(out_fp32.bfloat16(), out)
    assert max_error(out_fp32, out) > 0  # not the rounded output in disguise
    _, _, _, none = cpu_backend.attention_forward(q.float(), k.float(), v.float(), None, None,
                                                  False, 0.0, 0.25, None, False,
                                                  keep_fp32_out=True)
    assert none.numel() == 0


@pytest.mark.parametrize("kwargs", [
    {},
    {"is_causal": True, "dropout_p": 0.2, "dropout_seed": 5},
    {"block": True},
], ids=["plain", "causal-dropout", "block-mask"])
def test_lse_gradient_runs_in_the_kernel(kwargs, monkeypatch):
    """A gradient into the returned lse (delta_i -= grad_lse_i) is computed by the CPU
    kernel itself, not sent to the reference, and obeys the rule."""
    assert "grad_lse" in cpu_backend.BACKWARD_EXTRAS
    kwargs = dict(kwargs)
    b, hq, hkv, lq, lk = 2, 4, 2, 45, 70
    if kwargs.pop("block", False):
        dense = torch.rand(lq, lk, generator=torch.Generator().manual_seed(3)) < 0.6
        kwargs["block_mask"] = BlockMask.from_dense_mask(dense, (16, 32))
    torch.manual_seed(1)
    q, k, v = torch.randn(b, hq, lq, 32) * 3, torch.randn(b, hkv, lk, 32) * 3, torch.randn(
        b, hkv, lk, 24)
    grad_out, grad_lse = torch.randn(b, hq, lq, 24), torch.randn(b, hq, lq)

    def grads(backend, dtype):
        qc, kc, vc = (t.to(dtype).requires_grad_() for t in (q, k, v))
        out, lse = cross_attention(qc, kc, vc, backend=backend, return_lse=True, **kwargs)
        finite = torch.isfinite(lse)
        loss = (out * grad_out.to(dtype)).sum() + (lse[finite] * grad_lse.to(dtype)[finite]).sum()
        return torch.autograd.grad(loss, (qc, kc, vc))

    ref, oracle = grads("reference", torch.float32), grads("reference", torch.float64)

    def no_reference(*args, **kw):
        raise AssertionError("the cpu backward was sent to the reference")

    monkeypatch.setattr(reference, "attention_backward", no_reference)
    ours = grads("cpu", torch.float32)
    for name, *g in zip(("dq", "dk", "dv"), ours, ref, oracle, strict=True):
        assert_within_rule(*g, name=name)


# ---------------------------------------------------------------- split-KV decoding

# (B, Hq, Hkv, Lq, Lk, D, Dv): few query rows against many keys, where the forward
# splits the keys and takes the row path (keys on the vector lanes).
DECODE_SHAPES = [(1, 1, 1, 1, 4096, 64, 64), (2, 4, 2, 1, 1000, 32, 48), (1, 3, 3, 3, 700, 17, 5),
                 (3, 1, 1, 2, 9000, 40, 8), (1, 2, 2, 1, 5, 256, 128)]


@pytest.mark.parametrize("shape", DECODE_SHAPES)
@pytest.mark.parametrize("masks", ["none", "kpm-mask", "dropout", "causal", "block"])
def test_split_kv_decoding_matches_reference(shape, masks, monkeypatch):
    b, hq, hkv, lq, lk, d, dv = shape
    g = torch.Generator().manual_seed(lk)
    q, k, v = (torch.randn(b, h, n, e, generator=g) * 3
               for h, n, e in ((hq, lq, d), (hkv, lk, d), (hkv, lk, dv)))
    kwargs = {}
    if masks == "kpm-mask":
        kwargs = {"key_padding_mask": torch.rand(b, lk, generator=g) < 0.3,
                  "attn_mask": torch.rand(b, hq, lq, lk, generator=g) < 0.6}
    elif masks == "dropout":
        kwargs = {"dropout_p": 0.3, "dropout_seed": 2**33 + 5}
    elif masks == "causal":
        kwargs = {"is_causal": True}
    elif masks == "block":
        dense = torch.rand(lq, lk, generator=g) < 0.7
        dense[:, : min(lk, 300)] = True
        kwargs = {"block_mask": BlockMask.from_dense_mask(dense, (1, 128))}
    for isa in AVAILABLE_ISAS:
        monkeypatch.setenv("MMATTN_CPU_ISA", isa)
        out, lse = cross_attention(q, k, v, backend="cpu", return_lse=True, **kwargs)
        ref_out, ref_lse = cross_attention(q, k, v, backend="reference", return_lse=True,
                                           **kwargs)
        x_out, x_lse = cross_attention(q.double(), k.double(), v.double(), backend="reference",
                                       return_lse=True, **kwargs)
        assert_within_rule(out, ref_out, x_out, name=f"out {isa}")
        finite = torch.isfinite(x_lse)
        assert torch.equal(torch.isfinite(lse), finite)
        assert_within_rule(lse[finite], ref_lse[finite], x_lse[finite], name=f"lse {isa}")


def test_split_kv_applies_the_same_dropout_mask():
    """Dropout with split keys keeps exactly the reference's elements: with q = 0 every
    score is 0, and with V = identity out[j] = keep_j / (Lk (1 - p))."""
    lk, p = 1500, 0.4
    q = torch.zeros(1, 1, 1, 8)
    k = torch.randn(1, 1, lk, 8)
    v = torch.eye(lk).view(1, 1, lk, lk)
    out = cross_attention(q, k, v, dropout_p=p, dropout_seed=77, backend="cpu")
    keep = philox.dropout_keep_mask(77, p, 1, 1, 1, lk)
    expected = keep.float() / (lk * (1 - p))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("shape,kwargs", [
    ((1, 2, 1, 100, 1000, 32), {"is_causal": True, "dropout_p": 0.1, "dropout_seed": 3}),
    ((2, 4, 2, 70, 300, 16), {}),
    ((1, 2, 2, 1, 5000, 64), {}),  # split-KV forward
])
def test_bitwise_deterministic_across_thread_counts(shape, kwargs):
    """Forward and backward give the same bits for 1, 2, 3 and 4 threads (the work is
    split by the shape only; every result is summed by one task in a fixed order)."""
    b, hq, hkv, lq, lk, d = shape
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for h, n in ((hq, lq), (hkv, lk), (hkv, lk)))
    grad_out = torch.randn(b, hq, lq, d, generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3, 4):
            torch.set_num_threads(t)
            qc, kc, vc = (x.clone().requires_grad_() for x in (q, k, v))
            out = cross_attention(qc, kc, vc, backend="cpu", **kwargs)
            results.append([out.detach(), *torch.autograd.grad(out, (qc, kc, vc), grad_out)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b_ in zip(results[0], other, strict=True):
            assert torch.equal(a, b_)


# ---------------------------------------------------------------- 64-bit indices


@pytest.mark.parametrize("step", [1, 5, 65600])
def test_vector_dropout_counters_straddling_2_pow_32(step, monkeypatch):
    """Each build's vectorised Philox keep-mask for lanes base + lane * step (64-bit
    flat indices i * Lk + j) equals mmattn.philox, also when the lanes cross a multiple
    of 2**32 (the third counter word changes between lanes)."""
    base = torch.tensor([2**32 - 3, 2**32 - 7 * step, 2**33 - 1, 7, 2**40 + 2**32 - 9,
                         3 * 2**32 - 2 * step], dtype=torch.int64)
    for isa in AVAILABLE_ISAS:
        monkeypatch.setenv("MMATTN_CPU_ISA", isa)
        keep = torch.ops.mmattn.attention_cpu_dropout_keep(base, step, 123456789012, 7, 0.4)
        flat = base[:, None] + step * torch.arange(keep.shape[1])[None]
        uniform = philox.philox_uniform(123456789012, flat & 0xFFFFFFFF, torch.full_like(flat, 7),
                                        flat >> 32)
        assert torch.equal(keep, uniform >= 0.4), isa


def test_fused_path_beyond_2_pow_32_elements():
    """Lq * Lk > 2**32 (B * H * Lq * Lk > 2**31) on the fused kernels, scores never
    materialised: a block mask visits only two blocks, around the query row where
    i * Lk + j crosses 2**32, with dropout. Sampled rows of out and dq against a float64
    oracle of those rows (dropout counters from mmattn.philox)."""
    n, blk, d, p, seed = 65600, 1024, 8, 0.25, 99
    layout = torch.zeros(-(-n // blk), -(-n // blk), dtype=torch.bool)
    qb = (2**32 // n) // blk  # the query block holding the crossing rows
    layout[qb, 4] = layout[qb, 63] = True
    block_mask = BlockMask.from_layout(layout, n, blk)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, n, d, generator=g).requires_grad_()
    k, v = torch.randn(1, 1, n, d, generator=g), torch.randn(1, 1, n, d, generator=g)
    out = cross_attention(q, k, v, block_mask=block_mask, dropout_p=p, dropout_seed=seed,
                          backend="cpu")
    rows = torch.tensor([qb * blk, 2**32 // n - 1, 2**32 // n, 2**32 // n + 1, qb * blk + 1023])
    grad_out = torch.zeros_like(out)
    grad_out[0, 0, rows] = torch.randn(len(rows), d, generator=g)
    (dq,) = torch.autograd.grad(out, q, grad_out)
    keys = torch.cat([torch.arange(4 * blk, 5 * blk), torch.arange(63 * blk, 64 * blk)])
    qs = q.detach()[0, 0, rows].double().requires_grad_()
    scores = qs @ k[0, 0, keys].double().T / d**0.5
    flat = rows[:, None] * n + keys[None]
    keep = philox.philox_uniform(seed, flat & 0xFFFFFFFF, torch.zeros_like(flat), flat >> 32) >= p
    probs = torch.softmax(scores, -1) * keep / (1 - p)
    expected = probs @ v[0, 0, keys].double()
    (dq_expected,) = torch.autograd.grad(expected, qs, grad_out[0, 0, rows].double())
    assert ((flat >> 32) > 0).any() and ((flat >> 32) == 0).any()
    torch.testing.assert_close(out[0, 0, rows].double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dq[0, 0, rows].double(), dq_expected, rtol=1e-4, atol=1e-5)
    assert not out[0, 0, :qb * blk].any()  # rows of empty blocks stay 0
