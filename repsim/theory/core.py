"""The paper's counterexamples, geometry checks, and synthetic distillation.

Everything here is about one question: when does a similarity score say "similar" while the geometry (inner
products, angles) of the student differs from the teacher's? All metric values come from
:mod:`repsim.measures.functions` (centred, unit-Frobenius convention of docs/measures.md §2); this module only builds
inputs,
states closed forms, and reads the results.

Precise statements (what is exact and what is a limit):

* **CKA is blind only in the limit.** Linear CKA is the cosine ⟨K, L⟩/(‖K‖·‖L‖) between the centred Gram
  matrices K = X̃X̃ᵀ, L = ỸỸᵀ. CKA = 1 exactly means K = c·L with c > 0; both have trace ‖X̃‖² = ‖Ỹ‖² = 1, so
  c = 1: equal Grams, hence Procrustes = Gram-Frobenius = 0.
  Theorem 1 gives a family with CKA → 1 while Procrustes → √(2 − √2) ≈ 0.765 and Gram-Frobenius → 0.5.
* **The projection loss is blind exactly.** For any invertible, non-orthogonal A, a student S = T·A has projection
  loss (least squares with a learned unrestricted map on the student side) exactly 0, and its angles differ.
* **Procrustes and Gram-Frobenius are not blind.** Procrustes = 0 ⇔ Gram-Frobenius = 0 ⇔ equal (centred,
  scaled) Gram matrices; gram_frobenius ≤ 2·procrustes; every inner-product error
  |⟨x̃ᵢ, x̃ⱼ⟩ − ⟨ỹᵢ, ỹⱼ⟩| ≤ gram_frobenius.

Cosines and angles in the geometry check use centred rows by default (the same centring as the metrics; raw
language-model states share a large mean direction that makes every raw cosine large).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from repsim.activations.data import check_seed
from repsim.analysis.comparison import check_out_dir
from repsim.distill.core import layer_map_pairs
from repsim.distill.core import parse_layer_map as parse_layer_pairs
from repsim.measures.arrays import ArrayLike, as_matrix, as_pair, prepare
from repsim.system.errors import UserError, naming_path

METRIC_IDS = ("procrustes[distance]", "gram_frobenius", "cka[linear,biased]")
SYNTHETIC_LOSSES = ("cka", "projection", "procrustes", "gram_frobenius")


def _metrics() -> Any:
    from repsim.measures import functions as metrics

    return metrics


def _three_metrics(X: ArrayLike, Y: ArrayLike) -> dict[str, float]:
    """Procrustes distance, Gram-Frobenius and biased linear CKA from :mod:`repsim.measures.functions`."""
    m = _metrics()
    return {
        "procrustes[distance]": float(m.procrustes(X, Y, output="distance")),
        "gram_frobenius": float(m.gram_frobenius(X, Y)),
        "cka[linear,biased]": float(m.cka(X, Y)),
    }


# ============================================================================ Theorem 1


@dataclass(frozen=True)
class Theorem1:
    """The Theorem-1 construction of docs/measures.md §6 and its closed forms.

    Reading of the paper's three configurations (rows are the n inputs):

    * (a) ``teacher_unperturbed`` (n × d_t): rows 0..n/2−1 are +e₁, rows n/2..n−1 are −e₁.
    * (b) ``teacher`` (n × d_t): (a) with, for each k < m/2, row k = e₁ + ε·e_{k+2} and row n/2+k = −e₁ − ε·e_{k+2}
      (1-based unit vectors; so row n/2+k is exactly −(row k), the teacher stays centred, and d_t ≥ 1 + m/2).
      m rows are perturbed in total, in m/2 antipodal pairs, each along its own new axis.
    * (c) ``student`` (n × d_s): the unperturbed ±e₁ rows in d_s dimensions (only the first column is non-zero).

    (c) is (a) up to zero padding, so every metric says (a) ≡ (c); the question is what the metrics say about
    (b) against (c). With E = m·ε² (the perturbation energy):

    * CKA(b, c) = (n² + 2E) / (n·√(n² + 4E + 2mε⁴))
    * ρ = ‖X̃ᵀỸ‖_* = √(n² + 2E) / √(n·(n + E)),  Procrustes = √(2 − 2ρ)
    * Gram-Frobenius = √(E²·(1 − 4/n) + 2mε⁴) / (n + E)   (derived: X̃X̃ᵀ − ỸỸᵀ = −E/(n(n+E))·ssᵀ + P/(n+E),
      s = (±1) column, P = ε²·Σ_k u_k u_kᵀ with u_k = e_k − e_{n/2+k}; ⟨ssᵀ, P⟩ = 2E, ‖P‖² = 2mε⁴)

    The sign convention (+ε on row k, −ε on row n/2+k) reproduces the reference values
    n=8, m=4, ε=√2, d_t=3, d_s=1 → CKA 0.883883, Procrustes 0.647195, Gram-Frobenius 0.5.
    """

    n: int
    m: int
    eps: float
    d_t: int
    d_s: int
    teacher_unperturbed: np.ndarray
    teacher: np.ndarray
    student: np.ndarray

    @property
    def energy(self) -> float:
        """E = m·ε²."""
        return self.m * self.eps**2

    @property
    def closed_form(self) -> dict[str, float]:
        return theorem1_closed_form(self.n, self.m, self.eps)

    def measured(self) -> dict[str, float]:
        """The metrics of (b) against (c), computed by :mod:`repsim.measures.functions` on the matrices."""
        values = _three_metrics(self.teacher, self.student)
        values["procrustes_rho"] = 1.0 - float(_metrics().procrustes(self.teacher, self.student, output="squared")) / 2
        return values

    def cosines(self) -> dict[str, float]:
        """Uncentred cosines that show the distortion: a perturbed teacher row against e₁ and against another
        perturbed row on the same side (teacher), and the same pairs in the student (always 1)."""
        return {
            "teacher_cos_perturbed_vs_axis": 1.0 / math.sqrt(1.0 + self.eps**2),
            "teacher_cos_two_perturbed": 1.0 / (1.0 + self.eps**2) if self.m >= 4 else float("nan"),
            "student_cos_same_side": 1.0,
        }


def theorem1_closed_form(n: int, m: int, eps: float) -> dict[str, float]:
    """Closed forms of Theorem 1 for (b) teacher against (c) student; see :class:`Theorem1`."""
    E = m * eps**2
    cka = (n * n + 2 * E) / (n * math.sqrt(n * n + 4 * E + 2 * m * eps**4))
    rho = math.sqrt(n * n + 2 * E) / math.sqrt(n * (n + E))
    # written without cancellation: 1 − ρ = E(n−2) / (n(n+E)(1+ρ)), and E²(1 − 4/n) + 2mε⁴ = mε⁴(m(n−4) + 2n)/n
    procrustes = math.sqrt(2 * E * (n - 2) / (n * (n + E) * (1 + rho)))
    gram = eps**2 * math.sqrt(m * (m * (n - 4) + 2 * n) / n) / (n + E)
    return {"cka[linear,biased]": cka, "procrustes[distance]": procrustes, "gram_frobenius": gram,
            "procrustes_rho": rho}


def theorem1(n: int, m: int, eps: float, d_t: int | None = None, d_s: int = 1) -> Theorem1:
    """Build the Theorem-1 matrices (a), (b), (c). ``d_t`` defaults to 1 + m/2, the least that fits."""
    if n < 2 or n % 2:
        raise UserError(f"theorem1: n must be an even number ≥ 2, got {n}")
    if m < 0 or m % 2 or m > n:
        raise UserError(f"theorem1: m must be even with 0 ≤ m ≤ n, got m={m}, n={n}")
    if not eps >= 0 or not math.isfinite(eps):
        raise UserError(f"theorem1: eps must be a finite number ≥ 0, got {eps}")
    d_t = 1 + m // 2 if d_t is None else d_t
    if d_t < 1 + m // 2:
        raise UserError(f"theorem1: d_t must be ≥ 1 + m/2 = {1 + m // 2}, got {d_t}")
    if d_s < 1:
        raise UserError(f"theorem1: d_s must be ≥ 1, got {d_s}")
    half = n // 2
    a = np.zeros((n, d_t))
    a[:half, 0], a[half:, 0] = 1.0, -1.0
    b = a.copy()
    for k in range(m // 2):
        b[k, k + 1] = eps
        b[half + k, k + 1] = -eps
    c = np.zeros((n, d_s))
    c[:half, 0], c[half:, 0] = 1.0, -1.0
    return Theorem1(n=n, m=m, eps=float(eps), d_t=d_t, d_s=d_s, teacher_unperturbed=a, teacher=b, student=c)


def theorem1_sweep(ms: Sequence[int] = (4, 8, 16, 32, 64, 128, 256), ratio: int = 1,
                   measure_up_to: int = 512) -> pd.DataFrame:
    """The sweep of docs/measures.md §6: n = ratio·m, ε² = n/m (so E = n), m growing.

    Closed forms give CKA = (n + 2)/√(n² + 4n + 2n²/m) → 1, ρ → 1/√2 so Procrustes → √(2 − √2) ≈ 0.765, and
    Gram-Frobenius → √(1/4) = 0.5. Rows with n ≤ ``measure_up_to`` are also measured with
    :mod:`repsim.measures.functions`.
    """
    rows = []
    for m in ms:
        n = ratio * m
        eps = math.sqrt(n / m)
        row: dict[str, Any] = {"m": m, "n": n, "eps": eps}
        cf = theorem1_closed_form(n, m, eps)
        row.update({k: v for k, v in cf.items() if k != "procrustes_rho"})
        if n <= measure_up_to:
            th = theorem1(n, m, eps)
            meas = _three_metrics(th.teacher, th.student)
            row.update({f"measured {k}": v for k, v in meas.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def near_orthogonal_sweep(ns: Sequence[int] = (8, 20, 50, 100, 200, 500, 1000, 2000), m: int = 4,
                          eps: float = 3.0) -> pd.DataFrame:
    """Large-ε variant: m rows pushed nearly orthogonal to the class axis (cos = 1/√(1+ε²), 0.32 for ε = 3; two
    perturbed rows on one side have cos 1/(1+ε²) = 0.1), m fixed, n growing.

    Expanding the closed forms in 1/n: 1 − CKA ≈ m·ε⁴/n² while Procrustes ≈ √(E/n) and Gram-Frobenius ≈
    √(E²+2mε⁴)/n: CKA saturates (quadratically in 1/n) long before the geometric distances vanish, while the
    student still maps the near-orthogonal rows onto one line (cos 1).
    """
    rows = []
    for n in ns:
        cf = theorem1_closed_form(n, m, eps)
        rows.append({"n": n, "m": m, "eps": eps, "1 - cka": 1 - cf["cka[linear,biased]"],
                     **{k: v for k, v in cf.items() if k != "procrustes_rho"}})
    return pd.DataFrame(rows)


# ============================================================================ projection


def cosine_matrix(X: ArrayLike, center: bool = False) -> np.ndarray:
    """Pairwise cosines of the rows of X (optionally after subtracting column means); NaN for zero rows."""
    Xt = as_matrix(X, "X")
    if center:
        Xt = Xt - Xt.mean(dim=0, keepdim=True)
    norms = torch.linalg.vector_norm(Xt, dim=1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    U = Xt / safe[:, None]
    C = (U @ U.T).clamp(-1.0, 1.0)
    zero = norms == 0
    C[zero, :] = float("nan")
    C[:, zero] = float("nan")
    return C.cpu().numpy()


def least_squares_projection_loss(teacher: ArrayLike, student: ArrayLike) -> tuple[float, np.ndarray]:
    """The projection loss at its optimum: min_W ‖T − S·W‖²_F / (n·d_t) (MSE of the best unrestricted linear
    map from student to teacher, no centring or scaling: the FitNets/TinyBERT loss). Returns (loss, W)."""
    T, S = as_pair(teacher, student, min_rows=1)
    W = torch.linalg.lstsq(S, T, driver="gelsd").solution
    loss = float(((T - S @ W) ** 2).mean())
    return loss, W.numpy()


@dataclass(frozen=True)
class ProjectionCounterexample:
    """A student with zero projection loss whose angles differ from the teacher's.

    Teacher rows e₁, e₂, e₃; student rows (1, .99, 0), (0, .1, 0), (0, 0, 1) (so S = T·A with A = S invertible).
    The learned map W = A⁻¹ gives loss exactly 0, while cos(s₁, s₂) = .099/(√1.9801 · .1) = .99/√1.9801 ≈ 0.703545
    where the teacher has cos 0 (a right angle becomes 45.3°).
    """

    teacher: np.ndarray
    student: np.ndarray
    map: np.ndarray
    loss: float
    teacher_cos_12: float
    student_cos_12: float
    metrics: dict[str, float]


def projection_counterexample() -> ProjectionCounterexample:
    T = np.eye(3)
    S = np.array([[1.0, 0.99, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 1.0]])
    loss, W = least_squares_projection_loss(T, S)
    return ProjectionCounterexample(
        teacher=T, student=S, map=W, loss=loss,
        teacher_cos_12=float(cosine_matrix(T)[0, 1]), student_cos_12=float(cosine_matrix(S)[0, 1]),
        metrics=_three_metrics(T, S),
    )


@dataclass(frozen=True)
class LinearMapCounterexample:
    """S = T·A for an invertible, non-orthogonal A: projection residual 0 (in-sample and held out), angles differ."""

    teacher: np.ndarray
    student: np.ndarray
    A: np.ndarray
    condition: float
    projection_loss: float
    metrics: dict[str, float]
    max_angle_change_deg: float


def linear_map_counterexample(n: int = 200, d: int = 8, condition: float = 10.0, seed: int = 0
                              ) -> LinearMapCounterexample:
    """Teacher: n Gaussian rows in d dims; A = U·diag(σ)·Vᵀ with σ spread geometrically from 1 to ``condition``."""
    if n <= d + 1 or d < 2:
        raise UserError(f"linear_map_counterexample: need d ≥ 2 and n > d + 1, got n={n}, d={d}")
    if not condition >= 1:
        raise UserError(f"linear_map_counterexample: condition must be ≥ 1, got {condition}")
    rng = np.random.default_rng(seed)
    T = rng.standard_normal((n, d))
    U, _ = np.linalg.qr(rng.standard_normal((d, d)))
    V, _ = np.linalg.qr(rng.standard_normal((d, d)))
    A = U @ np.diag(np.geomspace(1.0, condition, d)) @ V.T
    S = T @ A
    loss, _ = least_squares_projection_loss(T, S)
    m = _metrics()
    values = _three_metrics(T, S)
    values["projection_residual[in_sample]"] = float(m.projection_residual(T, S))
    values["projection_residual[folds=5]"] = float(m.projection_residual(T, S, folds=5))
    dist = _angle_distortion_deg(cosine_matrix(T, center=True), cosine_matrix(S, center=True))
    return LinearMapCounterexample(teacher=T, student=S, A=A, condition=float(condition), projection_loss=loss,
                                   metrics=values, max_angle_change_deg=float(np.nanmax(dist)))


@dataclass(frozen=True)
class TeacherSideCollapse:
    """When the map sits on the teacher side (min_W ‖T·W − S‖), the student can collapse.

    * Unnormalised MSE: W = 0 and S = 0 give loss exactly 0: the student carries nothing.
    * Even with the normalised residual (centred, unit norm; argument order (target, predictor) =
      (student, teacher)), any S = T·w·uᵀ of rank one has residual 0: all centred student cosines are ±1.
    """

    teacher: np.ndarray
    student_zero: np.ndarray
    zero_loss: float
    student_rank_one: np.ndarray
    rank_one_residual: float
    rank_one_abs_cos_min: float
    metrics_rank_one: dict[str, float]


def teacher_side_collapse(n: int = 50, d_t: int = 6, d_s: int = 3, seed: int = 0) -> TeacherSideCollapse:
    rng = np.random.default_rng(seed)
    T = rng.standard_normal((n, d_t))
    zero_student = np.zeros((n, d_s))
    W0 = np.zeros((d_t, d_s))
    zero_loss = float(np.mean((T @ W0 - zero_student) ** 2))
    w, u = rng.standard_normal((d_t, 1)), rng.standard_normal((1, d_s))
    S1 = T @ w @ u
    residual = float(_metrics().projection_residual(S1, T))
    cos = cosine_matrix(S1, center=True)
    iu = np.triu_indices(n, 1)
    return TeacherSideCollapse(teacher=T, student_zero=zero_student, zero_loss=zero_loss, student_rank_one=S1,
                               rank_one_residual=residual, rank_one_abs_cos_min=float(np.nanmin(np.abs(cos[iu]))),
                               metrics_rank_one=_three_metrics(T, S1))


# ============================================================================ bounds


@dataclass(frozen=True)
class GeometryBounds:
    """Procrustes, Gram-Frobenius and the largest inner-product error, with the two inequalities
    gram_frobenius ≤ 2·procrustes and max_ij |⟨x̃ᵢ,x̃ⱼ⟩ − ⟨ỹᵢ,ỹⱼ⟩| ≤ gram_frobenius (x̃ = centred, unit Frobenius).

    Proof of the first: with Z = [Ỹ, 0]Q for the optimal orthogonal Q, ZZᵀ = ỸỸᵀ and
    X̃X̃ᵀ − ZZᵀ = X̃(X̃ − Z)ᵀ + (X̃ − Z)Zᵀ, so ‖·‖_F ≤ (‖X̃‖₂ + ‖Z‖₂)·‖X̃ − Z‖_F ≤ 2·procrustes.
    The second: an entry of a matrix is at most its Frobenius norm.
    """

    procrustes: float
    gram_frobenius: float
    max_inner_product_error: float

    def holds(self, tol: float = 1e-9) -> bool:
        return (self.gram_frobenius <= 2 * self.procrustes + tol
                and self.max_inner_product_error <= self.gram_frobenius + tol)


def max_inner_product_error(X: ArrayLike, Y: ArrayLike, center: bool = True) -> float:
    """max over i, j of |⟨x̃ᵢ, x̃ⱼ⟩ − ⟨ỹᵢ, ỹⱼ⟩| with x̃, ỹ centred (optional) and scaled to unit Frobenius norm."""
    Xt, Yt = as_pair(X, Y)
    a, b = prepare(Xt, center, "X (teacher)"), prepare(Yt, center, "Y (student)")
    return float((a @ a.T - b @ b.T).abs().max())


def geometry_bounds(X: ArrayLike, Y: ArrayLike) -> GeometryBounds:
    m = _metrics()
    return GeometryBounds(procrustes=float(m.procrustes(X, Y)), gram_frobenius=float(m.gram_frobenius(X, Y)),
                          max_inner_product_error=max_inner_product_error(X, Y))


# ============================================================================ geometry check


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


def _angle_distortion_deg(cos_t: np.ndarray, cos_s: np.ndarray) -> np.ndarray:
    iu = np.triu_indices(cos_t.shape[0], 1)
    at, as_ = np.degrees(np.arccos(cos_t[iu])), np.degrees(np.arccos(cos_s[iu]))
    return np.abs(at - as_)


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
        raise UserError(f"eps must be in [0, 1), got {eps}")
    T, S = as_pair(teacher_feats, student_feats, min_rows=check_min_rows(projection_folds))
    m = _metrics()
    values = _three_metrics(T.numpy(), S.numpy())
    if projection_folds:
        values[f"projection_residual[folds={projection_folds}]"] = float(
            m.projection_residual(T.numpy(), S.numpy(), folds=projection_folds))
    else:
        values["projection_residual[in_sample]"] = float(m.projection_residual(T.numpy(), S.numpy()))
    cos_t, cos_s = cosine_matrix(T, center=center), cosine_matrix(S, center=center)
    n_orth, n_kept = eps_orthogonal_preservation(cos_t, cos_s, eps)
    frac = n_kept / n_orth if n_orth else float("nan")
    dist = _angle_distortion_deg(cos_t, cos_s)
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
    from repsim.analysis.stats import permutation_indices

    m = _metrics()
    perms = permutation_indices(T.shape[0], permutations, seed + 1)
    return {"procrustes[distance]": float(np.mean([m.procrustes(T, S[pi]) for pi in perms])),
            "cka[linear,biased]": float(np.mean([m.cka(T, S[pi]) for pi in perms]))}


def check_min_rows(projection_folds: int | None) -> int:
    """The fewest rows :func:`check` accepts: 4, and one more than the residual's folds."""
    return max(4, (projection_folds or 0) + 1)


