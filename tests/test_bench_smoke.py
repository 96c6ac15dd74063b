"""The benchmark's main job and its measurements, on tiny shapes, so CI covers ``python -m bench``.

Expected values come from the formulas of the layers (which tensors autograd must keep, how many
multiply-adds each product costs), or from ``torch.utils.flop_counter``, never from the code under test.
"""

import importlib
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import pefttriton
from bench import baselines, cases, cli, measure, readme, report, roofline  # pytest.ini puts the repository root on the path
from pefttriton import FusedVeRALinear

ops = importlib.import_module("pefttriton.ops.lowrank_linear")  # the module; the package exports the function

N, IN, OUT = 37, 45, 29  # odd sizes: tokens, in_features, out_features
ROOT = Path(__file__).resolve().parents[1]


def _missing(base: nn.Linear, r: int) -> nn.Module:
    raise ImportError("No module named 'pefttriton.not_here'")


def test_main_job_writes_labelled_results(tmp_path, monkeypatch, capsys):
    # An adapter that cannot be imported must be reported, not dropped.
    monkeypatch.setitem(cases.IMPLS, "fused_lorma", cases.Impl("fused_lorma", "lorma", True, "FusedLoRMALinear(plus)", _missing))
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (0.25, 0.5, 0.75))
    tokens, n, m, r = (32, 80), 48, 40, 8
    doc = tmp_path / "README.md"
    doc.write_text("# Title\n\nbefore\n<!-- bench:begin old.json -->\ntyped 1.01 ± 0.02\n<!-- bench:end -->\nafter\n")
    code = cli.main([
        "--device", "cpu", "--tokens", ",".join(map(str, tokens)), "--layers", f"{n}x{m}", "--vera-r", str(r),
        "--lora-r", "3", "--rounds", "3", "--min-seconds", "0", "--out", str(tmp_path / "out"),
        "--impls", "fused_vera,peft_vera,peft_lora,torch_lora,torch_deep_lora,torch_lorma,fused_lorma",
        "--per-call", "lora:2:24x24:8,vera:4:24x20:8", "--readme", str(doc),
    ])  # no --no-progress: stderr is not a terminal here, so the bar must stay quiet by itself
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0
    assert "bench cpu" not in captured.err and "it/s" not in captured.err
    # The console says how loaded the machine was (the patched 1-minute load average).
    assert "Load average (1 min): 0.25 before the run, 0.25 after it" in printed
    data = json.loads((tmp_path / "out" / "bench-cpu.json").read_text())
    assert set(data) >= {"meta", "unavailable", "records", "comparisons", "strategies", "roofline", "issue2"}
    assert data["meta"]["device"] == "cpu"
    assert data["unavailable"]["fused_lorma"].startswith("not available (ImportError")
    assert "FusedLoRMALinear(plus): not available" in printed
    assert "not a GPU one" in printed
    # Everything printed (both tables, their notes) fits in 100 columns.
    assert [line for line in printed.splitlines() if len(line) > report.WIDTH] == []
    records = [rec for rec in data["records"] if rec["status"] == "ok"]
    expected = {"fused_vera", "peft_vera", "peft_lora", "torch_lora", "torch_deep_lora", "torch_lorma"}
    assert {rec["impl"] for rec in records} == expected
    for rec in records:  # every figure says where it comes from; GPU-only figures are absent on the CPU
        assert rec["device"] == "cpu" and rec["backend"] and rec["peak_step_bytes"] is None
        assert rec["cuda_kernels_per_step"] is None
        assert rec["step_ms"] > 0 and rec["fwd_ms"] > 0 and rec["step_tokens_per_s"] > 0
    # The fused adapter once per strategy: auto and each path the CPU allows for fp32 (lean, weight);
    # a named strategy runs as named, auto says which path it took; baselines have no strategy.
    fused = [rec for rec in records if rec["fused"]]
    assert sorted((rec["tokens"], rec["strategy"]) for rec in fused) == sorted(
        (t, s) for t in tokens for s in ("auto", "lean", "weight"))
    for rec in fused:
        assert rec["path"] in ("lean", "weight") and rec["fwd_path"] in ("lean", "weight")
        if rec["strategy"] != "auto":
            assert rec["path"] == rec["strategy"]
            assert rec["backend"] == f"pefttriton {rec['strategy']} (torch)"
        else:
            assert rec["backend"] == f"pefttriton auto->{rec['path']} (torch)"
    assert all(rec["strategy"] is None and rec["path"] is None for rec in records if not rec["fused"])
    rows = [row for row in data["comparisons"] if row["fused"] == "FusedVeRALinear" and row["strategy"] == "auto"]
    assert sorted(row["tokens"] for row in rows) == list(tokens)
    for row in rows:
        # Fused VeRA keeps x A^T (N, r) fp32; PEFT keeps lambda_d's input (N, r) and the (N, m) up-projection.
        assert row["saved_bytes_fused"] == row["tokens"] * r * 4
        assert row["saved_bytes_unfused"] == row["tokens"] * (r + m) * 4
        assert row["saved_bytes_fused"] < row["saved_bytes_unfused"]
        assert row["saved_ratio"] == pytest.approx(r / (r + m))
    # Per shape: every strategy's time, the best named one, auto over it.
    by_strategy = data["strategies"]
    assert sorted(row["tokens"] for row in by_strategy) == list(tokens)
    for row in by_strategy:
        assert set(row["step_ms"]) == {"auto", "lean", "weight"}
        assert row["step_ms"][row["best"]] == min(row["step_ms"]["lean"], row["step_ms"]["weight"])
        assert row["auto_over_best"] == pytest.approx(row["step_ms"]["auto"] / row["step_ms"][row["best"]])
        assert row["auto_over_best_spread"] >= 0 and row["within_target"] == (row["auto_over_best"] <= 1.05)
    assert "FusedVeRALinear" in printed and "auto->" in printed and "auto/best" in printed
    png = (tmp_path / "out" / "bench-cpu.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    note = (tmp_path / "out" / "roofline-cpu.md").read_text()
    assert "| vera | cpu | fp32 | 32 | 48x40 | 8 |" in note
    # --readme rendered the block from the JSON it wrote, and touched nothing else.
    text = doc.read_text()
    block, source = readme.find(text)
    assert source == "out/bench-cpu.json"
    assert block == readme.render(data, source) and "typed" not in text
    assert text.startswith("# Title\n\nbefore\n<!-- bench:begin out/bench-cpu.json -->\n")
    assert text.endswith("<!-- bench:end -->\nafter\n")
    assert "| FusedVeRALinear | 8 | PEFT VeRA |" in block and "| auto | lean | weight |" in block
    assert readme.main([str(doc), "--check"]) == 0
    assert data["meta"]["load_average"] == [0.25, 0.25]
    # Per call: accelerate's overhead on the tiny layer and the single layers asked for, each
    # accelerated PEFT layer against the plain one, interleaved, with what the accelerated one ran.
    calls = data["per_call"]
    assert calls["unavailable"] is None and calls["dtype"] == "fp32" and calls["rounds"] == 3
    assert [(row["family"], row["in_features"], row["out_features"], row["r"], row["tokens"])
            for row in calls["overhead"]] == [("lora", 16, 16, 4, 4), ("vera", 16, 16, 4, 4)]
    assert [(row["family"], row["in_features"], row["out_features"], row["r"], row["tokens"])
            for row in calls["single_layers"]] == [("lora", 24, 24, 2, 8), ("vera", 24, 20, 4, 8)]
    for row in calls["overhead"] + calls["single_layers"]:
        assert row["status"] == "ok" and row["accelerated_ran"].startswith("fused"), row
        peft_us, acc_us = row["peft_us_samples"], row["accelerated_us_samples"]
        assert len(peft_us) == len(acc_us) == 3
        # per-round difference and ratio, recomputed here from the interleaved samples
        assert row["overhead_us"] == pytest.approx(sorted(a - p for a, p in zip(acc_us, peft_us))[1], rel=1e-6)
        assert row["ratio"] == pytest.approx(sorted(a / p for a, p in zip(acc_us, peft_us))[1], rel=1e-6)
        assert row["overhead_us_q1"] <= row["overhead_us"] <= row["overhead_us_q3"]
        assert 0 < row["ratio_q1"] <= row["ratio"] <= row["ratio_q3"]
    assert all(row["verdict"] in ("yes", "NO", report.NOISY) for row in calls["single_layers"])
    assert "accel - PEFT us per call" in printed and "accel / PEFT" in printed
    assert "| accelerated - PEFT, µs per call | ran |" in block and "| LoRA | 16x16 | 4 | 4 |" in block
    assert "| VeRA | 24x20 | 8 | 4 |" in block


def _run_main_job_without_peft(tmp_path):
    """``python -m bench`` in a fresh interpreter where ``import peft`` fails, stdout and stderr pipes."""
    import subprocess
    import sys

    code = "import sys, runpy; sys.modules['peft'] = None; runpy.run_module('bench', run_name='__main__')"
    args = ["--device", "cpu", "--tokens", "8", "--layers", "24x24", "--vera-r", "4", "--lora-r", "2", "--rounds", "2",
            "--min-seconds", "0", "--impls", "fused_vera,fused_lora,peft_vera,peft_lora,torch_lora", "--per-call",
            "vera:4:24x24:8", "--out", str(tmp_path / "out")]
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_main_job_fails_and_says_why_when_peft_cannot_be_imported(tmp_path):
    done = _run_main_job_without_peft(tmp_path)
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    why = "not available (ModuleNotFoundError: import of peft halted; None in sys.modules)"
    # the last lines name each missing baseline with the reason, and the per-call rows that need PEFT
    tail = " ".join(out.split("Wrote:")[-1].split())
    assert f"error: requested baseline PEFT VeRA {why}" in tail
    assert f"error: requested baseline PEFT LoRA {why}" in tail
    assert f"error: per-call rows (accelerate vs PEFT) not measured: PEFT {why}" in tail
    # the headline comparison says why it is missing, not "use the defaults"
    assert "not in this run (use the defaults)" not in out
    assert f"r=256, fp32: not measured: PEFT VeRA {why}" in " ".join(out.split())
    # what could be measured still was, and is in the JSON
    data = json.loads((tmp_path / "out" / "bench-cpu.json").read_text())
    assert set(data["unavailable"]) == {"peft_vera", "peft_lora"}
    assert data["per_call"]["unavailable"].startswith("not available (ModuleNotFoundError")
    assert {row["unfused_impl"] for row in data["comparisons"]} == {"torch_lora"}
    # stderr is a pipe: no progress bar in it
    assert "bench cpu" not in done.stderr and "it/s" not in done.stderr


def test_progress_bar_only_on_a_terminal():
    import io

    from bench import run

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, shows in ((io.StringIO(), False), (Terminal(), True)):
        bar = run.progress(4, True, "bench cpu", stream=stream)
        bar.update(2)
        bar.set_postfix_str("N=8")
        bar.close()
        assert ("bench cpu" in stream.getvalue()) == shows
    stream = Terminal()
    bar = run.progress(4, False, "bench cpu", stream=stream)  # --no-progress
    bar.update(4)
    bar.close()
    assert stream.getvalue() == ""


def _record(impl: str, strategy: str | None, tokens: int, step_ms: list[float]) -> dict:
    """A measured record as :func:`bench.run.measure_group` writes it, with these per-round step times."""
    spec = cases.IMPLS[impl]
    return {
        "impl": impl, "label": spec.label, "family": spec.family, "fused": spec.fused, "device": "cpu",
        "device_name": "test CPU", "backend": "test", "strategy": strategy, "path": strategy if strategy != "auto" else
        "lean", "fwd_path": None, "dtype": "fp32", "tokens": tokens, "in_features": 64, "out_features": 64, "r": 4,
        "status": "ok", "saved_bytes": 1000, "peak_step_bytes": None, "cuda_kernels_per_step": None,
        "fwd_ms": 1.0, "step_ms": measure.median(step_ms), "step_ms_min": min(step_ms), "step_ms_samples": step_ms,
        "step_rel_spread": measure.relative_spread(step_ms), "step_gflops_per_s": 1.0,
    }


def _noisy_records() -> list[dict]:
    """Fused VeRA (auto, lean, weight) and PEFT VeRA at two token counts, timed on a machine so loaded
    that the noise of every ratio is larger than the ratio itself."""
    wild = [1.0, 9.0, 1.5, 12.0, 2.0]
    out = []
    for tokens in (64, 256):
        out += [_record("fused_vera", "auto", tokens, [v * 1.2 for v in wild]),
                _record("fused_vera", "lean", tokens, [v * 1.1 for v in wild[::-1]]),
                _record("fused_vera", "weight", tokens, [v * 0.9 for v in wild[1:] + wild[:1]]),
                _record("peft_vera", None, tokens, list(wild))]
    return out


def test_ratio_axes_are_log_and_error_bars_never_reach_zero():
    from matplotlib.collections import LineCollection

    from bench import plot

    records = _noisy_records()
    rows, by_strategy = report.compare(records), report.strategy_rows(records)
    auto = [row for row in rows if row["strategy"] == "auto"]
    assert auto and all(row["step_time_ratio_spread"] > row["step_time_ratio"] for row in auto)  # noise > ratio
    fig = plot.figure(records, rows, by_strategy)
    try:
        ratio_axes = fig.axes[2:4]  # one row of panels: time, memory, fused / unfused, auto / best
        assert [ax.get_title().split(":")[0] for ax in ratio_axes] == ["time ratio", "auto vs best strategy"]
        for ax in ratio_axes:
            assert ax.get_yscale() == "log"
            assert ax.get_ylim()[0] > 0
            bars = [seg for c in ax.collections if isinstance(c, LineCollection) for seg in c.get_segments()]
            assert bars and min(float(seg[:, 1].min()) for seg in bars) > 0
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    # Without per-round figures (older JSON), the noise is a factor around the ratio: still above 0.
    mids, (lower, upper) = plot.ratio_bars([{"r": 1.0, "s": 3.0}], "r", "s")
    assert mids == [1.0] and 0 < mids[0] - lower[0] < 1.0 and upper[0] == pytest.approx(3.0)


def test_a_miss_smaller_than_the_noise_is_too_noisy_to_conclude():
    assert report.verdict(1.00, 0.30, 1.05) == "yes"
    assert report.verdict(1.10, 0.20, 1.05) == report.NOISY == "too noisy to conclude"
    assert report.verdict(1.50, 0.10, 1.05) == "NO"
    assert report.verdict(None, None, 1.05) is None
    strategy_rows = [
        {"dtype": "fp32", "in_features": 64, "out_features": 64, "tokens": t, "family": "vera", "r": 4,
         "auto_path": "lean", "best": "lean", "auto_over_best": ratio, "auto_over_best_spread": spread,
         "auto_step_ms": 1.0, "target": 1.05, "verdict": report.verdict(ratio, spread, 1.05)}
        for t, ratio, spread in ((64, 1.10, 0.20), (256, 1.50, 0.10))]
    table = report.format_strategy_table(strategy_rows).splitlines()
    assert table[2].endswith("too noisy") and table[3].endswith("NO")
    assert any("too noisy to conclude" in line for line in table)
    # The fused-vs-unfused table marks a ratio whose noise reaches 1 (this run cannot tell which is faster).
    records = _noisy_records()
    records += [_record("fused_lora", "auto", 64, [1.0, 1.0, 1.0]), _record("peft_lora", None, 64, [2.0, 2.1, 1.9])]
    rows = report.compare(records)
    lines = report.format_table([row for row in rows if row["strategy"] == "auto"], {}, []).splitlines()
    vera = [line for line in lines if " vera " in line]
    lora = [line for line in lines if " lora " in line]
    assert len(vera) == 2 and all(re.search(r"± \d+\.\d\d \?", line) for line in vera)
    assert len(lora) == 1 and "?" not in lora[0] and "0.50 ± 0.0" in lora[0]
    assert any(line.startswith("?: too noisy to conclude") for line in lines)
    # The per-call table, against its target of 1.0.
    section = {"dtype": "fp32", "threads": 2, "rounds": 3, "target": 1.0, "overhead": [], "single_layers": [
        {"label": "VeRA", "family": "vera", "in_features": 384, "out_features": 384, "tokens": 256, "r": 256,
         "status": "ok", "accelerated_ran": "fused (lean)", "peft_us": 1e3, "accelerated_us": 1.05e3, "ratio": 1.05,
         "ratio_q1": 0.9, "ratio_q3": 1.2, "ratio_spread": 0.15}]}
    text = report.format_per_call(section)
    assert "1.05 [0.90, 1.20]  too noisy" in text and "too noisy to conclude" in text
    assert all(len(line) <= report.WIDTH for line in text.splitlines())


def test_load_average_line():
    assert "0.30 before the run, 1.20 after it, on 2 CPUs" in report.format_load([0.3, 1.2], 2, 2)
    assert "busy" not in report.format_load([0.3, 1.2], 2, 2)
    assert "busy machine" in report.format_load([1.5, 1.2], 2, 2)
    assert report.format_load([None, None], 2, 2).startswith("Load average: not available")


def test_per_call_cases_parse():
    from bench import per_call

    assert per_call.parse(per_call.DEFAULT_SPEC) == per_call.SINGLE_LAYERS
    assert [c.spec for c in per_call.SINGLE_LAYERS] == [
        "lora:16:384x384:256", "vera:256:384x384:256", "vera:256:1024x1024:256", "vera:256:1024x1024:2048"]
    assert per_call.parse("none") == ()
    with pytest.raises(ValueError, match="family:r:INxOUT:tokens"):
        per_call.parse("lora:16:384:256")
    with pytest.raises(ValueError, match="family must be one of"):
        per_call.parse("dora:16:384x384:256")


def test_readme_benchmark_figures_are_rendered_from_the_committed_results():
    """The README's benchmark block is the rendering of the results JSON it names (committed), so
    its figures cannot be typed by hand: rerun ``python -m bench --no-progress --out results/cpu
    --readme README.md`` (or ``python -m bench.readme README.md`` after editing the renderer)."""
    block, source = readme.find((ROOT / "README.md").read_text(encoding="utf-8"))
    path = ROOT / source
    assert path.is_file(), f"the README's benchmark block names {source}, which is not in the repository"
    assert block == readme.render(json.loads(path.read_text(encoding="utf-8")), source)


def test_readme_block_must_be_there_once():
    with pytest.raises(ValueError, match="found 0"):
        readme.find("no block")


def test_strategies_are_auto_and_the_backends_candidates():
    cpu = torch.device("cpu")
    assert cases.strategies(cpu, torch.float32) == ("auto", "lean", "weight")
    assert cases.strategies(cpu, torch.bfloat16) == ("auto", "lean")
    assert cases.strategy_label("auto", "weight") == "auto->weight" and cases.strategy_label("lean", "lean") == "lean"
    layer = FusedVeRALinear(nn.Linear(IN, OUT), 4)
    x = torch.randn(N, IN, requires_grad=True)
    for name in ("lean", "weight"):
        assert cases.path_taken(lambda: layer(x).sum().backward(), name) == name
    assert cases.path_taken(lambda: None, "auto") is None  # no fused call: no path, not an earlier one's


def test_issue2_shape_is_in_the_default_cpu_run():
    suite = cases.suite(torch.device("cpu"), "short")
    assert 4096 in suite.tokens and (1024, 1024) in suite.layers and 256 in suite.ranks["vera"]
    assert suite.dtypes == (torch.float32,)


def test_saved_for_backward_counts_each_storage_once_and_skips_parameters():
    class Square(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(IN))

        def forward(self, x):
            y = x * self.w  # saves x (for grad w) and w (a parameter: not counted)
            return y * y  # saves y twice: one storage

    x = torch.randn(N, IN, requires_grad=True)
    saved = measure.saved_for_backward(Square(), x)
    assert saved.total == 2 * N * IN * 4
    assert saved.input == N * IN * 4


@pytest.mark.parametrize("family, make", [
    ("vera", baselines.peft_vera_layer),
    ("lora", baselines.peft_lora_layer),
    ("lora", baselines.TorchLoRALinear),
    ("deep_lora", baselines.TorchDeepLoRALinear),
    ("lorma", baselines.TorchLoRMAPlusLinear),
])
@pytest.mark.parametrize("r", [1, 5])
def test_unfused_model_matches_flop_counter_and_saved_bytes(family, make, r):
    layer = make(nn.Linear(IN, OUT), r)
    x = torch.randn(N, IN, requires_grad=True)
    model = roofline.summary(family, False, N, IN, OUT, r, 4)
    with FlopCounterMode(display=False) as fwd:
        y = layer(x)
    with FlopCounterMode(display=False) as bwd:
        y.backward(torch.randn(N, OUT))
    assert fwd.get_total_flops() == model["forward"]["gemm_flops"]
    assert fwd.get_total_flops() + bwd.get_total_flops() == model["step"]["gemm_flops"]
    assert measure.saved_for_backward(layer, x).total == model["saved_bytes_model"]


def _addmm_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    (m, k), (_, n) = a_shape, b_shape
    return 2 * m * k * n


@pytest.mark.parametrize("r", [1, 6])
def test_fused_vera_model_matches_torch_path_flops_and_saved_bytes(r):
    # The torch backend's forward and backward bodies run plain aten ops the flop counter sees; it
    # has no formula for the in-place addmm_ the forward uses, so it gets addmm's.
    inplace = {torch.ops.aten.addmm_: _addmm_flops}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, IN, generator=gen)
    w, bias = torch.randn(OUT, IN, generator=gen), torch.randn(OUT, generator=gen)
    A, B = torch.randn(r, IN, generator=gen), torch.randn(OUT, r, generator=gen)
    d, b = torch.randn(r, generator=gen), torch.randn(OUT, generator=gen)
    with FlopCounterMode(display=False, custom_mapping=inplace) as fwd:
        xa = ops._lean_forward(x, w, bias, A, B, d, b, 1.0, torch.empty(N, OUT))
    needs = [True, False, False, False, False, True, True]
    with FlopCounterMode(display=False, custom_mapping=inplace) as bwd:
        ops._torch_backward(torch.randn(N, OUT, generator=gen), x, xa, w, A, B, d, b, 1.0, needs, False)
    model = roofline.summary("vera", True, N, IN, OUT, r, 4)
    assert fwd.get_total_flops() == model["forward"]["gemm_flops"]
    assert fwd.get_total_flops() + bwd.get_total_flops() == model["step"]["gemm_flops"]
    layer = FusedVeRALinear(nn.Linear(IN, OUT), r)
    assert measure.saved_for_backward(layer, x.requires_grad_(True)).total == model["saved_bytes_model"] == N * r * 4


