"""mmattn.convert / mmattn.revert on PyTorch's transformers and the seeds' models."""

from __future__ import annotations

import copy

import pytest
import seed_models
import torch
from torch import nn

import mmattn
from mmattn.nn import CrossModalAttention, MultiheadAttention


def _transformer(batch_first: bool) -> nn.Transformer:
    return nn.Transformer(d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=1,
                          dim_feedforward=32, dropout=0.0, batch_first=batch_first)


def _params_after_one_step(model: nn.Module, run) -> list[torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = run(model).pow(2).mean()
    loss.backward()
    optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_outputs_and_training_step_match(batch_first: bool) -> None:
    reference = _transformer(batch_first)
    model = copy.deepcopy(reference)
    report = mmattn.convert(model)
    assert [s.path for s in report] == [
        "encoder.layers.0.self_attn", "encoder.layers.1.self_attn",
        "decoder.layers.0.self_attn", "decoder.layers.0.multihead_attn"]
    assert all(s.from_type == "torch.nn.MultiheadAttention" and
               s.to_type == "mmattn.nn.MultiheadAttention" for s in report)
    assert "encoder.layers.0.self_attn" in str(report) and "->" in str(report)
    assert sum(isinstance(m, MultiheadAttention) for m in model.modules()) == 4

    def shape(length: int) -> tuple[int, int, int]:
        return (3, length, 16) if batch_first else (length, 3, 16)

    src, tgt = torch.randn(shape(7)), torch.randn(shape(5))
    src_pad = torch.zeros(3, 7, dtype=torch.bool)
    src_pad[1, 5:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(5)

    def run(m: nn.Module) -> torch.Tensor:
        return m(src, tgt, tgt_mask=causal, tgt_is_causal=True, src_key_padding_mask=src_pad,
                 memory_key_padding_mask=src_pad)

    torch.testing.assert_close(run(model), run(reference), rtol=1e-5, atol=1e-5)
    ours = _params_after_one_step(model, run)
    theirs = _params_after_one_step(reference, run)
    for mine, ref in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)

    model.eval()
    reference.eval()
    with torch.no_grad():  # PyTorch's inference fast path reads our weights
        torch.testing.assert_close(run(model), run(reference), rtol=1e-5, atol=1e-5)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            torch.testing.assert_close(run(model), run(reference), rtol=1e-5, atol=1e-5)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def test_encoder_runs_mmattn_in_training() -> None:
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    mmattn.convert(encoder)
    calls = []
    for module in encoder.modules():
        if isinstance(module, MultiheadAttention):
            module.register_forward_hook(lambda *_: calls.append(1))
    encoder(torch.randn(2, 6, 16)).sum().backward()
    assert len(calls) == 2


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_encoder_nested_tensor_fast_path_in_eval() -> None:
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    reference = nn.TransformerEncoder(layer, num_layers=2).eval()
    model = copy.deepcopy(reference)
    mmattn.convert(model)
    src = torch.randn(2, 6, 16)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 4:] = True
    with torch.no_grad():
        torch.testing.assert_close(model(src, src_key_padding_mask=pad),
                                   reference(src, src_key_padding_mask=pad))


def test_parameters_are_adopted_not_copied() -> None:
    model = nn.Sequential(nn.MultiheadAttention(8, 2, kdim=6, vdim=5, add_bias_kv=True,
                                                dtype=torch.float64))
    old = model[0]
    old.eval()
    old.k_proj_weight.requires_grad_(False)
    seen = []
    old.register_forward_hook(lambda *_: seen.append(1))
    before = {name: p for name, p in old.named_parameters()}
    rng = torch.random.get_rng_state()
    mmattn.convert(model)
    assert torch.equal(rng, torch.random.get_rng_state())  # built on meta: no random draws
    new = model[0]
    assert type(new) is MultiheadAttention and not new.training
    assert new.out_proj is old.out_proj
    for name, p in new.named_parameters():
        assert p is before[name], name
    assert not new.k_proj_weight.requires_grad
    q, kv = torch.randn(3, 2, 8, dtype=torch.float64), torch.randn(4, 2, 6, dtype=torch.float64)
    new(q, kv, torch.randn(4, 2, 5, dtype=torch.float64))
    assert seen == [1]  # the forward hook moved with the swap


