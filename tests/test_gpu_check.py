"""``python -m bench.gpu_check --selftest``: the GPU check's own code, at tiny shapes on the CPU.

The check itself needs a GPU; its self-test runs the same functions under the Triton interpreter,
so a GPU session finds a script that works. It must stay under 3 minutes on the CI machines.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# the GPU check's self-test runs the interpreter (Triton >= 3.9) on the CPU.
pytestmark = pytest.mark.cpu_only

REPO = Path(__file__).resolve().parents[1]


def test_selftest_runs_and_reports(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--selftest", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check-selftest.json").read_text())
    assert report["meta"]["selftest"] and report["meta"]["interpreter"]
    names = {c["name"] for c in report["checks"]}
    for part in ("odd shape", "large shape", "int32 boundary", "LoRMA-pi (tokens)", "LoRMA-pi (weight)",
                 "torch.compile (aot_eager) vs eager", "autocast bf16 vs fp32 on rounded input"):
        assert any(name.startswith(part) for name in names), part
    assert all(c["ok"] for c in report["checks"]) and not report["errors"]
    impls = {t["impl"] for t in report["timings"]}
    assert {"fused lora", "PEFT lora", "lean lora (cuBLAS)", "nn.Linear (frozen)"} <= impls
    assert all("error" not in t for t in report["timings"])
    text = (tmp_path / "gpu-check-selftest.md").read_text()
    assert "CPU self-test" in text and "not GPU figures" in text


def test_without_a_gpu_says_so():
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr
