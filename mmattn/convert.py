"""One-call model conversion: swap attention modules for mmattn's, and back.

``convert(model)`` walks the module tree and replaces, in place,

* every ``torch.nn.MultiheadAttention`` (the exact class; user subclasses keep their
  own code and are reported as skipped) by :class:`mmattn.nn.MultiheadAttention`;
* seed 000's ``CrossModalAttention`` by :class:`mmattn.nn.CrossModalAttention`;
* seed 004's ``SparseAttention`` by :class:`mmattn.nn.BlockSparseAttention`;
* seed 002's ``WSMultiModalFusion`` by ``mmattn.nn.WSMultiModalFusion`` when this
  build has it and it offers ``from_seed(module)`` (reverted through its
  ``dense_state_dict()``).

Seed modules are recognised by structure (child and attribute names and types, and
the names of ``forward``'s arguments), not by class identity, since every user has
their own copy of the tutorial code.

The new module *adopts* the old one's parameters, buffers and submodules (the same
objects, not copies): device, dtype, ``requires_grad``, tied weights, optimizer
state and hooks on the submodules all carry over, and converting after building an
optimizer keeps training the same tensors. The new module is built on the meta
device first, so conversion allocates nothing and draws no random numbers. Forward
hooks and the training flag of a swapped module move to its replacement.

``revert(model)`` swaps mmattn modules back: :class:`mmattn.nn.MultiheadAttention`
to ``torch.nn.MultiheadAttention``, and converted seed modules to their original
class (recorded at conversion).

``nn.TransformerEncoderLayer`` and friends keep working because
:class:`mmattn.nn.MultiheadAttention` subclasses ``torch.nn.MultiheadAttention``: their
inference fast path (eval mode, no autograd) reads the same weights and runs
PyTorch's fused kernel, every other call runs mmattn. The report names those layers
(``not_mmattn``): PyTorch's fused layer kernel is the faster one at small and mid
sizes, and ``torch.backends.mha.set_fastpath_enabled(False)`` hands them to mmattn.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mmattn import nn as mnn

__all__ = ["ConversionReport", "Swap", "convert", "revert"]

# Module internals that move with a swap (hook registries; handles keep working
# because they refer to these very dicts).
_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)
_ORIGIN_ATTR = "_mmattn_original"


@dataclass(frozen=True)
class Swap:
    """One replaced module: where it sits, and its class before and after."""

    path: str
    from_type: str
    to_type: str


@dataclass
class ConversionReport:
    """What :func:`convert` or :func:`revert` did.

    Attributes:
        swapped: the replaced modules, in tree order.
        skipped: ``(path, type, reason)`` of modules that look convertible but were kept.
        not_mmattn: ``(path, when, why)`` of converted modules that some calls still run
            on PyTorch's kernels: the ``nn.TransformerEncoderLayer`` s whose inference
            fast path reads the new module's weights without calling it.
        model: the converted model: the argument itself, or its copy with
            ``inplace=False``, or the replacement when the model itself was swapped.
    """

    action: str
    model: nn.Module
    swapped: list[Swap] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    not_mmattn: list[tuple[str, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.swapped)

    def __iter__(self) -> Iterator[Swap]:
        return iter(self.swapped)

    def __str__(self) -> str:
        lines = [f"mmattn.{self.action}: {len(self.swapped)} module(s) swapped"]
        if self.swapped:
            width = max(len(s.path) for s in self.swapped)
            lines += [f"  {s.path.ljust(width)}  {s.from_type} -> {s.to_type}"
                      for s in self.swapped]
        for path, type_name, reason in self.skipped:
            lines.append(f"  kept {path} ({type_name}): {reason}")
        for path, when, why in self.not_mmattn:
            lines.append(f"  not mmattn {path} {when}: {why}")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Origin:
    """The class a converted module came from, and its plain attributes."""

    cls: type
    attributes: dict[str, Any]


def _type_name(cls: type) -> str:
    module = cls.__module__
    for prefix, public in (("torch.nn.modules.", "torch.nn"), ("mmattn.nn.", "mmattn.nn")):
        if module.startswith(prefix):
            return f"{public}.{cls.__qualname__}"
    return f"{module}.{cls.__qualname__}"


def _forward_arguments(module: nn.Module) -> list[str]:
    try:
        parameters = inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return []
    return [name for name in parameters if name != "self"]


def _plain_attributes(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"}


def _adopt(new: nn.Module, old: nn.Module, names: tuple[str, ...]) -> nn.Module:
    """Move ``old``'s members ``names`` (parameters, buffers, submodules or None),
    hooks and training flag onto ``new``; check nothing of ``new`` is left on meta."""
    for name in names:
        setattr(new, name, getattr(old, name))
    for name in _HOOK_DICTS:
        if name in vars(old):
            vars(new)[name] = vars(old)[name]
    new.training = old.training
    if _has_meta_tensor(new) and not _has_meta_tensor(old):
        raise RuntimeError(f"mmattn.convert: the new {type(new).__name__} kept a meta tensor "
                           f"(a bug in mmattn)")
    return new


def _has_meta_tensor(module: nn.Module) -> bool:
    return any(t.is_meta for t in [*module.parameters(), *module.buffers()])


def _factory(module: nn.Module) -> dict[str, Any]:
    tensor = next(iter([*module.parameters(), *module.buffers()]), None)
    dtype = tensor.dtype if tensor is not None and tensor.is_floating_point() else None
    return {"device": "meta", "dtype": dtype}


# ---- torch.nn.MultiheadAttention <-> mmattn.nn.MultiheadAttention -----------------------

_MHA_MEMBERS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                "in_proj_bias", "bias_k", "bias_v", "out_proj")


def _rebuild_mha(old: nn.MultiheadAttention, cls: type[nn.MultiheadAttention]) -> nn.Module:
    new = cls(old.embed_dim, old.num_heads, dropout=old.dropout,
              bias=old.in_proj_bias is not None, add_bias_kv=old.bias_k is not None,
              add_zero_attn=old.add_zero_attn, kdim=old.kdim, vdim=old.vdim,
              batch_first=old.batch_first, **_factory(old))
    return _adopt(new, old, _MHA_MEMBERS)


# ---- seed 000 CrossModalAttention <-> mmattn.nn.CrossModalAttention ---------------------

_CROSS_MODAL_CHILDREN = ("q_proj", "k_proj", "v_proj", "out_proj", "dropout")


def _why_not_seed_cross_modal(module: nn.Module) -> str | None:
    """None when ``module`` has seed 000's CrossModalAttention structure, else why not."""
    if isinstance(module, mnn.CrossModalAttention):
        return "already mmattn"
    if tuple(name for name, _ in module.named_children()) != _CROSS_MODAL_CHILDREN:
        return "children differ"
    if _forward_arguments(module) != ["query", "key", "value", "mask"]:
        return "forward(query, key, value, mask) differs"
    projections = [getattr(module, n) for n in _CROSS_MODAL_CHILDREN[:4]]
    if not all(type(p) is nn.Linear for p in projections) or type(module.dropout) is not \
            nn.Dropout:
        return "child types differ"
    if module._parameters or module._buffers:
        return "has its own parameters or buffers"
    heads, head_dim, scale = (getattr(module, n, None) for n in ("num_heads", "head_dim", "scale"))
    if not (isinstance(heads, int) and isinstance(head_dim, int) and isinstance(scale, float)):
        return "num_heads/head_dim/scale differ"
    q, k, v, out = projections
    width = heads * head_dim
    if not (q.in_features == q.out_features == k.out_features == v.out_features ==
            out.in_features == out.out_features == width):
        return "projection sizes differ from num_heads * head_dim"
    if len({p.bias is None for p in projections}) != 1:
        return "some projections have a bias and some not"
    return None


