"""Adapters of sharded models: save and load them with ``torch.distributed.checkpoint`` (DCP).

The fused layers need nothing special under PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``)
or DDP: FSDP2 shards every parameter along dim 0 and gathers a module's parameters before its
forward, so a fused layer sees plain tensors there; VeRA's shared projections are buffers, which
FSDP2 never shards, and every rank draws the same ones from the config's seed. The fused ops return
a tensor of their own (never a view), so an in-place residual after a fused layer (``h = layer(x);
h += x``) keeps FSDP2's backward hook.

What FSDP2 changes is saving: the adapter parameters are ``DTensor`` shards, and gathering them on
one rank to call :func:`pefttriton.save_adapter` would defeat the sharding. Here every rank writes
its own shards with DCP instead, and a sharded adapter checkpoint is a directory holding

* DCP's files (``.metadata`` and one ``__<rank>_0.distcp`` per rank) with the adapter tensors only,
  exactly those :func:`pefttriton.save_adapter` writes: every adapter parameter of every fused
  layer, every other parameter that trains, and a VeRA projection pair only when its seed cannot
  redraw it (``__projections__.<i>.vera_A`` / ``vera_B``). Frozen base weights are never written;
* ``pefttriton_adapter.json``: the metadata of :func:`pefttriton.save_adapter`'s files (per layer
  its adapter type, rank, settings, merged flag and ``fan_in_fan_out``; VeRA's projection seeds and
  sizes; which tensors train; the modules to save), written by rank 0.

Tensor and layer names are those of the bare model's ``named_parameters()`` / ``named_modules()``:
the parts that wrappers add (DDP's ``module.``, ``checkpoint_wrapper``'s
``_checkpoint_wrapped_module.``, ``torch.compile``'s ``_orig_mod.``) are dropped, so a checkpoint
saved from a wrapped, sharded model loads into a bare, unsharded one and back. DCP reshards on
load: a checkpoint written by N ranks loads on M ranks, or in one process without a process group.

::

    fully_shard(...)                                         # after pefttriton.inject
    save_sharded_adapter(model, "ckpt/adapter")              # every rank
    load_sharded_adapter(model, "ckpt/adapter")              # every rank, model sharded or not
    consolidate_sharded_adapter("ckpt/adapter", "adapter.safetensors")  # one process, any time
    pefttriton.load_adapter(plain_model, "adapter.safetensors")
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings

import torch
from torch import nn

from pefttriton.integration.save import _META_KEY, _PROJECTIONS_PREFIX, FORMAT_VERSION, _redrawn_equal, adapter_checkpoint
from pefttriton.integration.surgery import (
    adapter_layers,
    add_modules_to_save,
    build_layer,
    has_submodule,
    meta_linear,
    meta_twin,
)
from pefttriton.adapters.vera import VeRAProjections

METADATA_FILE = "pefttriton_adapter.json"
"""Name of the metadata file inside a sharded adapter checkpoint directory."""

# Module-name parts that wrappers insert: checkpoint_wrapper, torch.compile's OptimizedModule.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module", "_orig_mod")


# ------------------------------------------------------------------------------ names


def _bare_model(model) -> nn.Module:
    """``model`` without a DDP wrapper; TypeError for a non-module or an FSDP1 model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module
    for name, _ in model.named_parameters():
        if "_fsdp_wrapped_module" in name or "_flat_param" in name:
            raise TypeError(
                "model is wrapped in FullyShardedDataParallel (FSDP1), whose flat parameters hide the adapter's; "
                "shard it with torch.distributed.fsdp.fully_shard (FSDP2) instead"
            )
    return model


