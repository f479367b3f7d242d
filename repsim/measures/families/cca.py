"""Canonical correlation analysis: ``cca[mean_r]`` (mean canonical correlation) and ``cca[mean_r2]`` (Yanai's
mean squared canonical correlation), optionally ``cca[mean_r,ridge=λ]``; the shared core of ``svcca`` and ``pwcca``.

With X̃, Ỹ the centred, unit-Frobenius sides and C_xx = X̃ᵀX̃, C_yy = ỸᵀỸ, C_xy = X̃ᵀỸ, the canonical correlations
ρ₁ ≥ ρ₂ ≥ … are the singular values of C_xx^{-1/2} C_xy C_yy^{-1/2}, each inverse square root taken on the
covariance's numerical range (eigenvalues at or below 10·p·eps·λ_max count as 0); there are k = min(r_x, r_y) of
them (r the ranks). ``mean_r`` = Σρᵢ/k, ``mean_r2`` = Σρᵢ²/k, both in [0, 1], higher = more similar, invariant
to any invertible linear map of either side (and so to translation, scaling, orthogonal maps, permutations).
Scaling and the 1/n or 1/(n − 1) of a covariance cancel, so the values are those of any CCA code on the same data
(google/svcca's ``np.mean(cca_coef1)`` for full-rank sides).

Degenerate samples. In the (n − 1)-dimensional space of centred columns, two column spaces of ranks r_x + r_y ≥ n
must intersect, so r_x + r_y − (n − 1) canonical correlations are 1 whatever the data (all of them once a side
reaches rank n − 1, e.g. n ≤ width): CCA then measures the sample size, not similarity. Every engine refuses it
with a UserError naming the fixes: ``ridge=λ`` (regularised CCA: C_xx + λ·(tr C_xx/r_x)·I on C_xx's range,
likewise C_yy, λ in units of the mean nonzero eigenvalue, so the value stays scale invariant and zero columns
change nothing; the ρᵢ shrink towards 0 rather than to 1, still k of them), or a PCA reduction first
(``svcca[k=K]`` with 2K < n).
"""

from __future__ import annotations

from typing import Any

import torch

from repsim.measures.arrays import ArrayLike, as_pair, prepare, to_output
from repsim.measures.linalg import clamp_rounding, eps
from repsim.measures.linalg import eigh as lapack_eigh
from repsim.measures.linalg import svdvals as lapack_svdvals
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

SUMMARIES = ("mean_r", "mean_r2")


def symmetric_eigh(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues ascending, eigenvectors) of a batch of symmetric matrices: torch's (differentiable) where a
    gradient is wanted or off the CPU, else numpy's LAPACK on one BLAS thread (:func:`repsim.measures.linalg.eigh`)."""
    if cov.requires_grad or cov.device.type != "cpu":
        return torch.linalg.eigh(cov)
    lam, V = lapack_eigh(cov)
    return lam.to(cov.dtype), V.to(cov.dtype)


