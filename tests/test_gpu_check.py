"""``python -m bench.gpu_check``: the GPU check's own code, at tiny shapes on the CPU.

The check itself needs a GPU; its self-test runs the same functions under the Triton interpreter,
so a GPU session finds a script that works. It must stay well under a minute on the CI machines.
The other tests here run pieces of it in-process: the 16-bit adapter-term check against a
deliberately wrong adapter term, the grad-kernel fit, the budget and the verdict.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench import gpu_check

# the GPU check's self-test runs the interpreter (Triton >= 3.9) on the CPU.
pytestmark = pytest.mark.cpu_only

REPO = Path(__file__).resolve().parents[1]


def _run(*args, **env_changes):
    env = {**os.environ, "PYTHONPATH": str(REPO), **env_changes}
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.interpreter
def test_selftest_runs_and_reports(tmp_path):
    proc = _run("--selftest", "--out", str(tmp_path))
    assert proc.returncode == gpu_check.EXIT_PASS, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("VERDICT: PASS")
    report = json.loads((tmp_path / "gpu-check-selftest.json").read_text())
    assert report["meta"]["selftest"] and report["meta"]["interpreter"]
    assert report["verdict"].startswith("PASS") and report["exit_code"] == 0
    statuses = {name: s["status"] for name, s in report["sections"].items()}
    assert list(statuses) == list(gpu_check.SECTION_NAMES)
    assert {n for n, s in statuses.items() if s == "n/a"} == {"configs", "cuda_graphs", "breakdown"}
    assert all(s == "pass" for n, s in statuses.items() if n not in ("configs", "cuda_graphs", "breakdown")), statuses
    assert report["meta"]["triton_cache_dir"].startswith(str(tmp_path.resolve()))
    names = {c["name"] for c in report["checks"]}
    for part in ("odd shape", "large shape", "int32 boundary", "LoRMA-pi (tokens)", "LoRMA-pi (weight)",
                 "torch.compile (aot_eager) vs eager", "autocast bf16 vs fp32 on rounded input"):
        assert any(name.startswith(part) for name in names), part
    assert all(c["ok"] for c in report["checks"]) and not report["errors"]
    # 16 bits: the adapter term and every low-rank gradient are compared on their own
    bf16 = {c["tensor"] for c in report["checks"] if c["dtype"] == "bf16" and c["name"] == "odd shape" and c["kind"] == "vera"}
    assert {"y", "adapter", "grad_A", "grad_B", "grad_d", "grad_b", "grad_x_lowrank", "path"} <= bf16
    # the negative control ran in each correctness section and the adapter-term check flagged it
    controls = {c["dtype"]: c for c in report["checks"] if c.get("control")}
    assert set(controls) == {"bf16", "fp16", "fp32", "tf32"}
    assert all(c["ok"] and "adapter" in c["flagged_by"] for c in controls.values())
    # the device model: every field measured, the fit's residuals, the printed line
    dm = report["device_model"]
    assert dm["model_line"].startswith("DeviceModel(name=") and dm["round_trip_ok"] and not dm["fields_from_static_model"]
    assert set(dm["flops"]["values"]) == {"fp16", "bf16", "fp32", "tf32", "fp64"}
    assert set(dm["triton_gemm"]["values"]) == {"16-bit", "tf32", "fp32"}
    fit = dm["grad_kernel"]["fit"]
    assert math.isfinite(fit["grad_step"]) and len(fit["residuals"]) == len(dm["grad_kernel"]["points"]) == 8
    assert {row["faster"] for row in dm["lowrank_backward"]["rows"]} <= {"kernel", "blas"}
    assert "CPU self-test: meaningless figures" in proc.stdout and dm["model_line"] in proc.stdout
    impls = {t["impl"] for t in report["timings"]}
    assert {"fused lora", "PEFT lora", "lean lora (cuBLAS)", "nn.Linear (frozen)"} <= impls
    assert all("error" not in t for t in report["timings"])
    text = (tmp_path / "gpu-check-selftest.md").read_text()
    assert "CPU self-test" in text and "not GPU figures" in text and "VERDICT: PASS" in text


@pytest.mark.interpreter
def test_sections_not_run_are_listed_and_make_the_run_incomplete(tmp_path):
    """--only: the other sections are listed as skipped and the verdict is INCOMPLETE, with its own
    exit status; one cache warmer runs a later section in a process of its own and is recorded."""
    proc = _run("--selftest", "--out", str(tmp_path), "--only", "compile,autocast", "--jobs", "1")
    assert proc.returncode == gpu_check.EXIT_INCOMPLETE, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("VERDICT: INCOMPLETE (11 sections skipped: preflight, correctness_bf16"), last
    report = json.loads((tmp_path / "gpu-check-selftest.json").read_text())
    assert report["sections"]["compile"]["status"] == report["sections"]["autocast"]["status"] == "pass"
    assert report["sections"]["speed"] == {"status": "skipped", "reason": "not in --only"}
    assert "speed: not in --only" in report["skipped"]
    (warmer,) = report["warmers"]
    assert warmer["sections"] == ["autocast"] and warmer["rc"] is not None
    assert _run("--selftest", "--out", str(tmp_path), "--skip", "nonsense").returncode == gpu_check.EXIT_CANNOT_RUN


@pytest.mark.interpreter
def test_out_of_budget_sections_are_skipped_not_dropped(tmp_path):
    ran = []
    functions = {name: (lambda run, sec, name=name: ran.append(name)) for name in gpu_check.SECTION_NAMES}
    args = SimpleNamespace(budget=-1.0)  # spent before it starts
    run = gpu_check.Run(args, torch.device("cpu"), gpu_check.SIZES["selftest"], False, tmp_path, "t")
    gpu_check.run_sections(run, list(gpu_check.SECTIONS), functions)
    assert ran == []
    assert all(s["status"] == "skipped" and s["reason"].startswith("budget") for s in run.report["sections"].values())
    assert run.report["exit_code"] == gpu_check.EXIT_INCOMPLETE
    assert run.report["verdict"].startswith(f"INCOMPLETE ({len(gpu_check.SECTIONS)} sections skipped")
    # with time, every section runs, in order, each with its share of what is left
    ran.clear()
    run = gpu_check.Run(SimpleNamespace(budget=1e6), torch.device("cpu"), gpu_check.SIZES["selftest"], False, tmp_path, "t")
    gpu_check.run_sections(run, list(gpu_check.SECTIONS), functions)
    assert ran == list(gpu_check.SECTION_NAMES) and run.report["verdict"] == "PASS"
    shares = gpu_check.allotments(gpu_check.SECTIONS, 450.0)
    assert sum(shares) == pytest.approx(450.0) and shares[1] == pytest.approx(110.0)  # correctness_bf16


def test_verdict_and_exit_codes():
    v = gpu_check.verdict
    assert v({"a": {"status": "pass"}, "b": {"status": "n/a"}}, False) == ("PASS", gpu_check.EXIT_PASS)
    text, code = v({"a": {"status": "pass"}, "b": {"status": "skipped"}, "c": {"status": "partial"}}, False)
    assert code == gpu_check.EXIT_INCOMPLETE and text == "INCOMPLETE (1 sections skipped: b; 1 partial: c)"
    text, code = v({"a": {"status": "error"}, "b": {"status": "fail"}, "c": {"status": "not reached"}}, False)
    assert code == gpu_check.EXIT_FAIL and text.startswith("FAIL (a, b; 1 sections skipped: c")
    assert len({gpu_check.EXIT_PASS, gpu_check.EXIT_FAIL, gpu_check.EXIT_CANNOT_RUN, gpu_check.EXIT_INCOMPLETE}) == 4


@pytest.mark.parametrize("dtype_name", ["bf16", "fp16"])
def test_16bit_adapter_term_check_catches_a_wrong_adapter_term(dtype_name):
    """A wrong scale on the low-rank segment fails the adapter-term check in 16 bits; in bf16, 1% wrong
    is below the max-norm tolerance and is caught by the least-squares scale alone."""
    shape = (37, 70, 45, 7)

    def adapter(wrong_scale):
        case = gpu_check.engine_case(torch.device("cpu"), shape, dtype_name, "lora", "lean", wrong_scale=wrong_scale)
        return next(r for r in case["rows"] if r["tensor"] == "adapter"), case

    def passes(row):
        return row["err"] <= row["tol"] and abs(row["fit"]) <= row["fit_tol"]

    right, case = adapter(1.0)
    assert case["path"] == "lean" and all(passes(r) for r in case["rows"]), case["rows"]
    wrong, _ = adapter(gpu_check.WRONG_SCALE)
    assert not passes(wrong) and wrong["err"] > wrong["tol"] and abs(wrong["fit"]) > wrong["fit_tol"]
    if dtype_name == "bf16":
        slightly, _ = adapter(1.01)
        assert slightly["err"] <= slightly["tol"] and abs(slightly["fit"]) > slightly["fit_tol"]


def test_grad_step_fit_recovers_the_model():
    launch, step = 5e-6, 3e-7
    points = [(x, step * x + launch) for x in (256, 256, 512, 1024, 2048)]
    fit = gpu_check.fit_grad_step(points, launch)
    assert fit["grad_step"] == pytest.approx(step) and fit["max_abs_residual"] < 1e-9
    assert fit["free_fit"]["grad_step"] == pytest.approx(step) and fit["free_fit"]["launch"] == pytest.approx(launch)
    off = gpu_check.fit_grad_step([(256, 2 * (step * 256 + launch)), (256, step * 256 + launch)], launch)
    assert off["free_fit"] is None and max(abs(r) for r in off["residuals"]) > 0.1


def test_model_line_round_trips():
    from pefttriton.ops import strategy

    line = gpu_check.model_line(strategy.H100)
    again = eval(line, {"DeviceModel": strategy.DeviceModel})  # noqa: S307
    assert again.flops == pytest.approx(strategy.H100.flops) and again.sms == strategy.H100.sms


def test_without_a_gpu_says_so(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path / "out")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == gpu_check.EXIT_CANNOT_RUN and "needs a CUDA GPU" in proc.stderr
    assert not (tmp_path / "out").exists()
