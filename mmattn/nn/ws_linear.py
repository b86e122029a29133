"""Linear layers over a Watts-Strogatz sparsity layout that store only the kept weights.

``WSLinear`` is the general layer; ``WSMultiModalFusion`` is the drop-in replacement of
seed 002's module of that name (same forward, same mask, loads its state_dict).

State dict of both (``prefix`` omitted):

* ``weight``: the kept values in CSR order, ``(nnz,)`` or ``(nnz, bs, bs)`` for a block
  layout (``bs = block_size``);
* ``bias``: ``(out_features,)``, when the layer has one;
* ``crow_indices``, ``col_indices``: int32 CSR of the layout (the topology), so a layer
  with a random (``seed=None``) graph reloads with its own graph.

The transposed index arrays the kernels use are derived buffers, rebuilt on load. A
*dense* state dict — ``weight`` of shape ``(out_features, in_features)``, optionally with
a ``mask`` (seed 002's ``WSMultiModalFusion``, or an ``nn.Linear``) — loads too: the
entries outside the layout are dropped, and a given mask must equal the layout.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mmattn.backends.reference import layout_to_dense_weight
from mmattn.layout import SparseLayout
from mmattn.ws import ws_linear_indexed, ws_linear_scripted

_PERSISTENT_INDEX = ("crow_indices", "col_indices")
_DERIVED_INDEX = ("row_indices", "ccol_indices", "row_indices_t", "transpose_perm")


def _kept_values(dense: Tensor, layout: SparseLayout) -> Tensor:
    """Entries of a dense ``(out, in)`` matrix at the layout's kept entries, in CSR order:
    ``(nnz,)``, or ``(nnz, bs, bs)`` blocks (zero past the matrix edges)."""
    rows, cols = layout.row_indices.long(), layout.col_indices.long()
    bs = layout.block_size
    if bs == 1:
        return dense[rows, cols]
    nbr, nbc = -(-layout.out_features // bs), -(-layout.in_features // bs)
    padded = dense.new_zeros(nbr * bs, nbc * bs)
    padded[: layout.out_features, : layout.in_features] = dense
    return padded.view(nbr, bs, nbc, bs).permute(0, 2, 1, 3)[rows, cols]


def _row_fan_in(layout: SparseLayout) -> Tensor:
    """float64 ``(out_features,)``: how many inputs each output row reads."""
    bs = layout.block_size
    crow = layout.crow_indices.long().cpu()
    if bs == 1:
        return (crow[1:] - crow[:-1]).double()
    widths = (layout.in_features - layout.col_indices.long().cpu() * bs).clamp(max=bs)
    per_block_row = torch.zeros(crow.numel() - 1, dtype=torch.float64)
    per_block_row.index_add_(0, layout.row_indices.long().cpu(), widths.double())
    return per_block_row.repeat_interleave(bs)[: layout.out_features]


class _CompressedLinear(nn.Module):
    """``y = x @ (W * M)^T + b`` over a :class:`SparseLayout`; parameters for kept entries
    only. The layout lives in int32 buffers, so ``.to(device)`` and ``state_dict`` carry it.
    Subclasses choose the layout and the initialisation."""

    # Python-side conveniences that TorchScript need not (and cannot) compile.
    __jit_unused_properties__: ClassVar[list[str]] = ["layout", "nnz", "density", "mask"]

    def __init__(self, layout: SparseLayout, bias: bool, device: torch.device | str | None,
                 dtype: torch.dtype | None) -> None:
        super().__init__()
        if not isinstance(layout, SparseLayout):
            raise TypeError(f"layout must be an mmattn.SparseLayout, got "
                            f"{type(layout).__name__}")
        self.in_features = layout.in_features
        self.out_features = layout.out_features
        self.block_size = layout.block_size
        for name, index in zip(_PERSISTENT_INDEX + _DERIVED_INDEX, self._layout_tensors(layout),
                               strict=True):
            self.register_buffer(name, index.to(device), persistent=name in _PERSISTENT_INDEX)
        bs = layout.block_size
        shape = (layout.nnz,) if bs == 1 else (layout.nnz, bs, bs)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        self.register_parameter(  # registered even when None, as nn.Linear does
            "bias", nn.Parameter(torch.empty(layout.out_features, **factory)) if bias else None)

    @staticmethod
    def _layout_tensors(layout: SparseLayout) -> tuple[Tensor, ...]:
        return (layout.crow_indices, layout.col_indices, layout.row_indices,
                layout.ccol_indices, layout.row_indices_t, layout.transpose_perm)

    def _index(self) -> tuple[Tensor, ...]:
        b = self._buffers
        return (b["crow_indices"], b["col_indices"], b["row_indices"], b["ccol_indices"],
                b["row_indices_t"], b["transpose_perm"])

    @property
    def layout(self) -> SparseLayout:
        """The layout, on the module's device (views of the buffers, not copies)."""
        # Trusted: the buffers come from a checked layout, or from a loaded state_dict
        # that _rebuild_derived_index checked.
        return SparseLayout._trusted((self.out_features, self.in_features), self.block_size,
                                     *self._index())

    @property
    def nnz(self) -> int:
        """Stored entries (blocks when ``block_size > 1``)."""
        return int(self._buffers["col_indices"].numel())

    @property
    def density(self) -> float:
        """Fraction of the dense ``(out_features, in_features)`` weight that is stored."""
        total = self.out_features * self.in_features
        return float(_row_fan_in(self.layout).sum()) / total if total else 0.0

    def to_dense_weight(self) -> Tensor:
        """The dense ``(out_features, in_features)`` weight ``W * M`` (differentiable)."""
        b = self._buffers
        return layout_to_dense_weight(self.weight, b["crow_indices"], b["col_indices"],
                                      self.out_features, self.in_features, self.block_size)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(..., in_features)`` in the weight's dtype and device ->
        ``(..., out_features)``."""
        return self._sparse_linear(x)

    def _sparse_linear(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return ws_linear_scripted(x, self.weight, self.crow_indices, self.col_indices,
                                      self.row_indices, self.ccol_indices, self.row_indices_t,
                                      self.transpose_perm, self.out_features,
                                      self.in_features, self.block_size, self.bias)
        # _parameters / _buffers directly: nn.Module.__getattr__ costs ~0.3 us a name,
        # a noticeable share of a seed-sized call.
        params = self._parameters
        return ws_linear_indexed(x, params["weight"], self._index(),
                                 (self.out_features, self.in_features), self.block_size,
                                 params["bias"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        weight_key = prefix + "weight"
        mask = state_dict.get(prefix + "mask")
        weight = state_dict.get(weight_key)
        if weight is not None and weight.dim() == 2:  # dense; ours is (nnz,) or (nnz, bs, bs)
            message = self._convert_dense_state(state_dict, prefix, weight, mask)
            if message:
                error_msgs.append(message)
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._rebuild_derived_index(error_msgs)

    def _convert_dense_state(self, state_dict: dict[str, Any], prefix: str, weight: Tensor,
                             mask: Tensor | None) -> str | None:
        """Rewrites a dense ``weight`` (and ``mask``) entry of ``state_dict`` into this
        module's compressed form in place; returns an error message or None."""
        shape = (self.out_features, self.in_features)
        name = type(self).__name__
        if tuple(weight.shape) != shape:
            return (f"{name}: the dense weight in the state_dict has shape "
                    f"{tuple(weight.shape)}, this module is {shape}")
        layout = self.layout
        if mask is not None:
            if tuple(mask.shape) != shape:
                return f"{name}: the state_dict's mask has shape {tuple(mask.shape)}, not {shape}"
            kept = layout.to_dense().cpu()
            if not torch.equal(mask.detach().cpu() != 0, kept):
                return (f"{name}: the state_dict's mask differs from this module's layout "
                        f"({int((mask.detach().cpu() != 0).sum())} vs {int(kept.sum())} kept "
                        f"entries); build the module with the same k, beta and seed, or use "
                        f"WSLinear.from_dense(linear, mask)")
            del state_dict[prefix + "mask"]
            weight = weight * (mask != 0).to(weight.dtype)  # zero inside kept blocks too
        state_dict[prefix + "weight"] = _kept_values(weight.detach().to(self.weight.device),
                                                     layout)
        for key in _PERSISTENT_INDEX:  # a dense state_dict carries no layout: keep ours
            state_dict.setdefault(prefix + key, self._buffers[key])
        return None

    def _rebuild_derived_index(self, error_msgs: list[str]) -> None:
        """Recomputes the transposed index buffers from the (possibly just loaded) CSR."""
        crow, col = self._buffers["crow_indices"], self._buffers["col_indices"]
        shape = (self.out_features, self.in_features)
        rows = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device),
                                       (crow[1:] - crow[:-1]).long())
        try:
            layout = SparseLayout.from_coo(rows.cpu(), col.long().cpu(), shape, self.block_size)
        except (ValueError, RuntimeError) as exc:
            error_msgs.append(f"{type(self).__name__}: the loaded layout is invalid: {exc}")
            return
        if not (torch.equal(layout.crow_indices, crow.cpu()) and
                torch.equal(layout.col_indices, col.cpu())):
            error_msgs.append(f"{type(self).__name__}: the loaded crow_indices/col_indices are "
                              f"not a canonical CSR (columns sorted and unique within rows)")
            return
        for name, index in zip(_DERIVED_INDEX, self._layout_tensors(layout)[2:], strict=True):
            self._buffers[name] = index.to(crow.device)

    def _kaiming_uniform_(self) -> None:
        """``nn.Linear``'s initialisation with each row's fan-in counted over kept inputs:
        weights and bias of row r uniform in ``±1/sqrt(fan_in_r)``, so an output's variance
        matches a dense layer of that fan-in whatever the density."""
        fan_in = _row_fan_in(self.layout)
        bound = torch.where(fan_in > 0, fan_in.clamp(min=1).rsqrt(), 0.0)
        with torch.no_grad():
            rows = self._buffers["row_indices"].long().cpu()
            if self.block_size == 1:
                per_value = bound[rows]
            else:  # bound of each row of each block; rows past the edge get bound 0
                bs = self.block_size
                padded = torch.zeros(-(-self.out_features // bs) * bs, dtype=torch.float64)
                padded[: self.out_features] = bound
                per_value = padded.view(-1, bs)[rows].unsqueeze(-1).expand(-1, bs, bs)
            unit = torch.rand(self.weight.shape, dtype=torch.float64) * 2 - 1
            self.weight.copy_(unit * per_value)
            if self.bias is not None:
                self.bias.copy_((torch.rand(self.out_features, dtype=torch.float64) * 2 - 1)
                                * bound)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nnz={self.nnz}, block_size={self.block_size}, density={self.density:.4f}, "
                f"bias={self.bias is not None}")


class WSLinear(_CompressedLinear):
    """``nn.Linear`` with a Watts-Strogatz small-world weight mask, stored compressed.

    ``y = x @ (W * M)^T + b`` where ``M = mmattn.watts_strogatz_mask(out_features,
    in_features, k, beta, seed)`` (with ``block_size > 1``: the graph over
    ``block_size x block_size`` blocks, every kept block dense; see
    :meth:`SparseLayout.from_watts_strogatz`). Parameters: ``weight`` holds the kept
    values only (``nnz`` of them, ``(nnz, bs, bs)`` for blocks) and ``bias``
    ``(out_features,)``; gradients reach kept entries only. Runs the C++ kernels on CPU
    (float32/bfloat16/float16), the PyTorch reference elsewhere.

    Initialisation: ``nn.Linear``'s kaiming-uniform rule with the fan-in of each output
    row counted over its kept inputs (weights and bias uniform in ``±1/sqrt(fan_in_r)``).
    """

    def __init__(self, in_features: int, out_features: int, k: int, beta: float,
                 seed: int | None = None, bias: bool = True, block_size: int = 1,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        layout = SparseLayout.from_watts_strogatz(out_features, in_features, k, beta,
                                                  seed=seed, block_size=block_size)
        super().__init__(layout, bias, device, dtype)
        self.k, self.beta, self.seed = k, beta, seed
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._kaiming_uniform_()

    @classmethod
    def from_layout(cls, layout: SparseLayout, bias: bool = True,
                    device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> WSLinear:
        """A layer over any :class:`SparseLayout` (``k``, ``beta``, ``seed`` are None)."""
        module = cls.__new__(cls)
        _CompressedLinear.__init__(module, layout, bias, device, dtype)
        module.k = module.beta = module.seed = None
        module.reset_parameters()
        return module

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Tensor, block_size: int = 1) -> WSLinear:
        """The layer equal to ``linear`` with its weight masked by ``mask``.

        Args:
            linear: an ``nn.Linear`` (or anything with ``weight`` ``(out, in)`` and
                ``bias``); its entries where ``mask`` is False are dropped.
            mask: ``(out_features, in_features)``, bool or 0/1; True = kept.
            block_size: store the kept entries as dense blocks of this size (entries of a
                kept block outside ``mask`` start at zero, and are trained).
        """
        weight = linear.weight
        if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask must be a tensor of the weight's shape "
                             f"{tuple(weight.shape)}, got {tuple(getattr(mask, 'shape', ()))}")
        layout = SparseLayout.from_mask(mask != 0, block_size=block_size)
        module = cls.from_layout(layout, bias=linear.bias is not None, device=weight.device,
                                 dtype=weight.dtype)
        with torch.no_grad():
            masked = weight.detach() * (mask != 0).to(weight.device, weight.dtype)
            module.weight.copy_(_kept_values(masked, module.layout))
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach())
        return module

    def extra_repr(self) -> str:
        graph = "" if self.k is None else f"k={self.k}, beta={self.beta}, seed={self.seed}, "
        return graph + super().extra_repr()


