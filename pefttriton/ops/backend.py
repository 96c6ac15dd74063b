"""Which implementation runs the fused ops: the backend (Triton kernels or PyTorch) and the strategy.

Backends. ``auto`` (the default) allows Triton on CUDA tensors and PyTorch everywhere; ``triton``
runs the Triton kernels (on CPU tensors only in Triton's interpreter: set ``TRITON_INTERPRET=1``
before importing pefttriton, Triton reads it when the kernels are defined); ``torch`` runs plain
PyTorch ops only.

Strategies: the same math and the same save-little backward, computed four ways.

* ``fused``  (Triton): one concatenated-K GEMM kernel writes ``y`` once (``x W^T`` then the rank).
* ``split``  (Triton): the base GEMM in cuBLAS, a Triton kernel adds the low-rank path.
* ``lean``   (PyTorch): every product in BLAS/cuBLAS, the small elementwise work around them.
* ``weight`` (PyTorch): ``W_eff = W + scale * (b * B)(d * A)`` formed once per call, one GEMM;
  float32 / float64 weights only (in 16 bits rounding ``W_eff`` loses a small adapter's effect).

``auto`` (the default strategy) lets :mod:`pefttriton.ops.strategy` choose per device, dtype and shape,
by its cost model or, when enabled, by timing the candidates once
(:func:`pefttriton.ops.strategy.set_strategy_autotune`). The backend limits the candidates: ``torch``
allows ``lean`` and ``weight``; ``triton`` allows ``fused`` and ``split``; ``auto`` allows all four on
CUDA and the PyTorch ones elsewhere. A strategy named explicitly runs as named where it can; where it
cannot (a Triton strategy under the ``torch`` backend or off CUDA without the interpreter, float64 on a
GPU, ``weight`` on 16-bit tensors or with dropout) the call runs what ``auto`` would choose among the
paths that can, and warns once per (strategy, reason).

State. :func:`set_backend` and :func:`set_strategy` set process-wide defaults, seen by every thread
(the autograd engine's device threads included), like ``torch.backends`` flags. :func:`use_backend`
and :func:`use_strategy` override them for the current context only (thread or asyncio task) and
restore the previous choice on exit, so threads that interleave them never see each other's choice.
``PEFTTRITON_BACKEND`` and ``PEFTTRITON_STRATEGY`` set the initial defaults; a value outside the
allowed names fails at import with the variable's name. ``set_gemm_mode`` / ``use_gemm_mode`` /
``get_gemm_mode`` (and ``PEFTTRITON_GEMM_MODE``) are the deprecated names of the strategy state from
when only ``fused`` and ``split`` existed.

Every call of a fused op resolves the state once into a *path* (:func:`resolve_path`), one of
:data:`PATHS`. Eager calls pass it to the op and its backward, so the two always agree, and record
it for :func:`last_path`. Under ``torch.compile`` the op resolves the path itself when it runs (a
compiled graph follows later changes of the state without recompiling); its backward resolves again
when it runs, which, on CUDA, happens in an autograd thread that sees the process-wide default and
not a :func:`use_backend` override.
"""

import contextlib
import contextvars
import os
import warnings
from collections.abc import Iterator

import torch

from pefttriton.kernels import launch
from pefttriton.ops import strategy as chooser

BACKENDS = ("auto", "triton", "torch")
STRATEGIES = ("auto", "fused", "split", "lean", "weight")
PATHS = ("fused", "split", "lean", "weight")
TRITON_PATHS = ("fused", "split")
TORCH_PATHS = ("lean", "weight")
GEMM_MODES = ("fused", "split")  # the deprecated set_gemm_mode's names


class _Choice:
    """One choice: a process-wide default (from an environment variable) and a context-local override."""

    def __init__(self, what: str, allowed: tuple[str, ...], variable: str, default: str) -> None:
        self.what, self.allowed = what, allowed
        value = os.environ.get(variable, "")
        if value and value not in allowed:
            raise ValueError(f"environment variable {variable}={value!r} must be one of {allowed} (names are lower case)")
        self.default = value or default
        self.override: contextvars.ContextVar[str | None] = contextvars.ContextVar(f"pefttriton_{variable}", default=None)

    def check(self, value: str) -> str:
        if not isinstance(value, str) or value not in self.allowed:
            raise ValueError(f"{self.what} must be one of {self.allowed}, got {value!r}")
        return value

    def get(self) -> str:
        override = self.override.get()
        return self.default if override is None else override

    @contextlib.contextmanager
    def use(self, value: str) -> Iterator[None]:
        token = self.override.set(self.check(value))
        try:
            yield
        finally:
            self.override.reset(token)


