"""Which implementation runs the fused ops: Triton kernels or plain PyTorch.

``auto`` (the default) picks Triton for CUDA tensors and PyTorch otherwise. ``triton`` on CPU
tensors needs Triton's interpreter: set ``TRITON_INTERPRET=1`` before importing pefttriton
(Triton reads it when the kernels are defined).
"""

import contextlib
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")
_backend = os.environ.get("PEFTTRITON_BACKEND", "auto")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def set_backend(name: str) -> None:
    """Choose the backend of every fused op: ``"auto"``, ``"triton"`` or ``"torch"``."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    """The backend set by :func:`set_backend` (``"auto"`` unless changed)."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`; restores the previous backend on exit."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def resolve_backend(device: torch.device) -> str:
    """The backend that runs on ``device`` now: ``"triton"`` or ``"torch"``."""
    if _backend == "torch":
        return "torch"
    if _backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"the triton backend needs CUDA tensors (got {device.type}); to run it on the CPU set "
            "TRITON_INTERPRET=1 before importing pefttriton"
        )
    return "triton"
