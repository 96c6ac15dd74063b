"""``lowrank_linear``: the one fused op every adapter of pefttriton is built on.

    y = x W^T + bias + scale * b * ((d * (x A^T)) B^T)

Four strategies compute it (:mod:`pefttriton.ops.backend` says which runs, :mod:`pefttriton.ops.strategy`
how ``auto`` picks): ``fused`` and ``split`` launch the Triton kernels of
``pefttriton.kernels.lowrank_linear``; ``lean`` and ``weight`` are plain PyTorch (BLAS) code. All
save for backward only ``x A^T`` (tokens x rank, in the accumulation dtype) and, when a gradient
needs it, ``x``; never a (tokens, out) tensor. In 16 bits each adds base and adapter before
rounding ``y`` once. The op is registered with ``torch.library.custom_op`` (forward and backward
ops, a fake implementation for tracing, autograd), so ``torch.compile`` sees it as one node.
"""

import math
import statistics
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from pefttriton.ops import strategy as chooser
from pefttriton.ops.backend import record_path, resolve_path, use_strategy, uses_triton
from pefttriton.kernels import lowrank_linear as kernels
from pefttriton.kernels.launch import acc_dtype
from pefttriton.ops.validation import (
    autocast_cast,
    autocast_dtype,
    check_adapter,
    check_dropout,
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
    return (_as(B, acc_dtype(B.dtype)) * scale_B).to(B.dtype)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, skipping the call where ``t`` already has it (a dispatch costs about a
    microsecond, and a small layer's call makes a dozen)."""
    return t if t.dtype == dtype else t.to(dtype)


def _rank_scale(d, scale, like):
    """``scale * d`` (r,) in the dtype of ``like``, or the number ``scale`` when there is no ``d``."""
    return scale if d is None else _as(d, like.dtype) * scale


# --------------------------------------------------------------------------- shared pieces

# Elements of the float32 chunk :func:`mm_acc` upcasts at a time on devices without a GEMM that
# writes float32 from 16-bit inputs (4 MiB).
_CHUNK_ELEMENTS = 1 << 20
_MM_OUT_DTYPE: dict[torch.device, bool] = {}


def _mm_out_dtype(device: torch.device) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for 16-bit tensors on ``device``
    (cuBLAS, torch >= 2.8), tried once per device on a tiny product."""
    if device.type != "cuda":
        return False
    if device not in _MM_OUT_DTYPE:
        try:
            one = torch.ones((16, 16), device=device, dtype=torch.bfloat16)
            _MM_OUT_DTYPE[device] = torch.mm(one, one, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError):
            _MM_OUT_DTYPE[device] = False
    return _MM_OUT_DTYPE[device]


def mm_acc(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` accumulated and returned in the accumulation dtype of ``a`` without an upcast copy
    of a whole operand: a 16-bit GEMM with a float32 output where cuBLAS offers one (``b`` is then
    rounded to ``a``'s dtype), else the reduction dimension in chunks of about
    :data:`_CHUNK_ELEMENTS` upcast elements. ``b`` may already be in the accumulation dtype."""
    acc = acc_dtype(a.dtype)
    if a.dtype == acc:
        return a @ _as(b, acc)
    if _mm_out_dtype(a.device):
        return torch.mm(a, _as(b, a.dtype), out_dtype=acc)
    K = a.shape[1]
    out = torch.zeros((a.shape[0], b.shape[1]), device=a.device, dtype=acc)
    step = max(1, _CHUNK_ELEMENTS // max(1, a.shape[0] + b.shape[1]))
    for k in range(0, K, step):
        out.addmm_(a[:, k : k + step].to(acc), b[k : k + step].to(acc))
    return out


def _base_gemm(x, weight, bias, out):
    """``out = x W^T + bias`` in one cuBLAS (or CPU BLAS) call."""
    if bias is not None:
        torch.addmm(bias, x, weight.T, out=out)
    else:
        torch.mm(x, weight.T, out=out)


def _up(B, b, acc):
    """``b * B`` (m, r) in the accumulation dtype: ``(b * g) B == g (b * B)``."""
    up = _as(B, acc)
    return up * _as(b, acc)[:, None] if b is not None else up


class _Drop:
    """Dropout of the adapter's input in one call: PEFT's ``y = x W^T + bias + s B A drop(x)``,
    the base GEMM reading ``x`` itself. The rank splits into segments (several adapters
    concatenated), each with its own probability and seed (``seeds``: int64, one per segment; on
    the device for the Triton kernels, on the CPU for the PyTorch paths). Only the products that
    read the adapter's input see the mask: ``x A^T`` forward, ``grad_A = gh^T drop(x)`` and the
    adapter's part of ``grad_x`` backward, each drawing it again from the seed."""

    def __init__(self, seeds: Tensor, probs: list[float], ranks: list[int]) -> None:
        self.seeds = seeds
        bounds = [0]
        for r in ranks:
            bounds.append(bounds[-1] + r)
        self.parts = [(lo, hi, p, i) for i, (lo, hi, p) in enumerate(zip(bounds, bounds[1:], probs))]
        self._host_seeds = None
        self._masks = {}
        self._packed = {}

    def kernel(self, i: int, cols: int) -> "kernels.Dropout | None":
        """The Triton kernels' dropout of segment ``i`` of an input with ``cols`` columns (None: p = 0)."""
        p = self.parts[i][2]
        return kernels.Dropout(self.seeds[i : i + 1], p, cols) if p > 0 else None

    def keep(self, i: int, shape, device, dtype) -> Tensor:
        """The PyTorch paths' mask of segment ``i`` (True: kept) for an input of ``dtype``."""
        return self.scaled_mask(i, shape, device, dtype) != 0

    def scaled_mask(self, i: int, shape, device, dtype) -> Tensor:
        """The PyTorch paths' mask of segment ``i`` as ``dtype`` numbers, ``1 / (1 - p)`` where kept
        and 0 where dropped (nn.Dropout's factor), drawn from its seed; drawn once per ``_Drop``
        (forward and backward each make their own) and then reused: backward reads it twice."""
        key = (i, tuple(shape), dtype)
        if key not in self._masks:
            scale = 1.0 / (1.0 - self.parts[i][2])
            if i in self._packed:  # kept as bits: one gather from the 256 bytes' scaled masks
                bits = self._packed[i]
                table = unpack_bits(torch.arange(256, dtype=torch.uint8, device=device)[:, None], 8).to(dtype)
                rows = table.mul_(scale).index_select(0, bits.view(-1).int())
                self._masks[key] = rows.view(bits.shape[0], -1)[:, : shape[-1]]
            else:
                if self._host_seeds is None:
                    self._host_seeds = self.seeds.tolist()
                generator = torch.Generator(device=device).manual_seed(self._host_seeds[i])
                mask = torch.empty(shape, device=device, dtype=dtype).bernoulli_(1.0 - self.parts[i][2], generator=generator)
                self._masks[key] = mask.mul_(scale)
        return self._masks[key]

    def packed(self) -> list[Tensor]:
        """The PyTorch paths' masks drawn so far, one per dropping segment, as bits (``pack_bits``):
        what a backward on the CPU keeps instead of drawing them again (the CPU's generator is slow:
        a draw costs about what a GEMM of the layer's size does; the bits cost 1/8 byte an element)."""
        drawn = {i: mask for (i, _, _), mask in self._masks.items()}
        return [pack_bits(drawn[i] != 0) for i in sorted(drawn)]

    def restore(self, packed: Sequence[Tensor]) -> None:
        """Takes the masks of :meth:`packed` (same segments, same order) instead of their seeds."""
        dropping = [i for _, _, p, i in self.parts if p > 0]
        self._packed = dict(zip(dropping, packed))

    def dropped(self, x: Tensor, i: int) -> Tensor:
        """``drop(x)`` for segment ``i`` in ``x``'s dtype (``x`` itself where p = 0), as nn.Dropout
        computes it: kept elements scaled by ``1 / (1 - p)``."""
        if self.parts[i][2] == 0:
            return x
        return x * self.scaled_mask(i, x.shape, x.device, x.dtype)


def pack_bits(keep: Tensor) -> Tensor:
    """A bool matrix (N, n) as bits, uint8 (N, ceil(n / 8)); element j of a row is bit j % 8 of byte j // 8."""
    N, n = keep.shape
    k = torch.nn.functional.pad(keep.to(torch.uint8), (0, -n % 8)).view(N, -1, 8)
    return (k << _BIT_SHIFTS.to(keep.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(bits: Tensor, n: int) -> Tensor:
    """:func:`pack_bits` undone: the bool matrix (N, n)."""
    return ((bits[..., None] >> _BIT_SHIFTS.to(bits.device)) & 1).view(bits.shape[0], -1)[:, :n].bool()


_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _make_drop(seeds: Tensor | None, probs: list[float], ranks: list[int]) -> _Drop | None:
    return _Drop(seeds, probs, ranks) if seeds is not None and any(p > 0 for p in probs) else None


def _down(x: Tensor, A: Tensor, drop: _Drop | None, triton: bool) -> Tensor:
    """``drop(x) A^T`` (N, r) in the accumulation dtype (Triton kernels or BLAS)."""
    acc = acc_dtype(x.dtype)
    if drop is None:
        return kernels.fused_gemm(x, A, out_dtype=acc) if triton else mm_acc(x, A.T)
    xa = torch.empty((x.shape[0], A.shape[0]), device=x.device, dtype=acc)
    for lo, hi, _, i in drop.parts:
        if triton:
            kernels.fused_gemm(x, A[lo:hi], out=xa[:, lo:hi], dropout=drop.kernel(i, x.shape[1]))
        else:
            xa[:, lo:hi] = mm_acc(drop.dropped(x, i), A[lo:hi].T)
    return xa


def _lowrank_grad_x(base: Tensor, gh: Tensor, A: Tensor, drop: _Drop | None, triton: bool) -> Tensor:
    """``base + drop^T(gh A)`` into ``base`` (N, n): the adapter's part of ``grad_x``, each
    segment's product masked and scaled as its ``drop(x)`` was."""
    if drop is None:
        return kernels.add_lowrank_(base, gh, A.T) if triton else base.addmm_(_as(gh, base.dtype), A)
    for lo, hi, p, i in drop.parts:
        if triton:
            kernels.add_lowrank_(base, gh[:, lo:hi], A[lo:hi].T, dropout=drop.kernel(i, base.shape[1]))
        elif p == 0:
            base.addmm_(_as(gh[:, lo:hi], base.dtype), A[lo:hi])
        else:
            base.addcmul_(_as(gh[:, lo:hi], base.dtype) @ A[lo:hi], drop.scaled_mask(i, base.shape, base.device, base.dtype))
    return base


def _grad_A(gh: Tensor, x: Tensor, drop: _Drop | None, triton: bool) -> Tensor:
    """``gh^T drop(x)`` (r, n) in the accumulation dtype of ``gh`` (``gh`` rounded to ``x``'s dtype
    first, as the other products of 16-bit inputs are)."""
    if drop is None:
        return mm_acc(_as(gh, x.dtype).T, x)
    out = torch.empty((gh.shape[1], x.shape[1]), device=x.device, dtype=gh.dtype)
    for lo, hi, p, i in drop.parts:
        if triton and p > 0:  # the kernel reads x's tiles through the mask: drop(x) is never written
            kernels.fused_gemm(gh[:, lo:hi].T, x.T, out=out[lo:hi], dropout=drop.kernel(i, x.shape[1]), dropout_on="w")
        else:
            out[lo:hi] = mm_acc(_as(gh[:, lo:hi], x.dtype).T, drop.dropped(x, i))
    return out


def _vector_and_factor_grads(grads, g, x, xa, A, B, d, b, scale, needs, gb=None):
    """Gradients of B, d and b from one product ``P = g^T (x A^T)`` (m, r):

        grad_b[i] = scale * sum_k d_k B_ik P_ik,   grad_d[k] = scale * sum_i b_i B_ik P_ik,
        grad_B    = scale * b[:, None] * P * d[None, :].

    ``gb = (b * g) B`` (N, r), when the caller has it (for grad_x), gives ``grad_d`` from the
    float32 ``x A^T`` directly.
    """
    _, _, _, _, need_B, need_d, need_b = needs
    acc = xa.dtype
    if gb is not None and need_d:
        grads["d"] = (xa * gb).sum(0) * scale
        need_d = False
    if not (need_B or need_d or need_b):
        return
    P = mm_acc(g.T, xa)
    dvec = _as(d, acc) if d is not None else None
    bvec = _as(b, acc) if b is not None else None
    if need_d or need_b:
        BP = _as(B, acc) * P
        if need_b:
            grads["b"] = (BP @ dvec if dvec is not None else BP.sum(1)) * scale
        if need_d:
            grads["d"] = (bvec @ BP if bvec is not None else BP.sum(0)) * scale
    if need_B:
        grad_B = P * scale
        if dvec is not None:
            grad_B = grad_B * dvec
        grads["B"] = grad_B * bvec[:, None] if bvec is not None else grad_B


# ------------------------------------------------------------------- lean and weight (PyTorch)


def _lean_forward(x, weight, bias, A, B, d, b, scale, out, drop=None):
    """Writes ``y`` into ``out`` (N, m); returns ``drop(x) A^T`` (N, r) in the accumulation dtype.

    In float32 / float64 the scalings fold into ``B_eff = scale * (b * B) * d`` (m, r) and ``y``
    takes two BLAS calls. In 16 bits one GEMM over the concatenated K ``[x | h] [W | b * B]^T``
    adds base and adapter in the GEMM's float32 accumulator and rounds once (adding the adapter to
    a base output already rounded to 16 bits would lose or distort a small adapter's effect);
    ``scale`` is split between ``h`` and ``B`` (:func:`split_scale`) against overflow.
    """
    dtype = x.dtype
    acc = acc_dtype(dtype)
    xa = _down(x, A, drop, triton=False)  # float32 for 16-bit x: backward's vector gradients sum over it
    if dtype == acc:
        B_eff = _up(B, b, acc) * scale
        if d is not None:
            B_eff = B_eff * _as(d, acc)
        _base_gemm(x, weight, bias, out)
        out.addmm_(xa, B_eff.T)
        return xa
    scale_h, scale_B = split_scale(scale)
    h = (xa * _rank_scale(d, scale_h, xa)).to(dtype)
    up = (_up(B, b, acc) * scale_B).to(dtype)
    _base_gemm(torch.cat([x, h], 1), torch.cat([weight, up], 1), bias, out)
    return xa


def _delta_weight(A, B, d, b, scale, weight):
    """``W + scale * (b * B)(d * A)`` (m, n), one BLAS call (float32 / float64)."""
    left = _up(B, b, weight.dtype) * scale
    right = A * _as(d, A.dtype)[:, None] if d is not None else A
    return torch.addmm(weight, left, right)


def _weight_forward(x, weight, bias, A, B, d, b, scale, out):
    """``y = x W_eff^T + bias`` with ``W_eff = W + scale * (b * B)(d * A)``; returns ``x A^T``."""
    _base_gemm(x, _delta_weight(A, B, d, b, scale, weight), bias, out)
    return x @ A.T


def _torch_backward(g, x, xa, weight, A, B, d, b, scale, needs, weight_side, drop=None):
    """Backward of the lean (``weight_side=False``) and weight strategies; they differ in grad_x
    only: ``g W + gh A`` against ``g W_eff`` (``W_eff`` formed again, nothing (m, n) is saved).
    With dropout (lean only) ``gh A`` is masked and ``grad_A`` reads ``drop(x)``."""
    need_x, need_weight, need_bias, need_A, need_B, need_d, need_b = needs
    dtype, acc = g.dtype, xa.dtype
    grads = dict.fromkeys(_GRAD_NAMES)
    gb = gh = None
    if need_A or (need_x and not weight_side):
        gb = mm_acc(g, _as(_up(B, b, acc), dtype))  # (b * g) B, (N, r), not rounded to 16 bits
        gh = gb * _rank_scale(d, scale, xa)
    _vector_and_factor_grads(grads, g, x, xa, A, B, d, b, scale, needs, gb)
    if need_x and weight_side:
        grads["x"] = g @ _delta_weight(A, B, d, b, scale, weight)
    elif need_x and drop is None:
        grads["x"] = torch.addmm(g @ weight, _as(gh, dtype), A)
    elif need_x:
        grads["x"] = _lowrank_grad_x(g @ weight, gh, A, drop, triton=False)
    if need_A:
        grads["A"] = _grad_A(gh, x, drop, triton=False)
    if need_weight:
        grads["weight"] = g.T @ x
    if need_bias:
        grads["bias"] = g.sum(0)
    return grads


# ------------------------------------------------------------------------- fused and split (Triton)


def _triton_forward(x, weight, bias, A, B, d, b, scale, out, split, drop=None):
    """Writes ``y`` into ``out`` (N, m); returns ``x A^T`` (N, r) in the accumulation dtype.

    ``split``: cuBLAS computes the base GEMM (in float32 for 16-bit inputs, so that the Triton
    kernel adding the low-rank path rounds once), a Triton kernel adds the rest.
    """
    scale_h, scale_B = split_scale(scale)
    B_s = _scaled_B(B, scale_B)
    acc = acc_dtype(x.dtype)
    xa = _down(x, A, drop, triton=True)
    if not split:
        tma = chooser.gemm_kernel(x.device, x.dtype) == "tma"
        kernels.fused_gemm(x, weight, bias, xa, B_s, d, b, scale_h, out=out, tma=tma)
    elif x.dtype == acc:
        _base_gemm(x, weight, bias, out)
        kernels.add_lowrank_(out, xa, B_s, d, b, scale_h)
    else:
        kernels.add_lowrank_(out, xa, B_s, d, b, scale_h, base=mm_acc(x, weight.T), bias=bias)
    return xa


def _triton_backward(g, x, xa, weight, A, B, d, b, scale, needs, split, drop=None):
    """Backward of the fused and split strategies: :func:`triton_lowrank_backward`, then
    ``grad_x = g W + gh A`` (with dropout, the adapter's part masked) and the base layer's gradients."""
    need_x, need_weight, need_bias = needs[:3]
    g = g.contiguous()
    grads, gh = triton_lowrank_backward(g, x, xa, weight.shape, A, B, d, b, scale, needs, drop)
    tma = chooser.gemm_kernel(g.device, g.dtype) == "tma"
    if need_x and (split or drop is not None):
        # split: cuBLAS's base GEMM; dropout: the mask applies to gh A alone, so a base GEMM first
        base = g @ weight if split else kernels.fused_gemm(g, weight.T, tma=tma)
        grads["x"] = _lowrank_grad_x(base, gh, A, drop, triton=True)
    elif need_x:
        # grad_x = g W + gh A: the forward GEMM kernel on transposed views, one launch.
        grads["x"] = kernels.fused_gemm(g, weight.T, None, gh, A.T, tma=tma)
    if need_weight:
        grads["weight"] = g.T @ x
    if need_bias:
        grads["bias"] = g.sum(0)
    return grads


def triton_lowrank_backward(g, x, xa, shape, A, B, d, b, scale, needs, drop=None):
    """The low-rank half of the Triton paths' backward (``g`` (N, m) contiguous, ``shape`` = W's
    (m, n)): returns the gradients of A, B, d and b (a dict by name) and ``gh`` (N, r), the gradient
    of ``x A^T`` that ``grad_x = g W + gh A`` needs (None when nothing needs it). ``gh``, ``grad_d``,
    ``grad_b`` come from the Triton kernel that reads ``g`` once, or from the BLAS products the
    lean strategy uses where the cost model says the kernel loses (it is latency-bound at small
    ranks and token counts: :func:`pefttriton.ops.strategy.lowrank_backward`)."""
    need_x, _, _, need_A, need_B, need_d, need_b = needs
    trains = "all" if (need_A or need_B) and (need_d or need_b) else "factors" if need_A or need_B else "vectors"
    way = chooser.lowrank_backward(g.device, g.dtype, (g.shape[0], shape[1], shape[0], A.shape[0]), trains)
    grads = dict.fromkeys(_GRAD_NAMES)
    if way == "kernel":
        # The kernel's two 16-bit products, (b * g) B and h B^T for grad_b, see B scaled by scale_B
        # and h = d * (x A^T) by scale_h (split_scale): their results are the full-scale ones.
        scale_h, scale_B = split_scale(scale)
        gh, grads["d"], grads["b"] = kernels.lowrank_grads(
            g, xa, _scaled_B(B, scale_B), d, b, scale_h, need_grad_d=need_d, need_grad_b=need_b
        )
    else:
        gb = gh = None
        if need_x or need_A or need_d:
            gb = mm_acc(g, _as(_up(B, b, xa.dtype), g.dtype))  # (b * g) B, (N, r), as lean computes it
            gh = gb * _rank_scale(d, scale, xa)
        _vector_and_factor_grads(grads, g, x, xa, A, B, d, b, scale, (False,) * 4 + (need_B, need_d, need_b), gb)
    if need_B and way == "kernel":
        _vector_and_factor_grads(grads, g, x, xa, A, B, d, b, scale, (False,) * 4 + (True, False, False))
    if need_A:
        grads["A"] = _grad_A(gh, x, drop, triton=True)
    return grads, gh


def _compute_forward(path, x, weight, bias, A, B, d, b, scale, out, drop=None):
    if path == "lean":
        return _lean_forward(x, weight, bias, A, B, d, b, scale, out, drop)
    if path == "weight":
        if drop is not None:  # resolve_path never picks it with dropout
            raise ValueError("strategy 'weight' cannot apply dropout to the adapter's input")
        return _weight_forward(x, weight, bias, A, B, d, b, scale, out)
    return _triton_forward(x, weight, bias, A, B, d, b, scale, out, split=path == "split", drop=drop)


def _compute_backward(path, g, x, xa, weight, A, B, d, b, scale, needs, drop=None):
    if path in ("lean", "weight"):
        return _torch_backward(g, x, xa, weight, A, B, d, b, scale, needs, weight_side=path == "weight", drop=drop)
    return _triton_backward(g, x, xa, weight, A, B, d, b, scale, needs, split=path == "split", drop=drop)


# ------------------------------------------------------------------------------ custom ops


def _trains(x, weight, A, B, d, b) -> str:
    """What needs gradients in this call, as :func:`pefttriton.ops.strategy.estimate` names it."""
    if not torch.is_grad_enabled():
        return "none"
    factors = A.requires_grad or B.requires_grad
    vectors = any(t is not None and t.requires_grad for t in (d, b))
    if factors:
        return "all" if vectors else "factors"
    return "vectors" if vectors or x.requires_grad or weight.requires_grad else "none"


def time_path(path: str, device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int],
              trains: str, reps: int = 3) -> float:
    """Seconds of one call of :func:`lowrank_linear` on ``path`` (forward, and backward unless
    ``trains == "none"``) for inputs of ``shape`` = (tokens, in, out, rank): the median of ``reps``
    after one warm-up, on random inputs. The measured ``auto`` strategy times its candidates with it
    (:func:`pefttriton.ops.strategy.choose`)."""
    N, n, m, r = shape
    need_x = trains != "none"
    need_factors, need_vectors = trains in ("factors", "all"), trains in ("vectors", "all")
    gen = torch.Generator(device="cpu").manual_seed(0)

    def make(*size, grad=False):
        t = (torch.randn(size, generator=gen) / max(1, size[-1]) ** 0.5).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    x = make(N, n, grad=need_x)
    weight, bias = make(m, n), make(m)
    A, B = make(r, n, grad=need_factors), make(m, r, grad=need_factors)
    d, b = make(r, grad=need_vectors), make(m, grad=need_vectors)

    def once():
        with use_strategy(path), torch.set_grad_enabled(need_x):
            y = lowrank_linear(x, weight, bias, A, B, d, b, 0.5)
            if need_x:
                y.backward(torch.ones_like(y))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    once()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        once()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _run_path(path: str, t: Tensor, weight: Tensor, A: Tensor) -> str:
    """``path`` itself, or resolved now for a ``"?<trains>"`` placeholder (``"?<trains>+dropout"``
    with dropout): forward and backward resolve from the same shapes, ``trains`` and dropout, so
    they agree."""
    if not path.startswith("?"):
        return path
    trains, _, dropout = path[1:].partition("+")
    m, n = weight.shape
    shape = (math.prod(t.shape[:-1]), n, m, A.shape[0])
    return resolve_path(t.device, t.dtype, shape, trains, dropout=dropout == "dropout")


# The op's arguments after the tensors of the formula: scale, path, then dropout (seeds: int64 (S,),
# dropout: one probability per rank segment, ranks: the segments' ranks; see _Drop).


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
    seeds: Tensor | None,
    dropout: list[float],
    ranks: list[int],
) -> tuple[Tensor, Tensor]:
    """Returns ``y`` (..., m) and ``drop(x) A^T`` (N, r) in the accumulation dtype, which backward needs.

    ``x`` is (..., n); the tokens are flattened inside, so that ``y`` comes out as a tensor of its
    own, never a view (FSDP2 refuses views from a wrapped module: an in-place op on one would
    skip its hooks). ``path`` is one of :data:`pefttriton.ops.backend.PATHS`, or ``"?"`` followed by
    what trains (``"?vectors"``, ...) to resolve it now (under ``torch.compile``).
    """
    path = _run_path(path, x, weight, A)
    return _forward(x, weight, bias, A, B, d, b, scale, path, _make_drop(seeds, dropout, ranks))


def _forward(x, weight, bias, A, B, d, b, scale, path, drop):
    """What both registrations of the op run forward: ``(y, drop(x) A^T)``."""
    m, n = weight.shape
    x2 = flatten_tokens(x, n)
    y = torch.empty((*x.shape[:-1], m), device=x.device, dtype=x.dtype)
    out = y.view(x2.shape[0], m)
    with no_autocast(x):
        xa = _compute_forward(path, x2, weight, bias, A, B, d, b, scale, out, drop)
    return y, xa


@_lowrank_linear_fwd.register_fake
def _(x, weight, bias, A, B, d, b, scale, path, seeds, dropout, ranks):
    xa = x.new_empty((math.prod(x.shape[:-1]), A.shape[0]), dtype=acc_dtype(x.dtype))
    return x.new_empty((*x.shape[:-1], weight.shape[0])), xa


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
    seeds: Tensor | None,
    dropout: list[float],
    ranks: list[int],
) -> list[Tensor]:
    """Gradients for (x, weight, bias, A, B, d, b); an empty tensor where ``needs`` is False.

    ``grad_y`` is (..., m) like the forward's ``y``; ``x`` (..., n) or empty when not saved.
    """
    path = _run_path(path, grad_y, weight, A)
    grads = _backward_grads(grad_y, x, xa, weight, bias, A, B, d, b, scale, needs, path, _make_drop(seeds, dropout, ranks))
    return [grad_y.new_empty(0) if g is None else g for g in grads]


def _backward_grads(grad_y, x, xa, weight, bias, A, B, d, b, scale, needs, path, drop):
    """What both registrations of the op run backward: the gradients of (x, weight, bias, A, B, d,
    b), None where ``needs`` is False."""
    m, n = weight.shape
    g = grad_y.reshape(-1, m) if m > 0 else grad_y.reshape(math.prod(grad_y.shape[:-1]), 0)
    x2 = flatten_tokens(x, n) if needs[1] or needs[3] else x  # saved only for grad_weight, grad_A
    with no_autocast(grad_y):
        grads = _compute_backward(path, g, x2, xa, weight, A, B, d, b, scale, needs, drop)
    if needs[0]:
        grads["x"] = grads["x"].reshape(*grad_y.shape[:-1], n)
    inputs = (x, weight, bias, A, B, d, b)
    return [_as(grads[name], inp.dtype) if need else None for name, inp, need in zip(_GRAD_NAMES, inputs, needs)]


@_lowrank_linear_bwd.register_fake
def _(grad_y, x, xa, weight, bias, A, B, d, b, scale, needs, path, seeds, dropout, ranks):
    grads = [grad_y.new_empty((*grad_y.shape[:-1], weight.shape[1]))]
    # An absent (None) input never needs a gradient, so its slot is always the empty tensor.
    grads += [t.new_empty(t.shape) if t is not None else None for t in (weight, bias, A, B, d, b)]
    return [grad if need else grad_y.new_empty(0) for grad, need in zip(grads, needs)]


def _setup_context(ctx, inputs, output, packed=()):
    x, weight, bias, A, B, d, b, scale, path, seeds, dropout, ranks = inputs
    needs = list(ctx.needs_input_grad[:7])
    # x is kept only for weight gradients of A (LoRA) or W; VeRA's backward needs x A^T alone (and,
    # with dropout, the seeds that draw the mask again).
    keep_x = needs[1] or needs[3]
    ctx.save_for_backward(x if keep_x else None, output[1], weight, bias, A, B, d, b, seeds, *packed)
    ctx.scale, ctx.needs, ctx.path, ctx.dropout, ctx.ranks = scale, needs, path, dropout, ranks


def _saved(ctx, grad_y):
    x, xa, weight, bias, A, B, d, b, seeds, *packed = ctx.saved_tensors
    return (grad_y.new_empty(0) if x is None else x), xa, weight, bias, A, B, d, b, seeds, packed


def _backward(ctx, grad_y, grad_xa):
    x, xa, weight, bias, A, B, d, b, seeds, _ = _saved(ctx, grad_y)
    grads = _lowrank_linear_bwd(grad_y, x, xa, weight, bias, A, B, d, b, ctx.scale, ctx.needs, ctx.path,
                                seeds, ctx.dropout, ctx.ranks)
    return (*[g if need else None for g, need in zip(grads, ctx.needs)], *([None] * 5))


_lowrank_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerLowRankLinear(torch.autograd.Function):
    """The op for eager calls: the same forward and backward as the custom ops above (and the same
    saved tensors, plus on the CPU the dropout masks as bits), without the custom-op dispatch around
    each (tens of microseconds per call, which dominate small layers). ``torch.compile`` traces the
    custom ops instead (one graph node)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, d, b, scale, path, seeds, dropout, ranks):
        drop = _make_drop(seeds, dropout, ranks)
        y, xa = _forward(x, weight, bias, A, B, d, b, scale, path, drop)
        # The PyTorch paths' masks on the CPU travel to backward as bits (_Drop.packed), saved with
        # the rest; the Triton kernels and other devices draw them again from the seeds.
        reads_mask = ctx.needs_input_grad[0] or ctx.needs_input_grad[3]  # grad_x, grad_A
        packed = drop.packed() if drop is not None and reads_mask and x.device.type == "cpu" else ()
        _setup_context(ctx, (x, weight, bias, A, B, d, b, scale, path, seeds, dropout, ranks), (y, xa), packed)
        ctx.overrides = chooser.kernel_overrides()  # the backward may run in another thread
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, xa, weight, bias, A, B, d, b, seeds, packed = _saved(ctx, grad_y)
        drop = _make_drop(seeds, ctx.dropout, ctx.ranks)
        if packed:
            drop.restore(packed)
        with chooser.kernel_overrides_set(ctx.overrides):
            grads = _backward_grads(grad_y, x, xa, weight, bias, A, B, d, b, ctx.scale, ctx.needs, ctx.path, drop)
        return (*grads, *([None] * 5))


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
    *,
    dropout: float | Sequence[float] = 0.0,
    rank_segments: Sequence[int] | None = None,
) -> Tensor:
    """Fused ``y = x W^T + bias + scale * b * ((d * (drop(x) A^T)) B^T)``.

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
        dropout: probability in [0, 1) that an element of ``x`` is dropped from the low-rank path's
            input (PEFT's ``lora_dropout`` / ``vera_dropout``; the base GEMM reads ``x`` itself); the
            kept elements are scaled by ``1 / (1 - p)``. A sequence gives one probability per rank
            segment. Pass 0 outside training, as ``nn.Dropout`` does in eval mode.
        rank_segments: ranks of consecutive segments of ``A``'s rows (and ``B``'s, ``d``'s columns),
            summing to r: several adapters concatenated, each with its own dropout mask. Default:
            one segment.

    Dropout keeps no dropped copy of ``x``: each call draws one seed per segment from the generator
    of ``x``'s device (the Triton paths; the CPU generator for the PyTorch paths), so
    ``torch.manual_seed`` reproduces a run and activation checkpointing's recompute (which restores
    the RNG state) draws the same mask; forward and backward draw the mask again from the seed
    wherever they read the adapter's input, except eager calls on the CPU, which keep the PyTorch
    paths' mask as bits (1/8 byte an element; the CPU's generator is slow). The ``weight`` strategy cannot drop (it folds the adapter into ``W``).

    Every tensor may have any strides. Under ``torch.autocast`` the op behaves like ``F.linear``:
    ``x``, ``weight``, ``bias``, ``A`` and ``B`` are cast to the autocast dtype (float64 ones are
    left alone), ``d`` and ``b`` to float32, and the result has the autocast dtype.

    Accumulation is in float32 (float64 for float64 inputs). In 16 bits the low-rank path rounds
    ``h = d * (x A^T)`` and ``B`` before their product, with ``scale`` split between them
    (:func:`split_scale`), so it overflows only where PEFT's order of operations would.

    Returns:
        (..., m) tensor of ``x.dtype``. Differentiable in every tensor argument; backward saves
        ``drop(x) A^T`` (N, r) and, only when ``A`` or ``weight`` needs a gradient, ``x`` (and the
        seeds of the dropout masks).
    """
    if isinstance(x, Tensor):
        dtype = autocast_dtype(x)
        if dtype is not None:
            x, weight, bias, A, B = (autocast_cast(t, dtype) for t in (x, weight, bias, A, B))
            d, b = autocast_cast(d, torch.float32), autocast_cast(b, torch.float32)
    m, n = check_x_and_weight(x, weight)
    check_tensor("weight", weight, (m, n), x, (x.dtype,))
    r = check_adapter(x, m, n, A, B, bias, d, b)
    scale = check_scale(scale)
    probs, ranks = check_dropout(dropout, rank_segments, r)
    dropping = any(p > 0 for p in probs)
    # Eager calls fix the path here, so that backward runs the same one (see pefttriton.ops.backend).
    trains = _trains(x, weight, A, B, d, b)
    if torch.compiler.is_compiling():
        seeds = _draw_seeds(len(probs), x.device) if dropping else None
        placeholder = "?" + trains + ("+dropout" if dropping else "")
        y, _ = _lowrank_linear_fwd(x, weight, bias, A, B, d, b, scale, placeholder, seeds, probs, ranks)
        return y
    shape = (math.prod(x.shape[:-1]), n, m, r)
    path = record_path(resolve_path(x.device, x.dtype, shape, trains, time_path, dropout=dropping))
    seeds = _draw_seeds(len(probs), x.device if uses_triton(path) else torch.device("cpu")) if dropping else None
    return _EagerLowRankLinear.apply(x, weight, bias, A, B, d, b, scale, path, seeds, probs, ranks)


def dropout_masks(path: str, seeds: Tensor, dropout: Sequence[float], rank_segments: Sequence[int],
                  rows: int, cols: int, dtype: torch.dtype = torch.float32) -> list[Tensor | None]:
    """The keep masks (rows, cols), True where kept, that a call on ``path`` with an input of
    ``dtype`` draws for its rank segments from ``seeds`` (None for a segment with p = 0). The op
    never stores them; tests and debugging rebuild them here, with the seeds a call drew."""
    drop = _Drop(seeds, list(dropout), list(rank_segments))
    masks = []
    for _, _, p, i in drop.parts:
        if p == 0:
            masks.append(None)
        elif uses_triton(path):
            masks.append(kernels.dropout_keep(drop.kernel(i, cols), rows))
        else:
            masks.append(drop.keep(i, (rows, cols), seeds.device, dtype))
    return masks


def _draw_seeds(count: int, device: torch.device) -> Tensor:
    """One dropout seed per rank segment, from the default generator of ``device``: on the GPU
    without a host sync (the kernels read it), and under a CUDA graph from the graph-safe generator."""
    return torch.randint(0, 2**62, (count,), device=device, dtype=torch.int64)
