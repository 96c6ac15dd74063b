"""Per call: ``pefttriton.accelerate`` on one PEFT layer against the same PEFT layer left plain.

Two kinds of rows, each accelerated vs plain PEFT, forward + backward with ``x`` requiring grad,
fp32, timed interleaved in one process (:func:`bench.measure.time_interleaved`):

* **overhead**: a tiny layer (16x16, r=4, 4 tokens), where the arithmetic costs next to nothing,
  so ``accelerated - PEFT`` per call (microseconds, the median of the per-round differences with
  their quartiles) is what accelerate's forward adds (or saves) per layer and call: eligibility
  checks, the engine call, its autograd node.
* **single layers**: accelerated / PEFT (the median of the per-round ratios with their quartiles)
  on the layers of issue 23: LoRA r=16 at 384x384 and VeRA r=256 at 384x384 and 1024x1024, 256
  tokens (target: at most :data:`TARGET`), and VeRA r=256 at 1024x1024 with 2048 tokens.

Each layer is built the way users build it: ``peft.get_peft_model`` on ``nn.Sequential(nn.Linear)``
with the adapter's tensors set to non-zero random values; the accelerated copy is a deep copy of
the same model passed to :func:`pefttriton.accelerate`, and each row says what its last call ran
(``fused (<path>)``, or PEFT's forward with the reason).
"""

from __future__ import annotations

import copy
import statistics
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from . import measure

TARGET = 1.0  # issue 23: accelerated at most 1.0x PEFT on the single layers at 256 tokens
DTYPE = torch.float32
FAMILIES = {"lora": "LoRA", "vera": "VeRA"}


@dataclass(frozen=True)
class Case:
    family: str  # "lora" | "vera"
    r: int
    in_features: int
    out_features: int
    tokens: int

    @property
    def spec(self) -> str:
        return f"{self.family}:{self.r}:{self.in_features}x{self.out_features}:{self.tokens}"


OVERHEAD = (Case("lora", 4, 16, 16, 4), Case("vera", 4, 16, 16, 4))
SINGLE_LAYERS = (
    Case("lora", 16, 384, 384, 256),
    Case("vera", 256, 384, 384, 256),
    Case("vera", 256, 1024, 1024, 256),
    Case("vera", 256, 1024, 1024, 2048),
)
DEFAULT_SPEC = ",".join(case.spec for case in SINGLE_LAYERS)


def parse(text: str) -> tuple[Case, ...]:
    """``"lora:16:384x384:256,vera:256:1024x1024:2048"`` -> cases; ``"none"`` -> ()."""
    if text.strip() == "none":
        return ()
    out = []
    for item in text.split(","):
        try:
            family, r, shape, tokens = item.strip().split(":")
            n, m = shape.split("x")
            case = Case(family, int(r), int(n), int(m), int(tokens))
        except ValueError:
            raise ValueError(f"a per-call case is family:r:INxOUT:tokens (e.g. lora:16:384x384:256), got {item!r}") from None
        if family not in FAMILIES:
            raise ValueError(f"per-call family must be one of {sorted(FAMILIES)}, got {family!r}")
        out.append(case)
    return tuple(out)


