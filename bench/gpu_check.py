"""One command that answers, on one GPU in 8 minutes: is every Triton path right, how fast is it, and
what are this GPU's figures for the cost model.

    python -m bench.gpu_check [--out results] [--budget 450] [--cache-dir DIR] [--jobs 6] [--skip A,B] [--only A,B]
    python -m bench.gpu_check --selftest [--out DIR]      # the same code, tiny shapes, CPU interpreter

Sections, in this order, each in its own try/except, each given a slice of the budget:

  preflight          versions, the device, one trivial Triton kernel in a subprocess (a launcher that
                     cannot be built is said so plainly; nothing else runs then)
  correctness_bf16   the engine's forward and every gradient against float64 on the same device at odd
  correctness_fp16   shapes, every strategy (fused, split, lean; weight in fp32 / tf32), VeRA-style (d, b)
  correctness_fp32   and LoRA-style inputs; y, the adapter term ``y - x W^T - bias`` and every gradient
  correctness_tf32   (and grad_x's low-rank part), each against its own size, plus a least-squares scale
                     of each on its reference (a wrong scale cannot hide in rounding); a negative control
                     (the adapter term scaled by 1.05) must be flagged
  large_shape        16391 tokens, 4096 -> 11008, r = 256, bf16
  configs            every shipped autotune config forced one at a time (GPU only)
  int32_boundary     tokens x features > 2**31 (about 30 GB; skipped, and said so, without the room);
                     references built from rows and chunks, never whole float64 copies
  lorma_pi           LoRMA-pi in both orders, each dtype
  compile            ``torch.compile`` against eager
  cuda_graphs        replay against eager after ``pefttriton.warmup``, and at a never-seen token count
                     (the launcher skips the autotuner inside the capture) (GPU only)
  autocast           bf16 autocast of an fp32 layer
  device_model       the cost model's figures measured (:class:`pefttriton.ops.strategy.DeviceModel`):
                     vendor-BLAS GEMM rate per dtype, copy bandwidth, launch overhead, the Triton GEMM's
                     rate over the BLAS's per dot family, the low-rank backward kernel at r = 16 / 64 /
                     256 x 2048 / 8192 tokens fitted to its waves x steps model (residuals reported); the
                     two low-rank backwards of the Triton paths timed against each other beside what the
                     model picks; prints a ``DeviceModel(...)`` line ready to paste into ``MODELS``
  speed              each adapter in each strategy (``auto`` after ``pefttriton.warmup``) against PEFT,
                     the lean cuBLAS baselines and a frozen nn.Linear; peak memory, bytes saved
  breakdown          CUDA time per kernel of one fused LoRA step against cuBLAS (GPU only)
  retune             the first step at a never-seen token count (autotuning) against the steady step

Compiles: a few hundred cold Triton compiles would not fit one after another, so while the main run
does bf16 correctness, ``--jobs`` cache warmers (this check with ``--only``, one group of later
sections each, default 6 processes on a GPU) compile ahead into the shared caches; they are stopped
before the timed sections (device_model on) and what they find is discarded.

Budget: ``--budget`` seconds from the start of the process (default 450, about 8 minutes with the
start-up). A section gets the time left times its weight over the weights of the sections still to
run (time one section leaves unused goes to the later ones); it is skipped when that is below its
minimum, and a section that runs out of its slice stops and lists what it left out. The last line
printed is ``VERDICT: PASS | FAIL (...) | INCOMPLETE (n sections skipped...)``; exit status 0 PASS,
1 FAIL (a check failed, or a section raised), 3 INCOMPLETE (nothing failed but a section, or part of
one, was skipped), 2 could not run (no GPU, bad arguments). ``TRITON_CACHE_DIR`` and
``TORCHINDUCTOR_CACHE_DIR`` are put under ``--cache-dir`` (default ``<out>/cache``): a rerun reuses
the compiles. ``gpu-check-<device>.json`` (rewritten after every section) and ``.md`` go to ``--out``.

The self-test needs the Triton used on the CPU machines (its interpreter, triton >= 3.9); on a GPU
nothing falls back to the interpreter.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.metadata
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

T0 = time.monotonic()

EXIT_PASS, EXIT_FAIL, EXIT_CANNOT_RUN, EXIT_INCOMPLETE = 0, 1, 2, 3

# Unit roundoff of each compute type (tf32: 10 stored mantissa bits).
UNIT = {"bf16": 2.0**-8, "fp16": 2.0**-11, "tf32": 2.0**-11, "fp32": 2.0**-24, "fp64": 2.0**-53}
# Max-norm tolerance: max |got - ref| / max |ref| of each quantity against its own size (16 bits:
# six units of roundoff; tf32 rounds both factors of every product).
TOL = {"bf16": 6 * UNIT["bf16"], "fp16": 6 * UNIT["fp16"], "tf32": 1.5e-2, "fp32": 2e-5}
# Scale tolerance: |<got, ref> / <ref, ref> - 1|. Round-to-nearest errors are unbiased and average out
# over the many entries, so a systematic scale error (a wrong scale on the low-rank segment) shows
# far below the max-norm tolerance. One unit of roundoff for 16 bits.
# tf32: the hardware may truncate fp32 inputs to tf32 instead of rounding them, a bias of about
# 7e-4 per product (1.4e-3 for two chained products), hence 5e-3.
FIT_TOL = {"bf16": UNIT["bf16"], "fp16": UNIT["fp16"], "tf32": 5e-3, "fp32": 2e-6}
# A difference (the adapter term y - x W^T - bias, grad_x's low-rank part) carries the error of the
# whole it is taken from, in units of roundoff times max|whole| / max|part|: 16 bits and fp32 round
# the whole once or twice (split, lean: the base GEMM's output, then the sum), tf32 computes it.
WHOLE_ERROR = {"bf16": 1.5, "fp16": 1.5, "tf32": 8.0, "fp32": 1.5}
# The negative control: the adapter term scaled by this must be flagged.
WRONG_SCALE = 1.05
# The rule the check used before: max |y - ref| / max |ref| <= 3e-2 for bf16 (reported beside the
# negative control: whether it alone would have let the wrong adapter term through).
OLD_Y_TOL = {"bf16": 3e-2, "fp16": 5e-3, "tf32": 5e-3, "fp32": 1e-5}

# The interpreter of triton 3.6 cannot run the kernels (``range(0, tl.cdiv(K, BLOCK_K))`` fails:
# "only 0-dimensional arrays can be converted to Python scalars"); 3.9 runs them all.
SELFTEST_TRITON = (3, 9)


@dataclass(frozen=True)
class Section:
    name: str
    weight: float  # its seconds of the default 450-s budget; the share of the time left it gets
    minimum: float  # least seconds worth starting (GPU; the self-test needs none)
    gpu_only: bool = False


SECTIONS = (  # bf16 correctness compiles its kernels itself; the cache warmers build the later sections'
    Section("preflight", 15, 5),
    Section("correctness_bf16", 110, 15),
    Section("correctness_fp16", 30, 10),
    Section("correctness_fp32", 25, 8),
    Section("correctness_tf32", 25, 8),
    Section("large_shape", 15, 5),
    Section("configs", 30, 10, gpu_only=True),
    Section("int32_boundary", 25, 10),
    Section("lorma_pi", 20, 8),
    Section("compile", 25, 10),
    Section("cuda_graphs", 8, 4, gpu_only=True),
    Section("autocast", 5, 2),
    Section("device_model", 45, 15),
    Section("speed", 60, 15),
    Section("breakdown", 8, 3, gpu_only=True),
    Section("retune", 4, 2),
)
SECTION_NAMES = tuple(s.name for s in SECTIONS)
# Sections whose timings a busy GPU would spoil: the cache warmers are stopped before the first of them.
QUIET_SECTIONS = ("device_model", "speed", "breakdown", "retune")
# Cold Triton compiles (one per kernel variant and autotune config, about a second each, a few hundred
# in all) would not fit the budget one after another. While the main run does its first section after
# the preflight, cache warmers (this check run with --only on one group each, in processes of their
# own, sharing TRITON_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR) compile what the later sections need, so
# those find their kernels built. They never run int32_boundary (memory) nor retune (it measures the
# first step's compiles and autotuning), are stopped before the first quiet section, and what they
# find is discarded.
WARM_GROUPS = (("correctness_fp16",), ("correctness_fp32", "correctness_tf32"), ("large_shape", "configs"),
               ("lorma_pi", "compile", "cuda_graphs", "autocast"), ("device_model",), ("speed", "breakdown"))

SIZES = {
    "gpu": {
        "odd": [(1031, 997, 1013, 1), (1031, 997, 1013, 33), (517, 130, 2049, 130)],
        "large": (16391, 4096, 11008, 256),
        "int32": (524_419, 4096, 4100, 16),  # 524419 * 4100 > 2**31 (y); * 4096 > 2**31 (x)
        "config_shape": (1031, 997, 1013, 33),
        "graph_unseen_tokens": 300,  # a token bucket (512) no other section runs at 997 -> 1013
        "timing_layer": (4096, 4096),
        "timing_tokens": (2048, 8192),
        "ranks": {"vera": 256, "lora": 16, "deep_lora": 16, "lorma": 16},
        "reps": 20,
        "warmup": 2,
        "retune_tokens": 4095,
        "dm": {"gemm": 8192, "copy_bytes": 2**30, "launch_calls": 200, "triton_gemm": (8192, 4096, 4096),
               "grad_ranks": (16, 64, 256), "grad_tokens": (2048, 8192), "grad_in": 4096, "grad_out": 4096,
               "compare_ranks": (16, 64, 256), "compare_tokens": (2048, 8192), "reps": 20, "warmup": 2},
    },
    "selftest": {
        "odd": [(37, 70, 45, 1), (37, 70, 45, 7)],
        "large": (131, 19, 83, 33),
        "int32": (67, 29, 31, 3),  # the int32 code path at a size the interpreter runs in seconds
        "config_shape": (37, 70, 45, 7),
        "graph_unseen_tokens": 5,
        "timing_layer": (48, 40),
        "timing_tokens": (16,),
        "ranks": {"vera": 8, "lora": 4, "deep_lora": 4, "lorma": 4},
        "reps": 3,
        "warmup": 1,
        "retune_tokens": 17,
        "dm": {"gemm": 64, "copy_bytes": 2**22, "launch_calls": 5, "triton_gemm": (64, 48, 40),
               "grad_ranks": (4, 80), "grad_tokens": (16, 80), "grad_in": 24, "grad_out": 32,
               "compare_ranks": (4,), "compare_tokens": (16,), "reps": 1, "warmup": 0},
    },
}

NAMES = ("x", "weight", "bias", "A", "B", "d", "b")
TRITON_MODES = ("fused", "split")


class Interrupted(BaseException):
    """SIGTERM (a time cap): the run stops, writes what it has and says INCOMPLETE."""


# ------------------------------------------------------------------------------------ the run


class SectionRun:
    """One section's clock and what it left out."""

    def __init__(self, name: str, allotted: float) -> None:
        self.name, self.allotted = name, allotted
        self.start = time.monotonic()
        self.deadline = self.start + allotted
        self.left_out: list[str] = []
        self.skipped_reason: str | None = None  # the whole section found it could not run
        self.notes: dict = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def out_of_time(self) -> bool:
        return self.left() <= 0

    def leave_out(self, what: str) -> None:
        self.left_out.append(what)

    def skip_section(self, reason: str) -> None:
        self.skipped_reason = reason