def bare_name(name: str) -> str:
    """``name`` (a parameter or module name) without the parts wrappers insert
    (``_checkpoint_wrapped_module``, ``_orig_mod``)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def _named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {bare_name(name): p for name, p in model.named_parameters()}


def _named_adapter_layers(model: nn.Module) -> list:
    return [(bare_name(name), layer) for name, layer in adapter_layers(model)]


# ------------------------------------------------------------------------------ what is saved


def _is_distributed(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter checkpoint holds, by name, without copying or gathering anything.

    Under FSDP2 each value is the parameter's ``DTensor`` (this rank's shard of the full tensor,
    ``value.shape`` the full shape); otherwise a plain tensor. Either way it shares storage with
    the parameter (detached), which is what DCP saves from and loads into.

    Holds what :func:`pefttriton.save_adapter` writes: the adapter parameters of every fused layer
    (``adapter_layer_names``: VeRA ``lambda_d`` (r,) / ``lambda_b`` (out,), LoRA ``lora_A`` (r, in)
    / ``lora_B`` (out, r), Deep LoRA ``W1`` / ``W2`` / ``W3``, LoRMA ``lorma_A`` / ``lorma_B``) and
    every other parameter with ``requires_grad`` (a head trained in full), named as in the bare
    model's ``named_parameters()`` (see the module docstring); plus
    ``__projections__.<i>.vera_A`` (r, max_in) / ``vera_B`` (max_out, r) for a shared VeRA pair
    that its seed does not redraw (loaded from elsewhere). Frozen base weights are left out.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or is wrapped in FSDP1.
        ValueError: ``model`` has no fused adapter layer.
    """
    return adapter_checkpoint(_bare_model(model), bare_name)[0]


def adapter_metadata(model: nn.Module) -> dict:
    """The JSON metadata of the checkpoint: :func:`pefttriton.integration.save.adapter_checkpoint`'s, with the
    names wrappers insert left out."""
    return adapter_checkpoint(_bare_model(model), bare_name)[1]


# ------------------------------------------------------------------------------ save


def _check_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike (a directory), got {type(path).__name__}")
    return os.fspath(path)


