"""pytest-benchmark suite: every adapter and baseline, forward and forward + backward.

Collected only under ``pytest --benchmark-only`` (see bench/conftest.py). Benchmarks are grouped
per shape and phase, so pytest-benchmark's table puts fused and unfused side by side; each fused
adapter is timed under ``auto`` and under every strategy the device and dtype allow
(:func:`bench.cases.strategies`). Nothing here asserts a speed: a slow run is data, not a
failure. ``extra_info`` records device, backend, strategy and the path it took with every figure: tokens/s, achieved FLOP/s (TFLOP/s on GPU, GFLOP/s on CPU, from the
roofline model's flops), peak device memory (GPU), bytes saved for backward, launches per step.
"""

import copy
from dataclasses import dataclass
from functools import cache

import pytest
import torch
from torch import nn

from . import cases, measure, roofline
from .run import device_name

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = 25 if DEVICE.type == "cuda" else 10


@dataclass(frozen=True)
class Case:
    impl: str
    dtype: torch.dtype
    in_features: int
    out_features: int
    tokens: int
    r: int
    strategy: str | None  # pefttriton's strategy for a fused adapter, None for a baseline
    phase: str  # "forward" (inference, no_grad) or "step" (forward + backward)

    @property
    def id(self) -> str:
        strategy = f"-{self.strategy}" if self.strategy else ""
        return (f"{self.impl}{strategy}-{cases.dtype_name(self.dtype)}-{self.in_features}x{self.out_features}"
                f"-N{self.tokens}-r{self.r}-{self.phase}")


def _cases() -> list[Case]:
    suite = cases.suite(DEVICE, "pytest")
    out = []
    for dtype in suite.dtypes:
        for n, m in suite.layers:
            for N in suite.tokens:
                for impl in cases.IMPLS.values():
                    for r in suite.ranks[impl.family]:
                        for strategy in cases.strategies(DEVICE, dtype) if impl.fused else (None,):
                            for phase in ("forward", "step"):
                                out.append(Case(impl.name, dtype, n, m, N, r, strategy, phase))
    return out


CASES = _cases()


@cache
def _unavailable(name: str) -> str | None:
    return cases.probe(cases.IMPLS[name])


def _check_not_interpreted() -> None:
    from pefttriton.kernels import launch

    if DEVICE.type == "cuda" and launch.INTERPRET:
        pytest.fail(
            "Triton kernels run in the CPU interpreter in this session (TRITON_INTERPRET=1, which tests/conftest.py "
            "sets when tests/ is collected too), so GPU timings would be meaningless: run `pytest --benchmark-only bench`"
        )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_adapter(benchmark, case: Case) -> None:
    impl = cases.IMPLS[case.impl]
    reason = _unavailable(case.impl)
    if reason is not None:
        # Said in the run's summary (-rs), never dropped silently.
        pytest.skip(f"{impl.label}: {reason}")
    _check_not_interpreted()
    N, n, m, r = case.tokens, case.in_features, case.out_features, case.r
    torch.manual_seed(0)
    base = nn.Linear(n, m, device=DEVICE, dtype=case.dtype)
    x = torch.randn(N, n, device=DEVICE, dtype=case.dtype, requires_grad=True)
    grad_y = torch.randn(N, m, device=DEVICE, dtype=case.dtype)
    elem = torch.empty((), dtype=case.dtype).element_size()
    model = roofline.summary(impl.family, impl.fused, N, n, m, r, elem)

    with cases.strategy(case.strategy):
        module = impl.make(copy.deepcopy(base), r)
        forward, step = measure.step_functions(module, x, grad_y)
        fn = forward if case.phase == "forward" else step
        saved = measure.saved_for_backward(module, x)
        fn()  # warm-up (autotuning) before counting launches
        with measure.count_triton_launches() as launches:
            fn()
        path = cases.path_taken(fn, case.strategy) if impl.fused else None
        info = {
            "device": DEVICE.type,
            "device_name": device_name(DEVICE),
            "backend": cases.backend_label(impl, DEVICE, case.strategy, path),
            "strategy": case.strategy,
            "path": path,  # what the strategy ran (auto: its choice for this shape and phase)
            "dtype": cases.dtype_name(case.dtype), "tokens": N, "in_features": n, "out_features": m, "r": r,
            "phase": case.phase,
            "saved_for_backward_bytes": saved.total,
            "saved_for_backward_input_bytes": saved.input,
            "peak_device_bytes": measure.peak_step_bytes(fn, DEVICE),  # None on the CPU
            "cuda_kernels_per_call": measure.count_cuda_kernels(fn, DEVICE),  # None on the CPU
            "triton_launches_per_call": launches[0] if impl.fused else None,
            "model_flops": model[case.phase]["flops"],
            "model_min_bytes": model[case.phase]["bytes"],
        }

        def timed() -> None:
            fn()
            measure.synchronize(DEVICE)

        benchmark.group = f"{info['dtype']} {n}x{m} N={N} {case.phase} [{DEVICE.type}]"
        benchmark.extra_info.update(info)
        benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=2, iterations=1)

    stats = getattr(benchmark.stats, "stats", None)  # None under --benchmark-disable
    if stats is not None and stats.median > 0:
        seconds = stats.median
        benchmark.extra_info["tokens_per_s"] = N / seconds
        if DEVICE.type == "cuda":
            benchmark.extra_info["achieved_TFLOP_per_s"] = model[case.phase]["flops"] / seconds / 1e12
        else:
            benchmark.extra_info["achieved_GFLOP_per_s_cpu"] = model[case.phase]["flops"] / seconds / 1e9
        benchmark.extra_info["min_bytes_GB_per_s"] = model[case.phase]["bytes"] / seconds / 1e9
