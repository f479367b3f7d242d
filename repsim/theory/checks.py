"""The geometry check of real students: what the metrics say about a teacher/student layer pair and what that means
for angles and ε-orthogonal pairs, per mapped layer pair of two models, and before / after distillation."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from repsim.activations.data import load_texts
from repsim.activations.extract import extract
from repsim.activations.layers import layer_map_pairs, parse_layer_map
from repsim.analysis.comparison import check_out_dir
from repsim.analysis.report import check_html
from repsim.analysis.stats import permutation_indices, permutation_pvalue, permutation_replicates
from repsim.distill.config import DistillConfig
from repsim.distill.data import label_count, load_train_validation, texts_labels
from repsim.distill.grid import distill, finetune
from repsim.distill.students import has_trained_head, load
from repsim.measures import functions as measures
from repsim.measures.arrays import ArrayLike, as_pair, prepare
from repsim.system.errors import UserError
from repsim.system.files import write_text_atomic
from repsim.theory.constructions import cosine_matrix, three_metrics


@dataclass
class GeometryCheck:
    """What the metrics say about one teacher/student layer pair, what that means for angles, and how far each
    diagnostic is from chance.

    * ``metrics``: Procrustes distance, Gram-Frobenius, biased linear CKA, and the k-fold projection residual.
    * ε-orthogonality (cosines of centred rows unless ``center=False``; pairs i < j): ``jaccard`` = |A ∩ B| / |A ∪ B|
      for A, B the teacher's and the student's pairs with |cos| ≤ eps (symmetric: a student pair that becomes
      ε-orthogonal counts against it as much as a teacher pair that stops being one; NaN when both sets are empty),
      and the one-sided ``preserved_fraction`` = |A ∩ B| / |A|.
    * ``cosine_correlation``: Pearson correlation of the teacher's and the student's pairwise cosines.
    * angle distortion: |∠(xᵢ,xⱼ) − ∠(yᵢ,yⱼ)| in degrees over all pairs: median (q50), q90, q99, max, mean.
    * ``max_inner_product_error``: max |⟨x̃ᵢ,x̃ⱼ⟩ − ⟨ỹᵢ,ỹⱼ⟩| (≤ gram_frobenius).
    * the null, from ``permutations`` seeded shuffles of the student's rows (each text paired with another text's
      student features; the same shuffles for every diagnostic): per diagnostic ``chance`` (the mean),
      ``chance_sd`` (standard deviation), ``p_value`` = (1 + #{shuffles at least as similar}) / (permutations + 1),
      and ``z`` = (value − chance) / chance_sd signed so that z > 0 means more similar than chance.
    * ``verdict``: "CKA says similar, geometry differs" when CKA is at least cka_threshold of the way from its
      chance level to 1, and (Procrustes is more than procrustes_threshold of the way from 0 to its chance level,
      or the ε-orthogonal overlap is less than preservation_threshold of the way from its chance level to 1).
    """

    teacher_layer: int | None
    student_layer: int | None
    n: int
    metrics: dict[str, float]
    eps: float
    teacher_orthogonal_pairs: int
    preserved_pairs: int
    preserved_fraction: float
    angle_distortion_deg: dict[str, float]
    max_inner_product_error: float
    flagged: bool
    verdict: str
    thresholds: dict[str, float] = field(default_factory=dict)
    chance: dict[str, float] = field(default_factory=dict)
    student_orthogonal_pairs: int = 0
    jaccard: float = math.nan
    cosine_correlation: float = math.nan
    permutations: int = 0
    chance_sd: dict[str, float] = field(default_factory=dict)
    p_value: dict[str, float] = field(default_factory=dict)
    z: dict[str, float] = field(default_factory=dict)

    def diagnostics(self) -> dict[str, float]:
        """Every diagnostic that gets a null, by name (the metrics' ids and :data:`PAIR_DIAGNOSTICS`)."""
        pairs = pair_statistics_row(self.jaccard, self.preserved_fraction, self.cosine_correlation,
                                    self.angle_distortion_deg, self.max_inner_product_error)
        return {**self.metrics, **{k: pairs[k] for k in PAIR_DIAGNOSTICS}}

    def against_chance(self) -> pd.DataFrame:
        """One row per diagnostic: value, direction, chance, chance_sd, z, p_value."""
        rows = [{"diagnostic": k, "value": v, "similar": _direction(k), "chance": self.chance.get(k, math.nan),
                 "chance_sd": self.chance_sd.get(k, math.nan), "z": self.z.get(k, math.nan),
                 "p_value": self.p_value.get(k, math.nan)} for k, v in self.diagnostics().items()]
        return pd.DataFrame(rows)

    def to_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"teacher_layer": self.teacher_layer, "student_layer": self.student_layer, "n": self.n}
        row.update(self.metrics)
        row.update({"eps": self.eps, "teacher_eps_orthogonal_pairs": self.teacher_orthogonal_pairs,
                    "student_eps_orthogonal_pairs": self.student_orthogonal_pairs,
                    "preserved_pairs": self.preserved_pairs, "preserved_fraction": self.preserved_fraction,
                    "eps_orthogonal_jaccard": self.jaccard, "cosine_correlation": self.cosine_correlation})
        row.update({f"angle_distortion_deg_{k}": v for k, v in self.angle_distortion_deg.items()})
        row.update({"max_inner_product_error": self.max_inner_product_error, "permutations": self.permutations})
        for prefix, values in (("chance_", self.chance), ("chance_sd_", self.chance_sd), ("z_", self.z),
                               ("p_value_", self.p_value)):
            row.update({f"{prefix}{k}": v for k, v in values.items()})
        row.update({"flagged": self.flagged, "verdict": self.verdict})
        return row


# pair diagnostics that get a permutation null, and which way is "more similar"
PAIR_DIAGNOSTICS = {"eps_orthogonal_jaccard": "higher", "preserved_fraction": "higher", "cosine_correlation": "higher",
                    "angle_distortion_deg_q50": "lower", "angle_distortion_deg_q90": "lower",
                    "angle_distortion_deg_q99": "lower", "max_inner_product_error": "lower"}


def _direction(diagnostic: str) -> str:
    if diagnostic in PAIR_DIAGNOSTICS:
        return PAIR_DIAGNOSTICS[diagnostic]
    return measures.get_metric(diagnostic).direction


def pair_statistics_row(jaccard: float, preserved: float, correlation: float, angles: dict[str, float],
                        max_error: float) -> dict[str, float]:
    """The pair diagnostics under the names of :data:`PAIR_DIAGNOSTICS` (and the remaining angle statistics)."""
    return {"eps_orthogonal_jaccard": jaccard, "preserved_fraction": preserved, "cosine_correlation": correlation,
            **{f"angle_distortion_deg_{k}": v for k, v in angles.items()}, "max_inner_product_error": max_error}


class PairGeometry:
    """Pairwise cosines, angles and inner products of a teacher and a student (rows paired), and the pair
    statistics of :class:`GeometryCheck` for the student's rows in any order.

    The teacher's side is fixed; a permutation π of the student's rows only re-indexes the student's n × n
    matrices (cos(y_π(i), y_π(j)) is entry (π(i), π(j))), so a shuffle costs O(n²) gathers and no new cosines.
    Memory: a few n × n float64 matrices.
    """

    def __init__(self, T: torch.Tensor, S: torch.Tensor, *, eps: float, center: bool = True):
        n = T.shape[0]
        self.eps = eps
        self.i, self.j = np.triu_indices(n, 1)
        self.di, self.dj = np.triu_indices(n, 0)  # with the diagonal, for the inner-product error
        cos_t = cosine_matrix(T, center=center)
        self.cos_s = cosine_matrix(S, center=center)
        self.ct = cos_t[self.i, self.j]
        with np.errstate(invalid="ignore"):
            self.at = np.degrees(np.arccos(self.ct))
            self.angle_s = np.degrees(np.arccos(self.cos_s))
        self.t_orth = np.abs(self.ct) <= eps
        a, b = prepare(T, center, "X (teacher)"), prepare(S, center, "Y (student)")
        self.gram_t = (a @ a.T).cpu().numpy()[self.di, self.dj]
        self.gram_s = (b @ b.T).cpu().numpy()

    def statistics(self, perm: np.ndarray | None = None) -> dict[str, Any]:
        """The pair statistics with the student's rows in order ``perm`` (None: as given)."""
        r, c = (self.i, self.j) if perm is None else (perm[self.i], perm[self.j])
        cs = self.cos_s[r, c]
        s_orth = np.abs(cs) <= self.eps
        n_t, n_s, both = int(self.t_orth.sum()), int(s_orth.sum()), int((self.t_orth & s_orth).sum())
        union = n_t + n_s - both
        finite = np.isfinite(self.ct) & np.isfinite(cs)
        ct, cf = self.ct[finite], cs[finite]
        spread = ct.std() * cf.std() if ct.size > 1 else 0.0
        correlation = float(np.mean((ct - ct.mean()) * (cf - cf.mean())) / spread) if spread > 0 else math.nan
        dist = np.abs(self.at - self.angle_s[r, c])
        dist = dist[np.isfinite(dist)]
        if dist.size:
            q50, q90, q99 = np.quantile(dist, (0.5, 0.9, 0.99))
            angles = {"q50": float(q50), "q90": float(q90), "q99": float(q99), "max": float(dist.max()),
                      "mean": float(dist.mean())}
        else:
            angles = dict.fromkeys(("q50", "q90", "q99", "max", "mean"), math.nan)
        rd, cd = (self.di, self.dj) if perm is None else (perm[self.di], perm[self.dj])
        max_error = float(np.abs(self.gram_t - self.gram_s[rd, cd]).max())
        return {"teacher_orthogonal_pairs": n_t, "student_orthogonal_pairs": n_s, "preserved_pairs": both,
                "row": pair_statistics_row(both / union if union else math.nan, both / n_t if n_t else math.nan,
                                           correlation, angles, max_error)}


def eps_orthogonal_preservation(cos_t: np.ndarray, cos_s: np.ndarray, eps: float) -> tuple[int, int]:
    """(number of teacher pairs i < j with |cos| ≤ eps, how many of them also have |cos| ≤ eps in the student)."""
    iu = np.triu_indices(cos_t.shape[0], 1)
    ct, cs = cos_t[iu], cos_s[iu]
    teacher_orth = np.abs(ct) <= eps
    preserved = teacher_orth & (np.abs(cs) <= eps)
    return int(teacher_orth.sum()), int(preserved.sum())


def null_summary(observed: float, null: np.ndarray, direction: str) -> dict[str, float]:
    """Chance level (mean of the finite null values), its standard deviation (ddof = 1), the permutation p-value
    (:func:`repsim.analysis.stats.permutation_pvalue`) and z = (observed − chance) / sd, signed so that z > 0 is
    more similar than chance (±inf when the null has no spread and the value differs from it). NaN where the
    observed value is NaN or no shuffle gives a finite value."""
    null = np.asarray(null, dtype=np.float64)
    null = null[np.isfinite(null)]
    if not math.isfinite(observed) or null.size == 0:
        return {"chance": math.nan, "chance_sd": math.nan, "p_value": math.nan, "z": math.nan}
    mean = float(null.mean())
    sd = float(null.std(ddof=1)) if null.size > 1 else math.nan
    gain = (observed - mean) if direction == "higher" else (mean - observed)
    if sd > 0:
        z = gain / sd
    elif sd == 0:
        z = 0.0 if abs(gain) <= 1e-12 * max(1.0, abs(mean)) else math.copysign(math.inf, gain)
    else:
        z = math.nan
    p = float(permutation_pvalue(np.asarray(observed), null, direction))
    return {"chance": mean, "chance_sd": sd, "p_value": p, "z": float(z)}


def check(teacher_feats: ArrayLike, student_feats: ArrayLike, *, eps: float = 0.1, center: bool = True,
          cka_threshold: float = 0.9, procrustes_threshold: float = 0.5, preservation_threshold: float = 0.5,
          projection_folds: int | None = 5, teacher_layer: int | None = None,
          student_layer: int | None = None, permutations: int = 200, seed: int = 0,
          chance_permutations: int | None = None) -> GeometryCheck:
    """Geometry check of one layer pair: (n, p) teacher features against (n, q) student features, rows paired.

    Every diagnostic (see :class:`GeometryCheck`) is reported against its null: ``permutations`` seeded
    shuffles of the student's rows (:func:`repsim.analysis.stats.permutation_indices` with seed + 1, the shuffles
    ``compare`` uses; the metrics' null through :func:`repsim.analysis.stats.permutation_replicates`). The
    verdict's thresholds are relative to the chance levels, so that they mean the same at every n (plug-in
    Procrustes and CKA drift with n against the widths): Procrustes "differs" when d / d_chance >
    ``procrustes_threshold`` (the fraction of the way from identical, 0, to unpaired texts), CKA "says similar"
    when (c − c_chance)/(1 − c_chance) ≥ ``cka_threshold``, the ε-orthogonal pairs "differ" when
    (J − J_chance)/(1 − J_chance) < ``preservation_threshold`` for their Jaccard overlap J. With 0 permutations
    there is no null: the ends of the ranges (√2, 0 and 0) stand in for the chance levels and p-values and
    z-scores are not computed. ``chance_permutations`` is the former name of ``permutations``.
    Memory is O(n²) (pairwise cosines); subsample rows for n beyond a few thousand.
    """
    if chance_permutations is not None:
        warnings.warn("chance_permutations is now permutations (the null of every diagnostic)", DeprecationWarning,
                      stacklevel=2)
        permutations = chance_permutations
    if not 0 <= eps < 1:
        raise UserError(f"`eps` must be in [0, 1), got {eps}")
    check_permutations(permutations)
    T, S = as_pair(teacher_feats, student_feats, min_rows=check_min_rows(projection_folds))
    values = three_metrics(T.numpy(), S.numpy())
    if projection_folds:
        values[f"projection_residual[folds={projection_folds}]"] = float(
            measures.projection_residual(T.numpy(), S.numpy(), folds=projection_folds))
    else:
        values["projection_residual[in_sample]"] = float(measures.projection_residual(T.numpy(), S.numpy()))
    geometry = PairGeometry(T, S, eps=eps, center=center)
    observed = geometry.statistics()
    row = observed["row"]
    n_orth, n_kept = observed["teacher_orthogonal_pairs"], observed["preserved_pairs"]
    frac, jac = row["preserved_fraction"], row["eps_orthogonal_jaccard"]
    angles = {k: row[f"angle_distortion_deg_{k}"] for k in ("q50", "q90", "q99", "max", "mean")}
    summary = _null(T, S, values, row, geometry, permutations, seed)
    chance = {k: v["chance"] for k, v in summary.items()}
    if not permutations:
        chance = {"procrustes[distance]": math.sqrt(2), "cka[linear,biased]": 0.0}
    c, p = values["cka[linear,biased]"], values["procrustes[distance]"]
    c0, p0, j0 = chance["cka[linear,biased]"], chance["procrustes[distance]"], chance.get("eps_orthogonal_jaccard", 0.0)
    p_rel = p / p0 if p0 > 0 else math.inf
    c_rel = (c - c0) / (1 - c0) if c0 < 1 else 0.0
    j_rel = (jac - j0) / (1 - j0) if math.isfinite(jac) and math.isfinite(j0) and j0 < 1 else math.nan
    poor_proc, poor_orth = p_rel > procrustes_threshold, (math.isfinite(j_rel) and j_rel < preservation_threshold)
    cka_similar = c_rel >= cka_threshold
    flagged = cka_similar and (poor_proc or poor_orth)
    pv = {k: v["p_value"] for k, v in summary.items()}
    cka_txt = f"CKA {c:.3f}, {c_rel:.0%} of the way from chance {c0:.3f} to 1"
    proc_txt = f"Procrustes {p:.3f}, {p_rel:.0%} of the way from 0 to chance {p0:.3f}"
    if permutations:
        proc_txt += f" (p = {pv['procrustes[distance]']:.3g})"
    if flagged:
        why = []
        if poor_proc:
            why.append(f"{proc_txt} > {procrustes_threshold:.0%}")
        if poor_orth:
            why.append(f"ε-orthogonal pairs overlap (Jaccard) {jac:.2f}, {j_rel:.0%} of the way from chance "
                       f"{j0:.2f} to 1 < {preservation_threshold:.0%}")
        verdict = f"CKA says similar ({cka_txt}), geometry differs: " + "; ".join(why)
    elif cka_similar:
        verdict = f"similar by CKA ({cka_txt}) and by geometry ({proc_txt})"
    else:
        verdict = f"CKA says dissimilar ({cka_txt} < {cka_threshold:.0%}); {proc_txt}"
    if n_orth == 0:
        verdict += f"; no teacher pair is ε-orthogonal (eps={eps:g})"
    return GeometryCheck(teacher_layer=teacher_layer, student_layer=student_layer, n=int(T.shape[0]), metrics=values,
                         eps=eps, teacher_orthogonal_pairs=n_orth, preserved_pairs=n_kept, preserved_fraction=frac,
                         angle_distortion_deg=angles, max_inner_product_error=row["max_inner_product_error"],
                         flagged=bool(flagged), verdict=verdict,
                         thresholds={"cka": cka_threshold, "procrustes": procrustes_threshold,
                                     "preservation": preservation_threshold}, chance=chance,
                         student_orthogonal_pairs=observed["student_orthogonal_pairs"], jaccard=jac,
                         cosine_correlation=row["cosine_correlation"], permutations=int(permutations),
                         chance_sd={k: v["chance_sd"] for k, v in summary.items()}, p_value=pv,
                         z={k: v["z"] for k, v in summary.items()})


def check_permutations(permutations: Any) -> int:
    """``permutations`` as a count ≥ 0 (UserError otherwise)."""
    if isinstance(permutations, bool) or not isinstance(permutations, (int, np.integer)) or permutations < 0:
        raise UserError(f"`permutations` must be an integer ≥ 0, got {permutations!r}")
    return int(permutations)


def _null(T: torch.Tensor, S: torch.Tensor, values: dict[str, float], row: dict[str, float], geometry: PairGeometry,
          permutations: int, seed: int) -> dict[str, dict[str, float]]:
    """{diagnostic: chance, chance_sd, p_value, z} from ``permutations`` shuffles of the student's rows (seed + 1);
    empty for 0."""
    if not permutations:
        return {}
    metric_null = permutation_replicates([T], [S], list(values), permutations, seed=seed + 1)
    perms = permutation_indices(T.shape[0], permutations, seed + 1)
    pair_null = [geometry.statistics(perm)["row"] for perm in perms]
    out = {k: null_summary(v, metric_null[k][:, 0, 0], _direction(k)) for k, v in values.items()}
    for k, direction in PAIR_DIAGNOSTICS.items():
        out[k] = null_summary(row[k], np.array([r[k] for r in pair_null]), direction)
    return out


def check_min_rows(projection_folds: int | None) -> int:
    """The fewest rows :func:`check` accepts: 4, and one more than the residual's folds."""
    return max(4, (projection_folds or 0) + 1)


def check_layers(teacher_layers: Any, student_layers: Any, layer_map: str | Sequence[tuple[int, int]],
                 **options: Any) -> list[GeometryCheck]:
    """Run :func:`check` at each mapped pair. ``teacher_layers``/``student_layers``: a mapping layer → (n, width)
    array, or an object with ``.layers`` and ``[layer]`` (repsim.activations.extract's Activations)."""
    t_ids = list(teacher_layers.layers) if hasattr(teacher_layers, "layers") else list(teacher_layers.keys())
    s_ids = list(student_layers.layers) if hasattr(student_layers, "layers") else list(student_layers.keys())
    pairs = parse_layer_map(layer_map, t_ids, s_ids) if isinstance(layer_map, str) else list(layer_map)
    return [check(np.array(teacher_layers[t], dtype=np.float64), np.array(student_layers[s], dtype=np.float64),
                  teacher_layer=t, student_layer=s, **options) for t, s in pairs]


def checks_table(checks: Iterable[GeometryCheck]) -> pd.DataFrame:
    return pd.DataFrame([c.to_row() for c in checks])


@dataclass
class CheckResult:
    """Result of :func:`check_models`: one :class:`GeometryCheck` per mapped pair plus provenance."""

    checks: list[GeometryCheck]
    meta: dict[str, Any]

    @property
    def table(self) -> pd.DataFrame:
        return checks_table(self.checks)

    def summary(self) -> str:
        cols = ["teacher_layer", "student_layer", "procrustes[distance]", "chance_procrustes[distance]",
                "gram_frobenius", "cka[linear,biased]", "chance_cka[linear,biased]"]
        t = self.table
        cols = [c for c in cols if c in t.columns]
        cols += [c for c in t.columns if c.startswith("projection_residual")]
        cols += ["eps_orthogonal_jaccard", "cosine_correlation", "angle_distortion_deg_q50",
                 "angle_distortion_deg_q90", "angle_distortion_deg_q99", "max_inner_product_error"]
        lines = [t[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"), ""]
        shuffles = {c.permutations for c in self.checks}
        if shuffles != {0}:
            lines.append(f"against chance ({', '.join(map(str, sorted(shuffles)))} seeded shuffles of the student's "
                         "rows; z > 0: more similar than chance; p = (1 + #shuffles at least as similar) / "
                         "(shuffles + 1)):")
            for c in self.checks:
                table = c.against_chance().drop(columns="similar")
                lines += [f"layer {c.teacher_layer} ↔ {c.student_layer}",
                          table.to_string(index=False, float_format=lambda v: f"{v:.4g}"), ""]
        lines += [f"layer {c.teacher_layer} ↔ {c.student_layer}: {c.verdict}" for c in self.checks]
        return "\n".join(lines)

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "check.csv", self.table.to_csv(index=False))
        write_text_atomic(out / "check.json", json.dumps(
            {"meta": self.meta, "checks": [asdict(c) for c in self.checks]}, indent=2, default=str))
        write_text_atomic(out / "report.html", self.html())
        return out

    def html(self) -> str:
        """The check as one self-contained page (:mod:`repsim.analysis.report`)."""

        return check_html(self.table, self.meta, verdicts=[f"layer {c.teacher_layer} ↔ {c.student_layer}: "
                                                           f"{c.verdict}." for c in self.checks])


def check_models(teacher: str, student: str, data: Any = "sst2", layer_map: str = "uniform", *,
                 max_samples: int | None = None, pool: str = "mean", batch_size: int = 32, max_length: int = 128,
                 device: str = "auto", seed: int = 0, cache: bool = True, progress: bool = True,
                 out: str | Path | None = None, **check_options: Any) -> CheckResult:
    """Extract both models' hidden states on ``data`` (repsim.activations.data / repsim.activations.extract) and
    check each mapped pair.

    ``student`` may be a saved folder (e.g. a distilled student), so the same call gives "before" and "after".
    ``max_samples`` (default: all texts, as ``compare``) and ``seed`` pick the same texts ``compare`` picks.
    """
    if pool == "tokens":
        raise UserError("check compares paired rows per text: use `pool=mean|cls|last`, not tokens")

    eps = check_options.get("eps", 0.1)
    if not (isinstance(eps, (int, float)) and 0 <= eps < 1):
        raise UserError(f"`eps` must be in [0, 1), got {eps}")
    check_permutations(check_options.get("permutations", 0))
    for name in ("cka_threshold", "procrustes_threshold", "preservation_threshold"):
        value = check_options.get(name, 0.0)
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise UserError(f"`{name}` must be a finite number, got {value!r}")
    if isinstance(layer_map, str):
        layer_map_pairs(layer_map)
    if out is not None:
        check_out_dir(out)
    texts = load_texts(data, max_samples=max_samples, seed=seed, labels=False) if isinstance(data, str) else data
    folds = check_options.get("projection_folds", 5)
    need = check_min_rows(folds)
    if len(texts) < need:
        why = f"the {folds}-fold projection residual and the angle statistics" if folds else "the angle statistics"
        raise UserError(f"the geometry check needs at least {need} texts ({why}), {getattr(texts, 'name', 'the data')} "
                        f"gives {len(texts)}: raise `max_samples` or give more texts")
    kw = dict(pool=pool, batch_size=batch_size, max_length=max_length, device=device, cache=cache, progress=progress)
    t_acts = extract(teacher, texts, **kw)
    s_acts = extract(student, texts, **kw)
    checks = check_layers(t_acts, s_acts, layer_map, **{"seed": seed, **check_options})
    meta = {"teacher": t_acts.meta, "student": s_acts.meta, "layer_map": layer_map, "pool": pool,
            "n": int(t_acts.n), "data": getattr(texts, "name", "texts"), "data_source": getattr(texts, "source", ""),
            "check_options": check_options}
    result = CheckResult(checks=checks, meta=meta)
    if out is not None:
        result.save(out)
    return result


def compare_students(teacher: str, students: dict[str, str], data: Any = "sst2", layer_map: str = "uniform",
                     **options: Any) -> pd.DataFrame:
    """Geometry check of one teacher against several students (e.g. before distillation and after training with
    each loss); long table with a ``student`` label column."""
    frames = []
    for label, spec in students.items():
        t = check_models(teacher, spec, data, layer_map, **options).table
        t.insert(0, "student", label)
        frames.append(t)
    return pd.concat(frames, ignore_index=True)


def geometry_before_after(teacher: str, student: str, data: str = "sst2", *,
                          losses: Sequence[str] = ("projection", "cka", "procrustes", "gram_frobenius"),
                          out: str | Path, max_train: int | None = 512, max_val: int | None = 256,
                          check_samples: int = 300, epochs: int = 1, seed: int = 0, device: str = "auto",
                          finetune_teacher: bool = True, distill_options: dict[str, Any] | None = None,
                          **check_options: Any) -> pd.DataFrame:
    """Geometry check of the student before distillation and after distillation with each loss.

    Uses the trainer :func:`repsim.distill.distill` (classification on ``data``; the teacher is fine-tuned first
    when it has no trained head, and that fine-tuned teacher is the reference for every check). Each trained
    student is saved under ``out/<loss>/student``; the checks run on ``check_samples`` validation texts at the
    layer pairs the trainer aligned. Writes ``out/geometry_before_after.csv`` and returns the long table with a
    ``student`` column ("before", then each loss) and the student's validation accuracy.
    """

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, validation = load_train_validation(data, max_train=max_train, max_val=max_val)
    texts, labels = texts_labels(train)
    base = dict(epochs=epochs, seed=seed, device=device, progress=False) | (distill_options or {})
    config = DistillConfig(**base)
    t_model, t_tok = load(teacher, config.task, label_count(labels))
    teacher_dir = out / "teacher" / "model"
    if not has_trained_head(t_model, config.task):
        if not finetune_teacher:
            raise UserError("the teacher has no trained head; fine-tune it first or pass finetune_teacher=True")
        if not teacher_dir.exists():
            finetune((t_model, t_tok), train, validation, config=config, out=out / "teacher")
        t_model, t_tok = load(str(teacher_dir), config.task, label_count(labels))
        teacher_ref = str(teacher_dir)
    else:
        teacher_ref = teacher
    check_texts = list(validation.texts)[:check_samples] if validation is not None else texts[:check_samples]
    students: dict[str, str] = {"before": student}
    accuracy: dict[str, float] = {}
    layer_map: list[tuple[int, int]] | None = None
    for loss in losses:
        run_dir = out / loss
        if not (run_dir / "student").exists():
            cfg = dataclasses.replace(config, loss=loss)
            res = distill((t_model, t_tok), student, train, validation, config=cfg, out=run_dir)
            layer_map = layer_map or list(res.layer_map)
        if (run_dir / "metrics.json").exists():
            accuracy[loss] = float(json.loads((run_dir / "metrics.json").read_text()).get("accuracy", float("nan")))
        students[loss] = str(run_dir / "student")
    pairs: Any = layer_map if layer_map else "uniform"
    frames = []
    for label, spec in students.items():
        res = check_models(teacher_ref, spec, check_texts, pairs, max_samples=None, device=device, progress=False,
                           **check_options)
        t = res.table
        t.insert(0, "accuracy", accuracy.get(label, float("nan")))
        t.insert(0, "student", label)
        frames.append(t)
    table = pd.concat(frames, ignore_index=True)
    write_text_atomic(out / "geometry_before_after.csv", table.to_csv(index=False))

    write_text_atomic(out / "report.html", check_html(
        table, {"teacher": teacher_ref, "student": student, "data": data, "layer_map": str(pairs),
                "n": len(check_texts), "seed": seed, "check_options": check_options},
        title="repsim geometry before and after distillation", label_column="student"))
    return table
