"""Every shipped Triton kernel compiles for sm_80 and sm_90 at every autotune config, without spills.

The report runs in a subprocess without ``TRITON_INTERPRET`` (the interpreter replaces the jit
functions that the compiler needs). It compiles ahead of time for the GPU targets on this CPU
machine; see ``pefttriton/tools/kernel_report.py``.
"""

import json
import os
import subprocess
import sys

import pytest

from pefttriton.kernels import lorma_pi as lp
from pefttriton.kernels import lowrank_linear as lk
from pefttriton.kernels import vera_bank as vb

TIMEOUT = 900


def _run_report(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pefttriton.tools.kernel_report", "--json", str(out), *args],
        env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )
    return proc, json.loads(out.read_text()) if out.exists() else None


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    proc, results = _run_report(tmp_path_factory.mktemp("report"))
    assert results is not None, proc.stderr[-3000:]
    return proc, results


def test_every_config_compiles_without_spills(report):
    proc, results = report
    bad = [r for r in results if r["error"] or r["stack_bytes"] != 0]
    assert not bad, "\n".join(f"{r['variant']} {r['dtype']} {r['target']} {r['config']}: {r['error'] or r['stack_bytes']}" for r in bad)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_every_shipped_config_and_target_is_covered(report):
    _, results = report
    n_variants = {"_fused_gemm_kernel": 7, "_lowrank_grad_kernel": 6}
    per_dtype = {
        dtype: n_variants["_fused_gemm_kernel"] * len(lk.GEMM_CONFIGS["16-bit" if dtype in ("fp16", "bf16") else dtype])
        + n_variants["_lowrank_grad_kernel"] * len(lk.GRAD_CONFIGS)
        # LoRMA-pi kernels upcast to fp32: compiled for fp32 and tf32 only
        + (sum(len(c) for c in lp.CONFIGS.values()) if dtype in ("fp32", "tf32") else 0)
        # the VeRA bank kernel: fused and split call sites
        + 2 * len(vb.GEMM_CONFIGS["16-bit" if dtype in ("fp16", "bf16") else dtype])
        for dtype in ("fp16", "bf16", "fp32", "tf32")
    }
    for target in ("sm_80", "sm_90"):
        for dtype, expected in per_dtype.items():
            got = [r for r in results if r["target"] == target and r["dtype"] == dtype]
            assert len(got) == expected, (target, dtype, len(got), expected)


def test_tensor_cores_used_for_16_bit_and_tf32(report):
    _, results = report
    for r in results:
        if r["dtype"] in ("fp16", "bf16", "tf32"):
            assert r["tensor_cores"], f"{r['variant']} {r['dtype']} {r['target']} {r['config']} has no mma"
        else:  # fp32 with IEEE dots: FMA only, by design (torch's allow_tf32 is off by default)
            assert not r["tensor_cores"]


def test_report_detects_spills(tmp_path):
    """The check is not vacuous: a tile far too large for the register file must show spills."""
    code = (
        "from pefttriton.tools import kernel_report as kr\n"
        "from pefttriton.kernels import lowrank_linear as lk\n"
        "lk.GEMM_CONFIGS['fp32'] = [lk.gemm_config(256, 256, 32, 4, 2)]\n"
        "r = kr.compile_one(kr.variants()[0], 0, 'fp32', 80)\n"
        "print(r.stack_bytes, r.ok)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    stack, ok = proc.stdout.split()[-2:]
    assert int(stack) > 0 and ok == "False", proc.stdout + proc.stderr[-2000:]
