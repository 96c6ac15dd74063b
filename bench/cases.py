"""What is benchmarked: the implementations (fused adapters and baselines) and the shapes.

The fused implementations are the adapters of pefttriton's registry; an implementation that fails
to build is reported as "not available" with the reason, never silently left out.
"""

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from bench import baselines


@dataclass(frozen=True)
class Impl:
    """One implementation: ``make(base_layer, r)`` returns the module to time."""

    name: str
    family: str  # "vera" | "lora" | "deep_lora" | "lorma": selects the rank and the roofline model
    fused: bool
    label: str
    make: Callable[[nn.Linear, int], nn.Module]


def _fused(adapter: str) -> Callable[[nn.Linear, int], nn.Module]:
    """A factory for the registered adapter ``adapter``, built with its defaults."""

    def make(base: nn.Linear, r: int) -> nn.Module:
        from pefttriton.registry import get_adapter

        layer = get_adapter(adapter).layer_class(base, r)
        with torch.no_grad():  # zero-initialised factors (LoRA's B): non-zero like a trained layer, same work
            for p in layer.adapter_parameters().values():
                if not p.any():
                    p.normal_(0.0, r**-0.5)
        return layer

    return make


def _fused_impls() -> tuple[Impl, ...]:
    """One fused implementation per adapter of pefttriton's registry, in registration order."""
    from pefttriton.registry import adapters

    return tuple(
        Impl(f"fused_{name}", name, True, entry.layer_class.__name__, _fused(name)) for name, entry in adapters().items()
    )


IMPLS: dict[str, Impl] = {
    impl.name: impl
    for impl in (
        *_fused_impls(),
        Impl("peft_vera", "vera", False, "PEFT VeRA", baselines.peft_vera_layer),
        Impl("peft_lora", "lora", False, "PEFT LoRA", baselines.peft_lora_layer),
        Impl("torch_lora", "lora", False, "unfused LoRA (torch)", baselines.TorchLoRALinear),
        Impl("lean_lora", "lora", False, "lean LoRA (cuBLAS, custom autograd)", baselines.LeanLoRALinear),
        Impl("lean_vera", "vera", False, "lean VeRA (cuBLAS, custom autograd)", baselines.LeanVeRALinear),
        Impl("torch_deep_lora", "deep_lora", False, "unfused Deep LoRA (torch)", baselines.TorchDeepLoRALinear),
        Impl("torch_lorma", "lorma", False, "unfused LoRMA+ (torch)", baselines.TorchLoRMAPlusLinear),
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


def gemm_modes(device: torch.device) -> tuple[str | None, ...]:
    """The base-GEMM modes a fused adapter is timed in: each Triton mode on CUDA, none on the CPU."""
    if device.type != "cuda":
        return (None,)
    from pefttriton import backend

    return tuple(getattr(backend, "GEMM_MODES", ())) or (None,)


@contextlib.contextmanager
def gemm_mode(mode: str | None) -> Iterator[None]:
    """Runs the block with pefttriton's base-GEMM mode set to ``mode`` (no-op for None)."""
    if mode is None:
        yield
        return
    from pefttriton import backend

    with backend.use_gemm_mode(mode):
        yield


def backend_label(impl: Impl, device: torch.device, mode: str | None) -> str:
    """Which code computed a figure: the fused op's backend, or the eager baseline."""
    if not impl.fused:
        return "peft (torch eager)" if impl.name.startswith("peft") else "torch eager"
    from pefttriton.backend import interpreting, resolve_backend

    name = resolve_backend(device)
    if name == "triton":
        name = "triton-interpreter" if interpreting() else "triton"
        return f"{name} (gemm={mode})" if mode else name
    return "torch (pefttriton CPU path)" if device.type == "cpu" else "torch (pefttriton fallback)"


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}[dtype]


def parse_dtype(name: str) -> torch.dtype:
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
    if name not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]
