"""How the ``auto`` strategy picks a path: a cost model, or (opt in) a measurement cached per shape.

Every path of :data:`pefttriton.ops.backend.PATHS` does the same math; they differ in how many flops
they spend, how many bytes they move and how fast the GEMMs that do the flops run:

* ``fused`` / ``split``: Triton GEMMs for the concatenated K loop (``split``: cuBLAS for the base
  GEMM), the low-rank backward in one Triton kernel that reads the output gradient once.
* ``lean``: every product in BLAS; the output gradient is read by each product that needs it.
* ``weight``: ``W_eff = W + scale * (b * B)(d * A)`` (``2 m r n`` flops, independent of the token
  count) replaces the low-rank forward product and the low-rank part of ``grad_x``; it wins once
  the token count passes about the layer width. Float32 / float64 only.

:func:`estimate` returns the modelled seconds of one call (forward, plus backward when anything
trains) of each path; :func:`choose` takes the cheapest allowed one. With
:func:`set_strategy_autotune` on (like ``torch.backends.cudnn.benchmark``) it instead times the
allowed paths once per (device, dtype, token bucket, features, rank, what trains) on random
inputs of that shape and keeps the fastest; :func:`strategy_cache` shows what it chose.

Device figures. CPU: one BLAS efficiency for every path and the bandwidth of a small machine;
the CPU choices the benchmark relies on (``python -m bench``) are checked by a test. CUDA: the
figures below are a static reading of the compiled sm_90 code and spec sheets (``design.md``
section 6), not a measurement: Triton GEMMs without TMA or a persistent schedule at 0.72 of
cuBLAS, the low-rank backward kernel latency-bound. Replace them with measured ones when a GPU
run (``python -m bench.gpu_check``) exists; until then prefer the measured autotune on a GPU.
"""

from __future__ import annotations

import contextvars
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pefttriton.kernels import launch

# Seconds of one call of a path: timer(path, device, dtype, shape, trains), given by the op being chosen for.
Timer = Callable[[str, torch.device, torch.dtype, tuple, str], float]

# What needs a gradient in a call: the input, the low-rank factors A / B, the vectors d / b.
TRAINS = ("none", "vectors", "factors", "all")


@dataclass(frozen=True)
class DeviceModel:
    """Throughputs of one device class, for the cost model."""

    flops: dict  # dtype -> GEMM flop/s of the vendor BLAS
    bandwidth: float  # bytes/s of elementwise work and of GEMM operand traffic
    launch: float  # seconds of fixed cost per kernel launch or BLAS call
    triton_gemm: float  # Triton GEMM speed as a fraction of the vendor BLAS
    triton_lowrank_grad: float  # the low-rank backward kernel's speed as a fraction of the BLAS


# Not measured on a GPU yet (see the module docstring): H100 SXM spec-sheet dense throughputs.
CUDA = DeviceModel(
    flops={torch.float16: 990e12, torch.bfloat16: 990e12, torch.float32: 67e12, "tf32": 495e12, torch.float64: 67e12},
    bandwidth=3.35e12,
    launch=5e-6,
    triton_gemm=0.72,
    triton_lowrank_grad=0.3,
)
# A 2-core CPU (this project's CI machine), measured there with torch 2.13: about 65 GFLOP/s for a
# 4096 x 1024 x 1024 fp32 GEMM, and 2-8 GB/s through the products whose inner or outer dimension
# is a rank of 16 (bandwidth-bound). Only the ratio of the two matters for the choice.
CPU = DeviceModel(
    flops={torch.float16: 10e9, torch.bfloat16: 20e9, torch.float32: 65e9, torch.float64: 30e9},
    bandwidth=3e9,
    launch=20e-6,
    triton_gemm=1.0,
    triton_lowrank_grad=1.0,
)


def device_model(device: torch.device) -> DeviceModel:
    return CUDA if device.type == "cuda" else CPU


def _needs(trains: str) -> tuple[bool, bool, bool]:
    """(grad of x, grads of A and B, grads of d and b) for ``trains``."""
    if trains not in TRAINS:
        raise ValueError(f"trains must be one of {TRAINS}, got {trains!r}")
    training = trains != "none"
    return training, trains in ("factors", "all"), trains in ("vectors", "all")


