"""How the ``auto`` strategy picks a path: a cost model, or (opt in) a measurement cached per shape.

Every path of :data:`pefttriton.ops.backend.PATHS` does the same math; they differ in how many flops
they spend, how many bytes they move and how fast the GEMMs that do the flops run:

* ``fused`` / ``split``: Triton GEMMs for the concatenated K loop (``split``: cuBLAS for the base
  GEMM); the low-rank gradients in one Triton kernel that reads the output gradient once, or in
  BLAS where that kernel loses.
* ``lean``: every product in BLAS; the output gradient is read by each product that needs it.
* ``weight``: ``W_eff = W + scale * (b * B)(d * A)`` (``2 m r n`` flops, independent of the token
  count) replaces the low-rank forward product and the low-rank part of ``grad_x``; it wins once
  the token count passes about the layer width. Float32 / float64 only.

:func:`estimate` returns the modelled seconds of one call (forward, plus backward when anything
trains) of each path; :func:`choose` takes the cheapest allowed one. With
:func:`set_strategy_autotune` on (like ``torch.backends.cudnn.benchmark``) it instead times the
allowed paths once per (device, dtype, token bucket, features, rank, what trains) on random
inputs of that shape and keeps the fastest; :func:`strategy_cache` shows what it chose.

Device figures (:class:`DeviceModel`, :func:`device_model`). CPU: one BLAS efficiency for every
path and the bandwidth of a small machine, measured; the CPU choices the benchmark relies on
(``python -m bench``) are checked by a test. CUDA: one model per GPU part, told apart by the device's
name (:data:`MODELS`: H100, H200; another GPU gets the H100 figures scaled by its SM count). Until a
GPU run measures them (``python -m bench.gpu_check`` prints a fitted ``DeviceModel(...)``), the
CUDA figures are a static reading of the compiled sm_90 code and spec sheets (``measured=False``):
prefer the measured autotune on a GPU. The Triton paths' low-rank gradients come from the one-pass
kernel or from BLAS products, whichever the model rates cheaper (:func:`lowrank_backward`): the
kernel is latency-bound (:func:`grad_kernel_seconds`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from dataclasses import replace as dataclass_replace

import torch

from pefttriton.kernels import launch

# Seconds of one call of a path: timer(path, device, dtype, shape, trains), given by the op being chosen for.
Timer = Callable[[str, torch.device, torch.dtype, tuple, str], float]

# What needs a gradient in a call: the input, the low-rank factors A / B, the vectors d / b.
TRAINS = ("none", "vectors", "factors", "all")


@dataclass(frozen=True)
class DeviceModel:
    """Achieved throughputs of one device, for the cost model (:func:`estimate`).

    ``python -m bench.gpu_check`` measures every field on a GPU and prints a ``DeviceModel(...)``
    ready to paste into :data:`MODELS` (``measured=True``). Rates are achieved ones (a large GEMM
    through the vendor BLAS, a large copy), not spec-sheet peaks.
    """

    name: str  # what it models ("NVIDIA H100 80GB HBM3", "CPU, 2 cores")
    flops: dict  # "fp16", "bf16", "fp32" (IEEE), "tf32", "fp64" -> vendor-BLAS GEMM flop/s
    bandwidth: float  # bytes/s of a large device-to-device copy (elementwise work, GEMM operand traffic)
    launch: float  # seconds of fixed cost per kernel launch or BLAS call (host overhead included)
    triton_gemm: dict  # dot family "16-bit", "tf32", "fp32" -> the fused Triton GEMM's rate / the BLAS's
    sms: int  # programs of the low-rank backward kernel that run at once (one per SM)
    grad_step: float  # seconds one program of the low-rank backward kernel spends per 16-column step
    measured: bool = False  # fitted from a GPU run (python -m bench.gpu_check), not read off spec sheets
    # dot family -> the Hopper GEMM's (TMA, persistent tiles) rate / the BLAS's; empty until measured,
    # and the variant runs only where a measurement says it beats the pointer kernel
    tma_gemm: dict = field(default_factory=dict)


# Read off spec sheets and the compiled sm_90 code, not measured (no GPU run yet): dense throughputs
# of the SXM parts at about 80% (bf16 about 790 TFLOP/s achieved on an H200 is what the project's
# device notes quote), Triton GEMMs without TMA or a persistent schedule at 0.72 of cuBLAS, the
# low-rank backward kernel latency-bound (about 0.4 us per 16-column step of one program: 80-130 us
# predicted for LoRA r = 16 and 0.3-0.6 ms for VeRA r = 256 at 8192 tokens x 4096). The H200
# differs from the H100 only in memory (4.8 against 3.35 TB/s).
H100 = DeviceModel(
    name="NVIDIA H100 (spec sheet)",
    flops={"fp16": 790e12, "bf16": 790e12, "fp32": 51e12, "tf32": 395e12, "fp64": 51e12},
    bandwidth=2.8e12, launch=5e-6, triton_gemm={"16-bit": 0.72, "tf32": 0.72, "fp32": 0.9},
    sms=132, grad_step=0.4e-6,
)
H200 = DeviceModel(
    name="NVIDIA H200 (spec sheet)",
    flops=H100.flops, bandwidth=4.0e12, launch=5e-6, triton_gemm=H100.triton_gemm, sms=132, grad_step=0.4e-6,
)
# A 2-core CPU (this project's CI machine), measured there with torch 2.13: about 65 GFLOP/s for a
# 4096 x 1024 x 1024 fp32 GEMM, and 2-8 GB/s through the products whose inner or outer dimension
# is a rank of 16 (bandwidth-bound). Only the ratio of the two matters for the choice. The Triton
# figures model nothing real on the CPU (the interpreter is for tests, never chosen by ``auto``).
CPU = DeviceModel(
    name="CPU, 2 cores",
    flops={"fp16": 10e9, "bf16": 20e9, "fp32": 65e9, "tf32": 65e9, "fp64": 30e9},
    bandwidth=3e9, launch=20e-6, triton_gemm={"16-bit": 1.0, "tf32": 1.0, "fp32": 1.0}, sms=2, grad_step=1e-6,
    measured=True,
)
# GPU name (as torch.cuda.get_device_name gives it) -> its model; the first entry whose key the
# name contains wins, so measured models of a specific part go before the family's.
MODELS: dict[str, DeviceModel] = {"H200": H200, "H100": H100}
_DTYPE_KEYS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


@functools.lru_cache(maxsize=64)
def _cuda_model(name: str, sms: int) -> DeviceModel:
    for key, model in MODELS.items():
        if key in name:
            return model if model.sms == sms else dataclass_replace(model, sms=sms)
    # another GPU: the H100 figures scaled by its SM count, a rough guide until it is measured
    return dataclass_replace(H100, name=f"{name} (H100 figures scaled by SMs)",
                             flops={k: v * sms / H100.sms for k, v in H100.flops.items()}, sms=sms)


def device_model(device: torch.device) -> DeviceModel:
    """The model of ``device``: :data:`CPU`, or the entry of :data:`MODELS` its GPU name matches."""
    if device.type != "cuda":
        return CPU
    if not torch.cuda.is_available():  # modelling a GPU from a machine without one: the reference part
        return H100
    props = torch.cuda.get_device_properties(device)
    return _cuda_model(props.name, props.multi_processor_count)


def grad_kernel_seconds(model: DeviceModel, tokens: int, out_features: int, rank: int) -> float:
    """Modelled seconds of the low-rank backward kernel (``kernels.lowrank_linear._lowrank_grad_kernel``).

    One program per (64-row block, rank block of up to 64) sweeps the output columns in steps of
    16; programs run ``model.sms`` at a time (one per SM: the kernel holds about 135 registers per
    thread at rank 256 with 8 warps), so the time is waves x steps x ``model.grad_step`` plus a launch.
    """
    block_r = max(16, min(64, 1 << max(0, rank - 1).bit_length()))
    programs = -(-tokens // 64) * -(-rank // block_r)
    waves = -(-programs // model.sms)
    return waves * -(-out_features // 16) * model.grad_step + model.launch


def _needs(trains: str) -> tuple[bool, bool, bool]:
    """(grad of x, grads of A and B, grads of d and b) for ``trains``."""
    if trains not in TRAINS:
        raise ValueError(f"trains must be one of {TRAINS}, got {trains!r}")
    training = trains != "none"
    return training, trains in ("factors", "all"), trains in ("vectors", "all")


def _gemms(path: str, shape: tuple[int, int, int, int], trains: str, sixteen_bit: bool,
           grad_kernel: bool = True) -> list[tuple]:
    """The matrix products of one call on ``path``: ``(M, N, K, where, extra)`` each, ``where`` one
    of ``"blas"``, ``"triton"``, ``"lowrank_grad"`` (the Triton low-rank backward kernel) and
    ``extra`` the elements it reads or writes beyond its operands and result (an accumulated
    output, a concatenated copy, ``W`` read by the ``W_eff`` update). ``grad_kernel``: the Triton
    paths compute the low-rank gradients with that kernel (else with BLAS, as ``lean`` does)."""
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
    if triton and grad_kernel:
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


def _rate_key(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(key of ``DeviceModel.flops``, key of ``DeviceModel.triton_gemm``) for inputs of ``dtype``."""
    if dtype in (torch.float16, torch.bfloat16):
        return _DTYPE_KEYS[dtype], "16-bit"
    if dtype == torch.float32 and device.type == "cuda" and launch.tf32_allowed():
        return "tf32", "tf32"
    return _DTYPE_KEYS.get(dtype, "fp32"), "fp32"


