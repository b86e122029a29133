"""``cross_attention``: the public functional op; validates once, then dispatches."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmattn import backends, dispatch, ops
from mmattn.backends import AttentionCall
from mmattn.backends import cpu as _cpu_backend
from mmattn.block_mask import BlockMask

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_MAX_SEED = 2**63 - 1
_STRIDED = torch.strided


def _layout_error(name: str, t: Tensor) -> TypeError:
    """The error for a tensor that is not a plain dense (strided) tensor: sparse, mkldnn or
    nested tensors reach no kernel."""
    kind = "nested" if t.is_nested else str(t.layout).replace("torch.", "")
    return TypeError(f"{name} must be a dense (strided) tensor, got a {kind} tensor; convert it "
                     f"with .to_dense() (or torch.nested.to_padded_tensor)")


def _check_flag(name: str, value: Any) -> bool:
    """A bool argument: Python or NumPy bool (truthy strings or ints are mistakes)."""
    if value is True or value is False:
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def _check_real(name: str, value: Any) -> float:
    """A real scalar argument as a float: Python or NumPy ints and floats, not bools."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(getattr(t, "shape", ()))


def _validate_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout is not _STRIDED:  # sparse, mkldnn, jagged nested
            raise _layout_error(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, length, head_dim), got shape "
                             f"{_shape(t)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}")
    try:
        (b, hq, _, d), (bk, hkv, lk, dk), (bv, hv, lv, _) = q.shape, k.shape, v.shape
    except RuntimeError:  # a strided nested tensor has no sizes
        name, t = next((n, t) for n, t in (("q", q), ("k", k), ("v", v)) if t.is_nested)
        raise _layout_error(name, t) from None
    if not (b == bk == bv):
        raise ValueError(f"batch sizes differ: q {b}, k {bk}, v {bv}")
    if hkv != hv:
        raise ValueError(f"k and v must have the same number of heads, got {hkv} and {hv}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if lk != lv:
        raise ValueError(f"k and v must have the same length, got {lk} and {lv}")
    if d != dk:
        raise ValueError(f"q and k must have the same head_dim, got {d} and {dk}")
    if d == 0:
        raise ValueError("head_dim of q and k must be at least 1")


def broadcasts_to(shape: list[int], target: list[int]) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` (no more dimensions, each 1
    or equal). Plain Python: ``torch.broadcast_shapes`` costs ~20 us a call, more than a
    seed-sized attention; TorchScript-compatible, for :mod:`mmattn.nn`."""
    offset = len(target) - len(shape)
    if offset < 0:
        return False
    for i in range(len(shape)):
        if shape[i] != 1 and shape[i] != target[offset + i]:
            return False
    return True


def _normalise_attn_mask(attn_mask: Any, target: tuple[int, ...], q: Tensor) -> Tensor | None:
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.layout is not _STRIDED or attn_mask.is_nested:
        raise _layout_error("attn_mask", attn_mask)
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True = may attend) or floating point (added "
                        f"to the scores), got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask is on {attn_mask.device}, q on {q.device}")
    if not broadcasts_to(attn_mask.shape, target):
        raise ValueError(f"attn_mask of shape {_shape(attn_mask)} does not broadcast to "
                         f"(B, Hq, Lq, Lk) = {target}")
    if (attn_mask.requires_grad and attn_mask.dtype in _HALF_DTYPES
            and torch.is_grad_enabled()):
        attn_mask = _float32_broadcast_base(attn_mask, target)
    return attn_mask.expand(target)


def _float32_broadcast_base(mask: Tensor, target: tuple[int, ...]) -> Tensor:
    """A half-precision mask that requires grad, as a float32 tensor to expand.

    The mask's gradient is (B, Hq, Lq, Lk), summed over its broadcast dimensions by the
    backward of expand, in the dtype of the expanded tensor: in half precision every
    element would be rounded before that sum (errors of 1e-3 where the exact gradient is
    0). Expanding a float32 copy sums in float32 and rounds once, in the backward of the
    cast. Dimensions the caller expanded already (stride 0) are cut to size 1 first, so
    that sum runs here too (the caller's expand then sums one nonzero slice).
    """
    index = tuple(slice(0, 1) if stride == 0 and size > 1 else slice(None)
                  for size, stride in zip(mask.shape, mask.stride(), strict=True))
    base = mask[index]
    if base.shape == target:  # nothing to sum: the gradient is rounded once anyway
        return mask
    return base.float()


def _block_mask_args(block_mask: Any, b: int, hq: int, lq: int, lk: int,
                     device: torch.device) -> tuple[list[Tensor] | None, list[int] | None]:
    """Check a BlockMask against the call and lay it out for the ops (or (None, None)).

    Its compressed indices travel to the kernels, which skip empty blocks; backends
    without block-sparse kernels densify it themselves.
    """
    if block_mask is None or not isinstance(block_mask, BlockMask):
        return None, None
    if tuple(block_mask.seq_lengths) != (lq, lk):
        raise ValueError(f"block_mask covers (Lq, Lk) = {tuple(block_mask.seq_lengths)}, the "
                         f"call has {(lq, lk)}")
    if device.type == "meta":
        raise ValueError("block_mask cannot be used with tensors on the meta device: a "
                         "BlockMask's kernels need its data (pass it with real tensors)")
    bm, hm = block_mask.layout.shape[:2]
    if bm not in (1, b) or hm not in (1, hq):
        raise ValueError(f"block_mask has (Bm, Hm) = {(bm, hm)}; they must be 1 or "
                         f"(B, Hq) = {(b, hq)}")
    block_mask = block_mask.to(device)
    return backends.block_mask_tensors(block_mask), list(block_mask.block_size)


def _fold_dense_block_mask(block_mask: Any, attn_mask: Tensor | None, target: tuple[int, ...],
                           device: torch.device) -> Tensor | None:
    """A mask object other than a BlockMask (anything with ``to_dense()`` returning a bool
    tensor broadcastable to ``target``) combined with ``attn_mask`` as one element mask."""
    if block_mask is None or isinstance(block_mask, BlockMask):
        return attn_mask
    if not hasattr(block_mask, "to_dense"):
        raise TypeError(f"block_mask must be an mmattn.BlockMask (or anything with "
                        f"to_dense()), got {type(block_mask).__name__}")
    dense = block_mask.to_dense()
    if not isinstance(dense, Tensor) or dense.dtype != torch.bool:
        raise TypeError("block_mask.to_dense() must return a bool tensor")
    try:
        dense = dense.to(device).expand(target)
    except RuntimeError as exc:
        raise ValueError(f"block_mask covers {_shape(dense)}, which does not broadcast to "
                         f"(B, Hq, Lq, Lk) = {target}") from exc
    if attn_mask is None:
        return dense
    if attn_mask.dtype == torch.bool:
        return attn_mask & dense
    return attn_mask.masked_fill(~dense, -math.inf)


def _prepare_call(q: Tensor, k: Tensor, v: Tensor, attn_mask: Any, key_padding_mask: Any,
                  block_mask: Any, is_causal: bool, dropout_p: Any, scale: Any,
                  return_weights: bool) -> tuple[AttentionCall, list[Tensor] | None,
                                                 list[int] | None, float]:
    """Validate one call of :func:`cross_attention` and describe it for the backends:
    ``(call, block_tensors, block_size, scale)``."""
    _validate_qkv(q, k, v)
    b, hq, lq, d = q.shape
    lk = k.shape[2]
    target = (b, hq, lq, lk)
    mask = _normalise_attn_mask(attn_mask, target, q)
    mask = _fold_dense_block_mask(block_mask, mask, target, q.device)
    block_tensors, block_size = _block_mask_args(block_mask, b, hq, lq, lk, q.device)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = padding), got "
                            f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask))}")
        if key_padding_mask.layout is not _STRIDED or key_padding_mask.is_nested:
            raise _layout_error("key_padding_mask", key_padding_mask)
        if tuple(key_padding_mask.shape) != (b, lk):
            raise ValueError(f"key_padding_mask must have shape (B, Lk) = {(b, lk)}, got "
                             f"{_shape(key_padding_mask)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
    # Exact-type fast paths first: these checks run on every call (a seed-sized layer).
    if type(dropout_p) is not float:
        dropout_p = _check_real("dropout_p", dropout_p)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1], got {dropout_p!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    else:
        if type(scale) is not float:
            scale = _check_real("scale", scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    if is_causal is not False and is_causal is not True:
        is_causal = _check_flag("is_causal", is_causal)
    if return_weights is not False and return_weights is not True:
        return_weights = _check_flag("return_weights", return_weights)
    call = AttentionCall(q, k, v, mask, key_padding_mask, is_causal, dropout_p, return_weights,
                         None if block_size is None else tuple(block_size),
                         ops.needs_grad(q, k, v, mask))
    return call, block_tensors, block_size, scale


def _seed_tensor(dropout_seed: Any, dropout: bool) -> Tensor | None:
    """The Philox key of a call with dropout, as a 0-d int64 CPU tensor (None without
    dropout). ``dropout_seed`` is checked either way: an int (Python or NumPy) or an
    integer tensor of one element, in ``[0, 2**63)``, or None."""
    if dropout_seed is None:
        return torch.randint(0, _MAX_SEED, (), dtype=torch.int64) if dropout else None
    if isinstance(dropout_seed, Tensor):
        if dropout_seed.is_floating_point() or dropout_seed.is_complex() or (
                dropout_seed.dtype == torch.bool):
            raise TypeError(f"dropout_seed must be an integer tensor, got {dropout_seed.dtype}")
        if dropout_seed.numel() != 1:
            raise ValueError(f"dropout_seed must hold one value, got shape "
                             f"{tuple(dropout_seed.shape)}")
        seed = dropout_seed.detach().to("cpu", torch.int64).reshape(())
        # The value check reads the tensor; a traced seed (torch.compile) is taken as is.
        if not torch.compiler.is_compiling() and int(seed) < 0:
            raise ValueError(f"dropout_seed must be in [0, 2**63), got {int(seed)}")
        return seed if dropout else None
    if isinstance(dropout_seed, bool) or not isinstance(dropout_seed, numbers.Integral):
        raise TypeError(f"dropout_seed must be an int in [0, 2**63) or None, got "
                        f"{type(dropout_seed).__name__} {dropout_seed!r}")
    if not 0 <= dropout_seed <= _MAX_SEED:
        raise ValueError(f"dropout_seed must be an int in [0, 2**63) or None, got {dropout_seed!r}")
    return torch.tensor(int(dropout_seed), dtype=torch.int64) if dropout else None


def _plain_cpu_output(q: Any, k: Any, v: Any, is_causal: bool, scale: float | None,
                      backend: str | None) -> Tensor | None:
    """The output of a plain call (no mask, dropout, weights, lse or gradient) of dense
    CPU tensors that the cpu backend runs, straight from its inference op; None for any
    other call, which takes the general path (and gets its errors there).

    Why: the general path's validation objects and backend choice cost ~8 us a call, as
    much as the kernel of a decoding step (Lq = 1, Lk = 4096, one head: ~15 us on two
    threads). The checks here accept only what :func:`_validate_qkv` accepts and pick
    what :mod:`mmattn.dispatch` would (argument, then context or ``MMATTN_BACKEND``,
    then automatic: cpu for CPU tensors); the op and its arguments are the general
    path's, so the bits are too.
    """
    if backend is None:
        backend = dispatch.forced_backend()
    if (backend is not None and backend != "cpu") or _cpu_backend.ATTENTION_REASON is not None:
        return None
    if type(q) is not Tensor or type(k) is not Tensor or type(v) is not Tensor:
        return None  # subclasses (Parameter, DTensor, fake tensors) take the general path
    dtype = q.dtype
    if (dtype not in _cpu_backend.KERNEL_DTYPES or k.dtype != dtype or v.dtype != dtype
            or not (q.is_cpu and k.is_cpu and v.is_cpu)
            or q.layout is not _STRIDED or k.layout is not _STRIDED or v.layout is not _STRIDED
            or q.is_nested or k.is_nested or v.is_nested
            or q.dim() != 4 or k.dim() != 4 or v.dim() != 4):
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return None  # traced graphs hold the custom op
    b, hq, _, d = q.shape
    bk, hkv, lk, dk = k.shape
    bv, hv, lv, _ = v.shape
    if not (b == bk == bv and hkv == hv and hkv > 0 and hq % hkv == 0 and lk == lv
            and d == dk and d > 0):
        return None
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif type(scale) is not float or not math.isfinite(scale):
        return None
    return _cpu_backend.attention_inference(q, k, v, None, None, is_causal, scale)


def cross_attention(
    q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None, block_mask: Any = None, is_causal: bool = False,
    dropout_p: float = 0.0, scale: float | None = None, return_weights: bool = False,
    backend: str | None = None, dropout_seed: int | Tensor | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    """Multi-head attention of queries over keys/values from another modality.

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hkv, Lk, D)``; v: ``(B, Hkv, Lk, Dv)``, one dtype
            (float32, float16, bfloat16; float64 on the reference backend), any strides.
            ``Hq % Hkv == 0`` (grouped-query / multi-query attention); ``Dv`` may differ
            from ``D``; ``Lq`` and ``Lk`` are independent and may be 0.
        attn_mask: bool (True = may attend, as ``F.scaled_dot_product_attention``) or
            float (added to the scores), broadcastable to ``(B, Hq, Lq, Lk)``. A float
            mask that requires grad receives its gradient.
        key_padding_mask: ``(B, Lk)`` bool, True = padding (as ``nn.MultiheadAttention``).
        block_mask: an :class:`mmattn.BlockMask`; combined with the other masks.
        is_causal: top-left aligned causal mask (query i sees keys j <= i), as SDPA.
        dropout_p: probability of dropping an attention weight, in [0, 1] (a Python or
            NumPy real; not a bool).
        scale: multiplier of ``q @ k^T`` (a finite Python or NumPy real); default
            ``1 / sqrt(D)``.
        return_weights: also return the weights that multiplied V (after dropout, as
            ``nn.MultiheadAttention``), ``(B, Hq, Lq, Lk)``.
        backend: ``"reference" | "cpu" | "triton" | "cuda"`` or None (automatic).
        dropout_seed: Philox key for dropout (``0 <= seed < 2**63``): an int or an integer
            tensor of one element; None draws one from torch's default generator, so
            ``torch.manual_seed`` makes runs repeatable. Checked even without dropout.
        return_lse: also return the log-sum-exp of each query row's scaled, masked
            scores, ``(B, Hq, Lq)``, float32 (float64 for float64 inputs), +inf for a row
            with no visible key, before dropout. Gradients flow through it.

    Returns:
        ``out`` ``(B, Hq, Lq, Dv)`` in q's dtype, followed by ``weights`` when
        ``return_weights`` and ``lse`` when ``return_lse``: ``out``, ``(out, weights)``,
        ``(out, lse)`` or ``(out, weights, lse)``.

    A query row with no visible key returns 0 (weights 0, gradients 0), never NaN:
    this is the one documented difference from SDPA.

    Bad arguments raise ``TypeError`` / ``ValueError`` naming the argument before any kernel
    runs: flags (``is_causal``, ``return_weights``, ``return_lse``) must be bools; tensors
    must be dense (strided), not sparse, mkldnn or nested.
    """
    if (attn_mask is None and key_padding_mask is None and block_mask is None
            and return_weights is False and return_lse is False and dropout_seed is None
            and type(dropout_p) is float and dropout_p == 0.0
            and (is_causal is False or is_causal is True)):
        out = _plain_cpu_output(q, k, v, is_causal, scale, backend)
        if out is not None:
            return out
    call, block_tensors, block_size, scale = _prepare_call(
        q, k, v, attn_mask, key_padding_mask, block_mask, is_causal, dropout_p, scale,
        return_weights)
    if return_lse is not False and return_lse is not True:
        return_lse = _check_flag("return_lse", return_lse)
    out, lse, weights = _run(call, block_tensors, block_size, scale, backend, dropout_seed,
                             return_lse)
    if not (call.return_weights or return_lse):
        return out
    return (out, *((weights,) if call.return_weights else ()),
            *((lse,) if return_lse else ()))


def _run(call: AttentionCall, block_tensors: list[Tensor] | None, block_size: list[int] | None,
         scale: float, backend: str | None, dropout_seed: Any,
         return_lse: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Backend choice and the op, for a validated call: ``(out, lse, weights)``, lse and
    weights None unless asked for. The one body of :func:`cross_attention` and
    :func:`attend`."""
    seed_tensor = (None if dropout_seed is None and call.dropout_p == 0.0
                   else _seed_tensor(dropout_seed, call.dropout_p > 0.0))
    name = dispatch.resolve_attention(call, backend)
    q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, return_weights, _, grad = call
    return ops.attention(q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale,
                         seed_tensor, return_weights, name, block_tensors, block_size,
                         return_lse, grad)


def attend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
           key_padding_mask: Tensor | None, is_causal: bool, dropout_p: float, scale: float,
           return_weights: bool, block_mask: Any = None) -> tuple[Tensor, Tensor | None]:
    """:func:`cross_attention` for callers that built and checked their arguments: the
    entry of :mod:`mmattn.nn`'s modules, which check their inputs once in their own
    terms (``embed_dim``, mask shapes) and derive q, k, v from their own weights.

    Trusted, not re-checked: q, k, v 4-D, one float dtype and device, ``Hq % Hkv == 0``,
    matching lengths and head dims; ``attn_mask`` None or bool (True = may attend) /
    float, broadcastable to ``(B, Hq, Lq, Lk)``; ``key_padding_mask`` None or bool
    ``(B, Lk)``; ``dropout_p`` in [0, 1]; ``scale`` a float. ``block_mask`` comes from
    the module's caller and is checked as :func:`cross_attention` does.
    Returns ``(out, weights)``, weights None unless ``return_weights``. Small plain calls
    under automatic choice run ``F.scaled_dot_product_attention``
    (:func:`mmattn.dispatch.module_call_to_sdpa`).
    """
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    if attn_mask is not None:
        attn_mask = attn_mask.expand(b, hq, lq, lk)
    block_tensors = block_size = None
    if block_mask is not None:
        attn_mask = _fold_dense_block_mask(block_mask, attn_mask, (b, hq, lq, lk), q.device)
        block_tensors, block_size = _block_mask_args(block_mask, b, hq, lq, lk, q.device)
    grad = torch.is_grad_enabled() and (  # ops.needs_grad, spelled out: a generator costs
        q.requires_grad or k.requires_grad or v.requires_grad
        or (attn_mask is not None and attn_mask.requires_grad))
    call = AttentionCall(q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p,
                         return_weights, None if block_size is None else tuple(block_size),
                         grad)
    if dispatch.module_call_to_sdpa(call):
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale), None
    out, _, weights = _run(call, block_tensors, block_size, scale, None, None, False)
    return out, weights


def attend_scripted(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                    key_padding_mask: Tensor | None, is_causal: bool, dropout_p: float,
                    scale: float, return_weights: bool) -> tuple[Tensor, Tensor | None]:
    """:func:`attend` for TorchScript, which cannot run mmattn's Python dispatch: calls the
    custom op ``mmattn::attention_forward`` with backend ``"auto"``, so the op picks the
    backend per call as :func:`cross_attention` would (including :func:`use_backend`
    contexts) and its registered autograd gives the gradients. Same arguments, result
    and dropout draws (one ``torch.randint`` per call with dropout) as :func:`attend`."""
    if attn_mask is not None:
        attn_mask = attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    seed: Tensor | None = None
    if dropout_p > 0.0:
        # the draw of _seed_tensor(None): 0 <= seed < _MAX_SEED = 2**63 - 1
        seed = torch.randint(0, 9223372036854775807, torch.jit.annotate(list[int], []),
                             dtype=torch.int64)
    grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad
        or (attn_mask is not None and attn_mask.requires_grad))
    keep_fp32_out = grad and (q.dtype == torch.float16 or q.dtype == torch.bfloat16)
    out, _lse, weights, _out_fp32 = torch.ops.mmattn.attention_forward(
        q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale, seed,
        return_weights, keep_fp32_out, "auto")
    if return_weights:
        return out, weights
    return out, None


def merge_attention(outs: list[Tensor] | tuple[Tensor, ...],
                    lses: list[Tensor] | tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """Combine attention computed over disjoint key shards into attention over all keys.

    If ``(outs[i], lses[i]) = cross_attention(q, k_i, v_i, ..., return_lse=True)`` for
    key/value shards ``k_i, v_i`` that partition the keys (each shard with its part of
    the masks), the result equals ``cross_attention(q, k, v, ..., return_lse=True)``
    over all keys: ``lse = log(sum_i exp(lses[i]))`` and ``out = sum_i exp(lses[i] - lse)
    * outs[i]``. The building block of ring / context-parallel attention
    (:mod:`mmattn.distributed`) and of split-KV decoding.

    Args:
        outs: partial outputs ``(..., Lq, Dv)`` (e.g. ``(B, H, Lq, Dv)``), one dtype.
        lses: their log-sum-exps ``(..., Lq)``, float32 (float64 for float64 outputs);
            ``+inf`` marks a row that saw no key in that shard (mmattn's convention),
            which then contributes nothing.

    Returns:
        ``(out, lse)``: ``out`` in the dtype of ``outs`` (combined in float32, float64
        for float64), ``lse`` in the dtype of ``lses``; a row that saw no key in any
        shard gives out 0 and lse +inf. Gradients flow into every ``outs[i]`` and
        ``lses[i]``, so training through a merge works. Dropout does not split (its
        Philox counters number the keys of each call), so shards must run without it.
    """
    if not isinstance(outs, (list, tuple)) or not isinstance(lses, (list, tuple)):
        raise TypeError("outs and lses must be lists (or tuples) of tensors")
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"outs and lses must be non-empty and of one length, got "
                         f"{len(outs)} and {len(lses)}")
    for i, (out, lse) in enumerate(zip(outs, lses, strict=True)):
        if not isinstance(out, Tensor) or not isinstance(lse, Tensor):
            raise TypeError(f"outs[{i}] and lses[{i}] must be tensors")
        if out.dim() < 2 or tuple(lse.shape) != tuple(out.shape[:-1]):
            raise ValueError(f"lses[{i}] must have the shape of outs[{i}] without its last "
                             f"dimension, got {_shape(lse)} and {_shape(out)}")
        if tuple(out.shape) != tuple(outs[0].shape) or out.dtype != outs[0].dtype:
            raise ValueError(f"outs[{i}] has shape {_shape(out)} and dtype {out.dtype}, "
                             f"outs[0] {_shape(outs[0])} and {outs[0].dtype}")
        if lse.dtype not in (torch.float32, torch.float64) or lse.dtype != lses[0].dtype:
            raise TypeError(f"lses must all be float32 or all float64, got {lse.dtype}")
        if out.device != outs[0].device or lse.device != outs[0].device:
            raise ValueError("outs and lses must be on one device")
    dtype = torch.float64 if outs[0].dtype == torch.float64 else torch.float32
    stacked = torch.stack(list(lses)).to(dtype)
    # +inf (no visible key) means an empty sum: log 0 = -inf for the arithmetic.
    lse = torch.where(stacked == math.inf, -math.inf, stacked)
    # The result does not depend on the shift: detached, it needs no gradient.
    top = lse.detach().amax(dim=0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    scaled = torch.exp(lse - top)  # 0 for empty shards
    total = scaled.sum(dim=0)
    seen = total > 0
    # where() twice: the unused branch must not produce inf / NaN gradients
    safe_total = torch.where(seen, total, torch.ones_like(total))
    weights = scaled / safe_total
    out = (weights.unsqueeze(-1) * torch.stack(list(outs)).to(dtype)).sum(dim=0)
    merged_lse = torch.where(seen, top + torch.log(safe_total), math.inf)
    return out.to(outs[0].dtype), merged_lse.to(lses[0].dtype)


def attention_backend(q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None,
                      key_padding_mask: Tensor | None = None, block_mask: Any = None,
                      is_causal: bool = False, dropout_p: float = 0.0,
                      scale: float | None = None, return_weights: bool = False,
                      backend: str | None = None) -> str:
    """The backend :func:`cross_attention` would run this call on (same arguments);
    raises as it would for bad input or a forced backend that cannot run the call."""
    call, _, _, _ = _prepare_call(q, k, v, attn_mask, key_padding_mask, block_mask, is_causal,
                                  dropout_p, scale, return_weights)
    return dispatch.resolve_attention(call, backend)
