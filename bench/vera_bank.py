"""Serving many VeRA adapters: one batch mixing K adapters against one adapter and PEFT's ways.

    python -m bench.vera_bank [--tokens 4096] [--features 1024x1024] [--r 256] [--adapters 64]
                              [--dtype fp32] [--threads 2] [--rounds 11] [--json FILE]

Inference (``torch.no_grad``) on one layer, every implementation on the same tokens, timed
round-robin (:func:`bench.measure.time_interleaved`) so that drift of the machine hits all alike:

* ``bank_mixed``: a :class:`~pefttriton.integration.vera_bank.VeRABank` with K adapters, rows shuffled over all
  of them (N / K rows each);
* ``bank_single``: the same bank and tokens, every row on adapter 0;
* ``fused_single``: one adapter in :class:`~pefttriton.FusedVeRALinear` (the single-adapter layer),
  strategy ``auto``; in float32 on the CPU that is the weight-side strategy (``W + delta W`` formed
  once, one GEMM: ``2mrn`` instead of ``2Nr(n + m)`` adapter flops), which per-row adapters cannot
  use; ``fused_single_lean``: the same layer on the activation side (strategy ``lean``), the
  bank's own algorithm;
* ``peft_vera_loop``: PEFT VeRA holding K adapters, ``set_adapter`` and a forward per sub-batch,
  scattered back (PEFT VeRA has no mixed-batch forward; the row groups are precomputed, not timed);
* ``peft_vera_single``: that PEFT layer on all tokens with one adapter;
* ``peft_lora_mixed``: PEFT LoRA (rank ``lora_r``) holding K adapters, its mixed-batch forward
  (``adapter_names=``, one name per row); ``peft_lora_single``: one LoRA adapter on all tokens.

Ratios are per round (each round times every implementation once), reported as median and half
the interquartile range. Bytes per adapter: the growth of the layer's resident parameters and
buffers (each storage once) from 1 to K adapters, divided by K - 1.

:func:`measure_vera_bank` is what the main job (``python -m bench``) calls; the record it returns is
plain JSON.
"""

import argparse
import json
import statistics
import sys

import torch
from torch import nn

from . import cases, measure
from .baselines import _Holder
from .run import device_name

IMPLS = ("bank_mixed", "bank_single", "fused_single", "fused_single_lean", "peft_vera_loop", "peft_vera_single",
         "peft_lora_mixed", "peft_lora_single")
RATIOS = {  # name -> (numerator, denominator)
    "mixed_over_single_bank": ("bank_mixed", "bank_single"),
    "mixed_over_single_fused": ("bank_mixed", "fused_single"),
    "mixed_over_single_fused_lean": ("bank_mixed", "fused_single_lean"),
    "peft_vera_loop_over_mixed": ("peft_vera_loop", "bank_mixed"),
    "peft_lora_mixed_over_mixed": ("peft_lora_mixed", "bank_mixed"),
    "peft_vera_single_over_mixed": ("peft_vera_single", "bank_mixed"),
    "peft_lora_mixed_over_peft_lora_single": ("peft_lora_mixed", "peft_lora_single"),
}


