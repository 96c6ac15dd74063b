"""pefttriton: fused Triton kernels for parameter-efficient fine-tuning."""

from pefttriton.acceleration import AccelerationReport, accelerate, acceleration_report
from pefttriton.adapter_layer import AdapterLayer
from pefttriton.backend import (
    get_backend,
    get_gemm_mode,
    get_strategy,
    last_path,
    set_backend,
    set_gemm_mode,
    set_strategy,
    use_backend,
    use_gemm_mode,
    use_strategy,
)
from pefttriton.config import (
    AdapterConfig,
    DeepLoRAConfig,
    LoRAConfig,
    LoRMAConfig,
    VeRAConfig,
)
from pefttriton.deep_lora import (
    FusedDeepLoRALinear,
    compress_init,
    discrepant_param_groups,
)
from pefttriton.distributed import (
    consolidate_sharded_adapter,
    load_sharded_adapter,
    save_sharded_adapter,
)
from pefttriton.injection import (
    inject,
    merge_and_unload,
    print_trainable_parameters,
    trainable_parameter_summary,
)
from pefttriton.lora import FusedLoRALinear
from pefttriton.lorma import FusedLoRMALinear
from pefttriton.ops import lorma_pi_linear, lowrank_linear, vera_bank_linear, vera_linear
from pefttriton.peft_interop import (
    from_peft_model,
    load_peft_adapter,
    save_peft_adapter,
)
from pefttriton.registry import register_adapter
from pefttriton.save import load_adapter, save_adapter
from pefttriton.strategy import (
    clear_strategy_cache,
    set_strategy_autotune,
    strategy_cache,
)
from pefttriton.vera import FusedVeRALinear, VeRAProjections
from pefttriton.vera_bank import VeRABank, adapter_ids, inject_banks, load_into_banks, to_banks

__all__ = [
    "AccelerationReport",
    "AdapterConfig",
    "AdapterLayer",
    "DeepLoRAConfig",
    "FusedDeepLoRALinear",
    "FusedLoRALinear",
    "FusedLoRMALinear",
    "FusedVeRALinear",
    "LoRAConfig",
    "LoRMAConfig",
    "VeRABank",
    "VeRAConfig",
    "VeRAProjections",
    "accelerate",
    "acceleration_report",
    "adapter_ids",
    "clear_strategy_cache",
    "compress_init",
    "consolidate_sharded_adapter",
    "discrepant_param_groups",
    "from_peft_model",
    "get_backend",
    "get_gemm_mode",
    "get_strategy",
    "inject",
    "inject_banks",
    "last_path",
    "load_adapter",
    "load_into_banks",
    "load_peft_adapter",
    "load_sharded_adapter",
    "lorma_pi_linear",
    "lowrank_linear",
    "merge_and_unload",
    "print_trainable_parameters",
    "register_adapter",
    "save_adapter",
    "save_peft_adapter",
    "save_sharded_adapter",
    "set_backend",
    "set_gemm_mode",
    "set_strategy",
    "set_strategy_autotune",
    "strategy_cache",
    "to_banks",
    "trainable_parameter_summary",
    "use_backend",
    "use_gemm_mode",
    "use_strategy",
    "vera_bank_linear",
    "vera_linear",
]
__version__ = "0.1.0"
