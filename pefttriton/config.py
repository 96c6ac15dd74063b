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

import math
from dataclasses import dataclass, fields


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite float, got {value!r}")


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


@dataclass
class _AdapterConfig:
    """Fields every adapter config has (see the module docstring for their meaning)."""

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    #: Name of the adapter, as stored in checkpoints (``"vera"``, ``"lora"``, ...).
    adapter_type = ""

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
        """Keyword arguments of the fused module's constructor besides ``base_layer`` and ``r``."""
        raise NotImplementedError


@dataclass
class VeRAConfig(_AdapterConfig):
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
    projection_seed: int = 0
    d_initial: float = 0.1

    adapter_type = "vera"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.projection_seed, bool) or not isinstance(self.projection_seed, int):
            raise TypeError(f"projection_seed must be an int, got {type(self.projection_seed).__name__}")
        _check_finite("d_initial", self.d_initial)

    @property
    def projection_prng_key(self) -> int:
        """PEFT's name for :attr:`projection_seed`."""
        return self.projection_seed

    @projection_prng_key.setter
    def projection_prng_key(self, value: int) -> None:
        self.projection_seed = value

    def layer_kwargs(self) -> dict:
        return {"d_initial": float(self.d_initial)}


@dataclass
class LoRAConfig(_AdapterConfig):
    """LoRA: ``W0 + (lora_alpha / r) B A``.

    Args:
        r: rank (PEFT's default 8).
        target_modules, exclude_modules: which layers to adapt.
        modules_to_save: modules that train in full beside the adapters (a classification head).
        lora_alpha: scale numerator (PEFT's default 8); the module's ``alpha``.
        lora_dropout: dropout on the adapter input (PEFT's default 0); the module's ``dropout``.
    """

    lora_alpha: float = 8.0
    lora_dropout: float = 0.0

    adapter_type = "lora"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_finite("lora_alpha", self.lora_alpha)
        _check_finite("lora_dropout", self.lora_dropout)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")

    def layer_kwargs(self) -> dict:
        return {"alpha": float(self.lora_alpha), "dropout": float(self.lora_dropout)}


@dataclass
class DeepLoRAConfig(_AdapterConfig):
    """Deep LoRA: ``W0 + W3 W2 W1`` (compressed three-factor update).

    Args:
        r: compressed width (the authors use 8).
        target_modules, exclude_modules: which layers to adapt.
        modules_to_save: modules that train in full beside the adapters (a classification head).
        eps: initialisation scale; None takes the module's default (the authors' 1e-3).

    After :func:`pefttriton.inject`, run :func:`pefttriton.deep_lora.compress_init` for the
    paper's initialisation and use :func:`pefttriton.deep_lora.discrepant_param_groups`.
    """

    eps: float | None = None

    adapter_type = "deep_lora"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eps is not None:
            _check_finite("eps", self.eps)
            if self.eps <= 0:
                raise ValueError(f"eps must be positive, got {self.eps!r}")

    def layer_kwargs(self) -> dict:
        return {} if self.eps is None else {"eps": float(self.eps)}


@dataclass
class LoRMAConfig(_AdapterConfig):
    """LoRMA: multiplicative ``(I + s B A) W0`` ("plus"), ``s shift(B A) W0`` ("pi") or ``s B A W0`` ("naive").

    Args:
        r: rank.
        target_modules, exclude_modules: which layers to adapt.
        modules_to_save: modules that train in full beside the adapters (a classification head).
        alpha: scale numerator, ``s = alpha / r``; None takes the module's default.
        variant: ``"plus"``, ``"pi"`` or ``"naive"``.
    """

    alpha: float | None = None
    variant: str = "plus"

    adapter_type = "lorma"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha is not None:
            _check_finite("alpha", self.alpha)
        if self.variant not in ("plus", "pi", "naive"):
            raise ValueError(f"variant must be 'plus', 'pi' or 'naive', got {self.variant!r}")

    def layer_kwargs(self) -> dict:
        kwargs = {"variant": self.variant}
        if self.alpha is not None:
            kwargs["alpha"] = float(self.alpha)
        return kwargs


CONFIG_CLASSES: dict[str, type[_AdapterConfig]] = {
    cls.adapter_type: cls for cls in (VeRAConfig, LoRAConfig, DeepLoRAConfig, LoRMAConfig)
}
"""``adapter_type`` -> config class."""


def config_from_dict(data: dict) -> _AdapterConfig:
    """Inverse of ``config.to_dict()``."""
    if not isinstance(data, dict) or data.get("adapter_type") not in CONFIG_CLASSES:
        raise ValueError(f"not a pefttriton adapter config: {data!r}")
    cls = CONFIG_CLASSES[data["adapter_type"]]
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


__all__ = ["VeRAConfig", "LoRAConfig", "DeepLoRAConfig", "LoRMAConfig", "config_from_dict", "CONFIG_CLASSES"]
