"""The backend and GEMM-mode state: context-local overrides, validated environment, one path per call."""

import json
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


# The environment is read when pefttriton is imported, so each setting needs a fresh import: one
# subprocess imports torch and triton (most of the start-up), then forks one child per setting,
# which sets the environment and imports pefttriton afresh (its output and exit code reported per
# setting, so each test fails on its own).
_FRESH_IMPORTS = r"""
import json, os, sys, tempfile, traceback
import torch, triton
assert "pefttriton" not in sys.modules
results = {}
for name, (env, code) in json.loads(sys.stdin.read()).items():
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
        os.environ.clear(); os.environ.update(env)
        status = 0
        try:
            exec(code, {"__name__": "__main__"})
        except BaseException:
            traceback.print_exc()
            status = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(status)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    out.seek(0); err.seek(0)
    results[name] = {"returncode": status, "stdout": out.read(), "stderr": err.read()}
print(json.dumps(results))
"""
BAD_ENVIRONMENT = [("PEFTTRITON_BACKEND", "Torch"), ("PEFTTRITON_STRATEGY", "cublas"), ("PEFTTRITON_GEMM_MODE", "splitt")]
GOOD_ENVIRONMENT = [
    ({"PEFTTRITON_BACKEND": "torch", "PEFTTRITON_STRATEGY": "weight"}, ["torch", "weight"]),
    ({"PEFTTRITON_GEMM_MODE": "split"}, ["auto", "split"]),  # the deprecated name still works
    ({"PEFTTRITON_GEMM_MODE": "split", "PEFTTRITON_STRATEGY": "lean"}, ["auto", "lean"]),
]


@pytest.fixture(scope="module")
def fresh_imports():
    """{setting: returncode, stdout, stderr of ``import pefttriton`` in a fresh child}."""
    cases = {}
    for variable, value in BAD_ENVIRONMENT:
        cases[f"{variable}={value}"] = ({**os.environ, variable: value}, "import pefttriton")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PEFTTRITON_") or k == "PEFTTRITON_TEST_DEVICE"}
    code = "import pefttriton; print(pefttriton.get_backend(), pefttriton.get_strategy())"
    for variables, _ in GOOD_ENVIRONMENT:
        cases[repr(variables)] = ({**clean, **variables}, code)
    proc = subprocess.run([sys.executable, "-c", _FRESH_IMPORTS], input=json.dumps(cases), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("variable,value", BAD_ENVIRONMENT)
def test_bad_environment_fails_at_import(variable, value, fresh_imports):
    result = fresh_imports[f"{variable}={value}"]
    assert result["returncode"] != 0
    assert variable in result["stderr"] and repr(value) in result["stderr"]


@pytest.mark.parametrize("variables,expected", GOOD_ENVIRONMENT)
def test_good_environment_sets_defaults(variables, expected, fresh_imports):
    result = fresh_imports[repr(variables)]
    assert result["returncode"] == 0, result["stderr"][-3000:]
    assert result["stdout"].split() == expected
