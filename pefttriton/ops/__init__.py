"""Fused ops: the backend and strategy state, validation, dispatch, custom ops and autograd around the Triton kernels, and their float64 references."""

from pefttriton.ops.lorma_pi import lorma_pi_linear, shift_product
from pefttriton.ops.lowrank_linear import lowrank_linear
from pefttriton.ops.vera_bank import vera_bank_linear
from pefttriton.ops.vera_linear import vera_linear

__all__ = ["lorma_pi_linear", "lowrank_linear", "shift_product", "vera_bank_linear", "vera_linear"]
