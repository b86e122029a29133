"""The reference backend against PyTorch, nn.MultiheadAttention, seed 000 and float64 math."""

from __future__ import annotations

import math

import pytest
import seed_models
import torch
import torch.nn.functional as F
from torch import nn

import mmattn

F64 = torch.float64


def _qkv(b=2, hq=4, hkv=2, lq=7, lk=9, d=8, dv=5, dtype=F64, requires_grad=False):
    q = torch.randn(b, hq, lq, d, dtype=dtype)
    k = torch.randn(b, hkv, lk, d, dtype=dtype)
    v = torch.randn(b, hkv, lk, dv, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _ref(*args, **kwargs):
    return mmattn.cross_attention(*args, backend="reference", **kwargs)


@pytest.mark.parametrize("lq,lk", [(1, 1), (7, 9), (97, 13), (16, 1000)])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
def test_matches_sdpa_dense(lq, lk, hq, hkv):
    q, k, v = _qkv(hq=hq, hkv=hkv, lq=lq, lk=lk, d=8, dv=8)
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(_ref(q, k, v), expected)


def test_dv_differs_from_d_and_custom_scale():
    q, k, v = _qkv(d=8, dv=3)
    expected = F.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(_ref(q, k, v, scale=0.3), expected)


@pytest.mark.parametrize("mask_shape", [(7, 9), (1, 1, 7, 9), (2, 1, 1, 9), (2, 4, 7, 9)])
def test_bool_and_float_masks_match_sdpa(mask_shape):
    q, k, v = _qkv(hq=4, hkv=4)
    bool_mask = torch.rand(mask_shape) > 0.3
    bool_mask[..., 0] = True  # SDPA gives NaN for empty rows; keep every row non-empty
    torch.testing.assert_close(_ref(q, k, v, attn_mask=bool_mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask))
    float_mask = torch.randn(mask_shape, dtype=F64)
    torch.testing.assert_close(_ref(q, k, v, attn_mask=float_mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=float_mask))


@pytest.mark.parametrize("lq,lk", [(7, 9), (9, 7), (5, 5)])
def test_causal_is_top_left_like_sdpa(lq, lk):
    q, k, v = _qkv(hq=2, hkv=2, lq=lq, lk=lk)
    torch.testing.assert_close(_ref(q, k, v, is_causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_key_padding_mask_and_empty_rows_give_zero():
    q, k, v = _qkv(hq=2, hkv=2, lq=4, lk=6)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[0, 3:] = True
    kpm[1, :] = True  # every key of batch 1 is padding: its rows must be exactly 0
    out, w = _ref(q, k, v, key_padding_mask=kpm, return_weights=True)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(w[1], torch.zeros_like(w[1]))
    expected = F.scaled_dot_product_attention(q[:1], k[:1], v[:1],
                                              attn_mask=~kpm[:1].view(1, 1, 1, 6))
    torch.testing.assert_close(out[:1], expected)
    assert torch.equal(w[0, :, :, 3:], torch.zeros_like(w[0, :, :, 3:]))
    # A float mask of -inf hides keys the same way; a fully hidden row is 0 too.
    float_mask = torch.zeros(4, 6, dtype=F64)
    float_mask[2] = -math.inf
    out = _ref(q, k, v, attn_mask=float_mask)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert not torch.isnan(out).any()


def test_zero_lengths():
    q, k, v = _qkv(lq=0, lk=5)
    assert _ref(q, k, v).shape == (2, 4, 0, 5)
    q, k, v = _qkv(lq=3, lk=0, requires_grad=True)
    out, w = _ref(q, k, v, return_weights=True)
    assert torch.equal(out, torch.zeros(2, 4, 3, 5, dtype=F64)) and w.shape == (2, 4, 3, 0)
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


def test_gradients_match_autograd_of_sdpa():
    q, k, v = _qkv(requires_grad=True)
    mask = torch.rand(7, 9) > 0.2
    mask[:, 0] = True
    out = _ref(q, k, v, attn_mask=mask)
    grads = torch.autograd.grad(out.sin().sum(), (q, k, v))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    expected = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=mask, enable_gqa=True)
    grads2 = torch.autograd.grad(expected.sin().sum(), (q2, k2, v2))
    for g, g2 in zip(grads, grads2, strict=True):
        torch.testing.assert_close(g, g2)


@pytest.mark.parametrize("dropout_p", [0.0, 0.35])
def test_gradcheck_with_masks_dropout_and_weights(dropout_p):
    q, k, v = _qkv(b=1, hq=2, hkv=1, lq=4, lk=5, d=3, dv=2, requires_grad=True)
    kpm = torch.tensor([[False, False, True, False, False]])
    mask = torch.rand(4, 5) > 0.3
    mask[1] = False  # one empty row: zero output, zero gradient, no NaN

    def fn(q, k, v):
        out, w = _ref(q, k, v, attn_mask=mask, key_padding_mask=kpm, dropout_p=dropout_p,
                      dropout_seed=11, return_weights=True)
        return out, w

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_float_mask_receives_gradient():
    q, k, v = _qkv(b=1, hq=2, hkv=2, lq=3, lk=4, d=3, dv=2, requires_grad=True)
    bias = torch.randn(1, 2, 3, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, bias: _ref(q, k, v, attn_mask=bias), (q, bias))
    broadcast_bias = torch.randn(3, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b_: _ref(q, k, v, attn_mask=b_), (broadcast_bias,))


def test_non_contiguous_inputs():
    base = torch.randn(2, 7, 4, 8, dtype=F64)  # (B, L, H, D) as after a projection
    q = base.transpose(1, 2)
    k = torch.randn(2, 9, 4, 8, dtype=F64).transpose(1, 2)
    v = torch.randn(2, 4, 9, 16, dtype=F64)[..., ::2]
    assert not q.is_contiguous() and not v.is_contiguous()
    expected = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
    torch.testing.assert_close(_ref(q, k, v), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_and_single_precision_accumulate_in_fp32(dtype):
    q, k, v = _qkv(lq=33, lk=65, d=16, dv=16)
    oracle = _ref(q, k, v)
    low = _ref(q.to(dtype), k.to(dtype), v.to(dtype))
    assert low.dtype == dtype
    sdpa = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), enable_gqa=True)
    ours_err = (low.double() - oracle).abs().max().item()
    sdpa_err = (sdpa.double() - oracle).abs().max().item()
    assert ours_err <= 2 * sdpa_err + 1e-6


def test_matches_multihead_attention_math():
    embed, heads = 16, 4
    mha = nn.MultiheadAttention(embed, heads, batch_first=True, kdim=12, vdim=10, dtype=F64)
    mha.eval()
    query = torch.randn(3, 5, embed, dtype=F64)
    key = torch.randn(3, 8, 12, dtype=F64)
    value = torch.randn(3, 8, 10, dtype=F64)
    kpm = torch.zeros(3, 8, dtype=torch.bool)
    kpm[1, 6:] = True
    expected, expected_w = mha(query, key, value, key_padding_mask=kpm,
                               average_attn_weights=False)

    def heads_view(x):
        return x.view(3, -1, heads, embed // heads).transpose(1, 2)

    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    q = heads_view(F.linear(query, mha.q_proj_weight, b_q))
    k = heads_view(F.linear(key, mha.k_proj_weight, b_k))
    v = heads_view(F.linear(value, mha.v_proj_weight, b_v))
    out, w = _ref(q, k, v, key_padding_mask=kpm, return_weights=True)
    out = mha.out_proj(out.transpose(1, 2).reshape(3, 5, embed))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(w, expected_w)


@pytest.mark.parametrize("with_mask", [False, True])
def test_matches_seed_cross_modal_attention(with_mask):
    seed = seed_models.CrossModalAttention(24, 10, 14, num_heads=3).double().eval()
    query = torch.randn(2, 6, 24, dtype=F64, requires_grad=True)
    key = torch.randn(2, 11, 10, dtype=F64)
    value = torch.randn(2, 11, 14, dtype=F64)
    mask = (torch.rand(2, 1, 6, 11) > 0.3).to(torch.int64) if with_mask else None
    if mask is not None:
        mask[..., 0] = 1
    expected, expected_w = seed(query, key, value, mask)

    def split(x):
        return x.view(2, -1, 3, 8).transpose(1, 2)

    q = split(seed.q_proj(query))
    k = split(seed.k_proj(key))
    v = split(seed.v_proj(value))
    bool_mask = None if mask is None else mask != 0
    out, w = _ref(q, k, v, attn_mask=bool_mask, return_weights=True)
    out = seed.out_proj(out.transpose(1, 2).reshape(2, 6, 24))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(w, expected_w)
    g1 = torch.autograd.grad(out.sum(), query)[0]
    g2 = torch.autograd.grad(expected.sum(), query)[0]
    torch.testing.assert_close(g1, g2)
