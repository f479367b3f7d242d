"""In-memory representational similarity metrics and the metric registry (the public names).

Inputs are a teacher ``X`` (n × p) and a student ``Y`` (n × q) whose rows are paired (row i of both comes from
the same input); numpy arrays or torch tensors (CPU or CUDA), computed in float64 unless ``dtype`` says
otherwise. Unless ``center=False`` each side is centred (column means subtracted) and scaled to unit Frobenius
norm: X̃ = (X − 1μᵀ)/‖X − 1μᵀ‖_F, likewise Ỹ. Results are Python floats for numpy input and 0-dim tensors (on
the teacher's device) for torch input.

Each family lives in one module of :mod:`repsim.measures.families` (its id grammar, spec, in-memory function and
the value from second moments that every engine uses), registered in :mod:`repsim.measures.registry`;
:data:`METRICS` maps the canonical ids of :func:`~repsim.measures.registry.metric_names` to their
:class:`MetricSpec` records, and :func:`get_metric` parses user ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from repsim.measures.families.cka import cka
from repsim.measures.families.gram_frobenius import gram_frobenius
from repsim.measures.families.procrustes import procrustes
from repsim.measures.families.projection_residual import fold_assignment, projection_residual
from repsim.measures.registry import DEFAULT_METRICS, TRANSFORMS, MetricSpec, families, get_metric, metric_names

__all__ = [
    "procrustes",
    "gram_frobenius",
    "cka",
    "projection_residual",
    "fold_assignment",
    "MetricSpec",
    "METRICS",
    "DEFAULT_METRICS",
    "INVARIANCES",
    "TRANSFORMS",
    "get_metric",
]

#: every registered canonical metric id → its spec
METRICS: dict[str, MetricSpec] = {name: get_metric(name) for name in metric_names()}

#: the declarative invariance table: family → transformations that leave the value unchanged when applied to
#: either side (one side at a time). Every other transformation of TRANSFORMS changes the value in general.
INVARIANCES: Mapping[str, frozenset[str]] = MappingProxyType({
    name: get_metric(fam.examples[0]).invariances for name, fam in families().items()
})
