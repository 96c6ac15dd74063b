"""The repository's ``kernels/`` folder never takes the top-level name ``kernels``.

transformers (5.25 and later) imports the PyPI package ``kernels`` (Hugging Face's kernel hub).
This repository's Triton kernels live in a top-level ``kernels/`` folder too, installed as
``pefttriton.kernels`` through the link ``pefttriton/kernels -> ../kernels``. The folder holds no
``__init__.py``: a folder without one is only a namespace portion, which the import system takes
for a top-level name only when no regular package of that name exists anywhere on ``sys.path``.
So from the repository root (``python -m pytest``, ``python -m bench``, pytest's ``pythonpath``)
``import kernels`` still finds the PyPI package, and without that package transformers sees a
namespace with no ``__file__`` and treats ``kernels`` as absent.

Each check runs in a fresh interpreter whose first ``sys.path`` entry is the repository root, the
way ``python -m`` puts it there.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import background
import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPI_KERNELS = importlib.util.find_spec("kernels") is not None and importlib.util.find_spec("kernels").origin is not None


def _root_env() -> dict:
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_HUB_OFFLINE": "1"}


def run_from_root(code: str) -> dict:
    """Runs ``code`` with the repository root first on ``sys.path``; returns what it printed as JSON."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=_root_env())
    return _printed(done)


def _printed(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_layout():
    """The kernels are a folder of the repository, reached as ``pefttriton.kernels`` by a link,
    with no ``__init__.py`` that would make the folder a regular top-level package."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    link = ROOT / "pefttriton" / "kernels"
    assert link.is_symlink() and link.resolve() == (ROOT / "kernels").resolve()
    assert (ROOT / "kernels" / "lowrank_linear.py").is_file()


_PYPI_KERNELS_CODE = """
import json, os, sys
assert sys.path[0] in ('', os.getcwd())
import kernels
from kernels import CUDAProperties
import transformers.integrations.hub_kernels as hub
from transformers import LlamaConfig, LlamaForCausalLM
model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2))
import pefttriton.kernels.launch as launch
print(json.dumps({"kernels": os.path.realpath(kernels.__file__), "hub": hasattr(hub, "CUDAProperties"),
                  "launch": os.path.realpath(launch.__file__), "params": sum(p.numel() for p in model.parameters())}))
"""


# It builds a transformers model in a fresh interpreter (a few seconds): in the background from the
# start of the session (tests/background.py).
PYPI_KERNELS_RUN = background.Job(
    "pypi_kernels_run", lambda folder, items: [sys.executable, "-c", _PYPI_KERNELS_CODE], 300, env=_root_env, cwd=ROOT)


@pytest.fixture
def pypi_kernels_run():
    return PYPI_KERNELS_RUN.wait()


@pytest.mark.skipif(not PYPI_KERNELS, reason="the PyPI package kernels is not installed (transformers < 5.25)")
def test_pypi_kernels_wins_from_the_repository_root(pypi_kernels_run):
    """``import kernels`` is the PyPI package, transformers' hub integration imports from it, a
    transformers model builds, and ``pefttriton.kernels`` is still this repository's kernels."""
    assert pypi_kernels_run.returncode is not None, "did not finish within 300 s"
    found = _printed(pypi_kernels_run)
    assert not found["kernels"].startswith(str(ROOT) + "/"), found
    assert found["hub"] and found["params"] > 0
    assert found["launch"] == str((ROOT / "kernels" / "launch.py").resolve())


def test_without_pypi_kernels_transformers_sees_no_package():
    """With the PyPI package hidden (module and metadata), ``kernels`` from the root is at most a namespace without
    ``__file__`` (what transformers reads as "not installed"), and transformers still imports."""
    code = """
import importlib.abc, json, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "kernels" or name.startswith("kernels."):
            from importlib.machinery import PathFinder
            spec = PathFinder.find_spec(name, [p for p in sys.path if "site-packages" not in p], target)
            if spec is None:
                raise ModuleNotFoundError(name)
            return spec
sys.meta_path.insert(0, Hide())
import importlib.metadata as metadata
real_version = metadata.version
def version(name):
    if name == "kernels":
        raise metadata.PackageNotFoundError(name)
    return real_version(name)
metadata.version = version
import kernels
import transformers
from transformers.utils import import_utils
print(json.dumps({"file": getattr(kernels, "__file__", None), "available": import_utils.is_kernels_available()}))
"""
    found = run_from_root(code)
    assert found == {"file": None, "available": False}


def test_installed_package_layout(tmp_path):
    """A build (what a wheel and a normal install contain) has every module of the package, the
    kernels as ``pefttriton/kernels/*.py``, and no top-level ``kernels``."""
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    built = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.py")}
    assert {"pefttriton/kernels/launch.py", "pefttriton/kernels/lowrank_linear.py", "pefttriton/bench/__init__.py"} <= built
    # every module of the source tree (a subpackage missing from setup.py's list breaks the install)
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "pefttriton").rglob("*.py")}
    source |= {"pefttriton/kernels/" + p.name for p in (ROOT / "kernels").glob("*.py")}
    assert source <= built, sorted(source - built)
    assert not any(name.startswith("kernels/") for name in built)
    assert not (tmp_path / "pefttriton" / "kernels").is_symlink()