def _seed_cross_modal_to_mmattn(old: nn.Module) -> nn.Module:
    new = mnn.CrossModalAttention(old.q_proj.in_features, old.k_proj.in_features,
                                  old.v_proj.in_features, old.num_heads, old.dropout.p,
                                  bias=old.q_proj.bias is not None, **_factory(old))
    new.scale = old.scale
    setattr(new, _ORIGIN_ATTR, _Origin(type(old), _plain_attributes(old)))
    return _adopt(new, old, _CROSS_MODAL_CHILDREN)


# ---- seed 004 SparseAttention <-> mmattn.nn.BlockSparseAttention -------------------------

def _why_not_seed_sparse(module: nn.Module) -> str | None:
    """None when ``module`` has seed 004's SparseAttention structure, else why not."""
    if type(module).__module__.startswith("mmattn."):
        return "already mmattn"
    if module._modules or module._parameters or module._buffers:
        return "has submodules, parameters or buffers"
    block_size, sparsity = getattr(module, "block_size", None), getattr(
        module, "sparsity_factor", None)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or \
            not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool):
        return "block_size/sparsity_factor differ"
    if not callable(getattr(module, "create_sparse_mask", None)) or \
            _forward_arguments(module) != ["Q", "K", "V"]:
        return "create_sparse_mask()/forward(Q, K, V) differ"
    return None


