r"""Interoperability with HF PEFT's VeRA and LoRA adapters, both ways.

In:
* :func:`from_peft_model`: a model holding PEFT VeRA / LoRA layers (a ``PeftModel`` or a model
  injected with ``peft.inject_adapter_in_model``) -> the same base model with fused layers
  holding the same tensors, and no PEFT module left (see the function for the rules).
* :func:`load_peft_adapter`: a PEFT checkpoint (a directory with ``adapter_model.safetensors``
  and ``adapter_config.json``, or a state dict plus config) -> fused layers in a plain base model.

Out:
* :func:`save_peft_adapter` writes fused VeRA / LoRA (and Deep LoRA as its end-to-end LoRA) in
  PEFT's format, so ``peft.PeftModel.from_pretrained(base_model, directory)`` loads it.

Modules that train in full beside the adapters (PEFT's ``modules_to_save``, pefttriton's
:func:`pefttriton.integration.surgery.modules_to_save`) cross both ways: imported, they hold the trained
tensors of the chosen adapter, train and are recorded; exported, the recorded ones and the owner
of any other trainable non-adapter parameter (a head unfrozen by hand) are written with their
tensors, and ``task_type`` stays None, so PEFT wraps exactly those (a ``SEQ_CLS`` task type would
add ``classifier`` and ``score`` of its own).

PEFT's checkpoint format (peft 0.21, ``peft/utils/save_and_load.py``, ``tuners/vera/model.py``,
``tuners/lora``), keys relative to the model given to ``PeftModel``:

* VeRA: ``base_model.model.<module>.vera_lambda_b`` (out,), ``...vera_lambda_d`` (r,), and when
  ``save_projection`` is true the shared ``base_model.vera_A`` (r, max_in) and ``base_model.vera_B``
  (max_out, r); otherwise PEFT redraws them from ``projection_prng_key`` sized by its
  ``_find_dim`` (largest in/out over the targeted layers), ignoring (with a warning) any stored
  pair. PEFT uses the full rank of the projections in every layer, so all VeRA layers have
  ``r == config.r``. ``d_initial`` only sets ``lambda_d`` before the saved values overwrite it.
* LoRA: ``base_model.model.<module>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r), in that
  orientation also for GPT-2's ``Conv1D`` (``fan_in_fan_out`` only changes how PEFT merges);
  ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), per-layer ``r`` and
  ``lora_alpha`` through ``rank_pattern`` / ``alpha_pattern``.
* ``modules_to_save`` (a trained classification head, say): the trained copy's
  ``state_dict()`` under ``base_model.model.<module>.<key>`` (``...classifier.weight``,
  ``...classifier.0.weight`` for a child ``0``), for every module whose name ends with an entry
  of ``config.modules_to_save`` (plain ``str.endswith``, no dot boundary: PEFT's
  ``_set_trainable``).

How PEFT matches names, and so what the exported config must say to name exactly the layers of
this model (``peft/tuners/tuners_utils.py: check_target_module_exists``,
``peft/utils/other.py: get_pattern_key, _set_trainable``):

* ``target_modules`` as a list matches a layer whose name equals an entry or ends with
  ``"." + entry``, so ``["lin1"]`` also adapts ``sub.lin1``. A str is ``re.fullmatch``-ed, so
  the export writes one alternation of the escaped full names.
* a ``rank_pattern`` / ``alpha_pattern`` key ``k`` applies where
  ``re.match(rf"(.*\.)?({k})$", name)``; the export writes ``"^" + re.escape(name)``, which only
  the layer called ``name`` matches (``^`` cannot match after the optional prefix).
* a ``modules_to_save`` entry ``e`` wraps every module whose name ends with ``e`` (PEFT's
  adapter sub-modules such as ``q.vera_lambda_b`` included), and excludes from adaptation every
  layer with ``re.match(rf"(^|.*\.){e}($|\..*)", name)``. The export writes, per module, the
  shortest dotted suffix of its name that wraps exactly the intended modules and excludes no
  adapted layer, and raises ``ValueError`` when no suffix does (a top-level ``classifier`` next
  to a ``pre_classifier``, say).

Tensors are copied exactly (same numbers, fp32 adapters). Outputs then agree with PEFT's to the
rounding of the two evaluation orders (the fused engine adds the low-rank product inside one GEMM;
PEFT adds it after): ``tests/test_peft_interop.py`` measures it. Not supported, each with a clear
error: DoRA, ``lora_bias``, LoRA on embeddings or convolutions, PEFT's trainable tokens, VeRA
dropout during training (dropout is off in eval, so inference is unaffected; a warning says so).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from pefttriton.adapters.registry import adapter_of
from pefttriton.integration.surgery import (
    adapter_layers,
    add_modules_to_save,
    as_linear,
    build_layer,
    check_tensors,
    copy_tensors,
    freeze_all_but_adapters,
    has_submodule,
    is_conv1d,
    meta_linear,
    meta_twin,
    modules_to_save,
    replace_module,
    wrap,
)
from pefttriton.adapters.vera import VeRAProjections

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_VERA_A, _VERA_B = "base_model.vera_A", "base_model.vera_B"

# The sub-modules peft 0.21 puts inside a LoRA / VeRA ``Linear`` layer, relative to the layer,
# for the adapter name "default" (the one ``PeftModel.from_pretrained`` uses unless told
# otherwise). PEFT matches ``modules_to_save`` entries against these names too (a top-level
# module ``b`` cannot be saved next to a VeRA layer: ``q.vera_lambda_b`` ends with ``b``), so the
# export checks its entries against them. ``tests/test_peft_interop_roundtrip.py`` checks them against PEFT.
PEFT_LAYER_SUBMODULES: dict[str, tuple[str, ...]] = {
    "lora": (
        "base_layer", "lora_dropout", "lora_dropout.default", "lora_A", "lora_A.default", "lora_B",
        "lora_B.default", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
    ),
    "vera": ("base_layer", "vera_dropout", "vera_dropout.default", "vera_lambda_b", "vera_lambda_d", "vera_A", "vera_B"),
}

# PEFT's own warning (tuners/vera/model.py) when save_projection=False but the projections are stored.
_IGNORED_PROJECTIONS_WARNING = (
    "Specified to not load vera_A and vera_B from state dictionary however they are present in state"
    " dictionary! Consider using them to ensure checkpoint loading is correct on all platforms using"
    " `peft_config.save_projection = True`"
)


# ------------------------------------------------------------------------------ shared helpers


def _check_target(model: nn.Module, name: str) -> None:
    """The adapter's module ``name`` exists and is an ``nn.Linear`` or ``Conv1D``; else a clear error."""
    if not has_submodule(model, name):
        raise ValueError(f"the adapter names module {name!r}, which the model does not have")
    module = model.get_submodule(name)
    if not (isinstance(module, nn.Linear) or is_conv1d(module)):
        as_linear(module, f"the adapter targets {name}")  # raises the TypeError


