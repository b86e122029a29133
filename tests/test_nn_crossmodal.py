"""mmattn.nn.CrossModalAttention against seed 000's CrossModalAttention (the oracle)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tolerance import assert_within_rule

from mmattn.nn import CrossModalAttention

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import seed_models

B, LQ, LK, QD, KD, VD, HEADS = 2, 5, 7, 12, 10, 6, 3


def _pair(dtype: torch.dtype) -> tuple[seed_models.CrossModalAttention, CrossModalAttention]:
    seed = seed_models.CrossModalAttention(QD, KD, VD, HEADS).to(torch.float64)
    ours = CrossModalAttention(QD, KD, VD, HEADS)
    ours.load_state_dict(seed.state_dict())  # same parameter names and shapes
    return seed.to(dtype).eval(), ours.to(dtype).eval()


def _masks() -> dict[str, torch.Tensor | None]:
    per_query = (torch.rand(B, 1, LQ, LK) > 0.5).long()
    per_query[..., 0] = 1
    shared = (torch.rand(LQ, LK) > 0.3).float()
    shared[:, 1] = 1.0
    per_head = torch.rand(B, HEADS, LQ, LK) > 0.4
    per_head[..., 2] = True
    return {"none": None, "int-per-query": per_query, "float-2d": shared,
            "bool-per-head": per_head}


def _forward_backward(module, inputs, mask, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    module.zero_grad()
    out, weights = module(*leaves, mask)
    gen = torch.Generator().manual_seed(5)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)).sum()
    loss = loss + (weights * torch.randn(weights.shape, generator=gen,
                                         dtype=torch.float64).to(dtype)).sum()
    loss.backward()
    grads = [t.grad for t in leaves] + [p.grad for p in module.parameters()]
    return out, weights, grads


@pytest.mark.parametrize("mask_name", list(_masks()))
def test_matches_seed_module(mask_name: str) -> None:
    mask = _masks()[mask_name]
    inputs = (torch.randn(B, LQ, QD, dtype=torch.float64), torch.randn(B, LK, KD,
              dtype=torch.float64), torch.randn(B, LK, VD, dtype=torch.float64))
    seed64, ours64 = _pair(torch.float64)
    ref_out, ref_w, ref_g = _forward_backward(seed64, inputs, mask, torch.float64)
    out, w, g = _forward_backward(ours64, inputs, mask, torch.float64)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-10)
    for mine, theirs in zip(g, ref_g, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-9)

    seed32, ours32 = _pair(torch.float32)
    seed32.load_state_dict(seed64.state_dict())
    ours32.load_state_dict(seed64.state_dict())
    t_out, t_w, t_g = _forward_backward(seed32, inputs, mask, torch.float32)
    o_out, o_w, o_g = _forward_backward(ours32, inputs, mask, torch.float32)
    assert_within_rule(o_out, t_out, ref_out, name="output")
    assert_within_rule(o_w, t_w, ref_w, name="weights")
    for i, (mine, theirs, oracle) in enumerate(zip(o_g, t_g, ref_g, strict=True)):
        assert_within_rule(mine, theirs, oracle, name=f"grad {i}")


def test_need_weights_switch_skips_weights() -> None:
    seed, ours = _pair(torch.float32)
    q, k = torch.randn(B, LQ, QD), torch.randn(B, LK, KD)
    v = torch.randn(B, LK, VD)
    ref, _ = seed(q, k, v)
    out, weights = ours(q, k, v, need_weights=False)
    assert weights is None
    torch.testing.assert_close(out, ref)
    lean = CrossModalAttention(QD, KD, VD, HEADS, need_weights=False).eval()
    lean.load_state_dict(seed.state_dict())
    out, weights = lean(q, k, v)
    assert weights is None
    torch.testing.assert_close(out, ref)
    assert lean(q, k, v, need_weights=True)[1].shape == (B, HEADS, LQ, LK)


def test_fully_masked_row_is_zero_where_seed_is_nan() -> None:
    seed, ours = _pair(torch.float64)
    q, k = torch.randn(B, LQ, QD, dtype=torch.float64), torch.randn(B, LK, KD, dtype=torch.float64)
    v = torch.randn(B, LK, VD, dtype=torch.float64)
    mask = torch.ones(LQ, LK)
    mask[2] = 0
    ref, ref_w = seed(q, k, v, mask)
    out, w = ours(q, k, v, mask)
    assert torch.isnan(ref[:, 2]).all()
    assert torch.equal(w[:, :, 2], torch.zeros_like(w[:, :, 2]))
    torch.testing.assert_close(out[:, 2], ours.out_proj.bias.expand(B, QD))
    rows = [0, 1, 3, 4]
    torch.testing.assert_close(out[:, rows], ref[:, rows])
    torch.testing.assert_close(w[:, :, rows], ref_w[:, :, rows])


def test_dropout_on_weights_in_training() -> None:
    ours = CrossModalAttention(16, 16, 16, 2, dropout=0.3)
    q, kv = torch.randn(4, 16, 16), torch.randn(4, 32, 16)
    ours.train()
    out, weights = ours(q, kv, kv)
    assert out.shape == (4, 16, 16) and weights.shape == (4, 2, 16, 32)
    assert 0.25 < (weights == 0).float().mean().item() < 0.35
    assert abs(weights.sum(-1).mean().item() - 1.0) < 0.1
    ours.eval()
    out_eval, weights_eval = ours(q, kv, kv)
    torch.testing.assert_close(weights_eval.sum(-1), torch.ones(4, 2, 16))
    assert not torch.allclose(out, out_eval)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        CrossModalAttention(10, 10, 10, 3)
    ours = CrossModalAttention(QD, KD, VD, HEADS)
    with pytest.raises(ValueError, match="3-D"):
        ours(torch.randn(LQ, QD), torch.randn(LK, KD), torch.randn(LK, VD))
    with pytest.raises(ValueError, match="mask of shape"):
        ours(torch.randn(B, LQ, QD), torch.randn(B, LK, KD), torch.randn(B, LK, VD),
             torch.ones(LQ, LK + 1))
