"""The package's imports point one way: kernels <- ops <- adapters <- integration <- tools.

Every module's imports are read with ``ast`` (nothing is imported), those inside functions
included, relative imports resolved. A module may import its own layer and the layers below it,
never one above; the kernels import nothing but triton, torch, the standard library and each
other. A module that belongs to no layer fails the test, so a new file has to be placed.
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# layer -> its modules (a name ending in ".*" covers a package's modules), lowest layer first
LAYERS = {
    "kernels": ("pefttriton.kernels", "pefttriton.kernels.*"),
    "ops": ("pefttriton.ops", "pefttriton.ops.*", "pefttriton.backend", "pefttriton.strategy"),
    "adapters": (
        "pefttriton.adapter_layer", "pefttriton.vera", "pefttriton.lora", "pefttriton.deep_lora",
        "pefttriton.lorma", "pefttriton.config", "pefttriton.registry",
    ),
    "integration": (
        "pefttriton.surgery", "pefttriton.injection", "pefttriton.save", "pefttriton.peft_interop",
        "pefttriton.distributed", "pefttriton.acceleration", "pefttriton.vera_bank",
    ),
    "tools": ("pefttriton", "pefttriton.analysis", "pefttriton.kernel_report"),
}
ORDER = list(LAYERS)
KERNEL_THIRD_PARTY = {"triton", "torch"}


def package_modules() -> dict[str, Path]:
    """Module name -> file, for ``pefttriton/`` and ``kernels/`` (``pefttriton.kernels``, a namespace
    package without ``__init__``; ``rglob`` does not follow the link ``pefttriton/kernels``)."""
    modules = {}
    for folder, package in ((ROOT / "pefttriton", "pefttriton"), (ROOT / "kernels", "pefttriton.kernels")):
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = package_modules()


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def layer_of(name: str) -> str | None:
    """The layer of a package module (its longest matching entry), None for a module of no layer."""
    best, best_len = None, -1
    for layer, patterns in LAYERS.items():
        for pattern in patterns:
            if pattern.endswith(".*"):
                prefix = pattern[:-2]
                hit = name.startswith(prefix + ".")
            else:
                prefix, hit = pattern, name == pattern
            if hit and len(prefix) > best_len:
                best, best_len = layer, len(prefix)
    return best


def imports_in(source: str, module: str, package: bool) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import statement anywhere in ``source``, the code of
    ``module`` (a package's ``__init__`` when ``package``).

    ``from a.b import c`` counts as importing ``a.b.c`` when that is a package module (a
    submodule), else ``a.b``; relative imports are resolved against the module's package. The
    parent packages an import runs first (``pefttriton/__init__.py`` for every one) are the
    namespace, not a dependency, and are not counted.
    """
    tree = ast.parse(source)
    parent = module if package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parent.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else target))
    return found


def imports_of(module: str) -> list[tuple[int, str]]:
    return imports_in(MODULES[module].read_text(encoding="utf-8"), module, is_package(module))


def owning_module(name: str) -> str | None:
    """The package module an imported name refers to (``pefttriton.ops.naive`` -> itself,
    ``pefttriton.kernels.launch.INTERPRET`` -> ``pefttriton.kernels.launch``), None outside the package."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def violations(module: str, imports: list[tuple[int, str]]) -> list[str]:
    """What ``module`` (of the layer :func:`layer_of` gives) must not import among ``imports``."""
    layer = layer_of(module)
    found = []
    for line, name in imports:
        top = name.split(".")[0]
        if top in ("bench", "tests", "conftest", "helpers"):
            found.append(f"line {line}: {name} (outside the package)")
            continue
        target = owning_module(name)
        if target is None:
            if layer == "kernels" and top not in KERNEL_THIRD_PARTY and top not in sys.stdlib_module_names:
                found.append(f"line {line}: {name} (the kernels import only triton, torch and the standard library)")
        elif ORDER.index(layer_of(target)) > ORDER.index(layer):
            found.append(f"line {line}: {name} (layer {layer_of(target)}, above {layer})")
    return found


def test_every_module_has_a_layer():
    assert {"pefttriton", "pefttriton.kernels.launch", "pefttriton.ops", "pefttriton.adapter_layer"} <= set(MODULES)
    unplaced = sorted(name for name in MODULES if layer_of(name) is None)
    assert not unplaced, f"modules in no layer of tests/test_layering.py: {unplaced}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    found = violations(module, imports_of(module))
    assert not found, f"{module} ({MODULES[module].relative_to(ROOT)}): " + "; ".join(found)


def test_the_check_sees_imports_anywhere():
    """Known imports are found, at the top and inside functions; upward ones are caught."""
    # ``from pefttriton.ops import lowrank_linear``: the submodule of that name
    assert {name for _, name in imports_of("pefttriton.adapter_layer")} >= {
        "pefttriton.ops.lowrank_linear", "pefttriton.ops.validation"
    }
    # surgery imports transformers' Conv1D inside a function
    assert "transformers.pytorch_utils" in {name for _, name in imports_of("pefttriton.surgery")}
    assert layer_of("pefttriton.ops.naive") == "ops" and layer_of("pefttriton.kernels.launch") == "kernels"
    assert layer_of("pefttriton") == "tools" and layer_of("pefttriton.nowhere") is None
    ops_source = "import torch\nfrom . import validation\n\ndef f():\n    from ..registry import get_adapter\n    import pefttriton.surgery\n"
    imports = imports_in(ops_source, "pefttriton.ops.new", package=False)
    assert imports == [(1, "torch"), (2, "pefttriton.ops.validation"), (5, "pefttriton.registry"), (6, "pefttriton.surgery")]
    assert [v.split(":")[0] for v in violations("pefttriton.ops.new", imports)] == ["line 5", "line 6"]
    kernel_source = "import numpy\nimport triton.language as tl\nfrom pefttriton.kernels.launch import on_device\nfrom pefttriton.ops import lowrank_linear\n"
    found = violations("pefttriton.kernels.new", imports_in(kernel_source, "pefttriton.kernels.new", package=False))
    assert [v.split(":")[0] for v in found] == ["line 1", "line 4"]
