"""Save and load pefttriton adapters: one small safetensors file, bit-exact round trip.

:func:`save_adapter` writes

* every adapter parameter of every fused layer (VeRA ``lambda_d``/``lambda_b``, LoRA
  ``lora_A``/``lora_B``, Deep LoRA ``W1``/``W2``/``W3``, LoRMA ``lorma_A``/``lorma_B``) and every
  other parameter that trains (a head unfrozen by hand), under its name in
  ``model.named_parameters()``, in its own dtype;
* for VeRA, the seed and sizes of each shared projection pair instead of the pair itself
  (the projections are redrawn on load, bit-identically, by the same CPU generator). A pair that
  cannot be redrawn from its seed (loaded from a PEFT checkpoint made elsewhere, say) is stored;
* in the safetensors metadata (key ``"pefttriton"``, JSON): per adapter layer its adapter type,
  rank, settings (``"kwargs"``: the layer class's ``settings``, e.g. LoRA ``alpha``, ``dropout``,
  ``use_rslora``), its merged flag and whether it came from GPT-2's ``Conv1D``; which saved
  tensors train; and the model's modules to save (:func:`pefttriton.integration.surgery.modules_to_save`),
  recorded again on load.

Frozen base weights are not saved: :func:`load_adapter` applies the file to a model built the same
way (same architecture, same base weights), injecting the fused layers itself where the model has
plain ``nn.Linear`` / ``Conv1D`` layers, or reusing fused layers already there. Every setting the
file holds is restored either way. Loading is all or nothing: the whole file is checked against
the model first (on meta-device copies of the layers it would build) and the model is changed only
when everything fits.

Format version: still 1. Older files may lack a setting (VeRA's ``d_initial``), which then keeps
the constructor's default for an injected layer and the layer's own value for a reused one; their
LoRA entries hold ``"scale"`` instead of ``use_rslora``, read as ``use_rslora`` when the scale is
``alpha / sqrt(r)``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from pefttriton.adapters.adapter_layer import AdapterLayer
from pefttriton.adapters.registry import adapter_of, adapters, get_adapter
from pefttriton.integration.surgery import (
    adapter_layers,
    add_modules_to_save,
    build_layer,
    has_submodule,
    is_conv1d,
    meta_linear,
    meta_twin,
    modules_to_save,
    wrap,
)
from pefttriton.adapters.vera import VeRAProjections

FORMAT_VERSION = 1
_META_KEY = "pefttriton"
_PROJECTIONS_PREFIX = "__projections__."


# ------------------------------------------------------------------------------ save


def _redrawn_equal(projections: VeRAProjections) -> bool:
    """Whether ``projections`` are exactly what their seed draws (so the seed alone restores them)."""
    A, B = projections.vera_A, projections.vera_B
    redrawn = VeRAProjections(projections.r, A.shape[1], B.shape[0], seed=projections.seed, dtype=A.dtype)
    return torch.equal(A.cpu(), redrawn.vera_A) and torch.equal(B.cpu(), redrawn.vera_B)


def adapter_checkpoint(model: nn.Module, rename=None) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, metadata)`` of an adapter checkpoint of ``model``, nothing copied or gathered.

    ``tensors``: the adapter parameters of every fused layer and every other parameter with
    ``requires_grad`` (a head trained in full), detached, by name; plus
    ``__projections__.<i>.vera_A`` / ``vera_B`` for a shared VeRA pair its seed does not redraw.
    ``metadata``: ``{"format_version", "layers": {name: {"adapter_type", "r", "kwargs", "merged",
    "fan_in_fan_out"[, "projections"]}}, "projections": [{"r", "max_in", "max_out", "seed",
    "stored"}], "trainable": [names], "modules_to_save": [names]}``. ``rename`` maps every module
    and parameter name (wrappers stripped, say); identity by default.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` has no fused adapter layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    rename = rename or (lambda name: name)
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no fused adapter layer to save")
    adapter_ids = {id(p) for _, layer in layers for p in layer.adapter_parameters().values()}
    tensors, trainable = {}, []
    for name, p in model.named_parameters():
        if id(p) in adapter_ids or p.requires_grad:
            tensors[rename(name)] = p.detach()
            if p.requires_grad:
                trainable.append(rename(name))
    groups: dict[int, int] = {}
    projections_meta = []
    layer_meta = {}
    for name, layer in layers:
        kind = adapter_of(layer).name
        entry = {
            "adapter_type": kind,
            "r": layer.r,
            "kwargs": layer.get_settings(),
            "merged": bool(layer.merged),
            "fan_in_fan_out": layer.fan_in_fan_out,
        }
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
                    tensors[f"{_PROJECTIONS_PREFIX}{i}.vera_A"] = proj.vera_A.detach()
                    tensors[f"{_PROJECTIONS_PREFIX}{i}.vera_B"] = proj.vera_B.detach()
            entry["projections"] = groups[id(proj)]
        layer_meta[rename(name)] = entry
    meta = {
        "format_version": FORMAT_VERSION,
        "layers": layer_meta,
        "projections": projections_meta,
        "trainable": trainable,
        "modules_to_save": [rename(name) for name in modules_to_save(model)],
    }
    return tensors, meta


def save_adapter(model: nn.Module, path: str | os.PathLike) -> dict[str, int]:
    """Write the adapters of ``model`` to the safetensors file ``path`` (see the module docstring).

    Returns:
        ``{"tensors": count, "bytes": tensor bytes}`` of what was written.
    """
    from safetensors.torch import save_file

    tensors, meta = adapter_checkpoint(model)
    tensors = {name: t.contiguous().cpu() for name, t in tensors.items()}
    save_file(tensors, os.fspath(path), metadata={_META_KEY: json.dumps(meta)})
    return {"tensors": len(tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, metadata)`` of a file written by :func:`save_adapter`.

    Raises:
        ValueError naming ``path``: not a readable safetensors file (another format, cut short),
            no pefttriton metadata or metadata that is not a JSON object, another format version.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
            if raw is None:
                raise ValueError(f"{path} is not a pefttriton adapter file (no {_META_KEY!r} metadata)")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as exc:  # safetensors' own message says what is wrong, not where
        raise ValueError(f"{path} is not a readable safetensors file (a pefttriton adapter file is one): {exc}") from exc
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: the {_META_KEY!r} metadata is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: the {_META_KEY!r} metadata must be a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {meta.get('format_version')!r} (expected {FORMAT_VERSION})")
    return tensors, meta


# ------------------------------------------------------------------------------ load: checks


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check_projection_specs(specs, tensors: dict[str, torch.Tensor]) -> None:
    """Every projections entry is well formed and a stored pair is in the file with its shapes;
    the file holds no other ``__projections__`` tensor."""
    if not isinstance(specs, list):
        raise ValueError(f"the adapter file's 'projections' must be a list, got {type(specs).__name__}")
    expected_keys = set()
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise ValueError(f"projections entry {i} must be a dict, got {type(spec).__name__}")
        for key, low in (("r", 1), ("max_in", 0), ("max_out", 0)):
            if not _is_int(spec.get(key)) or spec[key] < low:
                raise ValueError(f"projections entry {i}: {key} must be an int >= {low}, got {spec.get(key)!r}")
        if not _is_int(spec.get("seed")):
            raise ValueError(f"projections entry {i}: seed must be an int, got {spec.get('seed')!r}")
        if not isinstance(spec.get("stored"), bool):
            raise ValueError(f"projections entry {i}: stored must be a bool, got {spec.get('stored')!r}")
        if spec["stored"]:
            shapes = {"vera_A": (spec["r"], spec["max_in"]), "vera_B": (spec["max_out"], spec["r"])}
            for which, shape in shapes.items():
                key = f"{_PROJECTIONS_PREFIX}{i}.{which}"
                expected_keys.add(key)
                if key not in tensors:
                    raise ValueError(f"projections entry {i} is stored but the file has no tensor {key!r}")
                if tuple(tensors[key].shape) != shape:
                    raise ValueError(
                        f"{key}: expected shape {shape} (from projections entry {i}), got {tuple(tensors[key].shape)}"
                    )
    unknown = [key for key in tensors if key.startswith(_PROJECTIONS_PREFIX) and key not in expected_keys]
    if unknown:
        raise ValueError(f"the adapter file has projection tensors no stored projections entry names: {unknown[:8]}")


def _check_layer_spec(name: str, spec, n_projections: int) -> tuple[str, int, dict]:
    """``(adapter_type, r, settings)`` of one layer entry of the metadata, checked for form.

    The values themselves are checked by building the layer on the meta device (see :func:`_plan`).
    """
    if not isinstance(spec, dict):
        raise ValueError(f"layer {name!r}: the metadata entry must be a dict, got {type(spec).__name__}")
    kind = spec.get("adapter_type")
    if not isinstance(kind, str) or kind not in adapters():
        raise ValueError(f"layer {name!r}: adapter type {kind!r} is not available; available: {sorted(adapters())}")
    r = spec.get("r")
    if not _is_int(r) or r < 1:
        raise ValueError(f"layer {name!r}: r must be a positive int, got {r!r}")
    kwargs = spec.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ValueError(f"layer {name!r}: kwargs must be a dict, got {type(kwargs).__name__}")
    kwargs = dict(kwargs)
    layer_class = get_adapter(kind).layer_class
    if kind == "lora" and "scale" in spec:  # older files; a newer one that has both must agree
        use_rslora = _use_rslora_from_scale(name, spec["scale"], kwargs.get("alpha"), r)
        if kwargs.setdefault("use_rslora", use_rslora) != use_rslora:
            raise ValueError(f"layer {name!r}: scale {spec['scale']!r} contradicts use_rslora={kwargs['use_rslora']!r}")
    unknown = sorted(set(kwargs) - set(layer_class.settings))
    if unknown:
        raise ValueError(f"layer {name!r}: unknown {kind} settings {unknown} in the file")
    for flag in ("merged", "fan_in_fan_out"):
        if not isinstance(spec.get(flag, False), bool):
            raise ValueError(f"layer {name!r}: {flag} must be a bool, got {spec[flag]!r}")
    if kind == "vera":
        index = spec.get("projections")
        if not _is_int(index) or not 0 <= index < n_projections:
            raise ValueError(
                f"layer {name!r}: projections must index the file's {n_projections} projections entries, got {index!r}"
            )
    return kind, r, kwargs


def _use_rslora_from_scale(name: str, scale, alpha, r: int) -> bool:
    """Older files held LoRA's ``scale`` itself: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA."""
    if alpha is None or isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"layer {name!r}: scale must be a float beside kwargs.alpha, got {scale!r}")
    if scale == alpha / r:
        return False
    if scale == alpha / math.sqrt(r):
        return True
    raise ValueError(f"layer {name!r}: scale {scale!r} is neither alpha / r nor alpha / sqrt(r) (alpha={alpha!r}, r={r})")


