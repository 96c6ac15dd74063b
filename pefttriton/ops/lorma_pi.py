"""LoRMA-pi: ``y = x (M W0)^T + bias`` with the full-rank multiplier ``M = scale * shift(B A)``.

``shift(P)[i, j] = P[i, (j - i) mod m]``: row i of ``P`` rolled right by i, exactly the authors'
``torch.gather(P, 1, (j - i) % m)`` (Exploration-Lab/LoRMA, ``MultLoRALinear.shift``). ``M`` is
dense and generally full rank, so unlike LoRMA+ this does not reduce to the low-rank engine.

Two public ops, both ``torch.library.custom_op`` with autograd and fake implementations:

* :func:`shift_product` forms ``M`` (m, m) once per step, ``r * m^2`` FMAs: on the Triton backend
  straight from ``B`` and ``A`` by ``pefttriton.kernels.lorma_pi`` (no ``B A`` intermediate);
  its backward ``grad_B = scale * unshift(G) A^T``, ``grad_A = scale * B^T unshift(G)`` goes
  through the shift exactly.
* :func:`lorma_pi_linear` applies it with the engine's GEMM (``fused_gemm``, bias in the
  epilogue) in one of two orders, chosen per call from the multiply-add counts (:func:`pi_order`):

  - ``"tokens"``: ``z = x W0^T``, ``y = z M^T + bias``. Extra multiply-adds: ``N m^2`` forward,
    ``3 N m^2`` per training step. Saves ``z`` (N, m) only when A or B trains.
  - ``"weight"``: ``W' = M W0``, ``y = x W'^T + bias``. Extra: ``m^2 n`` forward,
    ``N m n + 2 m^2 n`` per training step. Saves ``W'`` (m, n) only when x needs a gradient, and
    ``x`` only when A or B trains.

  "Extra" is beyond the frozen base layer's ``N m n`` forward and ``N m n`` grad_x; both orders
  also pay ``r m^2`` to form ``M`` (again in the tokens backward, instead of saving it) and
  ``2 r m^2`` for grad_A, grad_B. Backward (g = dL/dy):
  tokens: ``grad_M = g^T z``, ``grad_x = (g M) W0``; weight: ``grad_M = (g^T x) W0^T``,
  ``grad_x = g W'``. Per step, ``M`` and ``grad_M`` (m, m) and, in the weight order, ``W'`` and
  ``g^T x`` (m, n) exist once each; no tensor has a token dimension other than x, y, z and grads.
  Forward only, the tokens order is cheaper exactly when ``N < n``; in training when
  ``3 N m < N n + 2 m n`` (up to the ``r m^2`` terms). Either way LoRMA-pi costs at least
  ``m^2 min(N, n)`` more than the base layer, which LoRA-style adapters (and LoRMA+) never do.

Precision: ``M`` is formed in fp32 (fp64 for fp64 factors) and rounded to the layer dtype for the
GEMMs, so a 16-bit layer sees ``M`` to 16-bit precision, as it would see a merged 16-bit weight.
``grad_M`` is accumulated in fp32.
"""


import math

import torch
from torch import Tensor

from pefttriton.ops.backend import resolve_path, uses_triton
from pefttriton.kernels import lorma_pi as kernels
from pefttriton.kernels.launch import acc_dtype
from pefttriton.kernels.lowrank_linear import fused_gemm
from pefttriton.ops.validation import (
    FLOAT_DTYPES,
    autocast_cast,
    autocast_dtype,
    check_scale,
    check_tensor,
    check_x_and_weight,
    flatten_tokens,
    no_autocast,
)

ORDERS = ("auto", "tokens", "weight")
_GRAD_NAMES = ("x", "weight", "bias", "A", "B")


# ------------------------------------------------------------------------------ cost model


