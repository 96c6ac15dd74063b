"""Put fused adapter layers into an existing model, take them out again, count what trains.

:func:`inject` replaces every ``nn.Linear`` (or GPT-2's ``transformers.pytorch_utils.Conv1D``)
whose name matches ``config.target_modules`` by the fused module of the config's adapter, in
place, PEFT style::

    model = LlamaForCausalLM(LlamaConfig(...))
    pefttriton.inject(model, VeRAConfig(r=256, target_modules=["q_proj", "v_proj"]))
    print(pefttriton.trainable_parameter_summary(model))
    ...train...
    pefttriton.merge_and_unload(model)  # plain nn.Linear / Conv1D layers again, adapter folded in

GPT-2's ``Conv1D`` stores its weight as (in_features, out_features) (PEFT's ``fan_in_fan_out``).
The fused modules take an ``nn.Linear``, so :func:`inject` builds one whose weight is a contiguous
copy of ``conv.weight.T`` (the engine then reads it row-major like any other layer) and marks the
fused module ``fan_in_fan_out = True``; :func:`merge_and_unload` turns it back into a ``Conv1D``
holding ``(W0 + delta_weight()).T``. The copy is transient during injection: the ``Conv1D`` it came
from is dropped, so the model keeps one copy of the weight.
"""

from __future__ import annotations

import re
import sys
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from pefttriton.config import DeepLoRAConfig, LoRAConfig, LoRMAConfig, VeRAConfig, _AdapterConfig
from pefttriton.vera import FusedVeRALinear, VeRAProjections



def _conv1d_class() -> type | None:
    """transformers' ``Conv1D`` if transformers is loaded, else None.

    A model holding a ``Conv1D`` has imported ``transformers.pytorch_utils`` already, so looking it
    up in ``sys.modules`` finds it without making ``import pefttriton`` pay the ~1.4 s that importing
    transformers costs.
    """
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


# ------------------------------------------------------------------------------ adapter registry


def fused_layer_classes() -> dict[str, type[nn.Module]]:
    """``adapter_type`` -> fused module class, for every adapter module importable now."""
    classes: dict[str, type[nn.Module]] = {"vera": FusedVeRALinear}
    try:
        from pefttriton.lora import FusedLoRALinear

        classes["lora"] = FusedLoRALinear
    except ImportError:  # pragma: no cover - adapter module not present in this checkout
        pass
    try:
        from pefttriton.deep_lora import FusedDeepLoRALinear

        classes["deep_lora"] = FusedDeepLoRALinear
    except ImportError:  # pragma: no cover
        pass
    try:
        from pefttriton.lorma import FusedLoRMALinear

        classes["lorma"] = FusedLoRMALinear
    except ImportError:  # pragma: no cover
        pass
    return classes


def adapter_type_of(module: nn.Module) -> str | None:
    """``"vera"``, ``"lora"``, ``"deep_lora"``, ``"lorma"`` for a fused layer, else None."""
    for name, cls in fused_layer_classes().items():
        if isinstance(module, cls):
            return name
    return None


def fused_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every fused adapter layer of ``model``, in ``named_modules`` order."""
    classes = tuple(fused_layer_classes().values())
    return [(name, m) for name, m in model.named_modules() if isinstance(m, classes)]


def adapter_parameters(layer: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's own parameters of a fused layer (everything but its ``base_layer``'s)."""
    base_ids = {id(p) for p in layer.base_layer.parameters()}
    return {name: p for name, p in layer.named_parameters() if id(p) not in base_ids}


# ------------------------------------------------------------------------------ matching


def is_conv1d(module: nn.Module) -> bool:
    """True for GPT-2's ``transformers.pytorch_utils.Conv1D`` (weight stored (in, out))."""
    cls = _conv1d_class()
    return cls is not None and isinstance(module, cls)


