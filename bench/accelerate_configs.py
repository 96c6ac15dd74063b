"""PEFT as people configure it, accelerated: saved bytes and step time against plain PEFT.

    python -m bench.accelerate_configs [--dtypes fp32,bf16] [--rounds 7] [--tokens 2048]
                                       [--threads 2] [--out results/cpu] [--quick]

The model of issue 21: a Llama built from a ``LlamaConfig`` (hidden 512, intermediate 1376, 2
layers, 8 heads; no download), PEFT on ``target_modules="all-linear"`` (all 7 projections), in
training mode. For each configuration (LoRA dropout 0.05 and 0.1, rsLoRA, lora_bias, DoRA, two
active adapters, VeRA r=256 with dropout 0.1) and dtype:

* saved-for-backward bytes of the whole model (exact: the distinct storages autograd packs in one
  forward of 2 x 256 tokens, parameters and buffers left out), PEFT's and accelerated;
* step time (forward + backward, ``tokens`` per step), PEFT's and accelerated, interleaved in one
  process (:func:`bench.measure.time_interleaved`), the ratio per round as median and half the
  interquartile range;
* whether every targeted layer ran fused (the acceleration report's last calls).

Writes ``accelerate-configs.json`` and ``accelerate-configs.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import warnings
from pathlib import Path

import torch

from . import measure
from .run import device_name

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def configs() -> dict:
    """name -> (PEFT config, second adapter's config or None)."""
    from peft import LoraConfig, VeraConfig

    lora = dict(r=16, lora_alpha=32, target_modules="all-linear")
    return {
        "LoRA r=16, dropout 0": (LoraConfig(**lora), None),
        "LoRA r=16, dropout 0.05": (LoraConfig(lora_dropout=0.05, **lora), None),
        "LoRA r=16, dropout 0.1": (LoraConfig(lora_dropout=0.1, **lora), None),
        "rsLoRA r=16, dropout 0.05": (LoraConfig(lora_dropout=0.05, use_rslora=True, **lora), None),
        "LoRA r=16, lora_bias": (LoraConfig(lora_bias=True, **lora), None),
        "DoRA r=16": (LoraConfig(use_dora=True, **lora), None),
        "two LoRA adapters (r=16, r=8), dropout 0.05": (
            LoraConfig(lora_dropout=0.05, **lora),
            LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear"),
        ),
        "VeRA r=256, dropout 0.1": (VeraConfig(r=256, vera_dropout=0.1, target_modules="all-linear"), None),
    }


def llama(dtype: torch.dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=8)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def peft_model(base, config, second):
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, config)
        if second is not None:
            model.add_adapter("second", second)
            model.base_model.set_adapter(["default", "second"])
    with torch.no_grad():  # B / lambda_b start at zero: random values, so every path does real work
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_" in name or "lambda" in name:
                p.requires_grad_(True)
                p.copy_((0.02 * torch.randn(p.shape, generator=gen)).to(p.dtype))
    return model.train()


def saved_bytes(model, ids) -> int:
    """Bytes autograd keeps for backward from one forward, parameters and buffers left out."""
    storages, _ = measure.saved_storages(lambda: model(input_ids=ids).logits)
    own = {(str(t.device), t.untyped_storage().data_ptr()) for t in (*model.parameters(), *model.buffers())}
    return sum(n for key, n in storages.items() if key not in own)


def measure_configs(dtypes=("fp32", "bf16"), rounds: int = 7, tokens: int = 2048, device=None, names=None) -> list[dict]:
    import pefttriton

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for dtype_name in dtypes:
        base = llama(DTYPES[dtype_name], device)
        for name, (config, second) in configs().items():
            if names is not None and name not in names:
                continue
            plain = peft_model(copy.deepcopy(base), copy.deepcopy(config), copy.deepcopy(second))
            fused = copy.deepcopy(plain)
            report = pefttriton.accelerate(fused)
            gen = torch.Generator().manual_seed(2)
            small = torch.randint(0, 256, (2, 256), generator=gen).to(device)
            step_ids = torch.randint(0, 256, (max(1, tokens // 256), 256), generator=gen).to(device)
            row = {"config": name, "dtype": dtype_name, "layers": len(report.fused) + len(report.fallback),
                   "peft_saved_bytes": saved_bytes(plain, small), "accelerated_saved_bytes": saved_bytes(fused, small)}
            last = pefttriton.acceleration_report(fused).last
            row["fused_layers"] = sum(what.startswith("fused") for what in last.values())
            row["paths"] = sorted({what for what in last.values()})
            row["saved_ratio"] = row["accelerated_saved_bytes"] / row["peft_saved_bytes"]

            def step(model):
                def run():
                    model(input_ids=step_ids).logits.float().mean().backward()
                    model.zero_grad(set_to_none=True)
                return run

            samples = measure.time_interleaved({"peft": step(plain), "accelerated": step(fused)}, device, rounds, 0.05)
            ratios = [a / p for a, p in zip(samples["accelerated"], samples["peft"])]
            row.update(peft_step_s=statistics.median(samples["peft"]), accelerated_step_s=statistics.median(samples["accelerated"]),
                       step_ratio=statistics.median(ratios), step_ratio_spread=measure.relative_spread(ratios) * statistics.median(ratios),
                       tokens_per_step=int(step_ids.numel()))
            rows.append(row)
            print(f"{dtype_name} {name}: saved {row['saved_ratio']:.3f}x PEFT, step {row['step_ratio']:.2f} "
                  f"± {row['step_ratio_spread']:.2f}, fused {row['fused_layers']} of {row['layers']}", flush=True)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# accelerate on PEFT configurations ({meta['device']})", "",
             f"Llama hidden 512, intermediate 1376, 2 layers, 8 heads, all-linear, training; saved bytes at 2 x 256 "
             f"tokens (exact), step time at {rows[0]['tokens_per_step'] if rows else '?'} tokens per step, "
             f"{meta['threads']} threads, interleaved ({meta['rounds']} rounds).", "",
             "| dtype | config | fused | PEFT saved MB | accelerated saved MB | saved ratio | step ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['config']} | {r['fused_layers']} of {r['layers']} | "
                     f"{r['peft_saved_bytes'] / 1e6:.1f} | {r['accelerated_saved_bytes'] / 1e6:.1f} | "
                     f"{r['saved_ratio']:.3f} | {r['step_ratio']:.2f} ± {r['step_ratio_spread']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.accelerate_configs", description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results")
    p.add_argument("--quick", action="store_true", help="one dtype (fp32), 256 tokens, 2 rounds: the code path only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtypes = ("fp32",) if args.quick else tuple(args.dtypes.split(","))
    rounds, tokens = (2, 256) if args.quick else (args.rounds, args.tokens)
    rows = measure_configs(dtypes, rounds, tokens)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = {"device": device_name(device), "threads": args.threads, "rounds": rounds, "torch": torch.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accelerate-configs.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1), encoding="utf-8")
    text = markdown(rows, meta)
    (out / "accelerate-configs.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
