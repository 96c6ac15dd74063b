"""``lowrank_linear_4bit``: the engine on a 4-bit base weight (QLoRA), no 16-bit copy of W kept.

    y = x W^T + bias + scale * b * ((d * (x A^T)) B^T),     W given in bitsandbytes' 4-bit layout

:class:`Quant4Weight` holds W as bitsandbytes stores it (``Params4bit`` data and ``QuantState``:
packed codes, per-block absmax, NF4 or FP4 code book, double quantization); the layout is spelled
out in :mod:`pefttriton.ops.quant4_reference`. The op computes the engine's math with the
engine's pieces (:mod:`pefttriton.ops.lowrank_linear`) and two ways of reading W:

* Triton (the ``fused`` path: CUDA, or the interpreter): the concatenated-K GEMM of
  ``pefttriton.kernels.lowrank_linear_4bit`` loads 4-bit tiles and dequantizes them in registers,
  forward and for ``grad_x = g W + gh A``; ``x A^T`` and the low-rank gradients are the dense
  engine's. No tensor of W's size exists at any point. ``split`` (cuBLAS base GEMM) needs a dense
  W and is not offered: a Triton strategy runs ``fused``.
* PyTorch (``lean`` / ``weight``, the CPU and the ``torch`` backend): W is dequantized to the
  compute dtype (bitsandbytes' ``dequantize_4bit`` when bitsandbytes is installed, else
  :func:`dequantize_4bit`'s own float32 arithmetic, which gives the same bits), the dense engine
  runs, and the copy is dropped when the call returns: forward and backward each hold one layer's
  W (the ``weight`` strategy also its ``W + delta W``), never more.

Autograd saves what the dense op saves (``x A^T``, and ``x`` only when A needs a gradient) plus
references to the quantized tensors; W gets no gradient. The op is registered with
``torch.library.custom_op`` (forward, backward, fake implementations) like the dense one.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pefttriton.kernels import lowrank_linear as kernels
from pefttriton.kernels import lowrank_linear_4bit as kernels_4bit
from pefttriton.kernels.launch import acc_dtype
from pefttriton.ops import strategy as chooser
from pefttriton.ops.backend import TORCH_PATHS, TRITON_PATHS, candidates, get_strategy, record_path, resolve_path
from pefttriton.ops.lowrank_linear import (
    _compute_backward,
    _compute_forward,
    _scaled_B,
    split_scale,
    triton_lowrank_backward,
)
from pefttriton.ops.validation import (
    autocast_cast,
    autocast_dtype,
    check_adapter,
    check_scale,
    flatten_tokens,
    no_autocast,
)

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_GRAD_NAMES = ("x", "bias", "A", "B", "d", "b")


@dataclass(frozen=True, eq=False)
class Quant4Weight:
    """A frozen (out_features, in_features) weight in bitsandbytes' 4-bit layout.

    packed: (ceil(m * n / 2),) uint8, contiguous; element ``e`` of the row-major weight is the high
        nibble of byte ``e // 2`` for even ``e``, the low nibble for odd ``e``.
    absmax: (ceil(m * n / blocksize),) float32; or, with double quantization, uint8 indices into
        ``code2``, the block's absmax being ``code2[absmax] * absmax2[i // nested_blocksize] + offset``.
    code: (16,) float32, the code book (NF4 or FP4: ``QuantState.code``).
    shape: (m, n). blocksize: elements per absmax, even. quant_type: "nf4" or "fp4".
    absmax2: (ceil(blocks / nested_blocksize),) float32, code2: (256,) float32, offset: () float32:
        the double quantization (``QuantState.state2.absmax``, ``.state2.code``, ``.offset``), or None.

    Only metadata is checked (no device synchronisation), so building one per call is cheap.
    """

    packed: Tensor
    absmax: Tensor
    code: Tensor
    shape: tuple[int, int]
    blocksize: int
    quant_type: str
    absmax2: Tensor | None = None
    code2: Tensor | None = None
    offset: Tensor | None = None
    nested_blocksize: int = 256

    def __post_init__(self):
        shape = self.shape
        if not (isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 2
                and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise ValueError(f"shape must be (out_features, in_features) non-negative ints, got {shape!r}")
        object.__setattr__(self, "shape", (int(shape[0]), int(shape[1])))
        m, n = self.shape
        for name, value in (("blocksize", self.blocksize), ("nested_blocksize", self.nested_blocksize)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 2 or value % 2:
                raise ValueError(f"{name} must be an even int >= 2, got {value!r}")
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        _check("packed", self.packed, ((m * n + 1) // 2,), (torch.uint8,))
        if not self.packed.is_contiguous():
            raise ValueError("packed must be contiguous")
        blocks = -(-m * n // self.blocksize)
        nested = [t is not None for t in (self.absmax2, self.code2, self.offset)]
        if any(nested) and not all(nested):
            raise ValueError("absmax2, code2 and offset must be given together (double quantization) or not at all")
        _check("absmax", self.absmax, (blocks,), (torch.uint8,) if self.nested else (torch.float32,),
               "(uint8 indices with double quantization)" if self.nested else "(float32 without double quantization)")
        _check("code", self.code, (16,), (torch.float32,))
        if self.nested:
            _check("absmax2", self.absmax2, (-(-blocks // self.nested_blocksize),), (torch.float32,))
            _check("code2", self.code2, (256,), (torch.float32,))
            _check("offset", self.offset, (), (torch.float32,))
        device = self.packed.device
        for name in ("absmax", "code", "absmax2", "code2", "offset"):
            t = getattr(self, name)
            if t is not None and t.device != device:
                raise ValueError(f"{name} is on {t.device} but packed is on {device}; put the quantized weight on one device")
            if t is not None and t.requires_grad:
                raise ValueError(f"{name} requires grad: the 4-bit weight is frozen, no gradient flows to it")

    @property
    def nested(self) -> bool:
        """Whether the absmaxes are double-quantized."""
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> tuple:
        """(packed, absmax, code, absmax2, code2, offset): what the custom ops take."""
        return self.packed, self.absmax, self.code, self.absmax2, self.code2, self.offset


def _check(name, t, shape, dtypes, what=""):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(str(d) for d in dtypes)}{' ' + what if what else ''}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


# --------------------------------------------------------------------------- dequantize


@functools.lru_cache(maxsize=1)
def _bitsandbytes_ops():
    """``torch.ops.bitsandbytes`` when bitsandbytes imports, else None (it is an optional extra)."""
    try:
        import bitsandbytes  # noqa: F401  (registers the ops)
    except ImportError:
        return None
    return torch.ops.bitsandbytes


def absmax_fp32(weight: Quant4Weight) -> Tensor:
    """(blocks,) float32 absmax: stored, or dequantized (``code2[q] * absmax2``, then ``+ offset``,
    each rounded to float32 as bitsandbytes does)."""
    if not weight.nested:
        return weight.absmax
    absmax2 = torch.repeat_interleave(weight.absmax2, weight.nested_blocksize)[: weight.absmax.numel()]
    return weight.code2[weight.absmax.int()] * absmax2 + weight.offset


def dequantize_4bit(weight: Quant4Weight, dtype: torch.dtype, use_bitsandbytes: bool = True) -> Tensor:
    """``weight`` as a dense (m, n) tensor of ``dtype``: each element ``code[nibble] * absmax`` in
    float32, rounded to ``dtype`` (bitsandbytes' definition).

    bitsandbytes' own ``dequantize_4bit`` kernel runs when it is installed (``use_bitsandbytes``;
    on the CPU about 15x faster than this function's PyTorch code at 4096 x 4096, measured), else
    that code, which gives the same bits (tests compare the two).
    """
    if dtype not in COMPUTE_DTYPES:
        raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    m, n = weight.shape
    # bitsandbytes 0.50 on the CPU dequantizes an odd in_features with a torch.compile'd function
    # (7-10 s on the first call of each shape, measured): this function's own code runs there.
    ops = _bitsandbytes_ops() if use_bitsandbytes and not (weight.device.type == "cpu" and n % 2) else None
    if ops is not None and m * n > 0:
        absmax = weight.absmax
        if weight.nested:
            absmax = ops.dequantize_blockwise.default(
                weight.absmax, weight.absmax2, weight.code2, weight.nested_blocksize, torch.float32
            ) + weight.offset
        return ops.dequantize_4bit.default(weight.packed, absmax, weight.blocksize, weight.quant_type, [m, n], dtype)
    numel = m * n
    packed = weight.packed
    codes = torch.stack((packed >> 4, packed & 15), 1).view(-1)[:numel]
    values = weight.code[codes.int()]
    pad = -numel % weight.blocksize
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    # in place: at most two W-sized tensors alive at once (the float32 values, then the result)
    values = values.view(-1, weight.blocksize).mul_(absmax_fp32(weight)[:, None])
    return values.view(-1)[:numel].view(m, n).to(dtype)


# --------------------------------------------------------------------------- paths


def resolve_path_4bit(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int], trains: str) -> str:
    """What computes the 4-bit op now: ``"fused"`` (the 4-bit Triton kernel) wherever the backend
    allows Triton (a Triton strategy or ``auto``; ``split`` would need a dense W), else a PyTorch
    path (``lean`` / ``weight``) as :func:`pefttriton.ops.backend.resolve_path` chooses one."""
    strategy = get_strategy()
    if strategy in TORCH_PATHS:
        return resolve_path(device, dtype, shape, trains)
    allowed = candidates(device, dtype)
    if any(path in allowed for path in TRITON_PATHS):
        return "fused"
    if strategy == "auto":
        return chooser.choose(device, dtype, shape, trains, tuple(p for p in allowed if p in TORCH_PATHS))
    return "lean"


def _run_path(path: str, t: Tensor, weight: Quant4Weight, A: Tensor) -> str:
    if not path.startswith("?"):
        return path
    m, n = weight.shape
    return resolve_path_4bit(t.device, t.dtype, (math.prod(t.shape[:-1]), n, m, A.shape[0]), path[1:])


def _forward(path, x, weight: Quant4Weight, bias, A, B, d, b, scale, out):
    """Writes ``y`` into ``out`` (N, m); returns ``x A^T`` (N, r) in the accumulation dtype."""
    if path in TORCH_PATHS:
        dense = dequantize_4bit(weight, x.dtype)  # this layer's W, dropped on return
        return _compute_forward(path, x, dense, bias, A, B, d, b, scale, out)
    scale_h, scale_B = split_scale(scale)
    xa = kernels.fused_gemm(x, A, out_dtype=acc_dtype(x.dtype))
    kernels_4bit.fused_gemm_4bit(
        x, weight.packed, weight.absmax, weight.code, weight.shape, weight.blocksize,
        weight.absmax2, weight.code2, weight.offset, weight.nested_blocksize,
        bias=bias, h=xa, lowrank_B=_scaled_B(B, scale_B), d=d, bvec=b, scale=scale_h, out=out,
    )
    return xa


def _backward(path, g, x, xa, weight: Quant4Weight, A, B, d, b, scale, needs):
    """Gradients (a dict by name) for ``needs`` = (x, weight, bias, A, B, d, b), weight never."""
    if path in TORCH_PATHS:
        dense = dequantize_4bit(weight, g.dtype) if needs[0] else None  # only grad_x reads W
        return _compute_backward(path, g, x, xa, dense, A, B, d, b, scale, needs)
    need_x, _, need_bias = needs[:3]
    g = g.contiguous()
    grads, gh = triton_lowrank_backward(g, x, xa, weight.shape, A, B, d, b, scale, needs)
    if need_x:  # grad_x = g W + gh A: the 4-bit kernel reading W as (K, N), A^T as the low-rank factor
        grads["x"] = kernels_4bit.fused_gemm_4bit(
            g, weight.packed, weight.absmax, weight.code, weight.shape, weight.blocksize,
            weight.absmax2, weight.code2, weight.offset, weight.nested_blocksize,
            h=gh, lowrank_B=A.T, transposed=True,
        )
    if need_bias:
        grads["bias"] = g.sum(0)
    return grads


# ------------------------------------------------------------------------------ custom ops


def _weight(packed, absmax, code, absmax2, code2, offset, m, n, blocksize, nested_blocksize, quant_type):
    return Quant4Weight(packed, absmax, code, (m, n), blocksize, quant_type, absmax2, code2, offset, nested_blocksize)


def forward_impl(
    x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor,
    absmax2: Tensor | None, code2: Tensor | None, offset: Tensor | None,
    bias: Tensor | None, A: Tensor, B: Tensor, d: Tensor | None, b: Tensor | None,
    m: int, n: int, blocksize: int, nested_blocksize: int, quant_type: str, scale: float, path: str,
) -> tuple[Tensor, Tensor]:
    """Returns ``y`` (..., m) and ``x A^T`` (N, r) in the accumulation dtype (for backward)."""
    weight = _weight(packed, absmax, code, absmax2, code2, offset, m, n, blocksize, nested_blocksize, quant_type)
    path = _run_path(path, x, weight, A)
    x2 = flatten_tokens(x, n)
    y = torch.empty((*x.shape[:-1], m), device=x.device, dtype=x.dtype)
    with no_autocast(x):
        xa = _forward(path, x2, weight, bias, A, B, d, b, scale, y.view(x2.shape[0], m))
    return y, xa


# The custom ops wrap plain functions (forward_impl, backward_impl), which tests run directly under
# allocation tracking (a dispatch mode sees a custom op as one call, not what it allocates inside).
_lowrank_linear_4bit_fwd = torch.library.custom_op("pefttriton::lowrank_linear_4bit_fwd", mutates_args=())(forward_impl)


@_lowrank_linear_4bit_fwd.register_fake
def _(x, packed, absmax, code, absmax2, code2, offset, bias, A, B, d, b, m, n, blocksize, nested_blocksize,
      quant_type, scale, path):
    xa = x.new_empty((math.prod(x.shape[:-1]), A.shape[0]), dtype=acc_dtype(x.dtype))
    return x.new_empty((*x.shape[:-1], m)), xa


def backward_impl(
    grad_y: Tensor, x: Tensor, xa: Tensor, packed: Tensor, absmax: Tensor, code: Tensor,
    absmax2: Tensor | None, code2: Tensor | None, offset: Tensor | None,
    bias: Tensor | None, A: Tensor, B: Tensor, d: Tensor | None, b: Tensor | None,
    m: int, n: int, blocksize: int, nested_blocksize: int, quant_type: str, scale: float,
    needs: list[bool], path: str,
) -> list[Tensor]:
    """Gradients for (x, bias, A, B, d, b); an empty tensor where ``needs`` is False."""
    weight = _weight(packed, absmax, code, absmax2, code2, offset, m, n, blocksize, nested_blocksize, quant_type)
    path = _run_path(path, grad_y, weight, A)
    g = grad_y.reshape(-1, m) if m > 0 else grad_y.reshape(math.prod(grad_y.shape[:-1]), 0)
    x2 = flatten_tokens(x, n) if needs[2] else x  # saved only for grad_A
    need_x, need_bias, need_A, need_B, need_d, need_b = needs
    with no_autocast(grad_y):
        grads = _backward(path, g, x2, xa, weight, A, B, d, b, scale,
                          (need_x, False, need_bias, need_A, need_B, need_d, need_b))
    if need_x:
        grads["x"] = grads["x"].reshape(*grad_y.shape[:-1], n)
    inputs = (x, bias, A, B, d, b)
    return [grads[name].to(t.dtype) if need else grad_y.new_empty(0) for name, t, need in zip(_GRAD_NAMES, inputs, needs)]


_lowrank_linear_4bit_bwd = torch.library.custom_op("pefttriton::lowrank_linear_4bit_bwd", mutates_args=())(backward_impl)


@_lowrank_linear_4bit_bwd.register_fake
def _(grad_y, x, xa, packed, absmax, code, absmax2, code2, offset, bias, A, B, d, b, m, n, blocksize,
      nested_blocksize, quant_type, scale, needs, path):
    grads = [grad_y.new_empty((*grad_y.shape[:-1], n))]
    grads += [t.new_empty(t.shape) if t is not None else None for t in (bias, A, B, d, b)]
    return [grad if need else grad_y.new_empty(0) for grad, need in zip(grads, needs)]


# Positions of the differentiable inputs of the forward op: x, bias, A, B, d, b.
_DIFFERENTIABLE = (0, 7, 8, 9, 10, 11)


def _setup_context(ctx, inputs, output):
    x, packed, absmax, code, absmax2, code2, offset, bias, A, B, d, b = inputs[:12]
    ctx.meta = inputs[12:]  # m, n, blocksize, nested_blocksize, quant_type, scale, path
    ctx.needs = [ctx.needs_input_grad[i] for i in _DIFFERENTIABLE]
    keep_x = ctx.needs[2]  # x only for grad_A (LoRA); VeRA's backward needs x A^T alone
    ctx.save_for_backward(x if keep_x else None, output[1], packed, absmax, code, absmax2, code2, offset, bias, A, B, d, b)


def _autograd_backward(ctx, grad_y, grad_xa):
    x, xa, *rest = ctx.saved_tensors
    if x is None:
        x = grad_y.new_empty(0)
    m, n, blocksize, nested_blocksize, quant_type, scale, path = ctx.meta
    grads = _lowrank_linear_4bit_bwd(grad_y, x, xa, *rest, m, n, blocksize, nested_blocksize, quant_type, scale,
                                     ctx.needs, path)
    out = [None] * 19
    for i, grad, need in zip(_DIFFERENTIABLE, grads, ctx.needs):
        out[i] = grad if need else None
    return tuple(out)


_lowrank_linear_4bit_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ public API


def _trains(x, A, B, d, b) -> str:
    if not torch.is_grad_enabled():
        return "none"
    factors = A.requires_grad or B.requires_grad
    vectors = any(t is not None and t.requires_grad for t in (d, b))
    if factors:
        return "all" if vectors else "factors"
    return "vectors" if vectors or x.requires_grad else "none"


def lowrank_linear_4bit(
    x: Tensor,
    weight: Quant4Weight,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    d: Tensor | None = None,
    b: Tensor | None = None,
    scale: float = 1.0,
) -> Tensor:
    """Fused ``y = x W^T + bias + scale * b * ((d * (x A^T)) B^T)`` with W 4-bit quantized.

    Args:
        x: (..., n) input, float16 / bfloat16 / float32: the compute dtype W is dequantized into.
        weight: :class:`Quant4Weight` of shape (m, n), on x's device; frozen (no gradient).
        bias: (m,) or None; A: (r, n); B: (m, r): the dtype of ``x``.
        d: (r,) or None; b: (m,) or None: the dtype of ``x`` or float32.
        scale: scalar multiplier of the low-rank path.

    Under ``torch.autocast`` ``x``, ``bias``, ``A``, ``B`` are cast to the autocast dtype and ``d``,
    ``b`` to float32, as :func:`pefttriton.ops.lowrank_linear` does. Accumulation is in float32; in
    16 bits base and adapter are summed before ``y`` is rounded once.

    Returns:
        (..., m) tensor of x's dtype. Differentiable in x, bias, A, B, d, b; backward saves
        ``x A^T`` (N, r) float32 and, only when ``A`` needs a gradient, ``x``.
    """
    if not isinstance(weight, Quant4Weight):
        raise TypeError(f"weight must be a Quant4Weight, got {type(weight).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dtype = autocast_dtype(x)
    if dtype is not None:
        x, bias, A, B = (autocast_cast(t, dtype) for t in (x, bias, A, B))
        d, b = autocast_cast(d, torch.float32), autocast_cast(b, torch.float32)
    if x.dtype not in COMPUTE_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32 (the 4-bit weight's compute dtype), got {x.dtype}")
    m, n = weight.shape
    if x.dim() < 1 or x.shape[-1] != n:
        raise ValueError(f"x must have shape (..., {n}) to match weight (out_features={m}, in_features={n}), got {tuple(x.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}; put all inputs on one device")
    r = check_adapter(x, m, n, A, B, bias, d, b)
    scale = check_scale(scale)
    trains = _trains(x, A, B, d, b)
    if torch.compiler.is_compiling():
        path = "?" + trains
    else:
        path = record_path(resolve_path_4bit(x.device, x.dtype, (math.prod(x.shape[:-1]), n, m, r), trains))
    y, _ = _lowrank_linear_4bit_fwd(
        x, *weight.tensors(), bias, A, B, d, b, m, n, weight.blocksize, weight.nested_blocksize,
        weight.quant_type, scale, path,
    )
    return y
