"""Measuring: every implementation on one shape, interleaved timing, and what a run records.

Each record names its device and backend, and for a fused adapter the strategy it ran under and
the path that strategy took (``auto`` picks one per shape); GPU-only quantities (peak device
memory, CUDA kernel launches) are null on the CPU, never estimated.
"""

import copy
import os
import platform
import sys

import torch
from torch import nn

from . import cases, measure, roofline


def progress(total: int, enabled: bool, desc: str, stream=None):
    """A tqdm bar on ``stream`` (default stderr), or a silent stand-in when ``enabled`` is false,
    tqdm is missing, or ``stream`` is not a terminal (a log file, a pipe, CI: a bar there is noise)."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        enabled = enabled and bool(isatty and isatty())
    except (ValueError, OSError):  # a closed or detached stream
        enabled = False
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with transformers; without it, no bar
        enabled = False
        tqdm = None
    if not enabled or tqdm is None:
        class _Silent:
            def update(self, n: int = 1) -> None:
                pass

            def set_postfix_str(self, s: str) -> None:
                pass

            def close(self) -> None:
                pass

        return _Silent()
    return tqdm(total=total, desc=desc, file=stream, dynamic_ncols=True, leave=False)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {torch.get_num_threads()} threads"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "peft", "pefttriton"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            out[name] = None
    return out


def entries(suite: cases.Suite, available: dict[str, cases.Impl], device: torch.device, dtype: torch.dtype):
    """(impl, r, strategy) for every available implementation, fused ones once per strategy of
    :func:`bench.cases.strategies` (baselines: strategy None)."""
    out = []
    for impl in available.values():
        for r in suite.ranks[impl.family]:
            for strategy in cases.strategies(device, dtype) if impl.fused else (None,):
                out.append((impl, r, strategy))
    return out


def measure_group(device, dtype, n, m, N, entries, rounds, min_seconds, bar) -> list[dict]:
    """Every entry on one shape: saved bytes, launches, peak memory, then interleaved timing."""
    torch.manual_seed(0)
    base = nn.Linear(n, m, device=device, dtype=dtype)
    x = torch.randn(N, n, device=device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(N, m, device=device, dtype=dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    records, fwds, steps = [], {}, {}
    for key, (impl, r, strategy) in enumerate(entries):
        bar.set_postfix_str(f"N={N} {n}x{m} {impl.label} r={r}" + (f" {strategy}" if strategy else ""))
        rec = {
            "impl": impl.name, "label": impl.label, "family": impl.family, "fused": impl.fused,
            "device": device.type, "device_name": device_name(device),
            "backend": cases.backend_label(impl, device), "strategy": strategy, "path": None, "fwd_path": None,
            "dtype": cases.dtype_name(dtype), "tokens": N, "in_features": n, "out_features": m, "r": r,
            "status": "ok",
        }
        try:
            with cases.strategy(strategy):
                module = impl.make(copy.deepcopy(base), r)
                forward, step = measure.step_functions(module, x, grad_y)
                saved = measure.saved_for_backward(module, x)
                step()  # warm-up before counting: autotuning would launch extra kernels
                with measure.count_triton_launches() as launches:
                    step()
                rec["triton_launches_per_step"] = launches[0] if impl.fused else None
                rec["cuda_kernels_per_step"] = measure.count_cuda_kernels(step, device)
                rec["peak_step_bytes"] = measure.peak_step_bytes(step, device)
            if impl.fused:  # what the strategy ran: auto picks per shape, and apart for inference (no_grad)
                rec["path"] = cases.path_taken(step, strategy)
                rec["fwd_path"] = cases.path_taken(forward, strategy)
                rec["backend"] = cases.backend_label(impl, device, strategy, rec["path"])
            rec["saved_bytes"], rec["saved_bytes_input"], rec["saved_tensors"] = saved.total, saved.input, saved.tensors
            rec["roofline"] = roofline.summary(impl.family, impl.fused, N, n, m, r, elem)

            def under(fn, strategy=strategy):
                def run():
                    with cases.strategy(strategy):
                        fn()
                return run

            fwds[key], steps[key] = under(forward), under(step)
        except Exception as exc:  # noqa: BLE001 - reported in the table and the exit code, never hidden
            rec["status"] = f"error: {type(exc).__name__}: {exc}"
        records.append(rec)
        bar.update(1)
    if fwds:
        timed = {("fwd", k): f for k, f in fwds.items()} | {("step", k): f for k, f in steps.items()}
        samples = measure.time_interleaved(timed, device, rounds, min_seconds, on_round=lambda: bar.update(1))
        for key in fwds:
            rec = records[key]
            fwd_s, step_s = measure.median(samples[("fwd", key)]), measure.median(samples[("step", key)])
            rl = rec["roofline"]
            rec.update({
                "fwd_ms": fwd_s * 1e3, "step_ms": step_s * 1e3,
                "fwd_ms_samples": [s * 1e3 for s in samples[("fwd", key)]],
                "step_ms_samples": [s * 1e3 for s in samples[("step", key)]],
                "fwd_ms_min": min(samples[("fwd", key)]) * 1e3, "step_ms_min": min(samples[("step", key)]) * 1e3,
                "step_rel_spread": measure.relative_spread(samples[("step", key)]),
                "fwd_tokens_per_s": N / fwd_s, "step_tokens_per_s": N / step_s,
                # flops of the op as modelled (same math fused or not, except where the fused
                # backward recomputes instead of saving); "achieved" = model flops / measured time
                "fwd_gflops_per_s": rl["forward"]["flops"] / fwd_s / 1e9,
                "step_gflops_per_s": rl["step"]["flops"] / step_s / 1e9,
            })
            if device.type == "cuda":
                rec["fwd_tflops_per_s"] = rec["fwd_gflops_per_s"] / 1e3
                rec["step_tflops_per_s"] = rec["step_gflops_per_s"] / 1e3
    else:
        bar.update(rounds)
    return records