def _inside(name: str, outer: str) -> bool:
    """Whether module ``name`` is ``outer`` or lies inside it (dotted names)."""
    return name == outer or name.startswith(outer + ".")


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


def _install(model: nn.Module, adapter_type: str, layers: dict[str, dict], shared: dict | None = None) -> nn.Module:
    """Wrap each named layer with its tensors, then freeze all but adapters and modules to save.

    ``layers[name]`` holds ``r``, ``kwargs`` for the layer and ``tensors`` ({param name: tensor});
    ``shared`` holds keyword arguments every layer shares (VeRA's ``projections``).
    """
    for name, spec in layers.items():  # all or nothing: every layer checked before the first is replaced
        _check_layer(model, name, adapter_type, spec, shared)
    for name, spec in layers.items():
        wrap(model, name, adapter_type, spec["r"], {**spec["kwargs"], **(shared or {})}, tensors=spec["tensors"])
    freeze_all_but_adapters(model)
    return model


def _check_layer(model: nn.Module, name: str, adapter_type: str, spec: dict, shared: dict | None = None) -> None:
    """What :func:`_install` will do at ``name`` cannot fail: the module is an ``nn.Linear`` /
    ``Conv1D``, the layer's constructor takes ``r`` and the settings, and every tensor has a
    parameter of its name and shape; checked on a twin of the layer built on the meta device (the
    model is not touched)."""
    _check_target(model, name)
    shared = {k: meta_twin(v) if isinstance(v, VeRAProjections) else v for k, v in (shared or {}).items()}
    twin = build_layer(adapter_type, meta_linear(model.get_submodule(name)), spec["r"], {**spec["kwargs"], **shared})
    check_tensors(twin.adapter_parameters(), spec["tensors"], name)


