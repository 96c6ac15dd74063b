"""The README's benchmark figures, rendered from a results JSON of the main job, never typed.

    python -m bench --no-progress --out results/cpu --readme README.md   # measure, then render
    python -m bench.readme README.md                                     # render again from its JSON
    python -m bench.readme README.md results/cpu/bench-cpu.json --check  # exit 1 if the block differs

The figures sit between ``<!-- bench:begin PATH -->`` and ``<!-- bench:end -->``, PATH being the
JSON they were rendered from, relative to the README. A test checks that the block equals
:func:`render` of that JSON, so a figure typed by hand fails it; text outside the markers is
never touched.
"""

import argparse
import json
import os
import re
import sys
import textwrap
from pathlib import Path

BEGIN = "<!-- bench:begin {} -->"
END = "<!-- bench:end -->"
_BLOCK = re.compile(r"<!-- bench:begin (\S+) -->\n.*?<!-- bench:end -->", re.S)
# Issue targets the README states next to the figures.
TARGETS = "fused VeRA at most 0.8x PEFT VeRA, fused LoRA at most 0.95x PEFT LoRA"


def _ratio(value: float | None, spread: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} ± {spread:.2f}"


def _mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:.1f}"


def _load(meta: dict) -> str:
    load = meta.get("load_average")
    if not load or None in load:
        return ""
    return (f" The machine's load average was {load[0]:.2f} before the run and {load[1]:.2f} after it (other "
            "work on it disturbs the timings).")


def _prose(text: str) -> str:
    """A paragraph in lines of at most 100 columns, like the rest of the README."""
    return textwrap.fill(text, 100, break_long_words=False, break_on_hyphens=False)


def _shape(row: dict) -> tuple:
    return row["dtype"], row["in_features"], row["out_features"], row["tokens"], row["r"]


