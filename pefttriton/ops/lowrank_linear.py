"""``lowrank_linear``: the one fused op every adapter of pefttriton is built on.

    y = x W^T + bias + scale * b * ((d * (x A^T)) B^T)

Two backends compute it (``pefttriton.set_backend``): the Triton kernels of
``pefttriton.kernels.lowrank_linear`` and plain PyTorch. Both save for backward only
``x A^T`` (tokens x rank, fp32) and, when a gradient needs it, ``x``; never a (tokens, out)
tensor. The op is registered with ``torch.library.custom_op`` (forward and backward ops, a fake
implementation for tracing, autograd), so ``torch.compile`` sees it as one node.
"""

import math

import torch
from torch import Tensor

from pefttriton.backend import get_gemm_mode, resolve_backend
from pefttriton.kernels import lowrank_linear as kernels
from pefttriton.ops.validation import check_x_and_weight

_GRAD_NAMES = ("x", "weight", "bias", "A", "B", "d", "b")


def _rank_scale(d, scale, r, like):
    """``scale * d`` (r,) in the dtype of ``like`` (``scale`` alone when there is no ``d``)."""
    if d is None:
        return torch.full((r,), scale, device=like.device, dtype=like.dtype)
    return d.to(like.dtype) * scale


# ----------------------------------------------------------------------------- torch backend


def _torch_forward(x, weight, bias, A, B, d, b, scale):
    xa = x @ A.T
    h = xa * (d * scale) if d is not None else xa * scale
    up = B * b[:, None].to(B.dtype) if b is not None else B  # b * (h B^T) == h (b * B)^T
    y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
    y.addmm_(h.to(y.dtype), up.T.to(y.dtype))
    return y, xa.to(kernels.acc_dtype(x.dtype))


def _torch_backward(g, x, xa, weight, A, B, d, b, scale, needs):
    need_x, need_weight, need_bias, need_A, need_B, need_d, need_b = needs
    dtype, acc = g.dtype, xa.dtype
    dscale = _rank_scale(d, scale, A.shape[0], xa)
    up = B * b[:, None].to(B.dtype) if b is not None else B
    gb = (g @ up.to(dtype)).to(acc)  # (b * g) B, (N, r)
    gh = gb * dscale
    grads = dict.fromkeys(_GRAD_NAMES)
    if need_d:
        grads["d"] = (xa * gb).sum(0) * scale
    if need_b or need_B:
        p = g.T.to(acc) @ (xa * dscale)  # g^T h, (m, r)
        if need_b:
            grads["b"] = (B.to(acc) * p).sum(1)
        if need_B:
            grads["B"] = p * b.to(acc)[:, None] if b is not None else p
    if need_x:
        grads["x"] = torch.addmm(g @ weight.to(dtype), gh.to(dtype), A.to(dtype))
    if need_A:
        grads["A"] = gh.to(dtype).T @ x
    if need_weight:
        grads["weight"] = g.T @ x
    if need_bias:
        grads["bias"] = g.sum(0)
    return grads


# ---------------------------------------------------------------------------- triton backend


def _triton_forward(x, weight, bias, A, B, d, b, scale):
    xa = kernels.linear_lowrank(x, A, out_dtype=kernels.acc_dtype(x.dtype))
    if get_gemm_mode() == "split":
        y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
        return kernels.add_lowrank_(y, xa, B, d, b, scale), xa
    return kernels.linear_lowrank(x, weight, bias, xa, B, d, b, scale), xa


def _triton_backward(g, x, xa, weight, A, B, d, b, scale, needs):
    need_x, need_weight, need_bias, need_A, need_B, need_d, need_b = needs
    g = g.contiguous()
    gh, grad_d, grad_b = kernels.lowrank_grads(g, xa, B, d, b, scale, need_grad_d=need_d, need_grad_b=need_b)
    grads = dict.fromkeys(_GRAD_NAMES)
    grads["d"], grads["b"] = grad_d, grad_b
    if need_x and get_gemm_mode() == "split":
        grads["x"] = kernels.add_lowrank_(g @ weight, gh, A.T)
    elif need_x:
        # grad_x = g W + gh A: the forward GEMM kernel on transposed views, one launch.
        grads["x"] = kernels.linear_lowrank(g, weight.T, None, gh, A.T)
    if need_B:
        p = g.T.to(xa.dtype) @ (xa * _rank_scale(d, scale, A.shape[0], xa))  # g^T h: only when B trains
        grads["B"] = p * b.to(xa.dtype)[:, None] if b is not None else p
    if need_A:
        grads["A"] = gh.T @ x.to(xa.dtype)
    if need_weight:
        grads["weight"] = g.T @ x
    if need_bias:
        grads["bias"] = g.sum(0)
    return grads


# ------------------------------------------------------------------------------ custom ops


def _use_triton(t: Tensor) -> bool:
    # float64 on a GPU goes to the torch backend: the kernel report checks no fp64 configs.
    # Under the interpreter float64 runs in the kernels, for tight tests against references.
    return resolve_backend(t.device) == "triton" and not (t.is_cuda and t.dtype == torch.float64)


