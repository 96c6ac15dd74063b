"""Input checks shared by the fused ops: errors name the argument and the expected shape or dtype."""

import torch
from torch import Tensor, nn

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_x_and_weight(x, weight) -> tuple[int, int]:
    """Validate ``x`` (..., n) against the base ``weight`` (m, n); returns ``(m, n)``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have shape (..., in_features), got a scalar")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D (out_features, in_features) tensor, got shape {tuple(weight.shape)}")
    m, n = weight.shape
    if x.shape[-1] != n:
        raise ValueError(f"x must have shape (..., {n}) to match weight (out_features={m}, in_features={n}), got {tuple(x.shape)}")
    return m, n


def check_base_and_rank(base_layer, r) -> None:
    """What every adapter layer's constructor checks: an ``nn.Linear`` base and a positive int rank."""
    if not isinstance(base_layer, nn.Linear):
        raise TypeError(f"base_layer must be a torch.nn.Linear, got {type(base_layer).__name__}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
