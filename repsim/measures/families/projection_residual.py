"""Projection residual 1 − R²: the fraction of the teacher not linearly predictable from the student.

Ids: ``projection_residual[in_sample]`` (a function of second moments) and ``projection_residual[folds=K]``
(k-fold held-out; needs the rows), each optionally ``,ridge=R``; alias ``projection_residual`` (5 folds).
``projection_residual[folds=K,ridge=auto]`` chooses the ridge per pair and per fold by generalised
cross-validation on the training folds (:func:`gcv_ridge`); the flag ``reverse`` (with ``folds=K``) predicts the
student from the teacher instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from repsim.measures.arrays import ArrayLike, as_pair, prepare, to_output
from repsim.measures.linalg import clamp_rounding, eigen_rank_cutoff, eps, least_squares_gains, refine_below
from repsim.measures.registry import (
    SHAPE_INVARIANCES,
    Family,
    MetricSpec,
    PairMoments,
    check_number,
    register,
)
from repsim.system.errors import UserError

#: accuracy (absolute) of a residual from moments beyond which a value outside [0, 1] is a breakdown
MOMENTS_ACCURACY = 1e-9
#: the ridge=auto grid: λ = σ_max²·10^t, t = GCV_DECADES[0] … GCV_DECADES[1] in GCV_PER_DECADE steps per decade,
#: σ_max the largest singular value of the centred training-fold predictor
GCV_DECADES = (-8, 2)
GCV_PER_DECADE = 8


def fold_assignment(n: int, folds: int, seed: int = 0) -> np.ndarray:
    """Fold index (0 … folds−1) of each of n rows: a seeded random permutation cut into ``folds`` nearly equal parts.

    ``np.random.default_rng(seed).permutation(n)`` split by ``np.array_split``; fold sizes differ by at most 1.
    Every engine that must reproduce :func:`projection_residual`'s folds calls this.
    """
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise UserError(f"folds must be an integer ≥ 2 (or None for the in-sample residual), got {folds!r}")
    if folds > n:
        raise UserError(f"folds={folds} is more than the number of samples ({n})")
    if n - math.ceil(n / folds) < 2:
        raise UserError(f"folds={folds} leaves fewer than 2 training rows out of {n} samples")
    ids = np.empty(n, dtype=np.int64)
    for fold, rows in enumerate(np.array_split(np.random.default_rng(seed).permutation(n), folds)):
        ids[rows] = fold
    return ids


def least_squares(B: torch.Tensor, A: torch.Tensor, ridge: float) -> torch.Tensor:
    """The (ridge) least-squares map Ŵ fitting A ≈ BŴ: Ŵ = V diag(g) UᵀA from the thin SVD B = USVᵀ.

    ridge = 0: g = 1/s on singular values above numpy's lstsq cutoff (the minimum-norm solution, valid for
    rank-deficient B and n < width); ridge = λ > 0: g = s/(s² + λ), the minimiser of ‖A − BW‖² + λ‖W‖²
    (:func:`repsim.measures.linalg.least_squares_gains`). SVD rather than normal equations, so cond(B) is not
    squared, and it runs on any device.
    """
    U, s, Vh = torch.linalg.svd(B, full_matrices=False)
    gain = least_squares_gains(s, ridge, B.shape[0], B.shape[1])
    return Vh.T @ (gain[:, None] * (U.T @ A))


def gcv_grid(s_max: torch.Tensor) -> torch.Tensor:
    """The ridge=auto candidates λ_g = σ_max²·10^t on a log grid (:data:`GCV_DECADES`, :data:`GCV_PER_DECADE`):
    relative to the spectrum, so the choice is unchanged by the scale of the data."""
    lo, hi = GCV_DECADES
    t = torch.linspace(lo, hi, (hi - lo) * GCV_PER_DECADE + 1, dtype=s_max.dtype, device=s_max.device)
    return s_max * s_max * torch.pow(torch.tensor(10.0, dtype=s_max.dtype, device=s_max.device), t)


def gcv_ridge(s: torch.Tensor, proj_sq: torch.Tensor, total_sq: torch.Tensor, rows: int, intercept: bool
              ) -> torch.Tensor:
    """The λ of :func:`gcv_grid` minimising generalised cross-validation, for each of a batch of targets.

    ``s`` (k,) the singular values of the centred training predictor Y = U diag(s) Vᵀ (thin SVD, ``rows`` rows),
    ``proj_sq`` (..., k) a_k = ‖u_kᵀX‖² and ``total_sq`` (...) ‖X‖²_F of each centred training target X. With
    shrinkage h_k = s_k²/(s_k² + λ) the ridge hat matrix is H = 𝟙𝟙ᵀ/rows (the intercept) + U diag(h) Uᵀ, and

        GCV(λ) = rows · ‖(I − H)X‖²_F / (rows − tr H)²,
        ‖(I − H)X‖² = ‖X‖² − Σ_k a_k + Σ_k (1 − h_k)² a_k,  rows − tr H = rows − 1 − k + Σ_k (1 − h_k)

    (the denominator written with 1 − h_k = λ/(s_k² + λ) so nothing cancels; no intercept term without one).
    Every candidate for every target is one (…, k) × (k, G) product; ties go to the smallest λ. A grid rather than
    a line search on log λ: GCV can have several local minima in λ, and the grid is the same batched product for
    all targets of one predictor.
    """
    lam = gcv_grid(s.max())
    shrink = lam[None, :] / (s[:, None] * s[:, None] + lam[None, :])  # 1 − h_k, (k, G)
    resid = (total_sq - proj_sq.sum(dim=-1)).clamp_min(0.0)[..., None] + proj_sq @ shrink.square()
    dof = (rows - int(intercept) - s.shape[0]) + shrink.sum(dim=0)
    gcv = torch.where(dof > 0, rows * resid / dof.clamp_min(torch.finfo(s.dtype).tiny) ** 2,
                      torch.full_like(resid, math.inf))
    return lam[gcv.argmin(dim=-1)]


def held_out_fits(predictors: list[torch.Tensor], targets: list[torch.Tensor], folds: int, ridge: float | str,
                  seed: int = 0, center: bool = True, chosen: list | None = None) -> torch.Tensor:
    """(len(targets), len(predictors)) k-fold held-out residuals of every target from every predictor.

    Rows prepared already (centred, unit Frobenius); folds from :func:`fold_assignment`; per fold and predictor one
    thin SVD of its centred training rows Y = U diag(s) Vᵀ, shared by all targets: P = UᵀX (X the target's centred
    training rows), the fit W = V diag(g) P with g_k = s_k/(s_k² + λ) (λ = ``ridge``, ``"auto"``: per target by
    :func:`gcv_ridge`; 0: numpy's lstsq cutoff), the value Σ_folds ‖X_te − μ_X − (Y_te − μ_Y)W‖²_F. ``chosen``, when
    a list, receives the (folds, targets, predictors) λ of ``ridge="auto"``.
    """
    X0 = targets[0]
    n = X0.shape[0]
    fold_of_row = torch.as_tensor(fold_assignment(n, folds, seed), device=X0.device)
    out = X0.new_zeros(len(targets), len(predictors))
    lams = X0.new_zeros(folds, len(targets), len(predictors))
    for fold in range(int(folds)):
        test = fold_of_row == fold
        n_tr = int((~test).sum())
        split = []
        for X in targets:
            X_tr, X_te = X[~test], X[test]
            if center:
                mean = X_tr.mean(dim=0)
                X_tr, X_te = X_tr - mean, X_te - mean
            split.append((X_tr, X_te))
        for j, Y in enumerate(predictors):
            Y_tr, Y_te = Y[~test], Y[test]
            if center:
                mean = Y_tr.mean(dim=0)
                Y_tr, Y_te = Y_tr - mean, Y_te - mean
            U, s, Vh = torch.linalg.svd(Y_tr, full_matrices=False)
            Z = Y_te @ Vh.T  # (n_te, k)
            P = [U.T @ X_tr for X_tr, _ in split]  # (k, p_i) each
            if ridge == "auto":
                proj_sq = torch.stack([p.square().sum(dim=1) for p in P])
                total_sq = torch.stack([X_tr.square().sum() for X_tr, _ in split])
                lam = gcv_ridge(s, proj_sq, total_sq, n_tr, center)
                lams[fold, :, j] = lam
                gains = s[None, :] / (s[None, :] * s[None, :] + lam[:, None])
            else:
                gains = least_squares_gains(s, float(ridge), n_tr, Y.shape[1]).expand(len(targets), -1)
            for i, (p, (_, X_te)) in enumerate(zip(P, split, strict=True)):
                out[i, j] += (X_te - (Z * gains[i]) @ p).square().sum()
    if chosen is not None:
        chosen.append(lams)
    return out


def in_sample_residual(Xr: torch.Tensor, Yr: torch.Tensor, ridge: float) -> torch.Tensor:
    """‖X̃ − ỸŴ‖²_F from the rows: the residual itself, so nothing cancels when it is small."""
    return (Xr - Yr @ least_squares(Yr, Xr, ridge)).square().sum()


def eigen_weights(cov_y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, w) from S = ỸᵀỸ = Q diag(λ) Qᵀ: the explained part of the fit is Σ_k w_k ‖X̃ᵀỸ q_k‖², with
    w_k = 1/λ_k above :func:`repsim.measures.linalg.eigen_rank_cutoff` (0 below) or, with ridge ρ > 0,
    (λ_k + 2ρ)/(λ_k + ρ)² (W = (S + ρI)⁻¹ỸᵀX̃, the fit error without the penalty)."""
    lam, Q = torch.linalg.eigh(cov_y)
    if ridge > 0:
        return Q, (lam + 2 * ridge) / (lam + ridge) ** 2
    keep = lam > eigen_rank_cutoff(lam, cov_y.shape[-1])
    return Q, torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))