def _gemms(path: str, shape: tuple[int, int, int, int], trains: str, sixteen_bit: bool) -> list[tuple]:
    """The matrix products of one call on ``path``: ``(M, N, K, where, extra)`` each, ``where`` one
    of ``"blas"``, ``"triton"``, ``"lowrank_grad"`` (the Triton low-rank backward kernel) and
    ``extra`` the elements it reads or writes beyond its operands and result (an accumulated
    output, a concatenated copy, ``W`` read by the ``W_eff`` update)."""
    T, n, m, r = shape
    need_x, need_factors, need_vectors = _needs(trains)
    need_p = need_factors or need_vectors  # P = g^T (x A^T): grads of B, d, b
    need_gh = need_x or need_factors  # gh = scale * d * ((b * g) B): grads of x, A
    triton = path in ("fused", "split")
    out = []
    # forward
    if path == "weight":
        out += [(m, n, r, "blas", m * n), (T, m, n, "blas", 0)]
        if need_p or need_factors:
            out.append((T, r, n, "blas", 0))  # x A^T, saved for backward
    else:
        out.append((T, r, n, "triton" if triton else "blas", 0))
        if path == "fused" or (path == "lean" and sixteen_bit):
            extra = 0 if path == "fused" else T * n + m * n  # lean: the concatenated copies of x and W
            out.append((T, m, n + r, "triton" if path == "fused" else "blas", extra))
        else:
            out += [(T, m, n, "blas", 0), (T, m, r, "triton" if triton else "blas", T * m)]  # y += ...
    if not (need_x or need_p):
        return out
    # backward
    if triton:
        out.append((T, r, m, "lowrank_grad", 0))  # gh, grad_d, grad_b: one pass over g
        if need_factors:
            out.append((m, r, T, "blas", 0))  # P for grad_B
    else:
        if need_gh and not (path == "weight" and not need_factors):
            out.append((T, r, m, "blas", 0))
        if need_p:
            out.append((m, r, T, "blas", 0))
    if need_x:
        if path == "weight":
            out += [(m, n, r, "blas", m * n), (T, n, m, "blas", 0)]
        elif path == "fused":
            out.append((T, n, m + r, "triton", 0))
        else:
            out += [(T, n, m, "blas", 0), (T, n, r, "triton" if path == "split" else "blas", T * n)]
    if need_factors:
        out.append((r, n, T, "blas", 0))  # grad_A = gh^T x
    return out


def estimate(path: str, device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int],
             trains: str = "vectors") -> float:
    """Modelled seconds of one call on ``path``: forward, and backward unless ``trains == "none"``.

    ``shape`` is (tokens, in_features, out_features, rank). ``trains="vectors"`` is VeRA (``x``
    and ``d``, ``b`` need gradients), ``"factors"`` LoRA (``x``, ``A``, ``B``), ``"all"`` both,
    ``"none"`` inference. Each product takes the longer of its flops at the GEMM rate and its bytes
    at the bandwidth (a roofline per product: the products with the rank as one dimension are
    bandwidth-bound), plus a fixed cost per launch.
    """
    model = device_model(device)
    size = torch.empty((), dtype=dtype).element_size()
    key = "tf32" if dtype == torch.float32 and device.type == "cuda" and launch.tf32_allowed() else dtype
    peak = model.flops.get(key, model.flops[torch.float32])
    efficiency = {"blas": 1.0, "triton": model.triton_gemm, "lowrank_grad": model.triton_lowrank_grad}
    total = 0.0
    for M, N, K, where, extra in _gemms(path, shape, trains, size < 4):
        flops = 2 * M * N * K / (peak * efficiency[where])
        moved = (M * K + K * N + M * N + extra) * size / model.bandwidth
        total += max(flops, moved) + model.launch
    return total


# ------------------------------------------------------------------------------- measurement

_autotune = False
_cache: dict[tuple, str] = {}
_lock = threading.Lock()


