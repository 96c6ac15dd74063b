"""pefttriton: fused Triton kernels for parameter-efficient fine-tuning."""

from pefttriton.backend import get_backend, get_gemm_mode, set_backend, set_gemm_mode, use_backend
from pefttriton.ops import lowrank_linear, vera_linear
from pefttriton.deep_lora import FusedDeepLoRALinear, compress_init, discrepant_param_groups
from pefttriton.lora import FusedLoRALinear
from pefttriton.vera import FusedVeRALinear, VeRAProjections

__all__ = [
    "FusedDeepLoRALinear",
    "FusedLoRALinear",
    "FusedVeRALinear",
    "VeRAProjections",
    "compress_init",
    "discrepant_param_groups",
    "get_backend",
    "get_gemm_mode",
    "lowrank_linear",
    "set_backend",
    "set_gemm_mode",
    "use_backend",
    "vera_linear",
]
__version__ = "0.1.0"
