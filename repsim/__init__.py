"""repsim: representational similarity for language models.

Exact Procrustes, Gram-Frobenius, CKA and projection-residual metrics (in memory, all layer pairs at once,
or streamed from sufficient statistics), differentiable distillation losses, cached hidden-state extraction
for Hugging Face models, layer-by-layer comparison with statistics, and the constructions of
"Knowledge distillation through geometry-aware representational alignment" (arXiv 2509.25253).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (imported on first use, so `import repsim` stays light)
_LAZY = {
    "procrustes": "repsim.metrics",
    "gram_frobenius": "repsim.metrics",
    "cka": "repsim.metrics",
    "projection_residual": "repsim.metrics",
    "METRICS": "repsim.metrics",
    "DEFAULT_METRICS": "repsim.metrics",
    "MetricSpec": "repsim.metrics",
    "get_metric": "repsim.metrics",
    "pairwise": "repsim.layer_pairs",
    "CrossMoments": "repsim.moments",
    "LayerMoments": "repsim.moments",
    "compare": "repsim.comparison",
    "Comparison": "repsim.comparison",
    "compare_saved": "repsim.comparison",
    "UserError": "repsim.errors",
}
_SUBMODULES = {"losses", "metrics", "moments", "layer_pairs", "stats", "data", "extract", "store", "assets",
               "comparison", "plot", "theory", "distill", "evaluate", "errors", "arrays",
               "saved", "threads"}

__all__ = sorted(_LAZY) + sorted(_SUBMODULES) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"repsim.{name}")
    raise AttributeError(f"module 'repsim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
