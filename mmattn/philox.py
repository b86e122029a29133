"""Philox4x32-10 in PyTorch: the reference definition of mmattn's dropout mask.

The same function exists as a C++/CUDA header (``csrc/philox.h``) and as a Triton
function (``mmattn.kernels.philox``); the three agree bit for bit.

Definition. With key ``(seed & 0xffffffff, seed >> 32)`` and counter
``(c0, c1, c2, 0)``, run ten Philox4x32 rounds and take the first output word;
map it to [0, 1) the way ``tl.rand`` does (reinterpret as int32, fold negatives
with ``~x``, one float32 multiply by 4.6566127342e-10). With ``c1 == c2 == 0`` this
is exactly ``tl.rand(seed, c0)``.

Dropout convention. For element ``(b, h, i, j)`` of the ``(B, H, Lq, Lk)``
attention probabilities, with the flat index ``n = i * Lk + j`` (exact, 64 bits):
``c0 = n mod 2**32``, ``c1 = (b * H + h) mod 2**32`` and ``c2 = n >> 32``. The
third word keeps counters distinct when ``Lq * Lk >= 2**32``; below that it is 0,
so such masks are the ones of the two-word definition bit for bit. The element is
kept when ``uniform >= dropout_p``, and kept elements are scaled by
``1 / (1 - dropout_p)``. The backward pass regenerates the same mask.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_UNIFORM_SCALE = 4.6566127342e-10


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * b`` for uint32 values held in int64.

    The full product needs 64 unsigned bits, which int64 cannot hold, so ``b`` is
    split into 16-bit halves whose partial products fit.
    """
    b_hi, b_lo = b >> 16, b & 0xFFFF
    part_hi, part_lo = a * b_hi, a * b_lo  # each < 2**48
    high = (part_hi + (part_lo >> 16)) >> 16
    low = (((part_hi & 0xFFFF) << 16) + part_lo) & _MASK32
    return high, low


def philox_bits(seed: int, counter0: torch.Tensor, counter1: torch.Tensor,
                counter2: torch.Tensor | None = None) -> torch.Tensor:
    """First Philox4x32-10 output word for counters ``(counter0, counter1, counter2, 0)``.

    Args:
        seed: 64-bit key, ``0 <= seed < 2**64``.
        counter0, counter1, counter2: integer tensors (broadcastable); taken modulo
            2**32; ``counter2`` None means 0.

    Returns:
        int64 tensor of uint32 values.
    """
    c0 = counter0.to(torch.int64) & _MASK32
    c1 = counter1.to(torch.int64) & _MASK32
    if counter2 is None:
        c0, c1 = torch.broadcast_tensors(c0, c1)
        c2 = torch.zeros_like(c0)
    else:
        c0, c1, c2 = torch.broadcast_tensors(c0, c1, counter2.to(torch.int64) & _MASK32)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0


def bits_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """Map uint32 words (int64 tensor) to float32 in [0, 1) exactly as ``tl.rand``."""
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)
    folded = torch.where(signed < 0, -signed - 1, signed).to(torch.int32)
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def philox_uniform(seed: int, counter0: torch.Tensor, counter1: torch.Tensor,
                   counter2: torch.Tensor | None = None) -> torch.Tensor:
    """Uniform float32 in [0, 1) for each counter triple; see the module docstring."""
    return bits_to_uniform(philox_bits(seed, counter0, counter1, counter2)).to(counter0.device)


def dropout_counters(
    batch: int, heads: int, len_q: int, len_k: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Counters ``(c0, c1, c2)`` of the dropout convention, broadcastable to (B, H, Lq, Lk)."""
    rows = torch.arange(len_q, device=device, dtype=torch.int64).view(1, 1, -1, 1)
    cols = torch.arange(len_k, device=device, dtype=torch.int64).view(1, 1, 1, -1)
    b = torch.arange(batch, device=device, dtype=torch.int64).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device, dtype=torch.int64).view(1, -1, 1, 1)
    flat = rows * len_k + cols
    return flat & _MASK32, b * heads + h, flat >> 32


def dropout_keep_mask(
    seed: int, dropout_p: float, batch: int, heads: int, len_q: int, len_k: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Bool keep-mask of shape (B, H, Lq, Lk) under the dropout convention."""
    uniform = philox_uniform(seed, *dropout_counters(batch, heads, len_q, len_k))
    return (uniform >= dropout_p).to(device)
