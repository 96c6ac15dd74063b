"""Which implementation runs the fused ops: Triton kernels (in one of two GEMM modes) or PyTorch.

``auto`` (the default backend) picks Triton for CUDA tensors and PyTorch otherwise. ``triton`` on
CPU tensors needs Triton's interpreter: set ``TRITON_INTERPRET=1`` before importing pefttriton
(Triton reads it when the kernels are defined).

State. :func:`set_backend` and :func:`set_gemm_mode` set process-wide defaults, seen by every
thread (the autograd engine's device threads included), like ``torch.backends`` flags.
:func:`use_backend` and :func:`use_gemm_mode` override them for the current context only (thread
or asyncio task) and restore the previous choice on exit, so threads that interleave them never
see each other's choice. ``PEFTTRITON_BACKEND`` and ``PEFTTRITON_GEMM_MODE`` set the initial
defaults; a value outside the allowed names fails at import with the variable's name.

Every call of a fused op resolves the state once into a *path* (:func:`resolve_path`): ``"torch"``,
``"fused"`` or ``"split"``. Eager calls pass it to the op and its backward, so the two always agree.
Under ``torch.compile`` the op resolves the path itself when it runs (a compiled graph follows later
changes of the state without recompiling); its backward resolves again when it runs, which, on
CUDA, happens in an autograd thread that sees the process-wide default and not a :func:`use_backend`
override.
"""

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch

from pefttriton.kernels import launch

BACKENDS = ("auto", "triton", "torch")
GEMM_MODES = ("fused", "split")
PATHS = ("torch", "fused", "split")


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
_GEMM_MODE = _Choice("gemm mode", GEMM_MODES, "PEFTTRITON_GEMM_MODE", "fused")


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


def set_gemm_mode(mode: str) -> None:
    """How the Triton backend runs the base GEMM ``x W^T`` (and ``g W`` in backward), process-wide.

    ``"fused"`` (default): one Triton GEMM whose K loop also covers the low-rank path; ``y`` is
    written once. ``"split"``: cuBLAS (``torch.addmm``) computes the base GEMM, then a Triton
    kernel adds the low-rank path into ``y`` (one extra read and write of ``y``). A tuned cuBLAS
    can beat a Triton GEMM on some shapes; the benchmark reports both so the choice is measured.
    """
    _GEMM_MODE.default = _GEMM_MODE.check(mode)


def get_gemm_mode() -> str:
    """The GEMM mode in force in this context: a :func:`use_gemm_mode` override, else the default."""
    return _GEMM_MODE.get()


def use_gemm_mode(mode: str):
    """Use GEMM mode ``mode`` in this context only; the previous choice on exit."""
    return _GEMM_MODE.use(mode)


def resolve_path(device: torch.device, dtype: torch.dtype) -> str:
    """What runs a fused op on tensors of ``device`` and ``dtype`` now: ``"torch"``, ``"fused"``
    or ``"split"`` (the last two are the Triton backend's GEMM modes).

    float64 on a GPU takes the torch path: no float64 kernel configuration is compiled or checked
    for GPUs. Under the interpreter float64 runs in the kernels, for tight tests.

    Raises:
        RuntimeError: the triton backend was asked for on a CPU tensor without the interpreter.
    """
    backend = get_backend()
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        return "torch"
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"the triton backend needs CUDA tensors (got {device.type}); to run it on the CPU set "
            "TRITON_INTERPRET=1 before importing pefttriton"
        )
    if device.type == "cuda" and dtype == torch.float64:
        return "torch"
    return get_gemm_mode()


def resolve_backend(device: torch.device) -> str:
    """The backend that runs on ``device`` now: ``"triton"`` or ``"torch"``."""
    return "torch" if resolve_path(device, torch.float32) == "torch" else "triton"