_BACKEND = _Choice("backend", BACKENDS, "PEFTTRITON_BACKEND", "auto")
# PEFTTRITON_GEMM_MODE is the deprecated name of PEFTTRITON_STRATEGY (read when the latter is unset).
_STRATEGY = _Choice(
    "strategy", STRATEGIES,
    "PEFTTRITON_STRATEGY" if os.environ.get("PEFTTRITON_STRATEGY") or not os.environ.get("PEFTTRITON_GEMM_MODE")
    else "PEFTTRITON_GEMM_MODE",
    "auto",
)
_LAST_PATH: contextvars.ContextVar[str | None] = contextvars.ContextVar("pefttriton_last_path", default=None)


def interpreting() -> bool:
    """True when the Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1`` was set
    when they were defined: :data:`pefttriton.kernels.launch.INTERPRET`)."""
    return launch.INTERPRET


def set_backend(name: str) -> None:
    """Choose the backend of every fused op, process-wide: ``"auto"``, ``"triton"`` or ``"torch"``.

    A :func:`use_backend` block active in the calling context still takes precedence there.
    """
    _BACKEND.default = _BACKEND.check(name)


def get_backend() -> str:
    """The backend in force in this context: a :func:`use_backend` override, else the default."""
    return _BACKEND.get()


def use_backend(name: str):
    """Use backend ``name`` in this context (thread or task) only; the previous choice on exit."""
    return _BACKEND.use(name)


def set_strategy(name: str) -> None:
    """Choose how every fused op computes, process-wide: ``"auto"`` (default), ``"fused"``,
    ``"split"``, ``"lean"`` or ``"weight"`` (see the module docstring for what each does and how the
    backend limits them). A :func:`use_strategy` block active in the calling context still takes
    precedence there.
    """
    _STRATEGY.default = _STRATEGY.check(name)


def get_strategy() -> str:
    """The strategy in force in this context: a :func:`use_strategy` override, else the default."""
    return _STRATEGY.get()


def use_strategy(name: str):
    """Use strategy ``name`` in this context (thread or task) only; the previous choice on exit."""
    return _STRATEGY.use(name)


def _deprecated_gemm_mode(mode: str) -> str:
    warnings.warn(
        "set_gemm_mode / use_gemm_mode are deprecated: use pefttriton.set_strategy / use_strategy "
        "(the same names, plus 'auto', 'lean' and 'weight')",
        DeprecationWarning,
        stacklevel=3,
    )
    if not isinstance(mode, str) or mode not in GEMM_MODES:
        raise ValueError(f"gemm mode must be one of {GEMM_MODES}, got {mode!r}")
    return mode


def set_gemm_mode(mode: str) -> None:
    """Deprecated: :func:`set_strategy` with ``"fused"`` or ``"split"``."""
    set_strategy(_deprecated_gemm_mode(mode))


def get_gemm_mode() -> str:
    """Deprecated: :func:`get_strategy`."""
    return get_strategy()


def use_gemm_mode(mode: str):
    """Deprecated: :func:`use_strategy` with ``"fused"`` or ``"split"``."""
    return use_strategy(_deprecated_gemm_mode(mode))


def last_path() -> str | None:
    """The path (one of :data:`PATHS`) of the last eager fused-op call in this context, or None.

    ``torch.compile`` graphs resolve inside the op and do not record it.
    """
    return _LAST_PATH.get()


def _triton_allowed(device: torch.device, explicit: bool) -> bool:
    if device.type == "cuda":
        return True
    if not explicit:
        return False  # "auto" runs Triton on CUDA only; the interpreter is for tests
    if not interpreting():
        raise RuntimeError(
            f"the triton backend needs CUDA tensors (got {device.type}); to run it on the CPU set "
            "TRITON_INTERPRET=1 before importing pefttriton"
        )
    return True


