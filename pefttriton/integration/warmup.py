"""``pefttriton.warmup``: make every per-shape choice of a model's fused layers before capturing it.

The fused layers choose per shape: the ``auto`` strategy (by its cost model, or by timing the
candidates when :func:`pefttriton.set_strategy_autotune` is on) and Triton's autotuner (a tile
config per token bucket). Timing cannot run while a CUDA graph is captured (``torch.cuda.graph``,
``torch.compile(mode="reduce-overhead")``): a capture then takes the cost model's strategy and an
untuned tile config. Running the model once on the shapes the graph will hold, before capturing,
makes those choices measured ones.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_flatten


def warmup(model: nn.Module, *args, backward: bool = True, **kwargs) -> None:
    """Run ``model(*args, **kwargs)`` once, and a backward unless ``backward=False``, leaving no trace.

    Args:
        model: any module holding fused layers (pefttriton's or PEFT's after ``accelerate``).
        args, kwargs: inputs of the shapes (token counts, dtypes) the captured graph will see.
        backward: also run the backward (of the sum of every floating output that requires grad),
            so that the backward's kernels are tuned too; use False for inference graphs.

    Gradients are left as they were: every ``.grad`` of the model's parameters and of the input
    tensors is restored afterwards (a training step is not taken). Run it outside the capture,
    on the stream the capture will use.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(backward, bool):
        raise TypeError(f"backward must be a bool, got {backward!r}")
    inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    leaves = [p for p in model.parameters()] + [t for t in inputs if t.requires_grad]
    kept = [(t, t.grad) for t in leaves]
    for t in leaves:  # detached, so that the backward below accumulates into fresh tensors, not these
        t.grad = None
    try:
        with torch.set_grad_enabled(backward and torch.is_grad_enabled()):
            out = model(*args, **kwargs)
            if backward:
                roots = [t for t in tree_flatten(out)[0]
                         if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point()]
                if roots:
                    torch.autograd.backward([t.float().sum() for t in roots])
    finally:
        for t, grad in kept:
            t.grad = grad
