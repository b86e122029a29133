"""CUDA C++ attention kernels (csrc/cuda/attention_*) against the reference.

Every test runs the kernels under mmattn's SIMT emulator (``mmattn._C_emu``: the same
kernel source compiled for the host, CPU tensors) with several scheduling seeds, and
on a GPU (``gpu`` marker) through the real build. Oracle: the reference in float64;
bound: tests/tolerance.py's rule against the same-dtype reference.
"""

from __future__ import annotations

import math

import pytest
import torch
from cuda_emu import SEEDS, TARGET_PARAMS, Target, emu_seed, make_target, require_emulator
from tolerance import assert_within_rule

from mmattn.backends import AttentionCall, block_mask_tensors, reference
from mmattn.block_mask import BlockMask
from mmattn.philox import dropout_keep_mask


@pytest.fixture(params=TARGET_PARAMS)
def target(request) -> Target:
    return make_target(request.param, "cuda_attention_fwd")


def block_mask_args(block_mask: BlockMask) -> tuple[list[torch.Tensor], list[int]]:
    return block_mask_tensors(block_mask), list(block_mask.block_size)


def _inputs(b, hq, hkv, lq, lk, d, dv, dtype, amplitude=1.0):
    q = (torch.randn(b, hq, lq, d) * amplitude).to(dtype)
    k = (torch.randn(b, hkv, lk, d) * amplitude).to(dtype)
    v = (torch.randn(b, hkv, lk, dv) * amplitude).to(dtype)
    return q, k, v


def _dense_mask(attn_mask, block_mask, shape):
    """attn_mask combined with a BlockMask's element mask, for the reference."""
    if block_mask is None:
        return attn_mask
    dense = block_mask.to_dense().expand(shape)
    if attn_mask is None:
        return dense
    if attn_mask.dtype == torch.bool:
        return attn_mask & dense
    return attn_mask.masked_fill(~dense, -math.inf)


def _reference(q, k, v, do, glse, mask, kpm, causal, p, scale, seed, dtype):
    """(out, lse, dq, dk, dv) of the reference in ``dtype`` (float64 = oracle)."""
    qd, kd, vd = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    m = mask
    if m is not None and m.is_floating_point():
        m = m.to(torch.float64 if dtype == torch.float64 else torch.float32)
    out, lse, _ = reference.attention_math(qd, kd, vd, m, kpm, causal, p, scale, seed, False)
    out = out.to(dtype)  # the same-dtype reference rounds its output as a backend does
    loss = (out.float() * do.float()).sum() if dtype != torch.float64 else (out * do.double()).sum()
    if glse is not None:
        finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        loss = loss + (finite.double() * glse.double()).sum()
    dq, dk, dv = torch.autograd.grad(loss, (qd, kd, vd))
    return out.detach(), lse.detach(), dq, dk, dv


def check_attention(target: Target, q, k, v, *, attn_mask=None, kpm=None, causal=False,
                    p=0.0, seed=1234, block_mask=None, glse=None, backward=True,
                    scale=None) -> tuple:
    """Run the CUDA kernels (forward, backward) and check them against the reference."""
    dev = target.device
    b, hq, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    do = torch.randn(b, hq, lq, dv).to(q.dtype)
    blocks, block_size = block_mask_args(block_mask) if block_mask is not None else (None, None)

    def to(t):
        return None if t is None else t.to(dev)

    out, lse, _w, out32 = target.run(
        target.backend.attention_forward, to(q), to(k), to(v), to(attn_mask), to(kpm), causal,
        p, scale, seed, False, [to(t) for t in blocks] if blocks else None, block_size,
        keep_fp32_out=True)
    dense = _dense_mask(attn_mask, block_mask, (b, hq, lq, lk))
    ref = _reference(q, k, v, do, glse, dense, kpm, causal, p, scale, seed, q.dtype)
    oracle = _reference(q, k, v, do, glse, dense, kpm, causal, p, scale, seed, torch.float64)
    out, lse, out32 = out.cpu(), lse.cpu(), out32.cpu()
    assert out.dtype == q.dtype and out.is_contiguous() and out.shape == (b, hq, lq, dv)
    assert_within_rule(out, ref[0], oracle[0], name="out")
    # out is out_fp32 rounded: both come from the same registers.
    assert torch.equal(out, out32.to(q.dtype))
    assert torch.equal(torch.isinf(lse), torch.isinf(oracle[1])), "lse +inf pattern"
    finite = ~torch.isinf(oracle[1])
    if finite.any():  # float32 lse: relative to its magnitude
        ours = (lse[finite].double() - oracle[1][finite]).abs().max().item()
        assert ours <= 1e-4 + 2e-6 * oracle[1][finite].abs().max().item(), f"lse error {ours}"
    if not backward:
        return out, lse, None
    grads = target.run(
        target.backend.attention_backward, to(do), to(q), to(k), to(v), to(out32), to(lse),
        to(attn_mask), to(kpm), causal, p, scale, seed,
        [to(t) for t in blocks] if blocks else None, block_size, grad_lse=to(glse))
    assert grads[3] is None
    grads = tuple(g.cpu() for g in grads[:3])
    for name, got, r, o, src in zip(("dq", "dk", "dv"), grads, ref[2:], oracle[2:], (q, k, v),
                                    strict=True):
        assert got.dtype == src.dtype and got.is_contiguous() and got.shape == src.shape, name
        assert_within_rule(got, r, o.to(torch.float64), name=name)
    return out, lse, grads