def parse_layer_map(spec: str, teacher_layers: Sequence[int], student_layers: Sequence[int]) -> list[tuple[int, int]]:
    """Parse a layer map with the grammar of :func:`repsim.distill.parse_layer_map` ("12:6,6:3", "uniform" =
    student block j ↔ teacher block round(j·Lt/Ls), or a file: CSV, JSON or the line ``--suggest-map`` prints),
    then check each pair against the layers available here.

    Layer 0 is the embedding output, layer k the k-th block (repsim.activations.extract's numbering).
    """
    tl, sl = sorted(set(int(x) for x in teacher_layers)), sorted(set(int(x) for x in student_layers))
    pairs = parse_layer_pairs(spec, max(tl), max(sl))
    for t, s in pairs:
        if t not in tl:
            raise UserError(f"layer map: teacher has no layer {t} (layers {tl[0]}..{tl[-1]})")
        if s not in sl:
            raise UserError(f"layer map: student has no layer {s} (layers {sl[0]}..{sl[-1]})")
    return pairs


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
        import json

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(out / "check.csv", self.table.to_csv(index=False))
        _atomic_write_text(out / "check.json", json.dumps(
            {"meta": self.meta, "checks": [asdict(c) for c in self.checks]}, indent=2, default=str))
        _atomic_write_text(out / "report.html", self.html())
        return out

    def html(self) -> str:
        """The check as one self-contained page (:mod:`repsim.analysis.report`)."""
        from repsim.analysis.report import check_html

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
        raise UserError("check compares paired rows per text: use --pool mean, cls or last, not tokens")
    from repsim.activations.data import load_texts
    from repsim.activations.extract import extract

    eps = check_options.get("eps", 0.1)
    if not (isinstance(eps, (int, float)) and 0 <= eps < 1):
        raise UserError(f"eps must be in [0, 1), got {eps}")
    for name in ("cka_threshold", "procrustes_threshold", "preservation_threshold"):
        value = check_options.get(name, 0.0)
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise UserError(f"{name} must be a finite number, got {value!r}")
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
                        f"gives {len(texts)}: raise --max-samples or give more texts")
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
    import json

    from repsim.distill import core as distill_mod

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, validation = distill_mod.load_train_validation(data, max_train=max_train, max_val=max_val)
    texts, labels = distill_mod._texts_labels(train)
    base = dict(epochs=epochs, seed=seed, device=device, progress=False) | (distill_options or {})
    config = distill_mod.DistillConfig(**base)
    t_model, t_tok = distill_mod.load(teacher, config.task, distill_mod._num_labels(labels))
    teacher_dir = out / "teacher" / "model"
    if not distill_mod.has_trained_head(t_model, config.task):
        if not finetune_teacher:
            raise UserError("the teacher has no trained head; fine-tune it first or pass finetune_teacher=True")
        if not teacher_dir.exists():
            distill_mod.finetune((t_model, t_tok), train, validation, config=config, out=out / "teacher")
        t_model, t_tok = distill_mod.load(str(teacher_dir), config.task, distill_mod._num_labels(labels))
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
            res = distill_mod.distill((t_model, t_tok), student, train, validation, config=cfg, out=run_dir)
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
    _atomic_write_text(out / "geometry_before_after.csv", table.to_csv(index=False))
    from repsim.analysis.report import check_html

    _atomic_write_text(out / "report.html", check_html(
        table, {"teacher": teacher_ref, "student": student, "data": data, "layer_map": str(pairs),
                "n": len(check_texts), "seed": seed, "check_options": check_options},
        title="repsim geometry before and after distillation", label_column="student"))
    return table