def estimate(path: str, device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int],
             trains: str = "vectors", lowrank_backward: str = "auto") -> float:
    """Modelled seconds of one call on ``path``: forward, and backward unless ``trains == "none"``.

    ``shape`` is (tokens, in_features, out_features, rank). ``trains="vectors"`` is VeRA (``x``
    and ``d``, ``b`` need gradients), ``"factors"`` LoRA (``x``, ``A``, ``B``), ``"all"`` both,
    ``"none"`` inference. Each product takes the longer of its flops at the GEMM rate and its bytes
    at the bandwidth (a roofline per product: the products with the rank as one dimension are
    bandwidth-bound), plus a fixed cost per launch; the low-rank backward kernel takes the longer
    of that and its latency model (:func:`grad_kernel_seconds`). ``lowrank_backward`` ("kernel",
    "blas", or "auto": the cheaper) says how a Triton path computes the low-rank gradients.
    """
    if lowrank_backward == "auto" and path in ("fused", "split"):
        return min(estimate(path, device, dtype, shape, trains, way) for way in LOWRANK_BACKWARDS[1:])
    model = device_model(device)
    size = torch.empty((), dtype=dtype).element_size()
    flops_key, family = _rate_key(device, dtype)
    peak = model.flops[flops_key]
    triton_rate = max(model.triton_gemm[family], model.tma_gemm.get(family, 0.0) if device.type == "cuda" else 0.0)
    efficiency = {"blas": 1.0, "triton": triton_rate, "lowrank_grad": 1.0}
    total = 0.0
    for M, N, K, where, extra in _gemms(path, shape, trains, size < 4, lowrank_backward != "blas"):
        flops = 2 * M * N * K / (peak * efficiency[where])
        moved = (M * K + K * N + M * N + extra) * size / model.bandwidth
        seconds = max(flops, moved)
        if where == "lowrank_grad":  # (tokens, rank, out): latency-bound long before the roofline binds
            seconds = max(seconds, grad_kernel_seconds(model, M, K, N) - model.launch)
        total += seconds + model.launch
    return total


