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

# names that left their module for the plumbing's one home: (module, old name) -> (new module, new name)
MOVED_NAMES = {
    ("repsim.activations.assets", "load_model"): ("repsim.activations.models", "load_model"),
    ("repsim.activations.assets", "quiet_transformers"): ("repsim.activations.models", "quiet_transformers"),
    ("repsim.activations.assets", "resolve_device"): ("repsim.system.devices", "resolve_device"),
    ("repsim.activations.assets", "torch_dtype"): ("repsim.system.devices", "resolve_dtype"),
    ("repsim.activations.extract", "load"): ("repsim.activations.models", "as_loaded"),
    ("repsim.activations.extract", "ModelHandle"): ("repsim.activations.models", "ModelHandle"),
    ("repsim.activations.extract", "weights_fingerprint"): ("repsim.activations.models", "model_fingerprint"),
    ("repsim.activations.extract", "first_token_index"): ("repsim.activations.pooling", "first_token_index"),
    ("repsim.activations.extract", "last_token_index"): ("repsim.activations.pooling", "last_token_index"),
    ("repsim.activations.extract", "ROW_POOLS"): ("repsim.activations.pooling", "ROW_POOLS"),
    ("repsim.activations.extract", "check_layer_range"): ("repsim.activations.layers", "check_layer_range"),
    ("repsim.activations.extract", "MAX_LAYER_RANGE"): ("repsim.activations.layers", "MAX_LAYER_RANGE"),
    ("repsim.activations.extract", "run_batches"): ("repsim.activations.extract", "Runner.run_batches"),
    ("repsim.analysis.comparison", "POOLS"): ("repsim.activations.pooling", "POOL_NAMES"),
    ("repsim.analysis.comparison", "run_compare_cli"): ("repsim.cli.compare", "run_compare"),
    ("repsim.analysis.comparison", "run_plot_cli"): ("repsim.cli.compare", "run_plot"),
    ("repsim.activations.store", "cache_command"): ("repsim.cli.cache", "run_cache"),
    ("repsim.activations.store", "extract_command"): ("repsim.cli.extract", "run_extract"),
    ("repsim.theory", "run_counterexamples"): ("repsim.cli.theory", "run_counterexamples"),
}


def moved_name(module: str, name: str):  # noqa: ANN201
    """For a module's ``__getattr__``: the object a moved name now is, with a DeprecationWarning naming its new
    place; AttributeError for any other name."""
    if (module, name) not in MOVED_NAMES:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new_module, new_name = MOVED_NAMES[module, name]
    warnings.warn(f"{module}.{name} moved to {new_module}.{new_name}; import it from there", DeprecationWarning,
                  stacklevel=3)
    obj = importlib.import_module(new_module)
    for part in new_name.split("."):
        obj = getattr(obj, part)
    return obj


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