# ============================================================================ synthetic distillation


def synthetic_teacher(k: int, d_t: int, *, kind: str = "random", seed: int = 0) -> np.ndarray:
    """k unit vectors in d_t dims. ``kind="random"``: Gaussian directions (pairwise cos ≈ N(0, 1/d_t), so d_t sets
    how near-orthogonal they are); ``kind="orthonormal"``: exactly orthonormal rows (needs k ≤ d_t)."""
    if k < 4 or d_t < 2:
        raise UserError(f"synthetic teacher needs k ≥ 4 and d_t ≥ 2, got k={k}, d_t={d_t}")
    rng = np.random.default_rng(seed)
    if kind == "orthonormal":
        if k > d_t:
            raise UserError(f"orthonormal teacher needs k ≤ d_t, got k={k}, d_t={d_t}")
        Q, _ = np.linalg.qr(rng.standard_normal((d_t, k)))
        return Q.T.copy()
    if kind != "random":
        raise UserError(f"unknown teacher kind {kind!r}: use 'random' or 'orthonormal'")
    G = rng.standard_normal((k, d_t))
    return G / np.linalg.norm(G, axis=1, keepdims=True)


def synthetic_distill(teacher: np.ndarray, d_s: int, loss: str, *, steps: int = 300, lr: float = 0.01,
                      seed: int = 0, eps: float = 0.1, log_every: int = 1) -> pd.DataFrame:
    """Optimise k free student vectors in d_s dims (Gaussian init, std 1/√d_s) with Adam under one loss from
    :mod:`repsim.measures.losses` (any name ``make_feature_loss`` accepts, e.g. "procrustes[squared]"; the projection
    loss learns its map jointly). Logs at step 0 (init) and every
    ``log_every`` steps: the loss, Procrustes, Gram-Frobenius, CKA, in-sample projection residual, the number of
    teacher ε-orthogonal pairs (centred cosines) still ε-orthogonal in the student, and the max inner-product error.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster and makes runs bit-reproducible
    try:
        return _synthetic_distill(teacher, d_s, loss, steps=steps, lr=lr, seed=seed, eps=eps, log_every=log_every)
    finally:
        torch.set_num_threads(threads)


def _synthetic_distill(teacher: np.ndarray, d_s: int, loss: str, *, steps: int, lr: float, seed: int, eps: float,
                       log_every: int) -> pd.DataFrame:
    from repsim.measures.losses import make_feature_loss

    k, d_t = teacher.shape
    T = torch.as_tensor(teacher, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    S = torch.nn.Parameter(torch.randn(k, d_s, generator=g, dtype=torch.float64) / math.sqrt(d_s))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        loss_fn = make_feature_loss(loss, d_t, d_s).to(torch.float64)
    opt = torch.optim.Adam([S, *loss_fn.parameters()], lr=lr)
    cos_t = cosine_matrix(teacher, center=True)
    m = _metrics()
    rows = []

    def log(step: int, value: float) -> None:
        Sn = S.detach().numpy().copy()
        n_orth, n_kept = eps_orthogonal_preservation(cos_t, cosine_matrix(Sn, center=True), eps)
        rows.append({"step": step, "loss": value, **_three_metrics(teacher, Sn),
                     "projection_residual[in_sample]": float(m.projection_residual(teacher, Sn)),
                     "teacher_eps_orthogonal_pairs": n_orth, "preserved_pairs": n_kept,
                     "preserved_fraction": n_kept / n_orth if n_orth else float("nan"),
                     "max_inner_product_error": max_inner_product_error(teacher, Sn)})

    for step in range(steps + 1):
        opt.zero_grad()
        value = loss_fn(T, S)
        if step % log_every == 0 or step == steps:
            log(step, float(value.detach()))
        if step == steps:
            break
        value.backward()
        opt.step()
    return pd.DataFrame(rows)


DEFAULT_SIZES: tuple[tuple[int, int, int], ...] = ((100, 16, 16), (100, 64, 16), (200, 128, 32))


def projection_table(pc: Any, lm: Any, tc: Any) -> pd.DataFrame:
    """The projection-loss constructions as one long table (construction, quantity, value)."""
    rows = [("projection_counterexample", "projection_loss", pc.loss),
            ("projection_counterexample", "teacher_cos_12", pc.teacher_cos_12),
            ("projection_counterexample", "student_cos_12", pc.student_cos_12),
            *(("projection_counterexample", k, v) for k, v in pc.metrics.items()),
            ("linear_map", "condition_number", lm.condition), ("linear_map", "projection_loss", lm.projection_loss),
            ("linear_map", "max_angle_change_deg", lm.max_angle_change_deg),
            *(("linear_map", k, v) for k, v in lm.metrics.items()),
            ("teacher_side_collapse", "zero_map_loss", tc.zero_loss),
            ("teacher_side_collapse", "rank_one_residual", tc.rank_one_residual),
            ("teacher_side_collapse", "rank_one_abs_cos_min", tc.rank_one_abs_cos_min),
            *(("teacher_side_collapse", k, v) for k, v in tc.metrics_rank_one.items())]
    return pd.DataFrame(rows, columns=["construction", "quantity", "value"])


def _check_synthetic_options(seeds: Sequence[int], steps: int, eps: float) -> None:
    if not (isinstance(eps, (int, float)) and 0 <= eps < 1):
        raise UserError(f"eps must be in [0, 1) (|cos| <= eps counts as eps-orthogonal), got {eps}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"steps must be an integer ≥ 1, got {steps!r}")
    if not len(seeds):
        raise UserError("give at least one seed")
    for seed in seeds:
        check_seed(seed)


def synthetic_experiment(sizes: Sequence[tuple[int, int, int]] = DEFAULT_SIZES, seeds: Sequence[int] = (0, 1, 2),
                         losses: Sequence[str] = SYNTHETIC_LOSSES, steps: int = 300, lr: float = 0.01,
                         eps: float = 0.1, teacher_kind: str = "random", log_every: int = 1) -> pd.DataFrame:
    """All (size, seed, loss) runs; sizes are (k, d_t, d_s). The teacher depends on (size, seed), the student init
    on the seed. Returns the long history with columns k, d_t, d_s, seed, loss_name plus the logged values."""
    _check_synthetic_options(seeds, steps, eps)
    frames = []
    for k, d_t, d_s in sizes:
        for seed in seeds:
            teacher = synthetic_teacher(k, d_t, kind=teacher_kind, seed=seed)
            for name in losses:
                h = synthetic_distill(teacher, d_s, name, steps=steps, lr=lr, seed=seed, eps=eps, log_every=log_every)
                h.insert(0, "loss_name", name)
                h.insert(0, "seed", seed)
                h.insert(0, "d_s", d_s)
                h.insert(0, "d_t", d_t)
                h.insert(0, "k", k)
                frames.append(h)
    return pd.concat(frames, ignore_index=True)


def synthetic_final_table(history: pd.DataFrame) -> pd.DataFrame:
    """Final-step values, mean (and std) over seeds, per size and loss, with the initial loss for reference."""
    keys = ["k", "d_t", "d_s", "loss_name"]
    first = history[history.step == 0].groupby(keys + ["seed"])["loss"].first().rename("initial_loss")
    last = history.loc[history.groupby(keys + ["seed"])["step"].idxmax()].set_index(keys + ["seed"])
    last = last.join(first)
    cols = ["initial_loss", "loss", "procrustes[distance]", "gram_frobenius", "cka[linear,biased]",
            "projection_residual[in_sample]", "preserved_fraction", "max_inner_product_error"]
    mean = last.groupby(keys)[cols].mean()
    std = last.groupby(keys)[["preserved_fraction", "procrustes[distance]"]].std().add_suffix(" std")
    return mean.join(std).reset_index()


# ============================================================================ figures and the runner


def _publish(tmp: str, path: Path) -> None:
    """Give the temporary file ordinary permissions (mkstemp makes it 0600), then rename it into place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with naming_path(path), os.fdopen(fd, "w") as fh:
            fh.write(text)
        _publish(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)  # a full disk leaves no hidden half-written file behind
        raise