def render(result: dict, source: str) -> str:
    """The README block (markers included) for ``result``, the main job's JSON read from ``source``.

    Two tables: the step-time ratio of each fused adapter to its PEFT layer under every strategy
    (auto naming the path it took) with the bytes kept for backward; and, per shape and adapter,
    auto's step time over the fastest strategy's. Then, when the JSON has them (``per_call``,
    :mod:`bench.per_call`), accelerate's overhead per call on a tiny layer and accelerated / PEFT
    on single layers; a JSON without them renders as before.
    """
    meta = result["meta"]
    versions = meta.get("versions", {})
    argv = " ".join(meta.get("argv", []))
    lines = [
        BEGIN.format(source),
        _prose(f"Measured by `python -m bench{' ' + argv if argv else ''}` on {meta['device'].upper()} "
        f"({meta['device_name']}), torch {versions.get('torch', '?')}, {meta['date_utc'][:10]}: medians of "
        f"{meta['rounds']} interleaved rounds, ± half the interquartile ranges of the two timings combined; "
        f"\"fastest samples\": the ratio of the two timings' fastest samples.{_load(meta)} "
        f"Rendered from `{source}` by `bench/readme.py` (rerun it, do not edit these lines); the other "
        "baselines (plain torch, lean BLAS), forward times and the plot are in that JSON and its PNG."),
        "",
    ]
    peft = [row for row in result["comparisons"] if row["unfused"].startswith("PEFT")]
    strategies = list(dict.fromkeys(row["strategy"] for row in peft if row["strategy"]))
    if peft:
        lines += [
            _prose(f"Step time (forward + backward) fused / PEFT, per strategy (< 1: fused faster; targets: "
                   f"{TARGETS}), and bytes kept for backward:"),
            "",
            "| dtype | layer | tokens | adapter | r | vs | " + " | ".join(strategies)
            + " | auto, of the fastest samples | saved MB fused / PEFT |",
            "|" + "---|" * (8 + len(strategies)),
        ]
        keys = list(dict.fromkeys((row["fused"], row["unfused"], *_shape(row)) for row in peft))
        for key in keys:
            here = {row["strategy"]: row for row in peft if (row["fused"], row["unfused"], *_shape(row)) == key}
            fused, unfused, dtype, n, m, tokens, r = key
            cells = []
            for name in strategies:
                row = here.get(name)
                cell = "n/a" if row is None else _ratio(row["step_time_ratio"], row["step_time_ratio_spread"])
                if row is not None and name == "auto":
                    cell += f" ({row['fused_path']})"
                cells.append(cell)
            auto = here.get("auto")
            cells.append("n/a" if auto is None else f"{auto['step_time_ratio_of_minima']:.2f}")
            first = auto or next(iter(here.values()))
            saved = f"{_mb(first['saved_bytes_fused'])} / {_mb(first['saved_bytes_unfused'])}"
            lines.append(f"| {dtype} | {n}x{m} | {tokens} | {fused} | {r} | {unfused} | " + " | ".join(cells)
                         + f" | {saved} |")
        lines.append("")
    by_strategy = [row for row in result.get("strategies", []) if row["auto_over_best"] is not None]
    if by_strategy:
        target = result["meta"].get("auto_target", 1.05)
        lines += [
            _prose(f"auto against the fastest strategy named explicitly (target: auto/best at most {target:g} at "
                   "every shape):"),
            "",
            "| dtype | layer | tokens | adapter | r | auto took | best | auto / best | of the fastest samples |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in by_strategy:
            lines.append(f"| {row['dtype']} | {row['in_features']}x{row['out_features']} | {row['tokens']} "
                         f"| {row['adapter']} | {row['r']} | {row['auto_path']} | {row['best']} "
                         f"| {_ratio(row['auto_over_best'], row['auto_over_best_spread'])} "
                         f"| {row['auto_over_best_of_minima']:.2f} |")
    lines += _per_call(result.get("per_call"))
    return "\n".join(lines).rstrip("\n") + "\n" + END


def _verdict(row: dict, target: float) -> str:
    from .report import verdict

    return row.get("verdict") or verdict(row["ratio"], row["ratio_spread"], target)


def _per_call(section: dict | None) -> list[str]:
    """The per-call tables (:mod:`bench.per_call`), when the JSON has them: accelerate's overhead per
    call on a tiny layer and accelerated / PEFT on single layers."""
    if not section:
        return []
    overhead = [row for row in section.get("overhead", []) if row["status"] == "ok"]
    single = [row for row in section.get("single_layers", []) if row["status"] == "ok"]
    if not overhead and not single:
        return []
    target = section.get("target", 1.0)
    lines = [
        "",
        _prose(f"Per call: `pefttriton.accelerate` on one PEFT layer (`get_peft_model` on `nn.Sequential(nn.Linear)`, "
               f"adapter tensors random) against the same layer plain, forward + backward with x requiring grad, "
               f"{section['dtype']}, {section['threads']} threads, {section['rounds']} interleaved rounds: medians of "
               "the per-round figures, [first, third quartile]. On the tiny layer, accelerated - PEFT is what "
               f"accelerate adds per layer and call. At most {target:g}: yes, NO, or too noisy to conclude (above "
               "it by less than half the interquartile range)."),
        "",
    ]
    if overhead:
        lines += ["| adapter | layer | tokens | r | PEFT µs | accelerated µs | accelerated - PEFT, µs per call | ran |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in overhead:
            lines.append(f"| {row['label']} | {row['in_features']}x{row['out_features']} | {row['tokens']} | {row['r']} "
                         f"| {row['peft_us']:.1f} | {row['accelerated_us']:.1f} | {row['overhead_us']:+.1f} "
                         f"[{row['overhead_us_q1']:+.1f}, {row['overhead_us_q3']:+.1f}] | {row['accelerated_ran']} |")
        lines.append("")
    if single:
        lines += [f"| adapter | layer | tokens | r | PEFT ms | accelerated ms | accelerated / PEFT | at most {target:g} "
                  "| ran |", "|---|---|---|---|---|---|---|---|---|"]
        for row in single:
            lines.append(f"| {row['label']} | {row['in_features']}x{row['out_features']} | {row['tokens']} | {row['r']} "
                         f"| {row['peft_us'] / 1e3:.2f} | {row['accelerated_us'] / 1e3:.2f} | {row['ratio']:.2f} "
                         f"[{row['ratio_q1']:.2f}, {row['ratio_q3']:.2f}] | {_verdict(row, target)} "
                         f"| {row['accelerated_ran']} |")
    return lines


def find(text: str) -> tuple[str, str]:
    """(the block, markers included; the JSON path its begin marker names) of a README's text.

    Raises:
        ValueError: the text has no block, or more than one.
    """
    found = list(_BLOCK.finditer(text))
    if len(found) != 1:
        raise ValueError(f"expected one '{BEGIN.format('PATH')}' ... '{END}' block, found {len(found)}")
    return found[0].group(0), found[0].group(1)


def update(readme: Path, json_path: Path | None = None) -> str:
    """Renders the block of ``readme`` from ``json_path`` (default: the JSON its marker names); returns the block."""
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    old, named = find(text)
    if json_path is None:
        json_path = readme.parent / named
    source = Path(os.path.relpath(Path(json_path).resolve(), readme.resolve().parent)).as_posix()
    block = render(json.loads(Path(json_path).read_text(encoding="utf-8")), source)
    if block != old:
        readme.write_text(text.replace(old, block), encoding="utf-8")
    return block


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {__package__}.readme", description=__doc__.split("\n\n")[0])
    p.add_argument("readme", nargs="?", default="README.md")
    p.add_argument("json", nargs="?", help="results JSON (default: the one the block's marker names)")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if the block is not the rendering")
    args = p.parse_args(argv)
    readme = Path(args.readme)
    if args.check:
        block, named = find(readme.read_text(encoding="utf-8"))
        path = Path(args.json) if args.json else readme.parent / named
        expected = render(json.loads(path.read_text(encoding="utf-8")), named)
        if block != expected:
            print(f"{readme}: the benchmark block is not the rendering of {path}", file=sys.stderr)
            return 1
        return 0
    update(readme, Path(args.json) if args.json else None)
    print(f"Rendered the benchmark block of:\n  {readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
