"""The three copies of the Philox dropout definition agree bit for bit."""

from __future__ import annotations

import pytest
import torch

import mmattn
from mmattn._extension import has_kernel
from mmattn.backends import triton as triton_backend
from mmattn.philox import dropout_counters, dropout_keep_mask, philox_bits, philox_uniform

SEEDS = [0, 1, 42, 2**31 - 1, 2**31, 2**32 + 5, 2**40 + 7, 2**63 - 1]
needs_ext = pytest.mark.skipif(not has_kernel("philox_uniform", "CPU"),
                               reason="mmattn._C not built")
needs_triton = pytest.mark.skipif(triton_backend.device_reason(torch.device("cpu")) is not None,
                                  reason="Triton interpreter unavailable")


def _counters(n: int = 4099) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    c0 = torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int32, generator=gen)
    c1 = torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int32, generator=gen)
    c0[:4] = torch.tensor([0, 1, -1, 2**31 - 1], dtype=torch.int32)
    return c0, c1


def test_known_answer_philox4x32_10():
    # Random123's published known-answer vector for philox4x32-10 with counter 0 and
    # key 0 starts 0x6627e8d5; our first word must equal it.
    bits = philox_bits(0, torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    assert int(bits[0]) == 0x6627E8D5


def test_uniform_range_and_moments():
    c0, c1 = _counters(200_000)
    u = philox_uniform(123, c0, c1)
    assert u.dtype == torch.float32
    assert 0.0 <= u.min().item() and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 5e-3
    assert abs(u.var().item() - 1 / 12) < 2e-3


def test_third_counter_word_zero_is_the_two_word_definition():
    c0, c1 = _counters(1000)
    assert torch.equal(philox_uniform(9, c0, c1, torch.zeros_like(c0)), philox_uniform(9, c0, c1))
    # a nonzero third word gives other numbers (the point of carrying it)
    assert not torch.equal(philox_uniform(9, c0, c1, torch.ones_like(c0)),
                           philox_uniform(9, c0, c1))


def test_third_word_separates_counters_that_used_to_wrap():
    # Lq * Lk >= 2**32: flat index n = i * Lk + j goes to (n mod 2**32, b*H + h, n >> 32).
    lq, lk = 3, 2**31 + 3
    rows = torch.arange(lq, dtype=torch.int64).view(1, 1, -1, 1)
    flat = rows * lk + (lk - 1)
    c0_big, c2_big = flat & 0xFFFFFFFF, flat >> 32
    assert c2_big.flatten().tolist() == [0, 1, 1]  # n = Lk-1, 2Lk-1, 3Lk-1
    # element (i=2, j=Lk-1) and element (i=0, j=(2*Lk+Lk-1) mod 2**32) used to share a counter
    u_new = philox_uniform(5, c0_big, torch.zeros_like(c0_big), c2_big).flatten()
    u_wrapped = philox_uniform(5, c0_big, torch.zeros_like(c0_big)).flatten()
    assert u_new[0] == u_wrapped[0] and u_new[2] != u_wrapped[2]


@needs_ext
@pytest.mark.parametrize("seed", SEEDS)
def test_cpp_kernel_matches_torch(seed):
    c0, c1 = _counters()
    expected = philox_uniform(seed, c0, c1)
    got = torch.ops.mmattn.philox_uniform(c0, c1, seed)
    assert torch.equal(got, expected)
    c2 = c1.flip(0)
    assert torch.equal(torch.ops.mmattn.philox_uniform(c0, c1, seed, c2),
                       philox_uniform(seed, c0, c1, c2))


@needs_triton
@pytest.mark.parametrize("seed", [0, 42, 2**32 + 5, 2**63 - 1])
def test_triton_matches_torch(seed):
    from mmattn.kernels.philox import philox_uniform_launch

    c0, c1 = _counters(1000)
    assert torch.equal(philox_uniform_launch(seed, c0, c1), philox_uniform(seed, c0, c1))
    c2 = c1.flip(0)
    assert torch.equal(philox_uniform_launch(seed, c0, c1, c2), philox_uniform(seed, c0, c1, c2))


@needs_triton
def test_definition_equals_tl_rand_when_counter1_is_zero():
    from mmattn.kernels.philox import tl_rand_launch

    c0, _ = _counters(1000)
    zeros = torch.zeros_like(c0)
    assert torch.equal(tl_rand_launch(1234, c0), philox_uniform(1234, c0, zeros))


def test_dropout_keep_mask_convention():
    b, h, lq, lk, p, seed = 2, 3, 5, 7, 0.3, 99
    keep = dropout_keep_mask(seed, p, b, h, lq, lk)
    c0, c1, c2 = dropout_counters(b, h, lq, lk)
    assert c2.abs().sum() == 0
    for bi, hi, i, j in [(0, 0, 0, 0), (1, 2, 4, 6), (1, 0, 3, 2)]:
        u = philox_uniform(seed, torch.tensor([i * lk + j]), torch.tensor([bi * h + hi]))
        assert bool(keep[bi, hi, i, j]) == bool(u[0] >= p)
    assert int(c0[0, 0, 4, 6]) == 4 * lk + 6 and int(c1[1, 2, 0, 0]) == 1 * h + 2
    frac = keep.float().mean().item()
    assert 0.5 < frac < 0.9


def test_attention_dropout_uses_the_definition():
    q = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    k = torch.randn(2, 3, 7, 4, dtype=torch.float64)
    v = torch.randn(2, 3, 7, 4, dtype=torch.float64)
    _, w_drop = mmattn.cross_attention(q, k, v, dropout_p=0.4, dropout_seed=5,
                                       return_weights=True, backend="reference")
    _, w = mmattn.cross_attention(q, k, v, return_weights=True, backend="reference")
    keep = dropout_keep_mask(5, 0.4, 2, 3, 5, 7)
    torch.testing.assert_close(w_drop, w * keep / 0.6)


@pytest.mark.gpu
@pytest.mark.parametrize("seed", [0, 2**32 + 5, 2**63 - 1])
def test_cuda_kernel_and_triton_on_gpu_match_torch(seed):
    c0, c1 = _counters()
    expected = philox_uniform(seed, c0, c1)
    got = torch.ops.mmattn.philox_uniform(c0.cuda(), c1.cuda(), seed)
    assert got.is_cuda and torch.equal(got.cpu(), expected)
    from mmattn.kernels.philox import philox_uniform_launch

    assert torch.equal(philox_uniform_launch(seed, c0.cuda(), c1.cuda()).cpu(), expected)
