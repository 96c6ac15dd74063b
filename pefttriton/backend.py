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
GEMM_MODES = ("fused", "split")
_backend = os.environ.get("PEFTTRITON_BACKEND", "auto")
_gemm_mode = os.environ.get("PEFTTRITON_GEMM_MODE", "fused")


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


def set_gemm_mode(mode: str) -> None:
    """How the Triton backend runs the base GEMM ``x W^T`` (and ``g W`` in backward).

    ``"fused"`` (default): one Triton GEMM whose K loop also covers the low-rank path; ``y`` is
    written once. ``"split"``: cuBLAS (``torch.addmm``) computes the base GEMM, then a Triton
    kernel adds the low-rank path into ``y`` (one extra read and write of ``y``). A tuned cuBLAS
    can beat a Triton GEMM on some shapes; the benchmark reports both so the choice is measured.
    """
    global _gemm_mode
    if mode not in GEMM_MODES:
        raise ValueError(f"gemm mode must be one of {GEMM_MODES}, got {mode!r}")
    _gemm_mode = mode


def get_gemm_mode() -> str:
    """The mode set by :func:`set_gemm_mode` (``"fused"`` unless changed)."""
    return _gemm_mode