class _KernelChoice:
    """A context-local override of one kernel choice inside the Triton paths ("auto": the cost
    model decides), for tests and measurements, like the strategy's :func:`use_strategy`."""

    def __init__(self, what: str, names: tuple[str, ...]) -> None:
        self.what, self.names = what, names
        self.var: contextvars.ContextVar[str] = contextvars.ContextVar(f"pefttriton_{what.replace(' ', '_')}", default="auto")

    @contextlib.contextmanager
    def use(self, name: str):
        if name not in self.names:
            raise ValueError(f"{self.what} must be one of {self.names}, got {name!r}")
        token = self.var.set(name)
        try:
            yield
        finally:
            self.var.reset(token)


# How a Triton path computes the low-rank gradients: "kernel" (one pass over the output gradient,
# kernels.lowrank_linear._lowrank_grad_kernel) or "blas" (the products lean uses).
LOWRANK_BACKWARDS = ("auto", "kernel", "blas")
_LOWRANK_BACKWARD = _KernelChoice("lowrank backward", LOWRANK_BACKWARDS)
# Which Triton GEMM the fused paths' big products run: "pointer" or "tma" (Hopper).
GEMM_KERNELS = ("auto", "pointer", "tma")
_GEMM_KERNEL = _KernelChoice("gemm kernel", GEMM_KERNELS)


