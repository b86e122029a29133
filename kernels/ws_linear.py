"""Watts-Strogatz sparse linear in Triton: ``y = x @ W^T + b`` over a compressed layout.

Kernels and launchers only (validation and dispatch: :mod:`mmattn.ws`,
:mod:`mmattn.backends.triton`). ``W`` is given by a :class:`mmattn.SparseLayout`: CSR
``crow / col`` (and COO ``row``) of the kept entries, and the CSR of the transpose
``ccol / row_t / perm`` (``perm`` maps transposed order to CSR order). ``values`` is
``(nnz,)`` for an element layout or ``(nnz, bs, bs)`` for a block layout, whose kept
``bs x bs`` blocks are dense (edge blocks cropped to the shape).

* forward: SpMM over the CSR rows. Element layouts: a program owns ``BLOCK_R`` output
  features x ``BLOCK_B`` batch rows and walks the rows' entries in lockstep (ELL-style:
  Watts-Strogatz rows have nearly equal degrees), gathering input columns. Block
  layouts: block-CSR, one ``tl.dot`` per (kept block, ``T x T`` sub-tile).
* dX: the same SpMM over the transposed layout (a gather, no scatter).
* dW: SDDMM ``dW_e = sum_n dy[n, row(e)] x[n, col(e)]`` over the kept entries only.

Every output element is summed by one program in a fixed order: no atomics, results are
bitwise reproducible. All accumulation is float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import dot_precision

# Fixed configs (no autotuning), checked ahead of time for sm_80 / sm_90 by
# scripts/triton_aot_check.py. Element kernels: BLOCK_B batch rows x BLOCK_R features
# (BLOCK_E entries for the SDDMM). Block kernels: BLOCK_B batch rows x T features, T the
# block padded to a power of two >= 16, at most MAX_TILE (float32 runs FMA dots, whose
# operands need more registers: 16; 32 spilled with triton 3.6 on sm_90).
ELEMENT_CONFIG = {"BLOCK_B": 64, "BLOCK_R": 32, "num_warps": 4}
ELEMENT_SDDMM_CONFIG = {"BLOCK_B": 32, "BLOCK_E": 64, "num_warps": 4}
MAX_TILE = {torch.float32: 16, torch.float16: 64, torch.bfloat16: 64}


def block_config(t: int, dtype: torch.dtype) -> dict[str, int]:
    """``BLOCK_B``, ``num_warps``, ``num_stages`` of the block kernels for tile ``t``."""
    if dtype == torch.float32:
        return {"BLOCK_B": 32, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_B": 64, "num_warps": 8 if t >= 64 else 4, "num_stages": 2}
KERNEL_NAMES = ("spmm", "spmm_block", "sddmm", "sddmm_block")


@triton.jit
def _ws_spmm_kernel(X, Vals, Ptr, Idx, Perm, Bias, Y, N, ROWS, stride_xn, stride_xk,
                    HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    """``Y[n, r] = bias[r] + sum_{e in Ptr[r]..Ptr[r+1]} Vals[Perm[e]] * X[n, Idx[e]]``
    (``Perm`` the identity unless HAS_PERM): the forward over the CSR, dX over the
    transposed layout. ``Y`` is (N, ROWS) contiguous."""
    # one grid axis (batch tiles fastest): y and z are limited to 65535 programs
    pid = tl.program_id(0)
    batch_tiles = tl.cdiv(N, BLOCK_B)
    nb = pid % batch_tiles
    rb = pid // batch_tiles
    n = nb * BLOCK_B + tl.arange(0, BLOCK_B)
    n_ok = n < N
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < ROWS
    start = tl.load(Ptr + r, mask=r_ok, other=0)
    count = tl.load(Ptr + r + 1, mask=r_ok, other=0) - start
    x_rows = X + n.to(tl.int64)[:, None] * stride_xn
    acc = tl.zeros([BLOCK_B, BLOCK_R], tl.float32)
    for kk in range(0, tl.max(count, 0)):
        e_ok = kk < count
        e = start + kk
        c = tl.load(Idx + e, mask=e_ok, other=0)
        if HAS_PERM:
            e = tl.load(Perm + e, mask=e_ok, other=0)
        w = tl.load(Vals + e, mask=e_ok, other=0.0).to(tl.float32)
        xv = tl.load(x_rows + c.to(tl.int64)[None, :] * stride_xk,
                     mask=n_ok[:, None] & e_ok[None, :], other=0.0)
        acc += xv.to(tl.float32) * w[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + n.to(tl.int64)[:, None] * ROWS + r[None, :], acc.to(Y.dtype.element_ty),
             mask=n_ok[:, None] & r_ok[None, :])


@triton.jit
def _ws_spmm_block_kernel(X, Vals, Ptr, Idx, Perm, Bias, Y, N, IN_DIM, OUT_DIM, BS,
                          stride_xn, stride_xk,
                          TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr,
                          PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, T: tl.constexpr):
    """Block-CSR SpMM. Forward (TRANSPOSED False): ``Y[:, R*bs + i] = sum_e X[:, C*bs + j]
    W_e[i, j]`` over the blocks ``e`` of block row R. dX (TRANSPOSED True, Ptr/Idx/Perm the
    transposed layout, X = dY): ``Y[:, C*bs + j] = sum_e dY[:, R*bs + i] W_e[i, j]``. One
    program: ``BLOCK_B`` batch rows x ``T`` output features of one block row (column)."""
    batch_tiles = tl.cdiv(N, BLOCK_B)
    nb = tl.program_id(0) % batch_tiles
    pid = tl.program_id(0) // batch_tiles
    subs = tl.cdiv(BS, T)
    blk = pid // subs
    o0 = (pid % subs) * T
    n = nb * BLOCK_B + tl.arange(0, BLOCK_B)
    n_ok = n < N
    offs = tl.arange(0, T)
    o_local = o0 + offs  # output positions inside the block
    o_ok = o_local < BS
    x_rows = X + n.to(tl.int64)[:, None] * stride_xn
    acc = tl.zeros([BLOCK_B, T], tl.float32)
    for t in range(tl.load(Ptr + blk), tl.load(Ptr + blk + 1)):
        other_blk = tl.load(Idx + t)
        if TRANSPOSED:
            e = tl.load(Perm + t)
        else:
            e = t
        w_base = Vals + tl.cast(e, tl.int64) * BS * BS
        for k0 in range(0, BS, T):
            k_local = k0 + offs
            k_pos = other_blk * BS + k_local  # input feature read by this sub-tile
            k_ok = k_local < BS
            xv = tl.load(x_rows + k_pos.to(tl.int64)[None, :] * stride_xk,
                         mask=n_ok[:, None] & (k_ok & (k_pos < IN_DIM))[None, :], other=0.0)
            if TRANSPOSED:  # W_e[k, o]: rows k (dY features), columns o (dX features)
                w = tl.load(w_base + k_local[:, None] * BS + o_local[None, :],
                            mask=k_ok[:, None] & o_ok[None, :], other=0.0)
                acc += tl.dot(xv, w, input_precision=PRECISION)
            else:  # W_e[o, k]: y = x @ W_e^T
                w = tl.load(w_base + o_local[:, None] * BS + k_local[None, :],
                            mask=o_ok[:, None] & k_ok[None, :], other=0.0)
                acc += tl.dot(xv, tl.trans(w), input_precision=PRECISION)
    o_pos = blk * BS + o_local
    o_mask = o_ok & (o_pos < OUT_DIM)
    if HAS_BIAS:
        acc += tl.load(Bias + o_pos, mask=o_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + n.to(tl.int64)[:, None] * OUT_DIM + o_pos[None, :], acc.to(Y.dtype.element_ty),
             mask=n_ok[:, None] & o_mask[None, :])


@triton.jit
def _ws_sddmm_kernel(GY, X, Row, Col, DVals, N, NNZ, stride_gn, stride_gk, stride_xn, stride_xk,
                     BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr):
    """``dW[e] = sum_n dY[n, Row[e]] * X[n, Col[e]]`` for ``BLOCK_E`` kept entries."""
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < NNZ
    r = tl.load(Row + e, mask=e_ok, other=0).to(tl.int64)
    c = tl.load(Col + e, mask=e_ok, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_B, BLOCK_E], tl.float32)
    for n0 in range(0, N, BLOCK_B):
        n = n0 + tl.arange(0, BLOCK_B)
        m = (n < N)[:, None] & e_ok[None, :]
        n64 = n.to(tl.int64)[:, None]
        gy = tl.load(GY + n64 * stride_gn + r[None, :] * stride_gk, mask=m, other=0.0)
        xv = tl.load(X + n64 * stride_xn + c[None, :] * stride_xk, mask=m, other=0.0)
        acc += gy.to(tl.float32) * xv.to(tl.float32)
    tl.store(DVals + e, tl.sum(acc, 0).to(DVals.dtype.element_ty), mask=e_ok)


@triton.jit
def _ws_sddmm_block_kernel(GY, X, Row, Col, DVals, N, IN_DIM, OUT_DIM, BS,
                           stride_gn, stride_gk, stride_xn, stride_xk,
                           PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, T: tl.constexpr):
    """``dW_e[i, j] = sum_n dY[n, R*bs + i] X[n, C*bs + j]`` for one ``T x T`` sub-tile of
    one kept block (R, C)."""
    pid = tl.program_id(0)
    subs = tl.cdiv(BS, T)
    e = pid // (subs * subs)
    i0 = (pid // subs) % subs * T
    j0 = pid % subs * T
    r_blk = tl.load(Row + e)
    c_blk = tl.load(Col + e)
    offs = tl.arange(0, T)
    i_pos = r_blk * BS + i0 + offs
    j_pos = c_blk * BS + j0 + offs
    i_ok = (i0 + offs < BS) & (i_pos < OUT_DIM)
    j_ok = (j0 + offs < BS) & (j_pos < IN_DIM)
    acc = tl.zeros([T, T], tl.float32)
    for n0 in range(0, N, BLOCK_B):
        n = n0 + tl.arange(0, BLOCK_B)
        n64 = n.to(tl.int64)[:, None]
        n_ok = (n < N)[:, None]
        gy = tl.load(GY + n64 * stride_gn + i_pos.to(tl.int64)[None, :] * stride_gk,
                     mask=n_ok & i_ok[None, :], other=0.0)
        xv = tl.load(X + n64 * stride_xn + j_pos.to(tl.int64)[None, :] * stride_xk,
                     mask=n_ok & j_ok[None, :], other=0.0)
        acc += tl.dot(tl.trans(gy), xv, input_precision=PRECISION)
    in_blk = (i0 + offs < BS)[:, None] & (j0 + offs < BS)[None, :]
    out = DVals + tl.cast(e, tl.int64) * BS * BS
    tl.store(out + (i0 + offs)[:, None] * BS + (j0 + offs)[None, :],
             acc.to(DVals.dtype.element_ty), mask=in_blk)


# ---------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------


def block_tile(block_size: int, dtype: torch.dtype) -> int:
    """The ``T`` of the block kernels: the block padded to a power of two >= 16, at most
    :data:`MAX_TILE` (larger blocks are walked in ``T x T`` sub-tiles)."""
    return min(MAX_TILE[dtype], max(16, triton.next_power_of_2(block_size)))


def _spmm(x: torch.Tensor, values: torch.Tensor, ptr: torch.Tensor, idx: torch.Tensor,
          perm: torch.Tensor | None, bias: torch.Tensor | None, rows: int, in_dim: int,
          block_size: int, transposed: bool) -> torch.Tensor:
    """``(N, rows)`` output of one SpMM (forward, or dX when ``transposed``)."""
    n = x.shape[0]
    y = torch.empty(n, rows, dtype=x.dtype, device=x.device)
    if n == 0 or rows == 0:
        return y
    values = values.contiguous()
    perm_arg = perm if perm is not None else idx
    bias_arg = bias if bias is not None else y
    if block_size == 1:
        cfg = ELEMENT_CONFIG
        grid = (triton.cdiv(n, cfg["BLOCK_B"]) * triton.cdiv(rows, cfg["BLOCK_R"]),)
        _ws_spmm_kernel[grid](x, values, ptr, idx, perm_arg, bias_arg, y, n, rows,
                              x.stride(0), x.stride(1), HAS_PERM=perm is not None,
                              HAS_BIAS=bias is not None, **cfg)
        return y
    t = block_tile(block_size, x.dtype)
    cfg = block_config(t, x.dtype)
    num_blocks = ptr.numel() - 1
    grid = (triton.cdiv(n, cfg["BLOCK_B"]) * num_blocks * triton.cdiv(block_size, t),)
    _ws_spmm_block_kernel[grid](x, values, ptr, idx, perm_arg, bias_arg, y, n, in_dim, rows,
                                block_size, x.stride(0), x.stride(1), TRANSPOSED=transposed,
                                HAS_BIAS=bias is not None, PRECISION=dot_precision(x.dtype), T=t,
                                **cfg)
    return y


def ws_linear_forward(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor,
                      col: torch.Tensor, out_features: int, block_size: int,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """``y = x @ W^T + bias`` for 2-D ``x (N, in_features)`` (any strides); returns
    ``(N, out_features)`` in x's dtype."""
    return _spmm(x, values, crow, col, None, bias, out_features, x.shape[1], block_size,
                 transposed=False)


