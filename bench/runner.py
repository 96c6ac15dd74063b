"""The main job: ``python -m bench``, fused vs unfused on whatever device exists.

Runs every implementation of :mod:`bench.cases` on a grid of shapes (short by default, ``--full``
for the whole grid), prints a table fused vs unfused (time ratio, saved-memory ratio), and writes
into the results folder (default ``./results``):

* ``bench-<device>.json``: every measurement, each labelled with device and backend, the
  comparison rows, the roofline model of every op, what was not available and why;
* ``bench-<device>.png``: step time and bytes saved for backward against tokens;
* ``roofline-<device>.md``: flops and minimum bytes moved per op, fused vs unfused.

CPU figures are labelled as CPU figures everywhere; GPU-only quantities (peak device memory,
CUDA kernel launches) are recorded as null on the CPU, never estimated.
"""

import argparse
import copy
import datetime
import json
import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from bench import cases, measure, roofline

MB = 1e6


def _progress(total: int, enabled: bool, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with transformers; without it, no bar
        enabled = False
        tqdm = None
    if not enabled or tqdm is None:
        class _Silent:
            def update(self, n: int = 1) -> None:
                pass

            def set_postfix_str(self, s: str) -> None:
                pass

            def close(self) -> None:
                pass

        return _Silent()
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {torch.get_num_threads()} threads"


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "peft", "pefttriton"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            out[name] = None
    return out


def _entries(suite: cases.Suite, available: dict[str, cases.Impl], device: torch.device):
    """(impl, r, gemm mode) for every available implementation, fused ones once per GEMM mode."""
    out = []
    for impl in available.values():
        for r in suite.ranks[impl.family]:
            for mode in cases.gemm_modes(device) if impl.fused else (None,):
                out.append((impl, r, mode))
    return out


def measure_group(device, dtype, n, m, N, entries, rounds, min_seconds, bar) -> list[dict]:
    """Every entry on one shape: saved bytes, launches, peak memory, then interleaved timing."""
    torch.manual_seed(0)
    base = nn.Linear(n, m, device=device, dtype=dtype)
    x = torch.randn(N, n, device=device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(N, m, device=device, dtype=dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    records, fwds, steps = [], {}, {}
    for key, (impl, r, mode) in enumerate(entries):
        bar.set_postfix_str(f"N={N} {n}x{m} {impl.label} r={r}" + (f" gemm={mode}" if mode else ""))
        rec = {
            "impl": impl.name, "label": impl.label, "family": impl.family, "fused": impl.fused,
            "device": device.type, "device_name": device_name(device),
            "backend": cases.backend_label(impl, device, mode), "gemm_mode": mode,
            "dtype": cases.dtype_name(dtype), "tokens": N, "in_features": n, "out_features": m, "r": r,
            "status": "ok",
        }
        try:
            with cases.gemm_mode(mode):
                module = impl.make(copy.deepcopy(base), r)
                forward, step = measure.step_functions(module, x, grad_y)
                saved = measure.saved_for_backward(module, x)
                step()  # warm-up before counting: autotuning would launch extra kernels
                with measure.count_triton_launches() as launches:
                    step()
                rec["triton_launches_per_step"] = launches[0] if impl.fused else None
                rec["cuda_kernels_per_step"] = measure.count_cuda_kernels(step, device)
                rec["peak_step_bytes"] = measure.peak_step_bytes(step, device)
            rec["saved_bytes"], rec["saved_bytes_input"], rec["saved_tensors"] = saved.total, saved.input, saved.tensors
            rec["roofline"] = roofline.summary(impl.family, impl.fused, N, n, m, r, elem)

            def in_mode(fn, mode=mode):
                def run():
                    with cases.gemm_mode(mode):
                        fn()
                return run

            fwds[key], steps[key] = in_mode(forward), in_mode(step)
        except Exception as exc:  # noqa: BLE001 - reported in the table and the exit code, never hidden
            rec["status"] = f"error: {type(exc).__name__}: {exc}"
        records.append(rec)
        bar.update(1)
    if fwds:
        timed = {("fwd", k): f for k, f in fwds.items()} | {("step", k): f for k, f in steps.items()}
        samples = measure.time_interleaved(timed, device, rounds, min_seconds, on_round=lambda: bar.update(1))
        for key in fwds:
            rec = records[key]
            fwd_s, step_s = measure.median(samples[("fwd", key)]), measure.median(samples[("step", key)])
            rl = rec["roofline"]
            rec.update({
                "fwd_ms": fwd_s * 1e3, "step_ms": step_s * 1e3,
                "fwd_ms_samples": [s * 1e3 for s in samples[("fwd", key)]],
                "step_ms_samples": [s * 1e3 for s in samples[("step", key)]],
                "fwd_ms_min": min(samples[("fwd", key)]) * 1e3, "step_ms_min": min(samples[("step", key)]) * 1e3,
                "step_rel_spread": measure.relative_spread(samples[("step", key)]),
                "fwd_tokens_per_s": N / fwd_s, "step_tokens_per_s": N / step_s,
                # flops of the op as modelled (same math fused or not, except where the fused
                # backward recomputes instead of saving); "achieved" = model flops / measured time
                "fwd_gflops_per_s": rl["forward"]["flops"] / fwd_s / 1e9,
                "step_gflops_per_s": rl["step"]["flops"] / step_s / 1e9,
            })
            if device.type == "cuda":
                rec["fwd_tflops_per_s"] = rec["fwd_gflops_per_s"] / 1e3
                rec["step_tflops_per_s"] = rec["step_gflops_per_s"] / 1e3
    else:
        bar.update(rounds)
    return records


def compare(records: list[dict]) -> list[dict]:
    """Rows fused vs unfused for every pair of :data:`bench.cases.PAIRS` measured on the same shape."""
    ok = [r for r in records if r["status"] == "ok"]
    rows = []
    shape_keys = ("device", "dtype", "tokens", "in_features", "out_features", "r")
    for fused_name, base_name in cases.PAIRS:
        for f in (r for r in ok if r["impl"] == fused_name):
            for b in (r for r in ok if r["impl"] == base_name and all(r[k] == f[k] for k in shape_keys)):
                rows.append({
                    **{k: f[k] for k in shape_keys}, "device_name": f["device_name"],
                    "family": f["family"], "fused": f["label"], "unfused": b["label"],
                    "fused_backend": f["backend"], "unfused_backend": b["backend"],
                    "fwd_ms_fused": f["fwd_ms"], "fwd_ms_unfused": b["fwd_ms"],
                    "step_ms_fused": f["step_ms"], "step_ms_unfused": b["step_ms"],
                    "fwd_time_ratio": f["fwd_ms"] / b["fwd_ms"], "step_time_ratio": f["step_ms"] / b["step_ms"],
                    # noise of the ratio: half-IQRs of both timings, combined
                    "step_time_ratio_spread": f["step_ms"] / b["step_ms"]
                    * (f["step_rel_spread"] ** 2 + b["step_rel_spread"] ** 2) ** 0.5,
                    "step_time_ratio_of_minima": f["step_ms_min"] / b["step_ms_min"],
                    "saved_bytes_fused": f["saved_bytes"], "saved_bytes_unfused": b["saved_bytes"],
                    "saved_ratio": f["saved_bytes"] / b["saved_bytes"] if b["saved_bytes"] else None,
                    "peak_step_bytes_fused": f["peak_step_bytes"], "peak_step_bytes_unfused": b["peak_step_bytes"],
                    "cuda_kernels_fused": f["cuda_kernels_per_step"], "cuda_kernels_unfused": b["cuda_kernels_per_step"],
                    "step_gflops_per_s_fused": f["step_gflops_per_s"],
                })
    return rows


ISSUE2_SHAPE = {"device": "cpu", "dtype": "fp32", "tokens": 4096, "in_features": 1024, "out_features": 1024, "r": 256}


def issue2_figures(rows: list[dict]) -> dict | None:
    """FusedVeRALinear vs PEFT VeRA at N=4096, n=m=1024, r=256, fp32 on the CPU, if measured."""
    for row in rows:
        if row["fused"] == "FusedVeRALinear" and all(row[k] == v for k, v in ISSUE2_SHAPE.items()):
            return {
                "shape": ISSUE2_SHAPE, "device_name": row["device_name"], "fused_backend": row["fused_backend"],
                "saved_bytes_fused": row["saved_bytes_fused"], "saved_bytes_peft": row["saved_bytes_unfused"],
                "saved_ratio": row["saved_ratio"], "step_ms_fused": row["step_ms_fused"],
                "step_ms_peft": row["step_ms_unfused"], "step_time_ratio": row["step_time_ratio"],
                "step_time_ratio_spread": row["step_time_ratio_spread"],
                "step_time_ratio_of_minima": row["step_time_ratio_of_minima"],
            }
    return None


def _fmt_mb(b) -> str:
    return "n/a" if b is None else f"{b / MB:.2f}"


def format_table(rows: list[dict], unavailable: dict[str, str], errors: list[dict]) -> str:
    """The fused-vs-unfused table as text, with a line for every implementation not measured.

    GPU runs add peak memory and CUDA kernels per step; CPU runs have neither, and say GFLOP/s.
    """
    gpu = any(r["device"] == "cuda" for r in rows)
    head = ["device", "dtype", "layer", "tokens", "adapter", "r", "fused backend", "vs", "fwd ratio", "step ratio (± noise)",
            "step ms fused", "step ms unfused", "fused TFLOP/s" if gpu else "fused GFLOP/s (cpu)",
            "saved MB fused", "saved MB unfused", "saved ratio"]
    if gpu:
        head += ["peak MB fused", "peak MB unfused", "kernels/step fused", "kernels/step unfused"]
    body = []
    for r in rows:
        rate = r["step_gflops_per_s_fused"] / 1e3 if gpu else r["step_gflops_per_s_fused"]
        cells = [r["device"], r["dtype"], f"{r['in_features']}x{r['out_features']}", str(r["tokens"]), r["fused"],
                 str(r["r"]), r["fused_backend"], r["unfused"], f"{r['fwd_time_ratio']:.2f}",
                 f"{r['step_time_ratio']:.2f} ± {r['step_time_ratio_spread']:.2f}", f"{r['step_ms_fused']:.3f}" if gpu else f"{r['step_ms_fused']:.2f}",
                 f"{r['step_ms_unfused']:.3f}" if gpu else f"{r['step_ms_unfused']:.2f}", f"{rate:.1f}",
                 _fmt_mb(r["saved_bytes_fused"]), _fmt_mb(r["saved_bytes_unfused"]),
                 "n/a" if r["saved_ratio"] is None else f"{r['saved_ratio']:.3f}"]
        if gpu:
            cells += [_fmt_mb(r["peak_step_bytes_fused"]), _fmt_mb(r["peak_step_bytes_unfused"]),
                      str(r["cuda_kernels_fused"] if r["cuda_kernels_fused"] is not None else "n/a"),
                      str(r["cuda_kernels_unfused"] if r["cuda_kernels_unfused"] is not None else "n/a")]
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    for fused_name, base_name in cases.PAIRS:
        for name in (fused_name, base_name):
            if name in unavailable:
                lines.append(f"{cases.IMPLS[name].label}: {unavailable[name]}; no {cases.IMPLS[fused_name].label} vs "
                             f"{cases.IMPLS[base_name].label} row")
    for e in errors:
        lines.append(f"{e['label']} r={e['r']} N={e['tokens']} {e['in_features']}x{e['out_features']}: {e['status']}")
    lines.append("ratio = fused / unfused (< 1: the fused layer is faster, or keeps fewer bytes for backward); "
                 "step = forward + backward; fwd = forward under no_grad; medians of interleaved rounds, ± from their "
                 "interquartile ranges; FLOP/s = roofline-model flops / measured step time.")
    return "\n".join(dict.fromkeys(lines))  # a missing impl of two pairs is said once


def _line_label(rec: dict) -> str:
    return rec["label"] + (f" [gemm={rec['gemm_mode']}]" if rec.get("gemm_mode") else "")


def roofline_note(records: list[dict]) -> tuple[str, list[dict]]:
    """Markdown note and JSON rows: per op and shape, flops and minimum bytes moved, fused vs unfused."""
    rows, seen = [], set()
    for rec in records:
        key = (rec["family"], rec["device"], rec["dtype"], rec["tokens"], rec["in_features"], rec["out_features"], rec["r"])
        if key in seen or rec["status"] != "ok":
            continue
        seen.add(key)
        fam, dev, dt, N, n, m, r = key
        elem = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}[dt]
        fused = roofline.summary(fam, True, N, n, m, r, elem)
        unfused = roofline.summary(fam, False, N, n, m, r, elem)
        row = {"family": fam, "device": dev, "dtype": dt, "tokens": N, "in_features": n, "out_features": m, "r": r}
        for part in ("forward", "step"):
            row[part] = {
                "flops_fused": fused[part]["flops"], "flops_unfused": unfused[part]["flops"],
                "bytes_fused": fused[part]["bytes"], "bytes_unfused": unfused[part]["bytes"],
                "kernels_fused": fused[part]["kernels"], "kernels_unfused": unfused[part]["kernels"],
                "bytes_ratio": fused[part]["bytes"] / unfused[part]["bytes"],
            }
        row["saved_bytes_model_fused"] = fused["saved_bytes_model"]
        row["saved_bytes_model_unfused"] = unfused["saved_bytes_model"]
        spec = roofline.gpu_spec(records[0]["device_name"]) if dev == "cuda" and dt in ("bf16", "fp16") else None
        if spec is not None:
            key_name, tflops, gbps = spec
            row["spec"] = {"gpu": key_name, "peak_tflops": tflops, "peak_gbps": gbps, "source": "spec sheet, not measured"}
            for part in ("forward", "step"):
                for side in ("fused", "unfused"):
                    row[part][f"floor_ms_{side}"] = 1e3 * roofline.floor_seconds(
                        row[part][f"flops_{side}"], row[part][f"bytes_{side}"], tflops, gbps)
        measured = [rec2 for rec2 in records if rec2["status"] == "ok" and
                    (rec2["family"], rec2["device"], rec2["dtype"], rec2["tokens"], rec2["in_features"],
                     rec2["out_features"], rec2["r"]) == key]
        row["measured_step_ms"] = {_line_label(rec2): rec2["step_ms"] for rec2 in measured}
        rows.append(row)

    lines = [
        "# Roofline note: flops and minimum bytes moved per op, fused vs unfused",
        "",
        "Model (bench/roofline.py): every kernel or eager op reads each input once and writes each output once.",
        "Fused = pefttriton's engine (2 forward launches, 2 backward + weight-gradient GEMMs) and the adapter's",
        "preparation; unfused = one eager op per term (adapter weights in the layer's dtype, casts not counted).",
        "Step = forward + backward, x needing a gradient. GFLOP and MB are model figures, not measurements;",
        "the measured step times next to them are labelled with their device.",
        "",
        "| adapter | device | dtype | N | n x m | r | GFLOP step (fused / unfused) | MB moved fwd fused / unfused | "
        "MB moved step fused / unfused | bytes ratio step | flop/byte step fused | measured step ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        st, fw = row["step"], row["forward"]
        fused_s = roofline.summary(row["family"], True, row["tokens"], row["in_features"], row["out_features"], row["r"],
                                   {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}[row["dtype"]])
        measured = ", ".join(f"{k} {v:.2f}" for k, v in row["measured_step_ms"].items())
        lines.append(
            f"| {row['family']} | {row['device']} | {row['dtype']} | {row['tokens']} "
            f"| {row['in_features']}x{row['out_features']} | {row['r']} | {st['flops_fused'] / 1e9:.2f} / {st['flops_unfused'] / 1e9:.2f} "
            f"| {fw['bytes_fused'] / MB:.1f} / {fw['bytes_unfused'] / MB:.1f} "
            f"| {st['bytes_fused'] / MB:.1f} / {st['bytes_unfused'] / MB:.1f} | {st['bytes_ratio']:.2f} "
            f"| {fused_s['step']['flops_per_byte']:.0f} | {measured} ({row['device']}) |"
        )
    floors = [row for row in rows if "spec" in row]
    if floors:
        lines += ["", "Floor times from spec-sheet peaks (not measured): max(flops / peak, bytes / bandwidth).", "",
                  "| adapter | N | n x m | r | GPU (spec) | step floor ms fused / unfused | measured step ms |",
                  "|---|---|---|---|---|---|---|"]
        for row in floors:
            measured = ", ".join(f"{k} {v:.3f}" for k, v in row["measured_step_ms"].items())
            lines.append(f"| {row['family']} | {row['tokens']} | {row['in_features']}x{row['out_features']} | {row['r']} "
                         f"| {row['spec']['gpu']} | {row['step']['floor_ms_fused']:.3f} / {row['step']['floor_ms_unfused']:.3f} "
                         f"| {measured} |")
    return "\n".join(lines) + "\n", rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main(argv: list[str] | None = None) -> int:
    """Runs the job; returns 0, or 1 when an available implementation failed on some shape."""
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
        ranks.update({fam: _ints(args.lora_r) for fam in ("lora", "deep_lora", "lorma")})
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
    rounds = args.rounds or (10 if device.type == "cuda" else 11)
    min_seconds = args.min_seconds if args.min_seconds is not None else (0.05 if device.type == "cuda" else 0.02)

    dev_name = device_name(device)
    print(f"pefttriton benchmark on {device.type.upper()}: {dev_name}")
    if device.type == "cpu":
        print("CPU run: fused layers use pefttriton's torch backend; every figure below is a CPU figure, "
              "not a GPU one.")

    unavailable: dict[str, str] = {}
    available: dict[str, cases.Impl] = {}
    for name in names:
        reason = cases.probe(cases.IMPLS[name])
        if reason is None:
            available[name] = cases.IMPLS[name]
        else:
            unavailable[name] = reason
            print(f"  {cases.IMPLS[name].label}: {reason}")

    entries = _entries(suite, available, device)
    groups = [(dt, n, m, N) for dt in suite.dtypes for (n, m) in suite.layers for N in suite.tokens]
    bar = _progress(len(groups) * (len(entries) + rounds), not args.no_progress, f"bench {device.type}")
    records: list[dict] = []
    try:
        for dt, n, m, N in groups:
            records += measure_group(device, dt, n, m, N, entries, rounds, min_seconds, bar)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        bar.close()

    rows = compare(records)
    errors = [r for r in records if r["status"] != "ok"]
    table = format_table(rows, unavailable, errors)
    note, roof_rows = roofline_note(records)
    issue2 = issue2_figures(rows)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{device.type}"
    result = {
        "meta": {
            "device": device.type, "device_name": dev_name, "kind": kind, "argv": list(argv or sys.argv[1:]),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(), "torch_threads": torch.get_num_threads(), "rounds": rounds,
            "min_seconds": min_seconds, "suite": {**asdict(suite), "dtypes": [cases.dtype_name(d) for d in suite.dtypes]},
            "units": {"*_ms": "milliseconds, median", "*_bytes": "bytes", "*_gflops_per_s": "GFLOP/s (model flops / time)"},
        },
        "unavailable": unavailable,
        "records": records,
        "comparisons": rows,
        "roofline": roof_rows,
        "issue2": issue2,
    }
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=1), encoding="utf-8")
    (out / f"roofline-{device.type}.md").write_text(note, encoding="utf-8")
    from bench import plot

    png_path = plot.plot(records, rows, out / f"{stem}.png")

    print()
    print(f"Fused vs unfused on {device.type.upper()} ({dev_name}):")
    print(table)
    print()
    if issue2 is not None:
        print(f"FusedVeRALinear vs PEFT VeRA, N=4096, n=m=1024, r=256, fp32, CPU ({issue2['device_name']}, "
              f"fused backend: {issue2['fused_backend']}):")
        print(f"  bytes saved for backward: {issue2['saved_bytes_fused']:,} vs {issue2['saved_bytes_peft']:,} "
              f"(ratio {issue2['saved_ratio']:.3f})")
        print(f"  step time (forward+backward): {issue2['step_ms_fused']:.1f} ms vs {issue2['step_ms_peft']:.1f} ms "
              f"(ratio {issue2['step_time_ratio']:.2f} ± {issue2['step_time_ratio_spread']:.2f}; "
              f"ratio of the fastest samples {issue2['step_time_ratio_of_minima']:.2f})")
    elif device.type == "cpu":
        print("FusedVeRALinear vs PEFT VeRA at N=4096, n=m=1024, r=256, fp32: not in this run (use the defaults).")
    else:
        print("FusedVeRALinear vs PEFT VeRA CPU figures: run `python -m bench --device cpu`.")
    print(f"Wrote {json_path}, {png_path} and {out / f'roofline-{device.type}.md'}")
    return 1 if errors else 0
