"""``lowrank_linear``: the one fused op every adapter of pefttriton is built on.

    y = x W^T + bias + scale * b * ((d * (x A^T)) B^T)

Two backends compute it (``pefttriton.set_backend``): the Triton kernels of
``pefttriton.kernels.lowrank_linear`` and plain PyTorch. Both save for backward only
``x A^T`` (tokens x rank, fp32) and, when a gradient needs it, ``x``; never a (tokens, out)
tensor. The op is registered with ``torch.library.custom_op`` (forward and backward ops, a fake
implementation for tracing, autograd), so ``torch.compile`` sees it as one node.
"""

import torch
from torch import Tensor

from pefttriton.backend import resolve_path
from pefttriton.kernels import lowrank_linear as kernels
from pefttriton.kernels.launch import acc_dtype
from pefttriton.ops.validation import (
    autocast_cast,
    autocast_dtype,
    check_scale,
    check_tensor,
    check_x_and_weight,
    flatten_tokens,
    no_autocast,
)

_GRAD_NAMES = ("x", "weight", "bias", "A", "B", "d", "b")


def split_scale(scale: float) -> tuple[float, float]:
    """``scale = scale_h * scale_B`` with ``|scale_h| <= 1`` and ``scale_B >= 1``.

    The low-rank path rounds two operands to the input dtype for its matrix products: ``h``
    (tokens, rank) and the up-projection ``B`` (out, rank). Scaling ``h`` by ``scale_h`` and ``B``
    by ``scale_B`` keeps ``|h| <= |d * (x A^T)|``, which PEFT's order of operations forms too, so
    a large ``scale`` cannot overflow 16 bits where PEFT does not (only an entry of
    ``scale * b * B`` above the 16-bit range could); a small one shrinks ``h`` as PEFT's final
    multiply would.
    """
    if abs(scale) <= 1.0:
        return scale, 1.0
    return (1.0 if scale > 0 else -1.0), abs(scale)


def _scaled_B(B: Tensor, scale_B: float) -> Tensor:
    """``scale_B * B`` rounded once to ``B``'s dtype (B itself when ``scale_B == 1``)."""
    if scale_B == 1.0:
        return B
    return (B.to(acc_dtype(B.dtype)) * scale_B).to(B.dtype)


def _rank_scale(d, scale, r, like):
    """``scale * d`` (r,) in the dtype of ``like`` (``scale`` alone when there is no ``d``)."""
    if d is None:
        return torch.full((r,), scale, device=like.device, dtype=like.dtype)
    return d.to(like.dtype) * scale


# ----------------------------------------------------------------------------- torch backend


def _torch_forward(x, weight, bias, A, B, d, b, scale):
    dtype = x.dtype
    acc = acc_dtype(dtype)
    scale_h, scale_B = split_scale(scale)
    xa = (x @ A.T).to(acc)
    h = (xa * _rank_scale(d, scale_h, A.shape[0], xa)).to(dtype)
    up = B.to(acc) * scale_B
    if b is not None:
        up = up * b.to(acc)[:, None]  # b * (h B^T) == h (b * B)^T
    y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
    y.addmm_(h, up.to(dtype).T)
    return y, xa


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


def _triton_forward(x, weight, bias, A, B, d, b, scale, split):
    scale_h, scale_B = split_scale(scale)
    B_s = _scaled_B(B, scale_B)
    xa = kernels.fused_gemm(x, A, out_dtype=acc_dtype(x.dtype))
    if split:
        y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
        return kernels.add_lowrank_(y, xa, B_s, d, b, scale_h), xa
    return kernels.fused_gemm(x, weight, bias, xa, B_s, d, b, scale_h), xa


def _triton_backward(g, x, xa, weight, A, B, d, b, scale, needs, split):
    need_x, need_weight, need_bias, need_A, need_B, need_d, need_b = needs
    g = g.contiguous()
    # The kernel's two 16-bit products, (b * g) B and h B^T for grad_b, see B scaled by scale_B
    # and h = d * (x A^T) by scale_h (split_scale): their results are the full-scale ones.
    scale_h, scale_B = split_scale(scale)
    gh, grad_d, grad_b = kernels.lowrank_grads(
        g, xa, _scaled_B(B, scale_B), d, b, scale_h, need_grad_d=need_d, need_grad_b=need_b
    )
    grads = dict.fromkeys(_GRAD_NAMES)
    grads["d"], grads["b"] = grad_d, grad_b
    if need_x and split:
        grads["x"] = kernels.add_lowrank_(g @ weight, gh, A.T)
    elif need_x:
        # grad_x = g W + gh A: the forward GEMM kernel on transposed views, one launch.
        grads["x"] = kernels.fused_gemm(g, weight.T, None, gh, A.T)
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
    path: str,
) -> tuple[Tensor, Tensor]:
    """Returns ``y`` (N, m) and ``x A^T`` (N, r) in the accumulation dtype, which backward needs.

    ``path`` is ``"torch"``, ``"fused"`` or ``"split"`` (:func:`pefttriton.backend.resolve_path`),
    or ``""`` to resolve it now (under ``torch.compile``).
    """
    path = path or resolve_path(x.device, x.dtype)
    with no_autocast(x):
        if path == "torch":
            return _torch_forward(x, weight, bias, A, B, d, b, scale)
        return _triton_forward(x, weight, bias, A, B, d, b, scale, split=path == "split")