SHAPES = [  # (B, Hq, Hkv, Lq, Lk, D, Dv)
    (1, 2, 1, 70, 97, 64, 64),     # GQA, tails on both lengths
    (2, 1, 1, 1, 7, 32, 32),       # one query, head dim padded to 64
    (1, 2, 2, 65, 130, 128, 128),  # head dim 128
    (1, 3, 1, 40, 70, 64, 128),    # MQA, Dv != D
    (1, 1, 1, 33, 64, 128, 64),    # Dv < D
    (1, 2, 1, 130, 50, 16, 40),    # Lq > Lk, small head dims
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes(target: Target, shape, dtype) -> None:
    b, hq, hkv, lq, lk, d, dv = shape
    check_attention(target, *_inputs(b, hq, hkv, lq, lk, d, dv, dtype))


@pytest.mark.parametrize("amplitude", [3.0, 10.0, 30.0])
def test_amplitudes(target: Target, amplitude: float) -> None:
    check_attention(target, *_inputs(1, 2, 1, 50, 80, 64, 64, torch.float16, amplitude))


def test_key_padding_with_a_fully_padded_batch(target: Target) -> None:
    q, k, v = _inputs(2, 2, 1, 70, 97, 64, 64, torch.float16)
    kpm = torch.rand(2, 97) < 0.3
    kpm[1] = True  # batch 1 sees nothing: out 0, lse +inf, grads 0
    out, lse, (dq, dk, dv) = check_attention(target, q, k, v, kpm=kpm)
    assert torch.all(out[1] == 0) and torch.all(torch.isinf(lse[1]))
    assert torch.all(dq[1] == 0) and torch.all(dk[1] == 0) and torch.all(dv[1] == 0)


@pytest.mark.parametrize("lengths", [(70, 97), (97, 70), (130, 130)])
def test_causal(target: Target, lengths) -> None:
    lq, lk = lengths
    check_attention(target, *_inputs(1, 2, 1, lq, lk, 64, 64, torch.bfloat16), causal=True)


def test_bool_attn_mask_broadcast_with_empty_rows(target: Target) -> None:
    q, k, v = _inputs(2, 2, 1, 70, 97, 64, 64, torch.float16)
    mask = torch.rand(2, 1, 70, 97) < 0.6
    mask[0, 0, 5] = False  # a row with no visible key
    out, lse, (dq, _, _) = check_attention(target, q, k, v,
                                           attn_mask=mask.expand(2, 2, 70, 97))
    assert torch.all(out[0, :, 5] == 0) and torch.all(torch.isinf(lse[0, :, 5]))
    assert torch.all(dq[0, :, 5] == 0)


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float16, torch.bfloat16,
                                        torch.float64])
def test_float_attn_mask(target: Target, mask_dtype) -> None:
    q, k, v = _inputs(1, 2, 1, 70, 97, 64, 64, torch.bfloat16)
    mask = torch.randn(1, 1, 70, 97) * 2
    mask[torch.rand_like(mask) < 0.2] = -math.inf
    mask[..., 3, :] = -math.inf  # fully masked row
    check_attention(target, q, k, v, attn_mask=mask.to(mask_dtype).expand(1, 2, 70, 97))


def test_all_masks_together(target: Target) -> None:
    q, k, v = _inputs(2, 4, 2, 80, 90, 64, 64, torch.float16)
    kpm = torch.rand(2, 90) < 0.2
    mask = (torch.rand(2, 4, 80, 90) < 0.7)
    check_attention(target, q, k, v, attn_mask=mask, kpm=kpm, causal=True, p=0.2, seed=7)


