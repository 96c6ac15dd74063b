"""One command that answers, on one GPU in a few minutes: is every Triton path right, and how fast is it.

    python -m bench.gpu_check [--out results] [--budget 480]      # on a CUDA machine, no network
    python -m bench.gpu_check --selftest [--out DIR]             # the same code, tiny shapes, CPU interpreter

Correctness (against float64 math on the same device): the engine forward and every gradient at odd,
large (16391 tokens, 4096 -> 11008, r = 256) and int32-boundary shapes (tokens x features > 2**31),
in fp32, tf32, fp16 and bf16, every strategy (fused, split, lean; weight in fp32 / tf32); every shipped
autotune config forced one at a time;
LoRMA-pi in both orders; ``torch.compile``; CUDA graphs; autocast.

Speed (CUDA events, median of at least 20 after warm-up): each adapter in each strategy (and what
``auto`` chose) against
PEFT, a lean cuBLAS + custom-autograd baseline and a frozen ``nn.Linear`` at 4096 x 4096, N in
{2048, 8192}, bf16, and fp32 with TF32 off and on; peak memory and bytes saved for backward; a
per-launch breakdown of one fused step against the cuBLAS calls of the same shapes; the cost of the
first call at a new token count (autotuning).

Writes ``gpu-check-<device>.json`` and ``gpu-check-<device>.md`` into ``--out``, every figure with
the GPU's name, the versions and the settings. Each section stops early when ``--budget`` seconds
are spent (a skipped part is listed, never silently dropped). The self-test needs the Triton used
on the CPU machines (its interpreter); on a GPU nothing falls back to the interpreter.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Tolerances: max |got - ref| / max |ref| against float64. fp32 runs IEEE dots; tf32 and the
# 16-bit types round every product's inputs (bf16: 8 bits of mantissa).
TOL = {"fp32": 1e-5, "tf32": 5e-3, "fp16": 5e-3, "bf16": 3e-2, "fp64": 1e-10}

# The interpreter of triton 3.6 cannot run the kernels (``range(0, tl.cdiv(K, BLOCK_K))`` fails:
# "only 0-dimensional arrays can be converted to Python scalars"); 3.9 runs them all.
SELFTEST_TRITON = (3, 9)

SIZES = {
    "gpu": {
        "odd": [(1031, 997, 1013, 1), (1031, 997, 1013, 33), (517, 130, 2049, 130)],
        "large": (16391, 4096, 11008, 256),
        "int32": (524_419, 4096, 4100, 16),  # 524419 * 4100 > 2**31 (y); * 4096 > 2**31 (x)
        "config_shape": (1031, 997, 1013, 33),
        "timing_layer": (4096, 4096),
        "timing_tokens": (2048, 8192),
        "ranks": {"vera": 256, "lora": 16, "deep_lora": 16, "lorma": 16},
        "reps": 25,
        "retune_tokens": 4095,
    },
    "selftest": {
        "odd": [(37, 70, 45, 1), (37, 70, 45, 7)],
        "large": (131, 19, 83, 33),
        "int32": (67, 29, 31, 3),  # the int32 code path at a size the interpreter runs in seconds
        "config_shape": (37, 70, 45, 7),
        "timing_layer": (48, 40),
        "timing_tokens": (16,),
        "ranks": {"vera": 8, "lora": 4, "deep_lora": 4, "lorma": 4},
        "reps": 3,
        "retune_tokens": 17,
    },
}


@dataclass
class Report:
    """Everything a run found; written as JSON and summarised as markdown."""

    meta: dict = field(default_factory=dict)
    checks: list[dict] = field(default_factory=list)
    timings: list[dict] = field(default_factory=list)
    breakdown: dict = field(default_factory=dict)
    retune: dict = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def check(self, name: str, dtype: str, shape, err: float, tol: float, **extra) -> None:
        ok = math.isfinite(err) and err <= tol
        self.checks.append({"name": name, "dtype": dtype, "shape": list(shape), "err": err, "tol": tol, "ok": ok, **extra})


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.time() + seconds

    def left(self) -> float:
        return self.end - time.time()


# ------------------------------------------------------------------------------------ helpers


def rel_err(got, ref) -> float:
    import torch

    got, ref = got.detach().to(torch.float64), ref.detach().to(torch.float64)
    if got.shape != ref.shape:
        return math.inf
    if got.numel() == 0:
        return 0.0
    if not torch.isfinite(got).all():
        return math.nan
    return (got - ref).abs().max().item() / max(ref.abs().max().item(), 1e-300)


def dtype_of(name: str):
    import torch

    return {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


@contextlib.contextmanager
def tf32(on: bool):
    import torch

    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_inputs(shape, dtype, kind: str, device, seed: int = 0) -> dict:
    """Leaves for ``lowrank_linear``: ``kind`` "vera" (d, b; all grads) or "lora" (scale only)."""
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


NAMES = ("x", "weight", "bias", "A", "B", "d", "b")


def check_engine(report: Report, label: str, shape, dtype_name: str, kind: str, mode: str, device, **extra) -> None:
    """Forward and every gradient of the Triton engine against float64 on the same device."""
    import torch

    import pefttriton
    from pefttriton.ops.naive import lowrank_linear_reference

    scale = 0.7 if kind == "lora" else 1.0
    t = engine_inputs(shape, dtype_of(dtype_name), kind, device)
    backend = "triton" if mode in ("fused", "split") else "auto"
    with tf32(dtype_name == "tf32"), pefttriton.use_backend(backend), pefttriton.use_strategy(mode):
        y = pefttriton.lowrank_linear(*[t[k] for k in NAMES], scale=scale)
        g = torch.randn(y.shape, device=device, generator=torch.Generator(device=device).manual_seed(1)).to(y.dtype)
        wrt = [k for k in NAMES if t[k] is not None]
        grads = torch.autograd.grad(y, [t[k] for k in wrt], g)
    ref = {k: (v.detach().double().requires_grad_(True) if v is not None else None) for k, v in t.items()}
    y_ref = lowrank_linear_reference(*[ref[k] for k in NAMES], scale=scale)
    ref_grads = torch.autograd.grad(y_ref, [ref[k] for k in wrt], g.double())
    tol = TOL[dtype_name]
    report.check(label, dtype_name, shape, rel_err(y, y_ref), tol, tensor="y", kind=kind, mode=mode, **extra)
    for name, got, want in zip(wrt, grads, ref_grads):
        report.check(label, dtype_name, shape, rel_err(got, want), tol, tensor=f"grad_{name}", kind=kind, mode=mode, **extra)


# ---------------------------------------------------------------------------------- correctness


def strategies_for(dtype_name: str) -> tuple[str, ...]:
    """Every strategy of the engine that runs at ``dtype_name`` (``weight``: float32 weights only)."""
    return ("fused", "split", "lean") + (("weight",) if dtype_name in ("fp32", "tf32") else ())


def correctness(report: Report, sizes: dict, device, budget: Budget) -> None:
    dtypes = ("fp32", "tf32", "fp16", "bf16")
    for shape in sizes["odd"]:
        for dtype_name in dtypes:
            for kind in ("vera", "lora"):
                for mode in strategies_for(dtype_name):
                    if budget.left() < 0:
                        report.skipped.append(f"odd shapes from {shape} {dtype_name} {kind} {mode} on: out of time")
                        return
                    check_engine(report, "odd shape", shape, dtype_name, kind, mode, device)
    for kind, mode in (("vera", "fused"), ("lora", "fused"), ("lora", "split"), ("vera", "lean")):
        if budget.left() < 0:
            report.skipped.append(f"large shape {kind} {mode}: out of time")
            break
        check_engine(report, "large shape", sizes["large"], "bf16", kind, mode, device)
    configs_one_at_a_time(report, sizes["config_shape"], device, budget)
    int32_boundary(report, sizes["int32"], device, budget)
    lorma_pi(report, sizes["odd"][-1], device, budget)
    compiled_graphs_autocast(report, sizes["odd"][0], device, budget)


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


def configs_one_at_a_time(report: Report, shape, device, budget: Budget) -> None:
    """Every shipped GEMM config of each dot family and every low-rank-backward config, alone."""
    from pefttriton.kernels import launch
    from pefttriton.kernels import lowrank_linear as kernels

    if launch.INTERPRET:  # the interpreter runs one config of its own; nothing to force
        report.skipped.append("autotune configs one at a time: interpreter (GPU only)")
        return
    families = {"16-bit": ("fp16", "bf16"), "fp32": ("fp32",), "tf32": ("tf32",)}
    for family, dtype_names in families.items():
        for index, config in enumerate(kernels.GEMM_CONFIGS[family]):
            for dtype_name in dtype_names:
                if budget.left() < 0:
                    report.skipped.append(f"GEMM config {family}[{index}] {dtype_name} on: out of time")
                    return
                # the overwriting and the accumulating (split) launches have an autotuner each
                with forced_config(kernels._fused_gemm_kernel, config), \
                        forced_config(kernels._fused_gemm_accumulate_kernel, config):
                    for mode in ("fused", "split"):
                        check_engine(report, f"GEMM config {family}[{index}] {config}", shape, dtype_name, "vera", mode,
                                     device, config=str(config))
    for index, config in enumerate(kernels.GRAD_CONFIGS):
        with forced_config(kernels._lowrank_grad_kernel, config):
            check_engine(report, f"low-rank grad config [{index}] {config}", shape, "bf16", "vera", "fused", device,
                         config=str(config))


def int32_boundary(report: Report, shape, device, budget: Budget) -> None:
    """tokens x features above 2**31 elements: y and grad_x at rows around the boundary, and the
    weight gradients (reductions over every token) in float64 chunks."""
    import torch

    import pefttriton

    if budget.left() < 60 and device.type == "cuda":
        report.skipped.append("int32 boundary: out of time")
        return
    N, n, m, r = shape
    if device.type == "cuda" and torch.cuda.mem_get_info(device)[0] < 40 * 2**30:
        report.skipped.append("int32 boundary: under 40 GiB free on the GPU")
        return
    gen = torch.Generator(device=device).manual_seed(3)
    bf = torch.bfloat16
    x = torch.randn(N, n, device=device, generator=gen).to(bf).requires_grad_(True)
    weight = (torch.randn(m, n, device=device, generator=gen) * n**-0.5).to(bf)
    A = (torch.randn(r, n, device=device, generator=gen) * n**-0.5).to(bf).requires_grad_(True)
    B = (torch.randn(m, r, device=device, generator=gen) * r**-0.5).to(bf).requires_grad_(True)
    scale = 0.5
    with pefttriton.use_backend("triton"):
        y = pefttriton.lowrank_linear(x, weight, None, A, B, scale=scale)
        g = torch.randn(N, m, device=device, generator=gen).to(bf)
        gx, gA, gB = torch.autograd.grad(y, [x, A, B], g)
    rows = sorted({0, N // 2, N - 1, (2**31) // m, (2**31) // m + 1, (2**31) // n, (2**31) // n + 1} & set(range(N)))
    rows_t = torch.tensor(rows, device=device)
    xd, wd, Ad, Bd, gd = (t.detach().double() for t in (x, weight, A, B, g))
    y_ref = xd[rows_t] @ wd.T + scale * (xd[rows_t] @ Ad.T) @ Bd.T
    gx_ref = gd[rows_t] @ wd + scale * (gd[rows_t] @ Bd) @ Ad
    label = f"int32 boundary ({N}x{m} = {N * m:.3g} > 2^31)"
    report.check(label, "bf16", shape, rel_err(y[rows_t], y_ref), TOL["bf16"], tensor="y (rows at the boundary)")
    report.check(label, "bf16", shape, rel_err(gx[rows_t], gx_ref), TOL["bf16"], tensor="grad_x (rows at the boundary)")
    gA_ref = torch.zeros_like(Ad)
    gB_ref = torch.zeros_like(Bd)
    for start in range(0, N, 65536):
        xc, gc = xd[start:start + 65536], gd[start:start + 65536]
        gA_ref += scale * (gc @ Bd).T @ xc
        gB_ref += scale * gc.T @ (xc @ Ad.T)
    report.check(label, "bf16", shape, rel_err(gA, gA_ref), TOL["bf16"], tensor="grad_A")
    report.check(label, "bf16", shape, rel_err(gB, gB_ref), TOL["bf16"], tensor="grad_B")


def lorma_pi(report: Report, shape, device, budget: Budget) -> None:
    import torch

    import pefttriton
    from pefttriton.ops.naive import lorma_pi_linear_reference

    N, n, m, r = shape
    for dtype_name in ("fp32", "tf32", "fp16", "bf16"):
        for order in ("tokens", "weight"):
            if budget.left() < 0:
                report.skipped.append(f"LoRMA-pi {dtype_name} {order} on: out of time")
                return
            dtype = dtype_of(dtype_name)
            gen = torch.Generator(device=device).manual_seed(4)
            x = torch.randn(N, n, device=device, generator=gen).to(dtype).requires_grad_(True)
            w = (torch.randn(m, n, device=device, generator=gen) * n**-0.5).to(dtype)
            bias = torch.randn(m, device=device, generator=gen).to(dtype)
            A = (torch.randn(r, m, device=device, generator=gen) * m**-0.5).requires_grad_(True)
            B = (torch.randn(m, r, device=device, generator=gen) * r**-0.5).requires_grad_(True)
            with tf32(dtype_name == "tf32"), pefttriton.use_backend("triton"):
                y = pefttriton.lorma_pi_linear(x, w, bias, A, B, scale=0.5, order=order)
                grads = torch.autograd.grad(y.float().sum(), [x, A, B])
            ref = [t.detach().double().requires_grad_(True) for t in (x, A, B)]
            y_ref = lorma_pi_linear_reference(ref[0], w.double(), bias.double(), ref[1], ref[2], scale=0.5)
            ref_grads = torch.autograd.grad(y_ref.sum(), ref)
            tol = TOL[dtype_name] * 4  # M = s shift(BA) is rounded to the layer dtype before its GEMM
            report.check(f"LoRMA-pi ({order})", dtype_name, shape, rel_err(y, y_ref), tol, tensor="y")
            for name, got, want in zip(("x", "A", "B"), grads, ref_grads):
                report.check(f"LoRMA-pi ({order})", dtype_name, shape, rel_err(got, want), tol, tensor=f"grad_{name}")


def compiled_graphs_autocast(report: Report, shape, device, budget: Budget) -> None:
    """A fused LoRA layer under torch.compile, in a CUDA graph, and under autocast, against eager."""
    import torch
    from torch import nn

    import pefttriton

    N, n, m, r = shape
    torch.manual_seed(5)
    dtype = torch.bfloat16
    layer = pefttriton.FusedLoRALinear(nn.Linear(n, m, device=device, dtype=dtype), r, alpha=2.0 * r)
    with torch.no_grad():
        layer.lora_B.normal_(0.0, r**-0.5)
    x = torch.randn(N, n, device=device, dtype=dtype)

    def run(module, inp):
        inp = inp.detach().requires_grad_(True)
        out = module(inp)
        out.float().square().sum().backward()
        grads = (inp.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
        layer.zero_grad(set_to_none=True)
        return out.detach(), grads

    eager = run(layer, x)
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    got = run(compiled, x)
    for name, a, b in zip(("y", "grad_x", "grad_A", "grad_B"), (got[0], *got[1]), (eager[0], *eager[1])):
        report.check(f"torch.compile ({backend}) vs eager", "bf16", shape, rel_err(a, b), TOL["bf16"], tensor=name)
    if device.type == "cuda":
        static_x = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up (autotuning) outside the capture
                layer(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            static_y = layer(static_x)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        with torch.no_grad():
            report.check("CUDA graph replay vs eager", "bf16", shape, rel_err(static_y, layer(x)), 1e-6, tensor="y")
    else:
        report.skipped.append("CUDA graphs: GPU only")
    layer32 = pefttriton.FusedLoRALinear(nn.Linear(n, m, device=device), r)
    with torch.no_grad():
        layer32.lora_B.normal_(0.0, r**-0.5)
    x32 = torch.randn(N, n, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = layer32(x32)
    with torch.no_grad():
        want = layer32(x32.to(dtype).float())  # fp32 layer on the bf16-rounded input
    report.check("autocast bf16 vs fp32 on rounded input", "bf16", shape, rel_err(y, want), TOL["bf16"], tensor="y",
                 out_dtype=str(y.dtype))


# ----------------------------------------------------------------------------------------- speed


def _impls(device) -> dict:
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


def time_cuda(fn, reps: int, device) -> list[float]:
    """Milliseconds per call: CUDA events on the GPU (perf_counter on the CPU), after two warm-ups."""
    import torch

    for _ in range(2):
        fn()
    synchronize(device)
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def speed(report: Report, sizes: dict, device, budget: Budget) -> None:
    import torch
    from torch import nn

    import pefttriton
    from . import measure

    n, m = sizes["timing_layer"]
    settings = [("bf16", N) for N in sizes["timing_tokens"]] + [("fp32", sizes["timing_tokens"][0]),
                                                              ("tf32", sizes["timing_tokens"][0])]
    modes = ("auto", *strategies_for("bf16"), "weight") if device.type == "cuda" else ("auto",)
    for dtype_name, N in settings:
        dtype = dtype_of(dtype_name)
        torch.manual_seed(0)
        base = nn.Linear(n, m, device=device, dtype=dtype, bias=False)
        x = torch.randn(N, n, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(N, m, device=device, dtype=dtype)
        for name, (family, make) in _impls(device).items():
            for mode in modes if name.startswith("fused") else (None,):
                if mode == "weight" and dtype_name not in ("fp32", "tf32"):
                    continue
                if budget.left() < 0:
                    report.skipped.append(f"timing {dtype_name} N={N} {name} on: out of time")
                    return
                r = sizes["ranks"].get(family, 0)
                row = {"impl": name, "strategy": mode, "dtype": dtype_name, "tokens": N, "in": n, "out": m, "r": r}
                try:
                    with tf32(dtype_name == "tf32"), pefttriton.use_strategy(mode or "auto"):
                        module = make(copy.deepcopy(base), r)
                        forward, step = measure.step_functions(module, x, g)
                        if mode == "auto":
                            step()
                            row["auto_path"] = pefttriton.last_path()  # what auto chose here
                        row["fwd_ms"] = statistics.median(time_cuda(forward, sizes["reps"], device))
                        step_ms = time_cuda(step, sizes["reps"], device)
                        row["step_ms"] = statistics.median(step_ms)
                        row["step_ms_spread"] = measure.relative_spread(step_ms)
                        row["saved_bytes"] = measure.saved_for_backward(module, x).total
                        row["peak_step_bytes"] = measure.peak_step_bytes(step, device)
                except Exception as exc:  # noqa: BLE001 - recorded and reported, the run goes on
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                report.timings.append(row)


def kernel_breakdown(report: Report, sizes: dict, device, budget: Budget) -> None:
    """CUDA time per kernel of one fused LoRA step (fused, split, lean), next to cuBLAS on the same GEMMs."""
    import torch
    from torch import nn
    from torch.profiler import ProfilerActivity, profile

    import pefttriton
    from . import measure

    if device.type != "cuda":
        report.skipped.append("per-launch breakdown: GPU only")
        return
    n, m = sizes["timing_layer"]
    N = sizes["timing_tokens"][-1]
    r = sizes["ranks"]["lora"]
    dtype = torch.bfloat16
    x = torch.randn(N, n, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(N, m, device=device, dtype=dtype)
    base = nn.Linear(n, m, device=device, dtype=dtype, bias=False)
    out = {}
    for mode in ("fused", "split", "lean"):
        with pefttriton.use_strategy(mode):
            layer = pefttriton.FusedLoRALinear(copy.deepcopy(base), r)
            _, step = measure.step_functions(layer, x, g)
            for _ in range(3):
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
    out["cuBLAS, same shapes (ms)"] = {k: statistics.median(time_cuda(f, 20, device)) for k, f in cublas.items()}
    report.breakdown = out


def retune_cost(report: Report, sizes: dict, device) -> None:
    """The first fused step at a token count never seen (autotuning) against the steady step."""
    import torch
    from torch import nn

    import pefttriton
    from . import measure

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
    steady = statistics.median(time_cuda(step, sizes["reps"], device))
    report.retune = {"tokens": N, "first_step_ms": first, "steady_step_ms": steady}


# -------------------------------------------------------------------------------------- output


def environment(device, selftest: bool) -> dict:
    import torch
    import triton

    import pefttriton

    meta = {
        "device": device.type, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "selftest": selftest, "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "triton": triton.__version__, "pefttriton": pefttriton.__version__,
        "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": "TF32 off unless the row says tf32; medians of CUDA-event timings after 2 warm-ups",
    }
    with contextlib.suppress(Exception):
        import peft

        meta["peft"] = peft.__version__
    return meta


def markdown(report: Report) -> str:
    meta = report.meta
    where = meta["gpu"] or f"CPU self-test ({platform.machine()}, Triton interpreter): not GPU figures"
    bad = [c for c in report.checks if not c["ok"]]
    lines = [f"# pefttriton GPU check: {where}", "",
             f"torch {meta['torch']}, CUDA {meta['cuda']}, triton {meta['triton']}, peft {meta.get('peft')}, "
             f"pefttriton {meta['pefttriton']}; {meta['date_utc']}", "",
             f"Correctness: {len(report.checks) - len(bad)} of {len(report.checks)} checks within tolerance "
             "(max |got - ref| / max |ref| against float64).", ""]
    for c in bad[:40]:
        lines.append(f"- FAIL {c['name']} {c['dtype']} {c['shape']} {c.get('tensor', '')}: {c['err']:.3g} > {c['tol']:g}")
    if report.timings:
        lines += ["", "| impl | strategy | dtype | tokens | layer | r | fwd ms | step ms | saved MB | peak MB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for t in report.timings:
            if "error" in t:
                lines.append(f"| {t['impl']} | {t.get('strategy') or ''}{' -> ' + t['auto_path'] if t.get('auto_path') else ''} | {t['dtype']} | {t['tokens']} | {t['in']}x{t['out']} "
                             f"| {t['r']} | error: {t['error'][:60]} | | | |")
                continue
            peak = "n/a" if t["peak_step_bytes"] is None else f"{t['peak_step_bytes'] / 1e6:.1f}"
            lines.append(f"| {t['impl']} | {t.get('strategy') or ''}{' -> ' + t['auto_path'] if t.get('auto_path') else ''} | {t['dtype']} | {t['tokens']} | {t['in']}x{t['out']} "
                         f"| {t['r']} | {t['fwd_ms']:.3f} | {t['step_ms']:.3f} | {t['saved_bytes'] / 1e6:.1f} | {peak} |")
    if report.retune:
        lines += ["", f"First step at a new token count ({report.retune['tokens']}): "
                      f"{report.retune['first_step_ms']:.1f} ms against {report.retune['steady_step_ms']:.3f} ms steady."]
    for s in report.skipped:
        lines.append(f"- skipped: {s}")
    for e in report.errors:
        lines.append(f"- error: {e}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results", help="folder for the JSON and markdown (default ./results)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole check (default 420)")
    parser.add_argument("--selftest", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    parser.add_argument("--skip", default="", help="comma-separated sections to leave out: correctness,speed,breakdown,retune")
    args = parser.parse_args(argv)
    if args.selftest:
        os.environ["TRITON_INTERPRET"] = "1"  # before pefttriton defines its kernels
        import triton

        if tuple(int(v) for v in triton.__version__.split(".")[:2]) < SELFTEST_TRITON:
            print(f"the self-test runs Triton's CPU interpreter, which needs triton >= {'.'.join(map(str, SELFTEST_TRITON))} "
                  f"(3.6's fails on the kernels' K loops); this is triton {triton.__version__}", file=sys.stderr)
            return 2
    import torch

    if not args.selftest and not torch.cuda.is_available():
        print("bench.gpu_check needs a CUDA GPU; use --selftest to run its code on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.selftest else "cuda")
    sizes = SIZES["selftest" if args.selftest else "gpu"]
    report = Report(meta=environment(device, args.selftest))
    skip = set(filter(None, args.skip.split(",")))
    budget = Budget(args.budget)
    sections = [
        ("correctness", lambda: correctness(report, sizes, device, Budget(0.55 * budget.left()))),
        ("speed", lambda: speed(report, sizes, device, Budget(0.75 * budget.left()))),
        ("breakdown", lambda: kernel_breakdown(report, sizes, device, budget)),
        ("retune", lambda: retune_cost(report, sizes, device)),
    ]
    for name, section in sections:
        if name in skip:
            report.skipped.append(f"{name}: --skip")
            continue
        t0 = time.time()
        try:
            section()
        except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others' results
            report.errors.append(f"{name}: {type(exc).__name__}: {exc}"[:500])
        print(f"{name}: {time.time() - t0:.0f} s", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "selftest" if args.selftest else "".join(c if c.isalnum() else "-" for c in report.meta["gpu"]).strip("-")
    (out / f"gpu-check-{slug}.json").write_text(json.dumps(asdict(report), indent=1, default=str), encoding="utf-8")
    text = markdown(report)
    (out / f"gpu-check-{slug}.md").write_text(text, encoding="utf-8")
    print(text)
    return 0 if all(c["ok"] for c in report.checks) and not report.errors else 1


if __name__ == "__main__":
    sys.exit(main())