# ------------------------------------------------------------------------------ from PEFT layers


def from_peft_model(peft_model: nn.Module, adapter_name: str = "default", *, projection_seed: int | None = None) -> nn.Module:
    """Replace PEFT VeRA / LoRA layers by fused layers with the same tensors; returns the base model.

    Args:
        peft_model: a ``peft.PeftModel`` (its ``base_model.model`` is modified and returned) or any
            module holding PEFT VeRA / LoRA ``Linear`` layers (modified in place and returned).
        adapter_name: which adapter to take (PEFT's default ``"default"``).
        projection_seed: VeRA seed to record when ``peft_model`` has no ``peft_config`` to read it from.

    The result computes what PEFT computes after ``peft_model.set_adapter(adapter_name)``, with no
    PEFT module left:

    * a PEFT layer holding ``adapter_name`` becomes a fused layer with that adapter's tensors;
    * a PEFT layer holding only other adapters becomes its base layer (``nn.Linear``, GPT-2's
      ``Conv1D``, an embedding...);
    * a ``ModulesToSaveWrapper`` becomes its trained copy for ``adapter_name``
      (``modules_to_save[adapter_name]``), trainable and recorded with
      :func:`pefttriton.integration.surgery.add_modules_to_save`; one without that adapter becomes its
      original module.

    The checks run before the model changes: an unsupported or merged layer raises and leaves it
    as it was. The PEFT layers must not be merged. The other adapters are dropped, so
    ``peft_model`` must not be used afterwards.
    """
    from peft import PeftModel
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.tuners.vera.layer import Linear as PeftVeraLinear
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"peft_model must be a torch.nn.Module (a peft.PeftModel), got {type(peft_model).__name__}")
    if not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name must be a str, got {type(adapter_name).__name__}")
    configs = getattr(peft_model, "peft_config", None) or {}
    if configs and adapter_name not in configs:
        raise ValueError(f"adapter_name={adapter_name!r} is not an adapter of the model; it has {sorted(configs)}")
    model = peft_model.base_model.model if isinstance(peft_model, PeftModel) else peft_model
    peft_classes = (BaseTunerLayer, AuxiliaryTrainingWrapper)
    vera, lora = {}, {}
    plain: dict[str, nn.Module] = {}  # PEFT module name -> the plain module that replaces it
    save_names: list[str] = []
    shared = None
    visited: list[str] = []  # PEFT modules met; what lies inside them is handled with them
    for name, module in model.named_modules():
        if any(name.startswith(outer + ".") for outer in visited):
            continue
        if not isinstance(module, peft_classes):
            continue
        visited.append(name)
        if not name:
            raise TypeError("peft_model is itself a PEFT layer; pass the model that holds it")
        available = module._get_available_adapters()
        if isinstance(module, AuxiliaryTrainingWrapper):
            if adapter_name not in available:
                plain[name] = module.original_module  # what PEFT runs for an adapter it does not hold
            elif isinstance(module, ModulesToSaveWrapper):
                trained = module.modules_to_save[adapter_name]
                if any(isinstance(m, peft_classes) for m in trained.modules()):
                    raise TypeError(f"{name}: modules_to_save holds a PEFT layer, which is not supported")
                plain[name] = trained
                save_names.append(name)
            else:
                raise TypeError(
                    f"{name}: PEFT {type(module).__name__} (adapter {adapter_name!r}) is not supported; only "
                    "VeRA / LoRA Linear layers and modules_to_save are"
                )
            continue
        if module.merged:
            raise ValueError(f"PEFT layer {name!r} is merged; unmerge it before converting")
        base_layer = module.get_base_layer()
        if any(isinstance(m, peft_classes) for m in base_layer.modules()):
            raise TypeError(f"{name}: nested PEFT layers are not supported")
        if adapter_name not in available:
            # PEFT skips an adapter a layer does not hold: with set_adapter(adapter_name) this
            # layer computes exactly its base layer.
            plain[name] = base_layer
        elif isinstance(module, PeftVeraLinear):
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
                "base": base_layer,
            }
        elif isinstance(module, PeftLoraLinear):
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
                    "use_rslora": bool(module.use_rslora.get(adapter_name, False)),
                },
                "tensors": {
                    "lora_A": module.lora_A[adapter_name].weight.detach(),
                    "lora_B": module.lora_B[adapter_name].weight.detach(),
                },
                "base": base_layer,
            }
        else:
            raise TypeError(
                f"{name}: PEFT layer {type(module).__name__} (adapter {adapter_name!r}) is not supported (only VeRA "
                "and LoRA Linear)"
            )
    if not vera and not lora:
        raise ValueError(f"no PEFT VeRA or LoRA layer with adapter {adapter_name!r} found")
    projections = None
    if vera:
        A, B = shared
        if projection_seed is None:
            if adapter_name not in configs:
                raise ValueError("pass projection_seed: the model has no peft_config to read projection_prng_key from")
            projection_seed = configs[adapter_name].projection_prng_key
        d_initial = float(getattr(configs.get(adapter_name), "d_initial", 0.1))
        for spec in vera.values():
            spec["kwargs"]["d_initial"] = d_initial
        like = next(iter(vera.values()))["base"].weight  # Linear or Conv1D: same dtype, device
        projections = _vera_projections(A.shape[0], A.shape[1], B.shape[0], projection_seed, like, A, B)
    # Everything is checked: now change the model. PEFT's base layers go back first, then they
    # are wrapped like any checkpoint load.
    for name, module in plain.items():
        replace_module(model, name, module)
    for name, spec in {**vera, **lora}.items():
        replace_module(model, name, spec.pop("base"))
    if save_names:
        add_modules_to_save(model, save_names)  # freeze_all_but_adapters (in _install) keeps them trainable
    if vera:
        _install(model, "vera", vera, {"projections": projections})
    if lora:
        _install(model, "lora", lora)
    return model