@dataclass
class _LayerPlan:
    """What :func:`load_adapter` will do at one layer of the file."""

    name: str
    kind: str
    r: int
    kwargs: dict  # the settings the file holds (others keep today's behaviour), validated
    spec: dict
    module: nn.Module  # what the model holds at ``name`` now
    reuse: bool  # ``module`` is an adapter layer of the file's type and rank
    meta: AdapterLayer  # the layer the file describes, built on the meta device with its settings
    projections: VeRAProjections | None = None  # real shared projections (VeRA)


def _check_unmergeable(name: str, layer: nn.Module) -> None:
    """A reused layer that is merged is unmerged before loading; refuse now where that would fail
    (a merged LoRMA pi/naive layer without its copy of ``W0``): ``base_weight()`` computes the
    unmerged weight by the same steps as ``unmerge()`` without writing it."""
    base_weight = getattr(layer, "base_weight", None)
    if base_weight is None:
        return  # additive layers unmerge by subtraction, which cannot fail
    try:
        with torch.no_grad():
            base_weight()
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"layer {name!r} is merged and cannot be unmerged to load the file: {exc}") from exc


def _plan(model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict) -> list[_LayerPlan]:
    """Check the whole file against ``model`` and say what to do; changes nothing in ``model``.

    Raises ValueError / TypeError naming the layer or tensor for: a malformed entry, a layer the
    model does not have or of a type that cannot hold the adapter, a fused layer of another type,
    rank or LoRMA variant, a setting the constructor refuses, inconsistent projections, a tensor
    without a parameter of its name and shape (after injection), an adapter parameter the file
    lacks, a merged layer saved with NaN/Inf.
    """
    layers = meta.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"the adapter file's 'layers' must be a dict, got {type(layers).__name__}")
    projection_specs = meta.get("projections", [])
    _check_projection_specs(projection_specs, tensors)
    trainable = meta.get("trainable", [])
    if not isinstance(trainable, list) or not all(isinstance(key, str) for key in trainable):
        raise ValueError("the adapter file's 'trainable' must be a list of parameter names")
    untrained = [key for key in trainable if key not in tensors]
    if untrained:
        raise ValueError(f"the adapter file lists as trainable parameters it holds no tensor for: {untrained[:8]}")
    existing_fused = [name for name, _ in adapter_layers(model)]
    shared: dict[int, VeRAProjections] = {}
    plans = []
    for name, spec in layers.items():
        kind, r, kwargs = _check_layer_spec(name, spec, len(projection_specs))
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"the adapter file names layer {name!r}, which the model does not have") from exc
        inside = [f for f in existing_fused if name.startswith(f + ".") or (f == "" and name)]
        if inside:
            raise ValueError(f"the adapter file names layer {name!r}, which lies inside the fused layer {inside[0]!r}")
        entry = adapter_of(module)
        existing = entry.name if entry is not None else None
        if existing is not None:
            if existing != kind or module.r != r:
                raise ValueError(
                    f"layer {name!r} is a {existing} adapter of rank {module.r}; the file has {kind} of rank {r}"
                )
            if module.merged:
                _check_unmergeable(name, module)
            base = module.base_layer
        elif isinstance(module, nn.Linear) or is_conv1d(module):
            if not name:
                raise ValueError(
                    "the adapter file adapts the model itself, a plain layer; it cannot be replaced in place"
                )
            base = module
        else:
            raise TypeError(f"layer {name!r} is a {type(module).__name__}; expected nn.Linear, Conv1D or a fused layer")
        projections = meta_projections = None
        if kind == "vera":
            index = spec["projections"]
            weight = base.weight
            if index not in shared:  # new tensors, not yet in the model: drawing them changes nothing
                p = projection_specs[index]
                proj = VeRAProjections(
                    p["r"], p["max_in"], p["max_out"], seed=p["seed"], dtype=weight.dtype, device=weight.device
                )
                if p["stored"]:
                    with torch.no_grad():
                        proj.vera_A.copy_(tensors[f"{_PROJECTIONS_PREFIX}{index}.vera_A"])
                        proj.vera_B.copy_(tensors[f"{_PROJECTIONS_PREFIX}{index}.vera_B"])
                shared[index] = proj
            projections = shared[index]
            if projections.vera_A.device != weight.device:
                raise ValueError(
                    f"layer {name!r} is on {weight.device} but shares projections entry {index} with layers on "
                    f"{projections.vera_A.device}; shared projections need one device"
                )
            # A new layer gets the shared pair as it is (the constructor checks its dtype); a reused
            # one casts its slices to its own dtype.
            meta_projections = meta_twin(projections, weight.dtype if existing else projections.vera_A.dtype)
        shared_kwargs = {"projections": meta_projections} if kind == "vera" else {}
        try:
            meta_layer = build_layer(kind, meta_linear(base), r, {**kwargs, **shared_kwargs})
        except (TypeError, ValueError) as exc:
            raise (TypeError if isinstance(exc, TypeError) else ValueError)(f"layer {name!r}: {exc}") from exc
        if existing is not None:
            for setting in module.fixed_settings:
                old, new = getattr(module, setting), getattr(meta_layer, setting)
                if setting in kwargs and old != new:
                    raise ValueError(
                        f"layer {name!r} is a {kind} layer with {setting}={old!r}; the file has "
                        f"{setting}={new!r}, which cannot be set on an existing layer without changing its "
                        f"parameterisation (load into a model without this fused layer, or one built with "
                        f"{setting}={new!r})"
                    )
        plans.append(_LayerPlan(name, kind, r, kwargs, spec, module, existing is not None, meta_layer, projections))
    _check_tensors(model, tensors, plans)
    return plans


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], plans: list[_LayerPlan]) -> None:
    """Every tensor of the file has a parameter of its name and shape in the model as it will be
    after injection, every adapter parameter of every layer of the file has a tensor, and a layer
    saved merged holds only finite values (merging NaN/Inf fails half-way for LoRMA plus)."""
    # Parameter names after injection. named_parameters lists each parameter once, under its first
    # name: a new layer lists its adapter parameters, then its base layer's; the base parameters
    # of a wrapped nn.Linear are the same objects and keep their listing (tied ones stay hidden),
    # those of a Conv1D are new copies.
    shapes = {key: tuple(p.shape) for key, p in model.named_parameters()}
    for plan in plans:
        if plan.reuse:
            continue
        prefix = _join(plan.name, "")
        old = {key for key in shapes if key.startswith(prefix)}
        for key in old:
            del shapes[key]
        conv = is_conv1d(plan.module)
        for pname, p in plan.meta.named_parameters():
            key = _join(plan.name, pname)
            if pname.startswith("base_layer.") and not conv and _join(plan.name, pname[len("base_layer."):]) not in old:
                continue
            shapes[key] = tuple(p.shape)
    lacking = []
    for key, value in tensors.items():
        if key.startswith(_PROJECTIONS_PREFIX):
            continue  # checked by _check_projection_specs
        if key not in shapes:
            lacking.append(key)
        elif shapes[key] != tuple(value.shape):
            raise ValueError(f"{key}: the model has shape {shapes[key]}, the file {tuple(value.shape)}")
    if lacking:
        raise ValueError(f"the adapter file has tensors the model lacks: {lacking[:8]}")
    for plan in plans:
        for pname in plan.meta.adapter_parameters():
            key = _join(plan.name, pname)
            if key not in tensors:
                raise ValueError(f"layer {plan.name!r}: the adapter file has no tensor for its parameter {key!r}")
            value = tensors[key]
            if plan.spec.get("merged", False) and value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"layer {plan.name!r} is saved merged but {key!r} holds NaN or Inf")


