"""Reporting: fused-vs-unfused rows, auto against the best strategy, the text tables, the roofline
note and the result files.

The printed tables fit in 100 columns (:data:`WIDTH`); everything else (fused ms, forward ratios,
every strategy's time, GPU memory and kernel counts) is in the JSON.
"""

import datetime
import json
import os
import textwrap
from dataclasses import asdict
from pathlib import Path

from . import cases, measure, roofline

MB = 1e6
WIDTH = 100  # columns of everything the main job prints
AUTO_TARGET = 1.05  # auto's step time may be at most this times the best strategy's, at every shape
SHAPE_KEYS = ("device", "dtype", "tokens", "in_features", "out_features", "r")
NOISY = "too noisy to conclude"


def verdict(value: float | None, spread: float | None, target: float) -> str | None:
    """Whether ``value`` (a ratio, lower is better) meets ``target``: ``"yes"`` when it is at most the
    target; ``"NO"`` when it exceeds the target by more than its noise ``spread``; else
    :data:`NOISY`: a miss smaller than the noise is no evidence either way. None when not measured."""
    if value is None:
        return None
    if value <= target:
        return "yes"
    return NOISY if value - (spread or 0.0) <= target else "NO"


def too_noisy(value: float, spread: float | None, reference: float = 1.0) -> bool:
    """Whether the noise of ``value`` is at least its distance to ``reference`` (1 for a ratio:
    fused no faster and no slower than unfused, as far as this run can tell)."""
    return abs(value - reference) <= (spread or 0.0)


def _rounds(a: dict, b: dict) -> dict:
    """Per-round step-time ratio ``a / b`` (median, quartiles, half-IQR) from the interleaved
    samples of two records of one shape; {} for records without samples."""
    if not a.get("step_ms_samples") or len(a["step_ms_samples"]) != len(b.get("step_ms_samples") or ()):
        return {}
    return measure.round_ratios(a["step_ms_samples"], b["step_ms_samples"])


def _ratio_spread(ratio: float, a: dict, b: dict) -> float:
    """Noise of ``ratio = a / b``: the half-IQRs of both step timings (relative), combined."""
    return ratio * (a["step_rel_spread"] ** 2 + b["step_rel_spread"] ** 2) ** 0.5


def compare(records: list[dict]) -> list[dict]:
    """Rows fused vs unfused for every pair of :data:`bench.cases.PAIRS` measured on the same shape,
    one per strategy the fused adapter ran under (``strategy``; the printed table shows ``auto``)."""
    ok = [r for r in records if r["status"] == "ok"]
    rows = []
    for fused_name, base_name in cases.PAIRS:
        for f in (r for r in ok if r["impl"] == fused_name):
            for b in (r for r in ok if r["impl"] == base_name and all(r[k] == f[k] for k in SHAPE_KEYS)):
                ratio = f["step_ms"] / b["step_ms"]
                rows.append({
                    **{k: f[k] for k in SHAPE_KEYS}, "device_name": f["device_name"],
                    "family": f["family"], "fused": f["label"], "unfused": b["label"],
                    "fused_impl": f["impl"], "unfused_impl": b["impl"],
                    "strategy": f.get("strategy"), "fused_path": f.get("path"),
                    "fused_backend": f["backend"], "unfused_backend": b["backend"],
                    "fwd_ms_fused": f["fwd_ms"], "fwd_ms_unfused": b["fwd_ms"],
                    "step_ms_fused": f["step_ms"], "step_ms_unfused": b["step_ms"],
                    "fwd_time_ratio": f["fwd_ms"] / b["fwd_ms"], "step_time_ratio": ratio,
                    "step_time_ratio_spread": _ratio_spread(ratio, f, b),
                    "step_time_ratio_too_noisy": too_noisy(ratio, _ratio_spread(ratio, f, b)),
                    **{f"step_time_ratio_rounds_{k}": v for k, v in _rounds(f, b).items()},
                    "step_time_ratio_of_minima": f["step_ms_min"] / b["step_ms_min"],
                    "saved_bytes_fused": f["saved_bytes"], "saved_bytes_unfused": b["saved_bytes"],
                    "saved_ratio": f["saved_bytes"] / b["saved_bytes"] if b["saved_bytes"] else None,
                    "peak_step_bytes_fused": f["peak_step_bytes"], "peak_step_bytes_unfused": b["peak_step_bytes"],
                    "cuda_kernels_fused": f["cuda_kernels_per_step"], "cuda_kernels_unfused": b["cuda_kernels_per_step"],
                    "step_gflops_per_s_fused": f["step_gflops_per_s"],
                })
    return rows