def _seed_sparse_to_mmattn(old: nn.Module) -> nn.Module:
    new = mnn.BlockSparseAttention(old.block_size, old.sparsity_factor)
    setattr(new, _ORIGIN_ATTR, _Origin(type(old), _plain_attributes(old)))
    return _adopt(new, old, ())


def _why_not_revert_sparse(module: nn.Module) -> str | None:
    reason = _why_not_revert_origin("BlockSparseAttention")(module)
    if reason is None and module.block_mask is not None:
        return "skip: has a fixed block_mask, which the original class cannot hold"
    return reason


# ---- seed 002 WSMultiModalFusion -> mmattn.nn.WSMultiModalFusion (when built) -----------

def _why_not_seed_ws_fusion(module: nn.Module) -> str | None:
    target = getattr(mnn, "WSMultiModalFusion", None)
    if type(module).__module__.startswith("mmattn.") or (
            target is not None and isinstance(module, target)):
        return "already mmattn"
    weight, mask = module._parameters.get("weight"), module._buffers.get("mask")
    if weight is None or mask is None or weight.dim() != 2 or weight.shape != mask.shape:
        return "weight/mask differ"
    if not all(isinstance(getattr(module, n, None), int)
               for n in ("n_modalities", "features_per_modality")):
        return "n_modalities/features_per_modality differ"
    if not callable(getattr(module, "get_sparsity", None)) or \
            _forward_arguments(module) != ["features"]:
        return "get_sparsity()/forward(features) differ"
    return None


def _ws_fusion_target() -> tuple[type | None, str]:
    target = getattr(mnn, "WSMultiModalFusion", None)
    if target is None:
        return None, "mmattn.nn.WSMultiModalFusion is not in this build"
    if not callable(getattr(target, "from_seed", None)):
        return None, "mmattn.nn.WSMultiModalFusion has no from_seed()"
    return target, ""


def _seed_ws_fusion_to_mmattn(old: nn.Module) -> nn.Module:
    target, _ = _ws_fusion_target()
    new = target.from_seed(old)
    setattr(new, _ORIGIN_ATTR, _Origin(type(old), _plain_attributes(old)))
    new.training = old.training
    return new


# ---- the walk ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Rule:
    """``why_not(module)`` is None when ``build(module)`` should replace it; a reason
    starting with "skip:" is reported, other reasons just mean "not this rule"."""

    why_not: Callable[[nn.Module], str | None]
    build: Callable[[nn.Module], nn.Module]


