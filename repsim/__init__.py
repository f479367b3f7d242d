"""repsim: representational similarity for language models.

Exact Procrustes, Gram-Frobenius, CKA and projection-residual metrics (in memory, all layer pairs at once,
or streamed from sufficient statistics), differentiable distillation losses, cached hidden-state extraction
for Hugging Face models, layer-by-layer comparison with statistics, and the constructions of
"Knowledge distillation through geometry-aware representational alignment" (arXiv 2509.25253).
"""

from __future__ import annotations

import importlib
from typing import Any

from repsim.moved import MOVED, install

install()

__version__ = "0.1.0"

# public name -> module that defines it (imported on first use, so `import repsim` stays light)
_LAZY = {
    "procrustes": "repsim.measures.functions",
    "gram_frobenius": "repsim.measures.functions",
    "cka": "repsim.measures.functions",
    "projection_residual": "repsim.measures.functions",
    "METRICS": "repsim.measures.functions",
    "DEFAULT_METRICS": "repsim.measures.functions",
    "MetricSpec": "repsim.measures.functions",
    "get_metric": "repsim.measures.functions",
    "metric_names": "repsim.measures.registry",
    "pairwise": "repsim.measures.allpairs",
    "CrossMoments": "repsim.measures.moments",
    "LayerMoments": "repsim.measures.moments",
    "compare": "repsim.analysis.comparison",
    "Comparison": "repsim.analysis.comparison",
    "compare_saved": "repsim.analysis.comparison",
    "UserError": "repsim.system.errors",
}
_PACKAGES = {"measures", "activations", "analysis", "theory", "distill", "system", "cli"}
# subpackages, and old module names that resolve to their new place (repsim/moved.py)
_SUBMODULES = _PACKAGES | {old.removeprefix("repsim.") for old in MOVED}
__all__ = sorted(_LAZY) + sorted(_PACKAGES) + ["losses", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"repsim.{name}")
    raise AttributeError(f"module 'repsim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
