"""Interoperability with HF PEFT's VeRA and LoRA adapters, both ways.

In:
* :func:`from_peft_model`: a model holding PEFT VeRA / LoRA layers (a ``PeftModel`` or a model
  injected with ``peft.inject_adapter_in_model``) -> the same base model with fused layers
  holding the same tensors.
* :func:`load_peft_adapter`: a PEFT checkpoint (a directory with ``adapter_model.safetensors``
  and ``adapter_config.json``, or a state dict plus config) -> fused layers in a plain base model.

Out:
* :func:`save_peft_adapter` writes fused VeRA / LoRA (and Deep LoRA as its end-to-end LoRA) in
  PEFT's format, so ``peft.PeftModel.from_pretrained(base_model, directory)`` loads it.

PEFT's checkpoint format (peft 0.21, ``peft/utils/save_and_load.py``, ``tuners/vera/model.py``,
``tuners/lora``), keys relative to the model given to ``PeftModel``:

* VeRA: ``base_model.model.<module>.vera_lambda_b`` (out,), ``...vera_lambda_d`` (r,), and when
  ``save_projection`` is true the shared ``base_model.vera_A`` (r, max_in) and ``base_model.vera_B``
  (max_out, r); otherwise PEFT redraws them from ``projection_prng_key`` sized by its
  ``_find_dim`` (largest in/out over the targeted layers). PEFT uses the full rank of the
  projections in every layer, so all VeRA layers have ``r == config.r``.
* LoRA: ``base_model.model.<module>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r), in that
  orientation also for GPT-2's ``Conv1D`` (``fan_in_fan_out`` only changes how PEFT merges);
  ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), per-layer ``r`` and
  ``lora_alpha`` through ``rank_pattern`` / ``alpha_pattern``.

Tensors are copied exactly (same numbers, fp32 adapters). Outputs then agree with PEFT's to the
rounding of the two evaluation orders (the fused engine adds the low-rank product inside one GEMM;
PEFT adds it after): ``tests/test_peft_interop.py`` measures it. Not supported, each with a clear
error: DoRA, ``lora_bias``, LoRA on embeddings or convolutions, ``modules_to_save``, VeRA dropout
during training (dropout is off in eval, so inference is unaffected; a warning says so).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from pefttriton.injection import (
    build_layer,
    freeze_all_but_adapters,
    fused_layers,
    is_conv1d,
    linear_from_conv1d,
    replace_module,
)
from pefttriton.vera import VeRAProjections

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."


# ------------------------------------------------------------------------------ shared helpers


def _base_linear(model: nn.Module, name: str) -> tuple[nn.Linear, bool]:
    """The ``nn.Linear`` to wrap at ``name`` (converted from a Conv1D) and whether it was a Conv1D."""
    try:
        module = model.get_submodule(name)
    except AttributeError as exc:
        raise ValueError(f"the adapter names module {name!r}, which the model does not have") from exc
    if is_conv1d(module):
        return linear_from_conv1d(module), True
    if isinstance(module, nn.Linear):
        return module, False
    raise TypeError(f"the adapter targets {name!r}, a {type(module).__name__}; only nn.Linear and Conv1D are supported")


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's ``get_pattern_key`` lookup: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _vera_projections(r: int, max_in: int, max_out: int, seed: int, like: torch.Tensor, A=None, B=None) -> VeRAProjections:
    """Projections drawn from ``seed``; overwritten by stored ``A``, ``B`` when given (PEFT loads those)."""
    projections = VeRAProjections(r, max_in, max_out, seed=seed, dtype=like.dtype, device=like.device)
    if A is not None:
        if tuple(A.shape) != (r, max_in) or B is None or tuple(B.shape) != (max_out, r):
            raise ValueError(
                f"stored vera_A / vera_B must have shapes {(r, max_in)} and {(max_out, r)}, got "
                f"{tuple(A.shape)} and {None if B is None else tuple(B.shape)}"
            )
        with torch.no_grad():
            projections.vera_A.copy_(A)
            projections.vera_B.copy_(B)
    return projections


def _install(model: nn.Module, adapter_type: str, layers: dict[str, dict], projections=None) -> nn.Module:
    """Wrap each named layer, copy its tensors in, freeze all but adapters.

    ``layers[name]`` holds ``r``, ``kwargs`` for the module, ``tensors`` ({param name: tensor}) and
    optionally ``scale`` (LoRA with rsLoRA scaling).
    """
    for name, spec in layers.items():
        base, conv = _base_linear(model, name)
        layer = build_layer(adapter_type, base, spec["r"], spec.get("kwargs"), projections)
        layer.fan_in_fan_out = conv
        if "scale" in spec:
            layer.scale = float(spec["scale"])
        with torch.no_grad():
            for pname, value in spec["tensors"].items():
                param = getattr(layer, pname)
                if tuple(value.shape) != tuple(param.shape):
                    raise ValueError(f"{name}.{pname}: expected shape {tuple(param.shape)}, got {tuple(value.shape)}")
                param.copy_(value)
        replace_module(model, name, layer)
    freeze_all_but_adapters(model)
    return model


# ------------------------------------------------------------------------------ from PEFT layers


def from_peft_model(peft_model: nn.Module, adapter_name: str = "default", *, projection_seed: int | None = None) -> nn.Module:
    """Replace PEFT VeRA / LoRA layers by fused layers with the same tensors; returns the base model.

    Args:
        peft_model: a ``peft.PeftModel`` (its ``base_model.model`` is modified and returned) or any
            module holding PEFT VeRA / LoRA ``Linear`` layers (modified in place and returned).
        adapter_name: which adapter to take (PEFT's default ``"default"``).
        projection_seed: VeRA seed to record when ``peft_model`` has no ``peft_config`` to read it from.

    The PEFT layers must not be merged. Only the chosen adapter is carried over; the PEFT layers
    are dropped, so ``peft_model`` must not be used afterwards.
    """
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.tuners.vera.layer import Linear as PeftVeraLinear

    from peft import PeftModel

    configs = getattr(peft_model, "peft_config", None) or {}
    model = peft_model.base_model.model if isinstance(peft_model, PeftModel) else peft_model
    vera, lora = {}, {}
    shared = None
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        if module.merged:
            raise ValueError(f"PEFT layer {name!r} is merged; unmerge it before converting")
        if isinstance(module, PeftVeraLinear):
            if adapter_name not in module.vera_lambda_d:
                continue
            A, B = module.vera_A[adapter_name], module.vera_B[adapter_name]
            if shared is not None and (A is not shared[0] and not torch.equal(A, shared[0])):
                raise ValueError("PEFT VeRA layers hold different projections; expected one shared pair")
            shared = (A, B)
            if not isinstance(module.vera_dropout[adapter_name], nn.Identity):
                warnings.warn(
                    f"{name}: VeRA dropout p={module.vera_dropout[adapter_name].p} is not carried over (fused VeRA has "
                    "no dropout); inference is unaffected", stacklevel=2
                )
            vera[name] = {
                "r": module.r[adapter_name],
                "kwargs": {},
                "tensors": {
                    "lambda_d": module.vera_lambda_d[adapter_name].detach(),
                    "lambda_b": module.vera_lambda_b[adapter_name].detach(),
                },
                "base": module.get_base_layer(),
            }
        elif isinstance(module, PeftLoraLinear):
            if adapter_name not in module.lora_A:
                continue
            if module.use_dora.get(adapter_name, False) or module.lora_bias.get(adapter_name, False):
                raise ValueError(f"{name}: DoRA and lora_bias adapters are not supported by FusedLoRALinear")
            if adapter_name in getattr(module, "lora_variant", {}):
                raise ValueError(f"{name}: LoRA variant {type(module.lora_variant[adapter_name]).__name__} is not supported")
            dropout = module.lora_dropout[adapter_name]
            lora[name] = {
                "r": module.r[adapter_name],
                "kwargs": {
                    "alpha": float(module.lora_alpha[adapter_name]),
                    "dropout": float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0,
                },
                "scale": float(module.scaling[adapter_name]),
                "tensors": {
                    "lora_A": module.lora_A[adapter_name].weight.detach(),
                    "lora_B": module.lora_B[adapter_name].weight.detach(),
                },
                "base": module.get_base_layer(),
            }
        elif isinstance(module, LoraLayer) or hasattr(module, "base_layer"):
            raise TypeError(f"{name}: PEFT layer {type(module).__name__} is not supported (only VeRA and LoRA Linear)")
    if not vera and not lora:
        raise ValueError(f"no PEFT VeRA or LoRA layer with adapter {adapter_name!r} found")
    # Put PEFT's base layers back, then wrap them like any checkpoint load.
    for name, spec in {**vera, **lora}.items():
        replace_module(model, name, spec.pop("base"))
    if vera:
        A, B = shared
        if projection_seed is None:
            if adapter_name not in configs:
                raise ValueError("pass projection_seed: the model has no peft_config to read projection_prng_key from")
            projection_seed = configs[adapter_name].projection_prng_key
        base_weight = model.get_submodule(next(iter(vera))).weight  # Linear or Conv1D: same dtype, device
        projections = _vera_projections(A.shape[0], A.shape[1], B.shape[0], projection_seed, base_weight, A, B)
        _install(model, "vera", vera, projections)
    if lora:
        _install(model, "lora", lora)
    return model


# ------------------------------------------------------------------------------ from a PEFT checkpoint


def read_peft_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, config dict)`` of a PEFT adapter directory (safetensors weights only)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    weights, config = directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG
    for path in (weights, config):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (a PEFT adapter directory holds {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG})")
    with open(config, encoding="utf-8") as f:
        return load_file(str(weights)), json.load(f)


def _config_dict(config) -> dict:
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"config must be a PEFT config or a dict, got {type(config).__name__}")


def _split_keys(state_dict: dict[str, torch.Tensor], suffixes: tuple[str, ...], extra: tuple[str, ...] = ()) -> dict:
    """``{module name: {suffix: tensor}}``; any other key is an error."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        if key in extra:
            continue
        for suffix in suffixes:
            if key.startswith(_PREFIX) and key.endswith("." + suffix):
                layers.setdefault(key[len(_PREFIX) : -len(suffix) - 1], {})[suffix] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unsupported keys in the PEFT adapter (only {suffixes} of Linear/Conv1D layers): {sorted(unknown)[:8]}")
    incomplete = [name for name, parts in layers.items() if set(parts) != set(suffixes)]
    if incomplete:
        raise ValueError(f"layers with only some of {suffixes}: {incomplete[:8]}")
    if not layers:
        raise ValueError("the PEFT adapter holds no adapter tensors")
    return layers


def load_peft_adapter(
    model: nn.Module,
    adapter: str | os.PathLike | dict[str, torch.Tensor],
    config=None,
) -> nn.Module:
    """Load a PEFT VeRA or LoRA adapter into fused layers of a plain base model, in place.

    Args:
        model: the base model the adapter was trained on, without PEFT layers (the module that was
            given to ``get_peft_model``: keys are ``base_model.model.<name in model>...``).
        adapter: a PEFT adapter directory (``adapter_model.safetensors`` + ``adapter_config.json``)
            or a state dict in PEFT's saved format (``peft.get_peft_model_state_dict``).
        config: with a state dict, its ``peft.VeraConfig`` / ``peft.LoraConfig`` or their dict form;
            with a directory, None (read from ``adapter_config.json``).

    Returns:
        ``model``, with fused layers where the adapter has tensors and everything else frozen.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(adapter, (str, os.PathLike)):
        if config is not None:
            raise ValueError("config must be None when adapter is a directory (it is read from adapter_config.json)")
        state_dict, cfg = read_peft_checkpoint(adapter)
    elif isinstance(adapter, dict):
        if config is None:
            raise ValueError("loading from a state dict needs its PEFT config (config=...)")
        state_dict, cfg = adapter, _config_dict(config)
    else:
        raise TypeError(f"adapter must be a directory path or a state dict, got {type(adapter).__name__}")
    peft_type = str(getattr(cfg.get("peft_type"), "value", cfg.get("peft_type"))).upper()
    if cfg.get("modules_to_save"):
        raise ValueError("PEFT adapters with modules_to_save are not supported")
    if peft_type == "VERA":
        return _load_vera(model, state_dict, cfg)
    if peft_type == "LORA":
        return _load_lora(model, state_dict, cfg)
    raise ValueError(f"only PEFT VERA and LORA adapters can be loaded, got peft_type {cfg.get('peft_type')!r}")


def _load_vera(model, state_dict, cfg) -> nn.Module:
    extra = ("base_model.vera_A", "base_model.vera_B")
    parts = _split_keys(state_dict, ("vera_lambda_b", "vera_lambda_d"), extra)
    r = int(cfg.get("r", 256))
    if cfg.get("vera_dropout", 0.0):
        warnings.warn(
            f"vera_dropout={cfg['vera_dropout']} is not applied (fused VeRA has no dropout); inference is unaffected",
            stacklevel=3,
        )
    shapes = {}  # name -> (in_features, out_features), without converting Conv1D layers yet
    for name in parts:
        module = model.get_submodule(name) if _has_module(model, name) else None
        if module is None or not (isinstance(module, nn.Linear) or is_conv1d(module)):
            _base_linear(model, name)  # raises the error that fits
        shapes[name] = tuple(module.weight.shape) if is_conv1d(module) else (module.in_features, module.out_features)
    like = model.get_submodule(next(iter(parts))).weight
    A, B = state_dict.get(extra[0]), state_dict.get(extra[1])
    if (A is None) != (B is None):
        raise ValueError("the PEFT VeRA adapter holds only one of base_model.vera_A / base_model.vera_B")
    if A is not None:
        if A.dim() != 2 or B.dim() != 2:
            raise ValueError(f"base_model.vera_A / vera_B must be 2-D, got shapes {tuple(A.shape)}, {tuple(B.shape)}")
        max_in, max_out = A.shape[1], B.shape[0]
    else:  # PEFT redraws them sized by _find_dim over the adapted layers
        max_in = max(n for n, _ in shapes.values())
        max_out = max(m for _, m in shapes.values())
    projections = _vera_projections(r, max_in, max_out, int(cfg.get("projection_prng_key", 0)), like, A, B)
    layers = {
        name: {"r": r, "kwargs": {}, "tensors": {"lambda_b": p["vera_lambda_b"], "lambda_d": p["vera_lambda_d"]}}
        for name, p in parts.items()
    }
    return _install(model, "vera", layers, projections)


def _load_lora(model, state_dict, cfg) -> nn.Module:
    for flag in ("use_dora", "lora_bias"):
        if cfg.get(flag):
            raise ValueError(f"PEFT LoRA adapters with {flag}=True are not supported")
    parts = _split_keys(state_dict, ("lora_A.weight", "lora_B.weight"))
    layers = {}
    for name, p in parts.items():
        r = p["lora_A.weight"].shape[0]
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), name, cfg.get("lora_alpha", 8)))
        spec = {
            "r": r,
            "kwargs": {"alpha": alpha, "dropout": float(cfg.get("lora_dropout", 0.0))},
            "tensors": {"lora_A": p["lora_A.weight"], "lora_B": p["lora_B.weight"]},
        }
        if cfg.get("use_rslora"):
            spec["scale"] = alpha / math.sqrt(r)
        layers[name] = spec
    return _install(model, "lora", layers)


# ------------------------------------------------------------------------------ to a PEFT checkpoint


def to_peft_state_dict(model: nn.Module, *, save_projection: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, adapter_config dict)`` in PEFT's saved format for the fused layers of ``model``.

    All fused layers must be of one kind: VeRA (sharing one projection pair with ``r`` equal to
    the projections' rank, as PEFT requires), LoRA, or Deep LoRA (exported as the LoRA with
    ``lora_A = W2 W1``, ``lora_B = W3``, ``lora_alpha = r``: the same update, no longer factored).
    Layers converted from GPT-2's Conv1D set ``fan_in_fan_out``. Merged layers are refused.
    """
    from pefttriton.injection import adapter_type_of

    layers = fused_layers(model)
    if not layers:
        raise ValueError("model has no fused adapter layer")
    kinds = {adapter_type_of(layer) for _, layer in layers}
    if len(kinds) != 1:
        raise ValueError(f"a PEFT adapter holds one kind of adapter; the model mixes {sorted(kinds)}")
    kind = kinds.pop()
    for name, layer in layers:
        if layer.merged:
            raise ValueError(f"layer {name!r} is merged; unmerge it before saving")
    names = [name for name, _ in layers]
    fan_in_fan_out = any(getattr(layer, "fan_in_fan_out", False) for _, layer in layers)
    common = {
        "base_model_name_or_path": None,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
        "target_modules": names,  # full names: PEFT matches exactly these layers
        "task_type": None,
    }
    state = {}
    if kind == "vera":
        projections = {id(layer.projections): layer.projections for _, layer in layers}
        if len(projections) != 1:
            raise ValueError("PEFT's VeRA has one shared projection pair; the model's VeRA layers use several")
        proj = projections.popitem()[1]
        bad = [name for name, layer in layers if layer.r != proj.r]
        if bad:
            raise ValueError(f"PEFT's VeRA uses the projections' full rank {proj.r} in every layer; {bad[:4]} differ")
        max_in = max(layer.in_features for _, layer in layers)
        max_out = max(layer.out_features for _, layer in layers)
        for name, layer in layers:
            state[f"{_PREFIX}{name}.vera_lambda_b"] = layer.lambda_b.detach().float().contiguous()
            state[f"{_PREFIX}{name}.vera_lambda_d"] = layer.lambda_d.detach().float().contiguous()
        # What PEFT would draw from the seed for these targets (fp32, sized by its _find_dim).
        redrawn = VeRAProjections(proj.r, max_in, max_out, seed=proj.seed)
        ours_A, ours_B = proj.vera_A[:, :max_in].detach().cpu(), proj.vera_B[:max_out, :].detach().cpu()
        from_seed = (
            proj.max_in_features == max_in
            and proj.max_out_features == max_out
            and torch.equal(ours_A, redrawn.vera_A.to(ours_A.dtype))
            and torch.equal(ours_B, redrawn.vera_B.to(ours_B.dtype))
        )
        if save_projection:
            # The fp32 draw when ours is that draw (cast to a 16-bit model dtype, say), else ours.
            state["base_model.vera_A"] = redrawn.vera_A if from_seed else ours_A.float().contiguous()
            state["base_model.vera_B"] = redrawn.vera_B if from_seed else ours_B.float().contiguous()
        else:
            if not from_seed:
                raise ValueError(
                    "save_projection=False: PEFT would redraw projections from the seed sized to the targets, which "
                    "differ from this model's; save with save_projection=True"
                )
        config = {
            **common,
            "peft_type": "VERA",
            "r": proj.r,
            "projection_prng_key": proj.seed,
            "save_projection": save_projection,
            "vera_dropout": 0.0,
            "d_initial": 0.1,
            "init_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
        }
        return state, config
    if kind not in ("lora", "deep_lora"):
        raise ValueError(f"PEFT has no {kind!r} adapter; only VeRA, LoRA and Deep LoRA (as LoRA) can be exported")
    if len({getattr(layer, "dropout_p", 0.0) for _, layer in layers}) > 1:
        raise ValueError("PEFT's LoRA has one lora_dropout for all layers; the model's layers use different ones")
    # PEFT recomputes scaling = lora_alpha / r (or / sqrt(r) with use_rslora, one flag for all
    # layers). Write alpha itself when that reproduces each layer's scale exactly; otherwise
    # alpha = scale * r, which may differ from the layer's scale in the last bit.
    use_rslora = kind == "lora" and all(
        layer.scale == layer.alpha / math.sqrt(layer.r) != layer.alpha / layer.r for _, layer in layers
    )
    rank_pattern, alpha_pattern = {}, {}
    for name, layer in layers:
        if kind == "lora":
            A, B, alpha = layer.lora_A, layer.lora_B, layer.scale * layer.r
            if use_rslora or layer.alpha / layer.r == layer.scale:
                alpha = layer.alpha
        else:
            A, B = layer.prepared()
            alpha = float(layer.r)
        state[f"{_PREFIX}{name}.lora_A.weight"] = A.detach().float().contiguous()
        state[f"{_PREFIX}{name}.lora_B.weight"] = B.detach().float().contiguous()
        key = re.escape(name)
        rank_pattern[key], alpha_pattern[key] = layer.r, alpha
    r0, alpha0 = layers[0][1].r, alpha_pattern[re.escape(names[0])]
    config = {
        **common,
        "peft_type": "LORA",
        "r": r0,
        "lora_alpha": alpha0,
        "lora_dropout": float(getattr(layers[0][1], "dropout_p", 0.0)),
        "rank_pattern": {k: v for k, v in rank_pattern.items() if v != r0},
        "alpha_pattern": {k: v for k, v in alpha_pattern.items() if v != alpha0},
        "use_rslora": use_rslora,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return state, config


def save_peft_adapter(model: nn.Module, directory: str | os.PathLike, *, save_projection: bool = True) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` (see :func:`to_peft_state_dict`).

    ``peft.PeftModel.from_pretrained(base_model, directory)`` then rebuilds the adapter, with
    ``base_model`` a fresh copy of the model the fused layers were injected into.
    """
    from safetensors.torch import save_file

    state, config = to_peft_state_dict(model, save_projection=save_projection)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(directory / ADAPTER_CONFIG, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


__all__ = ["from_peft_model", "load_peft_adapter", "read_peft_checkpoint", "save_peft_adapter", "to_peft_state_dict"]

