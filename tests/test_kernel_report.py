"""Every shipped Triton kernel compiles for sm_80 and sm_90 at every autotune config, without spills.

Compiling every (call site, config, dtype, target) takes minutes, so the full report is committed
(``results/kernel-report.json``, written by ``python -m pefttriton.tools.kernel_report --update``)
and read here, after checking that it covers today's code: its fingerprint holds the hash of the
kernel sources and of every job's specification, and both must match what the tool computes now
(else the tests fail with the command that regenerates it). The installed Triton then compiles a
sample afresh: per call site and target the row nearest to spilling (the most registers), per
kernel and target the unaligned row nearest to it, and a tile that must spill (the negative
control). With the Triton that wrote the report, the fresh rows equal the committed ones, which
shows that the committed figures are real; with another, they must still not spill.

The compiler runs in a subprocess without ``TRITON_INTERPRET`` (the interpreter replaces the jit
functions that the compiler needs), started in the background with the test session
(tests/background.py), ahead of time for the GPU targets on this CPU machine; see
``pefttriton/tools/kernel_report.py``.
"""

import json
from pathlib import Path

import pytest
import torch

from pefttriton.kernels import lorma_pi as lp
from pefttriton.kernels import lowrank_linear as lk
from pefttriton.kernels import lowrank_linear_4bit as l4
from pefttriton.kernels import vera_bank as vb
from pefttriton.tools import kernel_report as kr

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "results" / "kernel-report.json"
REGENERATE = f"`{kr.UPDATE_COMMAND} --workers 2` from the repository root (a few minutes)"
TIMEOUT = 600
TARGETS = ("sm_80", "sm_90")
# Largest shared memory one block may use: 163 KiB on A100 (sm_80), 227 KiB on H100 (sm_90).
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}

# Call sites whose unaligned specialisation spills in the committed report (issue 20 item 11,
# results/kernel-report.md): the largest GEMM tiles (the 4-bit GEMM's too: its "aligned" names W's
# quantization layout, not the integer arguments), one LoRMA-pi tile, two fp32 low-rank backward
# rows. Strict: once the kernels are fixed and the report regenerated, the test passes and fails
# the run until its name leaves this list.
UNALIGNED_SPILLS = {
    "forward (VeRA: d, b, bias)", "forward (LoRA: scale, bias)", "down projection x A^T", "grad_x = g W + gh A",
    "split: y += b * (h B^T) (VeRA)", "split: y = base32 + bias + b * (h B^T)", "split: grad_x += gh A",
    "VeRA bank: x W^T + bias + b[ids] (h B^T)", "VeRA bank split: base32 + b[ids] (h B^T)",
    "LoRMA-pi: M = s shift(B A)", "LoRMA-pi: grad_A = s B^T unshift(G)",
    "low-rank grads (VeRA, BLOCK_R=32)", "low-rank grads (LoRA, BLOCK_R=64)",
    "4-bit forward (LoRA), aligned", "4-bit forward (LoRA), aligned, nested absmax",
    "4-bit grad_x = g W + gh A, aligned", "4-bit grad_x = g W + gh A, aligned, nested absmax",
}


def _describe(r: dict) -> str:
    kind = "aligned" if r["aligned"] else "unaligned"
    return f"{r['variant']} {kind} {r['dtype']} {r['target']} {r['config']}: {r['error'] or r['stack_bytes']}"


def _problems(rows: list[dict], spills: bool = True) -> list[str]:
    """Rows that failed to compile, use more shared memory than a block may, or (``spills``) spill."""
    return [
        _describe(r) for r in rows
        if r["error"] or r["shared_bytes"] > SHARED_LIMIT[r["target"]] or (spills and r["stack_bytes"] != 0)
    ]


@pytest.fixture(scope="module")
def committed():
    return json.loads(REPORT.read_text())


# ------------------------------------------------------------------------------ the committed report


def test_committed_report_covers_todays_kernels_and_jobs(committed):
    fingerprint = committed["fingerprint"]
    assert fingerprint["kernel_sources"] == kr.kernel_sources_hash(), (
        f"kernels/*.py changed since {REPORT.name} was written: run {REGENERATE}")
    today = {kr.job_key(job) for job in kr.jobs()}
    keys = [kr.row_key(r) for r in committed["results"]]
    assert len(keys) == len(set(keys)) == fingerprint["n_jobs"], "rows repeated or missing in the report"
    missing, stale = sorted(today - set(keys)), sorted(set(keys) - today)
    assert not missing and not stale, f"jobs not in the report {missing[:3]}, rows of no job {stale[:3]}: run {REGENERATE}"
    # the same jobs by name, but compiled differently (signature, constants, alignment hints, warps)
    assert fingerprint["jobs"] == kr.fingerprint()["jobs"], f"the jobs' specifications changed: run {REGENERATE}"


