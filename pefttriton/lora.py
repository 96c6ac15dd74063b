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

from pefttriton.merging import AdditiveMergeMixin
from pefttriton.ops import lowrank_linear
from pefttriton.ops.validation import check_base_and_rank


def _param_dtype(weight: torch.Tensor) -> torch.dtype:
    # fp32 trainable factors (fp64 for an fp64 layer): 16-bit parameters lose small updates.
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


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


class FusedLoRALinear(AdditiveMergeMixin, nn.Module):
    """A frozen ``nn.Linear`` plus a LoRA adapter, computed by the fused engine.

    Args:
        base_layer: the ``nn.Linear`` to adapt; its weight and bias are frozen.
        r: LoRA rank.
        alpha: LoRA alpha; the adapter is scaled by ``scale = alpha / r`` (PEFT's default 8).
        dropout: dropout probability on the adapter's input (PEFT's ``lora_dropout``).

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

    def __init__(self, base_layer: nn.Linear, r: int, *, alpha: float = 8.0, dropout: float = 0.0) -> None:
        super().__init__()
        check_base_and_rank(base_layer, r)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite float, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        weight = base_layer.weight
        base_layer.requires_grad_(False)
        self.base_layer = base_layer
        self.r = r
        self.alpha = float(alpha)
        self.scale = self.alpha / r
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.dropout_p = float(dropout)
        # PEFT uses nn.Identity for p == 0; so does this layer, and then the fused path always runs.
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        dtype = _param_dtype(weight)
        self.lora_A = nn.Parameter(_peft_lora_A(r, self.in_features, self.out_features).to(weight.device, dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=weight.device, dtype=dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) in the base layer's dtype -> (..., out_features)."""
        if self.merged:
            return self.base_layer(x)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        A = self.lora_A.to(weight.dtype)
        B = self.lora_B.to(weight.dtype)
        if self.dropout_p > 0.0 and self.training:
            # Unfused on purpose: the base GEMM needs x and the adapter dropout(x) (see class doc).
            return F.linear(x, weight, bias) + self.scale * F.linear(F.linear(self.lora_dropout(x), A), B)
        return lowrank_linear(x, weight, bias, A, B, scale=self.scale)

    def delta_weight(self) -> torch.Tensor:
        """``scale * B @ A``, (out_features, in_features), fp32 (fp64 for an fp64 layer)."""
        return self.scale * (self.lora_B @ self.lora_A)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha:g}, dropout={self.dropout_p:g}, merged={self.merged}"
        )