def strategy_rows(records: list[dict]) -> list[dict]:
    """Per shape and fused adapter: every strategy's step time, the best strategy (``auto`` aside)
    and ``auto_over_best``, auto's step time over the best's, with its noise; ``auto_over_its_path``
    is auto's time over that of the strategy it picked (the cost of choosing, ~1)."""
    ok = [r for r in records if r["status"] == "ok" and r["fused"] and r.get("strategy")]
    groups: dict[tuple, dict[str, dict]] = {}
    for rec in ok:
        groups.setdefault((*(rec[k] for k in SHAPE_KEYS), rec["impl"]), {})[rec["strategy"]] = rec
    rows = []
    for key, by_strategy in groups.items():
        named = {s: rec for s, rec in by_strategy.items() if s != "auto"}
        if not named:
            continue
        best = min(named, key=lambda s: named[s]["step_ms"])
        row = {
            **dict(zip(SHAPE_KEYS, key)), "impl": key[-1], "family": named[best]["family"],
            "adapter": named[best]["label"], "device_name": named[best]["device_name"],
            "strategies": list(by_strategy),
            "step_ms": {s: rec["step_ms"] for s, rec in by_strategy.items()},
            "step_ms_min": {s: rec["step_ms_min"] for s, rec in by_strategy.items()},
            "step_rel_spread": {s: rec["step_rel_spread"] for s, rec in by_strategy.items()},
            "fwd_ms": {s: rec["fwd_ms"] for s, rec in by_strategy.items()},
            "best": best, "best_step_ms": named[best]["step_ms"],
            "auto_path": None, "auto_fwd_path": None, "auto_step_ms": None, "auto_over_best": None,
            "auto_over_best_spread": None, "auto_over_best_of_minima": None, "auto_over_its_path": None,
            "target": AUTO_TARGET, "within_target": None, "verdict": None,
        }
        auto = by_strategy.get("auto")
        if auto is not None:
            ratio = auto["step_ms"] / named[best]["step_ms"]
            row.update({
                "auto_path": auto["path"], "auto_fwd_path": auto["fwd_path"], "auto_step_ms": auto["step_ms"],
                "auto_over_best": ratio, "auto_over_best_spread": _ratio_spread(ratio, auto, named[best]),
                "auto_over_best_of_minima": auto["step_ms_min"] / named[best]["step_ms_min"],
                "within_target": ratio <= AUTO_TARGET,
                "verdict": verdict(ratio, _ratio_spread(ratio, auto, named[best]), AUTO_TARGET),
                **{f"auto_over_best_rounds_{k}": v for k, v in _rounds(auto, named[best]).items()},
            })
            if auto["path"] in named:
                row["auto_over_its_path"] = auto["step_ms"] / named[auto["path"]]["step_ms"]
        rows.append(row)
    return rows


ISSUE2_SHAPE = {"device": "cpu", "dtype": "fp32", "tokens": 4096, "in_features": 1024, "out_features": 1024, "r": 256}


