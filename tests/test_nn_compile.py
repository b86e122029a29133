"""torch.compile: the modules trace with fullgraph=True; a converted Transformer trains."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mmattn
from mmattn.nn import CrossModalAttention, MultiheadAttention


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _forward_backward(module, args, kwargs):
    out, weights = module(*args, **kwargs)
    loss = out.square().sum() + (0 if weights is None else weights.square().sum())
    grads = torch.autograd.grad(loss, [a for a in args if a.requires_grad] +
                                list(module.parameters()))
    return out, weights, grads


@pytest.mark.parametrize(("backend", "need_weights"), [("inductor", True),
                                                         ("aot_eager", False)])
def test_multihead_attention_compiles_fullgraph(backend: str, need_weights: bool) -> None:
    module = MultiheadAttention(16, 2, batch_first=True)
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    x = torch.randn(2, 5, 16, requires_grad=True)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    kwargs = {"key_padding_mask": pad, "need_weights": need_weights}
    ref = _forward_backward(module, (x, x, x), kwargs)
    got = _forward_backward(compiled, (x, x, x), kwargs)
    torch.testing.assert_close(got[0], ref[0])
    assert (got[1] is None) == (not need_weights)
    if need_weights:
        torch.testing.assert_close(got[1], ref[1])
    for mine, theirs in zip(got[2], ref[2], strict=True):
        torch.testing.assert_close(mine, theirs)


def test_cross_modal_attention_compiles_fullgraph() -> None:
    module = CrossModalAttention(16, 12, 8, 4, dropout=0.0)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    args = (torch.randn(2, 3, 16, requires_grad=True), torch.randn(2, 7, 12),
            torch.randn(2, 7, 8))
    ref = _forward_backward(module, args, {})
    got = _forward_backward(compiled, args, {})
    torch.testing.assert_close(got[0], ref[0])
    for mine, theirs in zip(got[2], ref[2], strict=True):
        torch.testing.assert_close(mine, theirs)


def test_converted_transformer_trains_under_compile() -> None:
    torch.manual_seed(0)
    eager = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                           dim_feedforward=32, dropout=0.0, batch_first=True)
    mmattn.convert(eager)
    model = copy.deepcopy(eager)
    # aot_eager: dynamo + AOT autograd (where custom ops must trace) without the
    # C++ code generation that would make this test take tens of seconds on 2 cores
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    src, tgt = torch.randn(2, 7, 16), torch.randn(2, 5, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    losses = []
    for net, params in ((eager, eager.parameters()), (compiled, model.parameters())):
        optimizer = torch.optim.SGD(params, lr=0.1)
        for _ in range(2):
            optimizer.zero_grad()
            loss = net(src, tgt, tgt_mask=causal, tgt_is_causal=True).square().mean()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    torch.testing.assert_close(losses[2:], losses[:2])
    for mine, ref in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(mine, ref)


def test_inference_compiles_fullgraph_through_mmattn() -> None:
    # Eager inference at this size takes PyTorch's fused kernel (see
    # NATIVE_INFERENCE_MAX_WORK); a traced graph holds mmattn's op instead, no break.
    module = MultiheadAttention(16, 2, batch_first=True).eval()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected, expected_weights = module(x, x, x)
        out, weights = compiled(x, x, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)
