"""pytest-benchmark suite: serving many VeRA adapters in one batch (see bench/vera_bank.py).

Collected only under ``pytest --benchmark-only`` (bench/conftest.py). One layer, inference
(``torch.no_grad``): a batch mixing 64 adapters in a VeRABank, the same tokens through one
adapter, PEFT VeRA's per-adapter loop of sub-batches and PEFT LoRA's mixed-batch forward, in one
benchmark group per dtype so that pytest-benchmark's table puts them side by side. Nothing here
asserts a speed; ``extra_info`` records device, shape and bytes per resident adapter.
"""

from functools import cache

import pytest
import torch

from . import cases, vera_bank
from .run import device_name

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = 25 if DEVICE.type == "cuda" else 10
SHAPE = {"tokens": 4096, "in_features": 1024, "out_features": 1024, "r": 256, "adapters": 64, "lora_r": 16}
DTYPES = (torch.float32, torch.bfloat16) if DEVICE.type == "cuda" else (torch.float32,)


@cache
def _built(dtype: torch.dtype):
    s = SHAPE
    return vera_bank.build(DEVICE, dtype, s["tokens"], s["in_features"], s["out_features"], s["r"], s["adapters"],
                           s["lora_r"])


@pytest.mark.parametrize("dtype", DTYPES, ids=[cases.dtype_name(d) for d in DTYPES])
@pytest.mark.parametrize("impl", vera_bank.IMPLS)
def test_vera_bank(benchmark, impl, dtype):
    from pefttriton.kernels import launch

    if DEVICE.type == "cuda" and launch.INTERPRET:
        pytest.fail("Triton kernels run in the interpreter (TRITON_INTERPRET=1): run `pytest --benchmark-only bench`")
    fns, per_adapter, checks = _built(dtype)
    fn = fns[impl]

    def timed() -> None:
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    s = SHAPE
    benchmark.group = (f"vera bank {cases.dtype_name(dtype)} {s['in_features']}x{s['out_features']} N={s['tokens']} "
                       f"r={s['r']} K={s['adapters']} [{DEVICE.type}]")
    benchmark.extra_info.update({
        "device": DEVICE.type, "device_name": device_name(DEVICE), "dtype": cases.dtype_name(dtype), **s,
        "bytes_per_adapter": per_adapter.get(impl), **checks,
    })
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    stats = getattr(benchmark.stats, "stats", None)  # None under --benchmark-disable
    if stats is not None and stats.median > 0:
        benchmark.extra_info["tokens_per_s"] = s["tokens"] / stats.median