def pi_extra_macs(tokens: int, out_features: int, in_features: int, r: int, order: str, training: bool) -> int:
    """Multiply-adds per step of LoRMA-pi beyond the frozen base layer, for one order.

    The base layer costs ``N m n`` forward and, in training, ``N m n`` for grad_x. Counted here:
    forming ``M`` (``r m^2``, twice for the tokens order in training, which recomputes it), the
    GEMMs of the order (module docstring), and grad_A, grad_B (``2 r m^2``) in training.
    """
    N, m, n = tokens, out_features, in_features
    if order == "tokens":
        return (3 * N * m * m + 4 * r * m * m) if training else (N * m * m + r * m * m)
    if order == "weight":
        return (N * m * n + 2 * m * m * n + 3 * r * m * m) if training else (m * m * n + r * m * m)
    raise ValueError(f"order must be 'tokens' or 'weight', got {order!r}")


def pi_order(tokens: int, out_features: int, in_features: int, training: bool, r: int = 1) -> str:
    """The cheaper order, ``"tokens"`` or ``"weight"``, by :func:`pi_extra_macs` (ties: tokens)."""
    costs = {o: pi_extra_macs(tokens, out_features, in_features, r, o, training) for o in ("tokens", "weight")}
    return "tokens" if costs["tokens"] <= costs["weight"] else "weight"


# ----------------------------------------------------------------------------- torch backend


def _skew_view(P: Tensor, forward: bool) -> Tensor:
    """``P[i, (j - i) mod m]`` (forward) or ``P[i, (i + d) mod m]`` as a strided view of ``[P | P]``.

    In the doubled (m, 2m) matrix, row i of the rolled matrix starts at column ``m - i`` (forward)
    or ``i``: consecutive rows are ``2m - 1`` or ``2m + 1`` elements apart. No index tensor.
    """
    m = P.shape[0]
    doubled = torch.cat([P, P], dim=1).contiguous()
    if forward:
        return doubled.as_strided((m, m), (2 * m - 1, 1), m)
    return doubled.as_strided((m, m), (2 * m + 1, 1), 0)


def _torch_shift_product(B: Tensor, A: Tensor, scale: float) -> Tensor:
    acc = acc_dtype(B.dtype)
    return _skew_view(B.to(acc) @ A.to(acc), forward=True) * scale


def _torch_shift_grads(G: Tensor, B: Tensor, A: Tensor, scale: float, need_B: bool, need_A: bool):
    acc = acc_dtype(B.dtype)
    Gs = _skew_view(G.to(acc), forward=False)
    grad_B = (Gs @ A.to(acc).T) * scale if need_B else None
    grad_A = (B.to(acc).T @ Gs) * scale if need_A else None
    return grad_B, grad_A


def _torch_gemm(a: Tensor, b_t: Tensor, bias: Tensor | None = None, out_dtype: torch.dtype | None = None,
                out: Tensor | None = None) -> Tensor:
    """``a @ b_t.T + bias`` (the contract of ``fused_gemm``: into ``out`` when given)."""
    dtype = b_t.dtype
    if out is not None:
        return torch.addmm(bias, a.to(dtype), b_t.T, out=out) if bias is not None else torch.mm(a.to(dtype), b_t.T, out=out)
    y = torch.addmm(bias, a.to(dtype), b_t.T) if bias is not None else a.to(dtype) @ b_t.T
    return y.to(out_dtype) if out_dtype is not None else y


def _triton_gemm(a: Tensor, b_t: Tensor, bias: Tensor | None = None, out_dtype: torch.dtype | None = None,
                 out: Tensor | None = None) -> Tensor:
    return fused_gemm(a, b_t, bias, out_dtype=out_dtype or b_t.dtype, out=out)


def _impl(path: str, t: Tensor):
    """(shift product, its gradients, GEMM) of ``path`` (resolved for ``t`` when empty): the Triton
    kernels for the Triton strategies (``fused``, ``split``), PyTorch for the others."""
    if uses_triton(path or resolve_path(t.device, t.dtype)):
        return kernels.shift_product, kernels.shift_product_grads, _triton_gemm
    return _torch_shift_product, _torch_shift_grads, _torch_gemm


