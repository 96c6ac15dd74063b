"""What is benchmarked: the implementations (fused adapters and baselines) and the shapes.

The fused implementations are the adapters of pefttriton's registry; an implementation that fails
to build is reported as "not available" with the reason, never silently left out. Each fused
adapter is timed under every strategy of :func:`strategies`: ``auto`` and each path the backend
allows for the device and dtype (:func:`pefttriton.ops.backend.candidates`).
"""

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from . import baselines


@dataclass(frozen=True)
class Impl:
    """One implementation: ``make(base_layer, r)`` returns the module to time."""

    name: str
    family: str  # "vera" | "lora" | "deep_lora" | "lorma": selects the rank and the roofline model
    fused: bool
    label: str
    make: Callable[[nn.Linear, int], nn.Module]
    short: str = ""  # the table's name: the family for a fused adapter, the kind of baseline otherwise

    @property
    def short_name(self) -> str:
        return self.short or (self.family if self.fused else self.label)


def _fused(adapter: str) -> Callable[[nn.Linear, int], nn.Module]:
    """A factory for the registered adapter ``adapter``, built with its defaults."""

    def make(base: nn.Linear, r: int) -> nn.Module:
        from pefttriton.adapters.registry import get_adapter

        layer = get_adapter(adapter).layer_class(base, r)
        with torch.no_grad():  # zero-initialised factors (LoRA's B): non-zero like a trained layer, same work
            for p in layer.adapter_parameters().values():
                if not p.any():
                    p.normal_(0.0, r**-0.5)
        return layer

    return make


def _fused_impls() -> tuple[Impl, ...]:
    """One fused implementation per adapter of pefttriton's registry, in registration order."""
    from pefttriton.adapters.registry import adapters

    return tuple(
        Impl(f"fused_{name}", name, True, entry.layer_class.__name__, _fused(name)) for name, entry in adapters().items()
    )


IMPLS: dict[str, Impl] = {
    impl.name: impl
    for impl in (
        *_fused_impls(),
        Impl("peft_vera", "vera", False, "PEFT VeRA", baselines.peft_vera_layer, "PEFT"),
        Impl("peft_lora", "lora", False, "PEFT LoRA", baselines.peft_lora_layer, "PEFT"),
        Impl("torch_lora", "lora", False, "unfused LoRA (torch)", baselines.TorchLoRALinear, "torch"),
        Impl("lean_lora", "lora", False, "lean LoRA (cuBLAS, custom autograd)", baselines.LeanLoRALinear, "lean"),
        Impl("lean_vera", "vera", False, "lean VeRA (cuBLAS, custom autograd)", baselines.LeanVeRALinear, "lean"),
        Impl("torch_deep_lora", "deep_lora", False, "unfused Deep LoRA (torch)", baselines.TorchDeepLoRALinear,
             "torch"),
        Impl("torch_lorma", "lorma", False, "unfused LoRMA+ (torch)", baselines.TorchLoRMAPlusLinear, "torch"),
    )
}

# (fused, unfused) rows of the comparison table.
PAIRS: tuple[tuple[str, str], ...] = (
    ("fused_vera", "peft_vera"),
    ("fused_lora", "peft_lora"),
    ("fused_lora", "torch_lora"),
    ("fused_vera", "lean_vera"),
    ("fused_lora", "lean_lora"),
    ("fused_deep_lora", "torch_deep_lora"),
    ("fused_lorma", "torch_lorma"),
)


def probe(impl: Impl) -> str | None:
    """None when ``impl`` builds and runs forward + backward on a tiny CPU layer, else why not."""
    try:
        module = impl.make(nn.Linear(12, 10), 4)
        x = torch.randn(3, 12, requires_grad=True)
        module(x).sum().backward()
    except ImportError as exc:
        return f"not available ({type(exc).__name__}: {exc})"
    except Exception as exc:  # noqa: BLE001 - an adapter still being written must not stop the suite
        return f"not available (fails on a tiny layer: {type(exc).__name__}: {exc})"
    return None


