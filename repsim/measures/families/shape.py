"""Generalised shape metrics (Williams, Kunz, Kornblith & Linderman, NeurIPS 2021; netrep's ``LinearMetric``).

Ids: ``shape[alpha=A]`` (the angular metric, radians) and ``shape[alpha=A,score=euclidean]``, A ∈ [0, 1].

Each side is prepared by the shared rule (centred, unit Frobenius norm: X̃) and then partially whitened,
φ_α(X̃) = X̃Z, Z ∝ αI + (1 − α)C^{-1/2} with C = X̃ᵀX̃ (the inverse square root taken on C's numerical range,
eigenvalues at or below :func:`~repsim.measures.linalg.eigen_rank_cutoff` counting as 0), Z scaled so that
‖X̃Z‖_F = ‖X̃‖_F = 1 (netrep's ``preserve_variance``). With ρ_α = ‖ZₓᵀX̃ᵀỸZ_y‖_* (the Procrustes alignment of the
whitened sides):

- angular: θ_α = arccos ρ_α, in [0, π/2]; a metric (triangle inequality) on shapes;
- euclidean: min over orthogonal Q of ‖φ_α(X̃) − φ_α(Ỹ)Q‖_F = √(2 − 2ρ_α) = 2 sin(θ_α/2), in [0, √2].

α = 1 is the Procrustes distance (``shape[alpha=1]`` = ``procrustes[angular]``, ``shape[alpha=1,score=euclidean]``
= ``procrustes[distance]``); α = 0 whitens fully and θ₀ = arccos(Σᵢρᵢ/√(rₓr_y)) with ρᵢ the canonical
correlations and r the ranks, so it is degenerate where CCA is (r_x + r_y ≥ n forces canonical correlations of 1,
and two sides of rank n − 1 are at distance 0 whatever they are): refused there, as CCA is. Widths may differ:
zero padding to a common width (netrep's ``zero_pad``) changes no nuclear norm, so none is formed.

Conventions against netrep (docs/measures.md): netrep whitens the raw centred data (C = X_cᵀX_c without 1/n), so
for 0 < α < 1 its score changes when a side is rescaled; here the whitening acts on the unit-Frobenius side, which
makes every α invariant to isotropic scaling (netrep's value on X_c/‖X_c‖_F, Y_c/‖Y_c‖_F). netrep's Euclidean
score is unnormalised, and with zero padding or rank-deficient sides its variance rescaling counts the padded
directions (clipped eigenvalues 1e-7), so ‖φ(X)‖ ≠ ‖X‖; here ‖φ(X̃)‖ = 1 exactly and padding has no effect.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from repsim.measures.arrays import ArrayLike, as_pair, prepare, to_output
from repsim.measures.families.cca import check_not_degenerate, symmetric_eigh
from repsim.measures.families.procrustes import FAMILY as PROCRUSTES
from repsim.measures.families.procrustes import residual_squared
from repsim.measures.linalg import clamp_rounding, eps, refine_below, safe_sqrt
from repsim.measures.registry import (
    SHAPE_INVARIANCES,
    Family,
    MetricSpec,
    PairMoments,
    finalize_by_teacher_layer,
    layer_rows_only,
    register,
)
from repsim.system.errors import UserError

SCORES = ("angular", "euclidean")
FIXES = "whiten partially (e.g. shape[alpha=0.5]; α > 0 is not degenerate) or use more samples"


def eigen_cutoff(lam: torch.Tensor, size: int) -> torch.Tensor:
    """Per matrix of a batch of eigenvalues (..., size): 10·size·eps·λ_max (the rank rule of
    :func:`repsim.measures.linalg.eigen_rank_cutoff`, applied to each matrix separately)."""
    return lam.amax(dim=-1, keepdim=True).clamp_min(0) * (10 * max(size, 1) * eps(lam))


def whitening(cov: torch.Tensor, alpha: float) -> torch.Tensor:
    """Z = V diag(d) Vᵀ, d_i = c·(α + (1 − α)λ_i^{-1/2}) on C's range (c·α off it), c such that tr(ZCZ) = tr C.

    ``cov`` = C (..., p, p), symmetric positive semi-definite (batched), read as the covariance of the unit-Frobenius
    side: C is first divided by its trace, so any positive multiple of it gives the same Z. Differentiable."""
    lam, V = symmetric_eigh(cov)
    lam = lam / lam.detach().clamp_min(0).sum(dim=-1, keepdim=True)
    keep = lam > eigen_cutoff(lam.detach(), cov.shape[-1])
    positive = lam.clamp_min(0)
    inv_sqrt = torch.where(keep, torch.where(keep, lam, torch.ones_like(lam)).rsqrt(), torch.zeros_like(lam))
    d = alpha + (1 - alpha) * inv_sqrt
    scale = (positive.sum(dim=-1, keepdim=True) / (positive * d * d).sum(dim=-1, keepdim=True)).sqrt()
    d = d * scale
    return (V * d.unsqueeze(-2)) @ V.mT


def whitened_rank(Z: torch.Tensor) -> torch.Tensor:
    """The rank of a full :func:`whitening` (α = 0; zero off C's range): its eigenvalues above 10·p·eps·max, which
    separates the kept ones (at least √(10·p·eps)·max, by the rank rule on C) from rounding."""
    lam = torch.linalg.eigvalsh(Z.detach())
    return (lam > eigen_cutoff(lam, Z.shape[-1])).sum(dim=-1)


def whitened_rows(X: torch.Tensor, alpha: float) -> torch.Tensor:
    """φ_α(X̃) up to an orthogonal map of its columns, from the thin SVD X̃ = USVᵀ: U·diag(αs + (1 − α)) over the
    singular values kept by the same rank rule as :func:`whitening` (s² above its eigenvalue cutoff), scaled to
    unit Frobenius norm. The cancellation-free route for nearly identical sides (n × rank)."""
    U, s, _ = torch.linalg.svd(X, full_matrices=False)
    keep = s * s > eigen_cutoff((s * s).unsqueeze(0), X.shape[1]).squeeze(0)
    d = torch.where(keep, alpha * s + (1 - alpha), torch.zeros_like(s))
    W = U * d
    return W / W.norm()


class _Whitened:
    """Lazy per-layer whitened rows of an engine's row matrices (indexed like ``PairMoments.rows_x``)."""

    def __init__(self, rows: Any, alpha: float) -> None:
        self.rows, self.alpha = rows, alpha

    def __getitem__(self, i: int) -> torch.Tensor:
        return whitened_rows(self.rows[i].detach(), self.alpha)


def shape_squared(m: PairMoments, alpha: float) -> torch.Tensor:
    """2 − 2ρ_α from the pair moments (batched over their leading dimensions), the whitening of each side from
    ``m.state_x``/``m.state_y`` when the engine gave :meth:`Shape.layer_statistics`, else from the covariances.

    Where 2 − 2ρ_α has lost more than half its digits (nearly identical sides) and the engine holds the rows, it
    is recomputed as the Procrustes residual of the whitened rows (:func:`whitened_rows`), no digits cancelling;
    as for Procrustes, that correction carries no gradient."""
    Zx = m.state_x if m.state_x is not None else whitening(m.cov_x, alpha)
    Zy = m.state_y if m.state_y is not None else whitening(m.cov_y, alpha)
    if alpha == 0:
        check_not_degenerate(m.n, whitened_rank(Zx), whitened_rank(Zy), "shape[alpha=0]", FIXES)
    W = Zx.mT @ m.cross @ Zy
    rho = PairMoments(m.n, cross=W).nuclear_norm()
    squared = 2 - 2 * rho
    low = squared.detach() < refine_below(squared) * 2
    if bool(low.any()) and m.rows_x is not None and m.rows_y is not None:
        whitened = PairMoments(m.n, cross=W, rows_x=_Whitened(m.rows_x, alpha), rows_y=_Whitened(m.rows_y, alpha))
        exact = squared.detach().clone()
        for index in (torch.nonzero(low).tolist() if low.ndim else [[]]):
            index = tuple(index)
            if squared.ndim == 0:
                Xw, Yw = whitened_rows(m.rows_x.detach(), alpha), whitened_rows(m.rows_y.detach(), alpha)
            else:
                Xw, Yw = whitened.pair_rows(index)
            exact[index] = residual_squared(Xw, Yw)
        squared = squared + (exact - squared.detach())
    tol = 1e-9 + 200.0 * m.n * eps(squared)
    return clamp_rounding(squared, 0.0, 2.0, tol, f"squared shape distance 2 − 2ρ at α={alpha:g}",
                          resolution=None if m.rows_x is not None else eps(squared) * 2)


class Shape(Family):
    """The generalised shape metrics (module docstring)."""

    name = "shape"
    grammar = "shape[alpha=A] or shape[alpha=A,score=euclidean] with 0 ≤ A ≤ 1"
    examples = ("shape[alpha=0]", "shape[alpha=0.5]", "shape[alpha=1]", "shape[alpha=0.5,score=euclidean]")

    def spec(self, alpha: float, score: str = "angular") -> MetricSpec:
        """The spec of one convention."""
        cid = f"shape[alpha={alpha:g}]" if score == "angular" else f"shape[alpha={alpha:g},score={score}]"
        invariances = SHAPE_INVARIANCES | ({"invertible_linear"} if alpha == 0 else set())
        if score == "angular":
            rng, what = (0.0, math.pi / 2), f"shape metric arccos ρ_α, α={alpha:g} (radians)"
        else:
            rng, what = (0.0, math.sqrt(2)), f"shape metric √(2−2ρ_α), α={alpha:g}"
        return MetricSpec(cid, self.name, {"alpha": float(alpha), "score": score}, "lower", rng,
                          frozenset(invariances), True, "moments", f"{what} (lower = more similar)")

    def parse(self, flags: list[str], options: dict[str, str], text: str) -> MetricSpec:
        if flags or set(options) - {"alpha", "score"} or "alpha" not in options:
            raise self.error(text)
        alpha = self.number(options, "alpha", 1.0, text)
        if not 0.0 <= alpha <= 1.0:
            raise self.error(text, f"alpha must lie in [0, 1], got {options['alpha']!r}")
        score = options.get("score", "angular")
        if score not in SCORES:
            raise self.error(text, f"score must be one of {', '.join(SCORES)}, got {score!r}")
        return self.spec(alpha, score)

    def compute(self, X: torch.Tensor, Y: torch.Tensor, alpha: float = 1.0, score: str = "angular",
                center: bool = True) -> torch.Tensor:
        if alpha == 1:  # Z = I: exactly the Procrustes family's computation
            return PROCRUSTES.compute(X, Y, "angular" if score == "angular" else "distance", center=center)
        Xt, Yt = prepare(X, center, "X (teacher)"), prepare(Y, center, "Y (student)")
        return self.finalize(PairMoments.from_rows(Xt, Yt), alpha, score)

    def needs(self, alpha: float = 1.0, **kwargs: Any) -> frozenset[str]:
        """α = 1 reads the engine's nuclear norms (it is Procrustes); otherwise the covariances."""
        return PROCRUSTES.needs(output="angular") if alpha == 1 else frozenset()

    def layer_statistics(self, cov: torch.Tensor, n: int, alpha: float = 1.0, **kwargs: Any) -> Any:
        """The whitening Z of one layer (:func:`whitening`; None at α = 1, where Z = I)."""
        return None if alpha == 1 else whitening(cov, alpha)

    def finalize(self, m: PairMoments, alpha: float = 1.0, score: str = "angular", **kwargs: Any) -> torch.Tensor:
        if score not in SCORES:
            raise UserError(f"shape score must be one of {', '.join(SCORES)}, got {score!r}")
        if alpha == 1:  # Z = I: the Procrustes family itself, so the two ids give the same numbers
            return PROCRUSTES.finalize(m, "angular" if score == "angular" else "distance")
        if layer_rows_only(m):
            return finalize_by_teacher_layer(self, m, alpha=alpha, score=score)
        distance = safe_sqrt(shape_squared(m, alpha))
        return 2 * torch.asin((distance / 2).clamp(max=1.0)) if score == "angular" else distance


FAMILY = register(Shape())


def shape_metric(X: ArrayLike, Y: ArrayLike, alpha: float = 1.0, score: str = "angular",
                 center: bool = True) -> float | torch.Tensor:
    """The generalised shape metric between teacher ``X`` (n × p) and student ``Y`` (n × q) (module docstring):
    arccos ρ_α (``score="angular"``, radians) or √(2 − 2ρ_α) (``score="euclidean"``); lower is more similar."""
    spec = FAMILY.parse([], {"alpha": str(alpha), "score": str(score)}, f"shape[alpha={alpha},score={score}]")
    Xt, Yt = as_pair(X, Y)
    return to_output(FAMILY.compute(Xt, Yt, center=center, **spec.kwargs), X)
