"""Merge/unmerge shared by the additive adapters (VeRA, LoRA, Deep LoRA): ``W = W0 + delta_weight()``."""

import warnings

import torch


class AdditiveMergeMixin:
    """For an ``nn.Module`` with ``base_layer``, ``merged`` and ``delta_weight()``.

    The delta is added in its own dtype (fp32, or fp64 for an fp64 layer) and the result cast back
    to the weight's dtype, so 16-bit weights are not merged in 16-bit arithmetic.
    """

    @torch.no_grad()
    def _add_delta(self, sign: float) -> None:
        weight = self.base_layer.weight
        delta = self.delta_weight()
        weight.copy_((weight.to(delta.dtype) + sign * delta).to(weight.dtype))

    def merge(self) -> None:
        """Add the adapter into the base weight; forward then runs the plain base layer."""
        if self.merged:
            warnings.warn(f"{type(self).__name__} is already merged; nothing to do", stacklevel=2)
            return
        self._add_delta(1.0)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the adapter from the base weight again."""
        if not self.merged:
            warnings.warn(f"{type(self).__name__} is not merged; nothing to do", stacklevel=2)
            return
        self._add_delta(-1.0)
        self.merged = False