def whitening_basis(cov: torch.Tensor, ridge: float = 0.0, top: int | None = None,
                    variance: float | None = None) -> torch.Tensor:
    """B (..., p, p) with columns vᵢ/√(λᵢ + κ) for the selected eigenpairs (λᵢ, vᵢ) of ``cov`` and exact zero
    columns for the others, so that BᵀC_xy… whitens the selected directions and the rank is the number of nonzero
    columns (:func:`basis_rank`). Selected: the eigenvalues above 10·p·eps·λ_max (C's numerical range, so zero
    columns change nothing), κ = ``ridge``·tr C/r (r that rank: ridge in units of the mean eigenvalue on the range),
    and among those the ``top`` largest, or the fewest largest whose sum reaches
    ``variance``·tr C (PCA by explained variance). ``cov`` is read as the covariance of the unit-Frobenius side:
    it is first divided by its trace, so any positive multiple of it gives the same B. Batched over leading
    dimensions; differentiable."""
    p = cov.shape[-1]
    lam, V = symmetric_eigh(cov)  # ascending
    lam = lam / lam.detach().clamp_min(0).sum(dim=-1, keepdim=True)
    lam_d = lam.detach()
    total = torch.ones_like(lam_d[..., :1])
    keep = lam_d > lam_d.amax(dim=-1, keepdim=True).clamp_min(0) * (10 * p * eps(lam_d))
    kappa = ridge * total / keep.sum(dim=-1, keepdim=True)  # ridge × the mean eigenvalue on the range
    position = torch.arange(p - 1, -1, -1, device=cov.device).expand_as(lam_d)  # 0 for the largest eigenvalue
    if top is not None:
        keep = keep & (position < top)
    if variance is not None:
        desc = lam_d.clamp_min(0).flip(-1)
        before = desc.cumsum(-1) - desc  # variance of the larger eigenvalues
        count = (before < variance * total).sum(dim=-1, keepdim=True)  # fewest reaching the fraction
        keep = keep & (position < count)
    shifted = lam + kappa
    gain = torch.where(keep, torch.where(keep, shifted, torch.ones_like(shifted)).rsqrt(), torch.zeros_like(lam))
    return V * gain.unsqueeze(-2)


def basis_rank(B: torch.Tensor) -> torch.Tensor:
    """The number of nonzero columns of a :func:`whitening_basis` (..., p, p): the whitened rank."""
    return (B.detach() != 0).any(dim=-2).sum(dim=-1)


def compact(B: torch.Tensor) -> torch.Tensor:
    """A :func:`whitening_basis` without the columns that are zero in every matrix of the batch (the unselected
    directions: a PCA reduction keeps K of p), so the products with it cost K, not p, columns."""
    used = (B.detach() != 0).reshape(-1, *B.shape[-2:]).any(dim=0).any(dim=0)
    return B if bool(used.all()) else B[..., used]


def check_not_degenerate(n: int, rank_x: torch.Tensor, rank_y: torch.Tensor, metric: str, fixes: str,
                         what: str = "rank") -> None:
    """UserError when r_x + r_y ≥ n for any pair (module docstring): canonical correlations of 1 by construction."""
    total = rank_x + rank_y
    bad = total >= n
    if bool(bad.any()):
        where = torch.nonzero(bad).tolist()
        rx, ry = int(torch.broadcast_to(rank_x, bad.shape)[bad][0]), int(torch.broadcast_to(rank_y, bad.shape)[bad][0])
        at = f" (layer pair{'s' if len(where) > 1 else ''} {', '.join(map(str, map(tuple, where[:4])))}" \
             f"{', …' if len(where) > 4 else ''})" if bad.ndim else ""
        raise UserError(f"{metric} is degenerate here{at}: teacher {what} {rx} + student {what} {ry} ≥ n = {n} "
                        "samples, "
                        f"so {rx + ry - n + 1} canonical correlation(s) equal 1 by construction, whatever the data; "
                        f"{fixes}")


def canonical_correlations(m: PairMoments, Bx: torch.Tensor, By: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ρ descending (..., min(p, q)), k = min(rank Bx, rank By) (...)) from the moments and two whitening bases.

    ρ are the singular values of BₓᵀC_xyB_y, clamped into [0, 1] (only rounding may leave it)."""
    Bx, By = compact(Bx), compact(By)
    T = (Bx.mT @ m.cross) @ By
    if T.requires_grad or T.ndim == 2:
        rho = torch.linalg.svdvals(T)
    else:
        rho = lapack_svdvals(T).to(T.dtype)
    rho = clamp_rounding(rho, 0.0, 1.0, 1e-9, "a canonical correlation")
    k = torch.minimum(basis_rank(Bx), basis_rank(By))
    return rho, k


def first_k(values: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mask (…, width) of the first k entries along the last axis (k broadcast over the leading dimensions)."""
    index = torch.arange(values.shape[-1], device=values.device)
    return index < k.unsqueeze(-1)


