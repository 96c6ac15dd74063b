"""Accelerate the PEFT models users already have, in place.

    model = get_peft_model(base, VeraConfig(r=256, target_modules=[...]))
    print(pefttriton.accelerate(model))        # which layers now run fused, and why the others don't
    ...                                        # train, save, merge, switch adapters: all PEFT, unchanged
    pefttriton.accelerate(model, enabled=False)  # PEFT's own forward again

:func:`accelerate` gives each PEFT VeRA / LoRA layer (``peft.tuners.vera.layer.Linear``,
``peft.tuners.lora.layer.Linear``) of ``model`` an instance-level ``forward``. At every call it
checks whether PEFT's forward would compute exactly ``y = x W^T + bias + s * b * ((d * (x A^T))
B^T)`` from the layer's current state; if so it calls the fused engine
(:func:`pefttriton.ops.lowrank_linear`) on PEFT's own tensors, else it calls PEFT's forward.
Nothing is added to the model or registered: parameters, buffers, ``state_dict()``,
``requires_grad`` and PEFT's bookkeeping stay as they were, so everything PEFT does
(``save_pretrained``, ``set_adapter``, ``disable_adapter()``, merging, ``modules_to_save``,
mixed-adapter batches) is still PEFT doing it.

How PEFT's tensors map onto the engine (PEFT 0.21, ``tuners/lora/layer.py``,
``tuners/vera/layer.py``), for the one active adapter ``a``:

    LoRA: A = lora_A[a].weight            B = lora_B[a].weight            d = b = None
          scale = scaling[a]
    VeRA: A = vera_A[a][:, :in_features]  B = vera_B[a][:out_features, :]  (PEFT's slices)
          d = vera_lambda_d[a]            b = vera_lambda_b[a]            scale = 1

``W`` is the base layer's weight (``weight.T`` for GPT-2's ``Conv1D``, which stores (in, out);
``fan_in_fan_out`` only changes how PEFT merges). ``scaling[a]`` is read per layer and per call, so
rsLoRA, ``rank_pattern`` / ``alpha_pattern`` and ``scale_layer`` are followed. A, B are cast to
``x``'s dtype when they differ (PEFT keeps fp32 adapters on a 16-bit model): LoRA's factors per
call (their gradients flow back through the cast), VeRA's frozen shared projections once per model
and dtype (a cached cast, refreshed when PEFT's buffer changes; see ``_PROJECTION_CASTS``); d, b
are used as held (fp32). Under ``torch.autocast`` the op casts like ``F.linear``.

PEFT's forward runs instead, per layer and per call, when any of these holds (the report says
which): adapters disabled; an adapter merged; not exactly one active adapter; DoRA or another
LoRA variant; ``lora_bias``; dropout ``p > 0`` in training (the engine feeds one ``x`` to the
base GEMM and the low-rank path, and PEFT's dropout applies to the low-rank path only); extra
forward arguments (``adapter_names=`` for mixed batches, variant kwargs); a base layer that is not
a plain ``nn.Linear`` / ``Conv1D`` with plain tensors (quantized, tensor-parallel, with hooks of
its own); ``x`` of another dtype than the weight outside autocast, or on another device; layers
PEFT would reject anyway (shape mismatches), so that PEFT raises its own error. Layers of other
types (LoRA on embeddings or convolutions, IA3, ...) are left alone and listed as such.

Differences from PEFT: the low-rank path is added inside the base GEMM's accumulation (rounded
once), where PEFT adds it after; fp32 outputs agree to ~1e-7 relative, 16-bit ones to their
rounding (``tests/test_accelerate.py``). For backward a VeRA layer keeps ``x A^T`` (tokens x r,
fp32) and no (tokens, out) tensor: PEFT's keeps ``x A^T`` and ``B (d * x A^T)`` (tokens x out), so
the accelerated layer keeps ``r / (r + out_features)`` of PEFT's bytes. A LoRA layer keeps ``x``
and ``x A^T`` as PEFT's does (in ``x``'s dtype where PEFT keeps an fp32 copy of a 16-bit ``x``).

Layers added later (``add_adapter`` with new target modules, ``PeftModel.from_pretrained``) are
new modules: call :func:`accelerate` again (it is idempotent). ``merge_and_unload`` / ``unload``
replace the PEFT layers by their base layers, which drops the instance forward with them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from pefttriton.ops import lowrank_linear
from pefttriton.ops.validation import FLOAT_DTYPES, autocast_dtype

# --------------------------------------------------------------------------- PEFT's classes


def _peft_classes() -> tuple[type, type, type]:
    """``(BaseTunerLayer, lora Linear, vera Linear)``; PEFT is imported only when it is used."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.tuners.vera.layer import Linear as VeraLinear

    return BaseTunerLayer, LoraLinear, VeraLinear


