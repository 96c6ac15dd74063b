"""Put adapter layers into an existing model, take them out again, count what trains.

:func:`inject` replaces every ``nn.Linear`` (or GPT-2's ``transformers.pytorch_utils.Conv1D``)
whose name matches ``config.target_modules`` by the adapter layer of the config's adapter, in
place, PEFT style::

    model = LlamaForCausalLM(LlamaConfig(...))
    pefttriton.inject(model, VeRAConfig(r=256, target_modules=["q_proj", "v_proj"]))
    print(pefttriton.trainable_parameter_summary(model))
    ...train...
    pefttriton.merge_and_unload(model)  # plain nn.Linear / Conv1D layers again, adapter folded in

The rewiring itself (matching names, ``Conv1D``, tied weights, what trains) is
:mod:`pefttriton.integration.surgery`; which adapters exist is :mod:`pefttriton.adapters.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pefttriton.adapters.config import AdapterConfig
from pefttriton.adapters.registry import get_adapter
from pefttriton.integration.surgery import (
    adapter_layers,
    add_modules_to_save,
    find_modules_to_save,
    find_targets,
    forget_modules_to_save,
    freeze_all_but_adapters,
    unwrap,
    wrap,
)
from pefttriton.adapters.vera import VeRAProjections


def inject(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Replace the layers ``config.target_modules`` names by adapter layers, in place.

    * Matching follows PEFT (:func:`pefttriton.integration.surgery.matches`); a match must be an
      ``nn.Linear`` or GPT-2's ``Conv1D``.
    * Layers of one call share what the config builds once for all of them
      (``config.shared_layer_kwargs``): VeRA's projections, of rank ``config.r``, sized to the
      largest in- and out-features among the matched layers (PEFT's ``_find_dim``), drawn from
      ``config.projection_seed`` exactly as PEFT draws them.
    * Afterwards every parameter of the model is frozen except the adapters' own and those of
      the modules named by ``config.modules_to_save`` (of this and of any earlier :func:`inject`),
      like PEFT. Those modules train in place (PEFT trains a copy and keeps the original for
      ``disable_adapter``, which pefttriton does not have).

    Args:
        model: any ``nn.Module`` (a transformers model built from a config, a plain stack...).
        config: the config of a registered adapter (:class:`VeRAConfig`, :class:`LoRAConfig`,
            :class:`DeepLoRAConfig`, :class:`LoRMAConfig`, or one registered with
            :func:`pefttriton.register_adapter`).

    Returns:
        ``model`` itself.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an adapter config (VeRAConfig, LoRAConfig, ...), got {type(config).__name__}")
    get_adapter(config.adapter_type)  # registered, or a clear error
    targets = find_targets(model, config)
    save_names = find_modules_to_save(model, config.modules_to_save) if config.modules_to_save else []
    clash = [name for name in save_names for t, _ in targets if t == name or t.startswith(name + ".")]
    if clash:
        raise ValueError(f"modules_to_save {clash[:4]} hold layers that target_modules adapts; a module is one or the other")
    # (out_features, in_features) weights as the layers will see them (a Conv1D's transposed).
    weights = [m.weight if isinstance(m, nn.Linear) else m.weight.T for _, m in targets]
    kwargs = {**config.layer_kwargs(), **config.shared_layer_kwargs(weights)}
    for name, _ in targets:
        wrap(model, name, config.adapter_type, config.r, kwargs)
    if save_names:
        add_modules_to_save(model, save_names)
    freeze_all_but_adapters(model)
    return model


def merge_and_unload(model: nn.Module, *, safe_merge: bool = False) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layer back, in place.

    Each adapter layer is merged (``W0 + delta_weight()``, in fp32 and cast to the weight's
    dtype; a layer already merged is taken as it is) and replaced by its ``base_layer``, or by a
    ``Conv1D`` holding the transposed merged weight where the layer came from one. Returns
    ``model``, whose forward then needs no pefttriton code.

    Args:
        safe_merge: check every merged weight for NaN/Inf before changing anything and raise
            ``ValueError`` naming the layer (PEFT's ``safe_merge``); the model is then unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = adapter_layers(model)
    if safe_merge:
        for name, layer in layers:
            if not layer.merged and not torch.isfinite(layer.delta_weight()).all():
                raise ValueError(f"layer {name!r}: NaN or Inf in the adapter; nothing was merged")
    # Innermost first is not an issue: an adapter layer's base_layer is always a plain nn.Linear.
    for name, _ in layers:
        plain = unwrap(model, name, merge=True, safe_merge=safe_merge)
        if not name:
            return plain  # the model was a single adapter layer
    forget_modules_to_save(model)  # its modules keep their trained weights
    return model


# ------------------------------------------------------------------------------ summary


@dataclass(frozen=True)
class ParameterSummary:
    """What trains in a model with adapter layers.

    Attributes:
        adapter: trainable adapter parameters (VeRA: ``lambda_d`` + ``lambda_b`` of each layer;
            LoRA: ``lora_A`` + ``lora_B``; ...). This is the number the VeRA paper reports.
        other_trainable: trainable parameters outside adapters (a head unfrozen by hand, say).
        total: every parameter of the model, frozen or not, each shared tensor once.
        projection_entries: entries of shared VeRA projections (frozen buffers regenerated from
            a seed; not parameters, not in checkpoints).
        per_layer: adapter parameters per adapter layer name.
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
    for name, layer in adapter_layers(model):
        params = [p for p in layer.adapter_parameters().values() if p.requires_grad]
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


__all__ = ["ParameterSummary", "inject", "merge_and_unload", "print_trainable_parameters", "trainable_parameter_summary"]