@pytest.mark.parametrize("causal", [False, True])
def test_dropout(target: Target, causal: bool) -> None:
    q, k, v = _inputs(1, 2, 1, 70, 97, 64, 64, torch.float16)
    check_attention(target, q, k, v, p=0.3, seed=2**40 + 5, causal=causal)


def test_dropout_mask_is_the_reference_mask_bit_for_bit(target: Target) -> None:
    """V = identity makes out the dropped weights and dO = identity makes dV their
    transpose: the zero patterns are the kernels' keep masks, element for element."""
    b, h, lq, lk, p, seed = 1, 2, 40, 100, 0.4, 99
    q = torch.randn(b, h, lq, 64).half()
    k = torch.randn(b, h, lk, 64).half()
    v = torch.eye(lk, 128).half().expand(b, h, lk, 128).contiguous()
    keep = dropout_keep_mask(seed, p, b, h, lq, lk)
    dev, be = target.device, target.backend
    out, lse, _, out32 = target.run(be.attention_forward, q.to(dev), k.to(dev), v.to(dev), None,
                                    None, False, p, 0.125, seed, False, None, None,
                                    keep_fp32_out=True)
    assert torch.equal(out.cpu()[..., :lk] != 0, keep)
    do = torch.eye(lq, 128).half().expand(b, h, lq, 128).contiguous()
    _, _, dv, _ = target.run(be.attention_backward, do.to(dev), q.to(dev), k.to(dev),
                             v.to(dev), out32, lse, None, None, False, p, 0.125, seed, None,
                             None)
    assert torch.equal(dv.cpu()[..., :lq].transpose(-1, -2) != 0, keep)


def test_grad_lse(target: Target) -> None:
    q, k, v = _inputs(1, 2, 1, 50, 70, 64, 64, torch.float16)
    check_attention(target, q, k, v, glse=torch.randn(1, 2, 50), causal=True)


def _mixed_block_mask(b, hq, lq, lk, block, empty_key_block=None):
    """Per-head dense mask whose blocks are empty, full or partial."""
    nbq, nbk = -(-lq // block), -(-lk // block)
    kind = torch.randint(0, 3, (1, hq, nbq, nbk))  # 0 empty, 1 full, 2 partial
    kind[..., 0, 0] = 1
    if empty_key_block is not None:
        kind[..., empty_key_block] = 0
    up = kind.repeat_interleave(block, 2).repeat_interleave(block, 3)[..., :lq, :lk]
    dense = (up == 1) | ((up == 2) & (torch.rand(1, hq, lq, lk) < 0.5))
    return BlockMask.from_dense_mask(dense, block)


@pytest.mark.parametrize("causal", [False, True])
def test_block_mask(target: Target, causal: bool) -> None:
    q, k, v = _inputs(1, 2, 1, 150, 170, 64, 64, torch.float16)
    bm = _mixed_block_mask(1, 2, 150, 170, 64)
    assert bm.num_partial_blocks > 0 and bool((~bm.layout).any()) and bool(bm.full.any())
    check_attention(target, q, k, v, block_mask=bm, causal=causal, p=0.1)


def test_block_mask_128_with_key_padding(target: Target) -> None:
    q, k, v = _inputs(2, 2, 2, 130, 200, 128, 128, torch.bfloat16)
    bm = _mixed_block_mask(1, 2, 130, 200, 128)
    check_attention(target, q, k, v, block_mask=bm, kpm=torch.rand(2, 200) < 0.2)


def test_empty_blocks_are_never_touched(target: Target) -> None:
    """NaN in the keys and values of a key block no query block sees stays out."""
    q, k, v = _inputs(1, 2, 1, 130, 192, 64, 64, torch.float16)
    bm = _mixed_block_mask(1, 2, 130, 192, 64, empty_key_block=1)
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, :, 64:128] = float("nan")
    v_nan[:, :, 64:128] = float("nan")
    blocks, size = block_mask_args(bm)
    dev, be = target.device, target.backend
    args = ([t.to(dev) for t in blocks], size)
    clean = target.run(be.attention_forward, q.to(dev), k.to(dev), v.to(dev), None, None, False,
                       0.0, 0.125, None, False, *args, keep_fp32_out=True)
    dirty = target.run(be.attention_forward, q.to(dev), k_nan.to(dev), v_nan.to(dev), None,
                       None, False, 0.0, 0.125, None, False, *args, keep_fp32_out=True)
    assert torch.equal(clean[0].cpu(), dirty[0].cpu())
    do = torch.randn_like(clean[0])
    grads = target.run(be.attention_backward, do, q.to(dev), k_nan.to(dev), v_nan.to(dev),
                       dirty[3], dirty[1], None, None, False, 0.0, 0.125, None, *args)
    assert not torch.isnan(grads[0]).any()


