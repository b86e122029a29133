"""Philox4x32-10 in Triton, the third copy of mmattn's dropout RNG definition.

``philox_uniform`` is a ``@triton.jit`` device function that attention kernels
inline for their dropout masks; ``philox_uniform_kernel`` and the launcher
``philox_uniform_launch`` expose it for testing against mmattn.philox.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def philox_uniform(seed_lo, seed_hi, counter0, counter1, counter2):
    """Uniform float32 in [0, 1) for uint32 counters ``(counter0, counter1, counter2, 0)``.

    Written out rather than calling ``tl.rand`` so the second and third counter words
    can carry the (batch, head) index and the high word of the element index; with
    ``counter1 == counter2 == 0`` it equals ``tl.rand``. Counters are int32/uint32
    tensors of one shape (``counter2`` may be a scalar 0).
    """
    c0 = counter0.to(tl.uint32, bitcast=True)
    c1 = counter1.to(tl.uint32, bitcast=True)
    c2 = (tl.zeros_like(c0) + counter2).to(tl.uint32, bitcast=True)
    c3 = tl.zeros_like(c0)
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    for _ in tl.static_range(10):
        prev_c0 = c0
        prev_c2 = c2
        c0 = tl.math.umulhi(0xCD9E8D57, prev_c2) ^ c1 ^ k0
        c2 = tl.math.umulhi(0xD2511F53, prev_c0) ^ c3 ^ k1
        c1 = tl.mul(prev_c2, 0xCD9E8D57, sanitize_overflow=False)
        c3 = tl.mul(prev_c0, 0xD2511F53, sanitize_overflow=False)
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    signed = c0.to(tl.int32, bitcast=True)
    signed = tl.where(signed < 0, ~signed, signed)
    return signed.to(tl.float32) * 4.6566127342e-10


@triton.jit
def philox_uniform_kernel(counter0_ptr, counter1_ptr, counter2_ptr, out_ptr, seed_lo, seed_hi,
                          numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < numel
    counter0 = tl.load(counter0_ptr + offsets, mask=in_range, other=0)
    counter1 = tl.load(counter1_ptr + offsets, mask=in_range, other=0)
    counter2 = tl.load(counter2_ptr + offsets, mask=in_range, other=0)
    uniform = philox_uniform(seed_lo, seed_hi, counter0, counter1, counter2)
    tl.store(out_ptr + offsets, uniform, mask=in_range)


@triton.jit
def tl_rand_kernel(counter0_ptr, out_ptr, seed, numel, BLOCK: tl.constexpr):
    """Triton's own ``tl.rand``, to pin our definition to it (counter1 == 0)."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < numel
    counter0 = tl.load(counter0_ptr + offsets, mask=in_range, other=0)
    tl.store(out_ptr + offsets, tl.rand(seed, counter0), mask=in_range)


def _seed_words(seed: int) -> tuple[int, int]:
    seed &= 2**64 - 1
    # Passed as int64 kernel arguments holding uint32 values (no sign issues).
    return seed & 0xFFFFFFFF, seed >> 32


def philox_uniform_launch(seed: int, counter0: torch.Tensor, counter1: torch.Tensor,
                          counter2: torch.Tensor | None = None) -> torch.Tensor:
    """Uniforms for integer counter tensors of one shape (taken modulo 2**32; ``counter2``
    None means 0); returns float32 of that shape."""
    if counter2 is None:
        counter2 = torch.zeros_like(counter0)
    # int64 -> int32 keeps the low 32 bits (two's complement wrap), i.e. modulo 2**32.
    counter0, counter1, counter2 = (c.to(torch.int32).contiguous()
                                    for c in (counter0, counter1, counter2))
    out = torch.empty(counter0.shape, dtype=torch.float32, device=counter0.device)
    numel = counter0.numel()
    if numel:
        block = 256
        seed_lo, seed_hi = _seed_words(seed)
        philox_uniform_kernel[(triton.cdiv(numel, block),)](
            counter0, counter1, counter2, out, seed_lo, seed_hi, numel, BLOCK=block)
    return out


def tl_rand_launch(seed: int, counter0: torch.Tensor) -> torch.Tensor:
    """``tl.rand(seed, counter0)`` elementwise (seed below 2**31 keeps Triton's int32 path)."""
    counter0 = counter0.to(torch.int32).contiguous()
    out = torch.empty(counter0.shape, dtype=torch.float32, device=counter0.device)
    numel = counter0.numel()
    if numel:
        tl_rand_kernel[(triton.cdiv(numel, 256),)](counter0, out, seed, numel, BLOCK=256)
    return out