# ------------------------------------------------------------------------------ from a PEFT checkpoint


def read_peft_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, config dict)`` of a PEFT adapter directory (safetensors weights only).

    Raises:
        FileNotFoundError: a file of the two is missing.
        ValueError naming the file: the weights are not a readable safetensors file (another
            format, cut short), the config is not a JSON object.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    weights, config = directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG
    for path in (weights, config):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (a PEFT adapter directory holds {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG})")
    try:
        with open(config, encoding="utf-8") as f:
            config_dict = json.load(f)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{config} is not valid JSON: {exc}") from exc
    if not isinstance(config_dict, dict):
        raise ValueError(f"{config} must hold a JSON object, got {type(config_dict).__name__}")
    try:
        state = load_file(str(weights))
    except SafetensorError as exc:  # safetensors' own message says what is wrong, not where
        raise ValueError(f"{weights} is not a readable safetensors file: {exc}") from exc
    return state, config_dict


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


def _saved_modules(model: nn.Module, entries, state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {state_dict key of the module: tensor}}`` for the checkpoint's ``modules_to_save``.

    PEFT's rule (``_set_trainable``): every module whose full name ends with an entry (plain
    ``str.endswith``); an outer match takes what lies inside it. Its tensors are stored as
    ``base_model.model.<module>.<key>`` for each key of the module's ``state_dict()``. A module
    with none of its tensors stored keeps its values and trains, as PEFT's fresh copy of it would
    (with a warning); one with only some is an error.
    """
    if not entries:
        return {}
    if isinstance(entries, str) or not all(isinstance(e, str) and e for e in entries):
        raise TypeError(f"the PEFT config's modules_to_save must be a list of module names, got {entries!r}")
    names: list[str] = []
    for name, _ in model.named_modules():
        if name and not any(_inside(name, outer) for outer in names) and any(name.endswith(e) for e in entries):
            names.append(name)
    saved = {}
    for name in names:
        keys = {f"{_PREFIX}{name}.{k}": k for k in model.get_submodule(name).state_dict()}
        if not keys:
            continue  # nothing to load, nothing to train (an activation, say)
        present = [key for key in keys if key in state_dict]
        if not present:
            warnings.warn(
                f"modules_to_save {list(entries)} names {name!r} but the adapter holds none of its tensors; it trains "
                "from its current values (as PEFT's copy of it would)",
                stacklevel=3,
            )
        elif len(present) != len(keys):
            missing = sorted(set(keys) - set(present))
            raise ValueError(f"the PEFT adapter holds only some tensors of module to save {name!r}; missing {missing[:8]}")
        saved[name] = {k: state_dict[key] for key, k in keys.items() if key in state_dict}
    return saved


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
        ``model``, with fused layers where the adapter has tensors; the modules named by the
        config's ``modules_to_save`` hold the stored tensors, train and are recorded
        (:func:`pefttriton.integration.surgery.modules_to_save`); everything else is frozen.

    VeRA follows PEFT's ``save_projection``: true, the stored ``vera_A`` / ``vera_B`` are used
    and must be present; false, they are redrawn from ``projection_prng_key`` sized to the
    adapted layers, and stored ones are ignored with PEFT's warning.
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
    if peft_type not in ("VERA", "LORA"):
        raise ValueError(f"only PEFT VERA and LORA adapters can be loaded, got peft_type {cfg.get('peft_type')!r}")
    saved = _saved_modules(model, cfg.get("modules_to_save"), state_dict)
    used = {f"{_PREFIX}{name}.{k}" for name, tensors in saved.items() for k in tensors}
    state_dict = {key: value for key, value in state_dict.items() if key not in used}
    if peft_type == "VERA":
        adapter_type, layers, projections = "vera", *_vera_layers(model, state_dict, cfg)
    else:
        adapter_type, layers, projections = "lora", _lora_layers(state_dict, cfg), None
    clash = [(layer, name) for layer in layers for name in saved if _inside(layer, name) or _inside(name, layer)]
    if clash:
        raise ValueError(f"the PEFT adapter both adapts and fully saves {clash[:4]}; a module is one or the other")
    # All or nothing: the modules to save and every layer are checked before anything is written.
    for name, tensors in saved.items():
        check_tensors(model.get_submodule(name).state_dict(), tensors, name)
    shared = {"projections": projections} if projections is not None else None
    for name, spec in layers.items():
        _check_layer(model, name, adapter_type, spec, shared)
    for name, tensors in saved.items():
        copy_tensors(model.get_submodule(name).state_dict(), tensors, name)
    if saved:
        add_modules_to_save(model, list(saved))  # freeze_all_but_adapters (in _install) keeps them trainable
    return _install(model, adapter_type, layers, shared)


def _vera_layers(model, state_dict, cfg) -> tuple[dict, VeRAProjections]:
    parts = _split_keys(state_dict, ("vera_lambda_b", "vera_lambda_d"), (_VERA_A, _VERA_B))
    r = int(cfg.get("r", 256))
    if cfg.get("vera_dropout", 0.0):
        warnings.warn(
            f"vera_dropout={cfg['vera_dropout']} is not applied (fused VeRA has no dropout); inference is unaffected",
            stacklevel=3,
        )
    shapes = {}  # name -> (in_features, out_features), without converting Conv1D layers yet
    for name in parts:
        _check_target(model, name)
        module = model.get_submodule(name)
        shapes[name] = tuple(module.weight.shape) if is_conv1d(module) else (module.in_features, module.out_features)
    like = model.get_submodule(next(iter(parts))).weight
    A, B = state_dict.get(_VERA_A), state_dict.get(_VERA_B)
    if (A is None) != (B is None):
        raise ValueError(f"the PEFT VeRA adapter holds only one of {_VERA_A} / {_VERA_B}")
    # PEFT's rule (VeraModel._remap_adapter_state_dict_for_load): save_projection (default True)
    # says where the projections come from, whatever the file holds.
    save_projection = bool(cfg.get("save_projection", True))
    if save_projection and A is None:
        raise ValueError(
            f"the PEFT VeRA config has save_projection=True but the adapter holds no {_VERA_A} / {_VERA_B} (PEFT "
            "refuses it too); if it was saved with save_projection=False, set that in its config"
        )
    if not save_projection and A is not None:
        warnings.warn(_IGNORED_PROJECTIONS_WARNING, stacklevel=3)
        A = B = None
    if A is not None:
        if A.dim() != 2 or B.dim() != 2:
            raise ValueError(f"{_VERA_A} / {_VERA_B} must be 2-D, got shapes {tuple(A.shape)}, {tuple(B.shape)}")
        max_in, max_out = A.shape[1], B.shape[0]
    else:  # PEFT redraws them sized by _find_dim over the adapted layers
        max_in = max(n for n, _ in shapes.values())
        max_out = max(m for _, m in shapes.values())
    projections = _vera_projections(r, max_in, max_out, int(cfg.get("projection_prng_key", 0)), like, A, B)
    # PEFT sets lambda_d to d_initial before loading the stored values; the fused layers keep it.
    kwargs = {"d_initial": float(cfg.get("d_initial", 0.1))}
    layers = {
        name: {"r": r, "kwargs": dict(kwargs), "tensors": {"lambda_b": p["vera_lambda_b"], "lambda_d": p["vera_lambda_d"]}}
        for name, p in parts.items()
    }
    return layers, projections


def _lora_layers(state_dict, cfg) -> dict:
    for flag in ("use_dora", "lora_bias"):
        if cfg.get(flag):
            raise ValueError(f"PEFT LoRA adapters with {flag}=True are not supported")
    parts = _split_keys(state_dict, ("lora_A.weight", "lora_B.weight"))
    layers = {}
    for name, p in parts.items():
        r = p["lora_A.weight"].shape[0]
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), name, cfg.get("lora_alpha", 8)))
        kwargs = {"alpha": alpha, "dropout": float(cfg.get("lora_dropout", 0.0)), "use_rslora": bool(cfg.get("use_rslora"))}
        layers[name] = {"r": r, "kwargs": kwargs, "tensors": {"lora_A": p["lora_A.weight"], "lora_B": p["lora_B.weight"]}}
    return layers


# ------------------------------------------------------------------------------ to a PEFT checkpoint


def _target_regex(names: list[str]) -> str:
    """A ``target_modules`` str that PEFT's ``re.fullmatch`` matches against exactly ``names``."""
    return "(?:" + "|".join(re.escape(name) for name in names) + ")"