class WSMultiModalFusion(_CompressedLinear):
    """Drop-in replacement of seed 002's ``WSMultiModalFusion``, stored compressed.

    Concatenates ``n_modalities`` feature tensors and applies a bias-free linear layer
    masked by the Watts-Strogatz graph ``watts_strogatz_graph(n, k, beta, seed)`` over
    ``n = n_modalities * features_per_modality`` features — the seed's mask (the seed
    always uses seed 42). Differences from the seed: ``weight`` holds the ``nnz`` kept
    values, not the dense matrix, and ``mask`` is a read-only view derived from the
    layout. Loading the seed module's state_dict (dense ``weight`` + ``mask``) works; the
    entries outside the mask are dropped; :meth:`from_seed` converts an instance.
    :meth:`dense_state_dict` goes the other way.

    Initialisation: as the seed, ``randn(n, n) * 0.01`` read at the kept entries, so
    under the same ``torch.manual_seed`` both modules start with the same kept weights.
    """

    def __init__(self, n_modalities: int = 3, features_per_modality: int = 64, k: int = 4,
                 beta: float = 0.3, seed: int | None = 42) -> None:
        for name, value in (("n_modalities", n_modalities),
                            ("features_per_modality", features_per_modality)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        total = n_modalities * features_per_modality
        layout = SparseLayout.from_watts_strogatz(total, total, k, beta, seed=seed)
        super().__init__(layout, bias=False, device=None, dtype=None)
        self.n_modalities = n_modalities
        self.features_per_modality = features_per_modality
        self.k, self.beta, self.seed = k, beta, seed
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            dense = torch.randn(self.out_features, self.in_features) * 0.01
            self.weight.copy_(_kept_values(dense, self.layout))

    @classmethod
    def from_seed(cls, module: nn.Module) -> WSMultiModalFusion:
        """The compressed twin of a seed-002 ``WSMultiModalFusion`` instance: its ``mask``
        as the layout and the kept entries of its ``weight`` (same device, dtype and
        ``requires_grad``). The seed records neither k nor beta, so they are None here;
        used by :func:`mmattn.convert` (reverted through :meth:`dense_state_dict`)."""
        weight, mask = getattr(module, "weight", None), getattr(module, "mask", None)
        if not (isinstance(weight, Tensor) and isinstance(mask, Tensor) and weight.dim() == 2
                and weight.shape == mask.shape and weight.shape[0] == weight.shape[1]):
            raise ValueError("module must hold a square dense `weight` and a `mask` of its "
                             "shape, as seed 002's WSMultiModalFusion")
        n_modalities = getattr(module, "n_modalities", None)
        features = getattr(module, "features_per_modality", None)
        if not (isinstance(n_modalities, int) and isinstance(features, int) and
                n_modalities * features == weight.shape[0]):
            raise ValueError("module's n_modalities * features_per_modality must equal its "
                             f"weight's size {weight.shape[0]}")
        layout = SparseLayout.from_mask(mask != 0)
        new = cls.__new__(cls)
        _CompressedLinear.__init__(new, layout, bias=False, device=weight.device,
                                   dtype=weight.dtype)
        new.n_modalities, new.features_per_modality = n_modalities, features
        new.k = new.beta = new.seed = None
        with torch.no_grad():
            new.weight.copy_(_kept_values(weight.detach(), new.layout))
        new.weight.requires_grad_(weight.requires_grad)
        return new

    def forward(self, features: list[Tensor]) -> Tensor:
        """``features``: ``n_modalities`` tensors ``(..., features_per_modality)`` (a list,
        or in eager mode a tuple) -> ``(..., n_modalities * features_per_modality)``."""
        if torch.jit.is_scripting():
            if len(features) != self.n_modalities:
                raise ValueError(f"features must be a list of {self.n_modalities} tensors, "
                                 f"got {len(features)}")
        elif not isinstance(features, (list, tuple)) or len(features) != self.n_modalities:
            raise ValueError(f"features must be a list of {self.n_modalities} tensors, got "
                             f"{type(features).__name__} of length "
                             f"{len(features) if isinstance(features, (list, tuple)) else '-'}")
        # Widths that only sum to the total would mix modalities silently after the cat.
        if torch.jit.is_scripting():
            for index, feature in enumerate(features):
                if feature.dim() == 0 or feature.size(-1) != self.features_per_modality:
                    raise ValueError(f"features[{index}] must be a tensor (..., "
                                     f"features_per_modality={self.features_per_modality})")
        else:
            self._check_widths(features)
        return self._sparse_linear(torch.cat(features, dim=-1))

    @torch.jit.unused
    def _check_widths(self, features: list[Tensor] | tuple[Tensor, ...]) -> None:
        width = self.features_per_modality
        try:
            for feature in features:
                if feature.size(-1) != width:
                    self._raise_feature_error(features)
        except (AttributeError, IndexError, TypeError):  # not a tensor, or 0-d
            self._raise_feature_error(features)

    @torch.jit.unused
    def _raise_feature_error(self, features: list[Tensor] | tuple[Tensor, ...]) -> None:
        width = self.features_per_modality
        for index, feature in enumerate(features):
            if not isinstance(feature, Tensor) or feature.dim() == 0 or (
                    feature.size(-1) != width):
                shape = tuple(feature.shape) if isinstance(feature, Tensor) else None
                raise ValueError(f"features[{index}] must be a tensor (..., "
                                 f"features_per_modality={width}), got "
                                 f"{shape if shape is not None else type(feature).__name__}")

    @property
    def mask(self) -> Tensor:
        """float32 ``(n, n)`` 0/1 connectivity, equal to the seed module's ``mask``."""
        return self.layout.to_dense().to(torch.float32)

    def get_sparsity(self) -> float:
        """Fraction of zero entries of the mask, computed as the seed does (a float32
        mean), so the two modules report the same number."""
        mask = self.mask
        return 1 - (mask.sum() / mask.numel()).item()

    def dense_state_dict(self) -> dict[str, Tensor]:
        """``{"weight", "mask"}`` dense, loadable by seed 002's ``WSMultiModalFusion``."""
        return {"weight": self.to_dense_weight().detach().clone(), "mask": self.mask}

    def extra_repr(self) -> str:
        return (f"n_modalities={self.n_modalities}, "
                f"features_per_modality={self.features_per_modality}, k={self.k}, "
                f"beta={self.beta}, seed={self.seed}, nnz={self.nnz}, "
                f"sparsity={self.get_sparsity():.4f}")