def test_partial_masks_smaller_than_the_block(target: Target) -> None:
    """partial_masks (P, pq, pk) with pq < bq, pk < bk: positions past them are hidden."""
    q, k, v = _inputs(1, 2, 1, 128, 128, 64, 64, torch.float16)
    bm = _mixed_block_mask(1, 2, 128, 128, 64)
    blocks, size = block_mask_args(bm)
    small = blocks[6][:, :40, :50].contiguous()
    blocks = [*blocks[:6], small]
    # The reference's view: each partial block's mask cropped to (40, 50).
    padded = torch.zeros_like(bm.partial_masks)
    padded[:, :40, :50] = small
    cropped = BlockMask(bm.seq_lengths, bm.block_size, bm.layout, bm.full, bm.partial_index,
                        padded)
    dev, be = target.device, target.backend
    out = target.run(be.attention_forward, q.to(dev), k.to(dev), v.to(dev), None, None, False,
                     0.0, 0.125, None, False, [t.to(dev) for t in blocks], size)[0].cpu()
    want = reference.attention_math(q.double(), k.double(), v.double(),
                                       cropped.to_dense().expand(1, 2, 128, 128), None, False,
                                       0.0, 0.125, None, False)[0]
    assert (out.double() - want).abs().max().item() < 5e-3


def test_strided_views_read_in_place_and_copied(target: Target) -> None:
    """(B, L, H, D) views, row strides that are not multiples of 8 and a misaligned start
    give the same bits as contiguous inputs."""
    b, h, lq, lk, d = 2, 2, 70, 97, 64
    q0, k0, v0 = _inputs(b, h, 1, lq, lk, d, d, torch.float16)
    q = q0.transpose(1, 2).contiguous().transpose(1, 2)        # (B, L, H, D) view
    wide = torch.zeros(b, 1, lk, 70, dtype=torch.float16)      # row stride 70: copied
    wide[..., :d] = k0
    k = wide[..., :d]
    flat = torch.zeros(v0.numel() + 1, dtype=torch.float16)    # start not 16-byte aligned
    flat[1:] = v0.flatten()
    v = flat[1:].view_as(v0)
    dev, be = target.device, target.backend

    def run(q, k, v):
        out, lse, _, o32 = target.run(be.attention_forward, q.to(dev), k.to(dev), v.to(dev),
                                      None, None, True, 0.0, 0.125, None, False, None, None,
                                      keep_fp32_out=True)
        flat_do = torch.zeros(out.numel() + 1, dtype=out.dtype, device=out.device)
        flat_do[1:] = 1.0
        do = flat_do[1:].view_as(out)  # contiguous, start not 16-byte aligned
        return (out, *target.run(be.attention_backward, do, q.to(dev), k.to(dev), v.to(dev),
                                 o32, lse, None, None, True, 0.0, 0.125, None, None, None)[:3])

    for got, want in zip(run(q, k, v), run(q0, k0, v0), strict=True):
        assert torch.equal(got.cpu(), want.cpu())


