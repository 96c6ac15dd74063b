"""Reporting: fused-vs-unfused rows, the text table, the roofline note and the result files."""

import datetime
import json
import sys
from dataclasses import asdict
from pathlib import Path

from bench import cases, roofline

MB = 1e6


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




def write(out: Path, device, dev_name: str, kind: str, argv: list[str], run_meta: dict, suite,
          unavailable: dict[str, str], records: list[dict]) -> int:
    """Print the table and write the result files; returns 0, or 1 when a measurement failed."""
    rows = compare(records)
    errors = [r for r in records if r["status"] != "ok"]
    table = format_table(rows, unavailable, errors)
    note, roof_rows = roofline_note(records)
    issue2 = issue2_figures(rows)

    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{device.type}"
    result = {
        "meta": {
            "device": device.type, "device_name": dev_name, "kind": kind, "argv": argv,
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **run_meta,
            "suite": {**asdict(suite), "dtypes": [cases.dtype_name(d) for d in suite.dtypes]},
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
