"""Save and load pefttriton adapters: one small safetensors file, bit-exact round trip.

:func:`save_adapter` writes

* every adapter parameter of every fused layer (VeRA ``lambda_d``/``lambda_b``, LoRA
  ``lora_A``/``lora_B``, Deep LoRA ``W1``/``W2``/``W3``, LoRMA ``lorma_A``/``lorma_B``) and every
  other parameter that trains (a head unfrozen by hand), under its name in
  ``model.named_parameters()``, in its own dtype;
* for VeRA, the seed and sizes of each shared projection pair instead of the pair itself
  (the projections are redrawn on load, bit-identically, by the same CPU generator). A pair that
  cannot be redrawn from its seed (loaded from a PEFT checkpoint made elsewhere, say) is stored;
* in the safetensors metadata (key ``"pefttriton"``, JSON): per fused layer its adapter type, rank,
  constructor arguments, merged flag and whether it came from GPT-2's ``Conv1D``, and which
  saved tensors train.

Frozen base weights are not saved: :func:`load_adapter` applies the file to a model built the same
way (same architecture, same base weights), injecting the fused layers itself where the model has
plain ``nn.Linear`` / ``Conv1D`` layers, or reusing fused layers already there.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from pefttriton.injection import (
    adapter_parameters,
    adapter_type_of,
    build_layer,
    fused_layers,
    is_conv1d,
    linear_from_conv1d,
    replace_module,
)
from pefttriton.vera import VeRAProjections

FORMAT_VERSION = 1
_META_KEY = "pefttriton"


def _layer_kwargs(adapter_type: str, layer: nn.Module) -> dict:
    """Constructor keyword arguments that rebuild ``layer`` (values are overwritten by the file)."""
    if adapter_type == "lora":
        return {"alpha": layer.alpha, "dropout": layer.dropout_p}
    if adapter_type == "deep_lora":
        return {"eps": layer.eps}
    if adapter_type == "lorma":
        return {"alpha": layer.alpha, "variant": layer.variant}
    return {}


def _redrawn_equal(projections: VeRAProjections) -> bool:
    """Whether ``projections`` are exactly what their seed draws (so the seed alone restores them)."""
    A, B = projections.vera_A, projections.vera_B
    redrawn = VeRAProjections(projections.r, A.shape[1], B.shape[0], seed=projections.seed, dtype=A.dtype)
    return torch.equal(A.cpu(), redrawn.vera_A) and torch.equal(B.cpu(), redrawn.vera_B)


def save_adapter(model: nn.Module, path: str | os.PathLike) -> dict[str, int]:
    """Write the adapters of ``model`` to the safetensors file ``path`` (see the module docstring).

    Returns:
        ``{"tensors": count, "bytes": tensor bytes}`` of what was written.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = fused_layers(model)
    if not layers:
        raise ValueError("model has no fused adapter layer to save")
    adapter_ids = {id(p) for _, layer in layers for p in adapter_parameters(layer).values()}
    tensors, trainable = {}, []
    for name, p in model.named_parameters():
        if id(p) in adapter_ids or p.requires_grad:
            tensors[name] = p.detach().contiguous().cpu()
            if p.requires_grad:
                trainable.append(name)
    groups: dict[int, int] = {}
    projections_meta = []
    layer_meta = {}
    for name, layer in layers:
        kind = adapter_type_of(layer)
        entry = {
            "adapter_type": kind,
            "r": layer.r,
            "kwargs": _layer_kwargs(kind, layer),
            "merged": bool(layer.merged),
            "fan_in_fan_out": bool(getattr(layer, "fan_in_fan_out", False)),
        }
        if kind == "lora":
            entry["scale"] = layer.scale
        if kind == "vera":
            proj = layer.projections
            if id(proj) not in groups:
                groups[id(proj)] = len(projections_meta)
                stored = not _redrawn_equal(proj)
                projections_meta.append(
                    {"r": proj.r, "max_in": proj.max_in_features, "max_out": proj.max_out_features,
                     "seed": proj.seed, "stored": stored}
                )
                if stored:
                    i = groups[id(proj)]
                    tensors[f"__projections__.{i}.vera_A"] = proj.vera_A.detach().contiguous().cpu()
                    tensors[f"__projections__.{i}.vera_B"] = proj.vera_B.detach().contiguous().cpu()
            entry["projections"] = groups[id(proj)]
        layer_meta[name] = entry
    meta = {
        "format_version": FORMAT_VERSION,
        "layers": layer_meta,
        "projections": projections_meta,
        "trainable": trainable,
    }
    save_file(tensors, os.fspath(path), metadata={_META_KEY: json.dumps(meta)})
    return {"tensors": len(tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, metadata)`` of a file written by :func:`save_adapter`."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(_META_KEY)
        if raw is None:
            raise ValueError(f"{path} is not a pefttriton adapter file (no {_META_KEY!r} metadata)")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    meta = json.loads(raw)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {meta.get('format_version')!r} (expected {FORMAT_VERSION})")
    return tensors, meta


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Apply an adapter file written by :func:`save_adapter` to ``model``, in place; returns ``model``.

    ``model`` is built like the saved one: either plain (fused layers are injected where the file
    names them) or already holding fused layers of the same types and ranks (they are reused).
    Every saved tensor is copied exactly into the parameter of that name, VeRA projections are
    redrawn from their seed (or taken from the file), layers saved merged are merged again, and
    ``requires_grad`` ends up True exactly for the parameters that trained when saved.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tensors, meta = read_adapter(path)
    shared: dict[int, VeRAProjections] = {}

    def projections_for(index: int, like: torch.Tensor) -> VeRAProjections:
        if index not in shared:
            spec = meta["projections"][index]
            proj = VeRAProjections(spec["r"], spec["max_in"], spec["max_out"], seed=spec["seed"], dtype=like.dtype, device=like.device)
            if spec["stored"]:
                with torch.no_grad():
                    proj.vera_A.copy_(tensors[f"__projections__.{index}.vera_A"])
                    proj.vera_B.copy_(tensors[f"__projections__.{index}.vera_B"])
            shared[index] = proj
        return shared[index]

    to_merge = []
    for name, spec in meta["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"the adapter file names layer {name!r}, which the model does not have") from exc
        kind = spec["adapter_type"]
        existing = adapter_type_of(module)
        if existing is not None:
            if existing != kind or module.r != spec["r"]:
                raise ValueError(f"layer {name!r} is a {existing} adapter of rank {module.r}; the file has {kind} of rank {spec['r']}")
            if module.merged:
                module.unmerge()
            layer = module
            if kind == "vera":
                layer.projections = projections_for(spec["projections"], layer.base_layer.weight)
        else:
            if is_conv1d(module):
                base = linear_from_conv1d(module)
            elif isinstance(module, nn.Linear):
                base = module
            else:
                raise TypeError(f"layer {name!r} is a {type(module).__name__}; expected nn.Linear, Conv1D or a fused layer")
            proj = projections_for(spec["projections"], base.weight) if kind == "vera" else None
            layer = build_layer(kind, base, spec["r"], spec["kwargs"], proj)
            replace_module(model, name, layer)
        layer.fan_in_fan_out = spec["fan_in_fan_out"]
        if "scale" in spec:
            layer.scale = spec["scale"]
        if spec["merged"]:
            to_merge.append(layer)
    params = dict(model.named_parameters())
    missing = [key for key in tensors if not key.startswith("__projections__.") and key not in params]
    if missing:
        raise ValueError(f"the adapter file has tensors the model lacks: {missing[:8]}")
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("__projections__."):
                continue
            param = params[key]
            if tuple(param.shape) != tuple(value.shape):
                raise ValueError(f"{key}: the model has shape {tuple(param.shape)}, the file {tuple(value.shape)}")
            param.copy_(value)
    trainable = set(meta["trainable"])
    for key, param in params.items():
        param.requires_grad_(key in trainable)
    for layer in to_merge:
        layer.merge()
    return model


__all__ = ["load_adapter", "read_adapter", "save_adapter"]
