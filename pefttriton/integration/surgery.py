"""The one place that rewires models: find targets, wrap a layer in an adapter layer, undo it.

:func:`inject`, :func:`~pefttriton.load_adapter` and the PEFT import all go through :func:`wrap`
(accept an ``nn.Linear`` or GPT-2's ``Conv1D``, build the registered adapter layer around it,
copy tensors in, replace it in the model) and :func:`unwrap` (merge if asked, put the plain layer
back), and share what trains through :func:`freeze_all_but_adapters`.

GPT-2's ``Conv1D`` stores its weight as (in_features, out_features) (PEFT's ``fan_in_fan_out``).
Adapter layers take an ``nn.Linear``, so :func:`wrap` builds one whose weight is a contiguous copy
of ``conv.weight.T`` (the engine then reads it row-major like any other layer) and builds the
adapter layer with ``fan_in_fan_out=True``; :func:`unwrap` turns it back into a ``Conv1D``. The copy
is transient: the ``Conv1D`` it came from is dropped, so the model keeps one copy of the weight.

Name matching follows PEFT: ``target_modules`` as a list names modules whose full name equals an
entry or ends with ``"." + entry``; as a string it is a regular expression the full name must
match (``re.fullmatch``); ``exclude_modules`` removes matches the same way.
"""

from __future__ import annotations

import re
import sys
import warnings

import torch
from torch import nn

from pefttriton.adapters.adapter_layer import AdapterLayer
from pefttriton.adapters.config import AdapterConfig
from pefttriton.adapters.registry import get_adapter, layer_classes
from pefttriton.adapters.vera import VeRAProjections

# ----------------------------------------------------------------------------- GPT-2's Conv1D


def _conv1d_class() -> type | None:
    """transformers' ``Conv1D`` if transformers is loaded, else None.

    A model holding a ``Conv1D`` has imported ``transformers.pytorch_utils`` already, so looking it
    up in ``sys.modules`` finds it without making ``import pefttriton`` pay the ~1.4 s that importing
    transformers costs.
    """
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    """True for GPT-2's ``transformers.pytorch_utils.Conv1D`` (weight stored (in, out))."""
    cls = _conv1d_class()
    return cls is not None and isinstance(module, cls)


def linear_from_conv1d(conv: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing what GPT-2's ``Conv1D`` computes: weight = ``conv.weight.T`` (a contiguous copy)."""
    in_features, out_features = conv.weight.shape
    with torch.device("meta"):  # no allocation or random init: both tensors are replaced below
        linear = nn.Linear(in_features, out_features, bias=conv.bias is not None)
    linear.weight = nn.Parameter(conv.weight.detach().T.contiguous(), requires_grad=False)
    if conv.bias is not None:
        linear.bias = nn.Parameter(conv.bias.detach(), requires_grad=False)
    return linear


def conv1d_from_linear(linear: nn.Linear) -> nn.Module:
    """The inverse of :func:`linear_from_conv1d`: a ``Conv1D`` holding ``linear.weight.T``."""
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):  # no allocation or random init: both tensors are replaced below
        conv = Conv1D(linear.out_features, linear.in_features)
    weight = linear.weight
    conv.weight = nn.Parameter(weight.detach().T.contiguous(), requires_grad=weight.requires_grad)
    bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features, dtype=weight.dtype, device=weight.device)
    conv.bias = nn.Parameter(bias.detach(), requires_grad=bool(linear.bias is not None and linear.bias.requires_grad))
    return conv


def as_linear(module: nn.Module, name: str) -> tuple[nn.Linear, bool]:
    """``(nn.Linear to wrap, fan_in_fan_out)`` for the module called ``name``: the module itself,
    or a converted copy of a ``Conv1D``; TypeError naming ``name`` for anything else."""
    if is_conv1d(module):
        return linear_from_conv1d(module), True
    if isinstance(module, nn.Linear):
        return module, False
    raise TypeError(
        f"{name!r} is a {type(module).__name__}; only torch.nn.Linear and transformers' Conv1D can be adapted "
        "(name the linear layers inside it instead)"
    )


