"""Shared test setup: the interpreter switch and the fixtures (shared helpers live in helpers.py).

There is no GPU on the test machines: the Triton kernels run on the CPU under Triton's
interpreter. Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a function, so it
must be set before pefttriton (and with it ``pefttriton.kernels``) is imported: ``pytest_configure``
runs before any test module is imported, and this file imports pefttriton only inside fixtures.

Under ``pytest --benchmark-only`` (which also loads this file through ``testpaths``) the
interpreter is left off, so that benchmarks on a GPU time the compiled kernels.
"""

import os

import pytest
import torch
from helpers import BACKENDS


def pytest_configure(config):
    if config.getoption("benchmark_only", default=False):
        return
    os.environ["TRITON_INTERPRET"] = "1"
    from pefttriton.kernels import launch

    if not launch.INTERPRET:  # pragma: no cover - only when something imported pefttriton too early
        raise RuntimeError(
            "pefttriton.kernels was imported before TRITON_INTERPRET=1 was set; the Triton tests cannot run on the CPU"
        )


@pytest.fixture(autouse=True)
def _restore_backend():
    """No test may leak a backend choice into the next one."""
    import pefttriton

    previous = pefttriton.get_backend()
    yield
    pefttriton.set_backend(previous)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs the test once per backend ("triton" goes through the interpreter); yields its name."""
    import pefttriton

    with pefttriton.use_backend(request.param):
        yield request.param


@pytest.fixture
def gen():
    """A seeded CPU generator, so every test draws the same inputs on every run."""
    return torch.Generator(device="cpu").manual_seed(1234)