class Run:
    """The report, the budget and the files."""

    def __init__(self, args, device, sizes: dict, selftest: bool, out: Path, slug: str) -> None:
        self.device, self.sizes, self.selftest, self.out, self.slug = device, sizes, selftest, out, slug
        self.trivial_kernel: dict | None = None  # the preflight's subprocess, started before the imports
        self.jobs, self.cache = getattr(args, "jobs", 0), Path(getattr(args, "cache_dir", None) or out / "cache")
        self.warmers: list[dict] = []  # the cache warmers' processes (see WARM_GROUPS)
        self.warm_started = False
        self.deadline = T0 + args.budget
        self.report: dict = {
            "meta": {}, "budget_s": args.budget,
            "sections": {s.name: {"status": "not reached"} for s in SECTIONS},
            "checks": [], "timings": [], "device_model": {}, "breakdown": {}, "retune": {},
            "skipped": [], "errors": [],
        }

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def check(self, sec: SectionRun, name: str, dtype: str, shape, tensor: str, err: float, tol: float,
              fit: float | None = None, fit_tol: float | None = None, **extra) -> dict:
        ok = math.isfinite(err) and err <= tol
        if fit_tol is not None:
            ok = ok and fit is not None and math.isfinite(fit) and abs(fit) <= fit_tol
        row = {"section": sec.name, "name": name, "dtype": dtype, "shape": list(shape), "tensor": tensor,
               "err": err, "tol": tol, "scale_err": fit, "scale_tol": fit_tol, "ok": ok, **extra}
        self.report["checks"].append(row)
        return row

    def fail(self, sec: SectionRun, name: str, dtype: str, shape, exc: BaseException, **extra) -> None:
        """A case that raised: a failed check (the run goes on)."""
        msg = f"{type(exc).__name__}: {exc}"[:500]
        self.report["checks"].append({"section": sec.name, "name": name, "dtype": dtype, "shape": list(shape),
                                      "tensor": "(raised)", "err": math.nan, "tol": 0.0, "ok": False,
                                      "error": msg, **extra})
        print(f"  [{sec.name}] {name} {dtype} {list(shape)} raised {msg[:200]}", file=sys.stderr, flush=True)

    def flush(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - T0, 1)
        self.report["verdict"], self.report["exit_code"] = verdict(self.report["sections"], self.selftest)
        path = self.out / f"gpu-check-{self.slug}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.report, indent=1, default=str), encoding="utf-8")
        os.replace(tmp, path)


def allotments(sections, left: float) -> list[float]:
    """Seconds for each of ``sections`` (those still to run, in order) out of ``left``: the first gets
    ``left * its weight / the sum of all their weights`` (what it leaves unused goes to the later ones)."""
    total = sum(s.weight for s in sections)
    return [left * s.weight / total if total else 0.0 for s in sections]


def verdict(sections: dict, selftest: bool) -> tuple[str, int]:
    """(the verdict, the exit status) of a run's sections (``{name: {"status": ...}}``)."""
    failed = [n for n, s in sections.items() if s.get("status") in ("fail", "error")]
    skipped = [n for n, s in sections.items() if s.get("status") in ("skipped", "not reached", "running", "interrupted")]
    partial = [n for n, s in sections.items() if s.get("status") == "partial"]
    na = [n for n, s in sections.items() if s.get("status") == "n/a"]
    missing = f"{len(skipped)} sections skipped" + (f": {', '.join(skipped)}" if skipped else "")
    if partial:
        missing += f"; {len(partial)} partial: {', '.join(partial)}"
    if failed:
        return f"FAIL ({', '.join(failed)}" + (f"; {missing}" if skipped or partial else "") + ")", EXIT_FAIL
    if skipped or partial:
        return f"INCOMPLETE ({missing})", EXIT_INCOMPLETE
    if selftest:
        return (f"PASS (CPU self-test: the check's own code at tiny sizes, not GPU figures; "
                f"GPU only, not run: {', '.join(na) or 'none'})"), EXIT_PASS
    return "PASS", EXIT_PASS


def start_warmers(run: Run, later: list[str]) -> None:
    """Starts up to ``run.jobs`` cache warmers for the sections of ``later`` (see :data:`WARM_GROUPS`)."""
    run.warm_started = True
    groups = [[name for name in group if name in later] for group in WARM_GROUPS]
    groups = [group for group in groups if group]
    jobs = min(run.jobs, len(groups))
    if jobs <= 0:
        return
    module = __spec__.name if __spec__ is not None else "bench.gpu_check"
    for i in range(jobs):
        group = [name for g in groups[i::jobs] for name in g]
        folder = run.cache / "warm" / str(i)
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", module, "--only", ",".join(group), "--jobs", "0", "--out", str(folder),
                   "--cache-dir", str(run.cache), "--budget", f"{max(30.0, run.left()):.0f}",
                   "--parent-pid", str(os.getpid())] + (["--selftest"] if run.selftest else [])
        log = open(folder / "log.txt", "w", encoding="utf-8")  # noqa: SIM115 - closed by stop_warmers
        try:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd())
        except OSError as exc:
            log.close()
            run.report.setdefault("warmers", []).append({"sections": group, "error": f"{type(exc).__name__}: {exc}"})
            continue
        run.warmers.append({"sections": group, "proc": proc, "log": log, "started": time.monotonic(),
                            "folder": str(folder)})
    print(f"[warmers] {len(run.warmers)} cache warmers: " + "; ".join(",".join(w["sections"]) for w in run.warmers),
          file=sys.stderr, flush=True)


def stop_warmers(run: Run, why: str) -> None:
    """Stops the cache warmers still running (SIGTERM, then SIGKILL after 10 s) and records them."""
    if not run.warmers:
        return
    for w in run.warmers:
        if w["proc"].poll() is None:
            w["proc"].terminate()
    for w in run.warmers:
        stopped = w["proc"].returncode is None
        try:
            w["proc"].wait(timeout=10)
        except subprocess.TimeoutExpired:
            w["proc"].kill()
            w["proc"].wait()
        w["log"].close()
        run.report.setdefault("warmers", []).append({
            "sections": w["sections"], "rc": w["proc"].returncode, "stopped": stopped, "why": why,
            "seconds": round(time.monotonic() - w["started"], 1), "folder": w["folder"]})
    print(f"[warmers] stopped ({why}): " + "; ".join(f"{','.join(w['sections'])} rc {w['proc'].returncode}"
                                                      for w in run.warmers), file=sys.stderr, flush=True)
    run.warmers = []


def run_sections(run: Run, chosen: list[Section], functions: dict) -> None:
    sections = run.report["sections"]
    todo = list(chosen)
    stop_reason = None
    while todo:
        section = todo.pop(0)
        state = sections[section.name]
        if stop_reason:
            state.update(status="skipped", reason=stop_reason)
            run.report["skipped"].append(f"{section.name}: {stop_reason}")
            continue
        allotted = allotments([section, *todo], run.left())[0]
        minimum = 0.0 if run.selftest else section.minimum
        if allotted <= 0 or allotted < minimum:
            reason = f"budget: {max(run.left(), 0):.0f} s left, its share {max(allotted, 0):.0f} s < {minimum:.0f} s"
            state.update(status="skipped", reason=reason)
            run.report["skipped"].append(f"{section.name}: {reason}")
            print(f"[{section.name}] skipped ({reason})", file=sys.stderr, flush=True)
            run.flush()
            continue
        if section.name in QUIET_SECTIONS:
            stop_warmers(run, f"before {section.name}")
        elif section.name != "preflight" and not run.warm_started:
            start_warmers(run, [s.name for s in todo if s.name != "int32_boundary"])
        sec = SectionRun(section.name, allotted)
        cpu0 = time.process_time()
        state.clear()
        state.update(status="running", allotted_s=round(allotted, 1))
        print(f"[{section.name}] start: {allotted:.0f} s of {run.left():.0f} s left", file=sys.stderr, flush=True)
        if not run.selftest:  # a run killed inside this section leaves it marked "running"
            run.flush()
        error = None
        try:
            functions[section.name](run, sec)
        except Interrupted:
            state.update(status="interrupted", seconds=round(time.monotonic() - sec.start, 1))
            run.report["errors"].append(f"{section.name}: interrupted (SIGTERM)")
            stop_reason = "interrupted (SIGTERM)"
            continue
        except Exception as exc:  # noqa: BLE001 - a section that raises fails; the others still run
            error = f"{type(exc).__name__}: {exc}"[:800]
            run.report["errors"].append(f"{section.name}: {error}")
            print(f"[{section.name}] ERROR {error[:300]}", file=sys.stderr, flush=True)
        finally:
            if run.device.type == "cuda":  # what the section held goes back to the GPU (gc: 0.3 s, CUDA only)
                import torch

                gc.collect()
                torch.cuda.empty_cache()
        failed = [c for c in run.report["checks"] if c["section"] == section.name and not c["ok"]]
        if error:
            status = "error"
        elif failed:
            status = "fail"
        elif sec.skipped_reason:
            status = "skipped"
        elif sec.left_out:
            status = "partial"
        else:
            status = "pass"
        checks = sum(c["section"] == section.name for c in run.report["checks"])
        state.update(status=status, seconds=round(time.monotonic() - sec.start, 1),
                     cpu_s=round(time.process_time() - cpu0, 1), checks=checks,
                     failed=len(failed), **({"error": error} if error else {}),
                     **({"reason": sec.skipped_reason} if sec.skipped_reason else {}),
                     **({"left_out": sec.left_out} if sec.left_out else {}), **sec.notes)
        for what in sec.left_out:
            run.report["skipped"].append(f"{section.name}: {what}")
        if sec.skipped_reason:
            run.report["skipped"].append(f"{section.name}: {sec.skipped_reason}")
        print(f"[{section.name}] {status} in {state['seconds']} s ({checks} checks, {len(failed)} failed)",
              file=sys.stderr, flush=True)
        if section.name == "preflight" and status != "pass":
            stop_reason = "preflight failed: " + (error or "; ".join(state.get("problems", [])) or "see preflight")[:300]
        run.flush()