# ------------------------------------------------------------------------------ load


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Apply an adapter file written by :func:`save_adapter` to ``model``, in place; returns ``model``.

    ``model`` is built like the saved one: either plain (fused layers are injected where the file
    names them, each in the train/eval mode of the layer it replaces) or already holding fused
    layers of the same types and ranks (they are reused; LoRMA layers must also have the file's
    variant). Every setting the file holds is restored (the layer class's ``settings``; its
    ``fixed_settings`` must already agree), every saved tensor
    is copied exactly into the parameter of that name, VeRA projections are redrawn from their seed
    (or taken from the file), layers saved merged are merged again, and ``requires_grad`` ends up
    True exactly for the parameters that trained when saved.

    All or nothing: the whole file is checked first and ``model`` is unchanged when this raises.

    Raises:
        ValueError: the file does not fit the model (a layer it names is missing or is a fused
            layer of another type, rank or variant, a tensor has no parameter of its name and
            shape, a setting is invalid, a layer saved merged holds NaN/Inf...); the message names
            the layer or tensor.
        TypeError: a layer the file names is neither ``nn.Linear``, ``Conv1D`` nor a fused layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tensors, meta = read_adapter(path)
    plans = _plan(model, tensors, meta)
    saved_modules = meta.get("modules_to_save", [])  # absent in older files
    if not isinstance(saved_modules, list) or not all(isinstance(name, str) for name in saved_modules):
        raise ValueError("the adapter file's 'modules_to_save' must be a list of module names")
    missing = [name for name in saved_modules if not has_submodule(model, name)]
    if missing:
        raise ValueError(f"the adapter file's modules_to_save name modules the model does not have: {missing[:8]}")
    # From here on nothing can fail: every step was checked on the plan.
    to_merge = []
    for plan in plans:
        shared_kwargs = {"projections": plan.projections} if plan.kind == "vera" else {}
        if plan.reuse:
            layer = plan.module
            if layer.merged:
                layer.unmerge()
            for setting in plan.kwargs:  # validated values, read off the meta layer
                if setting not in layer.fixed_settings:
                    setattr(layer, setting, getattr(plan.meta, setting))
            for key, value in shared_kwargs.items():
                setattr(layer, key, value)
        else:
            layer = wrap(model, plan.name, plan.kind, plan.r, {**plan.kwargs, **shared_kwargs})
        if plan.spec.get("merged", False):
            to_merge.append(layer)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if not key.startswith(_PROJECTIONS_PREFIX):
                params[key].copy_(value)
    trainable = set(meta.get("trainable", ()))  # checked: names of tensors just copied
    for key, param in params.items():
        param.requires_grad_(key in trainable)
    for layer in to_merge:
        layer.merge()
    if saved_modules:
        add_modules_to_save(model, saved_modules)
    return model


__all__ = ["load_adapter", "read_adapter", "save_adapter"]
