"""The package's folders are its layers, and its imports point one way, without circles.

    kernels (Triton) <- ops <- adapters <- integration <- tools <- pefttriton (the exports)

Every module's imports are read with ``ast`` (nothing is imported), those inside functions
included, relative imports resolved. A module may import its own layer and the layers below it,
never one above; the kernels import nothing but triton, torch, the standard library and each
other. A module is placed by its folder, so a new file directly in ``pefttriton/`` (other than the
package's ``__init__`` and the old-path aliases) fails the test. Inside a layer, no module imports
itself back through others: the graph of imports between package modules has no cycle.
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# layer -> its modules (a name ending in ".*" covers a package's modules), lowest layer first
LAYERS = {
    "kernels": ("pefttriton.kernels.*",),
    "ops": ("pefttriton.ops", "pefttriton.ops.*"),
    "adapters": ("pefttriton.adapters", "pefttriton.adapters.*"),
    "integration": ("pefttriton.integration", "pefttriton.integration.*"),
    "tools": ("pefttriton.tools", "pefttriton.tools.*"),
    "exports": ("pefttriton", "pefttriton._moved"),
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


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself)
    of ``graph`` (module -> modules it imports): every import circle lies in one of them."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its code."""
    graph = {}
    for module in MODULES:
        targets = {owning_module(name) for _, name in imports_of(module)}
        graph[module] = {t for t in targets if t is not None}
    return graph


def test_every_module_has_a_layer():
    assert {"pefttriton", "pefttriton.kernels.launch", "pefttriton.ops", "pefttriton.adapters.adapter_layer",
            "pefttriton.integration.acceleration", "pefttriton.tools.kernel_report"} <= set(MODULES)
    unplaced = sorted(name for name in MODULES if layer_of(name) is None)
    assert not unplaced, f"modules in no layer (folder) of tests/test_layering.py: {unplaced}"
    loose = sorted(p.name for p in (ROOT / "pefttriton").glob("*.py") if p.name not in ("__init__.py", "_moved.py"))
    assert not loose, f"modules directly in pefttriton/ belong in a layer's folder: {loose}"


def test_no_import_circle():
    found = cycles(import_graph())
    assert not found, "import circles (function-level imports included): " + "; ".join(" <-> ".join(c) for c in found)


def test_the_circle_check_can_fail():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    # the circle this package had: backend chose through strategy, strategy timed through the op
    graph = import_graph()
    graph["pefttriton.ops.strategy"] = graph["pefttriton.ops.strategy"] | {"pefttriton.ops.lowrank_linear"}
    assert any("pefttriton.ops.strategy" in c and "pefttriton.ops.backend" in c for c in cycles(graph))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    found = violations(module, imports_of(module))
    assert not found, f"{module} ({MODULES[module].relative_to(ROOT)}): " + "; ".join(found)


def test_the_check_sees_imports_anywhere():
    """Known imports are found, at the top and inside functions; upward ones are caught."""
    # ``from pefttriton.ops import lowrank_linear``: the submodule of that name
    assert {name for _, name in imports_of("pefttriton.adapters.adapter_layer")} >= {
        "pefttriton.ops.lowrank_linear", "pefttriton.ops.validation"
    }
    # surgery imports transformers' Conv1D inside a function
    assert "transformers.pytorch_utils" in {name for _, name in imports_of("pefttriton.integration.surgery")}
    assert layer_of("pefttriton.ops.naive") == "ops" and layer_of("pefttriton.kernels.launch") == "kernels"
    assert layer_of("pefttriton") == "exports" and layer_of("pefttriton.nowhere") is None
    assert layer_of("pefttriton.integration.vera_bank") == "integration" and layer_of("pefttriton.kernels") is None
    ops_source = "import torch\nfrom . import validation\n\ndef f():\n    from ..adapters.registry import get_adapter\n    import pefttriton.integration.surgery\n"
    imports = imports_in(ops_source, "pefttriton.ops.new", package=False)
    assert imports == [(1, "torch"), (2, "pefttriton.ops.validation"), (5, "pefttriton.adapters.registry"), (6, "pefttriton.integration.surgery")]
    assert [v.split(":")[0] for v in violations("pefttriton.ops.new", imports)] == ["line 5", "line 6"]
    kernel_source = "import numpy\nimport triton.language as tl\nfrom pefttriton.kernels.launch import on_device\nfrom pefttriton.ops import lowrank_linear\n"
    found = violations("pefttriton.kernels.new", imports_in(kernel_source, "pefttriton.kernels.new", package=False))
    assert [v.split(":")[0] for v in found] == ["line 1", "line 4"]


@pytest.mark.parametrize("old", ["pefttriton.vera", "pefttriton.acceleration", "pefttriton.strategy", "pefttriton.kernel_report"])
def test_old_module_paths_import_with_a_warning(old):
    """The paths of 0.1 still import for one release: the module at its new path, with its own spec."""
    import importlib

    from pefttriton._moved import MOVED

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=MOVED[old].replace(".", r"\.")):
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])
    assert module.__spec__.name == MOVED[old]
    assert all(new in MODULES for new in MOVED.values())