def _conv1d() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


# --------------------------------------------------------------------------- eligibility

# Reasons a call runs PEFT's forward. Constant strings: the call-time check returns one of them (or
# None), which keeps it cheap and traceable by torch.compile; the report shows them as they are.
DISABLED = "adapters disabled (PEFT runs the base layer alone)"
MERGED = "adapter merged into the base weight (PEFT runs the base layer alone)"
NOT_ONE_ACTIVE = "not exactly one active adapter"
NO_ADAPTER = "the active adapter is not on this layer"
VARIANT = "LoRA variant (DoRA or another lora_variant)"
LORA_BIAS = "lora_bias (B has a bias)"
NOT_LINEAR = "adapter factors are not plain nn.Linear"
DROPOUT = "dropout p > 0 while training (the engine feeds one x to both paths)"
BASE_TYPE = "base layer is not a plain nn.Linear / transformers Conv1D"
BASE_HOOKS = "base layer has hooks or a patched forward"
ADAPTER_HOOKS = "lora_A / lora_B have hooks or a patched forward"
WEIGHT_TYPE = "base weight is a tensor subclass (quantized, DTensor, ...)"
QUANTIZED = "quantized base layer"
SHAPES = "adapter shapes do not fit the layer (PEFT raises its own error)"
EXTRA_ARGS = "extra forward arguments (adapter_names=, ...)"
X_TYPE = "x is not a floating tensor"
DTYPE = "x's dtype differs from the base weight's (outside autocast)"
DEVICE = "tensors on different devices"
NO_CAST = "input dtype casting disabled and the adapter's dtype differs from x's"
SCALING = "scaling is not a Python number"
GLOBAL_HOOKS = "global module hooks are registered"
UNKNOWN = "PEFT layer without the attributes pefttriton reads (another PEFT version?)"


def _dropout_active(module: nn.Module) -> bool:
    if isinstance(module, nn.Identity):
        return False
    if type(module) is nn.Dropout:
        return module.training and module.p > 0
    return True  # an unknown module in dropout's place: let PEFT run it