# ------------------------------------------------------------------------------------ helpers


def errors(got, ref) -> tuple[float, float]:
    """(max |got - ref| / max |ref|, <got, ref> / <ref, ref> - 1), in float64."""
    import torch

    got, ref = got.detach().to(torch.float64), ref.detach().to(torch.float64)
    if got.shape != ref.shape:
        return math.inf, math.inf
    if got.numel() == 0:
        return 0.0, 0.0
    if not torch.isfinite(got).all():
        return math.nan, math.nan
    top = ref.abs().max().item()
    diff = (got - ref).abs().max().item()
    err = diff / top if top > 0 else (0.0 if diff == 0 else math.inf)
    norm = (ref * ref).sum().item()
    fit = (got * ref).sum().item() / norm - 1.0 if norm > 0 else (0.0 if diff == 0 else math.inf)
    return err, fit


def metrics(dtype_name: str, pairs: list[tuple]) -> list[dict]:
    """One row per ``(tensor, got, ref[, whole_ref])``: the errors and their tolerances. A quantity
    that is a difference (the adapter term ``y - x W^T - bias``) carries the error of the whole it
    was taken from (:data:`WHOLE_ERROR`) in its tolerance."""
    rows = []
    for pair in pairs:
        tensor, got, ref = pair[:3]
        err, fit = errors(got, ref)
        tol = TOL[dtype_name]
        if len(pair) > 3:
            top = ref.abs().max().item()
            tol += WHOLE_ERROR[dtype_name] * UNIT[dtype_name] * (pair[3].abs().max().item() / top if top > 0 else 0.0)
        # the scale is an average over the entries: its noise shrinks with their number (a single
        # entry, grad_d at r = 1, is as noisy as the max-norm error)
        fit_tol = max(FIT_TOL[dtype_name], TOL[dtype_name] / math.sqrt(max(1, ref.numel())))
        rows.append({"tensor": tensor, "err": err, "tol": tol, "fit": fit, "fit_tol": fit_tol})
    return rows


def dtype_of(name: str):
    import torch

    return {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
            "fp64": torch.float64}[name]


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_inputs(shape, dtype, kind: str, device, seed: int = 0) -> dict:
    """Leaves for ``lowrank_linear``: ``kind`` "vera" (d, b; all grads) or "lora" (scale only).
    Sized so that the adapter term is about as large as ``x W^T + bias``."""
    import torch

    N, n, m, r = shape
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*size, scale=1.0, dt=dtype):
        return (torch.randn(*size, generator=gen, device=device) * scale).to(dt).requires_grad_(True)

    t = {"x": rnd(N, n), "weight": rnd(m, n, scale=n**-0.5), "bias": rnd(m), "A": rnd(r, n, scale=n**-0.5),
         "B": rnd(m, r, scale=r**-0.5), "d": None, "b": None}
    if kind == "vera":
        t["d"], t["b"] = rnd(r, dt=torch.float32), rnd(m, dt=torch.float32)
    return t


def engine_case(device, shape, dtype_name: str, kind: str, mode: str, *, wrong_scale: float = 1.0) -> dict:
    """The engine's forward and every gradient against float64 on the same device.

    Returns ``{"path": the path that ran, "rows": metrics}``: y; the adapter term ``y - x W^T - bias``;
    every gradient; grad_x's low-rank part ``grad_x - g W``. ``wrong_scale`` != 1 runs the engine with
    its scale multiplied by it and compares with the right one (the negative control).
    """
    import torch

    import pefttriton
    from pefttriton.kernels import launch
    from pefttriton.ops.naive import lowrank_linear_reference

    scale = 0.7 if kind == "lora" else 1.0
    t = engine_inputs(shape, dtype_of(dtype_name), kind, device)
    backend = "triton" if mode in TRITON_MODES else "auto"
    wrt = [k for k in NAMES if t[k] is not None]
    with launch.allow_tf32(dtype_name == "tf32"), pefttriton.use_backend(backend), pefttriton.use_strategy(mode):
        y = pefttriton.lowrank_linear(*[t[k] for k in NAMES], scale=scale * wrong_scale)
        path = pefttriton.last_path()
        g = torch.randn(y.shape, device=device, generator=torch.Generator(device=device).manual_seed(1)).to(y.dtype)
        grads = dict(zip(wrt, torch.autograd.grad(y, [t[k] for k in wrt], g)))
    ref = {k: (v.detach().double().requires_grad_(True) if v is not None else None) for k, v in t.items()}
    y_ref = lowrank_linear_reference(*[ref[k] for k in NAMES], scale=scale)
    g64 = g.double()
    ref_grads = dict(zip(wrt, torch.autograd.grad(y_ref, [ref[k] for k in wrt], g64)))
    with torch.no_grad():
        y_ref = y_ref.detach()
        base = ref["x"].detach() @ ref["weight"].detach().T + ref["bias"].detach()
        g_base = g64 @ ref["weight"].detach()
        y64, gx64 = y.detach().double(), grads["x"].double()
        pairs = [("y", y64, y_ref), ("adapter", y64 - base, y_ref - base, y_ref)]
        pairs += [(f"grad_{k}", grads[k], ref_grads[k]) for k in wrt]
        pairs.append(("grad_x_lowrank", gx64 - g_base, ref_grads["x"] - g_base, ref_grads["x"]))
        rows = metrics(dtype_name, pairs)
        top = y_ref.abs().max().item()
        old_y_err = (y64 - y_ref).abs().max().item() / top if top > 0 else 0.0
    return {"path": path, "rows": rows, "old_y_err": old_y_err}


def record_case(run: Run, sec: SectionRun, label: str, shape, dtype_name: str, kind: str, mode: str, **extra) -> None:
    try:
        case = engine_case(run.device, shape, dtype_name, kind, mode)
    except Exception as exc:  # noqa: BLE001 - recorded as a failed check, the section goes on
        run.fail(sec, label, dtype_name, shape, exc, kind=kind, mode=mode, **extra)
        return
    for row in case["rows"]:
        run.check(sec, label, dtype_name, shape, row["tensor"], row["err"], row["tol"], row["fit"], row["fit_tol"],
                  kind=kind, mode=mode, path=case["path"], **extra)
    if mode != "auto":  # a strategy that quietly ran another path is a failure
        ok = case["path"] == mode
        run.check(sec, label, dtype_name, shape, "path", 0.0 if ok else math.inf, 0.0, kind=kind, mode=mode,
                  path=case["path"], **extra)


# ---------------------------------------------------------------------------------- preflight

TRIVIAL_KERNEL = """
import sys
import torch
import triton
import triton.language as tl


@triton.jit
def _add_one(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1.0, mask=mask)


x = torch.arange(1000, dtype=torch.float32, device=sys.argv[1])
out = torch.empty_like(x)
_add_one[(triton.cdiv(1000, 256),)](x, out, 1000, BLOCK=256)
print("TRIVIAL_KERNEL_OK" if torch.equal(out.cpu(), (x + 1).cpu()) else "TRIVIAL_KERNEL_WRONG")
"""
# What a launcher that cannot be built says (Triton compiles a C launcher per kernel signature).
LAUNCHER_HINTS = ("Python.h", "gcc", "cc1", "clang", "C compiler", "CalledProcessError", "cuda_utils", "libcuda",
                  "collect2", "ld:", "launcher")


def start_trivial_kernel(device_type: str) -> dict:
    """Starts the trivial Triton kernel in a subprocess (first thing: it overlaps the imports of the
    main process); :func:`sec_preflight` collects it."""
    env = dict(os.environ)
    if device_type != "cuda":
        env["TRITON_INTERPRET"] = "1"
    try:
        proc = subprocess.Popen([sys.executable, "-c", TRIVIAL_KERNEL, device_type], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    except OSError as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "started": time.monotonic()}
    return {"proc": proc, "started": time.monotonic()}


def sec_preflight(run: Run, sec: SectionRun) -> None:
    import torch
    import triton

    import pefttriton

    state = run.report["sections"]["preflight"]
    problems = state["problems"] = []
    here = os.path.realpath(os.getcwd())
    where = os.path.realpath(pefttriton.__file__)
    sec.notes["pefttriton_file"] = where
    sec.notes["pefttriton_from_cwd"] = where.startswith(here + os.sep)
    for name, variable in (("triton_cache", "TRITON_CACHE_DIR"), ("inductor_cache", "TORCHINDUCTOR_CACHE_DIR")):
        folder = os.environ.get(variable, "")
        files = sum(len(f) for _, _, f in os.walk(folder)) if folder and os.path.isdir(folder) else 0
        sec.notes[name] = f"{folder} ({files} files before this run)"
    if run.device.type == "cuda":
        props = torch.cuda.get_device_properties(run.device)
        free, total = torch.cuda.mem_get_info(run.device)
        sec.notes["device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                               "sms": props.multi_processor_count, "memory_gib": round(total / 2**30, 1),
                               "free_gib": round(free / 2**30, 1)}
    trivial = run.trivial_kernel or start_trivial_kernel(run.device.type)
    proc = trivial.get("proc")
    if proc is None:
        problems.append(f"could not start a Python subprocess for the trivial Triton kernel: {trivial.get('error')}")
    else:
        try:
            output, _ = proc.communicate(timeout=max(30.0, min(180.0, sec.left() + 60)))
            output = (output or "").strip()
            ok = proc.returncode == 0 and "TRIVIAL_KERNEL_OK" in output
            sec.notes["trivial_kernel"] = {"ok": ok, "rc": proc.returncode,
                                           "seconds": round(time.monotonic() - trivial["started"], 1),
                                           "mode": "compiled" if run.device.type == "cuda" else "interpreter"}
            if not ok:
                last = (output.splitlines() or ["(no output)"])[-1][:300]
                if any(h in output for h in LAUNCHER_HINTS):
                    problems.append(f"Triton cannot build its launcher (is a C compiler, the Python headers or "
                                    f"libcuda missing?): {last}")
                else:
                    problems.append(f"a trivial Triton kernel failed (rc {proc.returncode}): {last}")
                sec.notes["trivial_kernel"]["output_tail"] = output[-3000:]
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            problems.append("a trivial Triton kernel did not finish in time (a hung compile or launcher build?)")
    for p in problems:
        print(f"[preflight] PROBLEM: {p}", file=sys.stderr, flush=True)
    print(f"[preflight] {run.report['meta'].get('gpu') or 'CPU self-test'}: torch {torch.__version__}, "
          f"triton {triton.__version__}, pefttriton from {where}", file=sys.stderr, flush=True)
    if problems:
        raise RuntimeError("; ".join(problems))