def _pattern_key(name: str) -> str:
    """A ``rank_pattern`` / ``alpha_pattern`` key that only the module called ``name`` matches.

    PEFT tries ``re.match(rf"(.*\\.)?({key})$", module name)``: with ``^`` in front, the optional
    prefix must be empty, so the key matches ``name`` and not ``sub.name``.
    """
    return "^" + re.escape(name)


def _export_modules_to_save(model: nn.Module, adapted: list[str]) -> list[str]:
    """Full names of the modules to save in PEFT's format (outermost only).

    The recorded :func:`pefttriton.integration.surgery.modules_to_save` plus the owning module of every
    other trainable parameter that is not an adapter's (a head unfrozen by hand).
    """
    adapter_ids = {id(p) for _, layer in adapter_layers(model) for p in layer.adapter_parameters().values()}
    wanted = list(modules_to_save(model))
    for pname, p in model.named_parameters():
        if p.requires_grad and id(p) not in adapter_ids:
            owner = pname.rpartition(".")[0]
            if owner not in wanted:
                wanted.append(owner)
    for name in wanted:
        if not name:
            raise ValueError(
                "a trainable parameter belongs to the model's root module; PEFT's modules_to_save saves whole "
                "sub-modules only: freeze it (requires_grad_(False)) or move it into a sub-module"
            )
        for layer in adapted:
            if _inside(name, layer):
                raise ValueError(
                    f"{name!r} trains but lies inside the adapted layer {layer!r}; PEFT cannot save it: freeze it "
                    "(requires_grad_(False)) before exporting"
                )
            if _inside(layer, name):
                raise ValueError(
                    f"module to save {name!r} holds the adapted layer {layer!r}; PEFT never adapts inside modules_to_save"
                )
        module = model.get_submodule(name)
        if isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)):
            raise ValueError(
                f"module to save {name!r} is a {type(module).__name__}, which PEFT cannot wrap; name its children"
            )
    return [name for name in wanted if not any(_inside(name, outer) for outer in wanted if outer != name)]


