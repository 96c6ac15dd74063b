"""The backend and GEMM-mode state: context-local overrides, validated environment, one path per call."""

import os
import subprocess
import sys
import threading

import pytest
import torch

import pefttriton
from pefttriton.kernels import lowrank_linear as kernels


def test_use_backend_is_context_local():
    """Two threads interleave use_backend blocks; each sees only its own choice, and the default
    is untouched afterwards (with one process-wide variable the second thread read the first one's
    restore, and the process ended on the wrong backend)."""
    default = pefttriton.get_backend()
    steps = [threading.Event() for _ in range(4)]
    seen = {}

    def first():
        with pefttriton.use_backend("torch"):
            steps[0].set()
            steps[1].wait(5)
            seen["first inside"] = pefttriton.get_backend()
        steps[2].set()

    def second():
        steps[0].wait(5)
        with pefttriton.use_backend("triton"):
            steps[1].set()
            steps[2].wait(5)  # the first thread has left its block
            seen["second inside"] = pefttriton.get_backend()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"first inside": "torch", "second inside": "triton"}
    assert pefttriton.get_backend() == default


def test_use_strategy_is_context_local_and_restores():
    assert pefttriton.get_strategy() == "auto"
    with pefttriton.use_strategy("split"):
        assert pefttriton.get_strategy() == "split"
        box = {}
        thread = threading.Thread(target=lambda: box.setdefault("strategy", pefttriton.get_strategy()))
        thread.start()
        thread.join()
        assert box["strategy"] == "auto"  # another thread sees the process-wide default
    assert pefttriton.get_strategy() == "auto"
    with pytest.raises(ValueError, match="strategy must be one of"):
        with pefttriton.use_strategy("splitt"):
            pass
    with pytest.warns(DeprecationWarning), pefttriton.use_gemm_mode("split"):
        assert pefttriton.get_strategy() == "split"


def test_set_backend_is_process_wide():
    pefttriton.set_backend("torch")  # restored by conftest's autouse fixture
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("backend", pefttriton.get_backend()))
    thread.start()
    thread.join()
    assert box["backend"] == "torch"


@pytest.mark.interpreter
@pytest.mark.cpu_only  # on the CPU "auto" differs from "triton"
def test_backward_runs_the_path_of_its_forward(gen, monkeypatch):
    """The path is fixed when the op is called: a backward run after leaving use_backend (or, on
    CUDA, in an autograd thread that never saw the override) still runs the forward's backend."""
    calls = {"lowrank_grads": 0}
    original = kernels.lowrank_grads

    def counted(*args, **kwargs):
        calls["lowrank_grads"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "lowrank_grads", counted)
    x = torch.randn(5, 6, generator=gen, requires_grad=True)
    w, A, B = torch.randn(4, 6), torch.randn(2, 6), torch.randn(4, 2)
    with pefttriton.use_backend("triton"):
        y = pefttriton.lowrank_linear(x, w, None, A, B)
    y.sum().backward()  # outside the block: the default (auto -> torch on the CPU) would differ
    assert calls["lowrank_grads"] == 1


@pytest.mark.parametrize("variable,value", [("PEFTTRITON_BACKEND", "Torch"), ("PEFTTRITON_STRATEGY", "cublas"),
                                            ("PEFTTRITON_GEMM_MODE", "splitt")])
def test_bad_environment_fails_at_import(variable, value):
    env = {**os.environ, variable: value}
    proc = subprocess.run([sys.executable, "-c", "import pefttriton"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert variable in proc.stderr and repr(value) in proc.stderr


@pytest.mark.parametrize("variables,expected", [
    ({"PEFTTRITON_BACKEND": "torch", "PEFTTRITON_STRATEGY": "weight"}, ["torch", "weight"]),
    ({"PEFTTRITON_GEMM_MODE": "split"}, ["auto", "split"]),  # the deprecated name still works
    ({"PEFTTRITON_GEMM_MODE": "split", "PEFTTRITON_STRATEGY": "lean"}, ["auto", "lean"]),
])
def test_good_environment_sets_defaults(variables, expected):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEFTTRITON_") or k == "PEFTTRITON_TEST_DEVICE"}
    env.update(variables)
    code = "import pefttriton; print(pefttriton.get_backend(), pefttriton.get_strategy())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert proc.stdout.split() == expected