def _has_hooks(module: nn.Module) -> bool:
    """Hooks (or a patched forward) that PEFT's forward would run by calling ``module`` and the
    engine, which reads its tensors instead, would skip."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or module._backward_pre_hooks or "forward" in module.__dict__
    )


def _base_reason(layer: nn.Module) -> str | None:
    base = layer.base_layer
    if type(base) is not nn.Linear and type(base) is not _conv1d():
        return BASE_TYPE
    if _has_hooks(base):
        return BASE_HOOKS
    if getattr(base, "_hf_tp_plan", None) is not None:
        return WEIGHT_TYPE
    for t in (base.weight, base.bias):
        if t is not None and type(t) is not nn.Parameter and type(t) is not torch.Tensor:
            return WEIGHT_TYPE
    return None


def _lora_reason(layer: nn.Module, a: str) -> str | None:
    if a not in layer.lora_A or a not in layer.lora_B:
        return NO_ADAPTER
    if a in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(a, False):
        return VARIANT
    if getattr(layer, "lora_bias", {}).get(a, False) or layer.lora_B[a].bias is not None:
        return LORA_BIAS
    lora_A, lora_B = layer.lora_A[a], layer.lora_B[a]
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_A.bias is not None:
        return NOT_LINEAR
    if _has_hooks(lora_A) or _has_hooks(lora_B):
        return ADAPTER_HOOKS
    if lora_A.weight.shape[1] != layer.in_features or lora_B.weight.shape != (layer.out_features, lora_A.weight.shape[0]):
        return SHAPES
    scaling = layer.scaling.get(a)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        return SCALING
    if _dropout_active(layer.lora_dropout[a]):
        return DROPOUT
    return None


def _vera_reason(layer: nn.Module, a: str) -> str | None:
    if a not in layer.vera_lambda_d or a not in layer.vera_lambda_b:
        return NO_ADAPTER
    if getattr(layer, "quantization_backend", None) is not None:
        return QUANTIZED
    if layer.vera_A is None or layer.vera_B is None or a not in layer.vera_A or a not in layer.vera_B:
        return NO_ADAPTER
    A, B = layer.vera_A[a], layer.vera_B[a]
    d, b = layer.vera_lambda_d[a], layer.vera_lambda_b[a]
    r = d.shape[0]
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
        return SHAPES
    if A.shape[1] < layer.in_features or B.shape[0] < layer.out_features or b.shape != (layer.out_features,):
        return SHAPES
    if _dropout_active(layer.vera_dropout[a]):
        return DROPOUT
    return None


def _state_reason(layer: nn.Module, is_lora: bool) -> str | None:
    """Why PEFT's forward must run for this layer in its present state (None: the engine may)."""
    if layer.disable_adapters:
        return DISABLED
    if layer.merged:
        return MERGED
    active = layer.active_adapters
    if len(active) != 1:
        return NOT_ONE_ACTIVE
    reason = _lora_reason(layer, active[0]) if is_lora else _vera_reason(layer, active[0])
    if reason is not None:
        return reason
    module = nn.modules.module
    if (
        module._global_forward_hooks or module._global_forward_pre_hooks
        or module._global_backward_hooks or module._global_backward_pre_hooks
    ):
        return GLOBAL_HOOKS
    return _base_reason(layer)


# --------------------------------------------------------------------------- the forward

