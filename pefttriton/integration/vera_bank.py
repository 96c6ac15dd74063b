"""Serving many VeRA adapters at once: a bank of adapters per layer, one adapter per row of a batch.

VeRA's ``A`` and ``B`` are frozen and shared, so an adapter is only its two vectors per layer,
``lambda_d`` (r,) and ``lambda_b`` (out,). A :class:`VeRABank` holds the frozen base layer, the
shared projections and a table of K adapters (``lambda_d`` (K, r), ``lambda_b`` (K, out)); its
forward takes an adapter id per token row or per sequence (``-1``: the base model) and computes
every row with its own adapter in one pass (:func:`pefttriton.ops.vera_bank.vera_bank_linear`), at
the cost of one adapter.

Model level::

    inject_banks(model, ["q_proj", "v_proj"], r=256, projection_seed=0)   # or to_banks(model)
    load_into_banks(model, "support", "peft_vera_dir")        # a PEFT VeRA checkpoint directory
    load_into_banks(model, "legal", "legal.safetensors")      # or a pefttriton.save_adapter file
    with adapter_ids(model, ["support", "legal", -1]):        # one id per sequence
        out = model.generate(input_ids, max_new_tokens=20)

Every bank of a model holds the same adapters under the same ids (the model-level functions keep
them in step), so one id per sequence selects the adapter in every layer.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from pefttriton.adapters.config import VeRAConfig
from pefttriton.ops.validation import check_base_and_rank
from pefttriton.ops.vera_bank import (
    broadcast_sequence_ids,
    _vera_bank_in_range,
    adapter_id_range,
    check_adapter_ids,
    index_ids,
    vera_bank_linear,
)
from pefttriton.integration.peft_interop import read_peft_checkpoint
from pefttriton.integration.save import read_adapter
from pefttriton.integration.surgery import as_linear, find_targets, matches, replace_module
from pefttriton.adapters.vera import FusedVeRALinear, VeRAProjections, layer_projections

# Ids set by :func:`adapter_ids` for the banks of a model:
# {id(bank): (ids, (smallest, largest) id, the bank's names by id when the block began)}.
_ACTIVE_IDS: contextvars.ContextVar[dict[int, tuple] | None] = contextvars.ContextVar(
    "pefttriton_vera_bank_ids", default=None
)


class VeRABank(nn.Module):
    """A frozen ``nn.Linear`` plus a bank of VeRA adapters sharing one pair of projections.

    Args:
        base_layer: the ``nn.Linear`` to adapt; its weight and bias are frozen.
        r: VeRA rank of every adapter of the bank.
        projection_seed: seed of the shared projections when this layer makes its own.
        projections: a :class:`~pefttriton.adapters.vera.VeRAProjections` shared with other layers (as
            :class:`~pefttriton.adapters.vera.FusedVeRALinear` takes it); made from ``projection_seed`` and this
            layer's shape when None.
        fan_in_fan_out: the layer stands for GPT-2's ``Conv1D`` (recorded only).

    Tables: ``lambda_d`` (K, r) and ``lambda_b`` (K, out_features), parameters that do not require
    gradients (float32; float64 for a float64 base layer). ``K`` is the number of slots: adapter ids
    are slot indices. :meth:`remove_adapter` frees a slot (zeroed: an id pointing at it computes the
    base layer) without changing any other adapter's id; :meth:`add_adapter` reuses the lowest free
    slot. Adding or removing replaces the table parameters (make an optimizer afterwards).
    ``state_dict()`` holds the tables and the names; ``load_state_dict`` resizes the tables to it.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        *,
        projection_seed: int = 0,
        projections: VeRAProjections | None = None,
        fan_in_fan_out: bool = False,
    ) -> None:
        super().__init__()
        check_base_and_rank(base_layer, r)
        base_layer.requires_grad_(False)
        weight = base_layer.weight
        projections = layer_projections(base_layer, r, projection_seed, projections)
        self.base_layer = base_layer
        self.projections = projections
        self.r = r
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.fan_in_fan_out = bool(fan_in_fan_out)
        kwargs = {"device": weight.device, "dtype": torch.float64 if weight.dtype == torch.float64 else torch.float32}
        self.lambda_d = nn.Parameter(torch.zeros((0, r), **kwargs), requires_grad=False)
        self.lambda_b = nn.Parameter(torch.zeros((0, self.out_features), **kwargs), requires_grad=False)
        # Adapter names by id (None: a free slot). A tuple, replaced (never changed in place) whenever
        # an adapter is added or removed: an adapter_ids block keeps the one it began with and
        # sees that the adapters changed by identity, at no cost (see forward).
        self._names: tuple[str | None, ...] = ()

    @classmethod
    def from_vera_layer(cls, layer: FusedVeRALinear, adapter_name: str | None = None) -> VeRABank:
        """A bank around ``layer``'s base layer and projections; with ``adapter_name``, holding
        ``layer``'s adapter under that name (id 0). A merged layer is unmerged first."""
        if not isinstance(layer, FusedVeRALinear):
            raise TypeError(f"layer must be a FusedVeRALinear, got {type(layer).__name__}")
        if layer.merged:
            layer.unmerge()
        bank = cls(layer.base_layer, layer.r, projections=layer.projections, fan_in_fan_out=layer.fan_in_fan_out)
        bank.train(layer.training)
        if adapter_name is not None:
            bank.add_adapter(adapter_name, layer.lambda_d.detach(), layer.lambda_b.detach())
        return bank

    # ------------------------------------------------------------------------------ adapters

    @property
    def num_slots(self) -> int:
        """Rows of the tables: adapter ids lie in [-1, num_slots)."""
        return len(self._names)

    @property
    def adapters(self) -> dict[str, int]:
        """``{name: id}`` of the adapters the bank holds."""
        return {name: i for i, name in enumerate(self._names) if name is not None}

    def adapter_id(self, name: str) -> int:
        """The id of adapter ``name``; ValueError when the bank does not hold it."""
        try:
            return self._names.index(name)
        except ValueError:
            raise ValueError(f"the bank holds no adapter {name!r}; it holds {sorted(self.adapters)}") from None

    def _resize(self, slots: int) -> None:
        rows = min(slots, self.num_slots)
        tables = []
        for table in (self.lambda_d, self.lambda_b):
            new = table.new_zeros((slots, table.shape[1]))
            new[:rows] = table.detach()[:rows]
            tables.append(nn.Parameter(new, requires_grad=table.requires_grad))
        self.lambda_d, self.lambda_b = tables
        self._names = (self._names + (None,) * slots)[:slots]

    def add_adapter(self, name: str, lambda_d: torch.Tensor, lambda_b: torch.Tensor, *, adapter_id: int | None = None) -> int:
        """Add an adapter; returns its id.

        Args:
            name: a new name (str).
            lambda_d: (r,) and lambda_b: (out_features,): the adapter's vectors (any float dtype; copied
                in the tables' dtype).
            adapter_id: the slot to use (a free one, or any id >= :attr:`num_slots`, the tables growing
                with free slots); the lowest free slot when None.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        if name in self._names:
            raise ValueError(f"the bank already holds an adapter {name!r} (id {self._names.index(name)}); remove it first")
        for arg, value, shape in (("lambda_d", lambda_d, (self.r,)), ("lambda_b", lambda_b, (self.out_features,))):
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise TypeError(f"{arg} must be a floating-point torch.Tensor, got {getattr(value, 'dtype', type(value).__name__)}")
            if tuple(value.shape) != shape:
                raise ValueError(f"{arg} must have shape {shape} for this bank (r={self.r}, out_features={self.out_features}), "
                                 f"got {tuple(value.shape)}")
        if adapter_id is None:
            adapter_id = next((i for i, n in enumerate(self._names) if n is None), self.num_slots)
        elif isinstance(adapter_id, bool) or not isinstance(adapter_id, int) or adapter_id < 0:
            raise ValueError(f"adapter_id must be a non-negative int, got {adapter_id!r}")
        elif adapter_id < self.num_slots and self._names[adapter_id] is not None:
            raise ValueError(f"adapter id {adapter_id} is taken by {self._names[adapter_id]!r}")
        if adapter_id >= self.num_slots:
            self._resize(adapter_id + 1)
        with torch.no_grad():
            self.lambda_d[adapter_id] = lambda_d.detach().to(self.lambda_d.device, self.lambda_d.dtype)
            self.lambda_b[adapter_id] = lambda_b.detach().to(self.lambda_b.device, self.lambda_b.dtype)
        self._names = self._names[:adapter_id] + (name,) + self._names[adapter_id + 1:]
        return adapter_id

    def remove_adapter(self, name: str) -> None:
        """Remove adapter ``name``: its slot is zeroed and freed; other ids do not change (free slots
        at the end of the tables are dropped)."""
        i = self.adapter_id(name)
        with torch.no_grad():
            self.lambda_d[i] = 0
            self.lambda_b[i] = 0
        self._names = self._names[:i] + (None,) + self._names[i + 1:]
        slots = self.num_slots
        while slots and self._names[slots - 1] is None:
            slots -= 1
        if slots != self.num_slots:
            self._resize(slots)

    def ids_tensor(self, adapter_ids) -> torch.Tensor:
        """``adapter_ids`` as an integer tensor on the base weight's device: an int, a name, a sequence
        of ints and names (one per sequence or per row), or an integer tensor (returned as it is)."""
        if isinstance(adapter_ids, torch.Tensor):
            return adapter_ids
        if isinstance(adapter_ids, (str, int)) and not isinstance(adapter_ids, bool):
            values = [adapter_ids]
        elif isinstance(adapter_ids, Sequence):
            values = list(adapter_ids)
        else:
            raise TypeError(f"adapter_ids must be an int, a name, a sequence of them or an integer tensor, got {type(adapter_ids).__name__}")
        ids = []
        for value in values:
            if isinstance(value, str):
                ids.append(self.adapter_id(value))
            elif isinstance(value, int) and not isinstance(value, bool):
                if not -1 <= value < self.num_slots:
                    raise ValueError(f"adapter id {value} is outside [-1, {self.num_slots}) (-1: the base layer alone)")
                ids.append(value)
            else:
                raise TypeError(f"adapter ids must be ints or adapter names, got {value!r}")
        tensor = torch.tensor(ids, dtype=torch.int64, device=self.base_layer.weight.device)
        return tensor.reshape(()) if isinstance(adapter_ids, (str, int)) else tensor

    # ------------------------------------------------------------------------------ state dict

    def get_extra_state(self) -> torch.Tensor:
        """The adapter names by id travel in the state dict beside the tables, as the bytes of a JSON
        list in a uint8 tensor (so that tensor-only formats such as safetensors can hold them)."""
        return torch.tensor(list(json.dumps(self._names).encode()), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        names = _decode_names(state)
        if not isinstance(names, list) or len(names) != self.num_slots:
            raise ValueError(f"VeRABank state: expected the names of {self.num_slots} slots, got {names!r}")
        self._names = tuple(names)

    def _state_problem(self, state_dict, prefix: str) -> str | None:
        """What keeps ``state_dict`` from fitting this bank as a whole, or None: both tables of one
        height K with this bank's widths, and the names of K slots."""
        from torch.nn.modules.module import _EXTRA_STATE_KEY_SUFFIX

        tables = {key: state_dict.get(prefix + key) for key in ("lambda_d", "lambda_b")}
        widths = {"lambda_d": self.r, "lambda_b": self.out_features}
        heights = set()
        for key, table in tables.items():
            if table is None:
                continue
            if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[1] != widths[key]:
                got = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
                return f"{key} must have shape (slots, {widths[key]}), got {got}"
            heights.add(table.shape[0])
        if len(heights) > 1:
            return f"lambda_d and lambda_b have different numbers of slots ({sorted(heights)})"
        extra = prefix + _EXTRA_STATE_KEY_SUFFIX
        if heights and extra in state_dict:
            names, slots = _decode_names(state_dict[extra]), heights.pop()
            if not isinstance(names, list) or len(names) != slots:
                return f"expected the names of {slots} slots, got {names!r}"
        return None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A bank's table height is its number of slots: take the saved one before copying, once the
        # tables and names are known to fit together, so that a state that does not fit changes nothing
        # (the error is reported as load_state_dict reports others).
        problem = self._state_problem(state_dict, prefix)
        if problem is not None:
            error_msgs.append(f"VeRABank state at {prefix or 'the root'!r}: {problem}")
            return
        table = state_dict.get(prefix + "lambda_d")
        if isinstance(table, torch.Tensor) and table.shape[0] != self.num_slots:
            self._resize(table.shape[0])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ------------------------------------------------------------------------------ forward

    def projection_slices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` (r, in_features) and ``B`` (out_features, r) in the base weight's dtype."""
        A, B = self.projections.slices(self.r, self.in_features, self.out_features)
        weight = self.base_layer.weight
        if A.device != weight.device:
            raise ValueError(
                f"the shared VeRA projections are on {A.device} but this bank's base weight is on {weight.device}; "
                "move the whole model to one device"
            )
        return A.to(weight.dtype), B.to(weight.dtype)

    def forward(self, x: torch.Tensor, adapter_ids=None) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features), each row through its own adapter.

        ``adapter_ids``: see :meth:`ids_tensor` for the forms and
        :func:`pefttriton.ops.vera_bank.vera_bank_linear` for the shapes (one id per row, per
        sequence, or one for all; -1: the base layer). None takes the ids that :func:`adapter_ids`
        set for this bank, and raises outside such a block.
        """
        id_range = None
        if adapter_ids is None:
            active = _ACTIVE_IDS.get()
            entry = None if active is None else active.get(id(self))
            if entry is None:
                raise ValueError(
                    "no adapter ids for this VeRABank: pass adapter_ids=..., or run the model inside "
                    "`with pefttriton.integration.vera_bank.adapter_ids(model, ids):` (-1 selects the base model)"
                )
            ids, id_range, names = entry  # checked against this bank's adapters when the block began
            if names is not self._names:  # adapters added or removed since then
                self._check_block_ids(ids, names)
            ids = broadcast_sequence_ids(ids.to(x.device), x)
        else:
            ids = self.ids_tensor(adapter_ids)
        if self.num_slots == 0:
            check_adapter_ids(ids, x, 0, check_values=id_range is None)  # only -1 is valid
            return self.base_layer(x)
        weight = self.base_layer.weight
        A, B = self.projection_slices()
        args = (x, weight, self.base_layer.bias, A, B, self.lambda_d, self.lambda_b, ids)
        if id_range is None:
            return vera_bank_linear(*args)
        return _vera_bank_in_range(*args, id_range=id_range)

    def _check_block_ids(self, ids: torch.Tensor, names: tuple) -> None:
        """Ids that an :func:`adapter_ids` block checked when this bank's names by id were ``names``,
        used after adapters were added or removed: every id they hold must still name the adapter it
        named then (and lie in the tables), else ValueError naming it. Reads the distinct ids (on
        CUDA a device-to-host copy), only in a block whose bank changed."""
        for i in torch.unique(ids).tolist():
            if i < 0:
                continue
            then = names[i] if i < len(names) else None
            now = self._names[i] if i < self.num_slots else None
            if then == now and i < self.num_slots:
                continue
            if then is not None and now is None:
                raise ValueError(
                    f"adapter {then!r} (id {i}) was removed from this VeRABank inside the adapter_ids(...) block "
                    "that selects it; remove adapters outside the block, or begin a new block with other ids"
                )
            if then is not None:
                raise ValueError(
                    f"adapter id {i} selected {then!r} when the adapter_ids(...) block began and now holds {now!r}: "
                    "the bank's adapters changed inside the block; begin a new block"
                )
            where = f"holds {now!r}" if now is not None else f"lies beyond the bank's {self.num_slots} slots"
            raise ValueError(
                f"adapter id {i} was a free slot (the base layer) when the adapter_ids(...) block began and now "
                f"{where}: the bank's adapters changed inside the block; begin a new block"
            )

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"adapters={len(self.adapters)}, slots={self.num_slots}, seed={self.projections.seed}")


def _decode_names(state) -> list | None:
    """The names list of :meth:`VeRABank.get_extra_state`'s tensor, or None when it holds none."""
    try:
        names = json.loads(bytes(state.tolist()).decode())
    except (AttributeError, TypeError, ValueError):
        return None
    return names if isinstance(names, list) else None


# ------------------------------------------------------------------------------ model level


def bank_layers(model: nn.Module) -> list[tuple[str, VeRABank]]:
    """``(name, bank)`` of every :class:`VeRABank` of ``model``, in ``named_modules`` order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, VeRABank)]


def _banks_or_raise(model: nn.Module) -> list[tuple[str, VeRABank]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    banks = bank_layers(model)
    if not banks:
        raise ValueError("model holds no VeRABank; build them with inject_banks(model, ...) or to_banks(model)")
    return banks


def inject_banks(
    model: nn.Module,
    target_modules: list[str] | str,
    r: int = 256,
    projection_seed: int = 0,
    *,
    exclude_modules: list[str] | str | None = None,
) -> nn.Module:
    """Replace the layers ``target_modules`` names by empty :class:`VeRABank` s, in place; returns ``model``.

    Targets are matched as :func:`pefttriton.inject` matches them (PEFT's rule), and the banks share
    one :class:`~pefttriton.adapters.vera.VeRAProjections` of rank ``r`` sized to the largest in- and
    out-features among them, drawn from ``projection_seed``: exactly the projections
    ``pefttriton.inject(model, VeRAConfig(r, target_modules, projection_seed=...))`` and PEFT's
    ``VeraConfig(r, target_modules, projection_prng_key=...)`` use, so their adapters load into the banks.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = VeRAConfig(r=r, target_modules=target_modules, exclude_modules=exclude_modules, projection_seed=projection_seed)
    taken = [name for name, _ in bank_layers(model) if name and matches(config, name)]
    if taken:
        raise ValueError(f"modules {taken[:4]} already are VeRABanks")
    targets = find_targets(model, config)
    weights = [m.weight if isinstance(m, nn.Linear) else m.weight.T for _, m in targets]
    projections = config.shared_layer_kwargs(weights)["projections"]
    for name, module in targets:
        base, fan_in_fan_out = as_linear(module, name)
        bank = VeRABank(base, r, projections=projections, fan_in_fan_out=fan_in_fan_out)
        bank.train(module.training)
        replace_module(model, name, bank)
    return model


def to_banks(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Replace every :class:`~pefttriton.adapters.vera.FusedVeRALinear` of ``model`` (``pefttriton.inject`` with a
    :class:`~pefttriton.VeRAConfig`, or a loaded adapter) by a :class:`VeRABank` with the same base
    layer and projections, in place; returns ``model``. With ``adapter_name``, each bank holds its
    layer's adapter under that name (id 0); merged layers are unmerged first."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, FusedVeRALinear)]
    if not layers:
        raise ValueError("model holds no FusedVeRALinear layer to convert")
    if any(not name for name, _ in layers):
        raise ValueError("the model is itself a FusedVeRALinear: use VeRABank.from_vera_layer(model)")
    for name, layer in layers:
        replace_module(model, name, VeRABank.from_vera_layer(layer, adapter_name))
    return model


def _projection_mismatch(bank: VeRABank, seed: int, r: int, max_in: int, max_out: int) -> str | None:
    p = bank.projections
    mine = (p.seed, p.r, p.max_in_features, p.max_out_features)
    theirs = (seed, r, max_in, max_out)
    if mine == theirs:
        return None
    return (f"the banks' projections have (seed, r, max_in, max_out) = {mine}, the checkpoint's {theirs}: build "
            "the banks with inject_banks(model, <the adapter's target_modules>, r, projection_seed) so that both draw "
            "the same shared A and B")


def _read_peft(path: Path, shapes: dict[str, tuple[int, int]]) -> tuple[dict, tuple, tuple]:
    """``({layer: (lambda_d, lambda_b)}, (seed, r, max_in, max_out), (stored A, B) or (None, None))``
    of a PEFT VeRA checkpoint directory (keys ``base_model.model.<layer>.vera_lambda_d`` / ``_b``,
    shared ``base_model.vera_A`` / ``vera_B``: see :mod:`pefttriton.integration.peft_interop`)."""
    state, cfg = read_peft_checkpoint(path)
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "VERA":
        raise ValueError(f"{path}: only PEFT VeRA adapters load into VeRA banks, got peft_type {cfg.get('peft_type')!r}")
    if cfg.get("modules_to_save"):
        raise ValueError(f"{path}: the adapter trains modules beside VeRA ({cfg['modules_to_save']}), which a bank "
                         "cannot hold per adapter")
    prefix, stored = "base_model.model.", ("base_model.vera_A", "base_model.vera_B")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in stored:
            continue
        for suffix in ("vera_lambda_d", "vera_lambda_b"):
            if key.startswith(prefix) and key.endswith("." + suffix):
                layers.setdefault(key[len(prefix): -len(suffix) - 1], {})[suffix] = value
                break
        else:
            raise ValueError(f"{path}: unsupported key {key!r} (a VeRA bank loads only vera_lambda_d / vera_lambda_b)")
    incomplete = sorted(name for name, parts in layers.items() if len(parts) != 2)
    if incomplete or not layers:
        raise ValueError(f"{path}: layers without both vera_lambda_d and vera_lambda_b: {incomplete[:8]}" if incomplete
                         else f"{path}: the PEFT adapter holds no VeRA tensors")
    A, B = state.get(stored[0]), state.get(stored[1])
    if not cfg.get("save_projection", True):
        A = B = None  # PEFT redraws them from the seed and ignores stored ones
    r = int(cfg.get("r", 256))
    if A is not None and B is not None:
        max_in, max_out = A.shape[1], B.shape[0]
    else:  # PEFT's _find_dim: the largest in- and out-features among the adapted layers
        missing = [name for name in layers if name not in shapes]
        if missing:
            raise ValueError(f"{path}: the adapter adapts {missing[:8]}, which are not VeRA banks of the model")
        max_in = max(shapes[name][0] for name in layers)
        max_out = max(shapes[name][1] for name in layers)
    vectors = {name: (parts["vera_lambda_d"], parts["vera_lambda_b"]) for name, parts in layers.items()}
    return vectors, (int(cfg.get("projection_prng_key", 0)), r, max_in, max_out), (A, B)


def _read_pefttriton(path: Path) -> tuple[dict, tuple, tuple]:
    """The same triple for a file written by :func:`pefttriton.save_adapter` holding VeRA layers."""
    tensors, meta = read_adapter(path)
    layers, specs = meta.get("layers", {}), meta.get("projections", [])
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{path}: the adapter file holds no layers")
    if meta.get("modules_to_save"):
        raise ValueError(f"{path}: the adapter trains modules beside VeRA ({meta['modules_to_save']}), which a bank "
                         "cannot hold per adapter")
    kinds = {spec.get("adapter_type") if isinstance(spec, dict) else None for spec in layers.values()}
    if kinds != {"vera"}:
        raise ValueError(f"{path}: only VeRA adapters load into VeRA banks, the file holds {sorted(map(str, kinds))}")
    indices = {spec.get("projections") for spec in layers.values()}
    if len(indices) != 1 or not isinstance(next(iter(indices)), int) or not 0 <= next(iter(indices)) < len(specs):
        raise ValueError(f"{path}: the VeRA layers must share one projections entry, got {sorted(map(str, indices))}")
    index = indices.pop()
    spec = specs[index]
    vectors, own = {}, set()
    for name in layers:
        keys = [f"{name}.{p}" if name else p for p in ("lambda_d", "lambda_b")]
        if any(key not in tensors for key in keys):
            raise ValueError(f"{path}: layer {name!r} lacks {[k for k in keys if k not in tensors]}")
        vectors[name] = (tensors[keys[0]], tensors[keys[1]])
        own.update(keys)
    extra = sorted(set(meta.get("trainable", [])) - own)
    if extra:
        raise ValueError(f"{path}: the file trains parameters beside VeRA ({extra[:8]}), which a bank cannot hold per adapter")
    A = tensors.get(f"__projections__.{index}.vera_A") if spec.get("stored") else None
    B = tensors.get(f"__projections__.{index}.vera_B") if spec.get("stored") else None
    return vectors, (spec["seed"], spec["r"], spec["max_in"], spec["max_out"]), (A, B)


def load_into_banks(model: nn.Module, name: str, path: str | os.PathLike, *, replace: bool = False) -> int:
    """Load a VeRA adapter into every bank of ``model`` under ``name``; returns its id (the same in
    every bank).

    Args:
        model: a model with :class:`VeRABank` s (:func:`inject_banks` / :func:`to_banks`).
        name: the adapter's name in the banks.
        path: a PEFT VeRA checkpoint directory (``adapter_model.safetensors`` + ``adapter_config.json``,
            from ``save_pretrained``) or a file written by :func:`pefttriton.save_adapter`.
        replace: overwrite an adapter of that name (keeping its id) instead of raising.

    The checkpoint's projections must be the banks' ones: same seed, rank and sizes (PEFT sizes them
    by the largest adapted layer), and stored projections equal to the banks'; else ``ValueError``
    saying what differs. Banks the checkpoint does not adapt get a zero adapter (their base layer).
    All or nothing: everything is checked before any bank changes.
    """
    banks = dict(_banks_or_raise(model))
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    path = Path(path)
    if path.is_dir():
        shapes = {n: (b.in_features, b.out_features) for n, b in banks.items()}
        vectors, projection, stored = _read_peft(path, shapes)
    elif path.is_file():
        vectors, projection, stored = _read_pefttriton(path)
    else:
        raise FileNotFoundError(f"{path} is neither a PEFT adapter directory nor a pefttriton adapter file")
    missing = sorted(n for n in vectors if n not in banks)
    if missing:
        raise ValueError(f"{path}: the adapter adapts {missing[:8]}, which are not VeRA banks of the model "
                         f"(banks: {sorted(banks)[:8]})")
    for layer_name in vectors:
        bank = banks[layer_name]
        problem = _projection_mismatch(bank, *projection)
        if problem is None and stored[0] is not None:
            p = bank.projections
            same = (torch.equal(stored[0].to(p.vera_A.device, p.vera_A.dtype), p.vera_A)
                    and torch.equal(stored[1].to(p.vera_B.device, p.vera_B.dtype), p.vera_B))
            problem = None if same else ("the checkpoint's stored vera_A / vera_B differ from the banks' projections "
                                         f"(seed {p.seed}); they were not drawn from that seed")
        if problem is not None:
            raise ValueError(f"{path}: layer {layer_name!r}: {problem}")
        d, b = vectors[layer_name]
        if not (isinstance(d, torch.Tensor) and d.is_floating_point() and isinstance(b, torch.Tensor)
                and b.is_floating_point()):
            raise TypeError(f"{path}: layer {layer_name!r} holds lambda_d {getattr(d, 'dtype', type(d).__name__)} and "
                            f"lambda_b {getattr(b, 'dtype', type(b).__name__)}; a bank takes floating-point vectors")
        if tuple(d.shape) != (bank.r,) or tuple(b.shape) != (bank.out_features,):
            raise ValueError(f"{path}: layer {layer_name!r} holds lambda_d {tuple(d.shape)} and lambda_b {tuple(b.shape)}; "
                             f"the bank needs ({bank.r},) and ({bank.out_features},)")
    holders = {bank.adapters.get(name) for bank in banks.values()}
    if holders != {None}:
        if not replace:
            raise ValueError(f"the banks already hold an adapter {name!r}; pass replace=True to overwrite it")
        if len(holders) != 1:
            raise ValueError(f"the banks hold adapter {name!r} under different ids {sorted(map(str, holders))}")
        adapter_id = holders.pop()
        for bank in banks.values():
            bank.remove_adapter(name)
    else:
        taken = {i for bank in banks.values() for i, n in enumerate(bank._names) if n is not None}
        adapter_id = next(i for i in range(len(taken) + 1) if i not in taken)
    for layer_name, bank in banks.items():
        if layer_name in vectors:
            d, b = vectors[layer_name]
        else:
            d, b = torch.zeros(bank.r), torch.zeros(bank.out_features)
        bank.add_adapter(name, d, b, adapter_id=adapter_id)
    return adapter_id


@contextlib.contextmanager
def adapter_ids(model: nn.Module, ids) -> Iterator[torch.Tensor]:
    """Inside the block every :class:`VeRABank` of ``model`` uses ``ids``; yields them as a tensor.

    ``ids``: adapter names and ints (-1: the base model), one per sequence of the batch (broadcast
    over tokens, so it holds for every forward of ``model.generate``, prompt and one-token decode
    steps alike; with beam search or several return sequences, each id covers the ``k`` rows
    ``generate`` makes of its sequence), or an integer tensor of any shape
    :func:`~pefttriton.ops.vera_bank.vera_bank_linear` accepts. Ids are checked once here against
    every bank, not again per layer. Blocks nest; the setting is local to the thread or task.

    Adding or removing adapters inside the block (in any thread) is allowed, but a forward whose
    ids then select an adapter that was removed, or a slot that now holds another adapter, raises
    ``ValueError`` naming it (a changed bank reads the distinct ids at each forward of the block).
    """
    banks = [bank for _, bank in _banks_or_raise(model)]
    device = banks[0].base_layer.weight.device
    if isinstance(ids, torch.Tensor):
        tensor = index_ids(ids).to(device)  # int8 / int16 / uint8 widened once here, not per layer
    else:
        tensors = [bank.ids_tensor(ids) for bank in banks]
        tensor = tensors[0]
        if any(not torch.equal(t, tensor) for t in tensors[1:]):
            raise ValueError("the model's banks hold these adapters under different ids; load adapters with "
                             "load_into_banks so that they keep one id")
    id_range = adapter_id_range(tensor)
    if id_range is not None:
        low, high = id_range
        slots = min(bank.num_slots for bank in banks)
        if low < -1 or high >= slots:
            raise ValueError(f"adapter ids must lie in [-1, {slots}) (-1: the base model), got values from {low} to {high}")
    active = dict(_ACTIVE_IDS.get() or {})
    active.update({id(bank): (tensor, id_range, bank._names) for bank in banks})
    token = _ACTIVE_IDS.set(active)
    try:
        yield tensor
    finally:
        _ACTIVE_IDS.reset(token)


__all__ = ["VeRABank", "adapter_ids", "bank_layers", "inject_banks", "load_into_banks", "to_banks"]