# ---------------------------------------------------------------------------------- correctness


def strategies_for(dtype_name: str) -> tuple[str, ...]:
    """Every strategy of the engine that runs at ``dtype_name`` (``weight``: float32 weights only)."""
    return ("fused", "split", "lean") + (("weight",) if dtype_name in ("fp32", "tf32") else ())


def negative_control(run: Run, sec: SectionRun, dtype_name: str) -> None:
    """The adapter term scaled by WRONG_SCALE must be flagged by the adapter-term check."""
    shape = run.sizes["odd"][1]
    label = f"negative control: adapter term scaled by {WRONG_SCALE}"
    try:
        case = engine_case(run.device, shape, dtype_name, "lora", "fused", wrong_scale=WRONG_SCALE)
    except Exception as exc:  # noqa: BLE001
        run.fail(sec, label, dtype_name, shape, exc)
        return
    flagged = [r["tensor"] for r in case["rows"]
               if not (math.isfinite(r["err"]) and r["err"] <= r["tol"] and abs(r["fit"]) <= r["fit_tol"])]
    adapter = next(r for r in case["rows"] if r["tensor"] == "adapter")
    caught = "adapter" in flagged
    run.check(sec, label, dtype_name, shape, "adapter", 0.0 if caught else math.inf, 0.0, kind="lora", mode="fused",
              control=True, flagged_by=flagged, adapter_err=adapter["err"], adapter_tol=adapter["tol"],
              adapter_scale_err=adapter["fit"], adapter_scale_tol=adapter["fit_tol"],
              old_rule_y_err=case["old_y_err"], old_rule_tol=OLD_Y_TOL[dtype_name],
              old_rule_would_pass=case["old_y_err"] <= OLD_Y_TOL[dtype_name])
    if not caught:
        print(f"  [{sec.name}] negative control NOT flagged: {adapter}", file=sys.stderr, flush=True)


def correctness(dtype_name: str):
    def body(run: Run, sec: SectionRun) -> None:
        negative_control(run, sec, dtype_name)
        cases = [(shape, kind, mode) for shape in run.sizes["odd"] for kind in ("vera", "lora")
                 for mode in strategies_for(dtype_name)]
        for i, (shape, kind, mode) in enumerate(cases):
            if sec.out_of_time():
                sec.leave_out(f"{len(cases) - i} of {len(cases)} cases, from {shape} {kind} {mode}: out of time")
                return
            record_case(run, sec, "odd shape", shape, dtype_name, kind, mode)

    return body


def sec_large_shape(run: Run, sec: SectionRun) -> None:
    for kind, mode in (("vera", "fused"), ("lora", "fused"), ("lora", "split"), ("vera", "lean")):
        if sec.out_of_time():
            sec.leave_out(f"large shape {kind} {mode} on: out of time")
            return
        record_case(run, sec, "large shape", run.sizes["large"], "bf16", kind, mode)


@contextlib.contextmanager
def forced_config(kernel, config):
    """The autotuner of ``kernel`` sees only ``config`` (its cache is emptied before and after)."""
    original = list(kernel.configs)
    kernel.configs = [config]
    kernel.cache.clear()
    try:
        yield
    finally:
        kernel.configs = original
        kernel.cache.clear()


def sec_configs(run: Run, sec: SectionRun) -> None:
    """Every shipped GEMM config of each dot family and every low-rank-backward config, alone."""
    from pefttriton.kernels import lowrank_linear as kernels

    shape = run.sizes["config_shape"]
    families = {"16-bit": ("bf16", "fp16"), "fp32": ("fp32",), "tf32": ("tf32",)}
    todo = [(family, index, config, dtype_name) for family, dtype_names in families.items()
            for index, config in enumerate(kernels.GEMM_CONFIGS[family]) for dtype_name in dtype_names]
    for i, (family, index, config, dtype_name) in enumerate(todo):
        if sec.out_of_time():
            sec.leave_out(f"{len(todo) - i} GEMM configs, from {family}[{index}] {dtype_name}: out of time")
            break
        # the overwriting and the accumulating (split) launches have an autotuner each
        with forced_config(kernels._fused_gemm_kernel, config), forced_config(kernels._fused_gemm_accumulate_kernel, config):
            for mode in TRITON_MODES:
                record_case(run, sec, f"GEMM config {family}[{index}]", shape, dtype_name, "vera", mode, config=str(config))
    for index, config in enumerate(kernels.GRAD_CONFIGS):
        if sec.out_of_time():
            sec.leave_out(f"low-rank grad config [{index}] on: out of time")
            break
        with forced_config(kernels._lowrank_grad_kernel, config):
            record_case(run, sec, f"low-rank grad config [{index}]", shape, "bf16", "vera", "fused", config=str(config))


def chunked_randn(rows: int, cols: int, dtype, device, gen, std: float = 1.0, chunk: int = 32768):
    """A (rows, cols) tensor of ``dtype`` drawn chunk by chunk: no whole float32 temporary."""
    import torch

    out = torch.empty(rows, cols, dtype=dtype, device=device)
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        out[start:stop] = torch.randn(stop - start, cols, generator=gen, device=device) * std
    return out