def _why_not_torch_mha(module: nn.Module) -> str | None:
    if type(module) is nn.MultiheadAttention:
        return None
    if isinstance(module, nn.MultiheadAttention) and not isinstance(
            module, mnn.MultiheadAttention):
        return "skip: a subclass of torch.nn.MultiheadAttention with its own code"
    return "not torch.nn.MultiheadAttention"


def _why_not_ws(module: nn.Module) -> str | None:
    reason = _why_not_seed_ws_fusion(module)
    if reason is not None:
        return reason
    target, why = _ws_fusion_target()
    return None if target is not None else f"skip: {why}"


def _convert_rules() -> list[_Rule]:
    return [
        _Rule(_why_not_torch_mha, lambda m: _rebuild_mha(m, mnn.MultiheadAttention)),
        _Rule(_why_not_seed_cross_modal, _seed_cross_modal_to_mmattn),
        _Rule(_why_not_seed_sparse, _seed_sparse_to_mmattn),
        _Rule(_why_not_ws, _seed_ws_fusion_to_mmattn),
    ]


def _rebuild_origin(module: nn.Module, member_names: tuple[str, ...]) -> nn.Module:
    origin: _Origin = getattr(module, _ORIGIN_ATTR)
    old = origin.cls.__new__(origin.cls)
    nn.Module.__init__(old)
    # the original's plain attributes, as the mmattn module has them now
    vars(old).update({name: getattr(module, name, value)
                      for name, value in origin.attributes.items()})
    return _adopt(old, module, member_names)


def _why_not_revert_mha(module: nn.Module) -> str | None:
    return None if type(module) is mnn.MultiheadAttention else "not mmattn MultiheadAttention"


def _why_not_revert_origin(cls_name: str) -> Callable[[nn.Module], str | None]:
    def why_not(module: nn.Module) -> str | None:
        target = getattr(mnn, cls_name, None)
        if target is None or type(module) is not target:
            return f"not mmattn {cls_name}"
        if not isinstance(getattr(module, _ORIGIN_ATTR, None), _Origin):
            return "skip: built as mmattn (no original class recorded by convert)"
        return None
    return why_not


def _revert_ws(module: nn.Module) -> nn.Module:
    """The seed's dense module again, from ``dense_state_dict()`` (new dense tensors: the
    compressed parameters have another shape)."""
    if not callable(getattr(module, "dense_state_dict", None)):
        raise TypeError("mmattn.nn.WSMultiModalFusion has no dense_state_dict(); cannot "
                        "revert it")
    origin: _Origin = getattr(module, _ORIGIN_ATTR)
    dense = module.dense_state_dict()
    old = origin.cls.__new__(origin.cls)
    nn.Module.__init__(old)
    vars(old).update({name: getattr(module, name, value)
                      for name, value in origin.attributes.items()})
    weight = next(module.parameters())
    old.weight = nn.Parameter(dense["weight"].to(weight.device, weight.dtype),
                              requires_grad=weight.requires_grad)
    old.register_buffer("mask", dense["mask"].to(weight.device))
    old.training = module.training
    return old


def _revert_rules() -> list[_Rule]:
    return [
        _Rule(_why_not_revert_mha, lambda m: _rebuild_mha(m, nn.MultiheadAttention)),
        _Rule(_why_not_revert_origin("CrossModalAttention"),
              lambda m: _rebuild_origin(m, _CROSS_MODAL_CHILDREN)),
        _Rule(_why_not_revert_sparse, lambda m: _rebuild_origin(m, ())),
        _Rule(_why_not_revert_origin("WSMultiModalFusion"), _revert_ws),
    ]


