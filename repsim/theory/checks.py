"""The geometry check of real students: what the metrics say about a teacher/student layer pair and what that means
for angles and ε-orthogonal pairs, per mapped layer pair of two models, and before / after distillation."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from repsim.activations.data import load_texts
from repsim.activations.extract import extract
from repsim.activations.layers import layer_map_pairs, parse_layer_map
from repsim.analysis.comparison import check_out_dir
from repsim.analysis.report import check_html
from repsim.analysis.stats import permutation_indices
from repsim.distill.config import DistillConfig
from repsim.distill.data import label_count, load_train_validation, texts_labels
from repsim.distill.grid import distill, finetune
from repsim.distill.students import has_trained_head, load
from repsim.measures import functions as measures
from repsim.measures.arrays import ArrayLike, as_pair
from repsim.system.errors import UserError
from repsim.system.files import write_text_atomic
from repsim.theory.constructions import angle_distortion_deg, cosine_matrix, max_inner_product_error, three_metrics


@dataclass
class GeometryCheck:
    """What the metrics say about one teacher/student layer pair, and what that means for angles.

    * ``metrics``: Procrustes distance, Gram-Frobenius, biased linear CKA, and the k-fold projection residual.
    * ε-orthogonality: among teacher pairs (i < j) with |cos| ≤ eps, the fraction whose student cosine also has
      |cos| ≤ eps (cosines of centred rows unless ``center=False``).
    * angle distortion: |∠(xᵢ,xⱼ) − ∠(yᵢ,yⱼ)| in degrees over all pairs, as quantiles.
    * ``max_inner_product_error``: max |⟨x̃ᵢ,x̃ⱼ⟩ − ⟨ỹᵢ,ỹⱼ⟩| (≤ gram_frobenius).
    * ``chance``: Procrustes distance and CKA with the student's rows shuffled (mean over seeded permutations).
    * ``verdict``: "CKA says similar, geometry differs" when CKA is at least cka_threshold of the way from its
      chance level to 1, and (Procrustes is more than procrustes_threshold of the way from 0 to its chance level,
      or preserved fraction < preservation_threshold).
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

    def to_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"teacher_layer": self.teacher_layer, "student_layer": self.student_layer, "n": self.n}
        row.update(self.metrics)
        row.update({f"chance_{k}": v for k, v in self.chance.items()})
        row.update({"eps": self.eps, "teacher_eps_orthogonal_pairs": self.teacher_orthogonal_pairs,
                    "preserved_pairs": self.preserved_pairs, "preserved_fraction": self.preserved_fraction})
        row.update({f"angle_distortion_deg_{k}": v for k, v in self.angle_distortion_deg.items()})
        row.update({"max_inner_product_error": self.max_inner_product_error, "flagged": self.flagged,
                    "verdict": self.verdict})
        return row


def eps_orthogonal_preservation(cos_t: np.ndarray, cos_s: np.ndarray, eps: float) -> tuple[int, int]:
    """(number of teacher pairs i < j with |cos| ≤ eps, how many of them also have |cos| ≤ eps in the student)."""
    iu = np.triu_indices(cos_t.shape[0], 1)
    ct, cs = cos_t[iu], cos_s[iu]
    teacher_orth = np.abs(ct) <= eps
    preserved = teacher_orth & (np.abs(cs) <= eps)
    return int(teacher_orth.sum()), int(preserved.sum())