def candidates(device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
    """The paths the backend in force allows for tensors of ``device`` and ``dtype``.

    Raises:
        RuntimeError: the triton backend was asked for on a CPU tensor without the interpreter.
    """
    backend = get_backend()
    triton_ok = backend != "torch" and _triton_allowed(device, backend == "triton")
    if triton_ok and device.type == "cuda" and dtype == torch.float64:
        triton_ok = False  # no float64 kernel configuration is compiled or checked for GPUs
    torch_paths = TORCH_PATHS if dtype in (torch.float32, torch.float64) else ("lean",)
    if backend == "triton" and triton_ok:
        return TRITON_PATHS
    return (TRITON_PATHS if triton_ok else ()) + torch_paths


def resolve_path(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int] | None = None,
                 trains: str = "vectors", timer: chooser.Timer | None = None, dropout: bool = False) -> str:
    """What computes a fused op on tensors of ``device`` and ``dtype`` now: one of :data:`PATHS`.

    ``shape`` is (tokens, in_features, out_features, rank) and ``trains`` what needs gradients
    (:func:`pefttriton.ops.strategy.choose`'s argument); both matter only to the ``auto`` strategy, which
    takes the cheapest candidate (:func:`candidates`) by cost model or measurement (with ``timer``,
    which the calling op passes, to time a candidate). ``dropout``: the call drops elements of the
    adapter's input, which the ``weight`` strategy cannot (it folds the adapter into ``W``).

    A strategy set explicitly that cannot run here (a Triton one on CPU tensors without the
    interpreter or under the ``torch`` backend, ``weight`` on 16-bit tensors or with dropout) runs
    what ``auto`` would choose among the paths that can, with a warning the first time each
    (strategy, reason) happens.

    Raises:
        RuntimeError: the triton backend was asked for on a CPU tensor without the interpreter.
    """
    allowed = candidates(device, dtype)
    if dropout:
        allowed = tuple(path for path in allowed if path != "weight")
    strategy = get_strategy()
    if strategy == "auto":
        return chooser.choose(device, dtype, shape, trains, allowed, timer)
    # a PyTorch strategy named explicitly runs under any backend, where its dtype and dropout allow it
    torch_ok = strategy == "lean" or (strategy == "weight" and dtype in (torch.float32, torch.float64) and not dropout)
    if strategy in allowed or torch_ok:
        return strategy
    path = chooser.choose(device, dtype, shape, trains, allowed, timer)
    _warn_fallback(strategy, _why_not(strategy, device, dtype, dropout), path)
    return path


def _why_not(strategy: str, device: torch.device, dtype: torch.dtype, dropout: bool) -> str:
    """Why ``strategy`` is not among the candidates for this call."""
    if strategy == "weight":
        if dtype not in (torch.float32, torch.float64):
            return f"it needs float32 or float64 tensors, got {dtype} (rounding W + delta W to 16 bits loses most of a small adapter's effect)"
        return "it folds the adapter into W, so it cannot drop elements of the adapter's input (dropout > 0)"
    if get_backend() == "torch":
        return "the backend is 'torch'"
    if device.type == "cuda":
        return "no float64 Triton kernel is compiled for GPUs"
    return f"Triton runs on CUDA tensors (got {device.type}), or on the CPU only in its interpreter"


_WARNED: set[tuple[str, str]] = set()


def _warn_fallback(strategy: str, reason: str, path: str) -> None:
    """Warns once per (strategy, reason) that ``strategy`` cannot run and ``path`` runs instead."""
    if (strategy, reason) in _WARNED:
        return
    _WARNED.add((strategy, reason))
    warnings.warn(f"pefttriton: strategy {strategy!r} cannot run here: {reason}; running {path!r}, what 'auto' "
                  "chooses among the paths that can (this warning is shown once)", UserWarning, stacklevel=4)


def record_path(path: str) -> str:
    """Remember ``path`` as this context's :func:`last_path`; returns it."""
    _LAST_PATH.set(path)
    return path


def uses_triton(path: str) -> bool:
    """Whether ``path`` runs Triton kernels."""
    return path in TRITON_PATHS


def resolve_backend(device: torch.device) -> str:
    """The backend that runs a fused op on ``device`` now: ``"triton"`` or ``"torch"``."""
    return "triton" if uses_triton(resolve_path(device, torch.float32, (4096, 1024, 1024, 16))) else "torch"