@contextlib.contextmanager
def _single_process_quietly():
    """DCP warns on every single-process save or load, which these functions do on purpose
    (an unsharded model, consolidation); silence only that warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _rank(process_group) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(process_group)


def save_sharded_adapter(model: nn.Module, path: str | os.PathLike, *, process_group=None) -> dict[str, int]:
    """Write the adapters of ``model`` (sharded by FSDP2 or not) to the directory ``path`` with DCP.

    A collective when a process group is initialized: call it on every rank of ``process_group``
    (the default group when None), outside forward and backward. Each rank writes only its own
    shards; rank 0 also writes ``pefttriton_adapter.json``, before DCP's collectives, so the
    directory is complete when any rank returns. Without a process group it saves from this
    process alone.

    Returns:
        ``{"tensors": count, "bytes": bytes of the full tensors}`` of what was written.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` (or is FSDP1), ``path`` is not a path.
        ValueError: ``model`` has no fused adapter layer; ``path`` exists and is not a directory.
    """
    import torch.distributed.checkpoint as dcp

    path = _check_path(path)
    state = adapter_state_dict(model)
    meta = adapter_metadata(model)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} exists and is not a directory; a sharded adapter checkpoint is a directory")
    if _rank(process_group) == 0:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
    with _single_process_quietly():
        dcp.save(state, checkpoint_id=path, process_group=process_group)
    return {"tensors": len(state), "bytes": sum(t.numel() * t.element_size() for t in state.values())}


# ------------------------------------------------------------------------------ load


def read_sharded_metadata(path: str | os.PathLike) -> tuple[dict, dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """``(metadata, {tensor name: (full shape, dtype)})`` of a checkpoint written by
    :func:`save_sharded_adapter`; reads no tensor data.

    Raises:
        ValueError: ``path`` is not such a checkpoint (no metadata file, another format version,
            DCP files missing or holding something other than tensors).
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = _check_path(path)
    meta_file = os.path.join(path, METADATA_FILE)
    if not os.path.isfile(meta_file):
        raise ValueError(f"{path} is not a pefttriton sharded adapter checkpoint (no {METADATA_FILE})")
    with open(meta_file, encoding="utf-8") as f:
        meta = json.load(f)
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise ValueError(f"{meta_file}: unsupported format_version {version!r} (expected {FORMAT_VERSION})")
    for key, kind in (("layers", dict), ("projections", list), ("trainable", list), ("modules_to_save", list)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{meta_file}: {key!r} must be a {kind.__name__}, got {type(meta.get(key)).__name__}")
    try:
        dcp_meta = FileSystemReader(path).read_metadata()
    except (OSError, RuntimeError, ValueError) as exc:  # missing or unreadable .metadata
        raise ValueError(f"{path}: cannot read the DCP metadata: {exc}") from exc
    tensors = {}
    for key, item in dcp_meta.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            raise ValueError(f"{path}: entry {key!r} is not a tensor; not a pefttriton sharded adapter checkpoint")
        tensors[key] = (tuple(item.size), item.properties.dtype)
    return meta, tensors


def _check_layers(model: nn.Module, meta: dict, path: str) -> tuple[list, dict[int, VeRAProjections]]:
    """``([(name, layer, settings to apply)], {projections index: the model's VeRAProjections})``:
    every layer of the checkpoint is a fused layer of ``model`` of its type, rank, fixed settings,
    merged flag and VeRA projections (size and seed)."""
    fused = dict(_named_adapter_layers(model))
    specs = meta["projections"]
    shared: dict[int, VeRAProjections] = {}
    plans = []
    for name, spec in meta["layers"].items():
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: layer {name!r}: the metadata entry must be a dict")
        layer = fused.get(name)
        if layer is None:
            what = "a plain module" if has_submodule(model, name) else "no such module"
            raise ValueError(
                f"{path}: layer {name!r} of the checkpoint is not a fused adapter layer of the model ({what}); "
                "inject the same adapters before loading, or consolidate_sharded_adapter() and load_adapter()"
            )
        kind, r = spec.get("adapter_type"), spec.get("r")
        if kind != layer.adapter_type or r != layer.r:
            raise ValueError(
                f"{path}: layer {name!r} is a {layer.adapter_type} adapter of rank {layer.r}; "
                f"the checkpoint has {kind} of rank {r}"
            )
        if bool(spec.get("merged", False)) != layer.merged:
            raise ValueError(
                f"{path}: layer {name!r}: merged={layer.merged} in the model, merged={spec.get('merged')!r} in the "
                "checkpoint (merge or unmerge the model's layers first)"
            )
        kwargs = spec.get("kwargs", {})
        if not isinstance(kwargs, dict) or set(kwargs) - set(layer.settings):
            raise ValueError(
                f"{path}: layer {name!r}: settings {kwargs!r} are not those of a {kind} layer ({list(layer.settings)})"
            )
        for setting in layer.fixed_settings:
            if setting in kwargs and kwargs[setting] != getattr(layer, setting):
                raise ValueError(
                    f"{path}: layer {name!r} has {setting}={getattr(layer, setting)!r}; the checkpoint has "
                    f"{kwargs[setting]!r}, which cannot change on a built layer"
                )
        if kind == "vera":
            index = spec.get("projections")
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(specs):
                raise ValueError(f"{path}: layer {name!r}: projections index {index!r} out of range")
            proj, p = layer.projections, specs[index]
            if shared.setdefault(index, proj) is not proj:
                raise ValueError(
                    f"{path}: layers sharing projections entry {index} in the checkpoint do not share one "
                    "VeRAProjections in the model"
                )
            ours = (proj.r, proj.max_in_features, proj.max_out_features, proj.seed)
            theirs = (p.get("r"), p.get("max_in"), p.get("max_out"), p.get("seed"))
            if ours != theirs:
                raise ValueError(
                    f"{path}: layer {name!r}: the model's VeRA projections (r, max_in, max_out, seed) are {ours}, "
                    f"the checkpoint's {theirs} (build the model with the same VeRAConfig)"
                )
            if not p.get("stored") and not _redrawn_equal(proj):
                raise ValueError(
                    f"{path}: layer {name!r}: the model's VeRA projections are not the draw of seed {proj.seed}, "
                    "which the checkpoint relies on"
                )
        # The values too: a setting the layer refuses must fail here, not in its setter after the
        # tensors were read (a twin of the layer on the meta device, with the checkpoint's settings).
        twin_kwargs = {**kwargs, "projections": meta_twin(layer.projections)} if kind == "vera" else kwargs
        try:
            build_layer(kind, meta_linear(layer.base_layer), r, twin_kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: layer {name!r}: {exc}") from exc
        settings = {k: v for k, v in kwargs.items() if k not in layer.fixed_settings}
        plans.append((name, layer, settings))
    return plans, shared


def _destination(model: nn.Module, shapes: dict, plans: list, shared: dict, path: str) -> dict[str, torch.Tensor]:
    """``{name: the model's tensor}`` for every tensor of the checkpoint (what DCP loads into),
    names and full shapes checked, and every adapter parameter of the checkpoint's layers present."""
    params = _named_parameters(model)
    dest = {}
    for key, (shape, _) in shapes.items():
        if key.startswith(_PROJECTIONS_PREFIX):
            index, _, which = key[len(_PROJECTIONS_PREFIX):].partition(".")
            proj = shared.get(int(index)) if index.isdigit() else None
            if proj is None or which not in ("vera_A", "vera_B"):
                raise ValueError(f"{path}: projection tensor {key!r} belongs to no VeRA layer of the checkpoint")
            target = getattr(proj, which)
        elif key in params:
            target = params[key]
        else:
            raise ValueError(f"{path}: the checkpoint has tensor {key!r}, which the model lacks")
        if tuple(target.shape) != shape:
            raise ValueError(f"{path}: {key}: the model has shape {tuple(target.shape)}, the checkpoint {shape}")
        dest[key] = target.detach()
    for name, layer, _ in plans:
        for pname in layer.adapter_layer_names:
            key = f"{name}.{pname}" if name else pname
            if key not in dest:
                raise ValueError(f"{path}: layer {name!r}: the checkpoint has no tensor for its parameter {key!r}")
    return dest


def _dcp_failure(exc: BaseException) -> str:
    """DCP's error in a line per failed rank (``CheckpointException``'s own text holds whole tracebacks)."""
    failures = getattr(exc, "failures", None)
    if not isinstance(failures, dict) or not failures:
        return f"{type(exc).__name__}: {exc}"
    lines = []
    for rank, (error, _) in sorted(failures.items()):
        text = str(error).strip().splitlines()
        lines.append(f"rank {rank}: {type(error).__name__}{': ' + text[0] if text else ''}")
    return "; ".join(lines)


def _read_tensors(state: dict[str, torch.Tensor], path: str, process_group, no_dist: bool) -> None:
    """``dcp.load`` into ``state``; a failure of the read (a damaged or missing ``.distcp`` file) as
    a ``ValueError`` naming ``path``. DCP raises ``CheckpointException``, a ``BaseException`` that
    ``except Exception`` does not catch."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _single_process_quietly():
            dcp.load(state, checkpoint_id=path, process_group=process_group, no_dist=no_dist)
    except (CheckpointException, Exception) as exc:  # noqa: BLE001 - every read failure, named
        raise ValueError(
            f"{path}: cannot read the checkpoint's tensors (a damaged or missing .distcp file?): {_dcp_failure(exc)}"
        ) from exc


def load_sharded_adapter(model: nn.Module, path: str | os.PathLike, *, process_group=None) -> nn.Module:
    """Load a checkpoint of :func:`save_sharded_adapter` into ``model``, in place; returns ``model``.

    ``model`` holds the fused layers the checkpoint names, of the same types and ranks (built the
    same way: ``pefttriton.inject`` with the same configs), and may be sharded by FSDP2 on any
    number of ranks or not at all. Every tensor is copied exactly into the parameter (or the
    shard of it this rank holds) of its name, the layers' settings are restored, VeRA projection
    pairs stored in the checkpoint are copied into the model's, and the modules to save are
    recorded. ``requires_grad`` is left as it is (``inject`` set it, and FSDP2 read it when sharding).

    When ``model`` holds ``DTensor`` parameters this is a collective over ``process_group``; an
    unsharded model loads in this process alone (each rank that calls it reads the whole, small,
    checkpoint). All or nothing: everything is checked first, and the tensors are read into a
    staging copy (this rank's shards: the adapter's size once more, for the duration of the load)
    that is copied into the model only when every read succeeded; a failed load leaves ``model``
    as it was.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` (or is FSDP1), ``path`` is not a path.
        ValueError: ``path`` is not a sharded adapter checkpoint; a layer it names is missing or is
            another adapter type, rank, variant or merged state, or has a setting the layer
            refuses; VeRA projections of another seed or size; a tensor without a parameter of its
            name and full shape; an adapter parameter the checkpoint lacks; a ``.distcp`` file
            that cannot be read (damaged, cut short, missing). The message names the folder and
            the layer or tensor.
    """
    model = _bare_model(model)
    meta, shapes = read_sharded_metadata(path)
    path = os.fspath(path)
    plans, shared = _check_layers(model, meta, path)
    dest = _destination(model, shapes, plans, shared, path)
    module_names = {bare_name(name): name for name, _ in model.named_modules()}  # bare -> as the model has it
    saved_modules = meta["modules_to_save"]
    missing = [name for name in saved_modules if not isinstance(name, str) or name not in module_names]
    if missing:
        raise ValueError(f"{path}: modules_to_save names modules the model does not have: {missing[:8]}")
    # Everything checked: only DCP's reads can fail now, and they go into a staging copy (DTensors
    # of the same placements under FSDP2), so that a damaged file leaves the model as it was.
    sharded = any(_is_distributed(t) for t in dest.values())
    staging = {key: torch.empty_like(target) for key, target in dest.items()}
    _read_tensors(staging, path, process_group, no_dist=not sharded)
    with torch.no_grad():
        for key, target in dest.items():
            target.copy_(staging[key])
    for _, layer, settings in plans:
        for setting, value in settings.items():
            setattr(layer, setting, value)
    if saved_modules:
        add_modules_to_save(model, [module_names[name] for name in saved_modules])
    return model


# ------------------------------------------------------------------------------ consolidate


def consolidate_sharded_adapter(path: str | os.PathLike, out_file: str | os.PathLike) -> dict[str, int]:
    """Gather a sharded adapter checkpoint into one safetensors file of :func:`pefttriton.save_adapter`'s
    format, which :func:`pefttriton.load_adapter` (into a plain or injected model) and the PEFT
    export read. Runs in this process alone (no collective; call it on one rank, or after training).

    Returns:
        ``{"tensors": count, "bytes": tensor bytes}`` of what was written.
    """
    from safetensors.torch import save_file

    meta, shapes = read_sharded_metadata(path)
    out_file = _check_path(out_file)
    tensors = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in shapes.items()}
    _read_tensors(tensors, os.fspath(path), None, no_dist=True)  # a ValueError, and no file written
    save_file(tensors, out_file, metadata={_META_KEY: json.dumps(meta)})
    return {"tensors": len(tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}


__all__ = [
    "METADATA_FILE",
    "adapter_metadata",
    "adapter_state_dict",
    "bare_name",
    "consolidate_sharded_adapter",
    "load_sharded_adapter",
    "read_sharded_metadata",
    "save_sharded_adapter",
]
