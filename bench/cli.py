"""The main job: ``python -m bench``, fused vs unfused on whatever device exists.

Runs every implementation of :mod:`bench.cases` on a grid of shapes (short by default, ``--full``
for the whole grid), each fused adapter under ``auto`` and under every strategy the device and
dtype allow, prints two tables in 100 columns (fused with auto vs unfused: time ratio,
saved-memory ratio; auto against the fastest strategy), and writes into the results folder
(default ``./results`` of the current directory):

* ``bench-<device>.json``: every measurement, each labelled with device, backend, strategy and the
  path it took, the comparison rows, auto against the best strategy per shape, the roofline model
  of every op, what was not available and why;
* ``bench-<device>.png``: step time and bytes saved for backward against tokens, the step-time
  ratios fused / unfused and auto / best with their noise as error bars;
* ``roofline-<device>.md``: flops and minimum bytes moved per op, fused vs unfused.

Then, per call (:mod:`bench.per_call`, ``--per-call``): ``pefttriton.accelerate`` on one PEFT
layer against the same layer plain, fp32: the overhead per call on a tiny layer (microseconds) and
accelerated / PEFT on the single layers of issue 23. The console ends with the machine's load
average. The exit status is 1 when something requested could not be measured (an implementation
failing on a shape, a baseline that cannot be imported, the per-call rows), and the last lines say
why; an adapter of pefttriton's registry that does not build is reported and skipped.

``--readme README.md`` then renders the README's figures from the JSON (:mod:`bench.readme`).
Installed, the same job is ``python -m pefttriton.bench``. This module is the command line;
:mod:`bench.run` measures and :mod:`bench.report` reports.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from . import cases, per_call, readme, report, run, vera_bank


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {__package__}", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available, else the CPU (default)")
    p.add_argument("--full", action="store_true", help="the whole grid of shapes instead of the short run")
    p.add_argument("--out", default="results", help="results folder (default ./results)")
    p.add_argument("--tokens", help="comma-separated token counts, replacing the suite's")
    p.add_argument("--layers", help="comma-separated in x out layer shapes, e.g. 1024x1024,1024x2752")
    p.add_argument("--dtypes", help="comma-separated dtypes: fp32, fp16, bf16")
    p.add_argument("--vera-r", help="comma-separated VeRA ranks")
    p.add_argument("--lora-r", help="comma-separated ranks of LoRA, Deep LoRA and LoRMA")
    p.add_argument("--impls", help=f"comma-separated subset of: {', '.join(cases.IMPLS)}")
    p.add_argument("--rounds", type=int, help="timing rounds per implementation (default 11 on CPU, 10 on GPU)")
    p.add_argument("--min-seconds", type=float, help="minimum length of one timing sample")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is none anyway when stderr is not a terminal)")
    p.add_argument("--per-call", default=per_call.DEFAULT_SPEC, metavar="CASES",
                   help="single layers timed accelerated vs plain PEFT, comma-separated family:r:INxOUT:tokens "
                        f"(default {per_call.DEFAULT_SPEC}), with the overhead per call on a tiny layer; "
                        "'none': no per-call rows")
    p.add_argument("--vera-bank", action="store_true",
                   help="also time a batch mixing 64 VeRA adapters against one adapter and PEFT (bench/vera_bank.py)")
    p.add_argument("--readme", metavar="README.md",
                   help="then render the block between the benchmark markers of this file from the JSON written")
    return p.parse_args(argv)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _load_average() -> float | None:
    """The machine's 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None

def main(argv: list[str] | None = None) -> int:
    """Runs the job; returns 0, or 1 when something requested could not be measured (see the module)."""
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    kind = "full" if args.full else "short"
    suite = cases.suite(device, kind)
    ranks = dict(suite.ranks)
    if args.vera_r:
        ranks["vera"] = _ints(args.vera_r)
    if args.lora_r:
        ranks.update({fam: _ints(args.lora_r) for fam in ranks if fam != "vera"})
    suite = cases.Suite(
        layers=tuple(tuple(int(v) for v in s.split("x")) for s in args.layers.split(",")) if args.layers else suite.layers,
        tokens=_ints(args.tokens) if args.tokens else suite.tokens,
        dtypes=tuple(cases.parse_dtype(d) for d in args.dtypes.split(",")) if args.dtypes else suite.dtypes,
        ranks=ranks,
    )
    names = args.impls.split(",") if args.impls else list(cases.IMPLS)
    unknown = [n for n in names if n not in cases.IMPLS]
    if unknown:
        raise SystemExit(f"unknown --impls {unknown}; choose from {list(cases.IMPLS)}")
    try:
        per_call_cases = per_call.parse(args.per_call)
    except ValueError as exc:
        raise SystemExit(f"--per-call: {exc}") from None
    rounds = args.rounds or (10 if device.type == "cuda" else 11)
    min_seconds = args.min_seconds if args.min_seconds is not None else (0.05 if device.type == "cuda" else 0.02)

    dev_name = run.device_name(device)
    print(report.wrap(f"pefttriton benchmark on {device.type.upper()}: {dev_name}"))
    if device.type == "cpu":
        print(report.wrap("CPU run: fused layers run pefttriton's PyTorch strategies (lean, weight); every figure "
                          "below is a CPU figure, not a GPU one."))

    unavailable: dict[str, str] = {}
    available: dict[str, cases.Impl] = {}
    for name in names:
        reason = cases.probe(cases.IMPLS[name])
        if reason is None:
            available[name] = cases.IMPLS[name]
        else:
            unavailable[name] = reason
            print(report.wrap(f"  {cases.IMPLS[name].label}: {reason}", "    "))

    entries = {dt: run.entries(suite, available, device, dt) for dt in suite.dtypes}
    groups = [(dt, n, m, N) for dt in suite.dtypes for (n, m) in suite.layers for N in suite.tokens]
    want_calls = args.per_call.strip() != "none"
    per_call_rounds = (len(per_call.OVERHEAD) + len(per_call_cases)) * rounds if want_calls else 0
    bar = run.progress(sum(len(entries[g[0]]) + rounds for g in groups) + per_call_rounds, not args.no_progress,
                       f"bench {device.type}")
    load_start = _load_average()
    records: list[dict] = []
    calls = None
    try:
        for dt, n, m, N in groups:
            records += run.measure_group(device, dt, n, m, N, entries[dt], rounds, min_seconds, bar)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if want_calls:
            calls = per_call.measure_all(per_call_cases, device, rounds, min_seconds, bar)
    finally:
        bar.close()
    # The 1-minute load average before and after: other work on a shared machine disturbs CPU timings.
    run_meta = {"versions": run.versions(), "torch_threads": torch.get_num_threads(), "rounds": rounds,
                "min_seconds": min_seconds, "load_average": [load_start, _load_average()],
                "cpu_count": os.cpu_count()}
    out = Path(args.out)
    code = report.write(out, device, dev_name, kind, list(sys.argv[1:] if argv is None else argv), run_meta, suite,
                        unavailable, records, per_call=calls, requested=names)
    if args.vera_bank:
        (n, m), N, r = suite.layers[0], max(suite.tokens), suite.ranks["vera"][0]
        record = vera_bank.measure_vera_bank(device, suite.dtypes[0], N, n, m, r, rounds=rounds,
                                             min_seconds=max(min_seconds, 0.05))
        print(vera_bank.format_record(record))
        (out / f"vera-bank-{device.type}.json").write_text(json.dumps(record, indent=1))
    if args.readme:
        readme.update(Path(args.readme), out / f"bench-{device.type}.json")
        print(f"Rendered the benchmark block of:\n  {args.readme}")
    return code