def _name_matches(patterns: list[str] | str, name: str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def matches(config: _AdapterConfig, name: str) -> bool:
    """Whether the module called ``name`` is targeted by ``config``, with PEFT's rules.

    ``target_modules`` as a list: ``name`` equals an entry or ends with ``"." + entry``; as a
    string: ``re.fullmatch(target_modules, name)``. ``exclude_modules`` the same way, and wins.
    """
    if config.exclude_modules and _name_matches(config.exclude_modules, name):
        return False
    return _name_matches(config.target_modules, name)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


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


def find_targets(model: nn.Module, config: _AdapterConfig) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module of ``model`` that ``config`` would adapt.

    Raises:
        ValueError: nothing matches, or a match is already a fused adapter layer.
        TypeError: a match is neither ``nn.Linear`` nor GPT-2's ``Conv1D``.
    """
    classes = tuple(fused_layer_classes().values())
    targets, inside_fused = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside_fused):
            continue  # the base_layer of an already fused layer
        if isinstance(module, classes):
            inside_fused.append(name)
            if matches(config, name):
                raise ValueError(f"module {name!r} already holds a {type(module).__name__}; merge_and_unload it first")
            continue
        if not name or not matches(config, name):
            continue
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise TypeError(
                f"target_modules matched {name!r}, a {type(module).__name__}; only torch.nn.Linear and "
                "transformers' Conv1D can be adapted (name the linear layers inside it instead)"
            )
        targets.append((name, module))
    if not targets:
        raise ValueError(f"target_modules={config.target_modules!r} matched no nn.Linear or Conv1D layer of the model")
    return targets


# ------------------------------------------------------------------------------ building layers


def build_layer(
    adapter_type: str,
    base_layer: nn.Linear,
    r: int,
    kwargs: dict | None = None,
    projections: VeRAProjections | None = None,
) -> nn.Module:
    """The fused layer of ``adapter_type`` around ``base_layer`` (projections only for VeRA)."""
    classes = fused_layer_classes()
    if adapter_type not in classes:
        raise ValueError(
            f"adapter type {adapter_type!r} is not available; importable fused layers: {sorted(classes)}"
        )
    kwargs = dict(kwargs or {})
    if adapter_type == "vera":
        kwargs["projections"] = projections
        if projections is not None:
            kwargs["projection_seed"] = projections.seed
    return classes[adapter_type](base_layer, r, **kwargs)


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
    ``new.tied_weight_names``, so that merging leaves them unchanged (see
    :func:`pefttriton.merging.untie_before_merge`).
    """
    base = getattr(new, "base_layer", None)
    if name and base is not None and isinstance(new, tuple(fused_layer_classes().values())):
        tied = tied_parameter_names(model, base.weight, name)
        if tied:
            warnings.warn(
                f"{name}: the adapted weight is tied to {tied} (tie_word_embeddings); merging will untie them",
                stacklevel=3,
            )
            new.tied_weight_names = tied
    parent, child = _parent(model, name)
    setattr(parent, child, new)


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


def find_modules_to_save(model: nn.Module, patterns: list[str]) -> list[str]:
    """Full names of the modules that ``patterns`` (PEFT list rule, see :func:`matches`) names.

    Raises:
        ValueError: a pattern matches no module, or a match is or lies inside a fused adapter layer.
    """
    classes = tuple(fused_layer_classes().values())
    fused = [name for name, m in model.named_modules() if isinstance(m, classes)]
    found = []
    for pattern in patterns:
        hits = [name for name, _ in model.named_modules() if name and _name_matches([pattern], name)]
        if not hits:
            raise ValueError(f"modules_to_save entry {pattern!r} matches no module of the model")
        for name in hits:
            if any(name == f or name.startswith(f + ".") or f.startswith(name + ".") for f in fused):
                raise ValueError(f"modules_to_save entry {pattern!r} matches {name!r}, which holds or is an adapter layer")
            if name not in found:
                found.append(name)
    return found


def freeze_all_but_adapters(model: nn.Module) -> None:
    """``requires_grad`` True exactly for the adapter parameters of the model's fused layers and
    every parameter of its recorded modules to save (:func:`modules_to_save`)."""
    keep = {id(p) for _, layer in fused_layers(model) for p in adapter_parameters(layer).values()}
    for name in modules_to_save(model):
        keep.update(id(p) for p in model.get_submodule(name).parameters())
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def inject(model: nn.Module, config: _AdapterConfig) -> nn.Module:
    """Replace the layers ``config.target_modules`` names by fused adapter layers, in place.

    * Matching follows PEFT (see :func:`matches`); a match must be an ``nn.Linear`` or GPT-2's
      ``Conv1D`` (converted, see the module docstring).
    * VeRA: one :class:`VeRAProjections` of rank ``config.r`` sized to the largest in- and
      out-features among the matched layers (PEFT's ``_find_dim``), drawn from
      ``config.projection_seed`` exactly as PEFT draws them, shared by every new layer.
    * Afterwards every parameter of the model is frozen except the adapters' own and those of
      the modules named by ``config.modules_to_save`` (of this and of any earlier :func:`inject`),
      like PEFT. Those modules train in place (PEFT trains a copy and keeps the original for
      ``disable_adapter``, which pefttriton does not have).

    Args:
        model: any ``nn.Module`` (a transformers model built from a config, a plain stack...).
        config: a :class:`VeRAConfig`, :class:`LoRAConfig`, :class:`DeepLoRAConfig` or :class:`LoRMAConfig`.

    Returns:
        ``model`` itself.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, (VeRAConfig, LoRAConfig, DeepLoRAConfig, LoRMAConfig)):
        raise TypeError(
            f"config must be a VeRAConfig, LoRAConfig, DeepLoRAConfig or LoRMAConfig, got {type(config).__name__}"
        )
    if config.adapter_type not in fused_layer_classes():
        raise ValueError(f"the {type(config).__name__} adapter module is not available in this installation")
    targets = find_targets(model, config)
    save_names = find_modules_to_save(model, config.modules_to_save) if config.modules_to_save else []
    clash = [name for name in save_names for t, _ in targets if t == name or t.startswith(name + ".")]
    if clash:
        raise ValueError(f"modules_to_save {clash[:4]} hold layers that target_modules adapts; a module is one or the other")
    bases = [(name, linear_from_conv1d(m) if is_conv1d(m) else m, is_conv1d(m)) for name, m in targets]

    projections = None
    if isinstance(config, VeRAConfig):
        weights = {(lin.weight.dtype, lin.weight.device) for _, lin, _ in bases}
        if len(weights) != 1:
            raise ValueError(f"VeRA layers share one projection pair, so targets must share dtype and device; got {weights}")
        dtype, device = weights.pop()
        projections = VeRAProjections(
            config.r,
            max(lin.in_features for _, lin, _ in bases),
            max(lin.out_features for _, lin, _ in bases),
            seed=config.projection_seed,
            dtype=dtype,
            device=device,
        )
    for (name, base, conv), (_, original) in zip(bases, targets):
        layer = build_layer(config.adapter_type, base, config.r, config.layer_kwargs(), projections)
        layer.fan_in_fan_out = conv
        layer.train(original.training)  # a model in eval mode gets layers in eval mode (no dropout)
        replace_module(model, name, layer)
    if save_names:
        add_modules_to_save(model, save_names)
    freeze_all_but_adapters(model)
    return model


def merge_and_unload(model: nn.Module, *, safe_merge: bool = False) -> nn.Module:
    """Fold every fused adapter into its base weight and put the plain layer back, in place.

    Each fused layer is merged (``W0 + delta_weight()``, in fp32 and cast to the weight's dtype;
    a layer already merged is taken as it is) and replaced by its ``base_layer``, or by a
    ``Conv1D`` holding the transposed merged weight where the layer came from one. Returns
    ``model``, whose forward then needs no pefttriton code.

    Args:
        safe_merge: check every merged weight for NaN/Inf before changing anything and raise
            ``ValueError`` naming the layer (PEFT's ``safe_merge``); the model is then unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = fused_layers(model)
    if safe_merge:
        for name, layer in layers:
            if not layer.merged and not torch.isfinite(layer.delta_weight()).all():
                raise ValueError(f"layer {name!r}: NaN or Inf in the adapter; nothing was merged")
    # Innermost first is not an issue: a fused layer's base_layer is always a plain nn.Linear.
    for name, layer in layers:
        if not layer.merged:
            layer.merge(safe_merge=safe_merge)
        base = layer.base_layer
        plain = conv1d_from_linear(base) if getattr(layer, "fan_in_fan_out", False) else base
        if name:
            replace_module(model, name, plain)
        else:
            return plain  # the model was a single fused layer
    model.__dict__.pop(_MODULES_TO_SAVE_ATTR, None)  # its modules keep their trained weights
    return model


# ------------------------------------------------------------------------------ summary


@dataclass(frozen=True)
class ParameterSummary:
    """What trains in a model with fused adapters.

    Attributes:
        adapter: trainable adapter parameters (VeRA: ``lambda_d`` + ``lambda_b`` of each layer;
            LoRA: ``lora_A`` + ``lora_B``; ...). This is the number the VeRA paper reports.
        other_trainable: trainable parameters outside adapters (a head unfrozen by hand, say).
        total: every parameter of the model, frozen or not, each shared tensor once.
        projection_entries: entries of shared VeRA projections (frozen buffers regenerated from
            a seed; not parameters, not in checkpoints).
        per_layer: adapter parameters per fused layer name.
    """

    adapter: int
    other_trainable: int
    total: int
    projection_entries: int
    per_layer: dict[str, int] = field(default_factory=dict)

    @property
    def trainable(self) -> int:
        return self.adapter + self.other_trainable

    def __str__(self) -> str:
        pct = 100.0 * self.trainable / self.total if self.total else 0.0
        return (
            f"trainable params: {self.trainable:,} (adapters {self.adapter:,}, other {self.other_trainable:,}) "
            f"|| all params: {self.total:,} || trainable%: {pct:.4f} "
            f"|| frozen shared VeRA projection entries: {self.projection_entries:,}"
        )


def trainable_parameter_summary(model: nn.Module) -> ParameterSummary:
    """Count adapter, other trainable and all parameters of ``model`` (see :class:`ParameterSummary`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    per_layer, adapter_ids = {}, set()
    for name, layer in fused_layers(model):
        params = [p for p in adapter_parameters(layer).values() if p.requires_grad]
        per_layer[name] = sum(p.numel() for p in params)
        adapter_ids.update(id(p) for p in params)
    adapter = other = total = 0
    for p in model.parameters():  # deduplicated by nn.Module
        total += p.numel()
        if p.requires_grad:
            if id(p) in adapter_ids:
                adapter += p.numel()
            else:
                other += p.numel()
    projections = {id(m): m for m in model.modules() if isinstance(m, VeRAProjections)}
    entries = sum(m.vera_A.numel() + m.vera_B.numel() for m in projections.values())
    return ParameterSummary(adapter, other, total, entries, per_layer)


def print_trainable_parameters(model: nn.Module) -> None:
    """Print :func:`trainable_parameter_summary` (PEFT's ``print_trainable_parameters``)."""
    print(trainable_parameter_summary(model))


__all__ = [
    "add_modules_to_save",
    "adapter_parameters",
    "adapter_type_of",
    "find_targets",
    "fused_layer_classes",
    "fused_layers",
    "inject",
    "matches",
    "merge_and_unload",
    "modules_to_save",
    "ParameterSummary",
    "print_trainable_parameters",
    "trainable_parameter_summary",
]