@dataclass(frozen=True)
class Suite:
    """A grid of shapes: every layer x dtype x token count, each family at each of its ranks."""

    layers: tuple[tuple[int, int], ...]  # (in_features, out_features)
    tokens: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    ranks: dict[str, tuple[int, ...]] = field(default_factory=dict)


def _ranks(vera: tuple[int, ...], lora: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """VeRA's ranks for VeRA, LoRA's for every other family (all low-rank updates of LoRA size)."""
    return {family: vera if family == "vera" else lora for family in {impl.family for impl in IMPLS.values()}}


def suite(device: torch.device, kind: str) -> Suite:
    """The shapes of a run: ``kind`` is "short" (the main job's default), "full" or "pytest".

    GPU: 4096x4096 and 4096x11008 layers (attention and MLP of a 7B model), bf16 (and fp16 in
    full), tokens 512 to 16k. CPU: fp32 and smaller layers, so the short run is short (25 s
    measured on two idle Xeon cores); it contains N=4096, n=m=1024, VeRA r=256.
    """
    if kind not in ("short", "full", "pytest"):
        raise ValueError(f"kind must be short, full or pytest, got {kind!r}")
    if device.type == "cuda":
        layers = ((4096, 4096), (4096, 11008))
        if kind == "short":
            return Suite(layers, (512, 2048, 8192), (torch.bfloat16,), _ranks((256,), (16,)))
        tokens = (512, 1024, 2048, 4096, 8192, 16384) if kind == "full" else (512, 2048, 8192, 16384)
        return Suite(layers, tokens, (torch.bfloat16, torch.float16), _ranks((256, 1024), (8, 16)))
    if kind == "short":
        return Suite(((1024, 1024),), (256, 1024, 4096), (torch.float32,), _ranks((256,), (16,)))
    if kind == "full":
        return Suite(((1024, 1024), (1024, 2752)), (256, 512, 1024, 2048, 4096, 8192), (torch.float32,),
                     _ranks((256, 1024), (8, 16)))
    return Suite(((1024, 1024), (1024, 2752)), (512, 2048, 4096), (torch.float32,), _ranks((256,), (16,)))


def strategies(device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
    """The strategies a fused adapter is timed under: ``auto``, then every path the backend in force
    allows for ``device`` and ``dtype`` (CPU fp32: lean, weight; CUDA bf16: fused, split, lean)."""
    from pefttriton.ops.backend import candidates

    return ("auto", *candidates(device, dtype))


@contextlib.contextmanager
def strategy(name: str | None) -> Iterator[None]:
    """Runs the block under pefttriton's strategy ``name`` (a no-op for None: the baselines)."""
    if name is None:
        yield
        return
    from pefttriton import use_strategy

    with use_strategy(name):
        yield


def path_taken(fn: Callable[[], None], name: str | None) -> str | None:
    """Runs ``fn()`` under strategy ``name``; the path its last fused-op call took (None: no call).

    Runs in a copy of the current context, so that a path left by an earlier call cannot be read
    as this one's and nothing leaks out.
    """
    from pefttriton.ops.backend import last_path, record_path

    def run() -> str | None:
        record_path(None)
        with strategy(name):
            fn()
        return last_path()

    return contextvars.copy_context().run(run)


def strategy_label(strategy: str | None, path: str | None) -> str:
    """``"lean"``; ``"auto->weight"`` for auto (or for a strategy the backend ran as another path)."""
    if strategy is None:
        return ""
    return strategy if path in (None, strategy) else f"{strategy}->{path}"


def backend_label(impl: Impl, device: torch.device, strategy: str | None = None, path: str | None = None) -> str:
    """Which code computed a figure: the fused op's strategy and the path it took (Triton or
    PyTorch), or the eager baseline."""
    if not impl.fused:
        return "peft (torch eager)" if impl.name.startswith("peft") else "torch eager"
    from pefttriton.ops.backend import interpreting, uses_triton

    if path is None:
        runtime = "?"
    elif uses_triton(path):
        runtime = "triton-interpreter" if interpreting() else "triton"
    else:
        runtime = "torch"
    return f"pefttriton {strategy_label(strategy, path)} ({runtime})"


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}[dtype]


def parse_dtype(name: str) -> torch.dtype:
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
    if name not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]
