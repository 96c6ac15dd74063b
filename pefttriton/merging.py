"""Merge/unmerge shared by the adapter layers: ``W = W0 + delta_weight()``, safe merging, tied weights."""

import warnings

import torch
from torch import nn


def check_finite_merge(layer: nn.Module, merged: torch.Tensor) -> None:
    """PEFT's ``safe_merge``: refuse to write a merged weight holding NaN or Inf."""
    if not torch.isfinite(merged).all():
        raise ValueError(
            f"NaN or Inf in the merged weight of this {type(layer).__name__}: the adapter seems to be broken; "
            "the base weight was left unchanged"
        )


def untie_before_merge(layer: nn.Module) -> None:
    """Give ``layer.base_layer`` its own copy of a weight it shares with other modules.

    Merging writes into the base weight in place. When that weight is tied to another parameter
    (GPT-2's ``lm_head`` and ``wte``), the other module would silently change too; the model
    surgery records such ties in ``layer.tied_weight_names``. The layer then merges into a copy, so
    the merged model computes what the adapted model did, and the tie is gone (a warning says so).
    """
    tied = getattr(layer, "tied_weight_names", None)
    if not tied:
        return
    weight = layer.base_layer.weight
    warnings.warn(
        f"{type(layer).__name__}: the base weight is tied to {tied}; merging into a copy so that those stay "
        "unchanged. The weights are no longer tied (one more copy in memory and in saved checkpoints).",
        stacklevel=3,
    )
    layer.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    layer.tied_weight_names = []


class AdditiveMergeMixin:
    """For an ``nn.Module`` with ``base_layer``, ``merged`` and ``delta_weight()``.

    The delta is added in its own dtype (fp32, or fp64 for an fp64 layer) and the result cast back
    to the weight's dtype, so 16-bit weights are not merged in 16-bit arithmetic.
    """

    def _with_delta(self, sign: float) -> torch.Tensor:
        delta = self.delta_weight().detach()
        return self.base_layer.weight.detach().to(delta.dtype) + sign * delta

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Add the adapter into the base weight; forward then runs the plain base layer.

        Args:
            safe_merge: check the merged weight for NaN/Inf first and raise ``ValueError``, leaving
                the base weight unchanged (PEFT's ``safe_merge``).
        """
        if self.merged:
            warnings.warn(f"{type(self).__name__} is already merged; nothing to do", stacklevel=2)
            return
        merged = self._with_delta(1.0)
        if safe_merge:
            check_finite_merge(self, merged)
        untie_before_merge(self)
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
