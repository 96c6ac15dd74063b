"""Naive references, for tests only: the formulas written plainly, differentiated by autograd.

Nothing here is fused or clever, so it can be trusted as the ground truth the fused backends
are compared against (in float64 where possible).
"""

import torch


def lowrank_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    d: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    scale: float = 1.0,
    adapter_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x W^T + bias + scale * b * ((d * (u A^T)) B^T)`` for x of shape (..., n), where the
    low-rank path reads ``u = adapter_input`` (x's shape; default ``x`` itself, ``drop(x)`` with
    dropout)."""
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    down = (x if adapter_input is None else adapter_input) @ A.T
    if d is not None:
        down = down * d
    up = down @ B.T
    if b is not None:
        up = up * b
    return y + scale * up


def shift_reference(P: torch.Tensor) -> torch.Tensor:
    """LoRMA-pi's ``shift(P)[i, j] = P[i, (j - i) mod m]``: row i of the square ``P`` rolled right by i."""
    return torch.stack([torch.roll(P[i], i) for i in range(P.shape[0])]) if P.shape[0] else P


def lorma_pi_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """``y = x (scale * shift(B A) W)^T + bias`` for x of shape (..., n)."""
    y = x @ (scale * shift_reference(B @ A) @ weight).T
    return y + bias if bias is not None else y