@pytest.mark.parametrize("name, launches", [("triton", 4), ("torch", 0)])
def test_triton_launches_of_a_fused_vera_step(name, launches):
    # The design: forward = down projection + one main GEMM, backward = low-rank grads + grad_x GEMM.
    layer = FusedVeRALinear(nn.Linear(IN, OUT), 7)
    x = torch.randn(N, IN, requires_grad=True)
    with pefttriton.use_backend(name), measure.count_triton_launches() as counter:
        layer(x).backward(torch.randn(N, OUT))
    assert counter[0] == launches


def test_roofline_fused_moves_fewer_bytes_and_same_base_flops():
    for family in roofline.FAMILIES:
        fused = roofline.summary(family, True, 4096, 1024, 1024, 16, 2)
        unfused = roofline.summary(family, False, 4096, 1024, 1024, 16, 2)
        assert fused["step"]["bytes"] < unfused["step"]["bytes"]
        assert fused["forward"]["bytes"] < unfused["forward"]["bytes"]
    with pytest.raises(ValueError, match="family must be one of"):
        roofline.summary("dora", True, 8, 8, 8, 2, 4)


def test_probe_says_why_an_adapter_is_missing():
    impl = cases.Impl("x", "lora", True, "X", _missing)
    assert cases.probe(impl) == "not available (ImportError: No module named 'pefttriton.not_here')"
    assert cases.probe(cases.IMPLS["fused_vera"]) is None