def _peft_view_names(model: nn.Module, kind: str) -> list[str]:
    """The module names PEFT's ``_set_trainable`` walks in the model ``PeftModel`` builds from a
    fresh base: this model's names, with each fused layer's inside replaced by PEFT's."""
    fused = {name for name, _ in adapter_layers(model)}
    names = []
    for name, _ in model.named_modules(remove_duplicate=False):  # PEFT keeps duplicates (tied modules)
        if any(name.startswith(layer + ".") for layer in fused):
            continue
        names.append(name)
        if name in fused:
            names.extend(f"{name}.{child}" for child in PEFT_LAYER_SUBMODULES[kind])
    return names


def _excludes(entry: str, layer: str) -> bool:
    """Whether PEFT keeps ``layer`` from being adapted because of the modules_to_save ``entry``.

    PEFT (``check_target_module_exists``) puts the entry into a regex unescaped; an entry that is
    no valid regex would make PEFT raise, so it counts as excluding.
    """
    try:
        return re.match(rf"(^|.*\.){entry}($|\..*)", layer) is not None
    except re.error:
        return True


def _modules_to_save_entries(model: nn.Module, names: list[str], adapted: list[str], kind: str) -> list[str]:
    """PEFT ``modules_to_save`` entries that name exactly the modules ``names``.

    PEFT wraps every module whose name ends with an entry (``key.endswith(entry)``, no dot
    boundary) and excludes from adaptation every layer with
    ``re.match(rf"(^|.*\\.){entry}($|\\..*)", layer)``. Per module, the shortest dotted suffix of
    its name passing both tests is taken (``classifier`` rather than the full name, as PEFT's
    own configs read).

    Raises:
        ValueError: no suffix of a name passes (another module's name ends with the full name, or
            the name as a regex also matches an adapted layer).
    """
    view = _peft_view_names(model, kind)
    wanted = set(names)
    entries = []
    for name in names:
        parts = name.split(".")
        for start in range(len(parts) - 1, -1, -1):
            entry = ".".join(parts[start:])
            others = sorted({key for key in view if key.endswith(entry)} - wanted)
            excluded = [layer for layer in adapted if _excludes(entry, layer)]
            if not others and not excluded:
                entries.append(entry)
                break
        else:  # others / excluded now hold what the full name hits
            reasons = []
            if others:
                reasons.append(f"PEFT would also wrap {others[:4]}, whose names end with {name!r} too")
            if excluded:
                reasons.append(f"PEFT would not adapt {excluded[:4]} (the entry, as a regex, matches them)")
            raise ValueError(
                f"module to save {name!r} cannot be named in PEFT's modules_to_save: {'; '.join(reasons)}. "
                "Rename the module, or train the modules it also names (then one entry names them all)"
            )
    return entries