def test_bitwise_deterministic_across_schedules() -> None:
    """No atomics and no races: every scheduling seed gives the same bits."""
    require_emulator()
    from mmattn.backends import cuda

    be = cuda.emulated()
    q, k, v = _inputs(1, 4, 2, 70, 97, 64, 64, torch.float16)
    do = torch.randn(1, 4, 70, 64).half()
    results = []
    for seed in (*SEEDS, 777):
        with emu_seed(seed):
            out, lse, _, o32 = be.attention_forward(q, k, v, None, None, True, 0.1, 0.125, 5,
                                                    False, None, None, keep_fp32_out=True)
            grads = be.attention_backward(do, q, k, v, o32, lse, None, None, True, 0.1, 0.125,
                                          5, None, None)[:3]
        results.append((out, lse, *grads))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_empty_lengths(target: Target) -> None:
    dev, be = target.device, target.backend
    q, k, v = _inputs(1, 2, 1, 5, 0, 64, 64, torch.float16)
    out, lse, _, o32 = target.run(be.attention_forward, q.to(dev), k.to(dev), v.to(dev), None,
                                  None, False, 0.0, 0.125, None, False, None, None,
                                  keep_fp32_out=True)
    assert torch.all(out.cpu() == 0) and torch.all(torch.isinf(lse.cpu()))
    dq, dk, dv, _ = target.run(be.attention_backward, torch.ones_like(out), q.to(dev),
                               k.to(dev), v.to(dev), o32, lse, None, None, False, 0.0, 0.125,
                               None, None, None)
    assert torch.all(dq.cpu() == 0) and dk.shape == k.shape and dv.shape == v.shape
    q, k, v = _inputs(1, 2, 1, 0, 9, 64, 64, torch.float16)
    out, lse, _, o32 = target.run(be.attention_forward, q.to(dev), k.to(dev), v.to(dev), None,
                                  None, False, 0.0, 0.125, None, False, None, None,
                                  keep_fp32_out=True)
    assert out.shape == (1, 2, 0, 64)
    dq, dk, dv, _ = target.run(be.attention_backward, out, q.to(dev), k.to(dev), v.to(dev),
                               o32, lse, None, None, False, 0.0, 0.125, None, None, None)
    assert torch.all(dk.cpu() == 0) and torch.all(dv.cpu() == 0)


def test_unsupported_reasons() -> None:
    require_emulator()
    from mmattn.backends import cuda

    be = cuda.emulated()
    q, k, v = _inputs(1, 2, 1, 8, 8, 64, 64, torch.float16)

    def call(q=q, k=k, v=v, return_weights=False, block_size=None):
        return AttentionCall(q, k, v, None, None, False, 0.0, return_weights, block_size, False)

    def why(*args, **kwargs):
        return be.attention_unsupported(call(*args, **kwargs))

    assert why() is None
    assert "float16/bfloat16" in why(q.float(), k.float(), v.float())
    assert "head dims" in why(*_inputs(1, 2, 1, 8, 8, 136, 136, torch.float16))
    assert "head dims" in why(*_inputs(1, 2, 1, 8, 8, 12, 12, torch.float16))
    assert "weights" in why(return_weights=True)
    assert "multiples of 64" in why(block_size=[32, 64])
    assert why(block_size=[128, 64]) is None
    # The real backend wants CUDA tensors.
    assert "cuda tensors" in cuda.attention_unsupported(call())


def test_bad_inputs_raise_before_any_kernel() -> None:
    require_emulator()
    ops = torch.ops.mmattn_emu
    q, k, v = _inputs(1, 2, 1, 8, 8, 12, 12, torch.float16)
    none7 = (None,) * 7
    with pytest.raises(RuntimeError, match="head dims"):
        ops.cuda_attention_fwd(q, k, v, None, None, False, 0.0, 1.0, 0, False, *none7, 0, 0)
    q, k, v = _inputs(1, 2, 1, 8, 8, 64, 64, torch.float16)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.cuda_attention_fwd(q, k.float(), v, None, None, False, 0.0, 1.0, 0, False, *none7,
                               0, 0)
    bm = _mixed_block_mask(1, 2, 8, 8, 4)
    blocks, size = block_mask_args(bm)
    with pytest.raises(RuntimeError, match="multiples of 64"):
        ops.cuda_attention_fwd(q, k, v, None, None, False, 0.0, 1.0, 0, False, *blocks, *size)


def test_opcheck_emulated_ops() -> None:
    """Schemas, fake kernels and dispatch of the ops (the emulated twins; the real ones
    share schemas and fakes)."""
    require_emulator()
    ops = torch.ops.mmattn_emu
    q, k, v = _inputs(1, 2, 1, 9, 11, 16, 16, torch.float16)
    kpm = torch.zeros(1, 11, dtype=torch.bool)
    none7 = (None,) * 7
    torch.library.opcheck(ops.cuda_attention_fwd.default,
                          (q, k, v, None, kpm, True, 0.1, 0.25, 3, True, *none7, 0, 0))
    out, lse, o32 = ops.cuda_attention_fwd(q, k, v, None, kpm, True, 0.1, 0.25, 3, True,
                                           *none7, 0, 0)
    torch.library.opcheck(ops.cuda_attention_bwd.default,
                          (torch.randn_like(out), q, k, v, o32, lse, None, None, kpm, True, 0.1,
                           0.25, 3, *none7, 0, 0))
