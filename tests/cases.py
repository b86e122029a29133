"""Test inputs shared by the per-backend test files (attention masks, ws_linear layouts)
and the autograd runs they compare."""

from __future__ import annotations

import math

import torch

import mmattn
from mmattn.attention import cross_attention
from mmattn.layout import SparseLayout

F64 = torch.float64


def run_attention(q, k, v, backend, dtype, grad_out=None, **kwargs):
    """Output, weights (or None) and input grads of cross_attention at ``dtype``; for
    the float64 oracle the inputs move to the CPU."""
    device = "cpu" if dtype == torch.float64 else q.device

    def cast(t):
        return t.detach().to(device=device, dtype=dtype).requires_grad_(grad_out is not None)

    qc, kc, vc = cast(q), cast(k), cast(v)
    for name in ("attn_mask", "key_padding_mask"):
        mask = kwargs.get(name)
        if mask is not None:
            if mask.is_floating_point() and dtype == torch.float64:
                mask = mask.double()
            kwargs[name] = mask.to(device)
    if kwargs.get("block_mask") is not None:
        kwargs["block_mask"] = kwargs["block_mask"].to(device)
    res = cross_attention(qc, kc, vc, backend=backend, **kwargs)
    out, weights = res if kwargs.get("return_weights") else (res, None)
    grads = None
    if grad_out is not None:
        out.backward(grad_out.to(device=device, dtype=dtype))
        grads = (qc.grad, kc.grad, vc.grad)
    return out.detach(), None if weights is None else weights.detach(), grads


def bool_mask(*shape, keep=0.7):
    return torch.rand(*shape) < keep


# attn_mask shapes, dtypes and strides: (b, h, lq, lk) -> mask
MASK_CASES = {
    "bool-full": lambda b, h, lq, lk: bool_mask(b, h, lq, lk),
    "bool-broadcast-2d": lambda b, h, lq, lk: bool_mask(lq, lk),
    "bool-per-key": lambda b, h, lq, lk: bool_mask(b, 1, 1, lk),
    "bool-per-query": lambda b, h, lq, lk: bool_mask(1, h, lq, 1, keep=0.8),
    "bool-expanded-view": lambda b, h, lq, lk: bool_mask(1, 1, lq, lk).expand(b, h, lq, lk),
    "bool-transposed": lambda b, h, lq, lk: bool_mask(b, h, lk, lq).transpose(-1, -2),
    "float-2d": lambda b, h, lq, lk: torch.randn(lq, lk),
    "float-with-inf": lambda b, h, lq, lk: torch.randn(b, 1, lq, lk).masked_fill(
        bool_mask(b, 1, lq, lk, keep=0.4), -math.inf),
    "float-bf16": lambda b, h, lq, lk: torch.randn(h, lq, lk).bfloat16(),
    "float16-per-key": lambda b, h, lq, lk: torch.randn(b, 1, 1, lk).half(),
}


def ws_layout(out_features: int, in_features: int, density: float, block_size: int = 1,
              empty_rows: bool = True) -> SparseLayout:
    """A random layout; with ``empty_rows``, one output row with no edges (its output is
    the bias only) and one input feature no output reads (its dx is 0)."""
    mask = torch.rand(out_features, in_features) < density
    if empty_rows and out_features > 2:
        mask[out_features // 2] = False
        mask[:, 0] = False
    return SparseLayout.from_mask(mask, block_size=block_size)


def ws_values(layout: SparseLayout) -> torch.Tensor:
    bs = layout.block_size
    shape = (layout.nnz,) if bs == 1 else (layout.nnz, bs, bs)
    return torch.randn(shape, dtype=F64)


def run_ws_linear(x, values, layout, bias, grad_y, backend):
    """Output and gradients (dx, d_values, d_bias) of ws_linear through autograd."""
    x = x.detach().requires_grad_()
    values = values.detach().requires_grad_()
    bias = None if bias is None else bias.detach().requires_grad_()
    y = mmattn.ws_linear(x, values, layout, bias, backend=backend)
    y.backward(grad_y)
    return y, x.grad, values.grad, None if bias is None else bias.grad
