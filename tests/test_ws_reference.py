"""The reference ws_linear on a compressed layout against dense masked F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mmattn
from mmattn.layout import SparseLayout

F64 = torch.float64


@pytest.mark.parametrize("out_features,in_features", [(1, 1), (7, 13), (97, 64)])
@pytest.mark.parametrize("leading", [(5,), (2, 3), ()])
def test_forward_matches_dense_masked_linear(out_features, in_features, leading):
    mask = torch.rand(out_features, in_features) > 0.7
    mask[0] = False  # a row with no edges gives bias only
    layout = SparseLayout.from_mask(mask)
    dense = torch.randn(out_features, in_features, dtype=F64)
    values = dense[mask]  # row-major order == CSR order
    bias = torch.randn(out_features, dtype=F64)
    x = torch.randn(*leading, in_features, dtype=F64)
    y = mmattn.ws_linear(x, values, layout, bias, backend="reference")
    torch.testing.assert_close(y, F.linear(x, dense * mask, bias))


def test_gradients_only_on_kept_entries():
    mask = torch.rand(6, 9) > 0.6
    layout = SparseLayout.from_mask(mask)
    x = torch.randn(4, 9, dtype=F64, requires_grad=True)
    values = torch.randn(layout.nnz, dtype=F64, requires_grad=True)
    bias = torch.randn(6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: mmattn.ws_linear(x, w, layout, b, backend="reference"), (x, values, bias))
    dense = torch.zeros(6, 9, dtype=F64)
    dense[mask] = values.detach()
    dense.requires_grad_()
    F.linear(x, dense * mask, bias).sum().backward()
    values.grad = None
    mmattn.ws_linear(x, values, layout, bias, backend="reference").sum().backward()
    torch.testing.assert_close(values.grad, dense.grad[mask])


def test_block_layout_matches_dense():
    bs = 4
    mask = torch.rand(10, 14) > 0.8
    layout = SparseLayout.from_mask(mask, block_size=bs)
    block_mask = layout.to_dense()
    assert (block_mask | ~mask).all()  # every True element is inside a kept block
    values = torch.randn(layout.nnz, bs, bs, dtype=F64, requires_grad=True)
    x = torch.randn(3, 14, dtype=F64, requires_grad=True)
    y = mmattn.ws_linear(x, values, layout, backend="reference")
    rows, cols = layout.row_indices.long(), layout.col_indices.long()
    dense = torch.zeros(12, 16, dtype=F64)
    for n in range(layout.nnz):
        dense[rows[n] * bs:(rows[n] + 1) * bs, cols[n] * bs:(cols[n] + 1) * bs] = values[n]
    torch.testing.assert_close(y, x @ dense[:10, :14].T)
    assert torch.autograd.gradcheck(
        lambda x, w: mmattn.ws_linear(x, w, layout, backend="reference"), (x, values))


def test_bad_input():
    layout = SparseLayout.from_mask(torch.eye(4, dtype=torch.bool))
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="in_features"):
        mmattn.ws_linear(torch.randn(2, 5), torch.randn(4), layout)
    with pytest.raises(ValueError, match="weight must have shape"):
        mmattn.ws_linear(x, torch.randn(5), layout)
    with pytest.raises(TypeError, match="layout"):
        mmattn.ws_linear(x, torch.randn(4), torch.eye(4))
    with pytest.raises(TypeError, match="dtype"):
        mmattn.ws_linear(x, torch.randn(4, dtype=F64), layout)
    with pytest.raises(ValueError, match="bias"):
        mmattn.ws_linear(x, torch.randn(4), layout, torch.randn(3))
    with pytest.raises(ValueError, match="block_size"):
        SparseLayout.from_mask(torch.eye(4, dtype=torch.bool), block_size=0)