def _swap_tree(model: nn.Module, rules: list[_Rule], report: ConversionReport) -> nn.Module:
    """Replace matching modules below (and including) ``model``; returns the new root."""
    replaced: dict[int, nn.Module] = {}  # id(old) -> new, so shared modules stay shared

    def replacement(module: nn.Module, path: str) -> nn.Module | None:
        if id(module) in replaced:  # a shared module: the same replacement everywhere
            new = replaced[id(module)]
            report.swapped.append(Swap(path, _type_name(type(module)), _type_name(type(new))))
            return new
        for rule in rules:
            reason = rule.why_not(module)
            if reason is None:
                new = rule.build(module)
                replaced[id(module)] = new
                report.swapped.append(Swap(path or "<model>", _type_name(type(module)),
                                           _type_name(type(new))))
                return new
            if reason.startswith("skip:"):
                report.skipped.append((path or "<model>", _type_name(type(module)),
                                       reason[5:].strip()))
                return None
        return None

    def walk(parent: nn.Module, prefix: str) -> None:
        # _modules, not named_children(): the latter skips a module's second occurrence
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            path = f"{prefix}.{name}" if prefix else name
            new = replacement(child, path)
            if new is not None:
                setattr(parent, name, new)
            elif id(child) not in replaced:
                walk(child, path)

    root = replacement(model, "")
    if root is not None:
        return root
    walk(model, "")
    return model


_ENCODER_FAST_PATH = (
    "PyTorch's fused encoder-layer kernel (torch._transformer_encoder_layer_fwd) reads "
    "self_attn's weights and runs instead of mmattn; training and autograd run mmattn; "
    "torch.backends.mha.set_fastpath_enabled(False) makes inference run mmattn too")


def _encoder_fast_path_layers(model: nn.Module) -> list[tuple[str, str, str]]:
    """The ``nn.TransformerEncoderLayer`` s holding an mmattn MultiheadAttention whose
    configuration admits PyTorch's inference fast path (its static conditions; at run
    time it also needs eval mode, no autograd, 3-D input, no hooks, no autocast)."""
    found = []
    for path, layer in model.named_modules():
        attn = getattr(layer, "self_attn", None)
        if not (isinstance(layer, nn.TransformerEncoderLayer)
                and isinstance(attn, mnn.MultiheadAttention)):
            continue
        if (attn.batch_first and attn.in_proj_bias is not None and attn._qkv_same_embed_dim
                and getattr(layer, "activation_relu_or_gelu", False)
                and layer.norm1.eps == layer.norm2.eps and attn.num_heads % 2 == 0):
            found.append((path or "<model>", "in eval mode without autograd",
                          _ENCODER_FAST_PATH))
    return found


def convert(model: nn.Module, *, inplace: bool = True) -> ConversionReport:
    """Swap the attention modules of ``model`` for mmattn's (see the module docstring).

    Args:
        model: any ``nn.Module``.
        inplace: modify ``model`` (default); False converts a deep copy.

    Returns:
        A :class:`ConversionReport`; ``print(report)`` lists each swap as
        ``path  from-type -> to-type``, and the layers some of whose calls will not run
        mmattn, and why (``report.not_mmattn``). ``report.model`` is the converted model
        (the replacement itself when ``model`` is one attention module).
    """
    report = _swap_model("convert", model, inplace, _convert_rules())
    report.not_mmattn = _encoder_fast_path_layers(report.model)
    return report


def revert(model: nn.Module, *, inplace: bool = True) -> ConversionReport:
    """Swap mmattn modules back to the classes :func:`convert` replaced.

    :class:`mmattn.nn.MultiheadAttention` always reverts to ``torch.nn.MultiheadAttention``;
    other mmattn modules revert when :func:`convert` created them (it records the
    original class), and are reported as kept otherwise.
    """
    return _swap_model("revert", model, inplace, _revert_rules())


def _swap_model(kind: str, model: nn.Module, inplace: bool,
                rules: list[_Rule]) -> ConversionReport:
    """The body of :func:`convert` and :func:`revert`: ``rules`` decide each swap."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    target = model if inplace else copy.deepcopy(model)
    report = ConversionReport(kind, target)
    report.model = _swap_tree(target, rules, report)
    return report