def meta_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` on the meta device shaped like ``module`` (an ``nn.Linear`` or a ``Conv1D``),
    as :func:`wrap` would wrap it: for checking what a fused layer over ``module`` would hold without
    touching it (building a fused layer freezes its base layer) or allocating anything."""
    weight = module.weight
    in_features, out_features = weight.shape if is_conv1d(module) else reversed(weight.shape)
    return nn.Linear(in_features, out_features, bias=module.bias is not None, device="meta", dtype=weight.dtype)


def meta_twin(projections: VeRAProjections, dtype: torch.dtype | None = None) -> VeRAProjections:
    """A meta-device stand-in for shared VeRA ``projections``, in ``dtype`` (theirs when None): same
    r, sizes and seed, nothing drawn; what a VeRA layer built over :func:`meta_linear` takes."""
    dtype = projections.vera_A.dtype if dtype is None else dtype
    twin = VeRAProjections(projections.r, 0, 0, seed=projections.seed, dtype=dtype, device="meta")
    twin.vera_A = torch.empty(projections.vera_A.shape, dtype=dtype, device="meta")
    twin.vera_B = torch.empty(projections.vera_B.shape, dtype=dtype, device="meta")
    return twin


# ------------------------------------------------------------------------------ finding modules


def name_matches(patterns: list[str] | str, name: str) -> bool:
    """PEFT's rule for one pattern list or regex (see the module docstring)."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def matches(config: AdapterConfig, name: str) -> bool:
    """Whether the module called ``name`` is targeted by ``config``; ``exclude_modules`` wins."""
    if config.exclude_modules and name_matches(config.exclude_modules, name):
        return False
    return name_matches(config.target_modules, name)


def has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """``(name, layer)`` of every adapter layer of ``model``, in ``named_modules`` order."""
    classes = layer_classes()
    return [(name, m) for name, m in model.named_modules() if isinstance(m, classes)]


def find_targets(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module of ``model`` that ``config`` would adapt.

    Raises:
        ValueError: nothing matches, or a match is already an adapter layer.
        TypeError: a match is neither ``nn.Linear`` nor GPT-2's ``Conv1D``.
    """
    classes = layer_classes()
    targets, inside_fused = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside_fused):
            continue  # the base_layer of an adapter layer
        if isinstance(module, classes):
            inside_fused.append(name)
            if matches(config, name):
                raise ValueError(f"module {name!r} already holds a {type(module).__name__}; merge_and_unload it first")
            continue
        if not name or not matches(config, name):
            continue
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            as_linear(module, f"target_modules matched {name}")  # raises the TypeError
        targets.append((name, module))
    if not targets:
        raise ValueError(f"target_modules={config.target_modules!r} matched no nn.Linear or Conv1D layer of the model")
    return targets


# ------------------------------------------------------------------------------ rewiring


def build_layer(
    adapter_type: str, base_layer: nn.Linear, r: int, kwargs: dict | None = None, *, fan_in_fan_out: bool = False
) -> AdapterLayer:
    """The registered layer of ``adapter_type`` around ``base_layer`` (which it freezes)."""
    return get_adapter(adapter_type).layer_class(base_layer, r, fan_in_fan_out=fan_in_fan_out, **(kwargs or {}))


def check_tensors(targets: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], name: str) -> None:
    """Every one of ``tensors`` has a same-named tensor of its shape in ``targets`` (which may lie
    on the meta device); else ValueError naming the module ``name`` and the tensor."""
    for key, value in tensors.items():
        if key not in targets:
            raise ValueError(f"{name}: the source holds {key!r}, which the module does not have ({sorted(targets)})")
        if tuple(value.shape) != tuple(targets[key].shape):
            raise ValueError(f"{name}.{key}: expected shape {tuple(targets[key].shape)}, got {tuple(value.shape)}")


def copy_tensors(targets: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], name: str) -> None:
    """Copy ``tensors`` into the same-named ``targets`` (parameters, or a ``state_dict()``'s
    tensors, which share their storage), every name and shape checked before anything is written."""
    check_tensors(targets, tensors, name)
    with torch.no_grad():
        for key, value in tensors.items():
            targets[key].copy_(value)


def tied_parameter_names(model: nn.Module, param: nn.Parameter, inside: str) -> list[str]:
    """Names under which ``model`` holds ``param`` outside the module called ``inside``."""
    return [
        pname
        for pname, p in model.named_parameters(remove_duplicate=False)
        if p is param and not pname.startswith(inside + ".")
    ]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """``model.<name> = new`` for a dotted ``name``.

    When ``new`` is an adapter layer whose base weight the model also holds elsewhere (a tied
    ``lm_head``), this warns, as PEFT does, and records the other names in
    ``new.tied_weight_names``, so that merging leaves them unchanged
    (:meth:`~pefttriton.adapters.adapter_layer.AdapterLayer.untie_before_merge`).
    """
    if name and isinstance(new, AdapterLayer):
        tied = tied_parameter_names(model, new.base_layer.weight, name)
        if tied:
            warnings.warn(
                f"{name}: the adapted weight is tied to {tied} (tie_word_embeddings); merging will untie them",
                stacklevel=3,
            )
            new.tied_weight_names = tied
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def wrap(
    model: nn.Module,
    name: str,
    adapter_type: str,
    r: int,
    kwargs: dict | None = None,
    *,
    tensors: dict[str, torch.Tensor] | None = None,
) -> AdapterLayer:
    """Replace the ``nn.Linear`` / ``Conv1D`` called ``name`` by an adapter layer around it.

    The new layer takes the replaced module's train/eval mode (a model in eval mode must not
    start dropping out) and, when given, ``tensors`` (``{parameter name: tensor}``, shapes
    checked before the model changes).
    """
    module = model.get_submodule(name)
    base, fan_in_fan_out = as_linear(module, name)
    layer = build_layer(adapter_type, base, r, kwargs, fan_in_fan_out=fan_in_fan_out)
    layer.train(module.training)
    if tensors:
        copy_tensors(layer.adapter_parameters(), tensors, name)
    replace_module(model, name, layer)
    return layer


def unwrap(model: nn.Module, name: str, *, merge: bool, safe_merge: bool = False) -> nn.Module:
    """Put the plain layer back in place of the adapter layer called ``name`` (``""``: the model
    itself is one; the plain layer is then only returned). With ``merge`` the adapter is merged
    first (a layer already merged is taken as it is); a ``fan_in_fan_out`` layer becomes a
    ``Conv1D`` again. Returns the plain layer."""
    layer = model.get_submodule(name)
    if merge and not layer.merged:
        layer.merge(safe_merge=safe_merge)
    plain = conv1d_from_linear(layer.base_layer) if layer.fan_in_fan_out else layer.base_layer
    if name:
        replace_module(model, name, plain)
    return plain


# ------------------------------------------------------------------------------ what trains

# Attribute of the root module listing the full names of its modules_to_save (PEFT's term): the
# modules that train in full beside the adapters. Kept on the model so that a later inject or load
# does not freeze them again, and so that export and save know them.
_MODULES_TO_SAVE_ATTR = "_pefttriton_modules_to_save"


def modules_to_save(model: nn.Module) -> list[str]:
    """Full names of the modules of ``model`` that train in full beside the adapters."""
    return list(getattr(model, _MODULES_TO_SAVE_ATTR, ()))


def add_modules_to_save(model: nn.Module, names: list[str]) -> None:
    """Record ``names`` (full module names of ``model``) as modules that train in full."""
    for name in names:
        model.get_submodule(name)  # raises AttributeError for a name the model does not have
    known = modules_to_save(model)
    setattr(model, _MODULES_TO_SAVE_ATTR, known + [name for name in names if name not in known])


def forget_modules_to_save(model: nn.Module) -> None:
    """Drop the record (the modules keep their weights)."""
    model.__dict__.pop(_MODULES_TO_SAVE_ATTR, None)


def find_modules_to_save(model: nn.Module, patterns: list[str]) -> list[str]:
    """Full names of the modules that ``patterns`` (PEFT's list rule) names.

    Raises:
        ValueError: a pattern matches no module, or a match is or lies inside an adapter layer.
    """
    fused = [name for name, _ in adapter_layers(model)]
    found = []
    for pattern in patterns:
        hits = [name for name, _ in model.named_modules() if name and name_matches([pattern], name)]
        if not hits:
            raise ValueError(f"modules_to_save entry {pattern!r} matches no module of the model")
        for name in hits:
            if any(name == f or name.startswith(f + ".") or f.startswith(name + ".") for f in fused):
                raise ValueError(f"modules_to_save entry {pattern!r} matches {name!r}, which holds or is an adapter layer")
            if name not in found:
                found.append(name)
    return found


def freeze_all_but_adapters(model: nn.Module) -> None:
    """``requires_grad`` True exactly for the adapter parameters of the model's adapter layers
    and every parameter of its recorded modules to save (:func:`modules_to_save`)."""
    keep = {id(p) for _, layer in adapter_layers(model) for p in layer.adapter_parameters().values()}
    for name in modules_to_save(model):
        keep.update(id(p) for p in model.get_submodule(name).parameters())
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