def test_shared_module_stays_shared_and_inplace_false_copies() -> None:
    shared = nn.MultiheadAttention(8, 2)
    model = nn.ModuleDict({"a": shared, "b": shared, "c": nn.Linear(8, 8)})
    report = mmattn.convert(model, inplace=False)
    assert model["a"] is shared and type(shared) is nn.MultiheadAttention
    converted = report.model
    assert converted is not model
    assert converted["a"] is converted["b"] and type(converted["a"]) is MultiheadAttention
    assert [s.path for s in report] == ["a", "b"]


def test_root_module_and_skipped_subclass() -> None:
    report = mmattn.convert(nn.MultiheadAttention(8, 2))
    assert type(report.model) is MultiheadAttention
    assert report.swapped[0].path == "<model>"

    class Custom(nn.MultiheadAttention):
        pass

    report = mmattn.convert(nn.Sequential(Custom(8, 2)))
    assert len(report) == 0
    assert report.skipped and "subclass" in report.skipped[0][2]
    assert "kept 0" in str(report)


def test_seed_000_fusion_model_converts_and_reverts() -> None:
    torch.manual_seed(1)
    reference = seed_models.MultimodalFusionModel(12, 10, 8, 16, 4, 5).eval()
    model = copy.deepcopy(reference)
    keys = list(model.state_dict())
    report = mmattn.convert(model)
    assert [s.path for s in report] == ["visual_audio_attention", "audio_visual_attention",
                                        "text_visual_attention"]
    assert all(type(m) is CrossModalAttention for m in
               (model.visual_audio_attention, model.text_visual_attention))
    assert list(model.state_dict()) == keys
    visual, audio, text = torch.randn(2, 9, 12), torch.randn(2, 9, 10), torch.randn(2, 4, 8)
    mask = torch.ones(1, 1, 1, 9)  # hides key 3 of every attention
    mask[..., 3] = 0
    logits, weights = model(visual, audio, text, mask)
    ref_logits, ref_weights = reference(visual, audio, text, mask)
    torch.testing.assert_close(logits, ref_logits)
    for mine, theirs in zip(weights, ref_weights, strict=True):
        torch.testing.assert_close(mine, theirs)

    back = mmattn.revert(model)
    assert len(back) == 3
    assert type(model.visual_audio_attention) is seed_models.CrossModalAttention
    torch.testing.assert_close(model(visual, audio, text)[0], reference(visual, audio, text)[0])
    # a module built as mmattn has no original class to go back to
    kept = mmattn.revert(nn.Sequential(CrossModalAttention(8, 8, 8, 2)))
    assert len(kept) == 0 and "no original class" in kept.skipped[0][2]


def test_seed_001_multimodal_transformer_converts() -> None:
    reference = seed_models.MultimodalTransformer(16, 4, 2).eval()
    model = copy.deepcopy(reference)
    report = mmattn.convert(model)
    assert [s.path for s in report] == [
        "cross_attention_layers.0.attention", "cross_attention_layers.1.attention",
        "self_attention_layers.0", "self_attention_layers.1"]
    a, b = torch.randn(6, 2, 16), torch.randn(9, 2, 16)
    torch.testing.assert_close(model(a, b), reference(a, b))
    assert len(mmattn.revert(model)) == 4
    assert not any(isinstance(m, MultiheadAttention) for m in model.modules())


def test_seed_002_ws_fusion_follows_feature_check() -> None:
    """Swapped when mmattn.nn.WSMultiModalFusion exists with from_seed, else reported."""
    torch.manual_seed(0)
    reference = seed_models.WSMultiModalFusion(3, 8, k=4, beta=0.3)
    model = nn.Sequential(copy.deepcopy(reference))
    report = mmattn.convert(model)
    target = getattr(mmattn.nn, "WSMultiModalFusion", None)
    if target is not None and hasattr(target, "from_seed"):
        assert [s.to_type for s in report] == ["mmattn.nn.WSMultiModalFusion"]
        features = [torch.randn(5, 8) for _ in range(3)]
        torch.testing.assert_close(model[0](features), reference(features))
        assert len(mmattn.revert(model)) == 1 and type(model[0]) is type(reference)
        torch.testing.assert_close(model[0](features), reference(features))
    else:
        assert len(report) == 0
        assert report.skipped[0][0] == "0" and "WSMultiModalFusion" in report.skipped[0][2]