def use_lowrank_backward(name: str):
    """Inside the block, Triton paths compute the low-rank gradients as ``name`` says ("kernel",
    "blas" or "auto": :func:`lowrank_backward`); for tests and measurements (``python -m
    bench.gpu_check`` times both)."""
    return _LOWRANK_BACKWARD.use(name)


def use_gemm_kernel(name: str):
    """Inside the block, the Triton paths' big GEMMs (the fused forward, ``grad_x``) run the kernel
    ``name`` says: "pointer" (pointer loads, any GPU), "tma" (tensor descriptors and persistent
    tiles, Hopper; where the inputs meet TMA's alignment rules) or "auto" (:func:`gemm_kernel`)."""
    return _GEMM_KERNEL.use(name)


def kernel_overrides() -> tuple[str, str]:
    """The :func:`use_lowrank_backward` and :func:`use_gemm_kernel` settings of this context: an eager
    call keeps them for its backward, which on CUDA runs in an autograd thread that does not see them."""
    return _LOWRANK_BACKWARD.var.get(), _GEMM_KERNEL.var.get()


def kernel_overrides_set(overrides: tuple[str, str]):
    """Inside the block, the settings :func:`kernel_overrides` returned (a no-op context where they
    are this context's already: the common case, and a backward's per-call cost)."""
    if overrides == kernel_overrides():
        return contextlib.nullcontext()
    return _overrides_set(overrides)


@contextlib.contextmanager
def _overrides_set(overrides: tuple[str, str]):
    with use_lowrank_backward(overrides[0]), use_gemm_kernel(overrides[1]):
        yield


def lowrank_backward(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int], trains: str) -> str:
    """"kernel" or "blas": how a Triton path's backward computes ``gh``, ``grad_d`` and ``grad_b``
    for a call of ``shape`` (tokens, in, out, rank). Off CUDA (Triton's interpreter, for tests)
    the kernel, unless :func:`use_lowrank_backward` says otherwise."""
    forced = _LOWRANK_BACKWARD.var.get()
    if forced != "auto":
        return forced
    if device.type != "cuda":
        return "kernel"
    return _cheaper_backward(device, dtype, tuple(shape), trains, launch.tf32_allowed())


def gemm_kernel(device: torch.device, dtype: torch.dtype) -> str:
    """"pointer" or "tma": which Triton GEMM the fused paths run for inputs of ``dtype``. The TMA
    variant only where the device's model has a measured rate for it above the pointer kernel's
    (``DeviceModel.tma_gemm``), unless :func:`use_gemm_kernel` says otherwise."""
    forced = _GEMM_KERNEL.var.get()
    if forced != "auto":
        return forced
    if device.type != "cuda":
        return "pointer"
    model = device_model(device)
    family = _rate_key(device, dtype)[1]
    return "tma" if model.tma_gemm.get(family, 0.0) > model.triton_gemm[family] else "pointer"


@functools.lru_cache(maxsize=4096)
def _cheaper_backward(device: torch.device, dtype: torch.dtype, shape: tuple, trains: str, tf32: bool) -> str:
    """A pure function of its arguments (``tf32`` is the flag :func:`estimate` reads), cached per shape."""
    costs = {way: estimate("fused", device, dtype, shape, trains, way) for way in LOWRANK_BACKWARDS[1:]}
    return min(costs, key=costs.get)


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
    _cheaper_backward.cache_clear()


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
    return _cheapest(device, dtype, tuple(shape), trains, allowed, tf32)


@functools.lru_cache(maxsize=4096)
def _cheapest(device: torch.device, dtype: torch.dtype, shape: tuple, trains: str, allowed: tuple, tf32: bool) -> str:
    """The path of ``allowed`` the cost model rates cheapest: a pure function of its arguments
    (``tf32`` is the TF32 flag :func:`estimate` reads), so every call of a shape after the first
    reads it from this cache instead of modelling every path again."""
    return min(allowed, key=lambda path: estimate(path, device, dtype, shape, trains))