DEGENERATE_FIXES = ("regularise the covariances, e.g. cca[mean_r,ridge=0.1], or reduce each side to its top principal "
                    "directions first, e.g. svcca[k=K] with 2K < n")


class CCA(Family):
    """Mean (squared) canonical correlation (module docstring)."""

    name = "cca"
    grammar = "cca[mean_r] or cca[mean_r2], optionally with ,ridge=λ (λ ≥ 0)"
    examples = ("cca[mean_r]", "cca[mean_r2]", "cca[mean_r,ridge=0.1]")

    def spec(self, summary: str = "mean_r", ridge: float = 0.0) -> MetricSpec:
        """The spec of one convention."""
        cid = f"cca[{summary}]" if ridge == 0 else f"cca[{summary},ridge={ridge:g}]"
        what = "mean canonical correlation" if summary == "mean_r" else "mean squared canonical correlation"
        if ridge:
            what += f", ridge {ridge:g}"
        invariances = SHAPE_INVARIANCES if ridge else SHAPE_INVARIANCES | {"invertible_linear"}
        return MetricSpec(cid, self.name, {"summary": summary, "ridge": float(ridge)}, "higher", (0.0, 1.0),
                          frozenset(invariances), True, "moments", f"CCA {what} (higher = more similar)")

    def parse(self, flags: list[str], options: dict[str, str], text: str) -> MetricSpec:
        if len(flags) != 1 or flags[0] not in SUMMARIES or set(options) - {"ridge"}:
            raise self.error(text)
        ridge = self.number(options, "ridge", 0.0, text)
        if ridge < 0:
            raise self.error(text, f"ridge must be ≥ 0, got {options['ridge']!r}")
        return self.spec(flags[0], ridge)

    def min_rows(self, **kwargs: Any) -> int:
        return 3

    def compute(self, X: torch.Tensor, Y: torch.Tensor, summary: str = "mean_r", ridge: float = 0.0,
                center: bool = True) -> torch.Tensor:
        Xt, Yt = prepare(X, center, "X (teacher)"), prepare(Y, center, "Y (student)")
        return self.finalize(PairMoments.from_rows(Xt, Yt), summary, ridge)

    def layer_statistics(self, cov: torch.Tensor, n: int, ridge: float = 0.0, **kwargs: Any) -> Any:
        """The layer's :func:`whitening_basis`."""
        return whitening_basis(cov, ridge)

    def finalize(self, m: PairMoments, summary: str = "mean_r", ridge: float = 0.0, **kwargs: Any) -> torch.Tensor:
        if layer_rows_only(m):
            return finalize_by_teacher_layer(self, m, summary=summary, ridge=ridge)
        Bx = m.state_x if m.state_x is not None else whitening_basis(m.cov_x, ridge)
        By = m.state_y if m.state_y is not None else whitening_basis(m.cov_y, ridge)
        if ridge == 0:
            check_not_degenerate(m.n, basis_rank(Bx), basis_rank(By), f"cca[{summary}]", DEGENERATE_FIXES)
        rho, k = canonical_correlations(m, Bx, By)
        values = rho if summary == "mean_r" else rho * rho
        return (values * first_k(values, k)).sum(dim=-1) / k.to(values.dtype)


FAMILY = register(CCA())


def cca(X: ArrayLike, Y: ArrayLike, summary: str = "mean_r", ridge: float = 0.0,
        center: bool = True) -> float | torch.Tensor:
    """Mean (``summary="mean_r"``) or mean squared (``"mean_r2"``) canonical correlation of teacher ``X`` (n × p)
    and student ``Y`` (n × q), optionally ridge-regularised (module docstring); higher is more similar."""
    spec = FAMILY.parse([str(summary)], {"ridge": str(ridge)}, f"cca[{summary},ridge={ridge}]")
    Xt, Yt = as_pair(X, Y, min_rows=3)
    return to_output(FAMILY.compute(Xt, Yt, center=center, **spec.kwargs), X)