def issue2_figures(rows: list[dict]) -> dict | None:
    """FusedVeRALinear (auto) vs PEFT VeRA at N=4096, n=m=1024, r=256, fp32 on the CPU, if measured;
    ``strategies`` has the step-time ratio of every strategy."""
    at_shape = [row for row in rows if row["fused"] == "FusedVeRALinear" and row["unfused"] == "PEFT VeRA"
                and all(row[k] == v for k, v in ISSUE2_SHAPE.items())]
    for row in at_shape:
        if row["strategy"] == "auto":
            return {
                "shape": ISSUE2_SHAPE, "device_name": row["device_name"], "fused_backend": row["fused_backend"],
                "saved_bytes_fused": row["saved_bytes_fused"], "saved_bytes_peft": row["saved_bytes_unfused"],
                "saved_ratio": row["saved_ratio"], "step_ms_fused": row["step_ms_fused"],
                "step_ms_peft": row["step_ms_unfused"], "step_time_ratio": row["step_time_ratio"],
                "step_time_ratio_spread": row["step_time_ratio_spread"],
                "step_time_ratio_of_minima": row["step_time_ratio_of_minima"],
                "strategies": {r["strategy"]: {"path": r["fused_path"], "step_time_ratio": r["step_time_ratio"],
                                               "step_time_ratio_spread": r["step_time_ratio_spread"]}
                               for r in at_shape},
            }
    return None


def issue2_missing(records: list[dict], unavailable: dict[str, str], requested: list[str] | None) -> str:
    """Why the FusedVeRALinear vs PEFT VeRA figures at :data:`ISSUE2_SHAPE` are not in this run."""
    for name in ("fused_vera", "peft_vera"):
        label = cases.IMPLS[name].label if name in cases.IMPLS else name
        if name in unavailable:
            return f"not measured: {label} {unavailable[name]}"
        if requested is not None and name not in requested:
            return f"not measured: --impls leaves out {name}"
    failed = [rec for rec in records if rec["impl"] in ("fused_vera", "peft_vera") and rec["status"] != "ok"
              and all(rec[k] == v for k, v in ISSUE2_SHAPE.items())]
    if failed:
        return f"failed: {failed[0]['label']}: {failed[0]['status']}"
    return ("not in this run: its shape is not in the grid (--tokens, --layers, --vera-r or --dtypes replaced the "
            "defaults, which include it)")


