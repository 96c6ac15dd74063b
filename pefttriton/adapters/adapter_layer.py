"""What every adapter layer shares: :class:`AdapterLayer`, a frozen ``nn.Linear`` plus an adapter.

The base class owns freezing the base layer, the shapes, the dtype of the adapter's parameters,
``merged`` and the merged forward, ``delta_weight``, merge / unmerge / safe merge, tied base
weights, ``fan_in_fan_out`` and ``extra_repr``. A subclass declares its name, its parameters and
its settings, and says how it maps onto the fused engine in one method, :meth:`engine_inputs`::

    y = x W^T + bias + scale * b * ((d * (x A^T)) B^T)        (pefttriton.ops.lowrank_linear)

Its initialisation stays in its own ``__init__``; LoRA's dropout and LoRMA's multiplicative
variants, which the engine cannot express, override :meth:`adapted_forward` (and LoRMA its merge).
"""

import math
import warnings
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from pefttriton.ops import lowrank_linear
from pefttriton.ops.validation import check_base_and_rank


class LowRank(NamedTuple):
    """The engine's low-rank operands: ``A`` (r, in), ``B`` (out, r), ``d`` (r,) or None,
    ``b`` (out,) or None, ``scale``."""

    A: torch.Tensor
    B: torch.Tensor
    d: torch.Tensor | None = None
    b: torch.Tensor | None = None
    scale: float = 1.0


def check_finite(name: str, value, *, positive: bool = False) -> float:
    """``value`` as a float when it is a finite real (and > 0 with ``positive``); else ValueError naming ``name``."""
    finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not finite or (positive and value <= 0):
        raise ValueError(f"{name} must be a {'positive ' if positive else ''}finite float, got {value!r}")
    return float(value)