# VeRA's shared projections cast to the compute dtype, once per (projection tensor, dtype):
# {source tensor: {dtype: (version, data_ptr, cast)}}, weakly keyed, so an entry dies with PEFT's
# buffer (``model.to()`` makes new ones). PEFT keeps the projections in fp32 on a 16-bit model;
# casting them per call would make every layer save its own (r, n) and (m, r) copies for backward
# (measured on a bf16 model: 1.6x PEFT's saved bytes at r=256, 384x384, 128 tokens, instead of
# 0.4x). One persistent copy per model (r * (max_in + max_out) elements) replaces them; all layers
# slice it.
_PROJECTION_CASTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _projection_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The frozen projection ``t`` in ``dtype``: itself, a cached copy, or (while compiling, where
    the compiler decides what to keep, or in inference mode, whose tensors cannot be saved for
    backward later) a plain cast."""
    if t.dtype == dtype:
        return t
    if t.requires_grad or torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return t.to(dtype)
    casts = _PROJECTION_CASTS.get(t)
    if casts is None:
        casts = _PROJECTION_CASTS[t] = {}
    entry = casts.get(dtype)
    if entry is None or entry[0] != t._version or entry[1] != t.data_ptr():
        with torch.no_grad():
            entry = casts[dtype] = (t._version, t.data_ptr(), t.detach().to(dtype))
    return entry[2]


def _engine_inputs(layer: nn.Module, is_lora: bool, x: torch.Tensor):
    """``(weight, bias, A, B, d, b, scale)`` from PEFT's tensors for ``x``, or a reason string."""
    base = layer.base_layer
    weight = base.weight if type(base) is nn.Linear else base.weight.T  # Conv1D stores (in, out)
    compute = autocast_dtype(x)  # None outside autocast: then the op wants x's dtype throughout
    if weight.device != x.device:
        return DEVICE
    if compute is None and x.dtype != weight.dtype:
        return DTYPE
    a = layer.active_adapters[0]
    if is_lora:
        A, B = layer.lora_A[a].weight, layer.lora_B[a].weight
        d = b = None
        scale = float(layer.scaling[a])
        if not getattr(layer, "cast_input_dtype_enabled", True) and A.dtype != x.dtype:
            return NO_CAST
    else:
        A, B = layer.vera_A[a], layer.vera_B[a]
        d, b = layer.vera_lambda_d[a], layer.vera_lambda_b[a]
        scale = 1.0
    if any(t is not None and t.device != x.device for t in (base.bias, A, B, d, b)):
        return DEVICE
    if not is_lora:  # sliced as PEFT slices them, after the (cached) cast to the compute dtype
        A = _projection_as(A, compute or x.dtype)[:, : layer.in_features]
        B = _projection_as(B, compute or x.dtype)[: layer.out_features, :]
    if compute is None:
        if A.dtype != x.dtype:
            A = A.to(x.dtype)
        if B.dtype != x.dtype:
            B = B.to(x.dtype)
        if d is not None and d.dtype not in (x.dtype, torch.float32):
            d = d.float()
        if b is not None and b.dtype not in (x.dtype, torch.float32):
            b = b.float()
    return weight, base.bias, A, B, d, b, scale


def _blocked(layer: nn.Module, is_lora: bool, x, args, kwargs):
    """Why this call runs PEFT's forward, or the engine's inputs."""
    if args or kwargs:
        return EXTRA_ARGS
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        return X_TYPE
    try:  # a PEFT whose layers hold their tensors differently makes PEFT's forward run, not an error
        reason = _state_reason(layer, is_lora)
        return reason if reason is not None else _engine_inputs(layer, is_lora, x)
    except (AttributeError, KeyError):
        return UNKNOWN


def _peft_forward(layer: nn.Module):
    """PEFT's own forward of ``layer``, bound."""
    return type(layer).forward.__get__(layer)


def _lora_forward(self, x, *args, **kwargs):
    """Instance forward of an accelerated PEFT LoRA layer."""
    inputs = _blocked(self, True, x, args, kwargs)
    if isinstance(inputs, str):
        return _peft_forward(self)(x, *args, **kwargs)
    return lowrank_linear(x, *inputs)


def _vera_forward(self, x, *args, **kwargs):
    """Instance forward of an accelerated PEFT VeRA layer (PEFT's returns ``x``'s dtype)."""
    inputs = _blocked(self, False, x, args, kwargs)
    if isinstance(inputs, str):
        return _peft_forward(self)(x, *args, **kwargs)
    return lowrank_linear(x, *inputs).to(x.dtype)


_FORWARDS = (_lora_forward, _vera_forward)


def _installed(layer: nn.Module) -> bool:
    """Whether ``layer`` has our instance forward: ``functools.partial(_lora_forward, layer)``
    (a partial, not a bound method: it pickles, deep-copies re-bound to the copy, and Dynamo
    traces it like accelerate's hooks)."""
    forward = layer.__dict__.get("forward")
    return (
        isinstance(forward, functools.partial)
        and forward.func in _FORWARDS
        and len(forward.args) == 1
        and forward.args[0] is layer
    )


def _foreign_forward(layer: nn.Module) -> bool:
    """An instance forward someone else installed (accelerate's device hooks, say)."""
    return "forward" in layer.__dict__ and not _installed(layer)


# --------------------------------------------------------------------------- report


