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
) -> torch.Tensor:
    """``y = x W^T + bias + scale * b * ((d * (x A^T)) B^T)`` for x of shape (..., n)."""
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    down = x @ A.T
    if d is not None:
        down = down * d
    up = down @ B.T
    if b is not None:
        up = up * b
    return y + scale * up
