"""pefttriton: fused Triton kernels for parameter-efficient fine-tuning.

The folders are the layers, each importing only the ones before it: ``kernels`` (Triton) <-
``ops`` (the fused ops, their state and references) <- ``adapters`` <- ``integration`` <- ``tools``.
Everything users need is exported here.
"""

from pefttriton import _moved
from pefttriton.adapters.adapter_layer import AdapterLayer
from pefttriton.adapters.config import (
    AdapterConfig,
    DeepLoRAConfig,
    LoRAConfig,
    LoRMAConfig,
    VeRAConfig,
)
from pefttriton.adapters.deep_lora import (
    FusedDeepLoRALinear,
    compress_init,
    discrepant_param_groups,
)
from pefttriton.adapters.lora import FusedLoRALinear
from pefttriton.adapters.lorma import FusedLoRMALinear
from pefttriton.adapters.registry import register_adapter
from pefttriton.adapters.vera import FusedVeRALinear, VeRAProjections
from pefttriton.integration.acceleration import AccelerationReport, accelerate, acceleration_report
from pefttriton.integration.distributed import (
    consolidate_sharded_adapter,
    load_sharded_adapter,
    save_sharded_adapter,
)
from pefttriton.integration.injection import (
    inject,
    merge_and_unload,
    print_trainable_parameters,
    trainable_parameter_summary,
)
from pefttriton.integration.peft_interop import (
    from_peft_model,
    load_peft_adapter,
    save_peft_adapter,
)
from pefttriton.integration.save import load_adapter, save_adapter
from pefttriton.integration.vera_bank import VeRABank, adapter_ids, inject_banks, load_into_banks, to_banks
from pefttriton.integration.warmup import warmup
from pefttriton.ops import lorma_pi_linear, lowrank_linear, vera_bank_linear, vera_linear
from pefttriton.ops.backend import (
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
from pefttriton.ops.strategy import (
    clear_strategy_cache,
    set_strategy_autotune,
    strategy_cache,
)

_moved.install()

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
    "warmup",
]
__version__ = "0.1.0"
