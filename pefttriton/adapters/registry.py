"""The one place that knows which adapters exist: adapter name -> (config class, layer class).

Injection, saving and loading, PEFT interop and the benchmarks read it. A new adapter is a layer
class (a subclass of :class:`~pefttriton.adapters.adapter_layer.AdapterLayer`) and a config class (a
subclass of :class:`~pefttriton.adapters.config.AdapterConfig` naming it), registered once::

    pefttriton.register_adapter(MyConfig, MyLayer)

after which :func:`pefttriton.inject`, :func:`pefttriton.merge_and_unload`,
:func:`pefttriton.save_adapter` and :func:`pefttriton.load_adapter` handle it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from torch import nn

from pefttriton.adapters.adapter_layer import AdapterLayer
from pefttriton.adapters.config import AdapterConfig, DeepLoRAConfig, LoRAConfig, LoRMAConfig, VeRAConfig


@dataclass(frozen=True)
class Adapter:
    """A registered adapter: its name (``layer_class.adapter_type``), config class and layer class."""

    name: str
    config_class: type[AdapterConfig]
    layer_class: type[AdapterLayer]


_ADAPTERS: dict[str, Adapter] = {}


def register_adapter(config_class: type[AdapterConfig], layer_class: type[AdapterLayer]) -> Adapter:
    """Register an adapter under ``layer_class.adapter_type``; returns its entry.

    Raises:
        TypeError: the classes are not an ``AdapterConfig`` naming this ``AdapterLayer``.
        ValueError: the name is empty or already registered to other classes.
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, AdapterLayer)):
        raise TypeError(f"layer_class must be a subclass of AdapterLayer, got {layer_class!r}")
    if not (isinstance(config_class, type) and issubclass(config_class, AdapterConfig)):
        raise TypeError(f"config_class must be a subclass of AdapterConfig, got {config_class!r}")
    if config_class.layer_class is not layer_class:
        raise TypeError(f"{config_class.__name__}.layer_class is {config_class.layer_class.__name__}, not {layer_class.__name__}")
    name = layer_class.adapter_type
    if not name or not isinstance(name, str):
        raise ValueError(f"{layer_class.__name__}.adapter_type must be a non-empty str, got {name!r}")
    entry = Adapter(name, config_class, layer_class)
    if _ADAPTERS.get(name, entry) != entry:
        raise ValueError(f"an adapter named {name!r} is already registered ({_ADAPTERS[name].layer_class.__name__})")
    _ADAPTERS[name] = entry
    return entry


def unregister_adapter(name: str) -> None:
    """Forget the adapter ``name`` (for tests of a temporary adapter)."""
    _ADAPTERS.pop(name, None)


def adapters() -> dict[str, Adapter]:
    """Every registered adapter by name, in registration order."""
    return dict(_ADAPTERS)


def get_adapter(name: str) -> Adapter:
    """The adapter registered as ``name``; ValueError listing the known ones otherwise."""
    if name not in _ADAPTERS:
        raise ValueError(f"unknown adapter {name!r}; registered adapters: {sorted(_ADAPTERS)}")
    return _ADAPTERS[name]


def layer_classes() -> tuple[type[AdapterLayer], ...]:
    """Every registered layer class (for ``isinstance``)."""
    return tuple(entry.layer_class for entry in _ADAPTERS.values())


def adapter_of(module: nn.Module) -> Adapter | None:
    """The registered adapter ``module`` is a layer of, else None."""
    for entry in _ADAPTERS.values():
        if type(module) is entry.layer_class:
            return entry
    for entry in _ADAPTERS.values():
        if isinstance(module, entry.layer_class):
            return entry
    return None


def config_from_dict(data: dict) -> AdapterConfig:
    """Inverse of ``config.to_dict()``."""
    if not isinstance(data, dict) or data.get("adapter_type") not in _ADAPTERS:
        raise ValueError(f"not the dict of a registered adapter config: {data!r}")
    cls = _ADAPTERS[data["adapter_type"]].config_class
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


for _config_class in (VeRAConfig, LoRAConfig, DeepLoRAConfig, LoRMAConfig):
    register_adapter(_config_class, _config_class.layer_class)
