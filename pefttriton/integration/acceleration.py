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
``tuners/vera/layer.py``, ``tuners/lora/dora.py``), for one active adapter ``a``:

    LoRA: A = lora_A[a].weight            B = lora_B[a].weight            d = b = None
          scale = scaling[a]              bias += scale * lora_B[a].bias (lora_bias)
    VeRA: A = vera_A[a][:, :in_features]  B = vera_B[a][:out_features, :]  (PEFT's slices)
          d = vera_lambda_d[a]            b = vera_lambda_b[a]            scale = 1
    dropout = p of lora_dropout[a] / vera_dropout[a] in training, 0 in eval (the engine drops
          elements of the low-rank path's input only, as PEFT does, keeping no dropped copy of x)
    DoRA: y = (magnitude / ||W + scale B A||) * (x W^T + scale B A x [+ scale lora_B.bias]) + bias,
          the norm per output row detached and computed without forming W + scale B A

Several active adapters (PEFT sums their low-rank paths) make one engine call over their
concatenated ranks: LoRA's scales ride on the rank vector ``d``, VeRA's ``lambda_b`` folds into
its columns of ``B``, and each adapter keeps its own dropout mask (one rank segment each).

``W`` is the base layer's weight (``weight.T`` for GPT-2's ``Conv1D``, which stores (in, out);
``fan_in_fan_out`` only changes how PEFT merges). ``scaling[a]`` is read per layer and per call, so
rsLoRA, ``rank_pattern`` / ``alpha_pattern`` and ``scale_layer`` are followed. A, B are cast to
``x``'s dtype when they differ (PEFT keeps fp32 adapters on a 16-bit model): LoRA's factors per
call (their gradients flow back through the cast), VeRA's frozen shared projections once per model
and dtype (a cached cast, refreshed when PEFT's buffer changes; see ``_PROJECTION_CASTS``); d, b
are used as held (fp32). Under ``torch.autocast`` the op casts like ``F.linear``.

PEFT's forward runs instead, per layer and per call, when any of these holds (the report says
which): adapters disabled; an adapter merged; a LoRA variant other than DoRA; DoRA among several
active adapters, or with dropout in training (PEFT then feeds the dropped ``x`` to the base weight
too); a dropout module other than ``nn.Dropout`` / ``nn.Identity``; extra forward arguments
(``adapter_names=`` for mixed batches, variant kwargs); a base layer that is not a plain
``nn.Linear`` / ``Conv1D`` with plain tensors (quantized, tensor-parallel, with hooks of its own);
``x`` of another dtype than the weight outside autocast, or on another device; layers PEFT would
reject anyway (shape mismatches), so that PEFT raises its own error. Layers of other types (LoRA on
embeddings or convolutions, IA3, ...) are left alone and listed as such.

Differences from PEFT: the low-rank path is added inside the base GEMM's accumulation (rounded
once), where PEFT adds it after; fp32 outputs agree to ~1e-7 relative, 16-bit ones to their
rounding (``tests/test_accelerate.py``, ``tests/test_accelerate_configs.py``); dropout masks are
drawn by the engine (from torch's generators, so ``torch.manual_seed`` reproduces a run), not by
``nn.Dropout``. For backward a VeRA layer keeps ``x A^T`` (tokens x r, fp32) and no (tokens, out)
tensor: PEFT's keeps ``x A^T`` and ``B (d * x A^T)`` (tokens x out), so the accelerated layer keeps
``r / (r + out_features)`` of PEFT's bytes. A LoRA layer keeps ``x`` and ``x A^T`` as PEFT's does
(in ``x``'s dtype where PEFT keeps an fp32 copy of a 16-bit ``x``); with dropout PEFT also keeps
each layer's dropped copy of ``x`` and its mask, the engine only a seed.

Layers added later (``add_adapter`` with new target modules, ``PeftModel.from_pretrained``) are
new modules: call :func:`accelerate` again (it is idempotent). ``merge_and_unload`` / ``unload``
replace the PEFT layers by their base layers, which drops the instance forward with them.
"""

from __future__ import annotations

import contextvars
import functools
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from pefttriton.integration import quantized
from pefttriton.ops import lowrank_linear
from pefttriton.ops.backend import last_path
from pefttriton.ops.vera_bank import broadcast_sequence_ids, vera_bank_linear
from pefttriton.ops.validation import FLOAT_DTYPES, autocast_dtype

# --------------------------------------------------------------------------- PEFT's classes


def _peft_classes() -> tuple[type, type, type]:
    """``(BaseTunerLayer, lora Linear, vera Linear)``; PEFT is imported only when it is used."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.tuners.vera.layer import Linear as VeraLinear

    return BaseTunerLayer, LoraLinear, VeraLinear


@functools.lru_cache(maxsize=1)
def _conv1d() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


@functools.lru_cache(maxsize=1)
def _dora_variant() -> type | None:
    """PEFT's DoRA variant of a LoRA Linear layer (``lora_variant[a]``), None where PEFT has none."""
    try:
        from peft.tuners.lora.variants import DoraLinearVariant
    except ImportError:  # pragma: no cover - older PEFT
        return None
    return DoraLinearVariant


# --------------------------------------------------------------------------- eligibility

# Reasons a call runs PEFT's forward. Constant strings: the call-time check returns one of them (or
# the engine's inputs), which keeps it cheap and traceable by torch.compile; the report shows them.
DISABLED = "adapters disabled (PEFT runs the base layer alone)"
MERGED = "adapter merged into the base weight (PEFT runs the base layer alone)"
NO_ADAPTER = "no active adapter is on this layer (PEFT runs the base layer alone)"
VARIANT = "LoRA variant other than DoRA"
DORA_SEVERAL = "DoRA among several active adapters (PEFT's result depends on their order)"
DORA_DROPOUT = "DoRA with dropout while training (PEFT feeds the dropped x to the base weight too)"
NOT_LINEAR = "adapter factors are not plain nn.Linear"
DROPOUT_TYPE = "adapter dropout is not nn.Dropout / nn.Identity"
BASE_TYPE = "base layer is not a plain nn.Linear / transformers Conv1D"
BASE_HOOKS = "base layer has hooks or a patched forward"
ADAPTER_HOOKS = "lora_A / lora_B have hooks or a patched forward"
WEIGHT_TYPE = "base weight is a tensor subclass (quantized, DTensor, ...)"
QUANTIZED = "quantized base layer (not a bitsandbytes 4-bit one)"
QUANTIZED_FEATURE = ("4-bit base with dropout in training, several active adapters, lora_bias or DoRA "
                     "(the 4-bit engine takes one plain adapter)")
SHAPES = "adapter shapes do not fit the layer (PEFT raises its own error)"
EXTRA_ARGS = "extra forward arguments (adapter_names=, ...)"
X_TYPE = "x is not a floating tensor"
DTYPE = "x's dtype differs from the base weight's (outside autocast)"
DEVICE = "tensors on different devices"
NO_CAST = "input dtype casting disabled and the adapter's dtype differs from x's"
SCALING = "scaling is not a Python number"
GLOBAL_HOOKS = "global module hooks are registered"
UNKNOWN = "PEFT layer without the attributes pefttriton reads (another PEFT version?)"
# Reasons of PEFT 0.20 and earlier pefttriton, kept for code that compared against them: each of these
# configurations now runs fused.
NOT_ONE_ACTIVE = "not exactly one active adapter"
LORA_BIAS = "lora_bias (B has a bias)"
DROPOUT = "dropout p > 0 while training (the engine feeds one x to both paths)"


def _has_hooks(module: nn.Module) -> bool:
    """Hooks (or a patched forward) that PEFT's forward would run by calling ``module`` and the
    engine, which reads its tensors instead, would skip."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or module._backward_pre_hooks or "forward" in module.__dict__
    )


def _dropout_p(module: nn.Module) -> float | None:
    """The probability ``module`` drops with now (0 in eval mode), None for a module the engine
    cannot stand in for."""
    if type(module) is nn.Identity:
        return 0.0
    if type(module) is nn.Dropout and not _has_hooks(module):
        return module.p if module.training else 0.0
    return None


def _global_hooks() -> bool:
    module = nn.modules.module
    return bool(
        module._global_forward_hooks or module._global_forward_pre_hooks
        or module._global_backward_hooks or module._global_backward_pre_hooks
    )


def _base_reason(base: nn.Module) -> str | None:
    if quantized.is_4bit_base(base):  # QLoRA: the 4-bit engine reads bitsandbytes' layout
        return BASE_HOOKS if _has_hooks(base) else quantized.base_reason_4bit(base)
    if quantized.is_8bit_base(base):
        return quantized.INT8
    if type(base) is not nn.Linear and type(base) is not _conv1d():
        return BASE_TYPE
    if _has_hooks(base):
        return BASE_HOOKS
    if getattr(base, "_hf_tp_plan", None) is not None:
        return WEIGHT_TYPE
    params = base._parameters
    for t in (params["weight"], params.get("bias")):
        if t is not None and type(t) is not nn.Parameter and type(t) is not torch.Tensor:
            return WEIGHT_TYPE
    return None


class _Adapter(NamedTuple):
    """One active adapter of a layer, as the engine reads it (PEFT's own tensors)."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float
    p: float  # dropout probability now
    d: torch.Tensor | None = None  # VeRA's lambda_d (r,)
    b: torch.Tensor | None = None  # VeRA's lambda_b (out,)
    bias: torch.Tensor | None = None  # lora_bias: lora_B's bias (out,)
    magnitude: torch.Tensor | None = None  # DoRA's magnitude (out,)


def _lora_adapter(layer: nn.Module, a: str) -> _Adapter | str:
    mods = layer._modules
    lora_A, lora_B = mods["lora_A"]._modules[a], mods["lora_B"]._modules[a]
    magnitude = None
    variant = layer.lora_variant.get(a) if hasattr(layer, "lora_variant") else None
    if variant is not None or getattr(layer, "use_dora", {}).get(a, False):
        if type(variant) is not _dora_variant():
            return VARIANT
        magnitude = mods["lora_magnitude_vector"]._modules[a]._parameters["weight"]
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_A._parameters["bias"] is not None:
        return NOT_LINEAR
    if _has_hooks(lora_A) or _has_hooks(lora_B):
        return ADAPTER_HOOKS
    A, B = lora_A._parameters["weight"], lora_B._parameters["weight"]
    if A.shape[1] != layer.in_features or B.shape != (layer.out_features, A.shape[0]):
        return SHAPES
    scale = layer.scaling[a]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        return SCALING
    p = _dropout_p(mods["lora_dropout"]._modules[a])
    if p is None:
        return DROPOUT_TYPE
    return _Adapter(A, B, float(scale), p, bias=lora_B._parameters["bias"], magnitude=magnitude)


def _vera_adapter(layer: nn.Module, a: str) -> _Adapter | str:
    if getattr(layer, "quantization_backend", None) is not None and not quantized.is_4bit_base(layer.base_layer):
        return QUANTIZED
    vera_A, vera_B = layer.vera_A, layer.vera_B
    if vera_A is None or vera_B is None or a not in vera_A or a not in vera_B:
        return SHAPES
    A, B = vera_A[a], vera_B[a]
    d, b = layer.vera_lambda_d[a], layer.vera_lambda_b[a]
    r = d.shape[0]
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
        return SHAPES
    if A.shape[1] < layer.in_features or B.shape[0] < layer.out_features or b.shape != (layer.out_features,):
        return SHAPES
    p = _dropout_p(layer.vera_dropout[a])
    if p is None:
        return DROPOUT_TYPE
    return _Adapter(A, B, 1.0, p, d=d, b=b)


def _adapters(layer: nn.Module, is_lora: bool) -> list[_Adapter] | str:
    """The active adapters of ``layer`` PEFT's forward would apply now, or why PEFT must run."""
    if layer.disable_adapters:
        return DISABLED
    if layer.merged:
        return MERGED
    present = layer._modules["lora_A"]._modules if is_lora else layer.vera_lambda_d
    active = [a for a in layer.active_adapters if a in present]  # PEFT skips the others
    if not active:
        return NO_ADAPTER
    adapters = []
    for a in active:
        adapter = _lora_adapter(layer, a) if is_lora else _vera_adapter(layer, a)
        if isinstance(adapter, str):
            return adapter
        adapters.append(adapter)
    if any(ad.magnitude is not None for ad in adapters):
        if len(adapters) > 1:
            return DORA_SEVERAL
        if adapters[0].p > 0:
            return DORA_DROPOUT
    if _global_hooks():
        return GLOBAL_HOOKS
    base = layer._modules["base_layer"]
    reason = _base_reason(base)
    if reason is None and quantized.is_4bit_base(base):
        ad = adapters[0]  # the 4-bit engine takes one plain adapter
        if len(adapters) > 1 or ad.p > 0 or ad.bias is not None or ad.magnitude is not None:
            reason = QUANTIZED_FEATURE
    return reason or adapters


def _state_reason(layer: nn.Module, is_lora: bool) -> str | None:
    """Why PEFT's forward must run for this layer in its present state (None: the engine may)."""
    found = _adapters(layer, is_lora)
    return found if isinstance(found, str) else None


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


# Row sums of W**2 of frozen base weights, for DoRA's weight norm: {weight: (version, data_ptr, sums)}.
_ROW_SQUARES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _row_squares(weight: torch.Tensor) -> torch.Tensor:
    """``(W * W).sum(1)`` in float32 (float64 for float64), cached while ``W`` is unchanged."""
    key = weight.detach()
    entry = None if torch.compiler.is_compiling() else _ROW_SQUARES.get(weight)
    if entry is None or entry[0] != weight._version or entry[1] != weight.data_ptr():
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        sums = key.to(acc).square().sum(1)
        if torch.compiler.is_compiling():
            return sums
        entry = _ROW_SQUARES[weight] = (weight._version, weight.data_ptr(), sums)
    return entry[2]


def _dora_norm(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``||W + scale * B A||`` per output row (m,), detached, as PEFT's DoRA computes it (rounded to
    ``dtype``), without forming ``W + scale * B A`` (m, n):

        ||w_i + s (BA)_i||^2 = ||w_i||^2 + 2 s b_i . (W A^T)_i + s^2 b_i . (B (A A^T))_i

    in float32: one (m, n, r) product and two of rank size, ``||w_i||^2`` cached per weight."""
    with torch.no_grad():
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        A32, B32 = A.detach().to(dtype).to(acc), B.detach().to(dtype).to(acc)
        cross = (B32 * (weight.detach().to(dtype).to(acc) @ A32.T)).sum(1)
        square = (B32 * (B32 @ (A32 @ A32.T))).sum(1)
        return (_row_squares(weight) + 2 * scale * cross + scale * scale * square).clamp_min(0).sqrt().to(dtype)


class _DoraScale(torch.autograd.Function):
    """``y = z * scale + bias`` per output column, in float32 and rounded once to ``z``'s dtype
    (as PEFT's DoRA rounds its sum); saves ``z`` as it is (no float32 copy)."""

    @staticmethod
    def forward(ctx, z, scale, bias):
        ctx.save_for_backward(z, scale)
        ctx.bias_dtype = None if bias is None else bias.dtype
        y = z.float() * scale
        if bias is not None:
            y = y + bias
        return y.to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, scale = ctx.saved_tensors
        g32 = g.float()
        grad_z = (g32 * scale).to(z.dtype) if ctx.needs_input_grad[0] else None
        grad_scale = (g32 * z.float()).reshape(-1, z.shape[-1]).sum(0).to(scale.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = g32.reshape(-1, z.shape[-1]).sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return grad_z, grad_scale, grad_bias


class _Call(NamedTuple):
    """One engine call standing in for PEFT's forward (the arguments of :func:`lowrank_linear`,
    then DoRA's output scale and the bias added after it)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    A: torch.Tensor
    B: torch.Tensor
    d: torch.Tensor | None
    b: torch.Tensor | None
    scale: float
    dropout: list[float]
    ranks: list[int]
    dora_scale: torch.Tensor | None = None
    dora_bias: torch.Tensor | None = None

    def run(self, x: torch.Tensor) -> torch.Tensor:
        y = lowrank_linear(x, self.weight, self.bias, self.A, self.B, self.d, self.b, self.scale,
                           dropout=self.dropout, rank_segments=self.ranks)
        if self.dora_scale is None:
            return y
        return _DoraScale.apply(y, self.dora_scale, self.dora_bias)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _engine_call(layer: nn.Module, is_lora: bool, adapters: list[_Adapter], x: torch.Tensor) -> _Call | str:
    """The engine call for ``x`` from PEFT's tensors, or why PEFT must run.

    One adapter maps as the module docstring says. Several adapters (PEFT sums their paths)
    concatenate their ranks: LoRA's scales ride on the rank vector ``d``, VeRA's ``lambda_b``
    folds into its ``B`` columns; each keeps its own dropout mask (one rank segment each).
    ``lora_bias`` adds ``scale * lora_B.bias`` to the bias. DoRA computes
    ``(m / ||W + s B A||) * (x W^T + s B A x + s lora_B.bias) + bias`` (norm detached, as PEFT)."""
    base = layer._modules["base_layer"]
    if quantized.is_4bit_base(base):
        return _engine_call_4bit(layer, is_lora, adapters, x, base)
    weight = base._parameters["weight"]
    if type(base) is not nn.Linear:
        weight = weight.T  # Conv1D stores (in, out)
    bias = base._parameters.get("bias")
    compute = autocast_dtype(x)  # None outside autocast: then the op wants x's dtype throughout
    dtype = compute or x.dtype
    if weight.device != x.device:
        return DEVICE
    if compute is None and x.dtype != weight.dtype:
        return DTYPE
    for ad in adapters:
        if any(t is not None and t.device != x.device for t in (bias, ad.A, ad.B, ad.d, ad.b, ad.bias)):
            return DEVICE
    if is_lora and not getattr(layer, "cast_input_dtype_enabled", True) and adapters[0].A.dtype != x.dtype:
        return NO_CAST
    if not is_lora:  # sliced as PEFT slices them, after the (cached) cast to the compute dtype
        n, m = layer.in_features, layer.out_features
        adapters = [ad._replace(A=_projection_as(ad.A, dtype)[:, :n], B=_projection_as(ad.B, dtype)[:m, :]) for ad in adapters]
    if compute is None:  # outside autocast the op wants x's dtype for A and B (cast per call: grads flow)
        adapters = [ad._replace(A=_cast(ad.A, x.dtype), B=_cast(ad.B, x.dtype)) for ad in adapters]
    vec_dtype = torch.float32 if x.dtype != torch.float64 else torch.float64
    lora_biases = [(ad.scale, ad.bias) for ad in adapters if ad.bias is not None]
    if lora_biases:
        extra = sum(s * _cast(t, dtype) for s, t in lora_biases)
    if len(adapters) == 1:
        ad = adapters[0]
        d = b = None
        if not is_lora:
            d, b = ad.d, ad.b
            if compute is None:
                d = d if d.dtype in (x.dtype, torch.float32) else d.float()
                b = b if b.dtype in (x.dtype, torch.float32) else b.float()
        if ad.magnitude is not None:  # DoRA
            norm = _dora_norm(weight, ad.A, ad.B, ad.scale, dtype)
            return _Call(weight, extra if lora_biases else None, ad.A, ad.B, None, None, ad.scale, [ad.p], [ad.A.shape[0]],
                         dora_scale=ad.magnitude / norm, dora_bias=bias)
        if lora_biases:
            bias = extra if bias is None else bias + extra
        return _Call(weight, bias, ad.A, ad.B, d, b, ad.scale, [ad.p], [ad.A.shape[0]])
    A = torch.cat([ad.A for ad in adapters])
    if is_lora:
        B = torch.cat([ad.B for ad in adapters], 1)
        d = torch.cat([torch.full((ad.A.shape[0],), ad.scale, device=x.device, dtype=vec_dtype) for ad in adapters])
    else:
        B = torch.cat([(ad.b.to(vec_dtype)[:, None] * ad.B).to(ad.B.dtype) for ad in adapters], 1)
        d = torch.cat([ad.d.to(vec_dtype) for ad in adapters])
    if lora_biases:
        bias = extra if bias is None else bias + extra
    return _Call(weight, bias, A, B, d, None, 1.0, [ad.p for ad in adapters], [ad.A.shape[0] for ad in adapters])


class _Call4bit(NamedTuple):
    """One call of the 4-bit engine standing in for PEFT's forward on a bitsandbytes 4-bit base."""

    base: nn.Module
    A: torch.Tensor
    B: torch.Tensor
    d: torch.Tensor | None
    b: torch.Tensor | None
    scale: float

    def run(self, x: torch.Tensor) -> torch.Tensor | str:
        return quantized.engine_call_4bit(self.base, x, self.A, self.B, self.d, self.b, self.scale)


def _engine_call_4bit(layer, is_lora, adapters, x, base) -> _Call4bit:
    """The call of the 4-bit engine for the one plain adapter :func:`_adapters` allows on such a base."""
    ad = adapters[0]
    if is_lora:
        return _Call4bit(base, ad.A, ad.B, None, None, ad.scale)
    dtype = quantized.compute_dtype(base, x)  # the shared projections, cast once per model and dtype
    A = _projection_as(ad.A, dtype)[:, : layer.in_features]
    B = _projection_as(ad.B, dtype)[: layer.out_features, :]
    return _Call4bit(base, A, B, ad.d, ad.b, 1.0)


def _plan(layer: nn.Module, is_lora: bool, x, args, kwargs) -> _Call | str:
    """Why this call runs PEFT's forward, or the engine call that replaces it."""
    if args or kwargs:
        return EXTRA_ARGS
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        return X_TYPE
    try:  # a PEFT whose layers hold their tensors differently makes PEFT's forward run, not an error
        adapters = _adapters(layer, is_lora)
        return adapters if isinstance(adapters, str) else _engine_call(layer, is_lora, adapters, x)
    except (AttributeError, KeyError):
        return UNKNOWN


# --------------------------------------------------------------------------- VeRA mixed batches

# The adapter names of a mixed batch (one per sequence) while an accelerated PEFT VeRA model runs
# ``forward`` / ``generate`` with ``adapter_names=``; None otherwise.
_MIXED: contextvars.ContextVar[list | None] = contextvars.ContextVar("pefttriton_vera_mixed", default=None)
MIXED_VERA = ("mixed batch (adapter_names=): every row through its own adapter by the VeRA bank kernel "
              "(PEFT 0.21 gives every row the active adapter's output)")
# Projections already compared equal across a layer's adapters: {(id A, version A, id B, version B) ...}.
_SAME_PROJECTIONS: set = set()


def _vera_mixed(layer: nn.Module, x: torch.Tensor, names: list) -> torch.Tensor | str:
    """The mixed batch through :func:`~pefttriton.ops.vera_bank.vera_bank_linear`: the layer's
    adapters stacked as a bank, each row's id from its sequence's name (``"__base__"`` or an
    adapter this layer lacks: the base layer alone), or why PEFT must run."""
    if layer.disable_adapters:
        return DISABLED
    if layer.merged:
        return MERGED
    base = layer._modules["base_layer"]
    reason = _base_reason(base)
    if reason is not None:
        return reason
    adapters = list(layer.vera_lambda_d.keys())
    ranks = {layer.vera_lambda_d[a].shape[0] for a in adapters}
    if len(ranks) != 1:
        raise ValueError(f"a mixed batch needs the VeRA adapters of a layer to share one rank, got ranks {sorted(ranks)}")
    A0, B0 = layer.vera_A[adapters[0]], layer.vera_B[adapters[0]]
    for a in adapters[1:]:
        A, B = layer.vera_A[a], layer.vera_B[a]
        key = (id(A0), A0._version, id(A), A._version, id(B0), B0._version, id(B), B._version)
        if key not in _SAME_PROJECTIONS:
            if not (torch.equal(A, A0) and torch.equal(B, B0)):
                raise ValueError(f"a mixed batch needs VeRA adapters that share the projections (the same "
                                 f"projection_prng_key): {adapters[0]!r} and {a!r} differ")
            _SAME_PROJECTIONS.add(key)
    index = {a: i for i, a in enumerate(adapters)}
    ids = torch.tensor([index.get(name, -1) for name in names], device=x.device)
    weight = base._parameters["weight"] if type(base) is nn.Linear else base._parameters["weight"].T
    dtype = autocast_dtype(x) or x.dtype
    A = _projection_as(A0, dtype)[:, : layer.in_features]
    B = _projection_as(B0, dtype)[: layer.out_features, :]
    lambda_d = torch.stack([layer.vera_lambda_d[a] for a in adapters])
    lambda_b = torch.stack([layer.vera_lambda_b[a] for a in adapters])
    y = vera_bank_linear(x, weight, base._parameters.get("bias"), A, B, lambda_d, lambda_b, broadcast_sequence_ids(ids, x))
    return y.to(x.dtype)


def _peft_model_forward(self, *args, **kwargs):
    """Instance ``forward`` of an accelerated PEFT VeRA model: ``adapter_names=`` reaches its layers."""
    return _with_names(self, type(self).forward, args, kwargs)


def _peft_model_generate(self, *args, **kwargs):
    """Instance ``generate`` of an accelerated PEFT VeRA model: ``adapter_names=`` reaches its layers."""
    return _with_names(self, type(self).generate, args, kwargs)


def _with_names(model, method, args, kwargs):
    names = kwargs.get("adapter_names")
    if names is None:
        return method(model, *args, **kwargs)
    if model.training:
        raise ValueError("adapter_names (a mixed batch) is for inference: call model.eval() first, as PEFT requires")
    known = set(model.peft_config) | {"__base__"}
    unknown = sorted({n for n in names if n not in known})
    if unknown:
        raise ValueError(f"adapter_names holds adapters the model does not have: {unknown}; it has {sorted(model.peft_config)}")
    token = _MIXED.set(list(names))
    try:
        return method(model, *args, **kwargs)
    finally:
        _MIXED.reset(token)


# What the last call of each accelerated layer ran: "fused (<path>)" or PEFT's reason (the report).
_LAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _forward(self, is_lora: bool, x, *args, **kwargs):
    compiling = torch.compiler.is_compiling()
    names = None if is_lora or compiling else _MIXED.get()  # (a context variable would break the graph)
    if names is not None and not args and not kwargs and isinstance(x, torch.Tensor):
        y = _vera_mixed(self, x, names)
        if not isinstance(y, str):
            if not compiling:
                _LAST[self] = "fused mixed batch (VeRA bank kernel)"
            return y
        _LAST[self] = y
        return type(self).forward(self, x, *args, **kwargs)
    plan = _plan(self, is_lora, x, args, kwargs)
    if isinstance(plan, str):
        if not compiling:
            _LAST[self] = plan
        return type(self).forward(self, x, *args, **kwargs)
    y = plan.run(x)
    if isinstance(y, str):  # the 4-bit engine declined at the call (a layout it does not read)
        if not compiling:
            _LAST[self] = y
        return type(self).forward(self, x, *args, **kwargs)
    if not compiling:
        _LAST[self] = f"fused ({last_path()})"
    return y if is_lora else y.to(x.dtype)  # PEFT's VeRA returns x's dtype


def _lora_forward(self, x, *args, **kwargs):
    """Instance forward of an accelerated PEFT LoRA layer."""
    return _forward(self, True, x, *args, **kwargs)


def _vera_forward(self, x, *args, **kwargs):
    """Instance forward of an accelerated PEFT VeRA layer."""
    return _forward(self, False, x, *args, **kwargs)


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
    present state, ``fallback`` the PEFT layers that run PEFT's forward, each with the reason, and
    ``last`` what each accelerated layer's last call actually ran (``"fused (<path>)"`` or PEFT's
    forward with the reason; ``"not called yet"``).

    Eligibility is checked again at every call, so a layer listed as fused runs PEFT's forward
    while, say, ``disable_adapter()`` is active, and one listed under ``fallback`` because its
    weight is sharded runs fused when FSDP2 has unsharded it for the call: ``last`` tells.
    :func:`acceleration_report` re-reads the state and the last calls.
    """

    enabled: bool
    fused: list[str] = field(default_factory=list)
    fallback: dict[str, str] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    last: dict[str, str] = field(default_factory=dict)

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
        if self.last:
            lines += ["", f"{'layer':<{width}}  last call"]
            lines += [f"{n:<{width}}  {what}" for n, what in self.last.items()]
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle) -> None:  # IPython / notebooks print the table
        p.text(str(self))


SHARDED = "base weight is sharded (FSDP2 unshards it for each call, which then runs fused: see the last call)"


def _kind(layer: nn.Module) -> str:
    return f"{type(layer).__module__.split('.')[-2]}.{type(layer).__name__}" if "peft.tuners" in type(layer).__module__ else type(layer).__name__


def _walk(model: nn.Module):
    """``(name, layer, is_lora or None)`` for every PEFT tuner layer; None for layers not covered."""
    BaseTunerLayer, LoraLinear, VeraLinear = _peft_classes()
    lora_types = (LoraLinear, quantized.peft_lora_4bit_class())  # QLoRA: PEFT's lora.bnb.Linear4bit
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        covered = True if type(module) in lora_types else False if type(module) is VeraLinear else None
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
            if reason == WEIGHT_TYPE and type(layer.base_layer.weight).__name__ == "DTensor":
                reason = SHARDED
            if reason is None:
                report.fused.append(name)
            else:
                report.fallback[name] = reason
            report.last[name] = _LAST.get(layer, "not called yet")
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
    vera = False
    for _, layer, is_lora in _walk(model):
        if is_lora is None:
            continue
        vera = vera or not is_lora
        if enabled and not _installed(layer) and not _foreign_forward(layer):
            layer.forward = functools.partial(_lora_forward if is_lora else _vera_forward, layer)
        elif not enabled and _installed(layer):
            del layer.__dict__["forward"]
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):  # a PeftModel: mixed VeRA batches
        for attr, wrapper in (("forward", _peft_model_forward), ("generate", _peft_model_generate)):
            current = model.__dict__.get(attr)
            ours = isinstance(current, functools.partial) and current.func is wrapper
            if enabled and vera and current is None:
                setattr(model, attr, functools.partial(wrapper, model))
            elif not enabled and ours:
                del model.__dict__[attr]
    return acceleration_report(model)


__all__ = ["AccelerationReport", "accelerate", "acceleration_report"]