def sec_int32_boundary(run: Run, sec: SectionRun) -> None:
    """tokens x features above 2**31 elements, bf16, fused and split: y and grad_x at rows around the
    boundary, grad_A and grad_B (reductions over every token) against float64 built from the rows and
    from chunks of tokens (never a whole float64 copy). One forced tile config per kernel (the launch
    arithmetic, not the tuning, is under test; autotuning at this size would copy y per config)."""
    import torch

    import pefttriton
    from pefttriton.kernels import launch
    from pefttriton.kernels import lowrank_linear as kernels

    N, n, m, r = run.sizes["int32"]
    device = run.device
    # x, grad_x, y, g in bf16, the split strategy's float32 base, and room for the chunks
    need = N * (n + m) * 2 * 2 + N * m * 4 + 3 * 2**30
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        sec.notes["memory_gib"] = {"needed": round(need / 2**30, 1), "free": round(free / 2**30, 1)}
        if free < need:
            sec.skip_section(f"needs about {need / 2**30:.0f} GiB free on the GPU, {free / 2**30:.0f} GiB free")
            return
    gen = torch.Generator(device=device).manual_seed(3)
    bf = torch.bfloat16
    x = chunked_randn(N, n, bf, device, gen)
    weight = (torch.randn(m, n, device=device, generator=gen) * n**-0.5).to(bf)
    A = (torch.randn(r, n, device=device, generator=gen) * n**-0.5).to(bf)
    B = (torch.randn(m, r, device=device, generator=gen) * r**-0.5).to(bf)
    g = chunked_randn(N, m, bf, device, gen)
    scale = 0.5
    rows = sorted({0, N // 2, N - 1, (2**31) // m - 1, (2**31) // m, (2**31) // m + 1, (2**31) // n,
                   (2**31) // n + 1} & set(range(N)))
    rows_t = torch.tensor(rows, device=device)
    wd, Ad, Bd = weight.double(), A.double(), B.double()
    xr, gr = x[rows_t].double(), g[rows_t].double()
    base_ref = xr @ wd.T
    y_ref = base_ref + scale * (xr @ Ad.T) @ Bd.T
    gbase_ref = gr @ wd
    gx_ref = gbase_ref + scale * (gr @ Bd) @ Ad
    gA_ref = torch.zeros_like(Ad)
    gB_ref = torch.zeros_like(Bd)
    for start in range(0, N, 32768):
        xc, gc = x[start:start + 32768].double(), g[start:start + 32768].double()
        gA_ref += scale * (gc @ Bd).T @ xc
        gB_ref += scale * gc.T @ (xc @ Ad.T)
        del xc, gc
    label = f"int32 boundary ({N}x{m} = {N * m:.3g} > 2^31)"
    sec.notes["rows"] = rows
    forced = contextlib.ExitStack()
    if not launch.INTERPRET:
        config = kernels.GEMM_CONFIGS["16-bit"][0]
        forced.enter_context(forced_config(kernels._fused_gemm_kernel, config))
        forced.enter_context(forced_config(kernels._fused_gemm_accumulate_kernel, config))
        forced.enter_context(forced_config(kernels._lowrank_grad_kernel, kernels.GRAD_CONFIGS[0]))
        sec.notes["configs"] = [str(config), str(kernels.GRAD_CONFIGS[0])]
    with forced:
        for mode in TRITON_MODES:
            if sec.out_of_time():
                sec.leave_out(f"{mode}: out of time")
                continue
            leaves = [x.requires_grad_(True), A.requires_grad_(True), B.requires_grad_(True)]
            try:
                with pefttriton.use_backend("triton"), pefttriton.use_strategy(mode):
                    y = pefttriton.lowrank_linear(x, weight, None, A, B, scale=scale)
                    gx, gA, gB = torch.autograd.grad(y, leaves, g)
                yr, gxr = y[rows_t].double(), gx[rows_t].double()
                del y, gx
                pairs = [("y (rows at the boundary)", yr, y_ref), ("adapter (rows)", yr - base_ref, y_ref - base_ref, y_ref),
                         ("grad_x (rows)", gxr, gx_ref), ("grad_x_lowrank (rows)", gxr - gbase_ref, gx_ref - gbase_ref, gx_ref),
                         ("grad_A", gA, gA_ref), ("grad_B", gB, gB_ref)]
                for row in metrics("bf16", pairs):
                    run.check(sec, label, "bf16", (N, n, m, r), row["tensor"], row["err"], row["tol"], row["fit"],
                              row["fit_tol"], mode=mode)
            except Exception as exc:  # noqa: BLE001 - out of memory included: this section's failure
                run.fail(sec, label, "bf16", (N, n, m, r), exc, mode=mode)
            finally:
                for t in leaves:
                    t.requires_grad_(False)
                if device.type == "cuda":
                    torch.cuda.empty_cache()


def sec_lorma_pi(run: Run, sec: SectionRun) -> None:
    import torch

    import pefttriton
    from pefttriton.kernels import launch
    from pefttriton.ops.naive import lorma_pi_linear_reference

    device = run.device
    N, n, m, r = run.sizes["odd"][-1]
    shape = (N, n, m, r)
    for dtype_name in ("bf16", "fp16", "fp32", "tf32"):
        for order in ("tokens", "weight"):
            if sec.out_of_time():
                sec.leave_out(f"LoRMA-pi {dtype_name} {order} on: out of time")
                return
            label = f"LoRMA-pi ({order})"
            try:
                dtype = dtype_of(dtype_name)
                gen = torch.Generator(device=device).manual_seed(4)
                x = torch.randn(N, n, device=device, generator=gen).to(dtype).requires_grad_(True)
                w = (torch.randn(m, n, device=device, generator=gen) * n**-0.5).to(dtype)
                bias = torch.randn(m, device=device, generator=gen).to(dtype)
                A = (torch.randn(r, m, device=device, generator=gen) * m**-0.5).requires_grad_(True)
                B = (torch.randn(m, r, device=device, generator=gen) * r**-0.5).requires_grad_(True)
                with launch.allow_tf32(dtype_name == "tf32"), pefttriton.use_backend("triton"):
                    y = pefttriton.lorma_pi_linear(x, w, bias, A, B, scale=0.5, order=order)
                    grads = torch.autograd.grad(y.float().sum(), [x, A, B])
                ref = [t.detach().double().requires_grad_(True) for t in (x, A, B)]
                y_ref = lorma_pi_linear_reference(ref[0], w.double(), bias.double(), ref[1], ref[2], scale=0.5)
                ref_grads = torch.autograd.grad(y_ref.sum(), ref)
                pairs = [("y", y, y_ref.detach())] + [(f"grad_{k}", a, b) for k, a, b in zip(("x", "A", "B"), grads, ref_grads)]
                for row in metrics(dtype_name, pairs):
                    # M = s shift(BA) is rounded to the layer dtype before its GEMM: four times the tolerance
                    run.check(sec, label, dtype_name, shape, row["tensor"], row["err"], 4 * row["tol"], row["fit"],
                              4 * row["fit_tol"])
            except Exception as exc:  # noqa: BLE001
                run.fail(sec, label, dtype_name, shape, exc)


def _lora_layer(run: Run, shape, dtype, seed: int):
    import torch
    from torch import nn

    import pefttriton

    N, n, m, r = shape
    torch.manual_seed(seed)
    layer = pefttriton.FusedLoRALinear(nn.Linear(n, m, device=run.device, dtype=dtype), r, alpha=2.0 * r)
    with torch.no_grad():
        layer.lora_B.normal_(0.0, r**-0.5)
    return layer


def sec_compile(run: Run, sec: SectionRun) -> None:
    """A fused LoRA layer under torch.compile (inductor on a GPU, aot_eager on the CPU) against eager."""
    import torch

    shape = run.sizes["odd"][0]
    layer = _lora_layer(run, shape, torch.bfloat16, 5)
    x = torch.randn(shape[0], shape[1], device=run.device, dtype=torch.bfloat16)

    def step(module):
        inp = x.detach().requires_grad_(True)
        out = module(inp)
        out.float().square().sum().backward()
        grads = (inp.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
        layer.zero_grad(set_to_none=True)
        return out.detach(), grads

    eager = step(layer)
    backend = "inductor" if run.device.type == "cuda" else "aot_eager"
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    got = step(compiled)
    for name, a, b in zip(("y", "grad_x", "grad_A", "grad_B"), (got[0], *got[1]), (eager[0], *eager[1])):
        err, fit = errors(a, b)
        run.check(sec, f"torch.compile ({backend}) vs eager", "bf16", shape, name, err, TOL["bf16"], fit, FIT_TOL["bf16"])


def sec_cuda_graphs(run: Run, sec: SectionRun) -> None:
    """Forward replays against eager: at a token count ``pefttriton.warmup`` ran before the capture
    (``auto`` and ``fused``: the tuned configs, replay equal to eager), and at one never seen (``fused``
    and ``split``: the launcher skips the autotuner inside the capture and takes the first config the
    pruner keeps; eager then tunes its own, so the two agree to rounding, and both match float64)."""
    import torch

    import pefttriton
    from pefttriton.kernels import launch

    device = run.device
    shape = run.sizes["odd"][0]
    N, n, m, r = shape
    layer = _lora_layer(run, shape, torch.bfloat16, 6)
    gen = torch.Generator(device=device).manual_seed(6)

    def draw(tokens):
        return torch.randn(tokens, n, device=device, generator=gen, dtype=torch.float32).to(torch.bfloat16)

    def capture(strategy, static_x):
        graph = torch.cuda.CUDAGraph()
        with pefttriton.use_strategy(strategy), torch.no_grad(), torch.cuda.graph(graph):
            static_y = layer(static_x)
        return graph, static_y

    def eager(strategy, inp):
        with pefttriton.use_strategy(strategy), torch.no_grad():
            return layer(inp)

    x = draw(N)
    for strategy in ("auto", "fused"):
        static_x = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), pefttriton.use_strategy(strategy):
            pefttriton.warmup(layer, static_x, backward=False)
        torch.cuda.current_stream().wait_stream(stream)
        graph, static_y = capture(strategy, static_x)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        err, fit = errors(static_y, eager(strategy, x))
        run.check(sec, "CUDA graph replay vs eager (after pefttriton.warmup)", "bf16", shape, "y", err, 1e-6, fit, 1e-6,
                  mode=strategy)

    N2 = run.sizes["graph_unseen_tokens"]
    bucket = launch.m_bucket(N2)
    seen = sum(1 for key in launch._TUNED if len(key) > 1 and key[1] == bucket)
    sec.notes["unseen"] = {"tokens": N2, "bucket": bucket, "tuned_keys_at_that_bucket_before": seen}
    x2 = draw(N2)
    captured = {}
    for strategy in TRITON_MODES:  # both captured before any eager run at this token count
        static_x2 = x2.clone()
        captured[strategy] = (*capture(strategy, static_x2), static_x2)
    with torch.no_grad():
        w, bias = layer.base_layer.weight.double(), layer.base_layer.bias.double()
        x64 = x2.double()
        ref = x64 @ w.T + bias + layer.scale * (x64 @ layer.lora_A.double().T) @ layer.lora_B.double().T
    shape2 = (N2, n, m, r)
    for strategy, (graph, static_y2, _) in captured.items():
        graph.replay()
        torch.cuda.synchronize()
        err, fit = errors(static_y2, eager(strategy, x2))
        run.check(sec, "CUDA graph replay vs eager, a token count never seen before the capture", "bf16", shape2, "y",
                  err, TOL["bf16"], fit, FIT_TOL["bf16"], mode=strategy, tuned_keys_at_bucket_before=seen)
        err, fit = errors(static_y2, ref)
        run.check(sec, "CUDA graph replay vs float64, a token count never seen before the capture", "bf16", shape2,
                  "y", err, TOL["bf16"], fit, FIT_TOL["bf16"], mode=strategy)


def sec_autocast(run: Run, sec: SectionRun) -> None:
    import torch
    from torch import nn

    import pefttriton

    device = run.device
    N, n, m, r = run.sizes["odd"][0]
    torch.manual_seed(7)
    layer32 = pefttriton.FusedLoRALinear(nn.Linear(n, m, device=device), r)
    with torch.no_grad():
        layer32.lora_B.normal_(0.0, r**-0.5)
    x32 = torch.randn(N, n, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = layer32(x32)
    with torch.no_grad():
        want = layer32(x32.to(torch.bfloat16).float())  # fp32 layer on the bf16-rounded input
    err, fit = errors(y, want)
    run.check(sec, "autocast bf16 vs fp32 on rounded input", "bf16", (N, n, m, r), "y", err, TOL["bf16"], fit,
              FIT_TOL["bf16"], out_dtype=str(y.dtype))


# ------------------------------------------------------------------------------ device model


def seconds_per_call(fn, device, reps: int, inner: int = 1, warmup: int = 2) -> list[float]:
    """Seconds per call, ``reps`` samples of ``inner`` back-to-back calls each (CUDA events on a GPU)."""
    import torch

    for _ in range(warmup):
        fn()
    synchronize(device)
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            out.append((time.perf_counter() - t0) / inner)
    return out


def host_seconds_per_call(fn, device, calls: int) -> float:
    """Wall seconds per call of ``calls`` back-to-back calls of a tiny op: the host's launch cost."""
    fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / calls


def fit_grad_step(points: list[tuple[float, float]], launch: float) -> dict:
    """Fits ``t = grad_step * x + launch`` (``x``: waves x 16-column steps of the low-rank backward
    kernel, ``t``: its measured seconds, ``launch`` fixed at the measured launch cost) by least
    squares on relative errors. Returns grad_step, each point's residual (model - measured) /
    measured, and, for comparison, the free two-parameter fit (None when every x is the same)."""
    num = sum((x / t) * ((t - launch) / t) for x, t in points)
    den = sum((x / t) ** 2 for x, t in points)
    step = num / den if den > 0 else math.nan
    residuals = [(step * x + launch - t) / t for x, t in points]
    xs, ts = [p[0] for p in points], [p[1] for p in points]
    free = None
    if len(set(xs)) > 1:
        mx, mt = statistics.fmean(xs), statistics.fmean(ts)
        slope = sum((x - mx) * (t - mt) for x, t in points) / sum((x - mx) ** 2 for x in xs)
        free = {"grad_step": slope, "launch": mt - slope * mx}
    return {"grad_step": step, "residuals": residuals,
            "max_abs_residual": max((abs(v) for v in residuals), default=math.nan), "free_fit": free}


def model_line(model) -> str:
    """``DeviceModel(...)`` as Python source, figures to 3 significant digits."""

    def num(v):
        return f"{v:.3g}"

    def table(d):
        return "{" + ", ".join(f"{k!r}: {num(v)}" for k, v in d.items()) + "}"

    return (f"DeviceModel(name={model.name!r}, flops={table(model.flops)}, bandwidth={num(model.bandwidth)}, "
            f"launch={num(model.launch)}, triton_gemm={table(model.triton_gemm)}, sms={model.sms}, "
            f"grad_step={num(model.grad_step)}, measured={model.measured}, tma_gemm={table(model.tma_gemm)})")


@contextlib.contextmanager
def modelled_with(model):
    """The cost model (:func:`pefttriton.ops.strategy.estimate`) reads ``model`` for every device."""
    from pefttriton.ops import strategy

    original = strategy.device_model
    strategy.device_model = lambda device: model
    try:
        yield
    finally:
        strategy.device_model = original


def backward_pick(device, dtype, shape, trains: str) -> tuple[str, dict]:
    """(the cheaper low-rank backward of the fused path by the cost model, {way: modelled seconds})."""
    from pefttriton.ops import strategy

    costs = {way: strategy.estimate("fused", device, dtype, shape, trains, way) for way in ("kernel", "blas")}
    return min(costs, key=costs.get), costs


def sec_device_model(run: Run, sec: SectionRun) -> None:
    """Measures every field of :class:`pefttriton.ops.strategy.DeviceModel`, prints the fitted model,
    then times the Triton paths' two low-rank backwards against each other. Parts that run out of
    time are listed; a field not measured keeps the static model's figure and is named."""
    import dataclasses

    import torch

    import pefttriton
    from pefttriton.kernels import launch
    from pefttriton.kernels import lowrank_linear as kernels
    from pefttriton.ops import strategy

    from .measure import count_triton_launches

    op = sys.modules["pefttriton.ops.lowrank_linear"]  # the module (pefttriton.ops.lowrank_linear is also a function)

    device, dm = run.device, run.sizes["dm"]
    out = run.report["device_model"]
    out["selftest"] = run.selftest
    static = strategy.device_model(device)
    out["static_model"] = model_line(static)
    reps, warm = dm["reps"], dm["warmup"]
    bf = torch.bfloat16

    def rnd(*size, dtype=bf, std=1.0):
        return (torch.randn(*size, device=device) * std).to(dtype)

    def timed(fn, repeats=reps) -> float:
        return statistics.median(seconds_per_call(fn, device, repeats, warmup=warm))

    # 1. vendor-BLAS GEMM rate per dtype (fp32 IEEE = "fp32", fp32 with TF32 = "tf32")
    n = dm["gemm"]
    flops = {}
    for key in ("fp16", "bf16", "fp32", "tf32", "fp64"):
        a, b = rnd(n, n, dtype=dtype_of(key)), rnd(n, n, dtype=dtype_of(key))
        c = torch.empty_like(a)
        with launch.allow_tf32(key == "tf32"):
            flops[key] = 2 * n**3 / timed(lambda: torch.mm(a, b, out=c), max(3, reps // 2))
        del a, b, c
    out["flops"] = {"values": flops, "gemm": [n, n, n], "how": "torch.mm, median of CUDA-event timings"}

    # 2. bandwidth: a large device-to-device copy, bytes read + written per second
    src = torch.empty(dm["copy_bytes"] // 2, device=device, dtype=bf).normal_()
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * src.element_size() / timed(lambda: dst.copy_(src))
    out["bandwidth"] = {"value": bandwidth, "bytes_copied": src.numel() * src.element_size()}
    del src, dst

    # 3. the low-rank backward kernel (kernels.lowrank_grads), VeRA-style (d, b and their gradients)
    # and LoRA-style, at each rank and token count: seconds against waves x steps
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else static.sms
    unit_model = dataclasses.replace(static, grad_step=1.0, launch=0.0, sms=sms)
    m_out, n_in = dm["grad_out"], dm["grad_in"]
    todo = [(variant, r, T) for variant in ("vera", "lora") for r in dm["grad_ranks"] for T in dm["grad_tokens"]]
    rows = []
    for i, (variant, r, T) in enumerate(todo):
        if sec.out_of_time():
            sec.leave_out(f"grad kernel: {len(todo) - i} of {len(todo)} points, from {variant} r={r} T={T}: out of time")
            break
        g, xa, B = rnd(T, m_out), rnd(T, r, dtype=torch.float32), rnd(m_out, r, std=r**-0.5)
        vec = variant == "vera"
        d = rnd(r, dtype=torch.float32) if vec else None
        b = rnd(m_out, dtype=torch.float32) if vec else None
        t = timed(lambda: kernels.lowrank_grads(g, xa, B, d, b, 0.5, need_grad_d=vec, need_grad_b=vec))
        rows.append({"variant": variant, "rank": r, "tokens": T, "out": m_out, "seconds": t,
                     "waves_x_steps": strategy.grad_kernel_seconds(unit_model, T, m_out, r)})
        del g, xa, B, d, b

    # 4. the Triton GEMM's rate over the BLAS's, per dot family (fused_gemm without the low-rank segment)
    T, kin, kout = dm["triton_gemm"]
    triton_gemm, tma_gemm = {}, {}
    for family, key in (("16-bit", "bf16"), ("tf32", "tf32"), ("fp32", "fp32")):
        if sec.out_of_time():
            sec.leave_out(f"triton_gemm from {family} on: out of time")
            break
        x, w = rnd(T, kin, dtype=dtype_of(key)), rnd(kout, kin, dtype=dtype_of(key), std=kin**-0.5)
        with launch.allow_tf32(key == "tf32"):
            kernels.fused_gemm(x, w)  # autotunes this key outside the timed runs
            t_triton = timed(lambda: kernels.fused_gemm(x, w))
            t_blas = timed(lambda: torch.mm(x, w.T))
            # the Hopper variant (TMA, persistent tiles) where it runs: 16-bit and TF32 dots on sm_90+
            t_tma = None
            if family in kernels.TMA_CONFIGS and kernels.tma_supported(x, w):
                kernels.fused_gemm(x, w, tma=True)
                t_tma = timed(lambda: kernels.fused_gemm(x, w, tma=True))
                tma_gemm[family] = t_blas / t_tma
        triton_gemm[family] = t_blas / t_triton
        out.setdefault("triton_gemm", {"shape": [T, kin, kout], "values": {}, "seconds": {}, "tma_values": {}})
        out["triton_gemm"]["values"][family] = triton_gemm[family]
        out["triton_gemm"]["seconds"][family] = {"triton": t_triton, "blas": t_blas, "tma": t_tma}
        if t_tma is not None:
            out["triton_gemm"]["tma_values"][family] = tma_gemm[family]
        del x, w

    # 5. launch: host seconds per call of back-to-back tiny calls (a tiny fused_gemm reuses the
    # kernels step 4 compiled for bf16)
    launch_s = None
    if not sec.out_of_time():
        calls = dm["launch_calls"]
        tiny, tiny_w = rnd(16, 64), rnd(64, 64)
        kernels.fused_gemm(tiny, tiny_w)
        per_call = {
            "tiny add": host_seconds_per_call(lambda: tiny.add(1), device, calls),
            "tiny torch.mm": host_seconds_per_call(lambda: torch.mm(tiny, tiny_w.T), device, calls),
            "tiny fused_gemm": host_seconds_per_call(lambda: kernels.fused_gemm(tiny, tiny_w), device, calls),
        }
        launch_s = (per_call["tiny torch.mm"] + per_call["tiny fused_gemm"]) / 2
        out["launch"] = {"value": launch_s, "per_call": per_call, "how": "mean of a tiny BLAS call and a tiny fused_gemm"}
    else:
        sec.leave_out("launch: out of time")

    # the fit of grad_step (launch fixed at the measured one) and the model
    fit = fit_grad_step([(row["waves_x_steps"], row["seconds"]) for row in rows], launch_s or static.launch) if rows else None
    if fit:
        for row, res in zip(rows, fit["residuals"]):
            row["residual"] = res
        fit["grad_step_per_variant"] = {
            variant: fit_grad_step(mine, launch_s or static.launch)["grad_step"]
            for variant in ("vera", "lora")
            if (mine := [(row["waves_x_steps"], row["seconds"]) for row in rows if row["variant"] == variant])}
    out["grad_kernel"] = {"points": rows, "fit": fit, "sms": sms,
                          "model": "waves x ceil(out / 16) x grad_step + launch (strategy.grad_kernel_seconds)"}
    missing = [f for f, ok in (("triton_gemm", len(triton_gemm) == 3), ("launch", launch_s is not None),
                               ("grad_step", bool(fit) and len(rows) == len(todo))) if not ok]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU self-test (interpreter): meaningless figures"
    fitted = strategy.DeviceModel(
        name=name, flops={k: flops[k] for k in ("fp16", "bf16", "fp32", "tf32", "fp64")}, bandwidth=bandwidth,
        launch=launch_s if launch_s is not None else static.launch,
        triton_gemm={k: triton_gemm.get(k, static.triton_gemm[k]) for k in ("16-bit", "tf32", "fp32")},
        sms=sms, grad_step=fit["grad_step"] if fit else static.grad_step, measured=True, tma_gemm=tma_gemm)
    line = model_line(fitted)
    parsed = eval(line, {"DeviceModel": strategy.DeviceModel})  # noqa: S307 - our own line, checked to round-trip
    out["model_line"] = line
    out["fields_from_static_model"] = missing
    out["round_trip_ok"] = parsed.name == fitted.name and math.isclose(parsed.grad_step, fitted.grad_step, rel_tol=1e-2)
    label = "# CPU self-test: meaningless figures, the code path only\n" if run.selftest else ""
    partial = f"  # not measured (static figures kept): {', '.join(missing)}" if missing else ""
    print(f"{label}{line}{partial}", flush=True)

    # 6. the Triton paths' two low-rank backwards against each other (the fused path's whole backward,
    # called directly in this thread, so that use_lowrank_backward applies), beside what the models pick
    needs = {"vera": [True, False, False, False, False, True, True], "lora": [True, False, False, True, True, False, False]}
    todo = [(variant, trains, scale, r, T) for variant, trains, scale in (("vera", "vectors", 1.0), ("lora", "factors", 2.0))
            for r in dm["compare_ranks"] for T in dm["compare_tokens"]]
    compare = []
    for i, (variant, trains, scale, r, T) in enumerate(todo):
        if sec.out_of_time():
            sec.leave_out(f"kernel vs blas backward: {len(todo) - i} of {len(todo)}, from {variant} r={r} T={T}: out of time")
            break
        x, w = rnd(T, n_in), rnd(m_out, n_in, std=n_in**-0.5)
        A, B = rnd(r, n_in, std=n_in**-0.5), rnd(m_out, r, std=r**-0.5)
        d = rnd(r, dtype=torch.float32) if variant == "vera" else None
        b = rnd(m_out, dtype=torch.float32) if variant == "vera" else None
        xa = x.float() @ A.float().T
        g = rnd(T, m_out)
        shape = (T, n_in, m_out, r)
        times = {}
        for way in ("kernel", "blas"):
            with strategy.use_lowrank_backward(way):
                times[way] = timed(lambda: op._compute_backward("fused", g, x, xa, w, A, B, d, b, scale, needs[variant]))
        static_pick, _ = backward_pick(device, bf, shape, trains)
        with modelled_with(fitted):
            fitted_pick, fitted_costs = backward_pick(device, bf, shape, trains)
        compare.append({"variant": variant, "trains": trains, "rank": r, "tokens": T, "in": n_in, "out": m_out,
                        "kernel_s": times["kernel"], "blas_s": times["blas"], "faster": min(times, key=times.get),
                        "code_picks": strategy.lowrank_backward(device, bf, shape, trains),
                        "static_model_picks": static_pick, "fitted_model_picks": fitted_pick,
                        "fitted_model_s": fitted_costs})
        del x, w, A, B, d, b, xa, g
    out["lowrank_backward"] = {"rows": compare, "timed": "the fused path's whole backward (ops.lowrank_linear._compute_backward)"}

    # 7. does use_lowrank_backward around .backward() reach the backward? On CUDA autograd runs it in
    # a device thread of its own, which does not see the caller's context variables. At a shape
    # correctness_bf16 tuned (LoRA, fused), with autograd's threads on and off.
    if sec.out_of_time():
        sec.leave_out("use_lowrank_backward probe: out of time")
        return
    shape = run.sizes["odd"][1]
    t = engine_inputs(shape, bf, "lora", device)
    g = rnd(shape[0], shape[2])
    leaves = [t[k] for k in ("x", "weight", "bias", "A", "B")]

    def backward_launches(way: str, threads: bool) -> int:
        with pefttriton.use_backend("triton"), pefttriton.use_strategy("fused"):
            y = pefttriton.lowrank_linear(*leaves, scale=0.7)
        with strategy.use_lowrank_backward(way), torch.autograd.set_multithreading_enabled(threads), \
                count_triton_launches() as counter:
            y.backward(g)
            synchronize(device)
        for leaf in leaves:
            leaf.grad = None
        return counter[0]

    backward_launches("kernel", True)
    probe = {}
    for threads in (True, False):
        k, bl = backward_launches("kernel", threads), backward_launches("blas", threads)
        probe["multithreaded" if threads else "single-threaded"] = {
            "triton_launches_kernel": k, "triton_launches_blas": bl, "override_reaches_backward": k != bl}
    out["use_lowrank_backward_probe"] = probe
    if not probe["multithreaded"]["override_reaches_backward"]:
        print("  [device_model] NOTE: use_lowrank_backward around .backward() does not reach autograd's device "
              "thread: the override is ignored there unless torch.autograd.set_multithreading_enabled(False)",
              file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- speed


def _impls() -> dict:
    """name -> (family, factory(base, r)): fused adapters (each strategy is set around the call),
    PEFT, the lean cuBLAS baseline and the frozen nn.Linear."""
    from . import baselines, cases

    impls = {f"fused {impl.family}": (impl.family, impl.make) for impl in cases.IMPLS.values() if impl.fused}
    impls.update({
        "PEFT lora": ("lora", baselines.peft_lora_layer), "PEFT vera": ("vera", baselines.peft_vera_layer),
        "lean lora (cuBLAS)": ("lora", baselines.LeanLoRALinear), "lean vera (cuBLAS)": ("vera", baselines.LeanVeRALinear),
        "nn.Linear (frozen)": ("linear", lambda base, r: base.requires_grad_(False)),
    })
    return impls


def time_ms(fn, reps: int, device, warmup: int = 2) -> list[float]:
    """Milliseconds per call: CUDA events on the GPU (perf_counter on the CPU), after ``warmup`` calls."""
    return [s * 1e3 for s in seconds_per_call(fn, device, reps, warmup=warmup)]


def sec_speed(run: Run, sec: SectionRun) -> None:
    import torch
    from torch import nn

    import pefttriton
    from pefttriton.kernels import launch

    from . import measure

    device, sizes = run.device, run.sizes
    n, m = sizes["timing_layer"]
    tokens = sizes["timing_tokens"]
    settings = [("bf16", N) for N in reversed(tokens)] + [("tf32", tokens[0]), ("fp32", tokens[0])]
    modes = ("auto", *strategies_for("bf16"), "weight") if device.type == "cuda" else ("auto",)
    impls = _impls()
    todo = [(dtype_name, N, name, mode) for dtype_name, N in settings for name in impls
            for mode in (modes if name.startswith("fused") else (None,))
            if not (mode == "weight" and dtype_name not in ("fp32", "tf32"))]
    current = None
    for i, (dtype_name, N, name, mode) in enumerate(todo):
        if sec.out_of_time():
            sec.leave_out(f"{len(todo) - i} of {len(todo)} timing rows, from {dtype_name} N={N} {name} {mode or ''}: "
                          "out of time")
            return
        dtype = dtype_of(dtype_name)
        if current != (dtype_name, N):
            current = (dtype_name, N)
            torch.manual_seed(0)
            base = nn.Linear(n, m, device=device, dtype=dtype, bias=False)
            x = torch.randn(N, n, device=device, dtype=dtype, requires_grad=True)
            g = torch.randn(N, m, device=device, dtype=dtype)
        family, make = impls[name]
        r = sizes["ranks"].get(family, 0)
        row = {"impl": name, "strategy": mode, "dtype": dtype_name, "tokens": N, "in": n, "out": m, "r": r}
        try:
            with launch.allow_tf32(dtype_name == "tf32"), pefttriton.use_strategy(mode or "auto"):
                module = make(copy.deepcopy(base), r)
                forward, step = measure.step_functions(module, x, g)
                pefttriton.warmup(module, x)  # every per-shape choice (autotuning) before the timed runs
                if mode is not None:
                    row["path"] = pefttriton.last_path()  # what auto chose here, or the strategy asked for
                row["fwd_ms"] = statistics.median(time_ms(forward, sizes["reps"], device, sizes["warmup"]))
                step_ms = time_ms(step, sizes["reps"], device, sizes["warmup"])
                row["step_ms"] = statistics.median(step_ms)
                row["step_ms_spread"] = measure.relative_spread(step_ms)
                row["saved_bytes"] = measure.saved_for_backward(module, x).total
                row["peak_step_bytes"] = measure.peak_step_bytes(step, device)
        except Exception as exc:  # noqa: BLE001 - recorded and reported, the run goes on
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        run.report["timings"].append(row)


def sec_breakdown(run: Run, sec: SectionRun) -> None:
    """CUDA time per kernel of one fused LoRA step (fused, split, lean), next to cuBLAS on the same GEMMs."""
    import torch
    from torch import nn
    from torch.profiler import ProfilerActivity, profile

    import pefttriton

    from . import measure

    device, sizes = run.device, run.sizes
    n, m = sizes["timing_layer"]
    N = sizes["timing_tokens"][-1]
    r = sizes["ranks"]["lora"]
    dtype = torch.bfloat16
    x = torch.randn(N, n, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(N, m, device=device, dtype=dtype)
    base = nn.Linear(n, m, device=device, dtype=dtype, bias=False)
    out = run.report["breakdown"]
    for mode in ("fused", "split", "lean"):
        if sec.out_of_time():
            sec.leave_out(f"breakdown {mode} on: out of time")
            return
        with pefttriton.use_strategy(mode):
            layer = pefttriton.FusedLoRALinear(copy.deepcopy(base), r)
            _, step = measure.step_functions(layer, x, g)
            pefttriton.warmup(layer, x)
            for _ in range(2):
                step()
            synchronize(device)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step()
                synchronize(device)
        kernels = {}
        for e in prof.key_averages():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                kernels[e.key] = round(e.device_time_total / 5 / 1e3, 4)  # ms per step
        out[f"fused LoRA step, strategy={mode} (ms per kernel per step)"] = kernels
    w = base.weight
    cublas = {
        "x W^T (cuBLAS)": lambda: x @ w.T,
        "g W (cuBLAS)": lambda: g @ w,
        "g^T x (cuBLAS, weight-gradient shape)": lambda: g.T @ x,
    }
    out["cuBLAS, same shapes (ms)"] = {k: statistics.median(time_ms(f, 20, device)) for k, f in cublas.items()}


def sec_retune(run: Run, sec: SectionRun) -> None:
    """The first fused step at a token count never seen (autotuning) against the steady step."""
    import torch
    from torch import nn

    import pefttriton

    from . import measure

    device, sizes = run.device, run.sizes
    n, m = sizes["timing_layer"]
    N = sizes["retune_tokens"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layer = pefttriton.FusedLoRALinear(nn.Linear(n, m, device=device, dtype=dtype), sizes["ranks"]["lora"])
    x = torch.randn(N, n, device=device, dtype=dtype, requires_grad=True)
    _, step = measure.step_functions(layer, x, torch.randn(N, m, device=device, dtype=dtype))
    synchronize(device)
    t0 = time.perf_counter()
    step()
    synchronize(device)
    first = (time.perf_counter() - t0) * 1e3
    steady = statistics.median(time_ms(step, sizes["reps"], device))
    run.report["retune"] = {"tokens": N, "first_step_ms": first, "steady_step_ms": steady}


FUNCTIONS = {
    "preflight": sec_preflight,
    "correctness_bf16": correctness("bf16"),
    "correctness_fp16": correctness("fp16"),
    "correctness_fp32": correctness("fp32"),
    "correctness_tf32": correctness("tf32"),
    "large_shape": sec_large_shape,
    "configs": sec_configs,
    "int32_boundary": sec_int32_boundary,
    "lorma_pi": sec_lorma_pi,
    "compile": sec_compile,
    "cuda_graphs": sec_cuda_graphs,
    "autocast": sec_autocast,
    "device_model": sec_device_model,
    "speed": sec_speed,
    "breakdown": sec_breakdown,
    "retune": sec_retune,
}


# -------------------------------------------------------------------------------------- output


def environment(device, selftest: bool, args) -> dict:
    import torch
    import triton

    import pefttriton

    meta = {
        "device": device.type, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "selftest": selftest, "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "triton": triton.__version__, "pefttriton": pefttriton.__version__,
        "interpreter": os.environ.get("TRITON_INTERPRET") == "1", "argv": sys.argv[1:],
        "triton_cache_dir": os.environ.get("TRITON_CACHE_DIR"),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": "TF32 off unless a row says tf32; medians of CUDA-event timings after 2 warm-ups",
        "tolerances": {"max_norm_vs_own_size": TOL, "scale": FIT_TOL, "negative_control_scale": WRONG_SCALE},
    }
    for package in ("transformers", "peft"):  # read from the metadata: importing them takes seconds
        with contextlib.suppress(Exception):
            meta[package] = importlib.metadata.version(package)
    return meta


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def markdown(report: dict) -> str:
    meta = report["meta"]
    where = meta.get("gpu") or f"CPU self-test ({platform.machine()}, Triton interpreter): not GPU figures"
    checks = report["checks"]
    bad = [c for c in checks if not c["ok"]]
    lines = [f"# pefttriton GPU check: {where}", "",
             f"torch {meta.get('torch')}, CUDA {meta.get('cuda')}, triton {meta.get('triton')}, "
             f"transformers {meta.get('transformers')}, peft {meta.get('peft')}, pefttriton {meta.get('pefttriton')}; "
             f"{meta.get('date_utc')}; {report.get('elapsed_s')} s of a {report['budget_s']:.0f} s budget", "",
             f"Correctness: {len(checks) - len(bad)} of {len(checks)} checks within tolerance (each quantity "
             "against float64, relative to its own size, and its least-squares scale).", "",
             "| section | status | seconds | allotted | checks | note |", "|---|---|---|---|---|---|"]
    for name, s in report["sections"].items():
        note = s.get("error") or s.get("reason") or "; ".join(s.get("left_out", [])) or ""
        lines.append(f"| {name} | {s.get('status')} | {fmt(s.get('seconds'))} | {fmt(s.get('allotted_s'))} | "
                     f"{s.get('checks', '')} | {str(note)[:200].replace('|', '/')} |")
    for c in bad[:40]:
        what = c.get("error") or (f"{fmt(c['err'])} > {fmt(c['tol'])}" + (
            f", scale {fmt(c.get('scale_err'))} vs {fmt(c.get('scale_tol'))}" if c.get("scale_tol") is not None else ""))
        lines.append(f"- FAIL [{c['section']}] {c['name']} {c['dtype']} {c['shape']} {c.get('kind', '')} "
                     f"{c.get('mode', '')} {c['tensor']}: {what}")
    controls = [c for c in checks if c.get("control")]
    for c in controls:
        lines.append(f"- negative control {c['dtype']}: adapter term x{WRONG_SCALE} {'flagged' if c['ok'] else 'NOT flagged'} "
                     f"(adapter err {fmt(c['adapter_err'])} vs {fmt(c['adapter_tol'])}, scale {fmt(c['adapter_scale_err'])} "
                     f"vs {fmt(c['adapter_scale_tol'])}; the old y-only rule: {fmt(c['old_rule_y_err'])} vs "
                     f"{fmt(c['old_rule_tol'])}, {'passes it' if c['old_rule_would_pass'] else 'flags it'})")
    dm = report.get("device_model") or {}
    if dm.get("model_line"):
        lines += ["", "## Device model" + (" (CPU self-test: meaningless figures)" if dm.get("selftest") else ""), "",
                  "```python", dm["model_line"], "```", "", f"Static model it replaces: `{dm.get('static_model')}`"]
        if dm.get("fields_from_static_model"):
            lines.append(f"Fields not measured (static figures kept): {', '.join(dm['fields_from_static_model'])}")
        fit = (dm.get("grad_kernel") or {}).get("fit")
        if fit:
            lines += ["", f"Low-rank backward kernel: grad_step {fmt(fit['grad_step'])} s (per variant: "
                          f"{', '.join(f'{k} {fmt(v)}' for k, v in fit.get('grad_step_per_variant', {}).items())}); "
                          f"max |residual| {fmt(fit['max_abs_residual'])}; free fit {fit.get('free_fit')}", "",
                      "| variant | r | tokens | waves x steps | measured ms | residual |", "|---|---|---|---|---|---|"]
            for p in dm["grad_kernel"]["points"]:
                lines.append(f"| {p['variant']} | {p['rank']} | {p['tokens']} | {p['waves_x_steps']:.0f} | "
                             f"{p['seconds'] * 1e3:.4f} | {fmt(p.get('residual'))} |")
        rows = (dm.get("lowrank_backward") or {}).get("rows", [])
        if rows:
            lines += ["", "Triton paths' low-rank backward, kernel against BLAS (whole fused backward, ms):", "",
                      "| variant | r | tokens | kernel | blas | faster | code picks | static model | fitted model |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for c in rows:
                lines.append(f"| {c['variant']} | {c['rank']} | {c['tokens']} | {c['kernel_s'] * 1e3:.4f} | "
                             f"{c['blas_s'] * 1e3:.4f} | {c['faster']} | {c['code_picks']} | {c['static_model_picks']} | "
                             f"{c['fitted_model_picks']} |")
        probe = dm.get("use_lowrank_backward_probe")
        if probe:
            lines.append("")
            lines.append("use_lowrank_backward reaches autograd's backward: " + ", ".join(
                f"{k}: {v['override_reaches_backward']}" for k, v in probe.items()))
    if report["timings"]:
        lines += ["", "| impl | strategy | dtype | tokens | layer | r | fwd ms | step ms | saved MB | peak MB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for t in report["timings"]:
            strat = (t.get("strategy") or "") + (f" -> {t['path']}" if t.get("strategy") == "auto" and t.get("path") else "")
            head = f"| {t['impl']} | {strat} | {t['dtype']} | {t['tokens']} | {t['in']}x{t['out']} | {t['r']} "
            if "error" in t:
                lines.append(head + f"| error: {t['error'][:60]} | | | |")
                continue
            peak = "n/a" if t["peak_step_bytes"] is None else f"{t['peak_step_bytes'] / 1e6:.1f}"
            lines.append(head + f"| {t['fwd_ms']:.3f} | {t['step_ms']:.3f} | {t['saved_bytes'] / 1e6:.1f} | {peak} |")
    if report.get("retune"):
        rt = report["retune"]
        lines += ["", f"First step at a new token count ({rt['tokens']}): {rt['first_step_ms']:.1f} ms against "
                      f"{rt['steady_step_ms']:.3f} ms steady."]
    if report.get("warmers"):
        lines += ["", "Cache warmers (compiling ahead, results discarded): " + "; ".join(
            f"{','.join(w['sections'])} ({w.get('seconds', '-')} s, {'stopped ' + w['why'] if w.get('stopped') else 'rc ' + str(w.get('rc'))})"
            for w in report["warmers"])]
    lines.append("")
    for s in report["skipped"]:
        lines.append(f"- skipped: {s}")
    for e in report["errors"]:
        lines.append(f"- error: {e}")
    return "\n".join(lines) + "\n"


def watch_parent(pid: int) -> None:
    """Ends this process (a cache warmer) once the run that started it is gone."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(2.0)
            if os.getppid() != pid:
                os._exit(EXIT_INCOMPLETE)

    threading.Thread(target=watch, name="gpu-check-parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results", help="folder for the JSON and markdown (default ./results)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run, from the process start (default 450; self-test 600)")
    parser.add_argument("--cache-dir", default=None,
                        help="TRITON_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR go under it (default <out>/cache)")
    parser.add_argument("--selftest", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    parser.add_argument("--skip", default="", help=f"comma-separated sections to leave out: {','.join(SECTION_NAMES)}")
    parser.add_argument("--only", default="", help="comma-separated sections to run (the others count as skipped)")
    parser.add_argument("--jobs", type=int, default=None,
                        help=f"cache warmers compiling ahead in processes of their own (default {len(WARM_GROUPS)} on "
                             "a GPU, 0 in the self-test)")
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)  # a warmer's parent
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    only = set(filter(None, args.only.split(",")))
    unknown = (skip | only) - set(SECTION_NAMES)
    if unknown:
        print(f"unknown sections {sorted(unknown)}; the sections are {', '.join(SECTION_NAMES)}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    if args.budget is None:
        args.budget = 600.0 if args.selftest else 450.0
    if args.jobs is None:
        args.jobs = 0 if args.selftest else len(WARM_GROUPS)
    if args.parent_pid is not None:  # a cache warmer: it ends with the run that started it
        watch_parent(args.parent_pid)
    out = Path(args.out)
    cache = Path(args.cache_dir) if args.cache_dir else out / "cache"
    os.environ["TRITON_CACHE_DIR"] = str((cache / "triton").resolve())
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str((cache / "inductor").resolve())
    if args.selftest:
        os.environ["TRITON_INTERPRET"] = "1"  # before pefttriton defines its kernels
        import triton

        if tuple(int(v) for v in triton.__version__.split(".")[:2]) < SELFTEST_TRITON:
            print(f"the self-test runs Triton's CPU interpreter, which needs triton >= {'.'.join(map(str, SELFTEST_TRITON))} "
                  f"(3.6's fails on the kernels' K loops); this is triton {triton.__version__}", file=sys.stderr)
            return EXIT_CANNOT_RUN
    wants_preflight = "preflight" not in skip and (not only or "preflight" in only)
    trivial = start_trivial_kernel("cpu" if args.selftest else "cuda") if wants_preflight else None
    import torch

    if not args.selftest and not torch.cuda.is_available():
        if trivial and trivial.get("proc"):
            trivial["proc"].kill()
            trivial["proc"].communicate()
        print("bench.gpu_check needs a CUDA GPU; use --selftest to run its code on the CPU", file=sys.stderr)
        return EXIT_CANNOT_RUN
    from pefttriton.kernels import launch

    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.selftest else "cuda")
    slug = "selftest" if args.selftest else "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name(device)).strip("-")
    run = Run(args, device, SIZES["selftest" if args.selftest else "gpu"], args.selftest, out, slug)
    run.trivial_kernel = trivial
    run.report["meta"] = environment(device, args.selftest, args)
    run.report["meta"]["budget"] = {s.name: {"weight_s": s.weight, "minimum_s": s.minimum} for s in SECTIONS}
    chosen = []
    for section in SECTIONS:
        state = run.report["sections"][section.name]
        if section.gpu_only and args.selftest:
            state.update(status="n/a", reason="GPU only")
        elif section.name in skip or (only and section.name not in only):
            state.update(status="skipped", reason="--skip" if section.name in skip else "not in --only")
            run.report["skipped"].append(f"{section.name}: {state['reason']}")
        else:
            chosen.append(section)

    def on_sigterm(signum, frame):
        raise Interrupted()

    with contextlib.suppress(ValueError):  # not in the main thread: no handler
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with launch.allow_tf32(False):  # fp32 is IEEE unless a section says tf32
            run_sections(run, chosen, FUNCTIONS)
    except Interrupted:
        run.report["errors"].append("interrupted (SIGTERM) between sections")
    finally:
        stop_warmers(run, "the run ended")
    run.flush()
    text = markdown(run.report)
    (out / f"gpu-check-{slug}.md").write_text(text + f"\nVERDICT: {run.report['verdict']}\n", encoding="utf-8")
    print(text, flush=True)
    print(f"VERDICT: {run.report['verdict']}", flush=True)
    return run.report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