def peft_model(case: Case, device: torch.device, dtype: torch.dtype = DTYPE, seed: int = 0) -> nn.Module:
    """``get_peft_model(nn.Sequential(nn.Linear(in, out)), config)``, adapter tensors non-zero random."""
    from peft import LoraConfig, VeraConfig, get_peft_model

    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(case.in_features, case.out_features))
    if case.family == "lora":
        config = LoraConfig(r=case.r, lora_alpha=2 * case.r, lora_dropout=0.0, target_modules=["0"])
    else:
        config = VeraConfig(r=case.r, vera_dropout=0.0, projection_prng_key=seed, target_modules=["0"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # LoRA's B and VeRA's lambda_b start at zero: random, like a trained adapter
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    return model.to(device=device, dtype=dtype).train()


def _layer(model: nn.Module) -> nn.Module:
    return model.base_model.model[0]


def _ran(model: nn.Module) -> str:
    import pefttriton

    last = pefttriton.acceleration_report(model).last
    return next(iter(last.values()), "not accelerated")


def measure_case(case: Case, kind: str, device: torch.device, rounds: int, min_seconds: float,
                 on_round=None) -> dict:
    """One row: the plain PEFT layer and its accelerated copy, timed interleaved."""
    import pefttriton

    row = {"kind": kind, "family": case.family, "label": FAMILIES[case.family], "in_features": case.in_features,
           "out_features": case.out_features, "r": case.r, "tokens": case.tokens, "dtype": "fp32",
           "device": device.type, "threads": torch.get_num_threads(), "status": "ok"}
    try:
        plain = peft_model(case, device)
        accelerated = copy.deepcopy(plain)
        pefttriton.accelerate(accelerated)
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(case.tokens, case.in_features, generator=gen).to(device).requires_grad_(True)
        grad_y = torch.randn(case.tokens, case.out_features, generator=gen).to(device)
        _, step_plain = measure.step_functions(_layer(plain), x, grad_y)
        _, step_acc = measure.step_functions(_layer(accelerated), x, grad_y)
        samples = measure.time_interleaved({"peft": step_plain, "accelerated": step_acc}, device, rounds,
                                           min_seconds, on_round=on_round)
        row["accelerated_ran"] = _ran(accelerated)
    except Exception as exc:  # noqa: BLE001 - reported in the table and the exit code, never hidden
        row["status"] = f"error: {type(exc).__name__}: {exc}"
        return row
    peft_s, acc_s = samples["peft"], samples["accelerated"]
    q1, diff, q3 = measure.quartiles(measure.per_round(acc_s, peft_s, lambda a, p: (a - p) * 1e6))
    ratio = measure.round_ratios(acc_s, peft_s)
    row.update({
        "peft_us": statistics.median(peft_s) * 1e6, "accelerated_us": statistics.median(acc_s) * 1e6,
        "peft_us_samples": [s * 1e6 for s in peft_s], "accelerated_us_samples": [s * 1e6 for s in acc_s],
        "overhead_us": diff, "overhead_us_q1": q1, "overhead_us_q3": q3, "overhead_us_spread": (q3 - q1) / 2,
        "ratio": ratio["median"], "ratio_q1": ratio["q1"], "ratio_q3": ratio["q3"], "ratio_spread": ratio["spread"],
    })
    return row


def probe() -> str | None:
    """None when PEFT can be imported, else why not."""
    try:
        import peft  # noqa: F401
    except ImportError as exc:
        return f"not available ({type(exc).__name__}: {exc})"
    return None


def measure_all(cases: tuple[Case, ...], device: torch.device, rounds: int, min_seconds: float, bar=None) -> dict:
    """The per-call section of the main job's JSON: ``overhead`` rows (the tiny layers of
    :data:`OVERHEAD`) and ``single_layers`` rows (``cases``); ``unavailable`` says why none ran."""
    on_round = (lambda: bar.update(1)) if bar is not None else None
    out = {"dtype": "fp32", "device": device.type, "threads": torch.get_num_threads(), "rounds": rounds,
           "min_seconds": min_seconds, "target": TARGET, "overhead": [], "single_layers": [],
           "unavailable": probe()}
    if out["unavailable"] is not None:
        if bar is not None:
            bar.update(len(OVERHEAD + cases) * rounds)
        return out
    for kind, group in (("overhead", OVERHEAD), ("single_layers", cases)):
        for case in group:
            if bar is not None:
                bar.set_postfix_str(f"per call: {FAMILIES[case.family]} r={case.r} {case.in_features}x"
                                    f"{case.out_features} N={case.tokens}")
            out[kind].append(measure_case(case, kind, device, rounds, min_seconds, on_round))
    return out
