"""The CUDA C++ backend: hand-written kernels in ``mmattn._C`` (``csrc/cuda``).

Kernels (FlashAttention-2 style on tensor cores, ``mma.m16n8k16``; see
``csrc/cuda/attention_cuda.h`` and ``csrc/cuda/ws_linear_cuda.cu``):

* attention forward / backward: float16 and bfloat16 in, float32 accumulation;
  head dims ``D``, ``Dv`` multiples of 8 up to 128 (specialised at 64 and 128, smaller
  ones zero-padded; ``Dv != D`` allowed); any ``Lq``, ``Lk`` (tails), GQA/MQA; q/k/v
  with unit stride on the head dimension read in place whatever their other strides
  (e.g. ``(B, L, H, D)`` views; strides not multiples of 8 are copied once); key
  padding, top-left causal with tile skipping, bool or float ``attn_mask`` read
  through its strides, ``BlockMask`` through its compressed indices (block sizes
  multiples of 64; empty blocks never touched, full blocks unmasked); Philox dropout
  (the reference's mask bit for bit); ``keep_fp32_out`` and ``grad_lse``. Backward:
  dK/dV per key block summing the GQA group's query heads, dQ per query block; no
  atomics, bitwise deterministic. ``return_weights`` is not supported (Triton runs it).
* ws_linear: CSR and block-CSR SpMM forward, dX as the transposed SpMM, dW as SDDMM
  over the kept entries, deterministic (see ``ws_linear_unsupported``).

State: :data:`VERIFIED_ON_HARDWARE` is False — the kernels compile for sm_80/sm_90
and pass the test suite under mmattn's SIMT emulator (``mmattn._C_emu``, CPU tensors),
but have not yet run on a GPU. Until they do, automatic backend choice on CUDA
tensors prefers Triton; ``backend="cuda"`` selects them explicitly.

:func:`emulated` returns the same backend bound to the emulated ops
(``mmattn_emu::``) on CPU tensors, for the tests.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from mmattn import _extension
from mmattn.backends import AttentionCall

NAME = "cuda"
BACKWARD_EXTRAS = frozenset({"grad_lse"})

#: Flip to True in the commit that records the GPU test pass (benchmarks/results/,
#: GPU named) where these kernels are faster; dispatch then prefers them over Triton.
VERIFIED_ON_HARDWARE = False

ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128
# A CTA's query rows / key tile must lie inside one block of a BlockMask.
BLOCK_MASK_MULTIPLE = 64
_NO_BLOCKS = (None, None, None, None, None, None, None, 0, 0)


def _seed_int(dropout_seed: int | None) -> int:
    """The Philox key as the int64 the op schemas carry (same 64 bits)."""
    if dropout_seed is None:
        return 0
    seed = int(dropout_seed) & (2**64 - 1)
    return seed - 2**64 if seed >= 2**63 else seed


def _block_args(block_mask: list[Tensor] | None, block_size: list[int] | None) -> tuple:
    if block_mask is None:
        return _NO_BLOCKS
    return (*block_mask, int(block_size[0]), int(block_size[1]))


class CudaBackend:
    """The CUDA backend's functions, bound to one op namespace and device type.

    ``namespace="mmattn", device_type="cuda"`` is the real backend (module-level
    functions below); ``"mmattn_emu", "cpu"`` the emulated twin (:func:`emulated`).
    """

    def __init__(self, namespace: str, device_type: str, dispatch_key: str) -> None:
        self.namespace = namespace
        self.device_type = device_type
        self.dispatch_key = dispatch_key
        self._ops: Any = None

    def _has(self, op_name: str) -> bool:
        qualified = f"{self.namespace}::{op_name}"
        if self.namespace == "mmattn" and not _extension.extension_loaded():
            return False
        try:
            return bool(torch._C._dispatch_has_kernel_for_dispatch_key(qualified,
                                                                       self.dispatch_key))
        except RuntimeError:  # no such operator: the build has no CUDA kernels
            return False

    @property
    def ops(self) -> Any:
        if self._ops is None:
            self._ops = getattr(torch.ops, self.namespace)
        return self._ops

    def _build_reason(self, op_name: str) -> str | None:
        if self._has(op_name):
            return None
        if self.namespace == "mmattn" and not _extension.extension_loaded():
            return f"mmattn._C is not loaded ({_extension.extension_error()})"
        return (f"this build of mmattn has no CUDA kernel {op_name} (compiled without nvcc, "
                "or MMATTN_CUDA=0)")

    # ---- attention -----------------------------------------------------------------------

    def attention_unsupported(self, call: AttentionCall) -> str | None:
        """Why these kernels cannot run this attention call, or None when they can."""
        q, v, attn_mask = call.q, call.v, call.attn_mask
        return_weights, block_size = call.return_weights, call.block_size
        if q.device.type != self.device_type:
            return f"the cuda backend needs {self.device_type} tensors, got {q.device.type}"
        reason = self._build_reason("cuda_attention_fwd")
        if reason is not None:
            return reason
        if q.dtype not in ATTENTION_DTYPES:
            return f"the CUDA attention kernels take float16/bfloat16, got {q.dtype}"
        d, dv = q.shape[-1], v.shape[-1]
        if d % 8 or dv % 8 or not 0 < d <= MAX_HEAD_DIM or not 0 < dv <= MAX_HEAD_DIM:
            return (f"the CUDA attention kernels take head dims that are multiples of 8 up to "
                    f"{MAX_HEAD_DIM}, got D={d}, Dv={dv}")
        if q.shape[0] > 65535 or q.shape[1] > 65535:
            return "the CUDA attention kernels take at most 65535 batches and heads"
        if return_weights:
            return "the CUDA attention kernels do not return the weights (Triton does)"
        if block_size is not None and any(int(s) % BLOCK_MASK_MULTIPLE for s in block_size):
            return (f"the CUDA attention kernels take BlockMask block sizes that are multiples "
                    f"of {BLOCK_MASK_MULTIPLE}, got {tuple(block_size)}")
        if attn_mask is not None and not (attn_mask.dtype == torch.bool or
                                          attn_mask.is_floating_point()):
            return f"attn_mask must be bool or floating point, got {attn_mask.dtype}"
        return None

    def attention_forward(
        self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
        key_padding_mask: Tensor | None, is_causal: bool, dropout_p: float, scale: float,
        dropout_seed: int | None, return_weights: bool, block_mask: list[Tensor] | None,
        block_size: list[int] | None, keep_fp32_out: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(out, lse, weights, out_fp32)`` per the backend contract.

        q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) float16/bfloat16;
        attn_mask expanded to (B, Hq, Lq, Lk) (bool True = may attend, or float added);
        key_padding_mask (B, Lk) bool True = padding; block_mask the 7 BlockMask tensors.
        ``weights`` is always empty (``return_weights`` is unsupported, see
        :meth:`attention_unsupported`); ``out_fp32`` is empty unless ``keep_fp32_out``.
        """
        if return_weights:
            raise ValueError("the CUDA attention kernels do not return the weights")
        out, lse, out_fp32 = self.ops.cuda_attention_fwd(
            q, k, v, attn_mask, key_padding_mask, bool(is_causal), float(dropout_p),
            float(scale), _seed_int(dropout_seed), bool(keep_fp32_out),
            *_block_args(block_mask, block_size))
        return out, lse, q.new_empty(0), out_fp32

    def attention_backward(
        self, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
        attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool,
        dropout_p: float, scale: float, dropout_seed: int | None,
        block_mask: list[Tensor] | None, block_size: list[int] | None,
        grad_lse: Tensor | None = None, grad_weights: Tensor | None = None,
        mask_needs_grad: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, None]:
        """``(dq, dk, dv, None)``, contiguous, in the input dtype; dk/dv summed over each
        GQA group. ``out`` may be the float32 output; ``grad_lse`` (B, Hq, Lq) enters as
        ``delta = rowsum(dO * O) - grad_lse``. Bitwise deterministic (no atomics).
        ``grad_weights`` / ``mask_needs_grad`` are never asked of this backend
        (:data:`BACKWARD_EXTRAS`)."""
        dq, dk, dv = self.ops.cuda_attention_bwd(
            grad_out, q, k, v, out, lse, grad_lse, attn_mask, key_padding_mask,
            bool(is_causal), float(dropout_p), float(scale), _seed_int(dropout_seed),
            *_block_args(block_mask, block_size))
        return dq, dk, dv, None

    # ---- ws_linear -------------------------------------------------------------------------

    def ws_linear_unsupported(self, x: Tensor) -> str | None:
        """Why the ws_linear kernels cannot take ``x``, or None."""
        if x.device.type != self.device_type:
            return f"the cuda backend needs {self.device_type} tensors, got {x.device.type}"
        reason = self._build_reason("cuda_ws_spmm")
        if reason is not None:
            return reason
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"the CUDA ws_linear kernels take float32/float16/bfloat16, got {x.dtype}"
        return None

    def ws_linear_forward(
        self, x: Tensor, values: Tensor, crow: Tensor, col: Tensor, row_indices: Tensor,
        ccol: Tensor, row_indices_t: Tensor, transpose_perm: Tensor, out_features: int,
        block_size: int, bias: Tensor | None,
    ) -> Tensor:
        """``y = x @ W^T + bias``: x (..., in_features), W in CSR / block-CSR."""
        y = self.ops.cuda_ws_spmm(x.reshape(-1, x.shape[-1]), values, crow, col,
                                  int(out_features), int(block_size), bias)
        return y.view(*x.shape[:-1], out_features)

    def ws_linear_backward(
        self, grad_y: Tensor, x: Tensor, values: Tensor, crow: Tensor, col: Tensor,
        row_indices: Tensor, ccol: Tensor, row_indices_t: Tensor, transpose_perm: Tensor,
        out_features: int, block_size: int, has_bias: bool, need_dx: bool = True,
        need_d_values: bool = True,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(dx, d_values, d_bias)``; a gradient not asked for is None."""
        dx, d_values, d_bias = self.ops.cuda_ws_spmm_backward(
            grad_y.reshape(-1, out_features), x.reshape(-1, x.shape[-1]), values, crow, col,
            ccol, row_indices_t, transpose_perm, int(block_size), bool(has_bias),
            bool(need_dx), bool(need_d_values))
        return (dx.view(x.shape) if need_dx else None, d_values if need_d_values else None,
                d_bias if has_bias else None)


def _register_fakes(namespace: str) -> None:
    """Shape-only kernels of the ops, so they trace under torch.compile and opcheck."""

    @torch.library.register_fake(f"{namespace}::cuda_attention_fwd")
    def _(q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale, dropout_seed,
          keep_fp32_out, kv_num_blocks, kv_indices, q_num_blocks, q_indices, full_blocks,
          partial_index, partial_masks, block_q, block_k):
        b, hq, lq, _ = q.shape
        out = q.new_empty(b, hq, lq, v.shape[-1])
        lse = q.new_empty(b, hq, lq, dtype=torch.float32)
        out_fp32 = (q.new_empty(b, hq, lq, v.shape[-1], dtype=torch.float32) if keep_fp32_out
                    else q.new_empty(0, dtype=torch.float32))
        return out, lse, out_fp32

    @torch.library.register_fake(f"{namespace}::cuda_attention_bwd")
    def _(grad_out, q, k, v, out, lse, grad_lse, attn_mask, key_padding_mask, is_causal,
          dropout_p, scale, dropout_seed, kv_num_blocks, kv_indices, q_num_blocks, q_indices,
          full_blocks, partial_index, partial_masks, block_q, block_k):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @torch.library.register_fake(f"{namespace}::cuda_ws_spmm")
    def _(x, values, crow, col, out_features, block_size, bias):
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake(f"{namespace}::cuda_ws_spmm_backward")
    def _(grad_y, x, values, crow, col, ccol, row_indices_t, transpose_perm, block_size,
          has_bias, need_dx, need_d_values):
        dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
        d_values = values.new_empty(values.shape) if need_d_values else values.new_empty(0)
        d_bias = x.new_empty(grad_y.shape[1]) if has_bias else x.new_empty(0)
        return dx, d_values, d_bias


_REAL = CudaBackend("mmattn", "cuda", "CUDA")
attention_unsupported = _REAL.attention_unsupported
attention_forward = _REAL.attention_forward
attention_backward = _REAL.attention_backward
ws_linear_unsupported = _REAL.ws_linear_unsupported
ws_linear_forward = _REAL.ws_linear_forward
ws_linear_backward = _REAL.ws_linear_backward

_EMULATED: CudaBackend | None = None


def emulated() -> CudaBackend:
    """The same backend on the SIMT emulator: ``mmattn_emu::`` ops on CPU tensors.

    Loads ``mmattn._C_emu`` (built by ``scripts/build_cuda_emu.py``; ImportError when
    it is absent). Its kernels are the ones of the real build, compiled for the host.
    """
    global _EMULATED
    if _EMULATED is None:
        importlib.import_module("mmattn._C_emu")
        _register_fakes("mmattn_emu")
        _EMULATED = CudaBackend("mmattn_emu", "cpu", "CPU")
    return _EMULATED


_FUNCTIONS = ("attention_unsupported", "attention_forward", "attention_backward",
              "ws_linear_unsupported", "ws_linear_forward", "ws_linear_backward")


@contextlib.contextmanager
def emulation() -> Iterator[CudaBackend]:
    """Test hook: inside the block, this backend's functions are those of
    :func:`emulated`, so ``backend="cuda"`` runs the public API (``cross_attention``,
    ``ws_linear``, the modules) on CPU tensors through the SIMT emulator. Process-wide;
    for tests only."""
    emu = emulated()
    module = globals()
    saved = {name: module[name] for name in _FUNCTIONS}
    module.update({name: getattr(emu, name) for name in _FUNCTIONS})
    try:
        yield emu
    finally:
        module.update(saved)


if _REAL._has("cuda_attention_fwd"):
    _register_fakes("mmattn")