def set_strategy_autotune(enabled: bool) -> None:
    """Time the allowed paths once per shape bucket instead of trusting the cost model.

    Like ``torch.backends.cudnn.benchmark``: the first eager call of a new (device, dtype, token
    bucket, in, out, rank, what trains) runs each allowed path a few times on random inputs of that
    shape (forward and backward), and every later call of that bucket takes the fastest. The timing
    runs in a thread of its own, before the call's forward saves anything, so activation
    checkpointing (which compares what the forward and its recompute save) sees the same op in both
    passes. Calls inside ``torch.compile`` or while a CUDA graph is being captured never time: they
    take a cached choice or the cost model's (:func:`pefttriton.warmup` before capturing measures
    the shapes a graph will hold).
    """
    global _autotune
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _autotune = enabled


def strategy_autotune() -> bool:
    return _autotune


def strategy_cache() -> dict[tuple, str]:
    """A copy of the measured choices: key (device, dtype, token bucket, n, m, r, trains, allowed) -> path."""
    with _lock:
        return dict(_cache)


def clear_strategy_cache() -> None:
    """Forget the measured choices and the cost model's cached ones."""
    with _lock:
        _cache.clear()
    _cheapest.cache_clear()


def token_bucket(tokens: int) -> int:
    """The power of two at or above ``tokens`` (at least 16): measured choices are kept per bucket."""
    return max(16, 1 << max(0, int(tokens) - 1).bit_length())


def _can_time(device: torch.device) -> bool:
    """Whether a measurement may run now: not while compiling, and not while the current CUDA
    stream is capturing a graph (``torch.cuda.graph``, ``mode="reduce-overhead"``), where
    synchronising or allocating for a timing run fails the capture."""
    if torch.compiler.is_compiling():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _measure(timer: Timer, allowed: tuple[str, ...], device, dtype, shape, trains) -> dict[str, float]:
    """``{path: seconds}`` for each allowed path, timed in a thread of its own that runs in a copy
    of the caller's context (its backend choice): the caller's saved-tensor hooks (activation
    checkpointing), autocast and grad mode are thread-local and stay out of the timing runs, so a
    checkpointed forward saves exactly what its recompute saves."""
    context = contextvars.copy_context()
    times: dict[str, float] = {}
    failure: list[BaseException] = []

    def run() -> None:
        try:
            for path in allowed:
                times[path] = context.run(timer, path, device, dtype, shape, trains)
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            failure.append(exc)

    worker = threading.Thread(target=run, name="pefttriton-strategy-autotune")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return times


def choose(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int] | None,
           trains: str, allowed: tuple[str, ...], timer: Timer | None = None) -> str:
    """The path ``auto`` takes among ``allowed`` for a call of ``shape`` (None: unknown).

    ``timer(path, device, dtype, shape, trains)`` returns the seconds one call of ``path`` takes;
    the op being chosen for passes it, and it is used when :func:`set_strategy_autotune` is on and
    a measurement may run (:func:`_can_time`). Otherwise the cost model decides.
    """
    if len(allowed) == 1:
        return allowed[0]
    if device.type != "cuda" and set(allowed) == {"fused", "split"}:
        return "fused"  # Triton's interpreter: no device to model, the default kernel path
    if shape is None:
        return "fused" if "fused" in allowed else "lean"
    N, n, m, r = shape
    key = (device.type, device.index, dtype, token_bucket(N), n, m, r, trains, allowed)
    with _lock:
        if key in _cache:
            return _cache[key]
    if _autotune and timer is not None and N > 0 and _can_time(device):
        times = _measure(timer, allowed, device, dtype, shape, trains)
        best = min(times, key=times.get)
        with _lock:
            _cache[key] = best
        return best
    tf32 = device.type == "cuda" and launch.tf32_allowed()
    return _cheapest(device.type, dtype, tuple(shape), trains, allowed, tf32)


@functools.lru_cache(maxsize=4096)
def _cheapest(device_type: str, dtype: torch.dtype, shape: tuple, trains: str, allowed: tuple, tf32: bool) -> str:
    """The path of ``allowed`` the cost model rates cheapest: a pure function of its arguments
    (``tf32`` is the TF32 flag :func:`estimate` reads), so every call of a shape after the first
    reads it from this cache instead of modelling every path again."""
    device = torch.device(device_type)
    return min(allowed, key=lambda path: estimate(path, device, dtype, shape, trains))
