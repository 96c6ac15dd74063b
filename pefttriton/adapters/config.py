"""Adapter configurations for :func:`pefttriton.inject`.

Small dataclasses, one per adapter, that keep HF PEFT's field names where the meaning is the same
(``r``, ``target_modules``, ``exclude_modules``, ``d_initial``, ``lora_alpha``, ``lora_dropout``),
so a PEFT config translates field by field:

============================  ====================================================
PEFT                          pefttriton
============================  ====================================================
``VeraConfig.r``              ``VeRAConfig.r``
``projection_prng_key``       ``VeRAConfig.projection_seed`` (also readable and
                              settable as ``projection_prng_key``)
``d_initial``                 ``VeRAConfig.d_initial``
``LoraConfig.lora_alpha``     ``LoRAConfig.lora_alpha`` (the module's ``alpha``)
``LoraConfig.lora_dropout``   ``LoRAConfig.lora_dropout`` (the module's ``dropout``)
``fan_in_fan_out``            not needed: GPT-2's ``Conv1D`` is recognised by type
============================  ====================================================

``target_modules`` means what it means in PEFT: a list of names, each matching a module whose
full name equals it or ends with ``"." + name``; or one regular expression that must match the
full module name (``re.fullmatch``). ``exclude_modules`` removes matches the same way.
``modules_to_save`` names, by the same list rule, modules that train in full beside the adapters
(a classification head, say; PEFT's ``modules_to_save``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from pefttriton.adapters.adapter_layer import AdapterLayer, check_finite
from pefttriton.adapters.deep_lora import FusedDeepLoRALinear
from pefttriton.adapters.lora import FusedLoRALinear
from pefttriton.adapters.lorma import FusedLoRMALinear
from pefttriton.adapters.vera import FusedVeRALinear, VeRAProjections


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _normalise_targets(name: str, value, *, required: bool) -> list[str] | str | None:
    if value is None:
        if required:
            raise ValueError(f"{name} must be a list of module names or a regex string, got None")
        return None
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{name} must not be an empty string")
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        if not all(isinstance(item, str) and item for item in value):
            raise TypeError(f"{name} must contain only non-empty str module names, got {value!r}")
        if required and not value:
            raise ValueError(f"{name} must name at least one module")
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise TypeError(f"{name} must be a list of module names or a regex string, got {type(value).__name__}")


def layer_default(layer_class: type[AdapterLayer], setting: str):
    """The default of ``setting`` in ``layer_class``'s constructor: the one source of a config's default."""
    return inspect.signature(layer_class.__init__).parameters[setting].default


@dataclass
class AdapterConfig:
    """Fields every adapter config has (see the module docstring for their meaning).

    A subclass names its layer class and, in ``layer_settings``, which of its fields are which
    settings of that layer (``{"lora_alpha": "alpha"}``); their defaults are the layer's own.
    """

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    layer_class: ClassVar[type[AdapterLayer]] = AdapterLayer
    layer_settings: ClassVar[dict[str, str]] = {}

    @property
    def adapter_type(self) -> str:
        """Name of the adapter, as stored in checkpoints (``"vera"``, ``"lora"``, ...)."""
        return self.layer_class.adapter_type

    def __post_init__(self) -> None:
        _check_positive_int("r", self.r)
        self.target_modules = _normalise_targets("target_modules", self.target_modules, required=True)
        self.exclude_modules = _normalise_targets("exclude_modules", self.exclude_modules, required=False)
        if isinstance(self.modules_to_save, str):
            raise TypeError("modules_to_save must be a list of module names, got a str (PEFT takes no regex here)")
        self.modules_to_save = _normalise_targets("modules_to_save", self.modules_to_save, required=False)

    def to_dict(self) -> dict:
        """JSON-serialisable fields plus ``adapter_type``."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["adapter_type"] = self.adapter_type
        return out

    def layer_kwargs(self) -> dict:
        """Keyword arguments of the layer's constructor besides ``base_layer`` and ``r``."""
        return {setting: getattr(self, field) for field, setting in self.layer_settings.items()}

    def shared_layer_kwargs(self, weights: list[torch.Tensor]) -> dict:
        """Keyword arguments that every layer of one :func:`~pefttriton.inject` shares, built once
        from the (out_features, in_features) base weights of its targets (VeRA's projections);
        none by default."""
        return {}