@torch.library.custom_op("pefttriton::lowrank_linear_fwd", mutates_args=())
def _lowrank_linear_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    d: Tensor | None,
    b: Tensor | None,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Returns ``y`` (N, m) and ``x A^T`` (N, r) in the accumulation dtype, which backward needs."""
    if _use_triton(x):
        return _triton_forward(x, weight, bias, A, B, d, b, scale)
    return _torch_forward(x, weight, bias, A, B, d, b, scale)


@_lowrank_linear_fwd.register_fake
def _(x, weight, bias, A, B, d, b, scale):
    xa = x.new_empty((x.shape[0], A.shape[0]), dtype=kernels.acc_dtype(x.dtype))
    return x.new_empty((x.shape[0], weight.shape[0])), xa


@torch.library.custom_op("pefttriton::lowrank_linear_bwd", mutates_args=())
def _lowrank_linear_bwd(
    grad_y: Tensor,
    x: Tensor,
    xa: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    d: Tensor | None,
    b: Tensor | None,
    scale: float,
    needs: list[bool],
) -> list[Tensor]:
    """Gradients for (x, weight, bias, A, B, d, b); an empty tensor where ``needs`` is False."""
    backward = _triton_backward if _use_triton(grad_y) else _torch_backward
    grads = backward(grad_y, x, xa, weight, A, B, d, b, scale, needs)
    inputs = (x, weight, bias, A, B, d, b)
    return [
        grads[name].to(inp.dtype) if need else grad_y.new_empty(0)
        for name, inp, need in zip(_GRAD_NAMES, inputs, needs)
    ]


@_lowrank_linear_bwd.register_fake
def _(grad_y, x, xa, weight, bias, A, B, d, b, scale, needs):
    grads = [grad_y.new_empty((grad_y.shape[0], weight.shape[1]))]
    # An absent (None) input never needs a gradient, so its slot is always the empty tensor.
    grads += [t.new_empty(t.shape) if t is not None else None for t in (weight, bias, A, B, d, b)]
    return [grad if need else grad_y.new_empty(0) for grad, need in zip(grads, needs)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, A, B, d, b, scale = inputs
    needs = list(ctx.needs_input_grad[:7])
    # x is kept only for weight gradients of A (LoRA) or W; VeRA's backward needs x A^T alone.
    keep_x = needs[1] or needs[3]
    ctx.save_for_backward(x if keep_x else None, output[1], weight, bias, A, B, d, b)
    ctx.scale = scale
    ctx.needs = needs
    ctx.x_meta = (x.shape, x.dtype)


def _backward(ctx, grad_y, grad_xa):
    x, xa, weight, bias, A, B, d, b = ctx.saved_tensors
    if x is None:
        x = grad_y.new_empty(0)
    grads = _lowrank_linear_bwd(grad_y, x, xa, weight, bias, A, B, d, b, ctx.scale, ctx.needs)
    return (*[g if need else None for g, need in zip(grads, ctx.needs)], None)


_lowrank_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ public API


def _check_tensor(name: str, t, shape: tuple, like: Tensor, dtypes: tuple) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = " or ".join(dict.fromkeys(str(dt) for dt in dtypes))
        raise TypeError(f"{name} must have dtype {names} (like x), got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but x is on {like.device}; put all inputs on one device")


def lowrank_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    d: Tensor | None = None,
    b: Tensor | None = None,
    scale: float = 1.0,
) -> Tensor:
    """Fused ``y = x W^T + bias + scale * b * ((d * (x A^T)) B^T)``.

    Args:
        x: (..., n) input, float16 / bfloat16 / float32 / float64.
        weight: (m, n) base weight ``W``, same dtype as ``x``.
        bias: (m,) or None, same dtype as ``x``.
        A: (r, n) down projection, r >= 1, same dtype as ``x``.
        B: (m, r) up projection, same dtype as ``x``.
        d: (r,) or None, scales the rank dimension (VeRA's ``lambda_d``); dtype of ``x`` or float32.
        b: (m,) or None, scales the output of the low-rank path (VeRA's ``lambda_b``); dtype of ``x``
            or float32.
        scale: scalar multiplier of the low-rank path (LoRA's ``alpha / r``).

    Returns:
        (..., m) tensor of ``x.dtype``. Differentiable in every tensor argument; backward saves
        ``x A^T`` (N, r) and, only when ``A`` or ``weight`` needs a gradient, ``x``.
    """
    m, n = check_x_and_weight(x, weight)
    if not isinstance(A, Tensor):
        raise TypeError(f"A must be a torch.Tensor, got {type(A).__name__}")
    if A.dim() != 2:
        raise ValueError(f"A must be a 2-D (r, in_features) tensor, got shape {tuple(A.shape)}")
    r = A.shape[0]
    if r < 1:
        raise ValueError(f"rank r must be >= 1, got A of shape {tuple(A.shape)}")
    same = (x.dtype,)
    with_fp32 = (x.dtype, torch.float32)
    _check_tensor("weight", weight, (m, n), x, same)
    _check_tensor("A", A, (r, n), x, same)
    _check_tensor("B", B, (m, r), x, same)
    if bias is not None:
        _check_tensor("bias", bias, (m,), x, same)
    if d is not None:
        _check_tensor("d", d, (r,), x, with_fp32)
    if b is not None:
        _check_tensor("b", b, (m,), x, with_fp32)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")

    lead = x.shape[:-1]
    y, _ = _lowrank_linear_fwd(x.reshape(-1, n), weight, bias, A, B, d, b, float(scale))
    return y.reshape(*lead, m)