def check(teacher_feats: ArrayLike, student_feats: ArrayLike, *, eps: float = 0.1, center: bool = True,
          cka_threshold: float = 0.9, procrustes_threshold: float = 0.5, preservation_threshold: float = 0.5,
          projection_folds: int | None = 5, teacher_layer: int | None = None,
          student_layer: int | None = None, chance_permutations: int = 4, seed: int = 0) -> GeometryCheck:
    """Geometry check of one layer pair: (n, p) teacher features against (n, q) student features, rows paired.

    The thresholds are relative to the chance levels, so that they mean the same at every n (plug-in Procrustes
    and CKA drift with n against the widths): Procrustes "differs" when d / d_chance > ``procrustes_threshold``
    (the fraction of the way from identical, 0, to unpaired texts), CKA "says similar" when
    (c − c_chance)/(1 − c_chance) ≥ ``cka_threshold``. The chance levels are the means over
    ``chance_permutations`` seeded row permutations of the student (:func:`repsim.analysis.stats.permutation_indices`,
    seed + 1, as ``compare`` uses); with 0 the ends of the ranges (√2 and 0) stand in for them.
    Memory is O(n²) (pairwise cosines); subsample rows for n beyond a few thousand.
    """
    if not 0 <= eps < 1:
        raise UserError(f"`eps` must be in [0, 1), got {eps}")
    T, S = as_pair(teacher_feats, student_feats, min_rows=check_min_rows(projection_folds))
    values = three_metrics(T.numpy(), S.numpy())
    if projection_folds:
        values[f"projection_residual[folds={projection_folds}]"] = float(
            measures.projection_residual(T.numpy(), S.numpy(), folds=projection_folds))
    else:
        values["projection_residual[in_sample]"] = float(measures.projection_residual(T.numpy(), S.numpy()))
    cos_t, cos_s = cosine_matrix(T, center=center), cosine_matrix(S, center=center)
    n_orth, n_kept = eps_orthogonal_preservation(cos_t, cos_s, eps)
    frac = n_kept / n_orth if n_orth else float("nan")
    dist = angle_distortion_deg(cos_t, cos_s)
    dist = dist[np.isfinite(dist)]
    quant = ({f"q{int(q * 100)}": float(np.quantile(dist, q)) for q in (0.5, 0.9, 0.99)} | {"max": float(dist.max())}
             if dist.size else {"q50": float("nan"), "q90": float("nan"), "q99": float("nan"), "max": float("nan")})
    quant["mean"] = float(dist.mean()) if dist.size else float("nan")
    err = max_inner_product_error(T, S, center=center)
    c, p = values["cka[linear,biased]"], values["procrustes[distance]"]
    chance = _chance_levels(T.numpy(), S.numpy(), chance_permutations, seed)
    p_rel = p / chance["procrustes[distance]"] if chance["procrustes[distance]"] > 0 else math.inf
    c_rel = (c - chance["cka[linear,biased]"]) / (1 - chance["cka[linear,biased]"]) \
        if chance["cka[linear,biased]"] < 1 else 0.0
    poor_proc, poor_orth = p_rel > procrustes_threshold, (n_orth > 0 and frac < preservation_threshold)
    cka_similar = c_rel >= cka_threshold
    flagged = cka_similar and (poor_proc or poor_orth)
    cka_txt = f"CKA {c:.3f}, {c_rel:.0%} of the way from chance {chance['cka[linear,biased]']:.3f} to 1"
    proc_txt = f"Procrustes {p:.3f}, {p_rel:.0%} of the way from 0 to chance {chance['procrustes[distance]']:.3f}"
    if flagged:
        why = []
        if poor_proc:
            why.append(f"{proc_txt} > {procrustes_threshold:.0%}")
        if poor_orth:
            why.append(f"only {frac:.0%} of {n_orth} ε-orthogonal teacher pairs stay ε-orthogonal")
        verdict = f"CKA says similar ({cka_txt}), geometry differs: " + "; ".join(why)
    elif cka_similar:
        verdict = f"similar by CKA ({cka_txt}) and by geometry ({proc_txt})"
    else:
        verdict = f"CKA says dissimilar ({cka_txt} < {cka_threshold:.0%}); {proc_txt}"
    if n_orth == 0:
        verdict += f"; no teacher pair is ε-orthogonal (eps={eps:g})"
    return GeometryCheck(teacher_layer=teacher_layer, student_layer=student_layer, n=int(T.shape[0]), metrics=values,
                         eps=eps, teacher_orthogonal_pairs=n_orth, preserved_pairs=n_kept, preserved_fraction=frac,
                         angle_distortion_deg=quant, max_inner_product_error=err, flagged=bool(flagged),
                         verdict=verdict, thresholds={"cka": cka_threshold, "procrustes": procrustes_threshold,
                                                      "preservation": preservation_threshold}, chance=chance)


def _chance_levels(T: np.ndarray, S: np.ndarray, permutations: int, seed: int) -> dict[str, float]:
    """Procrustes distance and biased CKA of T against S with S's rows shuffled, mean over ``permutations`` seeded
    permutations (seed + 1, the comparison's convention); 0 permutations: √2 and 0, the ends of the ranges."""
    if permutations < 0:
        raise UserError(f"chance_permutations must be ≥ 0, got {permutations}")
    if permutations == 0:
        return {"procrustes[distance]": math.sqrt(2), "cka[linear,biased]": 0.0}

    perms = permutation_indices(T.shape[0], permutations, seed + 1)
    return {"procrustes[distance]": float(np.mean([measures.procrustes(T, S[pi]) for pi in perms])),
            "cka[linear,biased]": float(np.mean([measures.cka(T, S[pi]) for pi in perms]))}


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
        cols += ["preserved_fraction", "angle_distortion_deg_q50", "angle_distortion_deg_q90",
                 "max_inner_product_error"]
        lines = [t[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"), ""]
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
