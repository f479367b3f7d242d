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
* **The projection loss is blind exactly.** For any invertible A, a student S = T·A has projection loss (least
  squares with a learned unrestricted map on the student side) exactly 0, and its angles differ unless A is a
  multiple of an orthogonal matrix.
* **Procrustes and Gram-Frobenius are not blind.** Procrustes = 0 ⇔ Gram-Frobenius = 0 ⇔ equal (centred,
  scaled) Gram matrices; gram_frobenius ≤ 2·procrustes; every inner-product error
  |⟨x̃ᵢ, x̃ⱼ⟩ − ⟨ỹᵢ, ỹⱼ⟩| ≤ gram_frobenius.

Cosines and angles in the geometry check use centred rows by default (the same centring as the metrics; raw
language-model states share a large mean direction that makes every raw cosine large).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from repsim.measures import functions as measures
from repsim.measures.arrays import ArrayLike, as_matrix, as_pair, prepare
from repsim.system.errors import UserError

METRIC_IDS = ("procrustes[distance]", "gram_frobenius", "cka[linear,biased]")


def three_metrics(X: ArrayLike, Y: ArrayLike) -> dict[str, float]:
    """Procrustes distance, Gram-Frobenius and biased linear CKA from :mod:`repsim.measures.functions`."""
    return {
        "procrustes[distance]": float(measures.procrustes(X, Y, output="distance")),
        "gram_frobenius": float(measures.gram_frobenius(X, Y)),
        "cka[linear,biased]": float(measures.cka(X, Y)),
    }


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
        values = three_metrics(self.teacher, self.student)
        values["procrustes_rho"] = 1.0 - float(measures.procrustes(self.teacher, self.student, output="squared")) / 2
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
            meas = three_metrics(th.teacher, th.student)
            row.update({f"measured {k}": v for k, v in meas.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def near_orthogonal_sweep(ns: Sequence[int] = (8, 20, 50, 100, 200, 500, 1000, 2000), m: int = 4,
                          eps: float = 3.0) -> pd.DataFrame:
    """Large-ε variant: m rows pushed nearly orthogonal to the class axis (cos = 1/√(1+ε²), 0.32 for ε = 3; two
    perturbed rows on one side have cos 1/(1+ε²) = 0.1), m fixed, n growing.

    Expanding the closed forms in 1/n: 1 − CKA ≈ m·ε⁴/n², Procrustes ≈ √(E/n), Gram-Frobenius ≈ √(E²+2mε⁴)/n.
    1 − CKA is a similarity gap, not a distance: CKA's own distance √(2 − 2·CKA) ≈ √(2m)·ε²/n (column
    ``cka_distance``) falls like 1/n, as Gram-Frobenius does; only Procrustes falls more slowly (1/√n). All three
    average over the n rows, so a distortion confined to m rows (a vanishing fraction m/n) fades from every one of
    them, while the student still maps the near-orthogonal rows onto one line (cos 1).
    """
    rows = []
    for n in ns:
        cf = theorem1_closed_form(n, m, eps)
        gap = 1 - cf["cka[linear,biased]"]
        rows.append({"n": n, "m": m, "eps": eps, "1 - cka": gap, "cka_distance": math.sqrt(2 * gap),
                     **{k: v for k, v in cf.items() if k != "procrustes_rho"}})
    return pd.DataFrame(rows)


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


def angle_distortion_deg(cos_t: np.ndarray, cos_s: np.ndarray) -> np.ndarray:
    iu = np.triu_indices(cos_t.shape[0], 1)
    at, as_ = np.degrees(np.arccos(cos_t[iu])), np.degrees(np.arccos(cos_s[iu]))
    return np.abs(at - as_)


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
        metrics=three_metrics(T, S),
    )


@dataclass(frozen=True)
class LinearMapCounterexample:
    """S = T·A for an invertible A that is not a multiple of an orthogonal matrix: projection residual 0 (in-sample
    and held out), angles differ."""

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
    values = three_metrics(T, S)
    values["projection_residual[in_sample]"] = float(measures.projection_residual(T, S))
    values["projection_residual[folds=5]"] = float(measures.projection_residual(T, S, folds=5))
    dist = angle_distortion_deg(cosine_matrix(T, center=True), cosine_matrix(S, center=True))
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
    residual = float(measures.projection_residual(S1, T))
    cos = cosine_matrix(S1, center=True)
    iu = np.triu_indices(n, 1)
    return TeacherSideCollapse(teacher=T, student_zero=zero_student, zero_loss=zero_loss, student_rank_one=S1,
                               rank_one_residual=residual, rank_one_abs_cos_min=float(np.nanmin(np.abs(cos[iu]))),
                               metrics_rank_one=three_metrics(T, S1))


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
    return GeometryBounds(procrustes=float(measures.procrustes(X, Y)),
                          gram_frobenius=float(measures.gram_frobenius(X, Y)),
                          max_inner_product_error=max_inner_product_error(X, Y))