class AdapterLayer(nn.Module):
    """A frozen ``nn.Linear`` plus an adapter computed by the fused engine.

    Subclasses set:

    * ``adapter_type``: the name the registry, configs and checkpoints use (``"vera"``, ...).
    * ``adapter_layer_names``: the names of the adapter's own parameters (PEFT's term), the ones
      that train and that checkpoints hold.
    * ``settings``: constructor keyword arguments that define the layer beyond ``r``. Each is an
      attribute of the same name; assigning it on a built layer applies it (LoRA's ``alpha`` also
      changes ``scale``). ``fixed_settings``: those that cannot change on a built layer because
      the parameters would mean something else (LoRMA's ``variant``).

    and implement :meth:`engine_inputs`.

    Args:
        base_layer: the ``nn.Linear`` to adapt; its parameters are frozen.
        r: the adapter's rank, >= 1.
        fan_in_fan_out: the layer stands for GPT-2's ``Conv1D`` (weight stored (in, out)); the
            model surgery converts it back on unload. PEFT's name.

    Adapter parameters are float32 (float64 for a float64 base layer): 16-bit trainable
    parameters lose small updates. They are cast to the base weight's dtype for the engine.
    """

    adapter_type: ClassVar[str] = ""
    adapter_layer_names: ClassVar[tuple[str, ...]] = ()
    settings: ClassVar[tuple[str, ...]] = ()
    fixed_settings: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nn.Linear, r: int, *, fan_in_fan_out: bool = False) -> None:
        super().__init__()
        check_base_and_rank(base_layer, r)
        base_layer.requires_grad_(False)
        self.base_layer = base_layer
        self.r = r
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.fan_in_fan_out = bool(fan_in_fan_out)
        self.merged = False
        self.tied_weight_names: list[str] = []  # set by the model surgery (see untie_before_merge)

    # ----------------------------------------------------------------------------- dtypes

    @property
    def param_dtype(self) -> torch.dtype:
        """Dtype of the adapter's parameters: float64 for a float64 base layer, else float32."""
        return torch.float64 if self.base_layer.weight.dtype == torch.float64 else torch.float32

    def _new_param_kwargs(self) -> dict:
        """``device`` and ``dtype`` for a new adapter parameter."""
        return {"device": self.base_layer.weight.device, "dtype": self.param_dtype}

    # ---------------------------------------------------------------------------- forward

    def engine_inputs(self, dtype: torch.dtype) -> LowRank:
        """The engine's ``A``, ``B`` (in ``dtype``), ``d``, ``b`` (as held, float32 is fine) and ``scale``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        if self.merged:
            return self.base_layer(x)
        return self.adapted_forward(x)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The unmerged forward: one call of the fused engine."""
        weight = self.base_layer.weight
        A, B, d, b, scale = self.engine_inputs(weight.dtype)
        return lowrank_linear(x, weight, self.base_layer.bias, A, B, d, b, scale)

    def delta_weight(self) -> torch.Tensor:
        """``scale * (b * B) @ (d * A)``, (out_features, in_features), in :attr:`param_dtype`."""
        A, B, d, b, scale = self.engine_inputs(self.param_dtype)
        if d is not None:
            A = d.to(A.dtype)[:, None] * A
        if b is not None:
            B = b.to(B.dtype)[:, None] * B
        return scale * (B @ A)

    # ---------------------------------------------------------------------- parameters, settings

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter's own parameters by name (``adapter_layer_names``)."""
        return {name: getattr(self, name) for name in self.adapter_layer_names}

    def get_settings(self) -> dict:
        """``{setting: value}``: the constructor arguments that rebuild this layer (with ``r``)."""
        return {name: getattr(self, name) for name in self.settings}

    def extra_repr(self) -> str:
        settings = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v!r}" for k, v in self.get_settings().items())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"{settings + ', ' if settings else ''}merged={self.merged}"
        )

    # ------------------------------------------------------------------------------ merging

    def check_finite_merge(self, merged: torch.Tensor) -> None:
        """PEFT's ``safe_merge``: refuse to write a merged weight holding NaN or Inf."""
        if not torch.isfinite(merged).all():
            raise ValueError(
                f"NaN or Inf in the merged weight of this {type(self).__name__}: the adapter seems to be broken; "
                "the base weight was left unchanged"
            )

    def untie_before_merge(self) -> None:
        """Give the base layer its own copy of a weight it shares with other modules.

        Merging writes into the base weight in place. When that weight is tied to another
        parameter (GPT-2's ``lm_head`` and ``wte``), the other module would silently change too;
        the model surgery records such ties in ``tied_weight_names``. The layer then merges into
        a copy, so the merged model computes what the adapted model did, and the tie is gone (a
        warning says so).
        """
        if not self.tied_weight_names:
            return
        weight = self.base_layer.weight
        warnings.warn(
            f"{type(self).__name__}: the base weight is tied to {self.tied_weight_names}; merging into a copy so "
            "that those stay unchanged. The weights are no longer tied (one more copy in memory and in saved "
            "checkpoints).",
            stacklevel=3,
        )
        self.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        self.tied_weight_names = []

    def _with_delta(self, sign: float) -> torch.Tensor:
        delta = self.delta_weight().detach()
        return self.base_layer.weight.detach().to(delta.dtype) + sign * delta

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Add the adapter into the base weight; forward then runs the plain base layer.

        The delta is added in :attr:`param_dtype` and the sum rounded once to the weight's dtype.

        Args:
            safe_merge: check the merged weight for NaN/Inf first and raise ``ValueError``, leaving
                the base weight unchanged (PEFT's ``safe_merge``).
        """
        if self.merged:
            warnings.warn(f"{type(self).__name__} is already merged; nothing to do", stacklevel=2)
            return
        merged = self._with_delta(1.0)
        if safe_merge:
            self.check_finite_merge(merged)
        self.untie_before_merge()
        weight = self.base_layer.weight
        weight.copy_(merged.to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the adapter from the base weight again."""
        if not self.merged:
            warnings.warn(f"{type(self).__name__} is not merged; nothing to do", stacklevel=2)
            return
        weight = self.base_layer.weight
        weight.copy_(self._with_delta(-1.0).to(weight.dtype))
        self.merged = False
