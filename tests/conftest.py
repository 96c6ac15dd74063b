"""Shared test setup: the device and interpreter switch and the fixtures (helpers live in helpers.py).

``PEFTTRITON_TEST_DEVICE`` chooses where the suite runs:

* ``cpu`` (the default; CI): the Triton kernels run in Triton's interpreter. Triton reads
  ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a function, so it is set in
  ``pytest_configure``, before any test module imports pefttriton.
* ``cuda``: the same tests on CUDA tensors with compiled kernels (no interpreter):
  ``torch.set_default_device("cuda")`` puts every tensor a test makes without a device on the GPU,
  and the ``gen`` fixture draws there. Tests that are CPU-specific by nature carry the ``cpu_only``
  marker and are skipped. Without a GPU this setting stops the run at once with a clear message.

Under ``pytest --benchmark-only`` the tests here are not collected (so they are not reported as
skipped) and the interpreter stays off, so that benchmarks on a GPU time the compiled kernels.

On the CPU the test process runs torch with one thread; the subprocesses whose results tests only
read (DDP/FSDP workers, the torchrun example, the kernel report's sample, a fresh-interpreter import
check) start with the session and run on the other cores meanwhile (background.py).
"""

import os
import re

import background
import distributed_workers
import pytest
import torch
from helpers import BACKENDS, DEVICE, TEST_DEVICE

DEVICES = ("cpu", "cuda")


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only: CPU-specific by nature; skipped with PEFTTRITON_TEST_DEVICE=cuda")
    config.addinivalue_line("markers", "interpreter: runs Triton kernels in the CPU interpreter (needs triton >= 3.9 there)")
    if config.getoption("benchmark_only", default=False):
        return
    if TEST_DEVICE not in DEVICES:
        raise pytest.UsageError(f"PEFTTRITON_TEST_DEVICE must be one of {DEVICES}, got {TEST_DEVICE!r}")
    if DEVICE.type == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError("PEFTTRITON_TEST_DEVICE=cuda but torch sees no CUDA device; unset it to test on the CPU")
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise pytest.UsageError("PEFTTRITON_TEST_DEVICE=cuda tests the compiled kernels: unset TRITON_INTERPRET")
        torch.set_default_device("cuda")
        return
    os.environ["TRITON_INTERPRET"] = "1"
    # The tests' tensors are tiny, so intra-op threads only add synchronisation: on 2 busy cores a
    # 60 x 60 float64 gradient-descent loop (tests/test_deep_factorization.py) took 13 s with 2
    # threads and 0.2 s with 1, and three of the larger test files used a quarter less CPU. One
    # thread also leaves the other cores to the subprocesses the tests start (background.py).
    torch.set_num_threads(1)
    from pefttriton.kernels import launch

    if not launch.INTERPRET:  # pragma: no cover - only when something imported pefttriton too early
        raise RuntimeError(
            "pefttriton.kernels was imported before TRITON_INTERPRET=1 was set; the Triton tests cannot run on the CPU"
        )


def pytest_ignore_collect(collection_path, config):
    if config.getoption("benchmark_only", default=False) and collection_path.name != "conftest.py":
        return True  # benchmarks only: the tests are not collected, rather than reported as skipped
    return None


# Triton's CPU interpreter runs the kernels from triton 3.9 on (3.6's fails on their K loops: "only
# 0-dimensional arrays can be converted to Python scalars"). With an older Triton (the GPU machine's
# versions replayed on the CPU, .ci/compat-lane) the tests that run kernels in the interpreter are
# skipped: those marked ``interpreter`` and those whose id names a Triton path or the triton backend.
INTERPRETER_TRITON = (3, 9)
_TRITON_WORDS = {"triton", "fused", "split", "tma"}


def _interpreter_usable() -> bool:
    import triton

    return tuple(int(v) for v in triton.__version__.split(".")[:2]) >= INTERPRETER_TRITON


def _runs_kernels_in_the_interpreter(item) -> bool:
    return "interpreter" in item.keywords or bool(_TRITON_WORDS & set(re.split(r"[^a-z0-9]+", item.nodeid.lower())))


def pytest_collection_modifyitems(config, items):
    if DEVICE.type == "cuda":
        skip = pytest.mark.skip(reason="CPU-specific (cpu_only); PEFTTRITON_TEST_DEVICE=cuda")
        for item in items:
            if "cpu_only" in item.keywords:
                item.add_marker(skip)
    elif not _interpreter_usable():
        import triton

        skip = pytest.mark.skip(reason=f"Triton's interpreter needs triton >= 3.9 to run the kernels (this is {triton.__version__})")
        for item in items:
            if _runs_kernels_in_the_interpreter(item):
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_backend():
    """No test may leak a backend or strategy choice (or a measured strategy) into the next one."""
    import pefttriton

    previous = pefttriton.get_backend(), pefttriton.get_strategy()
    yield
    pefttriton.set_backend(previous[0])
    pefttriton.set_strategy(previous[1])
    pefttriton.set_strategy_autotune(False)
    pefttriton.clear_strategy_cache()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs the test once per backend ("triton" goes through the interpreter); yields its name."""
    import pefttriton

    with pefttriton.use_backend(request.param):
        yield request.param


@pytest.fixture
def gen():
    """A seeded generator on the test device, so every test draws the same inputs on every run."""
    return torch.Generator(device=DEVICE).manual_seed(1234)



@pytest.fixture(scope="session", autouse=True)
def _background_jobs(request, tmp_path_factory):
    """Starts, before the first test, the subprocesses whose results selected tests read later
    (tests/background.py: the DDP/FSDP workers, the torchrun example, the kernel report's sample);
    ends any still running at the end of the session."""
    jobs = background.start_needed(request.session.items, tmp_path_factory)
    yield
    for job in jobs:
        job.stop()


@pytest.fixture(scope="session")
def distributed_runs():
    """The 2-process gloo runs of tests/test_ddp.py and tests/test_fsdp.py, one pair of worker
    processes per backend (tests/distributed_workers.py); ``.results(backend, module)`` gives both
    ranks' results, or fails the test when that backend's workers failed."""
    return distributed_workers.RUNS