def resident_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers, each storage once."""
    storages = {}
    for t in (*module.parameters(), *module.buffers()):
        storages[(str(t.device), t.untyped_storage().data_ptr())] = t.untyped_storage().nbytes()
    return sum(storages.values())


def _names(K: int) -> list[str]:
    return [f"a{k}" for k in range(K)]


def make_bank(base: nn.Linear, r: int, K: int, seed: int = 0):
    from pefttriton.integration.vera_bank import VeRABank

    gen = torch.Generator().manual_seed(seed)
    bank = VeRABank(base, r, projection_seed=seed)
    for name in _names(K):
        bank.add_adapter(name, 0.1 + 0.01 * torch.randn(r, generator=gen), 0.5 * torch.randn(base.out_features, generator=gen))
    return bank


def _peft_model(base: nn.Linear, K: int, config_of) -> nn.Module:
    """A PEFT model around ``base`` holding adapters a0..a{K-1}, lambdas / lora_B set non-zero."""
    import peft

    model = peft.get_peft_model(_Holder(base), config_of(), adapter_name="a0")
    for name in _names(K)[1:]:
        model.add_adapter(name, config_of())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "vera_lambda" in pname or "lora_B" in pname:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen).to(p.dtype))
    return model.to(base.weight.device).eval()


def build(device, dtype, N, n, m, r, K, lora_r, *, peft_vera=True, peft_lora=True):
    """``({name: forward function}, {name: bytes per adapter}, check)`` for the implementations."""
    import copy

    import peft

    import pefttriton

    torch.manual_seed(0)
    base = nn.Linear(n, m, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(N, n, device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(2)
    ids = (torch.arange(N) % K)[torch.randperm(N, generator=gen)].to(device)  # every adapter, rows shuffled
    names = [f"a{k}" for k in ids.tolist()]
    groups = {name: (ids == k).nonzero().flatten() for k, name in enumerate(_names(K))}

    bank = make_bank(copy.deepcopy(base), r, K)
    single_ids = torch.zeros(N, dtype=torch.int64, device=device)
    fused = pefttriton.FusedVeRALinear(copy.deepcopy(base), r, projections=bank.projections)
    with torch.no_grad():
        fused.lambda_d.copy_(bank.lambda_d[0])
        fused.lambda_b.copy_(bank.lambda_b[0])
    def fused_lean():
        with pefttriton.use_strategy("lean"):
            return fused(x)

    fns = {
        "bank_mixed": lambda: bank(x, adapter_ids=ids),
        "bank_single": lambda: bank(x, adapter_ids=single_ids),
        "fused_single": lambda: fused(x),
        "fused_single_lean": fused_lean,
    }
    per_adapter = {"bank_mixed": (resident_bytes(bank) - resident_bytes(make_bank(copy.deepcopy(base), r, 1))) / (K - 1)}
    checks = {}
    if peft_vera:
        def vera_config():
            return peft.VeraConfig(r=r, target_modules=["layer"], projection_prng_key=0, vera_dropout=0.0)

        vera = _peft_model(copy.deepcopy(base), K, vera_config)
        vera_layer = vera.base_model.model.layer

        def vera_loop():
            out = torch.empty(N, m, device=device, dtype=dtype)
            for name, rows in groups.items():
                vera.base_model.set_adapter(name)
                out[rows] = vera_layer(x[rows])
            return out

        def vera_single():
            vera.base_model.set_adapter("a0")
            return vera_layer(x)

        fns["peft_vera_loop"], fns["peft_vera_single"] = vera_loop, vera_single
        small = _peft_model(copy.deepcopy(base), 1, vera_config)
        per_adapter["peft_vera_loop"] = (resident_bytes(vera) - resident_bytes(small)) / (K - 1)
        # The same adapters in the bank: the mixed batch must equal PEFT's loop.
        with torch.no_grad():
            for k, name in enumerate(_names(K)):
                bank.lambda_d[k] = vera_layer.vera_lambda_d[name]
                bank.lambda_b[k] = vera_layer.vera_lambda_b[name]
            expected = vera_loop()
            checks["bank_mixed_vs_peft_vera_loop_rel_err"] = float(
                (bank(x, adapter_ids=ids).double() - expected.double()).abs().max() / expected.double().abs().max()
            )
    if peft_lora:
        def lora_config():
            return peft.LoraConfig(r=lora_r, lora_alpha=lora_r, target_modules=["layer"], lora_dropout=0.0)

        lora = _peft_model(copy.deepcopy(base), K, lora_config)
        lora_layer = lora.base_model.model.layer

        def lora_single():
            lora.base_model.set_adapter("a0")
            return lora_layer(x)

        fns["peft_lora_mixed"] = lambda: lora_layer(x, adapter_names=names)
        fns["peft_lora_single"] = lora_single
        small = _peft_model(copy.deepcopy(base), 1, lora_config)
        per_adapter["peft_lora_mixed"] = (resident_bytes(lora) - resident_bytes(small)) / (K - 1)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    return {name: no_grad(fn) for name, fn in fns.items()}, per_adapter, checks


def _spread(values: list[float]) -> float:
    """Half the interquartile range (absolute)."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q3 - q1) / 2


