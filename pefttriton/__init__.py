"""pefttriton: fused Triton kernels for parameter-efficient fine-tuning."""

from pefttriton.backend import get_backend, set_backend, use_backend
from pefttriton.ops import lowrank_linear, vera_linear
from pefttriton.vera import FusedVeRALinear, VeRAProjections

__all__ = [
    "FusedVeRALinear",
    "VeRAProjections",
    "get_backend",
    "lowrank_linear",
    "set_backend",
    "use_backend",
    "vera_linear",
]
__version__ = "0.1.0"
