"""PEFT layers on bitsandbytes 4-bit bases (QLoRA) through the 4-bit engine.

    model = AutoModelForCausalLM.from_pretrained(name, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    model = get_peft_model(prepare_model_for_kbit_training(model), LoraConfig(...))
    pefttriton.accelerate(model)

What this module gives :mod:`pefttriton.integration.acceleration` (which decides, per call, whether
PEFT's forward or the engine runs): :func:`is_4bit_base` (the layer's base is a
``bitsandbytes.nn.Linear4bit``), :func:`base_reason_4bit` (why such a base cannot run fused, one of
the constant strings below, or None), :func:`quantized_weight` (its ``Params4bit`` / ``QuantState``
as a :class:`pefttriton.ops.quant4.Quant4Weight`, no copy) and :func:`engine_call_4bit` (the
adapter's output through :func:`pefttriton.ops.quant4.lowrank_linear_4bit`, computed as PEFT's
forward of ``peft.tuners.lora.bnb.Linear4bit`` / ``peft.tuners.vera.layer.Linear`` defines it).

Dtypes, as bitsandbytes' ``Linear4bit.forward`` and PEFT's layers define them: the base GEMM runs
in the layer's compute dtype (``bnb_4bit_compute_dtype``; unset, the first call's x dtype when that
is float32 / bfloat16, as bitsandbytes fixes it; under ``torch.autocast`` the autocast dtype) and
the result comes back in x's dtype. The engine runs base and adapter together in the compute
dtype (x, bias, A, B cast to it; d, b kept in float32), rounding once, and returns x's dtype. PEFT
instead computes the adapter in the adapter's dtype (float32 after
``prepare_model_for_kbit_training``) and adds it to the base output: in float32 the two agree to
float32 rounding, with a 16-bit compute dtype to that dtype's rounding.

bitsandbytes is imported only when it is already loaded (a model with 4-bit layers has loaded it),
so this module costs nothing without it.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from pefttriton.ops.quant4 import COMPUTE_DTYPES, Quant4Weight, lowrank_linear_4bit
from pefttriton.ops.validation import FLOAT_DTYPES, autocast_dtype

# Why a 4-bit base layer's call runs PEFT's forward (constant strings, as acceleration.py's).
NOT_4BIT = "base layer is not a bitsandbytes Linear4bit"
NOT_QUANTIZED = "4-bit weight not quantized yet (no quant_state: move the layer to its device first)"
CPU_PACKED = (
    "4-bit weight repacked for bitsandbytes' CPU inference kernel (packing_format_for_cpu, which a "
    "no-grad eval forward sets on AVX512-BF16 CPUs)"
)
QUANT_TYPE = "4-bit quant_type is neither nf4 nor fp4"
LAYOUT = "4-bit quant_state does not match the layer (shape, dtypes or sizes of its tensors)"
COMPUTE_DTYPE = "4-bit compute dtype is not float16 / bfloat16 / float32"
DEVICE = "x, the 4-bit weight and the adapter are not on one device"
X_TYPE = "x is not a floating tensor"
INT8 = "bitsandbytes 8-bit base layer (Linear8bitLt): not fused (the engine reads 4-bit weights only)"


def _bnb_nn():
    """``bitsandbytes.nn`` if bitsandbytes is loaded, else None (no bitsandbytes layer can exist)."""
    bitsandbytes = sys.modules.get("bitsandbytes")
    return None if bitsandbytes is None else getattr(bitsandbytes, "nn", None)


def is_4bit_base(base: nn.Module) -> bool:
    """Whether ``base`` is a ``bitsandbytes.nn.Linear4bit`` (``LinearNF4`` / ``LinearFP4`` included)."""
    bnb_nn = _bnb_nn()
    return bnb_nn is not None and isinstance(base, bnb_nn.Linear4bit)


def is_8bit_base(base: nn.Module) -> bool:
    """Whether ``base`` is a ``bitsandbytes.nn.Linear8bitLt`` (not fused: :data:`INT8`)."""
    bnb_nn = _bnb_nn()
    return bnb_nn is not None and isinstance(base, bnb_nn.Linear8bitLt)


def peft_lora_4bit_class() -> type | None:
    """PEFT's LoRA layer for 4-bit bases (``peft.tuners.lora.bnb.Linear4bit``), or None without bitsandbytes.
    (VeRA on a 4-bit base is PEFT's ordinary ``peft.tuners.vera.layer.Linear`` with a quantization backend.)"""
    if _bnb_nn() is None:
        return None
    from peft.tuners.lora import bnb as lora_bnb

    return getattr(lora_bnb, "Linear4bit", None)


def _quant_state(base: nn.Module):
    # Params4bit carries it; FSDP can drop it from the parameter, bitsandbytes then reads the module's.
    state = getattr(base.weight, "quant_state", None)
    return state if state is not None else getattr(base, "quant_state", None)


def quantized_weight(base: nn.Module) -> Quant4Weight:
    """The weight of a quantized ``bitsandbytes.nn.Linear4bit`` as a :class:`Quant4Weight`, sharing
    its tensors: ``Params4bit`` data (any ``quant_storage``, viewed as bytes), ``QuantState.absmax``,
    ``.code``, ``.blocksize``, ``.quant_type`` and, with double quantization, ``.state2.absmax``,
    ``.state2.code``, ``.state2.blocksize`` and ``.offset``.

    Raises:
        ValueError / TypeError: no quant state, or one that does not describe the layout.
    """
    state = _quant_state(base)
    if state is None:
        raise ValueError(NOT_QUANTIZED)
    packed = base.weight.data
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    nested = state.state2 is not None
    return Quant4Weight(
        packed.reshape(-1), state.absmax, state.code, tuple(state.shape), state.blocksize, state.quant_type,
        absmax2=state.state2.absmax if nested else None,
        code2=state.state2.code if nested else None,
        offset=state.offset if nested else None,
        nested_blocksize=state.state2.blocksize if nested else 256,
    )


def base_reason_4bit(base: nn.Module) -> str | None:
    """Why the engine cannot compute through this 4-bit base layer (one of this module's constant
    strings), or None. Hooks on the layer are the caller's check, as for plain bases."""
    if not is_4bit_base(base):
        return INT8 if is_8bit_base(base) else NOT_4BIT
    state = _quant_state(base)
    if state is None:
        return NOT_QUANTIZED
    if getattr(state, "packing_format_for_cpu", False):
        return CPU_PACKED
    if state.quant_type not in ("nf4", "fp4"):
        return QUANT_TYPE
    if state.shape is None or tuple(state.shape) != (base.out_features, base.in_features):
        return LAYOUT
    try:
        quantized_weight(base)
    except (TypeError, ValueError, AttributeError):
        return LAYOUT
    return None


def compute_dtype(base: nn.Module, x: Tensor) -> torch.dtype:
    """The dtype ``base`` (a ``Linear4bit``) computes its GEMM in for ``x``: the autocast dtype under
    ``torch.autocast``, else its ``compute_dtype``, else x's. The first call fixes an unset compute
    dtype to x's when x is float32 / bfloat16, as ``Linear4bit.forward`` does (the same attributes
    are set, so PEFT's forward later sees what it would have)."""
    if not getattr(base, "compute_type_is_set", True):
        if x.dtype in (torch.float32, torch.bfloat16):
            base.compute_dtype = x.dtype
        base.compute_type_is_set = True
    autocast = autocast_dtype(x)
    if autocast is not None:
        return autocast
    return base.compute_dtype if base.compute_dtype is not None else x.dtype


def engine_call_4bit(
    base: nn.Module,
    x: Tensor,
    A: Tensor,
    B: Tensor,
    d: Tensor | None = None,
    b: Tensor | None = None,
    scale: float = 1.0,
) -> Tensor | str:
    """``base(x) + scale * b * ((d * (x A^T)) B^T)`` for a 4-bit ``base`` in one engine call, in x's
    dtype; or the reason (a constant string) why it cannot run, for PEFT's forward to run instead.

    x: (..., in_features). A: (r, in_features), B: (out_features, r): PEFT's ``lora_A[a].weight``,
    ``lora_B[a].weight`` (scale ``scaling[a]``), or VeRA's sliced ``vera_A`` / ``vera_B`` with
    ``d = vera_lambda_d[a]``, ``b = vera_lambda_b[a]``, scale 1. Any dtypes: A, B are cast to the
    compute dtype (their gradients flow back through the cast), d, b to float32 unless already in
    the compute dtype.
    """
    reason = base_reason_4bit(base)
    if reason is not None:
        return reason
    if not isinstance(x, Tensor) or x.dtype not in FLOAT_DTYPES:
        return X_TYPE
    weight = quantized_weight(base)
    if any(t is not None and t.device != x.device for t in (weight.packed, base.bias, A, B, d, b)):
        return DEVICE
    compute = compute_dtype(base, x)
    if compute not in COMPUTE_DTYPES:
        return COMPUTE_DTYPE

    def cast(t):
        return t if t is None or t.dtype == compute else t.to(compute)

    if d is not None and d.dtype not in (compute, torch.float32):
        d = d.float()
    if b is not None and b.dtype not in (compute, torch.float32):
        b = b.float()
    y = lowrank_linear_4bit(cast(x), weight, cast(base.bias), cast(A), cast(B), d, b, scale)
    return y if y.dtype == x.dtype else y.to(x.dtype)


__all__ = [
    "base_reason_4bit",
    "compute_dtype",
    "engine_call_4bit",
    "is_4bit_base",
    "is_8bit_base",
    "peft_lora_4bit_class",
    "quantized_weight",
]
