"""mmattn.nn.WSLinear and the seed-002 drop-in mmattn.nn.WSMultiModalFusion."""

from __future__ import annotations

import pytest
import seed_models
import torch
import torch.nn as nn
import torch.nn.functional as F
from tolerance import assert_within_rule

import mmattn
from mmattn.layout import SparseLayout
from mmattn.nn import WSLinear, WSMultiModalFusion

F64 = torch.float64


def _pair(k=6, beta=0.3, n_modalities=3, features=64):
    torch.manual_seed(123)
    seed = seed_models.WSMultiModalFusion(n_modalities, features, k, beta)
    torch.manual_seed(123)
    ours = WSMultiModalFusion(n_modalities, features, k, beta)
    return seed, ours


@pytest.mark.parametrize("k,beta,features", [(6, 0.3, 64), (4, 0.3, 64), (4, 0.5, 7)])
def test_mask_sparsity_and_initial_weights_match_the_seed(k, beta, features):
    seed, ours = _pair(k, beta, features=features)
    assert ours.mask.dtype == torch.float32
    assert torch.equal(ours.mask, seed.mask)
    assert ours.get_sparsity() == seed.get_sparsity()
    assert torch.equal(ours.weight.detach(), seed.weight.detach()[seed.mask.bool()])
    assert sum(p.numel() for p in ours.parameters()) == int(seed.mask.sum())


def test_forward_and_gradients_match_the_seed():
    seed, ours = _pair()
    torch.manual_seed(1)
    feats = [torch.randn(8, 64, dtype=F64) for _ in range(3)]
    grad = torch.randn(8, 192, dtype=F64)

    def run(module, dtype):
        xs = [f.detach().to(dtype).requires_grad_() for f in feats]
        y = module(xs)
        y.backward(grad.to(dtype))
        dense_grad = module.weight.grad
        if dense_grad.dim() == 1:  # ours: scatter the kept-entry gradient to dense
            dense_grad = torch.zeros(192, 192, dtype=dtype).masked_scatter(
                module.mask.bool(), dense_grad)
        module.zero_grad()
        return y, torch.cat([x.grad for x in xs], -1), dense_grad * seed.mask.to(dtype)

    oracle = run(seed.double(), F64)
    expected = run(seed.float(), torch.float32)
    actual = run(ours, torch.float32)
    for name, a, e, o in zip(("y", "dx", "dweight"), actual, expected, oracle, strict=True):
        assert_within_rule(a, e, o, name=name)


