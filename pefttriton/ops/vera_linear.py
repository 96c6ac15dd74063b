"""``vera_linear``: VeRA's forward ``y = x W^T + bias + lambda_b * ((lambda_d * (x A^T)) B^T)``."""

from torch import Tensor

from pefttriton.ops.lowrank_linear import lowrank_linear


def vera_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    lambda_d: Tensor,
    lambda_b: Tensor,
) -> Tensor:
    """VeRA through the fused engine.

    Args:
        x: (..., n) input.
        weight: (m, n) frozen base weight; bias: (m,) or None.
        A: (r, n) and B: (m, r): the layer's slices of the shared frozen projections.
        lambda_d: (r,) and lambda_b: (m,): the trainable scaling vectors (dtype of ``x`` or float32).

    Returns:
        (..., m). Only ``x A^T`` (N, r) is saved for backward when ``A`` and ``weight`` are frozen.
    """
    if lambda_d is None or lambda_b is None:
        raise ValueError("vera_linear needs both lambda_d (r,) and lambda_b (out_features,)")
    return lowrank_linear(x, weight, bias, A, B, d=lambda_d, b=lambda_b, scale=1.0)