def test_relative_spread_is_half_the_interquartile_range_over_the_median():
    assert measure.relative_spread([5.0, 1.0, 3.0, 2.0, 4.0]) == pytest.approx((4 - 2) / 2 / 3)
    assert measure.relative_spread([7.0]) == 0.0


@pytest.mark.parametrize("cls", [baselines.LeanLoRALinear, baselines.LeanVeRALinear])
def test_lean_baselines_against_float64_reference(cls):
    """The lean cuBLAS baselines compute the engine's formula, forward and every gradient, and
    keep no (tokens, out) tensor for backward."""
    from helpers import rel_err

    from pefttriton.ops.naive import lowrank_linear_reference

    torch.manual_seed(0)
    base = nn.Linear(13, 11).double()
    layer = cls(base, 5).double()
    x = torch.randn(7, 13, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    trained = [p for p in layer.parameters() if p.requires_grad]
    if cls is baselines.LeanLoRALinear:
        A, B, d, b, scale = layer.lora_A, layer.lora_B, None, None, layer.scale
    else:
        A, B, d, b, scale = layer.vera_A, layer.vera_B, layer.lambda_d, layer.lambda_b, 1.0
    leaves = {id(t): t.detach().clone().requires_grad_(t.requires_grad) for t in (A, B, d, b) if t is not None}
    x_ref = x.detach().requires_grad_(True)
    ref = lowrank_linear_reference(x_ref, base.weight, base.bias, *[leaves.get(id(t)) if t is not None else None
                                                                    for t in (A, B, d, b)], scale=scale)
    ref.backward(g)
    assert rel_err(y, ref) < 1e-12 and rel_err(x.grad, x_ref.grad) < 1e-12
    for p in trained:
        assert rel_err(p.grad, leaves[id(p)].grad) < 1e-12
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        layer(x)
    assert (7, 5) in shapes and (7, 11) not in shapes  # x A^T kept, nothing of y's size
