"""A student's geometry against its teacher on held-out texts, for the before/after view of distillation.

- :func:`layer_features`: a classifier's logits and every layer's mean-pooled features (hidden_states[0..L]).
- :func:`reported_pairs`: the layer pairs a run reports in full: the trained pairs of the layer map, the teacher
  layer just below each trained one (a layer no loss ever saw, next to one it did) and the embeddings (0, 0).
- :func:`geometry_table`: every measure of ``GEOMETRY_METRICS`` on every teacher × student layer pair; on the
  reported pairs also its chance level from P row permutations of the student (mean, sd), z = (value − mean)/sd
  and the permutation p-value (Phipson & Smyth: (1 + #{null at least as similar}) / (P + 1)).
- :func:`loss_values`: on the reported pairs, every feature loss's own value on all the texts at once and as the
  mean over consecutive batches of ``batch_size`` texts (what a training step sees), the projection loss at its
  optimal map (least squares on these texts) and, for a projection student, with its trained maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from repsim.activations.layers import num_layers
from repsim.analysis.stats import chance_level, permutation_pvalue, permutation_replicates
from repsim.distill.data import Encoded
from repsim.distill.teacher_cache import teacher_outputs
from repsim.measures.allpairs import pairwise
from repsim.measures.families.projection_residual import least_squares
from repsim.measures.losses import ProjectionLoss
from repsim.measures.registry import get_metric

#: the measures every before/after table reports (ids as repsim.measures.registry parses them)
GEOMETRY_METRICS = ("procrustes", "cka", "gram_frobenius")

#: each geometry loss as the measure whose value it is (the CKA loss is 1 − CKA)
LOSS_METRICS = {"cka": "cka", "procrustes": "procrustes", "gram_frobenius": "gram_frobenius"}

COLUMNS = ["teacher_layer", "student_layer", "trained", "measure", "value", "null_mean", "null_sd", "z", "p"]


def layer_features(model: nn.Module, encoded: Encoded, pad_id: int, *, batch_size: int = 128,
                   device: torch.device | None = None, cache: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The model's logits (n, classes) and hidden_states[k] mean-pooled over real tokens, k = 0 (embeddings) … L,
    each (n, width) float32 on the CPU, from one pass over ``encoded``."""
    layers = list(range(num_layers(model, required=True) + 1))
    out = teacher_outputs(model, encoded, layers, "mean", pad_id, batch_size=batch_size, device=device, cache=cache)
    return out["logits"], [out[f"feat{k}"] for k in layers]


def reported_pairs(trained: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The trained pairs, (t − 1, s) for each trained (t, s) whose t − 1 is not a trained teacher layer, and (0, 0)."""
    mapped = {t for t, _ in trained}
    extra = [(t - 1, s) for t, s in trained if t - 1 >= 0 and t - 1 not in mapped]
    return list(dict.fromkeys([*trained, *extra, (0, 0)]))


def geometry_table(teacher_layers: Sequence[Any], student_layers: Sequence[Any],
                   trained: Sequence[tuple[int, int]], *, metrics: Sequence[str] = GEOMETRY_METRICS,
                   permutations: int = 20, seed: int = 0) -> pd.DataFrame:
    """One row per (teacher layer, student layer, measure) with the columns of :data:`COLUMNS`; the null columns
    are NaN outside :func:`reported_pairs` (or everywhere when ``permutations`` is 0)."""
    values = pairwise(teacher_layers, student_layers, list(metrics))
    trained_set = set(map(tuple, trained))
    nulls: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    if permutations:
        for t, s in reported_pairs(trained):
            nulls[(t, s)] = permutation_replicates([teacher_layers[t]], [student_layers[s]], list(metrics),
                                                   permutations, seed=seed)
    rows = []
    for metric in metrics:
        spec = get_metric(metric)
        table = values[spec.id]
        for t in range(table.shape[0]):
            for s in range(table.shape[1]):
                value = float(table[t, s])
                row = {"teacher_layer": t, "student_layer": s, "trained": (t, s) in trained_set, "measure": spec.id,
                       "value": value, "null_mean": np.nan, "null_sd": np.nan, "z": np.nan, "p": np.nan}
                if (t, s) in nulls:
                    null = nulls[(t, s)][spec.id]
                    mean, sd = chance_level({spec.id: null}, permutations)
                    row["null_mean"], row["null_sd"] = float(mean[spec.id][0, 0]), float(sd[spec.id][0, 0])
                    row["z"] = (value - row["null_mean"]) / row["null_sd"] if row["null_sd"] > 0 else np.nan
                    row["p"] = float(permutation_pvalue(np.array([[value]]), null, spec.direction)[0, 0])
                rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def loss_values(teacher_layers: Sequence[Any], student_layers: Sequence[Any], trained: Sequence[tuple[int, int]], *,
                batch_size: int = 32, trained_maps: dict[tuple[int, int], ProjectionLoss] | None = None
                ) -> pd.DataFrame:
    """Rows (teacher_layer, student_layer, trained, measure, value) for the reported pairs; measure is
    ``loss:NAME@all`` (every text at once), ``loss:NAME@batchB`` (mean over consecutive batches of B texts; the
    last, shorter batch is dropped), ``loss:projection_optimal@all`` (mean((YŴ + b̂ − X)²) with Ŵ, b̂ least squares
    on these texts) and ``loss:projection_trained@all`` (a projection student's own maps)."""
    trained_set = set(map(tuple, trained))
    rows = []

    def add(t: int, s: int, measure: str, value: float) -> None:
        rows.append({"teacher_layer": t, "student_layer": s, "trained": (t, s) in trained_set, "measure": measure,
                     "value": float(value)})

    for t, s in reported_pairs(trained):
        X = torch.as_tensor(np.asarray(teacher_layers[t]), dtype=torch.float64)
        Y = torch.as_tensor(np.asarray(student_layers[s]), dtype=torch.float64)
        n = X.shape[0]
        starts = range(0, n - batch_size + 1, batch_size)
        for scope, rows_x, rows_y in (("all", [X], [Y]), (f"batch{batch_size}", [X[a:a + batch_size] for a in starts],
                                                             [Y[a:a + batch_size] for a in starts])):
            if not rows_x:
                continue
            per_batch = [pairwise([x], [y], list(LOSS_METRICS.values())) for x, y in zip(rows_x, rows_y, strict=True)]
            for name, metric in LOSS_METRICS.items():
                spec = get_metric(metric)
                value = np.mean([float(v[spec.id][0, 0]) for v in per_batch])
                add(t, s, f"loss:{name}@{scope}", 1.0 - value if name == "cka" else value)
        Xc, Yc = X - X.mean(0), Y - Y.mean(0)
        add(t, s, "loss:projection_optimal@all", (Xc - Yc @ least_squares(Yc, Xc, 0.0)).square().mean())
        if trained_maps and (t, s) in trained_maps:
            module = trained_maps[(t, s)]
            with torch.no_grad():
                add(t, s, "loss:projection_trained@all", module(X.to(module.proj.weight.dtype),
                                                                Y.to(module.proj.weight.dtype)))
    return pd.DataFrame(rows, columns=["teacher_layer", "student_layer", "trained", "measure", "value"])