def _eager_path(t: Tensor) -> str:
    # Eager calls fix the path here, so that backward runs the same one (see pefttriton.ops.backend).
    return "" if torch.compiler.is_compiling() else resolve_path(t.device, t.dtype)


# ------------------------------------------------------------------------- shift product op


@torch.library.custom_op("pefttriton::lorma_shift_product", mutates_args=())
def _shift_product_op(B: Tensor, A: Tensor, scale: float, path: str) -> Tensor:
    with no_autocast(B):
        return _impl(path, B)[0](B, A, scale)


@_shift_product_op.register_fake
def _(B, A, scale, path):
    return B.new_empty((B.shape[0], B.shape[0]), dtype=acc_dtype(B.dtype))


@torch.library.custom_op("pefttriton::lorma_shift_product_bwd", mutates_args=())
def _shift_product_bwd(G: Tensor, B: Tensor, A: Tensor, scale: float, needs: list[bool], path: str) -> list[Tensor]:
    need_B, need_A = needs
    with no_autocast(B):
        grad_B, grad_A = _impl(path, B)[1](G, B, A, scale, need_B, need_A)
    return [
        grad_B.to(B.dtype) if need_B else G.new_empty(0),
        grad_A.to(A.dtype) if need_A else G.new_empty(0),
    ]


@_shift_product_bwd.register_fake
def _(G, B, A, scale, needs, path):
    return [B.new_empty(B.shape) if needs[0] else G.new_empty(0), A.new_empty(A.shape) if needs[1] else G.new_empty(0)]


def _shift_setup(ctx, inputs, output):
    B, A, scale, path = inputs
    ctx.save_for_backward(B, A)
    ctx.scale, ctx.path = scale, path
    ctx.needs = list(ctx.needs_input_grad[:2])


def _shift_backward(ctx, G):
    B, A = ctx.saved_tensors
    grad_B, grad_A = _shift_product_bwd(G.contiguous(), B, A, ctx.scale, ctx.needs, ctx.path)
    return (grad_B if ctx.needs[0] else None, grad_A if ctx.needs[1] else None, None, None)


_shift_product_op.register_autograd(_shift_backward, setup_context=_shift_setup)


# --------------------------------------------------------------------------- pi linear op


@torch.library.custom_op("pefttriton::lorma_pi_linear_fwd", mutates_args=())
def _pi_linear_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float, order: str, path: str
) -> tuple[Tensor, Tensor]:
    """Returns ``y`` (..., m), a tensor of its own (never a view), and what backward may need:
    ``z = x W0^T`` (N, m) (tokens order) or ``W' = M W0`` (m, n) (weight order). ``x`` is (..., n)."""
    shift, _, gemm = _impl(path, x)
    m, n = weight.shape
    x2 = flatten_tokens(x, n)
    y = torch.empty((*x.shape[:-1], m), device=x.device, dtype=x.dtype)
    out = y.view(x2.shape[0], m)
    with no_autocast(x):
        M = shift(B, A, scale).to(x.dtype)
        if order == "tokens":
            saved = gemm(x2, weight)
            gemm(saved, M, bias, out=out)
        else:
            saved = gemm(M, weight.T)  # W' = M @ W0
            gemm(x2, saved, bias, out=out)
    return y, saved


@_pi_linear_fwd.register_fake
def _(x, weight, bias, A, B, scale, order, path):
    tokens = math.prod(x.shape[:-1])
    saved = x.new_empty((tokens, weight.shape[0]) if order == "tokens" else tuple(weight.shape))
    return x.new_empty((*x.shape[:-1], weight.shape[0])), saved