class _CompressedWSStandIn(nn.Module):
    """Stands in for mmattn.nn.WSMultiModalFusion's conversion API (from_seed,
    dense_state_dict, forward): stores only the kept weights."""

    def __init__(self, mask: torch.Tensor, kept: torch.Tensor, n_modalities: int,
                 features_per_modality: int) -> None:
        super().__init__()
        self.register_buffer("index", mask.nonzero())
        self.kept = nn.Parameter(kept)
        self.shape = tuple(mask.shape)
        self.n_modalities, self.features_per_modality = n_modalities, features_per_modality

    @classmethod
    def from_seed(cls, module: nn.Module) -> _CompressedWSStandIn:
        mask = module.mask.bool()
        return cls(mask, module.weight.detach()[mask], module.n_modalities,
                   module.features_per_modality)

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        weight = self.kept.new_zeros(self.shape).index_put(tuple(self.index.t()), self.kept)
        mask = torch.zeros(self.shape).index_put(tuple(self.index.t()), torch.tensor(1.0))
        return {"weight": weight.detach(), "mask": mask}

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return nn.functional.linear(torch.cat(features, -1), self.dense_state_dict()["weight"])


def test_seed_002_ws_fusion_conversion_plumbing(monkeypatch: pytest.MonkeyPatch) -> None:
    """convert/revert with a WSMultiModalFusion that offers from_seed (a stand-in)."""
    monkeypatch.setattr(mmattn.nn, "WSMultiModalFusion", _CompressedWSStandIn, raising=False)
    torch.manual_seed(0)
    reference = seed_models.WSMultiModalFusion(3, 8, k=4, beta=0.3).eval()
    model = nn.Sequential(copy.deepcopy(reference))
    report = mmattn.convert(model)
    assert [s.path for s in report] == ["0"] and type(model[0]) is _CompressedWSStandIn
    assert not model[0].training
    features = [torch.randn(5, 8) for _ in range(3)]
    torch.testing.assert_close(model[0](features), reference(features))
    assert len(mmattn.convert(model)) == 0  # already converted
    back = mmattn.revert(model)
    assert len(back) == 1 and type(model[0]) is seed_models.WSMultiModalFusion
    assert model[0].n_modalities == 3 and model[0].features_per_modality == 8
    torch.testing.assert_close(model[0].weight, reference.weight * reference.mask)
    assert torch.equal(model[0].mask, reference.mask)
    assert model[0].get_sparsity() == reference.get_sparsity()
    torch.testing.assert_close(model[0](features), reference(features))


def test_convert_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match="model"):
        mmattn.convert("not a model")


def test_report_names_layers_whose_inference_runs_pytorchs_kernel(monkeypatch) -> None:
    from mmattn import ops

    calls = []
    real = ops.attention
    monkeypatch.setattr(ops, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2,
                                 enable_nested_tensor=False).eval()
    report = mmattn.convert(fast)
    assert [path for path, _, _ in report.not_mmattn] == ["layers.0", "layers.1"]
    assert "not mmattn layers.0 in eval mode without autograd" in str(report)
    assert "set_fastpath_enabled(False)" in str(report)
    # B * H * L * L * head_dim = 2**18: above the small-call rule's limit
    # (dispatch.module_call_to_sdpa), within the native fast path's
    x = torch.randn(4, 64, 16)
    with torch.no_grad():
        fast(x)
    assert calls == []  # as reported: PyTorch's fused layer kernel ran
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            fast(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    assert len(calls) == 2
    # seq-first layers have no such fast path: nothing to report
    slow = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32), 2,
                                 enable_nested_tensor=False)
    assert mmattn.convert(slow).not_mmattn == []
