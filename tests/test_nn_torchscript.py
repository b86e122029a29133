"""TorchScript, torch.jit.trace and torch.export of mmattn's modules and converted models.

Scripted modules call the custom op ``mmattn::attention_forward`` (backend "auto": the
op asks mmattn.dispatch per call), so they run mmattn's kernels and give eager mode's
result, gradients and dropout draws. ``block_mask`` is eager / torch.compile only.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import seed_models
import torch
from torch import nn

import mmattn
from mmattn.nn import CrossModalAttention, MultiheadAttention, WSLinear, WSMultiModalFusion

pytestmark = [  # PyTorch's own notices about the APIs under test
    pytest.mark.filterwarnings("ignore:`torch.jit.[a-z_]+` is deprecated"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore:enable_nested_tensor is True"),
    pytest.mark.filterwarnings("ignore:'norm' was found in ScriptModule constants"),
]

E, H, N, L, S = 8, 2, 3, 4, 5


@pytest.fixture(autouse=True)
def _one_kernel_for_eager_and_scripted():
    """Eager modules send small plain calls to SDPA (``dispatch.module_call_to_sdpa``);
    scripted ones always call mmattn's op, whose automatic choice follows the same thread
    context. Under a backend context both run the same kernel, so results compare
    exactly (test_scripted_and_eager_agree_without_a_context covers the default)."""
    with mmattn.use_backend("cpu"):
        yield


def _exact(actual, expected) -> None:
    """Scripted and eager run the same kernels on the same inputs: equal results."""
    if expected is None:
        assert actual is None
        return
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def _graph_ops(scripted: torch.jit.ScriptModule) -> str:
    graph = scripted.forward.graph.copy()
    torch._C._jit_pass_inline(graph)
    return str(graph)


MHA_CASES = {
    "packed": {},
    "kdim-vdim": {"kdim": 6, "vdim": 5},
    "bias-kv-zero-attn": {"add_bias_kv": True, "add_zero_attn": True},
    "no-bias-batch-first": {"bias": False, "batch_first": True},
}


def _mha_inputs(ctor: dict, unbatched: bool = False):
    batch_first = ctor.get("batch_first", False)

    def seq(length: int, dim: int) -> torch.Tensor:
        if unbatched:
            return torch.randn(length, dim)
        return torch.randn(N, length, dim) if batch_first else torch.randn(length, N, dim)

    return seq(L, E), seq(S, ctor.get("kdim", E)), seq(S, ctor.get("vdim", E))


@pytest.mark.parametrize("name", list(MHA_CASES))
def test_scripted_multihead_attention_equals_eager(name: str) -> None:
    ctor = MHA_CASES[name]
    torch.manual_seed(0)
    module = MultiheadAttention(E, H, **ctor)
    scripted = torch.jit.script(module)
    assert "mmattn::attention_forward" in _graph_ops(scripted)
    query, key, value = _mha_inputs(ctor)
    hidden = torch.rand(L, S) > 0.6
    hidden[:, 0] = False
    pad = torch.zeros(N, S, dtype=torch.bool)
    pad[1, 3:] = True
    float_mask = torch.randn(N * H, L, S)
    for kwargs in ({}, {"need_weights": False}, {"attn_mask": hidden},
                   {"key_padding_mask": pad, "average_attn_weights": False},
                   {"attn_mask": float_mask, "key_padding_mask": pad.float() * -1e4}):
        out, weights = module(query, key, value, **kwargs)
        s_out, s_weights = scripted(query, key, value, **kwargs)
        _exact(s_out, out)
        _exact(s_weights, weights)
    if ctor.get("kdim") is None:  # self-attention: one packed projection, unbatched too
        x = _mha_inputs(ctor)[0]
        _exact(scripted(x, x, x)[0], module(x, x, x)[0])
        x1 = _mha_inputs(ctor, unbatched=True)[0]
        _exact(scripted(x1, x1, x1)[0], module(x1, x1, x1)[0])


def test_scripted_module_trains_like_eager_with_dropout() -> None:
    torch.manual_seed(0)
    module = MultiheadAttention(16, 2, dropout=0.3, batch_first=True)
    scripted = torch.jit.script(copy.deepcopy(module))
    x = torch.randn(2, 6, 16)
    results = []
    for net in (module, scripted):
        leaf = x.clone().requires_grad_()
        torch.manual_seed(5)  # the same Philox seed drawn: the same dropped weights
        out, weights = net(leaf, leaf, leaf)
        (out.square().sum() + weights.sum()).backward()
        results.append([out, weights, leaf.grad, *(p.grad for p in net.parameters())])
    assert (results[0][1] == 0).any()  # dropout did drop weights
    for mine, theirs in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)


def test_scripted_module_keeps_mmattn_semantics_and_backend_choice(monkeypatch) -> None:
    module = MultiheadAttention(E, H, batch_first=True)
    scripted = torch.jit.script(module)
    x = torch.randn(N, L, E)
    everything_hidden = torch.zeros(L, L, dtype=torch.bool)
    everything_hidden[1] = True  # query 1 sees no key: mmattn gives 0, PyTorch NaN
    out, weights = scripted(x, x, x, attn_mask=everything_hidden)
    assert torch.isfinite(out).all() and (weights[:, 1] == 0).all()
    # The op consults mmattn.dispatch per call, so use_backend applies in TorchScript.
    reference = mmattn.backends.get("reference")
    calls = []
    real = reference.attention_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(reference, "attention_forward", spy)
    with mmattn.use_backend("reference"):
        out = scripted(x, x, x)[0]
    assert calls == [1]
    torch.testing.assert_close(out, module(x, x, x)[0], rtol=1e-5, atol=1e-6)


def test_block_mask_is_refused_in_torchscript_only() -> None:
    module = MultiheadAttention(E, H, batch_first=True)
    scripted = torch.jit.script(module)
    x = torch.randn(N, L, E)
    block_mask = mmattn.BlockMask.causal(L, 2)
    module(x, x, x, block_mask=block_mask)  # eager: fine
    # TorchScript cannot take the Python object as an argument at all ...
    with pytest.raises(RuntimeError, match="BlockMask"):
        scripted(x, x, x, block_mask=block_mask)
    # ... and the scripted forward refuses anything else passed as block_mask.
    with pytest.raises(torch.jit.Error, match="block_mask works in eager mode"):
        scripted(x, x, x, block_mask=block_mask.to_dense())


def test_scripted_module_saves_and_loads() -> None:
    module = MultiheadAttention(E, H, kdim=6, vdim=5)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    query, key, value = _mha_inputs({"kdim": 6, "vdim": 5})
    _exact(loaded(query, key, value)[0], module(query, key, value)[0])


def test_scripted_cross_modal_attention_and_ws_modules() -> None:
    torch.manual_seed(0)
    cross = CrossModalAttention(16, 12, 8, 4, dropout=0.0)
    scripted = torch.jit.script(cross)
    q, k, v = torch.randn(2, 3, 16), torch.randn(2, 7, 12), torch.randn(2, 7, 8)
    mask = (torch.rand(2, 1, 3, 7) > 0.4).long()
    for args in ((q, k, v), (q, k, v, mask)):
        out, weights = cross(*args)
        s_out, s_weights = scripted(*args)
        _exact(s_out, out)
        _exact(s_weights, weights)
    out, weights = scripted(q, k, v, None, False)
    _exact(out, cross(q, k, v, None, False)[0])
    assert weights.numel() == 0  # TorchScript's static types: empty, not None (see forward)

    linear = WSLinear(16, 12, 4, 0.3, seed=1)
    x = torch.randn(5, 16, requires_grad=True)
    _exact(torch.jit.script(linear)(x), linear(x))
    fusion = WSMultiModalFusion(3, 8, k=4, beta=0.3)
    features = [torch.randn(2, 8) for _ in range(3)]
    _exact(torch.jit.script(fusion)(features), fusion(features))


def _converted(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model).eval()
    report = mmattn.convert(model)
    assert len(report) > 0
    return model


SCRIPTABLE_MODELS = {
    # name -> (builder, inputs): every model here scripts in PyTorch before conversion.
    "nn.Transformer": (
        lambda: nn.Transformer(16, 2, 1, 1, 32, dropout=0.0),
        lambda: (torch.randn(7, 2, 16), torch.randn(5, 2, 16))),
    "nn.TransformerEncoder": (
        lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0,
                                                                 batch_first=True), 2,
                                      enable_nested_tensor=False),
        lambda: (torch.randn(2, 6, 16),)),
    "seed000 MultimodalFusionModel": (
        lambda: seed_models.MultimodalFusionModel(10, 11, 12, 16, 4, 3),
        lambda: (torch.randn(2, 5, 10), torch.randn(2, 5, 11), torch.randn(2, 5, 12))),
    "seed001 CrossModalAttentionBlock": (
        lambda: seed_models.CrossModalAttentionBlock(16, 4),
        # a mask passed: PyTorch's own scripted block fails without one (an unannotated
        # mask=None becomes an undefined Tensor in TorchScript)
        lambda: (torch.randn(5, 2, 16), torch.randn(7, 2, 16), torch.randn(7, 2, 16),
                 torch.randn(5, 7))),
    "seed002 MultiModalTransformer": (
        lambda: seed_models.MultiModalTransformer(16, 4, 3),
        lambda: (torch.randn(2, 16), torch.randn(2, 16), torch.randn(2, 16))),
}


@pytest.mark.parametrize("name", list(SCRIPTABLE_MODELS))
def test_converted_models_script_where_pytorch_models_do(name: str) -> None:
    build, inputs = SCRIPTABLE_MODELS[name]
    torch.manual_seed(0)
    original = build().eval()
    args = inputs()
    torch.jit.script(original)  # PyTorch's model scripts ...
    model = _converted(original)
    scripted = torch.jit.script(model)  # ... and so does the converted one
    assert "mmattn::attention_forward" in _graph_ops(scripted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested-tensor fast-path notices
        expected, got = model(*args), scripted(*args)
    if isinstance(expected, tuple):
        expected, got = expected[0], got[0]
    _exact(got, expected)
    torch.testing.assert_close(got, original(*args) if not isinstance(original(*args), tuple)
                               else original(*args)[0], rtol=1e-5, atol=1e-5)


def _grads(module: nn.Module, run) -> list[torch.Tensor]:
    module.zero_grad()
    run().square().sum().backward()
    return [p.grad.clone() for p in module.parameters()]


def test_trace_runs_the_custom_op_forward_and_backward() -> None:
    torch.manual_seed(0)
    mha = MultiheadAttention(E, H, batch_first=True)
    query, memory = torch.randn(N, L, E), torch.randn(N, S, E)
    traced = torch.jit.trace(mha, (query, memory, memory))  # its own sanity check passes
    assert "mmattn::attention_forward" in _graph_ops(traced)
    # (the trace projects key and value apart: input identity is not traced)
    torch.testing.assert_close(traced(query, memory, memory)[0], mha(query, memory, memory)[0])
    expected = _grads(mha, lambda: mha(query, memory, memory)[0])
    got = _grads(mha, lambda: traced(query, memory, memory)[0])
    for mine, ref in zip(got, expected, strict=True):
        torch.testing.assert_close(mine, ref)

    cross = CrossModalAttention(16, 12, 12, 4, dropout=0.0)
    q, kv = torch.randn(2, 3, 16), torch.randn(2, 7, 12)
    traced = torch.jit.trace(cross, (q, kv, kv))
    torch.testing.assert_close(traced(q, kv, kv)[0], cross(q, kv, kv)[0])
    linear = WSLinear(16, 12, 4, 0.3, seed=1)
    x = torch.randn(5, 16)
    traced = torch.jit.trace(linear, (x,))
    assert "mmattn::ws_linear" in _graph_ops(traced)
    _exact(traced(x), linear(x))


def test_export_of_modules_matches_eager() -> None:
    torch.manual_seed(0)
    mha = MultiheadAttention(E, H, batch_first=True)
    query, memory = torch.randn(N, L, E), torch.randn(N, S, E)
    exported = torch.export.export(mha, (query, memory, memory))
    _exact(exported.module()(query, memory, memory)[0], mha(query, memory, memory)[0])
    cross = CrossModalAttention(16, 12, 12, 4, dropout=0.0).eval()
    q, kv = torch.randn(2, 3, 16), torch.randn(2, 7, 12)
    exported = torch.export.export(cross, (q, kv, kv))
    _exact(exported.module()(q, kv, kv)[0], cross(q, kv, kv)[0])


def test_scripted_and_eager_agree_without_a_context() -> None:
    """Without a backend context a small plain call runs SDPA in eager mode and mmattn's
    kernel when scripted: the same function, equal to float32 rounding."""
    torch.manual_seed(0)
    module = MultiheadAttention(E, H).train()
    scripted = torch.jit.script(module)
    query, key, value = _mha_inputs({})
    with mmattn.use_backend(None):
        eager_out, _ = module(query, key, value, need_weights=False)
        scripted_out, _ = scripted(query, key, value, need_weights=False)
    torch.testing.assert_close(scripted_out, eager_out, rtol=1e-6, atol=1e-6)