@torch.library.custom_op("pefttriton::lorma_pi_linear_bwd", mutates_args=())
def _pi_linear_bwd(
    g: Tensor,
    x: Tensor,
    saved: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    scale: float,
    order: str,
    needs: list[bool],
    path: str,
) -> list[Tensor]:
    """Gradients for (x, weight, bias, A, B); an empty tensor where ``needs`` is False.

    ``g`` is (..., m) like the forward's ``y``; ``x`` (..., n) or empty when not saved.
    """
    m, n = weight.shape
    lead = g.shape[:-1]
    g2 = g.reshape(math.prod(lead), m)
    need_x, need_weight, _, need_A, need_B = needs
    x2 = flatten_tokens(x, n) if need_weight or (order == "weight" and (need_A or need_B)) else x
    with no_autocast(g):
        grads = _pi_backward_impl(g2, x2, saved, weight, bias, A, B, scale, order, needs, _impl(path, g))
    if need_x:
        grads[0] = grads[0].reshape(*lead, n)
    return grads


def _pi_backward_impl(g, x, saved, weight, bias, A, B, scale, order, needs, impl) -> list[Tensor]:
    need_x, need_weight, need_bias, need_A, need_B = needs
    shift, shift_grads, gemm = impl
    acc = acc_dtype(B.dtype)
    grads = dict.fromkeys(_GRAD_NAMES)
    grad_M = None
    if order == "tokens":
        if need_A or need_B:
            grad_M = gemm(g.T, saved.T, out_dtype=acc)  # g^T z
        if need_x or need_weight:
            M = shift(B, A, scale).to(g.dtype)  # recomputed (r m^2) rather than saved (m^2)
            grad_z = gemm(g, M.T)  # g M
            if need_x:
                grads["x"] = gemm(grad_z, weight.T)  # (g M) W0
            if need_weight:
                grads["weight"] = gemm(grad_z.T, x.T)  # M^T g^T x
    else:
        if need_A or need_B or need_weight:
            grad_w_eff = gemm(g.T, x.T)  # g^T x (m, n), in the layer dtype like any weight gradient
            if need_A or need_B:
                grad_M = gemm(grad_w_eff, weight, out_dtype=acc)  # (g^T x) W0^T
            if need_weight:
                M = shift(B, A, scale).to(g.dtype)
                grads["weight"] = gemm(M.T, grad_w_eff.T)  # M^T (g^T x)
        if need_x:
            grads["x"] = gemm(g, saved.T)  # g W'
    if grad_M is not None:
        grads["B"], grads["A"] = shift_grads(grad_M, B, A, scale, need_B, need_A)
    if need_bias:
        grads["bias"] = g.sum(0)
    inputs = (x, weight, bias, A, B)
    return [
        grads[name].to(inp.dtype) if need else g.new_empty(0)
        for name, inp, need in zip(_GRAD_NAMES, inputs, needs)
    ]


@_pi_linear_bwd.register_fake
def _(g, x, saved, weight, bias, A, B, scale, order, needs, path):
    shapes = [(*g.shape[:-1], weight.shape[1]), weight.shape, (weight.shape[0],), A.shape, B.shape]
    likes = [g, weight, bias if bias is not None else weight, A, B]
    return [like.new_empty(shape) if need else g.new_empty(0) for shape, like, need in zip(shapes, likes, needs)]


def _pi_setup(ctx, inputs, output):
    x, weight, bias, A, B, scale, order, path = inputs
    needs = list(ctx.needs_input_grad[:5])
    need_x, need_weight, _, need_A, need_B = needs
    need_AB = need_A or need_B
    # Save little: x only for the weight order's grad_M or a weight gradient; z only for grad_M
    # (tokens); W' only for grad_x (weight).
    keep_x = need_weight or (order == "weight" and need_AB)
    keep_saved = need_AB if order == "tokens" else need_x
    ctx.save_for_backward(x if keep_x else None, output[1] if keep_saved else None, weight, bias, A, B)
    ctx.scale, ctx.order, ctx.needs, ctx.path = scale, order, needs, path


def _pi_backward(ctx, grad_y, grad_saved):
    x, saved, weight, bias, A, B = ctx.saved_tensors
    x = x if x is not None else grad_y.new_empty(0)
    saved = saved if saved is not None else grad_y.new_empty(0)
    grads = _pi_linear_bwd(grad_y.contiguous(), x, saved, weight, bias, A, B, ctx.scale, ctx.order, ctx.needs, ctx.path)
    return (*[g if need else None for g, need in zip(grads, ctx.needs)], None, None, None)


