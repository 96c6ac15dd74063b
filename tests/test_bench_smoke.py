"""The benchmark's main job and its measurements, on tiny shapes, so CI covers ``python -m bench``.

Expected values come from the formulas of the layers (which tensors autograd must keep, how many
multiply-adds each product costs), or from ``torch.utils.flop_counter``, never from the code under test.
"""

import importlib
import json
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
    tokens, n, m, r = (32, 80), 48, 40, 8
    doc = tmp_path / "README.md"
    doc.write_text("# Title\n\nbefore\n<!-- bench:begin old.json -->\ntyped 1.01 ± 0.02\n<!-- bench:end -->\nafter\n")
    code = cli.main([
        "--device", "cpu", "--tokens", ",".join(map(str, tokens)), "--layers", f"{n}x{m}", "--vera-r", str(r),
        "--lora-r", "3", "--rounds", "2", "--min-seconds", "0", "--no-progress", "--out", str(tmp_path / "out"),
        "--impls", "fused_vera,peft_vera,peft_lora,torch_lora,torch_deep_lora,torch_lorma,fused_lorma",
        "--readme", str(doc),
    ])
    printed = capsys.readouterr().out
    assert code == 0
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