@dataclass
class VeRAConfig(AdapterConfig):
    """VeRA: ``W0 + diag(lambda_b) B diag(lambda_d) A`` with ``A``, ``B`` shared, frozen, from a seed.

    Args:
        r: rank of the shared projections (PEFT's default 256; the paper uses 256 to 1024).
        target_modules: which layers to adapt (see the module docstring).
        exclude_modules: layers to leave alone even when they match.
        modules_to_save: modules that train in full beside the adapters (a classification head).
        projection_seed: seed of the shared projections (PEFT's ``projection_prng_key``).
        d_initial: initial value of every ``lambda_d`` entry (``lambda_b`` starts at 0).
    """

    r: int = 256
    projection_seed: int = layer_default(FusedVeRALinear, "projection_seed")
    d_initial: float = layer_default(FusedVeRALinear, "d_initial")

    layer_class = FusedVeRALinear
    layer_settings = {"d_initial": "d_initial"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.projection_seed, bool) or not isinstance(self.projection_seed, int):
            raise TypeError(f"projection_seed must be an int, got {type(self.projection_seed).__name__}")
        check_finite("d_initial", self.d_initial)

    @property
    def projection_prng_key(self) -> int:
        """PEFT's name for :attr:`projection_seed`."""
        return self.projection_seed

    @projection_prng_key.setter
    def projection_prng_key(self, value: int) -> None:
        self.projection_seed = value

    def shared_layer_kwargs(self, weights: list[torch.Tensor]) -> dict:
        """One :class:`VeRAProjections` of rank ``r`` sized to the largest in- and out-features
        among the targets (PEFT's ``_find_dim``), drawn from ``projection_seed`` as PEFT draws them."""
        kinds = {(w.dtype, w.device) for w in weights}
        if len(kinds) != 1:
            raise ValueError(f"VeRA layers share one projection pair, so targets must share dtype and device; got {kinds}")
        dtype, device = kinds.pop()
        max_out = max(w.shape[0] for w in weights)
        max_in = max(w.shape[1] for w in weights)
        projections = VeRAProjections(self.r, max_in, max_out, seed=self.projection_seed, dtype=dtype, device=device)
        return {"projections": projections}


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA: ``W0 + (lora_alpha / r) B A``.

    Args:
        r: rank (PEFT's default 8).
        target_modules, exclude_modules: which layers to adapt.
        modules_to_save: modules that train in full beside the adapters (a classification head).
        lora_alpha: scale numerator (PEFT's default 8); the module's ``alpha``.
        lora_dropout: dropout on the adapter input (PEFT's default 0); the module's ``dropout``.
        use_rslora: scale by ``lora_alpha / sqrt(r)`` (PEFT's ``use_rslora``).
    """

    lora_alpha: float = layer_default(FusedLoRALinear, "alpha")
    lora_dropout: float = layer_default(FusedLoRALinear, "dropout")
    use_rslora: bool = layer_default(FusedLoRALinear, "use_rslora")

    layer_class = FusedLoRALinear
    layer_settings = {"lora_alpha": "alpha", "lora_dropout": "dropout", "use_rslora": "use_rslora"}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_finite("lora_alpha", self.lora_alpha)
        check_finite("lora_dropout", self.lora_dropout)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise TypeError(f"use_rslora must be a bool, got {self.use_rslora!r}")


@dataclass
class DeepLoRAConfig(AdapterConfig):
    """Deep LoRA: ``W0 + W3 W2 W1`` (compressed three-factor update).

    Args:
        r: compressed width (the authors use 8).
        target_modules, exclude_modules: which layers to adapt.
        modules_to_save: modules that train in full beside the adapters (a classification head).
        eps: initialisation scale (the authors' 1e-3).

    After :func:`pefttriton.inject`, run :func:`pefttriton.adapters.deep_lora.compress_init` for the
    paper's initialisation and use :func:`pefttriton.adapters.deep_lora.discrepant_param_groups`.
    """

    eps: float = layer_default(FusedDeepLoRALinear, "eps")

    layer_class = FusedDeepLoRALinear
    layer_settings = {"eps": "eps"}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_finite("eps", self.eps, positive=True)


@dataclass
class LoRMAConfig(AdapterConfig):
    """LoRMA: multiplicative ``(I + s B A) W0`` ("plus"), ``s shift(B A) W0`` ("pi") or ``s B A W0`` ("naive").

    Args:
        r: rank.
        target_modules, exclude_modules: which layers to adapt.
        modules_to_save: modules that train in full beside the adapters (a classification head).
        alpha: scale numerator, ``s = alpha / r`` (the authors' MetaMathQA default 16).
        variant: ``"plus"``, ``"pi"`` or ``"naive"``.
    """

    alpha: float = layer_default(FusedLoRMALinear, "alpha")
    variant: str = layer_default(FusedLoRMALinear, "variant")

    layer_class = FusedLoRMALinear
    layer_settings = {"alpha": "alpha", "variant": "variant"}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_finite("alpha", self.alpha, positive=True)
        if self.variant not in ("plus", "pi", "naive"):
            raise ValueError(f"variant must be 'plus', 'pi' or 'naive', got {self.variant!r}")


__all__ = ["AdapterConfig", "VeRAConfig", "LoRAConfig", "DeepLoRAConfig", "LoRMAConfig", "layer_default"]