def to_peft_state_dict(model: nn.Module, *, save_projection: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, adapter_config dict)`` in PEFT's saved format for the fused layers of ``model``.

    All fused layers must be of one kind: VeRA (sharing one projection pair with ``r`` equal to
    the projections' rank, as PEFT requires, and one ``d_initial``), LoRA, or Deep LoRA (exported
    as the LoRA with ``lora_A = W2 W1``, ``lora_B = W3``, ``lora_alpha = r``: the same update, no
    longer factored). Layers converted from GPT-2's Conv1D set ``fan_in_fan_out``. Merged layers
    are refused.

    Names (see the module docstring for PEFT's matching rules): ``target_modules`` is one regex
    that matches exactly the fused layers; ``rank_pattern`` / ``alpha_pattern`` keys match one
    layer each; ``modules_to_save`` names exactly the recorded modules to save
    (:func:`pefttriton.integration.surgery.modules_to_save`) and the owners of any other trainable
    non-adapter parameter, whose ``state_dict()`` tensors are written as
    ``base_model.model.<module>.<key>`` in their own dtype. ``task_type`` stays None: then
    ``PeftModel.from_pretrained`` builds a plain ``PeftModel``, which wraps exactly those
    modules (a task type such as ``SEQ_CLS`` would add its own ``classifier`` / ``score``).
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no fused adapter layer")
    kinds = {adapter_of(layer).name for _, layer in layers}
    if len(kinds) != 1:
        raise ValueError(f"a PEFT adapter holds one kind of adapter; the model mixes {sorted(kinds)}")
    kind = kinds.pop()
    if kind not in ("vera", "lora", "deep_lora"):
        raise ValueError(f"PEFT has no {kind!r} adapter; only VeRA, LoRA and Deep LoRA (as LoRA) can be exported")
    for name, layer in layers:
        if layer.merged:
            raise ValueError(f"layer {name!r} is merged; unmerge it before saving")
    names = [name for name, _ in layers]
    peft_kind = "vera" if kind == "vera" else "lora"
    save_names = _export_modules_to_save(model, names)
    save_entries = _modules_to_save_entries(model, save_names, names, peft_kind) if save_names else None
    fan_in_fan_out = any(layer.fan_in_fan_out for _, layer in layers)
    common = {
        "base_model_name_or_path": None,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
        "modules_to_save": save_entries,
        "revision": None,
        "target_modules": _target_regex(names),
        "task_type": None,
    }
    state = {}
    for name in save_names:
        for key, value in model.get_submodule(name).state_dict().items():
            # a copy: safetensors refuses tensors that share memory (a tied weight, say)
            state[f"{_PREFIX}{name}.{key}"] = value.detach().clone().contiguous()
    if kind == "vera":
        projections = {id(layer.projections): layer.projections for _, layer in layers}
        if len(projections) != 1:
            raise ValueError("PEFT's VeRA has one shared projection pair; the model's VeRA layers use several")
        proj = projections.popitem()[1]
        bad = [name for name, layer in layers if layer.r != proj.r]
        if bad:
            raise ValueError(f"PEFT's VeRA uses the projections' full rank {proj.r} in every layer; {bad[:4]} differ")
        # PEFT's config has one d_initial. It only sets lambda_d before the saved values overwrite
        # it, so it never changes what PEFT computes; still, a config value that misdescribes a
        # layer is refused rather than silently picked.
        d_initials = {layer.d_initial for _, layer in layers}
        if len(d_initials) != 1:
            raise ValueError(
                f"PEFT's VeRA config has one d_initial; the model's VeRA layers have {sorted(d_initials)}. Set "
                "layer.d_initial to one value on every layer to export (it only sets PEFT's initial lambda_d)"
            )
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
            state[_VERA_A] = redrawn.vera_A if from_seed else ours_A.float().contiguous()
            state[_VERA_B] = redrawn.vera_B if from_seed else ours_B.float().contiguous()
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
            "d_initial": d_initials.pop(),
            "init_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
        }
        return state, config
    if len({getattr(layer, "dropout", 0.0) for _, layer in layers}) > 1:
        raise ValueError("PEFT's LoRA has one lora_dropout for all layers; the model's layers use different ones")
    # PEFT recomputes scaling = lora_alpha / r (or / sqrt(r) with use_rslora, one flag for all
    # layers). Write alpha itself when that reproduces each layer's scale exactly; otherwise
    # (layers that differ in use_rslora) alpha = scale * r, which may differ in the last bit.
    use_rslora = kind == "lora" and all(layer.use_rslora for _, layer in layers)
    ranks, alphas = {}, {}
    for name, layer in layers:
        if kind == "lora":
            A, B = layer.lora_A, layer.lora_B
            alpha = layer.alpha if layer.use_rslora == use_rslora else layer.scale * layer.r
        else:
            A, B = layer.engine_inputs(torch.float32)[:2]
            alpha = float(layer.r)
        state[f"{_PREFIX}{name}.lora_A.weight"] = A.detach().float().contiguous()
        state[f"{_PREFIX}{name}.lora_B.weight"] = B.detach().float().contiguous()
        ranks[name], alphas[name] = layer.r, alpha
    r0, alpha0 = ranks[names[0]], alphas[names[0]]
    config = {
        **common,
        "peft_type": "LORA",
        "r": r0,
        "lora_alpha": alpha0,
        "lora_dropout": float(getattr(layers[0][1], "dropout", 0.0)),
        "rank_pattern": {_pattern_key(name): r for name, r in ranks.items() if r != r0},
        "alpha_pattern": {_pattern_key(name): a for name, a in alphas.items() if a != alpha0},
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

    ``peft.PeftModel.from_pretrained(base_model, directory)`` then rebuilds the adapter and the
    modules to save, with ``base_model`` a fresh copy of the model the fused layers were injected
    into.
    """
    from safetensors.torch import save_file

    state, config = to_peft_state_dict(model, save_projection=save_projection)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(directory / ADAPTER_CONFIG, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


__all__ = ["from_peft_model", "load_peft_adapter", "read_peft_checkpoint", "save_peft_adapter", "to_peft_state_dict"]