@_lowrank_linear_fwd.register_fake
def _(x, weight, bias, A, B, d, b, scale, path):
    xa = x.new_empty((x.shape[0], A.shape[0]), dtype=acc_dtype(x.dtype))
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
    path: str,
) -> list[Tensor]:
    """Gradients for (x, weight, bias, A, B, d, b); an empty tensor where ``needs`` is False."""
    path = path or resolve_path(grad_y.device, grad_y.dtype)
    with no_autocast(grad_y):
        if path == "torch":
            grads = _torch_backward(grad_y, x, xa, weight, A, B, d, b, scale, needs)
        else:
            grads = _triton_backward(grad_y, x, xa, weight, A, B, d, b, scale, needs, split=path == "split")
    inputs = (x, weight, bias, A, B, d, b)
    return [
        grads[name].to(inp.dtype) if need else grad_y.new_empty(0)
        for name, inp, need in zip(_GRAD_NAMES, inputs, needs)
    ]


@_lowrank_linear_bwd.register_fake
def _(grad_y, x, xa, weight, bias, A, B, d, b, scale, needs, path):
    grads = [grad_y.new_empty((grad_y.shape[0], weight.shape[1]))]
    # An absent (None) input never needs a gradient, so its slot is always the empty tensor.
    grads += [t.new_empty(t.shape) if t is not None else None for t in (weight, bias, A, B, d, b)]
    return [grad if need else grad_y.new_empty(0) for grad, need in zip(grads, needs)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, A, B, d, b, scale, path = inputs
    needs = list(ctx.needs_input_grad[:7])
    # x is kept only for weight gradients of A (LoRA) or W; VeRA's backward needs x A^T alone.
    keep_x = needs[1] or needs[3]
    ctx.save_for_backward(x if keep_x else None, output[1], weight, bias, A, B, d, b)
    ctx.scale, ctx.needs, ctx.path = scale, needs, path


def _backward(ctx, grad_y, grad_xa):
    x, xa, weight, bias, A, B, d, b = ctx.saved_tensors
    if x is None:
        x = grad_y.new_empty(0)
    grads = _lowrank_linear_bwd(grad_y, x, xa, weight, bias, A, B, d, b, ctx.scale, ctx.needs, ctx.path)
    return (*[g if need else None for g, need in zip(grads, ctx.needs)], None, None)


_lowrank_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ public API


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

    Every tensor may have any strides. Under ``torch.autocast`` the op behaves like ``F.linear``:
    ``x``, ``weight``, ``bias``, ``A`` and ``B`` are cast to the autocast dtype (float64 ones are
    left alone), ``d`` and ``b`` to float32, and the result has the autocast dtype.

    Accumulation is in float32 (float64 for float64 inputs). In 16 bits the low-rank path rounds
    ``h = d * (x A^T)`` and ``B`` before their product, with ``scale`` split between them
    (:func:`split_scale`), so it overflows only where PEFT's order of operations would.

    Returns:
        (..., m) tensor of ``x.dtype``. Differentiable in every tensor argument; backward saves
        ``x A^T`` (N, r) and, only when ``A`` or ``weight`` needs a gradient, ``x``.
    """
    if isinstance(x, Tensor):
        dtype = autocast_dtype(x)
        if dtype is not None:
            x, weight, bias, A, B = (autocast_cast(t, dtype) for t in (x, weight, bias, A, B))
            d, b = autocast_cast(d, torch.float32), autocast_cast(b, torch.float32)
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
    check_tensor("weight", weight, (m, n), x, same)
    check_tensor("A", A, (r, n), x, same)
    check_tensor("B", B, (m, r), x, same)
    if bias is not None:
        check_tensor("bias", bias, (m,), x, same)
    if d is not None:
        check_tensor("d", d, (r,), x, with_fp32)
    if b is not None:
        check_tensor("b", b, (m,), x, with_fp32)
    scale = check_scale(scale)
    # Eager calls fix the path here, so that backward runs the same one (see pefttriton.backend).
    path = "" if torch.compiler.is_compiling() else resolve_path(x.device, x.dtype)
    y, _ = _lowrank_linear_fwd(flatten_tokens(x, n), weight, bias, A, B, d, b, scale, path)
    return y.reshape(*x.shape[:-1], m)