def test_loads_the_seed_state_dict_and_exports_one_it_loads():
    torch.manual_seed(5)
    seed = seed_models.WSMultiModalFusion(3, 64, 6, 0.3)
    ours = WSMultiModalFusion(3, 64, 6, 0.3)
    result = ours.load_state_dict(seed.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(ours.weight.detach(), seed.weight.detach()[seed.mask.bool()])
    feats = [torch.randn(5, 64) for _ in range(3)]
    torch.testing.assert_close(ours(feats), seed(feats))
    back = seed_models.WSMultiModalFusion(3, 64, 6, 0.3)
    back.load_state_dict(ours.dense_state_dict())
    torch.testing.assert_close(back(feats), seed(feats))
    assert set(ours.state_dict()) == {"weight", "crow_indices", "col_indices"}


def test_from_seed_converts_an_instance_and_mmattn_convert_round_trips():
    torch.manual_seed(2)
    seed = seed_models.WSMultiModalFusion(3, 16, 4, 0.3)
    ours = WSMultiModalFusion.from_seed(seed)
    feats = [torch.randn(4, 16) for _ in range(3)]
    torch.testing.assert_close(ours(feats), seed(feats))
    assert torch.equal(ours.mask, seed.mask) and ours.k is None
    model = nn.Sequential(seed_models.WSMultiModalFusion(3, 16, 4, 0.3))
    model[0].load_state_dict(seed.state_dict())
    assert [s.to_type for s in mmattn.convert(model)] == ["mmattn.nn.WSMultiModalFusion"]
    torch.testing.assert_close(model[0](feats), seed(feats))
    assert len(mmattn.revert(model)) == 1 and type(model[0]) is seed_models.WSMultiModalFusion
    torch.testing.assert_close(model[0](feats), seed(feats))
    with pytest.raises(ValueError, match="square dense"):
        WSMultiModalFusion.from_seed(nn.Linear(4, 4))


def test_loading_a_seed_state_dict_with_another_mask_fails_clearly():
    seed = seed_models.WSMultiModalFusion(3, 64, 4, 0.3)
    ours = WSMultiModalFusion(3, 64, 6, 0.3)
    with pytest.raises(RuntimeError, match="mask differs from this module's layout"):
        ours.load_state_dict(seed.state_dict())
    with pytest.raises(RuntimeError, match="dense weight in the state_dict has shape"):
        ours.load_state_dict({"weight": torch.zeros(10, 10)})


def test_fusion_input_checks():
    ours = WSMultiModalFusion(3, 8, 4, 0.3)
    with pytest.raises(ValueError, match="list of 3 tensors"):
        ours([torch.randn(2, 8)] * 2)
    with pytest.raises(ValueError, match=r"features\[2\].*features_per_modality=8"):
        ours([torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 9)])
    # issue 11: widths that only sum to the total would mix modalities after the concat
    with pytest.raises(ValueError, match=r"features\[0\].*features_per_modality=8"):
        ours([torch.randn(2, 10), torch.randn(2, 6), torch.randn(2, 8)])
    with pytest.raises(ValueError, match=r"features\[1\]"):
        ours([torch.randn(2, 8), torch.tensor(1.0), torch.randn(2, 8)])
    with pytest.raises(ValueError, match="positive int"):
        WSMultiModalFusion(0, 8)


def test_fusion_is_reachable_from_import_mmattn():
    assert mmattn.nn.WSMultiModalFusion is WSMultiModalFusion
    assert mmattn.nn.WSLinear is WSLinear


# ---- WSLinear ---------------------------------------------------------------------------

def _dense_oracle(module: WSLinear, x: torch.Tensor) -> torch.Tensor:
    dense = module.to_dense_weight().detach().double()
    bias = None if module.bias is None else module.bias.detach().double()
    return F.linear(x.double(), dense, bias)


@pytest.mark.parametrize("in_features,out_features,k,block_size", [
    (97, 97, 6, 1), (64, 30, 4, 1), (30, 64, 3, 1), (96, 96, 2, 16), (70, 50, 2, 8)])
def test_wslinear_matches_the_dense_masked_layer(in_features, out_features, k, block_size):
    layer = WSLinear(in_features, out_features, k, 0.3, seed=3, block_size=block_size)
    layout = SparseLayout.from_watts_strogatz(out_features, in_features, k, 0.3, seed=3,
                                              block_size=block_size)
    assert torch.equal(layer.layout.to_dense(), layout.to_dense())
    assert sum(p.numel() for p in layer.parameters()) == layout.num_parameters + out_features
    for leading in ((1,), (2, 3)):
        x = torch.randn(*leading, in_features)
        y = layer(x)
        reference = mmattn.ws_linear(x, layer.weight, layout, layer.bias, backend="reference")
        assert_within_rule(y, reference, _dense_oracle(layer, x), name="y")
        assert y.shape == (*leading, out_features)


def test_wslinear_gradients_reach_kept_weights_only():
    layer = WSLinear(40, 30, 4, 0.3, seed=0)
    x = torch.randn(7, 40, requires_grad=True)
    layer(x).square().sum().backward()
    dense = layer.to_dense_weight().detach().requires_grad_()
    x2 = x.detach().requires_grad_()
    F.linear(x2, dense, layer.bias.detach()).square().sum().backward()
    kept = layer.layout.to_dense()
    torch.testing.assert_close(layer.weight.grad, dense.grad[kept])
    torch.testing.assert_close(x.grad, x2.grad)


