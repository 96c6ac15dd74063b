"""LoRA as a drop-in module: ``h = W0 x + bias + (alpha / r) * B (A dropout(x))``.

``A`` (r, n) starts Kaiming-uniform(a = sqrt(5)) and ``B`` (m, r) at zero, exactly as PEFT's LoRA
default (``init_lora_weights=True``), so the layer starts at the base layer. Both train. The
whole layer is one call of the fused engine :func:`pefttriton.ops.lowrank_linear` with
``A``, ``B`` and ``scale = alpha / r``.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from pefttriton.adapters.adapter_layer import AdapterLayer, LowRank, check_finite
from pefttriton.ops.validation import check_x_and_weight


def _peft_lora_A(r: int, in_features: int, out_features: int) -> torch.Tensor:
    """``lora_A`` (r, in_features) drawn exactly as PEFT's LoRA draws it (``init_lora_weights=True``).

    PEFT builds ``nn.Linear(in_features, r)`` and ``nn.Linear(r, out_features)`` (each drawing its
    default Kaiming-uniform weight from the global CPU generator, in float32), then draws ``A``
    again and zeroes ``B``. Making the same three draws keeps the global generator in step, so the
    same ``torch.manual_seed`` and target order give PEFT's ``lora_A`` bit for bit.
    """
    draws = [torch.empty(r, in_features), torch.empty(out_features, r), torch.empty(r, in_features)]
    for t in draws:
        nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return draws[2]


class FusedLoRALinear(AdapterLayer):
    """A frozen ``nn.Linear`` plus a LoRA adapter, computed by the fused engine.

    Args:
        base_layer: the ``nn.Linear`` to adapt; its weight and bias are frozen.
        r: LoRA rank.
        alpha: LoRA alpha; the adapter is scaled by ``scale = alpha / r`` (PEFT's default 8).
        dropout: dropout probability on the adapter's input (PEFT's ``lora_dropout``).
        use_rslora: ``scale = alpha / sqrt(r)`` instead (rank-stabilised LoRA, PEFT's ``use_rslora``).
        fan_in_fan_out: see :class:`~pefttriton.adapters.adapter_layer.AdapterLayer`.

    Trainable parameters: ``lora_A`` (r, in_features) and ``lora_B`` (out_features, r), float32
    (float64 for a float64 base layer); they are cast to the base layer's dtype for the op.

    Memory for backward: with ``dropout == 0``, or in eval mode, the forward is one fused call that
    keeps ``x`` (needed for ``grad_A``) and ``x A^T`` (tokens x r); no dropped copy of ``x`` and no
    (tokens, out_features) tensor. With ``dropout > 0`` in training the base and low-rank paths see
    different inputs, which the engine cannot fuse; the layer then runs the same composition as
    PEFT (base GEMM + ``B (A dropout(x))``), which keeps two (tokens, in_features) tensors (the
    dropped input and PyTorch's dropout mask) plus ``dropout(x) A^T``, and still no (tokens, out)
    tensor.
    """

    adapter_type = "lora"
    adapter_layer_names = ("lora_A", "lora_B")
    settings = ("alpha", "dropout", "use_rslora")

    def __init__(
        self, base_layer: nn.Linear, r: int, *, alpha: float = 8.0, dropout: float = 0.0, use_rslora: bool = False,
        fan_in_fan_out: bool = False,
    ) -> None:
        super().__init__(base_layer, r, fan_in_fan_out=fan_in_fan_out)
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.dropout = dropout
        self.lora_A = nn.Parameter(_peft_lora_A(r, self.in_features, self.out_features).to(**self._new_param_kwargs()))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **self._new_param_kwargs()))

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = check_finite("alpha", value)

    @property
    def use_rslora(self) -> bool:
        return self._use_rslora

    @use_rslora.setter
    def use_rslora(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"use_rslora must be a bool, got {value!r}")
        self._use_rslora = value

    @property
    def scale(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora`` (PEFT's ``scaling``)."""
        return self._alpha / (math.sqrt(self.r) if self._use_rslora else self.r)

    @property
    def dropout(self) -> float:
        return self._dropout

    @dropout.setter
    def dropout(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {value!r}")
        self._dropout = float(value)
        # PEFT uses nn.Identity for p == 0; so does this layer, and then the fused path always runs.
        module = nn.Dropout(p=self._dropout) if self._dropout > 0.0 else nn.Identity()
        self.lora_dropout = module.train(self.training)

    def engine_inputs(self, dtype: torch.dtype) -> LowRank:
        return LowRank(self.lora_A.to(dtype), self.lora_B.to(dtype), scale=self.scale)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dropout > 0.0 and self.training:
            # Unfused on purpose: the base GEMM needs x and the adapter dropout(x) (see class doc).
            check_x_and_weight(x, self.base_layer.weight)
            A, B, _, _, scale = self.engine_inputs(self.base_layer.weight.dtype)
            base = F.linear(x, self.base_layer.weight, self.base_layer.bias)
            return base + scale * F.linear(F.linear(self.lora_dropout(x), A), B)
        return super().adapted_forward(x)
