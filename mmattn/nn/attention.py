"""Drop-in attention modules: they hold parameters and call :func:`mmattn.cross_attention`.

* :class:`MultiheadAttention` replaces ``torch.nn.MultiheadAttention`` (same
  constructor, parameters, initialisation, forward and outputs);
* :class:`CrossModalAttention` replaces the ``CrossModalAttention`` of seed 000
  (``q_proj``/``k_proj``/``v_proj``/``out_proj``, ``mask == 0`` hides a key);
* :class:`BlockSparseAttention` replaces the ``SparseAttention`` of seed 004
  (random block mask per call, or a fixed :class:`mmattn.BlockMask`).

The one documented difference from the modules they replace: a query row that sees
no key (every key masked) returns 0 (weights 0, gradients 0), where PyTorch returns
NaN.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmattn import dispatch
from mmattn.attention import attend, attend_scripted, broadcasts_to, cross_attention
from mmattn.block_mask import BlockMask

__all__ = ["BlockSparseAttention", "CrossModalAttention", "MultiheadAttention"]

if TYPE_CHECKING:
    _BlockMaskArg = BlockMask | None
    _Weights = Tensor | None
else:
    # What TorchScript reads in the annotations below (it resolves them at scripting
    # time). A BlockMask is a Python object: eager mode and torch.compile take one,
    # TorchScript sees ``Any`` and its forward raises if one is given.
    _BlockMaskArg = Any | None
    # CrossModalAttention returns Tensor weights in TorchScript, as seed 000 does, so
    # converted models whose annotations say so keep scripting (see its forward).
    _Weights = Tensor



def _no_block_mask_in_torchscript(block_mask: _BlockMaskArg) -> None:
    if block_mask is not None:
        raise ValueError("block_mask works in eager mode and under torch.compile, not in "
                         "TorchScript (torch.jit.script)")


NATIVE_INFERENCE_MAX_WORK = 1 << 20
"""Inference below this size runs PyTorch's fused kernel in :class:`MultiheadAttention`.