def test_initialisation_bounds_follow_the_kept_fan_in():
    torch.manual_seed(0)
    layer = WSLinear(200, 100, 8, 0.5, seed=1)
    rows = layer.row_indices.long()
    fan_in = torch.bincount(rows, minlength=100).double()
    bound = fan_in.rsqrt()
    assert (layer.weight.detach().abs().double() <= bound[rows] + 1e-7).all()
    assert (layer.bias.detach().abs().double() <= bound + 1e-7).all()
    # uniform in +-bound: the spread is that of U(-1, 1) scaled per row
    spread = (layer.weight.detach().double() / bound[rows]).std()
    assert 0.5 < spread < 0.65  # 1/sqrt(3) = 0.577


def test_from_dense_keeps_only_masked_entries():
    linear = nn.Linear(20, 12)
    mask = torch.rand(12, 20) < 0.3
    layer = WSLinear.from_dense(linear, mask)
    assert layer.weight.numel() == int(mask.sum())
    x = torch.randn(4, 20)
    torch.testing.assert_close(layer(x), F.linear(x, linear.weight * mask, linear.bias))
    blocked = WSLinear.from_dense(linear, mask, block_size=8)
    torch.testing.assert_close(blocked(x), F.linear(x, linear.weight * mask, linear.bias))
    with pytest.raises(ValueError, match="mask must be a tensor"):
        WSLinear.from_dense(linear, mask.T)


def test_state_dict_round_trip_carries_the_topology():
    source = WSLinear(50, 40, 4, 0.3, seed=None)
    target = WSLinear(50, 40, 4, 0.3, seed=None)  # another random graph, same nnz
    assert not torch.equal(source.layout.to_dense(), target.layout.to_dense())
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.layout.to_dense(), source.layout.to_dense())
    for name in ("row_indices", "ccol_indices", "row_indices_t", "transpose_perm"):
        assert torch.equal(getattr(target, name), getattr(source, name)), name
    x = torch.randn(3, 50, requires_grad=True)
    torch.testing.assert_close(target(x), source(x))
    torch.autograd.grad(target(x).sum(), x)  # the derived (transposed) index is live


def test_loads_a_dense_linear_state_dict():
    layer = WSLinear(20, 10, 4, 0.3, seed=2)
    linear = nn.Linear(20, 10)
    layer.load_state_dict(linear.state_dict())
    kept = layer.layout.to_dense()
    x = torch.randn(3, 20)
    torch.testing.assert_close(layer(x), F.linear(x, linear.weight * kept, linear.bias))


def test_module_dtype_and_device_moves():
    layer = WSLinear(33, 21, 4, 0.3, seed=0)
    x = torch.randn(5, 33)
    expected = _dense_oracle(layer, x)
    as_double = layer.to(F64)  # float64 runs the reference backend
    torch.testing.assert_close(as_double(x.double()), expected)
    as_bf16 = WSLinear(33, 21, 4, 0.3, seed=0, dtype=torch.bfloat16)
    as_bf16.load_state_dict(layer.state_dict())
    assert as_bf16(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="dtype"):
        as_bf16(x)


def test_repr_names_the_graph():
    text = repr(WSLinear(16, 8, 4, 0.25, seed=7))
    assert "k=4" in text and "beta=0.25" in text and "seed=7" in text and "nnz=" in text


def test_torch_compile_fullgraph_matches_eager():
    layer = WSLinear(48, 32, 4, 0.3, seed=1)
    x = torch.randn(2, 5, 48)

    def step(inp):
        return layer(inp).relu().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), step(x))
    compiled(x).backward()
    grad_compiled = layer.weight.grad.clone()
    layer.zero_grad()
    step(x).backward()
    torch.testing.assert_close(grad_compiled, layer.weight.grad)
