"""Fused ops: validation, backend dispatch and autograd around the Triton kernels."""

from pefttriton.ops.lowrank_linear import lowrank_linear
from pefttriton.ops.vera_linear import vera_linear

__all__ = ["lowrank_linear", "vera_linear"]