def _fmt_ratio(value: float | None, spread: float | None = None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if spread is None else f"{value:.2f} ± {spread:.2f}"


def _columns(head: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return [line.rstrip() for line in lines]


def wrap(text: str, indent: str = "") -> str:
    """``text`` in lines of at most :data:`WIDTH` columns (continuation lines indented)."""
    return "\n".join(textwrap.fill(part, WIDTH, subsequent_indent=indent or "  ", break_on_hyphens=False)
                     for part in text.split("\n"))


def _layer(r: dict) -> str:
    return f"{r['in_features']}x{r['out_features']}"


def format_table(rows: list[dict], unavailable: dict[str, str], errors: list[dict]) -> str:
    """The main table, fused (strategy ``auto``, with the path it took) vs each unfused baseline,
    then a line for every implementation not measured; at most :data:`WIDTH` columns."""
    head = ["dtype", "layer", "tokens", "adapter", "r", "strategy", "vs", "step ratio", "saved ratio"]
    body = []
    for r in rows:
        if r.get("strategy") not in (None, "auto"):
            continue
        body.append([r["dtype"], _layer(r), str(r["tokens"]), cases.IMPLS[r["fused_impl"]].short_name
                     if r.get("fused_impl") in cases.IMPLS else r["family"], str(r["r"]),
                     cases.strategy_label(r.get("strategy"), r.get("fused_path")),
                     cases.IMPLS[r["unfused_impl"]].short_name if r.get("unfused_impl") in cases.IMPLS else r["unfused"],
                     _fmt_ratio(r["step_time_ratio"], r["step_time_ratio_spread"])
                     + (" ?" if too_noisy(r["step_time_ratio"], r["step_time_ratio_spread"]) else ""),
                     "n/a" if r["saved_ratio"] is None else f"{r['saved_ratio']:.3f}"])
    lines = _columns(head, body)
    if any(b[7].endswith(" ?") for b in body):
        lines.append(wrap(f"?: {NOISY} (the noise ± is at least the ratio's distance to 1: this run cannot tell "
                          "which layer is faster)."))
    for fused_name, base_name in cases.PAIRS:
        for name in (fused_name, base_name):
            if name in unavailable:
                lines.append(wrap(f"{cases.IMPLS[name].label}: {unavailable[name]}; no {cases.IMPLS[fused_name].label} "
                                  f"vs {cases.IMPLS[base_name].label} row"))
    for e in errors:
        where = f"{e['label']}" + (f" [{e['strategy']}]" if e.get("strategy") else "")
        lines.append(wrap(f"{where} r={e['r']} N={e['tokens']} {_layer(e)}: {e['status']}"))
    lines.append(wrap(
        "ratio = fused / unfused (< 1: the fused layer is faster, or keeps fewer bytes for backward); step = "
        "forward + backward; medians of interleaved rounds, ± from their interquartile ranges; vs: PEFT = the "
        "installed PEFT layer, torch = one eager op per term, lean = every product in BLAS with a hand-written "
        "backward; strategy auto->X: auto took path X. Forward ratios, times, FLOP/s, memory and every strategy "
        "vs every baseline: in the JSON."))
    return "\n".join(dict.fromkeys(lines))  # a missing impl of two pairs is said once


def _verdict_cell(v: str | None) -> str:
    return {None: "n/a", NOISY: "too noisy"}.get(v, v)


def _signed(v: float) -> str:
    return f"{v:+.1f}"


def format_per_call(section: dict) -> str:
    """The per-call tables of :mod:`bench.per_call`: accelerate's overhead per call on a tiny
    layer (microseconds) and accelerated / PEFT on single layers; at most :data:`WIDTH` columns."""
    where = (f"forward + backward, x requiring grad, {section['dtype']}, {section['threads']} threads, "
             f"{section['rounds']} interleaved rounds; medians of the per-round figures, [first, third quartile]")
    lines = [wrap(f"Per call: pefttriton.accelerate on one PEFT layer vs the plain PEFT layer ({where}):")]
    if section.get("unavailable"):
        lines.append(wrap(f"  not measured: PEFT {section['unavailable']}", "    "))
        return "\n".join(lines)
    notes = []

    def ran(row: dict) -> str:
        what = row.get("accelerated_ran", "?")
        if what.startswith("fused"):
            return what
        notes.append(wrap(f"  {row['label']} {_layer(row)} N={row['tokens']}: the accelerated layer ran {what}", "    "))
        return "PEFT (below)"

    def ok(kind: str) -> list[dict]:
        rows = section.get(kind, [])
        for row in rows:
            if row["status"] != "ok":
                notes.append(wrap(f"  {row['label']} r={row['r']} {_layer(row)} N={row['tokens']}: {row['status']}",
                                  "    "))
        return [row for row in rows if row["status"] == "ok"]

    body = [[r["label"], _layer(r), str(r["tokens"]), str(r["r"]), f"{r['peft_us']:.1f}", f"{r['accelerated_us']:.1f}",
             f"{_signed(r['overhead_us'])} [{_signed(r['overhead_us_q1'])}, {_signed(r['overhead_us_q3'])}]", ran(r)]
            for r in ok("overhead")]
    if body:
        lines += _columns(["adapter", "layer", "tokens", "r", "PEFT us", "accel us", "accel - PEFT us per call", "ran"],
                          body)
    target = section.get("target", 1.0)
    body = [[r["label"], _layer(r), str(r["tokens"]), str(r["r"]), f"{r['peft_us'] / 1e3:.2f}",
             f"{r['accelerated_us'] / 1e3:.2f}", f"{r['ratio']:.2f} [{r['ratio_q1']:.2f}, {r['ratio_q3']:.2f}]",
             _verdict_cell(verdict(r["ratio"], r["ratio_spread"], target)), ran(r)]
            for r in ok("single_layers")]
    if body:
        lines += [""] + _columns(["adapter", "layer", "tokens", "r", "PEFT ms", "accel ms", "accel / PEFT",
                                  f"<={target:g}", "ran"], body)
    lines += notes
    lines.append(wrap(
        "accel - PEFT: the accelerated layer's time per call minus the plain one's, per round (on the tiny layer: "
        f"what accelerate adds per layer and call); accel / PEFT: their ratio per round; <={target:g}: yes, NO, or "
        f"too noisy ({NOISY}: above the target by less than half the interquartile range); ran: what the "
        "accelerated layer's last call ran."))
    return "\n".join(lines)


def per_call_failures(section: dict | None) -> list[str]:
    """Why the per-call section is incomplete: PEFT missing, a row that failed (none: complete)."""
    if section is None:
        return []
    if section.get("unavailable"):
        return [f"per-call rows (accelerate vs PEFT) not measured: PEFT {section['unavailable']}"]
    return [f"per-call row {row['label']} r={row['r']} {_layer(row)} N={row['tokens']}: {row['status']}"
            for kind in ("overhead", "single_layers") for row in section.get(kind, []) if row["status"] != "ok"]


def format_load(load: list | tuple | None, cpus: int | None, threads: int) -> str:
    """The console's load-average line: other work on the machine disturbs CPU timings."""
    if not load or load[0] is None:
        return "Load average: not available on this system (other work on the machine disturbs the timings)."
    after = "" if len(load) < 2 or load[1] is None else f", {load[1]:.2f} after it"
    text = (f"Load average (1 min): {load[0]:.2f} before the run{after}, on {cpus or '?'} CPUs; this run used "
            f"{threads} threads.")
    if cpus and load[0] >= cpus / 2:
        text += (" A busy machine: other work disturbs the timings (threads wait for each other), so treat the "
                 "ratios as rough and rerun on a quiet one.")
    return text


def format_strategy_table(rows: list[dict]) -> str:
    """Per shape and adapter: the path auto took, the fastest strategy, auto / best (target at most
    :data:`AUTO_TARGET`); at most :data:`WIDTH` columns."""
    head = ["dtype", "layer", "tokens", "adapter", "r", "auto took", "best", "auto/best", "auto ms",
            f"<={AUTO_TARGET:g}"]
    body = []
    for r in rows:
        body.append([r["dtype"], _layer(r), str(r["tokens"]), r["family"], str(r["r"]), r["auto_path"] or "n/a",
                     r["best"], _fmt_ratio(r["auto_over_best"], r["auto_over_best_spread"]),
                     "n/a" if r["auto_step_ms"] is None else f"{r['auto_step_ms']:.2f}",
                     _verdict_cell(r.get("verdict", verdict(r["auto_over_best"], r["auto_over_best_spread"],
                                                            r["target"])))])
    lines = _columns(head, body)
    if any(b[-1] == "too noisy" for b in body):
        lines.append(wrap(f"too noisy: {NOISY}, auto/best is above the target by less than its noise (±); "
                          "rerun on a quieter machine or with more --rounds."))
    lines.append(wrap("best = the fastest strategy named explicitly; auto/best = auto's step time over the best's "
                      "(± noise); every strategy's time: \"strategies\" in the JSON."))
    return "\n".join(lines)


def _line_label(rec: dict) -> str:
    label = cases.strategy_label(rec.get("strategy"), rec.get("path"))
    return rec["label"] + (f" [{label}]" if label else "")


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
          unavailable: dict[str, str], records: list[dict], per_call: dict | None = None,
          requested: list[str] | None = None) -> int:
    """Print the tables and write the result files (``out/bench-<device>.json`` ...); returns 0, or 1
    when a measurement failed, a requested baseline could not be measured (PEFT not importable,
    say) or the per-call rows are incomplete; the last lines printed then say why.

    ``per_call`` is :func:`bench.per_call.measure_all`'s section (None: not requested);
    ``requested`` the implementations asked for (None: all)."""
    rows = compare(records)
    by_strategy = strategy_rows(records)
    errors = [r for r in records if r["status"] != "ok"]
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
            "units": {"*_ms": "milliseconds, median", "*_bytes": "bytes", "*_gflops_per_s": "GFLOP/s (model flops / time)",
                      "*_spread": "half the interquartile range (relative for step_rel_spread)"},
            "auto_target": AUTO_TARGET,
        },
        "unavailable": unavailable,
        "records": records,
        "comparisons": rows,
        "strategies": by_strategy,
        "roofline": roof_rows,
        "issue2": issue2,
        "per_call": per_call,
    }
    if per_call is not None:
        for row in per_call.get("single_layers", []):
            if row["status"] == "ok":
                row["verdict"] = verdict(row["ratio"], row["ratio_spread"], per_call.get("target", 1.0))
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=1), encoding="utf-8")
    (out / f"roofline-{device.type}.md").write_text(note, encoding="utf-8")
    from . import plot

    png_path = plot.plot(records, rows, out / f"{stem}.png", by_strategy)

    print()
    print(wrap(f"Fused (strategy auto) vs unfused on {device.type.upper()} ({dev_name}):"))
    print(format_table(rows, unavailable, errors))
    print()
    print(wrap(f"Strategies: auto against the fastest strategy, target auto/best <= {AUTO_TARGET:g}:"))
    print(format_strategy_table(by_strategy))
    print()
    if issue2 is not None:
        print(wrap(f"FusedVeRALinear vs PEFT VeRA, N=4096, n=m=1024, r=256, fp32, CPU ({issue2['device_name']}):"))
        print(wrap(f"  bytes saved for backward: {issue2['saved_bytes_fused']:,} vs {issue2['saved_bytes_peft']:,} "
                   f"(ratio {issue2['saved_ratio']:.3f})", "    "))
        print(wrap(f"  step time (forward+backward), {issue2['fused_backend']}: {issue2['step_ms_fused']:.1f} ms vs "
                   f"{issue2['step_ms_peft']:.1f} ms (ratio {issue2['step_time_ratio']:.2f} ± "
                   f"{issue2['step_time_ratio_spread']:.2f}; ratio of the fastest samples "
                   f"{issue2['step_time_ratio_of_minima']:.2f})", "    "))
        others = [f"{name} {v['step_time_ratio']:.2f} ± {v['step_time_ratio_spread']:.2f}"
                  for name, v in issue2["strategies"].items() if name != "auto"]
        if others:
            print(wrap("  step-time ratio of each strategy: " + ", ".join(others), "    "))
    elif device.type == "cpu":
        print(wrap("FusedVeRALinear vs PEFT VeRA at N=4096, n=m=1024, r=256, fp32: "
                   + issue2_missing(records, unavailable, requested) + "."))
    else:
        print(wrap("FusedVeRALinear vs PEFT VeRA CPU figures: run `python -m bench --device cpu`."))
    if per_call is not None:
        print()
        print(format_per_call(per_call))
    print()
    print(wrap(format_load(run_meta.get("load_average"), run_meta.get("cpu_count", os.cpu_count()),
                           run_meta.get("torch_threads", 0))))
    print("Wrote:")
    for path in (json_path, png_path, out / f"roofline-{device.type}.md"):
        print(f"  {path}")
    failures = [f"requested baseline {cases.IMPLS[name].label} {why}" for name, why in unavailable.items()
                if name in cases.IMPLS and not cases.IMPLS[name].fused]
    failures += per_call_failures(per_call)
    for line in failures:
        print(wrap(f"error: {line}"))
    if failures:
        print(wrap("Exit status 1: install what is missing (the PEFT baselines need `pip install peft`) or leave it "
                   "out (--impls, --per-call none)."))
    return 1 if errors or failures else 0
