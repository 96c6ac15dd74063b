"""Module paths of pefttriton 0.1 that moved when the package grew its layer folders.

``import pefttriton.vera`` (and every other name in :data:`MOVED`) still works for one release: it
returns the module at its new path, the same object, with a ``DeprecationWarning`` naming that
path. Objects pickled under an old path load too. Everything ``pefttriton`` exports is unchanged.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# old path -> new path
MOVED = {
    "pefttriton.backend": "pefttriton.ops.backend",
    "pefttriton.strategy": "pefttriton.ops.strategy",
    **{f"pefttriton.{name}": f"pefttriton.adapters.{name}"
       for name in ("adapter_layer", "vera", "lora", "deep_lora", "lorma", "config", "registry")},
    **{f"pefttriton.{name}": f"pefttriton.integration.{name}"
       for name in ("surgery", "injection", "save", "peft_interop", "acceleration", "distributed", "vera_bank")},
    "pefttriton.analysis": "pefttriton.tools.analysis",
    "pefttriton.kernel_report": "pefttriton.tools.kernel_report",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path of :data:`MOVED` and loads it as the module at the new path."""

    def find_spec(self, name, path=None, target=None):
        if name not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old path goes away in the next release "
                      "(names exported by pefttriton itself are unchanged)", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__  # the import system sets __spec__ to ours next
        return module

    def exec_module(self, module):
        """Nothing to run (the module at the new path is already imported): its own spec back."""
        module.__spec__ = module.__spec__.loader_state


def install() -> None:
    """Let the old paths import (once per process)."""
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.append(_Alias())