def measure_vera_bank(
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    tokens: int = 4096,
    in_features: int = 1024,
    out_features: int = 1024,
    r: int = 256,
    adapters: int = 64,
    lora_r: int = 16,
    rounds: int = 11,
    min_seconds: float = 0.05,
    peft: bool = True,
) -> dict:
    """Time every implementation on one shape (see the module docstring); returns a JSON-able record."""
    if adapters < 2:
        raise ValueError(f"adapters must be >= 2 to mix a batch, got {adapters}")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fns, per_adapter, checks = build(device, dtype, tokens, in_features, out_features, r, adapters, lora_r,
                                     peft_vera=peft, peft_lora=peft)
    samples = measure.time_interleaved(fns, device, rounds, min_seconds)
    import pefttriton

    with torch.no_grad():
        fns["bank_mixed"]()
    record = {
        "device": device.type, "device_name": device_name(device), "torch_threads": torch.get_num_threads(),
        "dtype": cases.dtype_name(dtype), "tokens": tokens, "in_features": in_features,
        "out_features": out_features, "r": r, "adapters": adapters, "lora_r": lora_r, "rounds": rounds,
        "bank_path": pefttriton.last_path(),
        "ms": {name: measure.median(s) * 1e3 for name, s in samples.items()},
        "ms_rel_spread": {name: measure.relative_spread(s) for name, s in samples.items()},
        "ratios": {},
        "bytes_per_adapter": per_adapter,
        **checks,
    }
    for label, (num, den) in RATIOS.items():
        if num in samples and den in samples:
            per_round = [a / b for a, b in zip(samples[num], samples[den])]
            record["ratios"][label] = {"median": statistics.median(per_round), "half_iqr": _spread(per_round)}
    return record


def format_record(record: dict) -> str:
    title = (
        f"VeRA bank on {record['device_name']} ({record['device']}), {record['dtype']}, N={record['tokens']}, "
        f"{record['in_features']}x{record['out_features']}, r={record['r']}, {record['adapters']} adapters "
        f"(PEFT LoRA r={record['lora_r']}), bank path {record['bank_path']}"
    )
    lines = [title, f"{'implementation':20} {'ms':>9} {'noise':>7}"]
    for name, ms in record["ms"].items():
        lines.append(f"{name:20} {ms:9.2f} {100 * record['ms_rel_spread'][name]:6.1f}%")
    lines.append("ratios (per round: median +- half IQR)")
    for label, r in record["ratios"].items():
        lines.append(f"  {label:40} {r['median']:.3f} +- {r['half_iqr']:.3f}")
    lines.append("bytes per adapter resident (one layer)")
    for name, b in record["bytes_per_adapter"].items():
        lines.append(f"  {name:20} {b:,.0f}")
    for key, value in record.items():
        if key.endswith("_rel_err"):
            lines.append(f"{key}: {value:.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {__package__}.vera_bank", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--features", default="1024x1024", help="in x out")
    p.add_argument("--r", type=int, default=256)
    p.add_argument("--adapters", type=int, default=64)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--min-seconds", type=float, default=0.05)
    p.add_argument("--no-peft", action="store_true", help="only the bank and the single-adapter layer")
    p.add_argument("--json", help="also write the record to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = None if args.device == "auto" else torch.device(args.device)
    n, m = (int(v) for v in args.features.split("x"))
    record = measure_vera_bank(device, cases.parse_dtype(args.dtype), args.tokens, n, m, args.r, args.adapters,
                               args.lora_r, args.rounds, args.min_seconds, peft=not args.no_peft)
    print(format_record(record))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