An inference call that ``torch.nn.MultiheadAttention`` would send down its native fast
path (eval mode, no autograd, self-attention on one tensor, ``batch_first``, no masks,
packed projections with bias; see :meth:`MultiheadAttention._native_inference`) and
whose attention work ``B * Lq * Lk * embed_dim`` is at most this, runs
``torch._native_multi_head_attention`` -- the kernel PyTorch's module runs there, with
PyTorch's result -- called directly. One fused C++ call beats any path made of separate
operations at such sizes (E64 L8: 39 us against ~80 us on the 2-core dev VM; mmattn's
kernel path overtakes it near 1M multiply-adds). Set it to 0 to run mmattn's kernel
for every call (``torch.backends.mha.set_fastpath_enabled(False)`` does too, and so does a
:func:`mmattn.use_backend` context or ``MMATTN_BACKEND``).
"""


def _heads(x: Tensor, num_heads: int, batch_first: bool) -> Tensor:
    """3-D ``(B, L, E)`` (``batch_first``) or ``(L, B, E)`` -> a ``(B, H, L, E // H)`` view.

    No copy: the kernels accept any strides.
    """
    x = x.view(x.shape[0], x.shape[1], num_heads, -1)  # (view: unflatten's wrapper costs)
    return x.transpose(1, 2) if batch_first else x.permute(1, 2, 0, 3)


def _packed_heads(x: Tensor, parts: int, num_heads: int,
                  batch_first: bool) -> list[Tensor]:
    """One projection holding ``parts`` tensors side by side, ``(B, L, parts * E)`` or
    ``(L, B, parts * E)``, -> ``parts`` ``(B, H, L, E // H)`` views (three view ops,
    whatever ``parts``)."""
    x = x.view(x.shape[0], x.shape[1], parts, num_heads, -1)
    return x.permute(2, 0, 3, 1, 4).unbind(0) if batch_first else \
        x.permute(2, 1, 3, 0, 4).unbind(0)


def _compile_safe(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Contiguous q, k, v while ``torch.compile`` traces, strided views in eager mode.

    Workaround: the fake (tracing) kernel of ``mmattn::attention_backward`` promises
    gradients laid out like ``torch.empty_like(q)``, while the kernels return
    contiguous ones; with strided inputs the traced backward then ``view``s a
    gradient whose real strides do not allow it. Remove once the two agree.
    """
    if torch.compiler.is_compiling():
        return q.contiguous(), k.contiguous(), v.contiguous()
    return q, k, v


def _check_mask_dtype(mask: Tensor, name: str) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be bool or floating point, got {mask.dtype}")


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask in PyTorch's MHA convention (True = hidden) as an additive float mask."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, -math.inf)


def _linear(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``F.linear`` for a weight the module may hold as None (TorchScript needs the
    refinement; which weights exist is fixed at construction)."""
    assert weight is not None
    return F.linear(x, weight, bias)


def _slice(t: Tensor | None, start: int, stop: int) -> Tensor | None:
    return None if t is None else t[start:stop]


class MultiheadAttention(nn.MultiheadAttention):
    r"""``torch.nn.MultiheadAttention`` computed by :func:`mmattn.cross_attention`.

    A subclass of ``torch.nn.MultiheadAttention``: the constructor, parameter names,
    shapes and initialisation are PyTorch's own (so ``load_state_dict`` works both
    ways, and one seed gives the same initial weights), and ``isinstance`` checks in
    user code and in PyTorch keep holding. Only :meth:`forward` is replaced.

    Args (as PyTorch): ``embed_dim``, ``num_heads``, ``dropout`` (probability of
    dropping an attention weight in training), ``bias``, ``add_bias_kv``,
    ``add_zero_attn``, ``kdim``, ``vdim``, ``batch_first``, ``device``, ``dtype``.

    ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` keep their inference
    fast path (eval mode, no autograd, ``batch_first``): it reads this module's
    weights and runs PyTorch's fused kernel, giving PyTorch's result
    (:func:`mmattn.convert`'s report lists those layers). Training, autograd and every
    other use run mmattn. ``torch.backends.mha.set_fastpath_enabled(False)`` routes the
    fast-path cases through mmattn too.

    TorchScript: ``torch.jit.script`` works as for PyTorch's module (and for models
    holding it); the scripted forward calls mmattn's custom op
    ``torch.ops.mmattn.attention_forward``, which picks the backend per call as eager
    mode does, so scripted and eager results are equal. ``block_mask`` is eager /
    ``torch.compile`` only. A scripted module runs where ``import mmattn`` has
    registered the op (``torch.jit.save`` / ``torch.jit.load`` included).

    Documented differences: a query row with every key masked gives 0 (PyTorch: NaN);
    invalid arguments raise ``ValueError``/``TypeError`` naming the argument (PyTorch:
    ``AssertionError``/``RuntimeError``); the extra ``block_mask`` argument.
    """

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        block_mask: _BlockMaskArg = None,
    ) -> tuple[Tensor, Tensor | None]:
        r"""Attention of ``query`` over ``key``/``value``, as ``torch.nn.MultiheadAttention``.

        Args:
            query: ``(L, E)`` unbatched, ``(L, N, E)``, or ``(N, L, E)`` with ``batch_first``.
            key: ``(S, kdim)``, ``(S, N, kdim)`` or ``(N, S, kdim)``, floating point.
            value: ``(S, vdim)``, ``(S, N, vdim)`` or ``(N, S, vdim)``.
            key_padding_mask: ``(N, S)`` (``(S,)`` unbatched); bool True = padding
                (ignored key), or float added to the scores.
            need_weights: also return the attention weights (after dropout).
            attn_mask: ``(L, S)`` or ``(N * num_heads, L, S)``; bool **True = NOT
                allowed** (PyTorch's MHA convention, the opposite of
                ``F.scaled_dot_product_attention``), or float added to the scores.
            average_attn_weights: average the returned weights over heads.
            is_causal: PyTorch's hint that ``attn_mask`` is the causal mask: it
                needs ``attn_mask``; with ``need_weights=False`` and no
                ``key_padding_mask`` a top-left causal mask is applied instead of
                ``attn_mask``, otherwise ``attn_mask`` is applied (PyTorch 2.13).
            block_mask: an :class:`mmattn.BlockMask` over ``(L, S)`` (``True`` = may
                attend), combined with the other masks (mmattn extension; not with
                ``add_bias_kv``/``add_zero_attn``; eager mode and ``torch.compile``).

        Returns:
            ``(attn_output, attn_weights)``: output ``(L, E)``, ``(L, N, E)`` or
            ``(N, L, E)`` like ``query``; weights ``(N, L, S')`` averaged or
            ``(N, num_heads, L, S')`` per head (no ``N`` when unbatched), with
            ``S' = S`` plus one key each for ``add_bias_kv`` and ``add_zero_attn``;
            ``None`` when ``need_weights`` is False.

        Rows in which every key is masked give 0 output and 0 weights (PyTorch: NaN).
        """
        dims = query.dim()
        if dims != 3 and dims != 2:
            raise ValueError(f"query must be 2-D (unbatched) or 3-D (batched), got shape "
                             f"{list(query.shape)}")
        if key.dim() != dims or value.dim() != dims:
            raise ValueError(f"key and value must have query's number of dimensions "
                             f"({dims}), got {key.dim()} and {value.dim()}")
        batched = dims == 3
        batch_first = self.batch_first
        if not batched:  # one batch element, laid out batch-first
            same_kv = key is value
            same_qk = query is key
            query = query.unsqueeze(0)
            key = query if same_qk else key.unsqueeze(0)
            value = key if same_kv else value.unsqueeze(0)
            batch_first = True
            if key_padding_mask is not None:
                _check_mask_dtype(key_padding_mask, "key_padding_mask")
                if key_padding_mask.dim() != 1:
                    raise ValueError(f"key_padding_mask must be 1-D (S,) for unbatched "
                                     f"input, got shape {list(key_padding_mask.shape)}")
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if batch_first:
            batch, tgt_len, embed_dim = query.shape
            src_len = key.shape[1]
            key_batch = key.shape[0]
        else:
            tgt_len, batch, embed_dim = query.shape
            src_len = key.shape[0]
            key_batch = key.shape[1]
        if embed_dim != self.embed_dim:
            raise ValueError(f"query's embedding size must be embed_dim={self.embed_dim}, "
                             f"got {embed_dim}")
        if key is not value and key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key and value must have the same batch and sequence sizes, "
                             f"got shapes {list(key.shape)} and {list(value.shape)}")
        if key_batch != batch:
            raise ValueError(f"query and key batch sizes differ: {batch} and {key_batch}")
        num_heads = self.num_heads

        if not torch.jit.is_scripting():
            if (attn_mask is None and key_padding_mask is None and block_mask is None
                    and not is_causal and batched and query is key and key is value
                    and self._native_inference(query)):
                return torch._native_multi_head_attention(
                    query, query, query, embed_dim, num_heads, self.in_proj_weight,
                    self.in_proj_bias, self.out_proj.weight, self.out_proj.bias, None,
                    need_weights, average_attn_weights, None)

        # Masks, in mmattn's convention: bool True = may attend, float added.
        if attn_mask is not None:
            _check_mask_dtype(attn_mask, "attn_mask")
            if attn_mask.dim() == 2:
                if attn_mask.shape[0] != tgt_len or attn_mask.shape[1] != src_len:
                    raise ValueError(f"2-D attn_mask must have shape (L, S) = "
                                     f"{[tgt_len, src_len]}, got {list(attn_mask.shape)}")
            elif attn_mask.dim() == 3:
                if list(attn_mask.shape) != [batch * num_heads, tgt_len, src_len]:
                    raise ValueError(f"3-D attn_mask must have shape (N * num_heads, L, S) = "
                                     f"{[batch * num_heads, tgt_len, src_len]}, got "
                                     f"{list(attn_mask.shape)}")
                attn_mask = attn_mask.view(batch, num_heads, tgt_len, src_len)
            else:
                raise ValueError(f"attn_mask must be 2-D (L, S) or 3-D (N * num_heads, L, S), "
                                 f"got shape {list(attn_mask.shape)}")
        elif is_causal:
            raise ValueError("is_causal=True is a hint that attn_mask is the causal mask and "
                             "needs attn_mask (as torch.nn.MultiheadAttention); pass the "
                             "mask, e.g. nn.Transformer.generate_square_subsequent_mask(L)")
        if key_padding_mask is not None:
            _check_mask_dtype(key_padding_mask, "key_padding_mask")
            if key_padding_mask.dim() != 2 or key_padding_mask.shape[0] != batch or \
                    key_padding_mask.shape[1] != src_len:
                raise ValueError(f"key_padding_mask must have shape (N, S) = "
                                 f"{[batch, src_len]}, got {list(key_padding_mask.shape)}")
        # bool(): a drop-in for nn.MultiheadAttention takes truthy flags as it does
        use_causal = bool(is_causal) and key_padding_mask is None and not need_weights
        if use_causal:
            attn_mask = None
        if key_padding_mask is not None and key_padding_mask.is_floating_point():
            # A float padding mask is added to the scores: fold it into a float attn_mask.
            pad = key_padding_mask.view(batch, 1, 1, src_len)
            attn_mask = pad if attn_mask is None else _additive(attn_mask, pad.dtype) + pad
            key_padding_mask = None
        elif attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask

        q, k, v = self._project(query, key, value, batch_first)
        if self.bias_k is not None or self.add_zero_attn:
            if block_mask is not None:
                raise ValueError("block_mask cannot be combined with add_bias_kv or "
                                 "add_zero_attn (they append keys the block mask does not "
                                 "cover)")
            k, v, attn_mask, key_padding_mask = self._extra_keys(
                k, v, attn_mask, key_padding_mask)

        dropout_p = self.dropout if self.training else 0.0
        scale = 1.0 / math.sqrt(self.head_dim)
        if torch.jit.is_scripting():
            _no_block_mask_in_torchscript(block_mask)
            out, weights = attend_scripted(q, k, v, attn_mask, key_padding_mask, use_causal,
                                           dropout_p, scale, need_weights)
        else:
            q, k, v = _compile_safe(q, k, v)
            out, weights = attend(q, k, v, attn_mask, key_padding_mask, use_causal, dropout_p,
                                  scale, bool(need_weights), block_mask)
        # (B, H, L, D) -> the caller's layout, then the output projection.
        if batch_first:
            out = out.transpose(1, 2).reshape(batch, tgt_len, embed_dim)
        else:
            out = out.permute(2, 0, 1, 3).reshape(tgt_len, batch, embed_dim)
        out_proj = self.out_proj
        out = F.linear(out, out_proj.weight, out_proj.bias)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(0)
            if weights is not None:
                weights = weights.squeeze(0)
        return out, weights

    @torch.jit.unused
    def _native_inference(self, query: Tensor) -> bool:
        """Whether a self-attention call without masks takes PyTorch's fused inference
        kernel (see :data:`NATIVE_INFERENCE_MAX_WORK`): PyTorch's own fast-path
        conditions, and a size at most that. Eager mode only."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return False  # traced graphs hold mmattn's custom op
        if dispatch.forced_backend() is not None:
            return False  # a backend context asks for mmattn's kernels
        if self.training or not self.batch_first or not self._qkv_same_embed_dim or \
                self.bias_k is not None or self.add_zero_attn or self.num_heads % 2:
            return False
        batch, length, embed_dim = query.shape
        if batch * length * length * embed_dim > NATIVE_INFERENCE_MAX_WORK:
            return False
        weight, bias, out_proj = self.in_proj_weight, self.in_proj_bias, self.out_proj
        tensors = (query, weight, bias, out_proj.weight, out_proj.bias)
        if bias is None or query.dtype != weight.dtype or query.dtype != bias.dtype:
            return False
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return False
        return (torch.backends.mha.get_fastpath_enabled() and not torch.is_autocast_enabled()
                and not query.is_nested and query.device.type in ("cpu", "cuda")
                and not torch.overrides.has_torch_function(tensors))

    def _project(self, query: Tensor, key: Tensor, value: Tensor,
                 batch_first: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Input projections as ``(B, H, L, D)`` views: one GEMM for self-attention (as
        PyTorch), one for a shared key/value tensor, else one each."""
        embed_dim, heads = self.embed_dim, self.num_heads
        bias = self.in_proj_bias
        if self._qkv_same_embed_dim:
            weight = self.in_proj_weight
            assert weight is not None
            if query is key and key is value:
                q, k, v = _packed_heads(F.linear(query, weight, bias), 3, heads, batch_first)
                return q, k, v
            q = _heads(F.linear(query, weight[:embed_dim], _slice(bias, 0, embed_dim)),
                       heads, batch_first)
            if key is value:
                k, v = _packed_heads(F.linear(key, weight[embed_dim:],
                                              _slice(bias, embed_dim, 3 * embed_dim)),
                                     2, heads, batch_first)
                return q, k, v
            k = F.linear(key, weight[embed_dim:2 * embed_dim],
                         _slice(bias, embed_dim, 2 * embed_dim))
            v = F.linear(value, weight[2 * embed_dim:], _slice(bias, 2 * embed_dim, 3 * embed_dim))
            return q, _heads(k, heads, batch_first), _heads(v, heads, batch_first)
        q = _linear(query, self.q_proj_weight, _slice(bias, 0, embed_dim))
        k = _linear(key, self.k_proj_weight, _slice(bias, embed_dim, 2 * embed_dim))
        v = _linear(value, self.v_proj_weight, _slice(bias, 2 * embed_dim, 3 * embed_dim))
        return (_heads(q, heads, batch_first), _heads(k, heads, batch_first),
                _heads(v, heads, batch_first))

    def _extra_keys(self, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                    key_padding_mask: Tensor | None
                    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Append the learned ``bias_k``/``bias_v`` key and the all-zero key (visible) to
        ``(B, H, S, D)`` keys and values."""
        extra = 0
        bias_k, bias_v = self.bias_k, self.bias_v
        if bias_k is not None and bias_v is not None:
            k = torch.cat([k, bias_k.view(1, k.shape[1], 1, k.shape[3]).expand(
                k.shape[0], -1, -1, -1)], dim=2)
            v = torch.cat([v, bias_v.view(1, v.shape[1], 1, v.shape[3]).expand(
                v.shape[0], -1, -1, -1)], dim=2)
            extra += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(k.shape[0], k.shape[1], 1, k.shape[3])], dim=2)
            v = torch.cat([v, v.new_zeros(v.shape[0], v.shape[1], 1, v.shape[3])], dim=2)
            extra += 1
        if attn_mask is not None:  # the appended keys are visible: True, or 0 added
            shape = list(attn_mask.shape)
            shape[-1] = extra
            fill = torch.full(shape, 1.0 if attn_mask.dtype == torch.bool else 0.0,
                              dtype=attn_mask.dtype, device=attn_mask.device)
            attn_mask = torch.cat([attn_mask, fill], dim=-1)
        if key_padding_mask is not None:  # ... and not padding
            fill = key_padding_mask.new_zeros((key_padding_mask.shape[0], extra))
            key_padding_mask = torch.cat([key_padding_mask, fill], dim=-1)
        return k, v, attn_mask, key_padding_mask


class CrossModalAttention(nn.Module):
    r"""Seed 000's ``CrossModalAttention``, computed by :func:`mmattn.cross_attention`.

    Same constructor, parameter names (``q_proj``, ``k_proj``, ``v_proj``,
    ``out_proj``; ``dropout`` an ``nn.Dropout`` on the weights; ``scale`` =
    ``sqrt(head_dim)``, the divisor of the scores) and forward as the seed, so its
    ``state_dict`` loads unchanged.

    Args:
        query_dim: E, the query features and the model width; divisible by ``num_heads``.
        key_dim: features of ``key``. value_dim: features of ``value``.
        num_heads: attention heads. dropout: probability of dropping a weight (training).
        need_weights: default of ``forward(need_weights=)``; False skips computing the
            ``(B, H, Lq, Lk)`` weights (the fused kernels never form them).
        bias: projections with bias (the seed: always True).
    """

    def __init__(self, query_dim: int, key_dim: int, value_dim: int, num_heads: int,
                 dropout: float = 0.1, *, need_weights: bool = True, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None
                 ) -> None:
        super().__init__()
        if num_heads <= 0 or query_dim <= 0 or query_dim % num_heads != 0:
            raise ValueError(f"query_dim ({query_dim}) must be a positive multiple of "
                             f"num_heads ({num_heads})")
        factory = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = query_dim // num_heads
        self.q_proj = nn.Linear(query_dim, query_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(key_dim, query_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(value_dim, query_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(query_dim, query_dim, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.scale = math.sqrt(self.head_dim)
        self.need_weights = need_weights

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None,
                need_weights: bool | None = None, block_mask: _BlockMaskArg = None
                ) -> tuple[Tensor, _Weights]:
        r"""Cross-modal attention of ``query`` over ``key``/``value``.

        Args:
            query: ``(B, Lq, query_dim)``; key: ``(B, Lk, key_dim)``; value:
                ``(B, Lk, value_dim)``; floating point, one dtype.
            mask: any dtype, broadcastable to ``(B, num_heads, Lq, Lk)``; entries
                equal to 0 hide the key (the seed's ``mask == 0``).
            need_weights: return the weights; None uses the constructor's setting.
            block_mask: an :class:`mmattn.BlockMask` over ``(Lq, Lk)``, combined
                with ``mask`` (mmattn extension; eager mode and ``torch.compile``).

        Returns:
            ``(output (B, Lq, query_dim), weights (B, num_heads, Lq, Lk) after dropout)``,
            weights None when not needed. Rows with every key masked give 0 (seed: NaN).
            Under TorchScript, whose types are static, weights not needed are an empty
            tensor instead of None: the seed's module always returns a tensor, and
            converted models that collect the weights are annotated so.
        """
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            raise ValueError(f"query, key and value must be 3-D (B, L, features), got shapes "
                             f"{list(query.shape)}, {list(key.shape)}, {list(value.shape)}")
        want_weights = self.need_weights if need_weights is None else need_weights
        heads = self.num_heads
        attn_mask: Tensor | None = None
        if mask is not None:
            if not isinstance(mask, Tensor):
                raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
            target = [query.shape[0], heads, query.shape[1], key.shape[1]]
            if not broadcasts_to(list(mask.shape), target):
                raise ValueError(f"mask of shape {list(mask.shape)} does not broadcast to "
                                 f"(B, num_heads, Lq, Lk) = {target}")
            attn_mask = mask != 0
        q = _heads(self.q_proj(query), heads, True)
        k = _heads(self.k_proj(key), heads, True)
        v = _heads(self.v_proj(value), heads, True)
        dropout_p = self.dropout.p if self.training else 0.0
        if torch.jit.is_scripting():
            _no_block_mask_in_torchscript(block_mask)
            context, weights = attend_scripted(q, k, v, attn_mask, None, False, dropout_p,
                                               1.0 / self.scale, want_weights)
            if weights is None:
                weights = context.new_empty(0)
        else:
            q, k, v = _compile_safe(q, k, v)
            context, weights = attend(q, k, v, attn_mask, None, False, dropout_p,
                                      1.0 / self.scale, bool(want_weights), block_mask)
        context = context.transpose(1, 2).flatten(2)
        return self.out_proj(context), weights


class BlockSparseAttention(nn.Module):
    r"""Seed 004's ``SparseAttention``, computed by :func:`mmattn.cross_attention`.

    Without a fixed mask it behaves as the seed: each call draws a fresh random block
    layout, ``torch.rand(nbq, nbk) > sparsity_factor`` from torch's global generator (or
    ``generator``), so after the same ``torch.manual_seed`` it keeps exactly the
    seed's blocks. With ``block_mask`` (here or per call) the layout is fixed, e.g.
    ``BlockMask.modality(...)`` or ``BlockMask.local_window(...)``; the kernels skip
    its empty blocks.

    Args:
        block_size: block edge for the random layout (the seed's ``block_size``).
        sparsity_factor: a block is kept iff its uniform draw exceeds this (the seed's).
        block_mask: a fixed :class:`mmattn.BlockMask` over ``(Lq, Lk)`` used instead of
            random layouts.
        generator: the ``torch.Generator`` random layouts draw from; None = global.
    """

    def __init__(self, block_size: int = 64, sparsity_factor: float = 0.8, *,
                 block_mask: BlockMask | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if not isinstance(sparsity_factor, (int, float)) or not 0.0 <= sparsity_factor <= 1.0:
            raise ValueError(f"sparsity_factor must be in [0, 1], got {sparsity_factor!r}")
        if block_mask is not None and not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask must be an mmattn.BlockMask or None, got "
                            f"{type(block_mask).__name__}")
        self.block_size = block_size
        self.sparsity_factor = sparsity_factor
        self.block_mask = block_mask
        self.generator = generator

    def create_block_mask(self, query_length: int, key_length: int) -> BlockMask:
        """A fresh random layout over ``(query_length, key_length)`` (the seed's rule;
        lengths that are not multiples of ``block_size`` get a partial last block)."""
        return BlockMask.random((query_length, key_length), self.block_size,
                                self.sparsity_factor, generator=self.generator)

    def create_sparse_mask(self, seq_length: int) -> Tensor:
        """The seed's method: a dense bool ``(L, L)`` mask (True = may attend)."""
        return self.create_block_mask(seq_length, seq_length).to_dense()[0, 0]

    def forward(self, Q: Tensor, K: Tensor, V: Tensor, *,  # the seed's argument names
                block_mask: BlockMask | None = None) -> Tensor:
        r"""Block-sparse attention of ``Q`` over ``K``/``V``, scale ``1/sqrt(D)``.

        Args:
            Q: ``(B, Lq, D)`` as the seed, or ``(B, H, Lq, D)``.
            K: ``(B, Lk, D)`` / ``(B, H, Lk, D)``; V: ``(B, Lk, Dv)`` / ``(B, H, Lk, Dv)``.
            block_mask: a :class:`mmattn.BlockMask` over ``(Lq, Lk)`` for this call;
                default the constructor's, else a fresh random one.

        Returns:
            ``(B, Lq, Dv)`` (or ``(B, H, Lq, Dv)``). Query rows whose blocks are all
            dropped return 0 (the seed: NaN).
        """
        if Q.dim() not in (3, 4) or K.dim() != Q.dim() or V.dim() != Q.dim():
            raise ValueError(f"Q, K and V must all be 3-D (B, L, D) or all 4-D (B, H, L, D), "
                             f"got shapes {tuple(Q.shape)}, {tuple(K.shape)}, "
                             f"{tuple(V.shape)}")
        mask = block_mask if block_mask is not None else self.block_mask
        lengths = (Q.shape[-2], K.shape[-2])
        if mask is None:
            mask = self.create_block_mask(*lengths)
        elif not isinstance(mask, BlockMask):
            raise TypeError(f"block_mask must be an mmattn.BlockMask, got {type(mask).__name__}")
        elif tuple(mask.seq_lengths) != lengths:
            raise ValueError(f"block_mask covers (Lq, Lk) = {tuple(mask.seq_lengths)}, the "
                             f"inputs have {lengths}")
        heads_added = Q.dim() == 3
        if heads_added:
            Q, K, V = Q.unsqueeze(1), K.unsqueeze(1), V.unsqueeze(1)
        out = cross_attention(Q, K, V, block_mask=mask.to(Q.device))
        return out.squeeze(1) if heads_added else out