def test_comments_do_not_count_as_kernel_changes():
    source = 'x = "# not a comment"  # a comment\n\n# a comment line\ny = 1   \n'
    assert kr.code_without_comments(source) == 'x = "# not a comment"\ny = 1'
    assert kr.code_without_comments(source.replace("y = 1", "y = 2")) != kr.code_without_comments(source)


def test_every_kernel_compiles_and_the_aligned_ones_do_not_spill(committed):
    rows = committed["results"]
    bad = _problems([r for r in rows if r["aligned"]]) + _problems([r for r in rows if not r["aligned"]], spills=False)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("variant", [
    pytest.param(v.name, marks=pytest.mark.xfail(strict=True, reason="known spills, issue 20 item 11"))
    if v.name in UNALIGNED_SPILLS else v.name
    for v in kr.variants() if not v.descriptors  # tensor descriptors (TMA) exist for aligned tensors only
])
def test_unaligned_specialisation_does_not_spill(committed, variant):
    rows = [r for r in committed["results"] if r["variant"] == variant and not r["aligned"]]
    assert rows
    spilling = [_describe(r) for r in rows if r["stack_bytes"] != 0]
    assert not spilling, "\n".join(spilling)


def test_every_shipped_config_and_target_is_covered(committed):
    rows = committed["results"]
    n_variants = {"_fused_gemm_kernel": 7, "_lowrank_grad_kernel": 6}

    def family(dtype):
        return "16-bit" if dtype in ("fp16", "bf16") else dtype

    def four_bit(dtype):  # 3 call sites x (aligned nested, aligned, odd width nested)
        ptr = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype, torch.float32)
        precision = "tf32" if dtype == "tf32" else "ieee"
        return sum(len(l4.config_family(ptr, precision, layout, 64, transposed))
                   for layout in (l4.ALIGNED, l4.ALIGNED, l4.UNPAIRED) for transposed in (False, False, True))

    per_dtype = {
        dtype: n_variants["_fused_gemm_kernel"] * len(lk.GEMM_CONFIGS[family(dtype)])
        + n_variants["_lowrank_grad_kernel"] * len(lk.GRAD_CONFIGS)
        # LoRMA-pi kernels upcast to fp32: compiled for fp32 and tf32 only
        + (sum(len(c) for c in lp.CONFIGS.values()) if dtype in ("fp32", "tf32") else 0)
        # the VeRA bank kernel: fused and split call sites
        + 2 * len(vb.GEMM_CONFIGS[family(dtype)])
        # the three dropout call sites, with their own configs
        + 3 * len(lk.DROPOUT_CONFIGS["16-bit" if dtype in ("fp16", "bf16") else "fp32"])
        + four_bit(dtype)
        for dtype in ("fp16", "bf16", "fp32", "tf32")
    }
    # the Hopper GEMM: two call sites, sm_90 only, 16-bit and TF32 only
    tma = {dtype: 2 * len(lk.TMA_CONFIGS[family(dtype)]) if dtype != "fp32" else 0 for dtype in per_dtype}
    call_sites = {"fp16": 15 + 3 + 9, "bf16": 15 + 3 + 9, "fp32": 18 + 3 + 9, "tf32": 18 + 3 + 9}
    for target in TARGETS:
        for dtype, expected in per_dtype.items():
            got = [r for r in rows if r["target"] == target and r["dtype"] == dtype]
            aligned = [r for r in got if r["aligned"]]
            expected_here = expected + (tma[dtype] if target == "sm_90" else 0)
            assert len(aligned) == expected_here, (target, dtype, len(aligned), expected_here)
            # one unaligned row per call site, at one of its shipped configs (TMA: aligned tensors only)
            unaligned = [r for r in got if not r["aligned"]]
            assert len({r["variant"] for r in unaligned}) == len(unaligned) == call_sites[dtype], (target, dtype)
            shipped = {(r["variant"], r["config"]) for r in aligned}
            assert all((r["variant"], r["config"]) in shipped for r in unaligned)


def test_the_hopper_gemm_uses_tma_and_the_others_do_not(committed):
    rows = [r for r in committed["results"] if not r["error"]]
    hopper = [r for r in rows if r["kernel"] == "_fused_gemm_tma_kernel"]
    assert hopper and all(r["tma"] and r["tensor_cores"] and r["target"] == "sm_90" for r in hopper)
    assert not any(r["tma"] for r in rows if r["kernel"] != "_fused_gemm_tma_kernel")