@dataclass
class AccelerationReport:
    """What :func:`accelerate` did: ``fused`` the layers whose forward runs the engine in their
    present state, ``fallback`` the PEFT layers that run PEFT's forward, each with the reason.

    Eligibility is checked again at every call, so a layer listed as fused runs PEFT's forward
    while, say, ``disable_adapter()`` is active; :func:`acceleration_report` re-reads the state.
    """

    enabled: bool
    fused: list[str] = field(default_factory=list)
    fallback: dict[str, str] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        title = "pefttriton.accelerate: " + (
            f"{len(self.fused)} of {len(self.fused) + len(self.fallback)} PEFT layers fused"
            if self.enabled
            else f"off, {len(self.fallback)} PEFT layers run PEFT's forward"
        )
        rows = [(name, self.kinds.get(name, ""), "fused", "") for name in self.fused]
        rows += [(name, self.kinds.get(name, ""), "PEFT", why) for name, why in self.fallback.items()]
        if not rows:
            return title + "\n(no PEFT layer found)"
        width = max(len(r[0]) for r in rows)
        kind_width = max(4, *(len(r[1]) for r in rows))
        lines = [title, f"{'layer':<{width}}  {'kind':<{kind_width}}  runs   why not fused"]
        lines += [f"{n:<{width}}  {k:<{kind_width}}  {s:<5}  {w}".rstrip() for n, k, s, w in rows]
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle) -> None:  # IPython / notebooks print the table
        p.text(str(self))


def _kind(layer: nn.Module) -> str:
    return f"{type(layer).__module__.split('.')[-2]}.{type(layer).__name__}" if "peft.tuners" in type(layer).__module__ else type(layer).__name__


def _walk(model: nn.Module):
    """``(name, layer, is_lora or None)`` for every PEFT tuner layer; None for layers not covered."""
    BaseTunerLayer, LoraLinear, VeraLinear = _peft_classes()
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        covered = True if type(module) is LoraLinear else False if type(module) is VeraLinear else None
        yield name, module, covered


def acceleration_report(model: nn.Module) -> AccelerationReport:
    """Which PEFT layers of ``model`` run fused now (in their present state), and why the others don't."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = AccelerationReport(enabled=False)
    for name, layer, is_lora in _walk(model):
        report.kinds[name] = _kind(layer)
        if is_lora is None:
            report.fallback[name] = "layer type not covered (pefttriton accelerates LoRA and VeRA Linear / Conv1D layers)"
        elif not _installed(layer):
            report.fallback[name] = (
                "forward patched by someone else (accelerate hooks?): left alone"
                if _foreign_forward(layer)
                else "acceleration off"
            )
        else:
            report.enabled = True
            try:
                reason = _state_reason(layer, is_lora)
            except (AttributeError, KeyError):
                reason = UNKNOWN
            if reason is None:
                report.fused.append(name)
            else:
                report.fallback[name] = reason
    return report


def accelerate(model: nn.Module, enabled: bool = True) -> AccelerationReport:
    """Make the PEFT VeRA / LoRA layers of ``model`` compute through pefttriton's engine, in place.

    Args:
        model: a ``peft.PeftModel`` or any module holding PEFT layers (``inject_adapter_in_model``).
        enabled: False restores PEFT's own forward on every layer this function accelerated.

    Returns:
        An :class:`AccelerationReport` (printable): which layers run fused and why the others
        don't. Calling again is harmless; layers PEFT added since are then accelerated too.

    Nothing is copied or added: the model's parameters, buffers and ``state_dict()`` are unchanged.
    A layer whose ``forward`` was already replaced by someone else (accelerate's device hooks,
    say) is left alone.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    for _, layer, is_lora in _walk(model):
        if is_lora is None:
            continue
        if enabled and not _installed(layer) and not _foreign_forward(layer):
            layer.forward = functools.partial(_lora_forward if is_lora else _vera_forward, layer)
        elif not enabled and _installed(layer):
            del layer.__dict__["forward"]
    return acceleration_report(model)


__all__ = ["AccelerationReport", "accelerate", "acceleration_report"]
