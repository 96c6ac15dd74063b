"""What every launcher of pefttriton's kernels shares.

* :data:`INTERPRET`: whether the kernels run in Triton's CPU interpreter. Triton reads
  ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a function, so this flag, read at the same
  moment, is the one source of truth (``pefttriton.ops.backend`` asks it too).
* The precision policy: :func:`acc_dtype`, :func:`input_precision` (IEEE fp32 dots unless PyTorch's
  own fp32 matmuls may use TF32: :func:`tf32_allowed`, :func:`allow_tf32`) and :func:`dot_in_fp32`
  (the interpreter's bf16 dot is broken).
* :func:`on_device`: the launch runs on the tensor's CUDA device (``cuda:1`` etc.), not the current one;
  :func:`run_tuned` launches an autotuned kernel there, without benchmarking inside a CUDA-graph capture.
* :func:`contiguous_vector`: kernels read (n,) vectors as ``ptr + offs``.
* :func:`grouped_program_ids`: the Triton tutorial's grouped ordering of output tiles.
* GEMM autotuning: :func:`gemm_config` (one tile config), :func:`gemm_family` (which list of configs
  serves a dtype and precision, :func:`family_pruner` keeping only those) and :func:`m_bucket` (the
  token count as an autotune key).
"""

import contextlib
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tf32_allowed() -> bool:
    """Whether PyTorch's own fp32 CUDA matmuls may use TF32, read through whichever API is in use.

    torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` ("tf32", "ieee", or "none" when
    neither it nor ``torch.backends.fp32_precision`` was set); once the new API set "tf32", reading
    the legacy ``allow_tf32`` raises ``RuntimeError``, so it is read only on older torch. Both
    APIs and ``torch.set_float32_matmul_precision`` are reflected in the new attribute.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch < 2.9
        return bool(matmul.allow_tf32)
    return precision == "tf32"


@contextlib.contextmanager
def allow_tf32(on: bool):
    """PyTorch's fp32 CUDA matmuls (and so the fused ops, :func:`input_precision`) with TF32 on or
    off inside the block, through the API :func:`tf32_allowed` reads; the previous setting after."""
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")
    previous = matmul.fp32_precision if new_api else matmul.allow_tf32
    if new_api:
        matmul.fp32_precision = "tf32" if on else "ieee"
    else:
        matmul.allow_tf32 = on
    try:
        yield
    finally:
        if new_api:
            matmul.fp32_precision = previous
        else:
            matmul.allow_tf32 = previous


def input_precision(dtype: torch.dtype) -> str:
    """Precision of fp32 dots: TF32 exactly when PyTorch's own fp32 matmuls may use it.

    Following PyTorch's TF32 setting (:func:`tf32_allowed`, off by default) keeps the fused ops as
    precise as the unfused layers they replace. 16-bit inputs ignore it.
    """
    if dtype == torch.float32 and not INTERPRET and tf32_allowed():
        return "tf32"
    return "ieee"


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether tiles of ``dtype`` are upcast to fp32 before ``tl.dot``: only bf16 under the
    interpreter, which computes bf16 dots wrongly (triton 3.9). Compiled kernels never do."""
    return INTERPRET and dtype == torch.bfloat16


def on_device(t: torch.Tensor):
    """Context of a launch on ``t``'s device: Triton launches on the current CUDA device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def capturing(t: torch.Tensor) -> bool:
    """Whether ``t``'s device is CUDA and its current stream is capturing a CUDA graph."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


# (kernel, key values, argument dtypes) -> the config the autotuner chose for that key, recorded at
# every launch outside a capture (read only inside one).
_TUNED: dict[tuple, triton.Config] = {}


def run_tuned(kernel, grid, on: torch.Tensor, *args, prune=None, **kwargs):
    """``kernel[grid](*args, **kwargs)`` for a ``triton.autotune`` kernel, on ``on``'s device.

    While that device's stream captures a CUDA graph (``torch.cuda.graph``, ``torch.compile``'s
    ``mode="reduce-overhead"``) the autotuner must not benchmark a new key (timing synchronises,
    which fails the capture). There the launch skips the autotuner: it takes the config the
    autotuner chose for the same key before (``pefttriton.warmup`` runs a model ahead of capturing
    for that), or, for a key never seen, the first config ``prune`` (the kernel's
    ``early_config_prune``) keeps: correct, perhaps slower than the tuned one.
    """
    named = dict(zip(kernel.arg_names, args))
    key = (id(kernel), *(named.get(k, kwargs.get(k)) for k in kernel.keys),
           *(str(a.dtype) for a in args if isinstance(a, torch.Tensor)))
    with on_device(on):
        if not capturing(on):
            out = kernel[grid](*args, **kwargs)
            _TUNED[key] = kernel.best_config
            return out
        config = _TUNED.get(key)
        if config is None:
            config = (kernel.configs if prune is None else prune(kernel.configs, named, **kwargs))[0]
        if config.pre_hook is not None:  # what the autotuner runs before a launch (descriptor block shapes)
            config.pre_hook({**named, **kwargs, **config.all_kwargs()})
        return kernel.fn[grid](*args, **kwargs, **config.all_kwargs())


def contiguous_vector(v: torch.Tensor | None) -> torch.Tensor | None:
    """``v`` as a contiguous vector (no copy when it is one): a strided or expanded view
    (``b = P[:, 1]``, ``bias = v[::2]``, an ``expand``) read as ``ptr + offs`` gives garbage."""
    return None if v is None else v.contiguous()


@triton.jit
def grouped_program_ids(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(row block, column block) of program ``pid`` in grouped order: GROUP_M row blocks share
    each column block while it is in L2 (the Triton matrix-multiplication tutorial)."""
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


def gemm_config(block_m: int, block_n: int, block_k: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    """One GEMM tile config: BLOCK_M x BLOCK_N x BLOCK_K, ``warps`` warps, ``stages`` pipeline stages."""
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m},
        num_warps=warps,
        num_stages=stages,
    )


def gemm_family(dtype: torch.dtype, precision: str) -> str:
    """Which family of GEMM configs serves inputs of ``dtype`` at ``precision``: "16-bit", "tf32" or "fp32"."""
    if dtype in (torch.float16, torch.bfloat16):
        return "16-bit"
    return "tf32" if precision == "tf32" else "fp32"


def m_bucket(M: int) -> int:
    """The autotune key of a token count: the power of two at or above it (at least 16), so a new
    token count in the same bucket reuses the tuned config."""
    return max(16, triton.next_power_of_2(M))


def family_pruner(configs: dict, pointer: str):
    """An ``early_config_prune`` that keeps the configs of ``configs[family]`` for the dtype of the
    kernel argument ``pointer`` and the launch's INPUT_PRECISION (the interpreter keeps its one)."""

    def prune(candidates, named_args, **kwargs):
        if INTERPRET:
            return candidates
        family = configs[gemm_family(named_args[pointer].dtype, kwargs["INPUT_PRECISION"])]
        return [config for config in candidates if any(config is mine for mine in family)]

    return prune
