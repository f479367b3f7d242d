"""Module paths of repsim 0.1 that now live in subpackages: importing an old path gives the new module.

``import repsim.metrics`` returns ``repsim.measures.functions`` itself (same object, so patches and isinstance
checks agree) and emits a ``DeprecationWarning`` naming the new path; ``repsim.losses`` is a public alias and
stays without a warning. Installed once by ``repsim/__init__.py`` as a ``sys.meta_path`` finder.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

# old path -> new path
MOVED = {
    "repsim.errors": "repsim.system.errors",
    "repsim.outputs": "repsim.system.outputs",
    "repsim.threads": "repsim.system.threads",
    "repsim.arrays": "repsim.measures.arrays",
    "repsim.metrics": "repsim.measures.functions",
    "repsim.layer_pairs": "repsim.measures.allpairs",
    "repsim.moments": "repsim.measures.moments",
    "repsim.losses": "repsim.measures.losses",
    "repsim.assets": "repsim.activations.assets",
    "repsim.data": "repsim.activations.data",
    "repsim.extract": "repsim.activations.extract",
    "repsim.store": "repsim.activations.store",
    "repsim.saved": "repsim.activations.saved",
    "repsim.words": "repsim.activations.words",
    "repsim.comparison": "repsim.analysis.comparison",
    "repsim.stats": "repsim.analysis.stats",
    "repsim.curve": "repsim.analysis.curve",
    "repsim.plot": "repsim.analysis.plot",
    "repsim.report": "repsim.analysis.report",
    "repsim.evaluate": "repsim.distill.evaluation",
}
# old paths that are part of the public interface: aliased without a warning
PUBLIC_ALIASES = frozenset({"repsim.losses"})


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``MOVED`` paths; the loader hands back the already imported new module."""

    def find_spec(self, fullname: str, path=None, target=None):  # noqa: ANN001
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        if spec.name not in PUBLIC_ALIASES:
            warnings.warn(f"{spec.name} moved to {new}; import it from there (or the name from repsim)",
                          DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        module.__dict__.setdefault("__moved_spec__", module.__spec__)
        return module

    def exec_module(self, module: ModuleType) -> None:
        # the import system stamped the old spec on the shared module object: give it its own back
        module.__spec__ = module.__dict__["__moved_spec__"]


def install() -> None:
    """Add the finder to ``sys.meta_path`` once."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