class ProjectionResidual(Family):
    """The projection-residual family (module docstring)."""

    name = "projection_residual"
    grammar = ("projection_residual[in_sample] or projection_residual[folds=K] (optionally ,ridge=R; with folds "
               "also ,ridge=auto and ,reverse)")
    examples = ("projection_residual[in_sample]", "projection_residual[folds=5]",
                "projection_residual[folds=5,ridge=auto]", "projection_residual[folds=5,ridge=auto,reverse]")
    uses = frozenset({"explained"})
    aliases = {"projection_residual": "projection_residual[folds=5]"}

    def spec(self, folds: int | None = None, ridge: float | str = 0.0, reverse: bool = False) -> MetricSpec:
        auto = ridge == "auto"
        ridge = ridge if auto else float(ridge)
        parts = ["in_sample" if folds is None else f"folds={folds}"] + \
            (["ridge=auto"] if auto else [f"ridge={ridge:g}"] if ridge else []) + (["reverse"] if reverse else [])
        where = "in-sample" if folds is None else f"{folds}-fold held-out"
        how = ", GCV ridge" if auto else ""
        what = "student from teacher" if reverse else "teacher from student"
        kwargs: dict[str, Any] = {"folds": folds, "ridge": ridge}
        if reverse:
            kwargs["reverse"] = True
        # the statistics: the held-out residual's own engine (allpairs) covers a fixed ridge, teacher from student;
        # ridge=auto and reverse go through this family's layer_state/pair_values
        return MetricSpec(f"projection_residual[{','.join(parts)}]", self.name, kwargs,
                          "lower", (0.0, 1.0) if folds is None else (0.0, math.inf), SHAPE_INVARIANCES, False,
                          "moments" if folds is None else "rows",
                          f"projection residual 1−R², {where}{how}, {what} (lower = more similar)",
                          frozenset() if ridge or reverse else frozenset({"invertible_linear"}))

    def parse(self, flags: list[str], options: dict[str, str], text: str) -> MetricSpec:
        if set(options) - {"folds", "ridge"} or [f for f in flags if f not in ("in_sample", "reverse")] or \
                len(set(flags)) != len(flags) or ("in_sample" in flags) == ("folds" in options):
            raise self.error(text)
        folds = self.integer(options, "folds", None, text, 2)
        reverse = "reverse" in flags
        if options.get("ridge") == "auto":
            if folds is None:
                raise self.error(text, "ridge=auto chooses λ by cross-validation on the training folds: it needs "
                                       "folds=K, e.g. projection_residual[folds=5,ridge=auto]")
            return self.spec(folds, "auto", reverse)
        ridge = self.number(options, "ridge", 0.0, text)
        if not ridge >= 0:
            raise self.error(text, f"ridge must be ≥ 0 or auto, got {ridge:g}")
        if reverse and folds is None:
            raise self.error(text, "reverse is offered with folds=K, e.g. projection_residual[folds=5,reverse]")
        return self.spec(folds, ridge, reverse)

    def held_out_folds(self, folds: int | None = None, **kwargs: Any) -> int | None:
        return folds

    def unregularised_folds(self, folds: int | None = None, ridge: float | str = 0.0, **kwargs: Any) -> int | None:
        return folds if not ridge else None

    def fits_in_sample(self, folds: int | None = None, **kwargs: Any) -> bool:
        return folds is None

    def min_rows(self, folds: int | None = None, **kwargs: Any) -> int:
        """2, or for k folds the fewest rows with every fold non-empty and ≥ 2 training rows (n ≥ k and
        n − ⌈n/k⌉ ≥ 2, :func:`fold_assignment`'s rule)."""
        if folds is None:
            return 2
        n = max(int(folds), 2)
        while n - math.ceil(n / int(folds)) < 2:
            n += 1
        return n

    def evaluate(self, X: ArrayLike, Y: ArrayLike, **kwargs: Any) -> float | torch.Tensor:
        """As :func:`projection_residual`: the sides are validated (zero variance included) before the folds."""
        Xt, Yt = as_pair(X, Y)
        return to_output(self.compute(Xt, Yt, **kwargs), X)

    def compute(self, X: torch.Tensor, Y: torch.Tensor, folds: int | None = None, ridge: float | str = 0.0,
                seed: int = 0, center: bool = True, reverse: bool = False) -> torch.Tensor:
        Xt, Yt = prepare(X, center, "X (teacher)"), prepare(Y, center, "Y (student)")
        if reverse or ridge == "auto":
            if folds is None:
                raise UserError("ridge='auto' and reverse need folds (the k-fold held-out residual)")
            Xt, Yt = (Yt, Xt) if reverse else (Xt, Yt)
            return held_out_fits([Yt], [Xt], folds, ridge, seed, center)[0, 0]
        if folds is None:
            return in_sample_residual(Xt, Yt, ridge)
        n = Xt.shape[0]
        fold_of_row = torch.as_tensor(fold_assignment(n, folds, seed), device=Xt.device)
        value = Xt.new_zeros(())
        for fold in range(int(folds)):
            test = fold_of_row == fold
            X_train, Y_train, X_test, Y_test = Xt[~test], Yt[~test], Xt[test], Yt[test]
            if center:
                mean_x, mean_y = X_train.mean(dim=0), Y_train.mean(dim=0)
                X_train, Y_train = X_train - mean_x, Y_train - mean_y
                X_test, Y_test = X_test - mean_x, Y_test - mean_y
            value = value + (X_test - Y_test @ least_squares(Y_train, X_train, ridge)).square().sum()
        return value

    def layer_state(self, X: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The prepared layer (centred, unit Frobenius norm)."""
        return prepare(X, True, "layer")

    def pair_values(self, states_t: Sequence[Any], states_s: Sequence[Any], folds: int | None = None,
                    ridge: float | str = 0.0, reverse: bool = False, **kwargs: Any) -> torch.Tensor:
        """(Lt, Ls) held-out residuals from :func:`held_out_fits`: each predictor's per-fold SVD shared by every
        target (the student layers' for teacher from student, the teacher layers' with ``reverse``)."""
        if folds is None:
            return super().pair_values(states_t, states_s, folds=folds, ridge=ridge, **kwargs)
        if reverse:
            return held_out_fits(list(states_t), list(states_s), folds, ridge).T
        return held_out_fits(list(states_s), list(states_t), folds, ridge)

    def layer_statistics(self, cov: torch.Tensor, n: int, ridge: float = 0.0, **kwargs: Any) -> Any:
        """(Q, w) of the student's ỸᵀỸ (:func:`eigen_weights`), once per student layer."""
        return eigen_weights(cov, float(ridge or 0.0))

    def finalize(self, m: PairMoments, folds: int | None = None, ridge: float = 0.0, **kwargs: Any
                 ) -> torch.Tensor:
        """In-sample residual. One pair with rows: the residual from the rows (:func:`in_sample_residual`).
        Otherwise 1 − explained, with explained = ``m.explained`` (an engine's batched value for this ridge) or
        Σ_k w_k ‖X̃ᵀỸ q_k‖² (:func:`eigen_weights`, from ``m.state_y`` when given), recomputed from the rows where
        it is below ``refine_below`` (cancellation) and the engine holds them."""
        if folds is not None:
            raise UserError(f"the {folds}-fold held-out residual needs the rows (per-fold moments), not pooled "
                            "second moments; use 'projection_residual[in_sample]' or repsim.pairwise on stored "
                            "activations")
        ridge = float(ridge or 0.0)
        if isinstance(m.rows_x, torch.Tensor) and m.rows_x.ndim == 2:
            return in_sample_residual(m.rows_x, m.rows_y, ridge)
        explained = m.explained
        if explained is None:
            Q, w = m.state_y if m.state_y is not None else eigen_weights(m.cov_y, ridge)
            explained = ((m.cross @ Q).square().sum(dim=-2) * w).sum(dim=-1)
        value = 1.0 - explained
        low = value < refine_below(value)
        if bool(low.any()) and m.rows_x is not None:
            value = value.clone()
            for index in torch.nonzero(low).tolist():
                Xr, Yr = m.pair_rows(tuple(index))
                value[tuple(index)] = in_sample_residual(Xr, Yr, ridge)
        return clamp_rounding(value, 0.0, 1.0, MOMENTS_ACCURACY, "projection residual",
                              resolution=None if m.rows_x is not None else eps(value))


FAMILY = register(ProjectionResidual())


def projection_residual(
    X: ArrayLike,
    Y: ArrayLike,
    ridge: float | str = 0.0,
    folds: int | None = None,
    seed: int = 0,
    center: bool = True,
    *,
    reverse: bool = False,
    dtype: torch.dtype = torch.float64,
) -> float | torch.Tensor:
    """Fraction of the teacher not linearly predictable from the student: min_W ‖X̃ − ỸW‖²_F (= 1 − R²).

    Both sides are prepared once, on all n rows (centred, unit Frobenius norm), so the residual is a fraction of
    the teacher's total variance ‖X̃‖² = 1. Asymmetric (teacher X is predicted from student Y).

    - ``folds=None``: in-sample least squares (thin SVD of Ỹ, minimum-norm solution). In [0, 1]. Exactly 0 as
      soon as the centred student has rank n − 1 (e.g. n ≤ q): the projection loss's blind spot, not similarity.
    - ``folds=k``: k-fold held-out residual. Rows are split by :func:`fold_assignment` (``seed``). For each fold,
      the map is fitted on the other k − 1 folds with an intercept: train rows of X̃ and Ỹ are re-centred by their
      train-fold means μ_X, μ_Y, W fitted on them, and the held-out rows predicted as μ_X + (Ỹ_te − μ_Y)W (only
      train rows enter the fit). The value is Σ over folds of ‖X̃_te − μ_X − (Ỹ_te − μ_Y)W‖²_F. 0 when the
      student is an invertible linear map of the teacher (and train folds have full rank); usually ≤ 1, but a
      student that only overfits can exceed 1, which is reported, not clipped.
      With ``center=False`` neither the global centring nor the intercept is applied.
    - ``ridge=λ > 0``: W minimises ‖X̃_tr − Ỹ_tr W‖² + λ‖W‖²_F (on the unit-norm data); the residual reported is
      the fit error without the penalty.
    - ``ridge="auto"`` (needs ``folds``): per fold, λ minimises generalised cross-validation on the training rows
      (:func:`gcv_ridge`: the intercept plus the ridge's effective degrees of freedom, over the log grid
      :func:`gcv_grid` relative to the training predictor's largest squared singular value), then the held-out
      residual with that λ. A ridge is not invariant to invertible linear maps of the predictor (only to orthogonal
      ones and isotropic scaling): it prefers the predictor's large-variance directions.
    - ``reverse=True`` (needs ``folds``): the student predicted from the teacher, the same value with X and Y
      exchanged.
    """
    if ridge != "auto":
        ridge = check_number("ridge", ridge)
    elif folds is None:
        raise UserError("ridge='auto' chooses λ on the training folds: give folds (e.g. folds=5)")
    if reverse and folds is None:
        raise UserError("reverse=True needs folds (the k-fold held-out residual), e.g. folds=5")
    Xt, Yt = as_pair(X, Y, dtype=dtype)
    return to_output(FAMILY.compute(Xt, Yt, folds, ridge, seed, center, bool(reverse)), X)