def ws_linear_backward(grad_y: torch.Tensor, x: torch.Tensor, values: torch.Tensor,
                       crow: torch.Tensor, col: torch.Tensor, row: torch.Tensor,
                       ccol: torch.Tensor, row_t: torch.Tensor, perm: torch.Tensor,
                       block_size: int, has_bias: bool, need_dx: bool, need_d_values: bool,
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                  torch.Tensor | None]:
    """``(dx, d_values, d_bias)`` for 2-D ``grad_y (N, out)`` and ``x (N, in)``; a gradient
    not needed is None and not computed."""
    n, in_features = x.shape
    out_features = grad_y.shape[1]
    dx = d_values = d_bias = None
    if has_bias:
        d_bias = grad_y.sum(0, dtype=torch.float32).to(x.dtype)
    if need_dx:
        dx = _spmm(grad_y, values, ccol, row_t, perm, None, in_features, out_features,
                   block_size, transposed=True)
    if need_d_values:
        d_values = torch.empty_like(values, memory_format=torch.contiguous_format)
        nnz = col.numel()
        if n == 0 or nnz == 0:
            d_values.zero_()
        elif block_size == 1:
            cfg = ELEMENT_SDDMM_CONFIG
            _ws_sddmm_kernel[(triton.cdiv(nnz, cfg["BLOCK_E"]),)](
                grad_y, x, row, col, d_values, n, nnz, grad_y.stride(0), grad_y.stride(1),
                x.stride(0), x.stride(1), **cfg)
        else:
            t = block_tile(block_size, x.dtype)
            subs = triton.cdiv(block_size, t)
            _ws_sddmm_block_kernel[(nnz * subs * subs,)](
                grad_y, x, row, col, d_values, n, in_features, out_features, block_size,
                grad_y.stride(0), grad_y.stride(1), x.stride(0), x.stride(1),
                PRECISION=dot_precision(x.dtype), T=t, **block_config(t, x.dtype))
    return dx, d_values, d_bias