_pi_linear_fwd.register_autograd(_pi_backward, setup_context=_pi_setup)


# ------------------------------------------------------------------------------ public API


def _check_factors(B, A, like: Tensor, dtypes: tuple) -> tuple[int, int]:
    if not isinstance(B, Tensor):
        raise TypeError(f"B must be a torch.Tensor, got {type(B).__name__}")
    if B.dim() != 2 or B.shape[1] < 1:
        raise ValueError(f"B must be a 2-D (out_features, r) tensor with r >= 1, got shape {tuple(B.shape)}")
    m, r = B.shape
    check_tensor("B", B, (m, r), like, dtypes, "(out_features, r)")
    check_tensor("A", A, (r, m), like, (B.dtype,), "(r, out_features), matching B")
    return m, r


def shift_product(B: Tensor, A: Tensor, scale: float = 1.0) -> Tensor:
    """LoRMA-pi's multiplier ``M = scale * shift(B @ A)``, ``M[i, j] = scale * (B A)[i, (j - i) mod m]``.

    Args:
        B: (m, r) and A: (r, m), one float dtype.
        scale: LoRMA's ``alpha / r``.

    Returns:
        (m, m) in fp32 (fp64 for fp64 factors), differentiable in ``B`` and ``A``. On the Triton
        backend it is formed straight from the factors in one launch (no ``B A`` intermediate).
    """
    _check_factors(B, A, B, FLOAT_DTYPES)
    return _shift_product_op(B, A, check_scale(scale), _eager_path(B))


def lorma_pi_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    scale: float = 1.0,
    order: str = "auto",
) -> Tensor:
    """LoRMA-pi's layer: ``y = x (scale * shift(B A) @ weight)^T + bias``.

    Args:
        x: (..., n) input, float16 / bfloat16 / float32 / float64.
        weight: (m, n) frozen base weight ``W0``, same dtype as ``x``; bias: (m,) or None, same dtype.
        A: (r, m) and B: (m, r), the LoRMA factors; dtype of ``x`` or float32 (both the same).
        scale: ``alpha / r``.
        order: ``"tokens"`` (``(x W0^T) M^T``), ``"weight"`` (``x (M W0)^T``) or ``"auto"``: the one
            with fewer multiply-adds for this call (:func:`pi_order`; training when grad mode is on
            and an input requires grad).

    Returns:
        (..., m) tensor of ``x.dtype``, differentiable in every tensor argument.
    """
    if isinstance(x, Tensor):
        dtype = autocast_dtype(x)
        if dtype is not None:  # like F.linear; the factors may stay float32, as without autocast
            x, weight, bias = (autocast_cast(t, dtype) for t in (x, weight, bias))
            if isinstance(B, Tensor) and B.dtype != torch.float32:
                A, B = autocast_cast(A, dtype), autocast_cast(B, dtype)
    m, n = check_x_and_weight(x, weight)
    check_tensor("weight", weight, (m, n), x, (x.dtype,), "(out_features, in_features)")
    if bias is not None:
        check_tensor("bias", bias, (m,), x, (x.dtype,), "(out_features,)")
    if not isinstance(B, Tensor):
        raise TypeError(f"B must be a torch.Tensor, got {type(B).__name__}")
    if B.dim() != 2 or B.shape[0] != m or B.shape[1] < 1:
        raise ValueError(f"B must have shape ({m}, r) with r >= 1 (out_features of weight), got {tuple(B.shape)}")
    _check_factors(B, A, x, (x.dtype, torch.float32))
    scale = check_scale(scale)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")

    if order == "auto":
        training = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, A, B)
        )
        order = pi_order(math.prod(x.shape[:-1]), m, n, training, r=B.shape[1])
    y, _ = _pi_linear_fwd(x, weight, bias, A, B, scale, order, _eager_path(x))
    return y