def _save_figure(fig: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        with naming_path(path):
            fig.savefig(tmp, dpi=120, bbox_inches="tight")
        _publish(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def plot_theorem1(sweep: pd.DataFrame, near: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ax.plot(sweep.m, sweep["cka[linear,biased]"], "o-", label="CKA (higher = more similar)")
    ax.plot(sweep.m, sweep["procrustes[distance]"], "s-", label="Procrustes distance (lower = more similar)")
    ax.plot(sweep.m, sweep["gram_frobenius"], "^-", label="Gram-Frobenius (lower = more similar)")
    ax.axhline(math.sqrt(2 - math.sqrt(2)), color="grey", ls=":", lw=1)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("m perturbed rows (n = m, ε² = n/m)")
    ax.set_title("Theorem 1: CKA → 1, geometry stays distorted")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.loglog(near.n, near["1 - cka"], "o-", label="1 − CKA")
    ax.loglog(near.n, near["procrustes[distance]"], "s-", label="Procrustes distance")
    ax.loglog(near.n, near["gram_frobenius"], "^-", label="Gram-Frobenius")
    ax.set_xlabel(f"n rows (m = {int(near.m.iloc[0])} near-orthogonal rows, ε = {near.eps.iloc[0]:g})")
    ax.set_title("Large ε: 1 − CKA ∝ 1/n², Gram-Frobenius ∝ 1/n, Procrustes ∝ 1/√n", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def plot_synthetic(history: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = history[["k", "d_t", "d_s"]].drop_duplicates().itertuples(index=False)
    sizes = list(sizes)
    panels = [("loss", "own loss"), ("procrustes[distance]", "Procrustes distance ↓"),
              ("gram_frobenius", "Gram-Frobenius ↓"), ("cka[linear,biased]", "CKA ↑"),
              ("preserved_fraction", "ε-orthogonal pairs kept ↑")]
    fig, axes = plt.subplots(len(sizes), len(panels), figsize=(3.2 * len(panels), 2.6 * len(sizes)), squeeze=False)
    for r, (k, d_t, d_s) in enumerate(sizes):
        sub = history[(history.k == k) & (history.d_t == d_t) & (history.d_s == d_s)]
        for c, (col, title) in enumerate(panels):
            ax = axes[r][c]
            for name, grp in sub.groupby("loss_name"):
                stats = grp.groupby("step")[col].agg(["mean", "min", "max"])
                line, = ax.plot(stats.index, stats["mean"], label=name, lw=1.2)
                ax.fill_between(stats.index, stats["min"], stats["max"], color=line.get_color(), alpha=0.2)
            if col == "loss":
                ax.set_yscale("log")
            ax.set_title(f"{title}\nk={k}, d_t={d_t}, d_s={d_s}", fontsize=8)
            ax.tick_params(labelsize=7)
            if r == len(sizes) - 1:
                ax.set_xlabel("Adam step", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _fmt(df: pd.DataFrame) -> str:
    return df.to_string(index=False, float_format=lambda v: f"{v:.6f}")


def run_counterexamples(which: str = "all", out: str | Path | None = None, seeds: Sequence[int] = (0, 1, 2),
                        steps: int = 300, sizes: Sequence[tuple[int, int, int]] = DEFAULT_SIZES,
                        eps: float = 0.1) -> str:
    """Build the chosen counterexamples, return the printable report; with ``out``, also write CSVs and figures
    (theory_*.csv, theory_*.png) there."""
    if which not in ("theorem1", "projection", "synthetic", "all"):
        raise UserError(f"unknown counterexample {which!r}: choose theorem1, projection, synthetic or all")
    if which in ("synthetic", "all"):
        _check_synthetic_options(seeds, steps, eps)
    outdir = check_out_dir(out) if out is not None else None
    if outdir is not None:
        outdir.mkdir(parents=True, exist_ok=True)
    parts: list[str] = []
    if which in ("theorem1", "all"):
        refs = []
        for n, mm, e, d_t, d_s in [(8, 4, math.sqrt(2), 3, 1), (20, 4, 3.0, 3, 2)]:
            th = theorem1(n, mm, e, d_t=d_t, d_s=d_s)
            meas = th.measured()
            refs.append({"n": n, "m": mm, "eps": e, "d_t": d_t, "d_s": d_s,
                         **{f"{k} (closed form)": v for k, v in th.closed_form.items() if k != "procrustes_rho"},
                         **{f"{k} (measured)": v for k, v in meas.items() if k != "procrustes_rho"}})
        refs_df = pd.DataFrame(refs)
        sweep, near = theorem1_sweep(), near_orthogonal_sweep()
        parts += ["== Theorem 1: teacher (b) vs student (c), closed form and measured ==", _fmt(refs_df.T.reset_index()
                  .rename(columns={"index": "quantity"})), "",
                  "== Sweep: n = m, eps^2 = n/m (CKA -> 1, Procrustes -> sqrt(2 - sqrt 2) = 0.765367, "
                  "Gram-Frobenius -> 0.5) ==", _fmt(sweep), "",
                  "== Near-orthogonal variant: m = 4 rows with eps = 3, n growing ==", _fmt(near), ""]
        if outdir is not None:
            _atomic_write_text(outdir / "theory_theorem1_sweep.csv", sweep.to_csv(index=False))
            _atomic_write_text(outdir / "theory_near_orthogonal.csv", near.to_csv(index=False))
            plot_theorem1(sweep, near, outdir / "theory_theorem1.png")
    if which in ("projection", "all"):
        pc = projection_counterexample()
        lm = linear_map_counterexample()
        tc = teacher_side_collapse()
        parts += ["== Projection counterexample: teacher e1,e2,e3; student (1,.99,0),(0,.1,0),(0,0,1) ==",
                  f"projection loss (least squares, learned map) = {pc.loss:.3e}",
                  f"cos(row1,row2): teacher {pc.teacher_cos_12:.6f}, student {pc.student_cos_12:.6f} "
                  f"(angle {math.degrees(math.acos(pc.student_cos_12)):.2f} deg instead of 90)",
                  "metrics: " + ", ".join(f"{k} {v:.6f}" for k, v in pc.metrics.items()), "",
                  f"== S = T.A, A invertible with condition number {lm.condition:g} (n=200, d=8) ==",
                  f"projection loss = {lm.projection_loss:.3e}; " + ", ".join(f"{k} {v:.6f}"
                                                                          for k, v in lm.metrics.items()),
                  f"largest change of a pairwise angle: {lm.max_angle_change_deg:.2f} deg", "",
                  "== Map on the teacher side: min_W |T.W - S| ==",
                  f"W = 0, S = 0: loss {tc.zero_loss:.1e} (the student carries nothing)",
                  f"rank-one student S = T.w.u^T: normalised residual {tc.rank_one_residual:.2e}, smallest |cos| "
                  f"between student rows {tc.rank_one_abs_cos_min:.6f}; vs teacher: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in tc.metrics_rank_one.items()), ""]
        if outdir is not None:
            _atomic_write_text(outdir / "theory_projection.csv", projection_table(pc, lm, tc).to_csv(index=False))
    if which in ("synthetic", "all"):
        history = synthetic_experiment(sizes=sizes, seeds=seeds, steps=steps, eps=eps)
        final = synthetic_final_table(history)
        parts += [f"== Synthetic distillation: Adam, {steps} steps, seeds {list(seeds)}, mean over seeds; "
                  f"preserved_fraction = teacher eps-orthogonal pairs (eps={eps:g}) still eps-orthogonal ==",
                  _fmt(final), ""]
        if outdir is not None:
            _atomic_write_text(outdir / "theory_synthetic_final.csv", final.to_csv(index=False))
            plot_synthetic(history, outdir / "theory_synthetic.png")
    if outdir is not None:
        parts.append(f"wrote tables and figures to {outdir}")
    return "\n".join(parts)
