"""In-memory representational similarity metrics and the metric registry.

Inputs are a teacher ``X`` (n × p) and a student ``Y`` (n × q) whose rows are paired (row i of both comes from
the same input); numpy arrays or torch tensors (CPU or CUDA), computed in float64 unless ``dtype`` says
otherwise. Unless ``center=False`` each side is centred (column means subtracted) and scaled to unit Frobenius
norm: X̃ = (X − 1μᵀ)/‖X − 1μᵀ‖_F, likewise Ỹ. Results are Python floats for numpy input and 0-dim tensors (on
the teacher's device) for torch input.

Every linear metric depends on the data only through the Gram matrices K = X̃X̃ᵀ and L = ỸỸᵀ, so each is
computed in whichever form is cheaper for the shape: the primal form from p × q cross-products X̃ᵀỸ when n is
large, or the dual form from n × n Gram matrices (or an n × n factor of a wide side) when n is smaller than the
widths. Differences of nearly equal quantities (identical inputs give ρ = 1) are recomputed by a
cancellation-free route when the fast formula has lost too many digits.

The registry :data:`METRICS` maps canonical metric ids (with their conventions) to :class:`MetricSpec` records
(direction, range, invariances, symmetry, linearity, plot label); :func:`get_metric` parses user ids.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from repsim.measures.arrays import (
    ArrayLike,
    as_pair,
    check_self_hsic,
    debiased_self_hsic,
    prepare,
    self_hsic_magnitude,
    to_output,
)
from repsim.system.errors import UserError

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

PROCRUSTES_OUTPUTS = ("distance", "angular", "squared")
PROCRUSTES_ESTIMATORS = ("plugin", "mom")
#: defaults of the moment estimator of ρ (``procrustes[OUTPUT,mom]``): moments used, bootstrap replicates that
#: estimate their covariance, points of the grid on which the polynomial's error is bounded
MOM_MOMENTS = 4
MOM_BOOTSTRAPS = 50
MOM_GRID = 200
CKA_KERNELS = ("linear", "rbf")
CKA_ESTIMATORS = ("biased", "debiased")


# ----------------------------------------------------------------------------------------------------------------
# numerical helpers
# ----------------------------------------------------------------------------------------------------------------

def _eps(t: torch.Tensor) -> float:
    return torch.finfo(t.dtype).eps


def _refine_below(t: torch.Tensor) -> float:
    """Squared values below this have lost more than half their digits to cancellation: recompute them."""
    return 100.0 * math.sqrt(_eps(t))


def _clamp_rounding(value: torch.Tensor, lo: float, hi: float, tol: float, what: str) -> torch.Tensor:
    """Clamp ``value`` into [lo, hi], but only silently when it is outside by at most ``tol`` (rounding).

    A larger excursion means the computation broke down; it is clamped with a RuntimeWarning naming it.
    """
    v = float(value)
    if v < lo - tol or v > hi + tol:
        warnings.warn(
            f"{what} = {v!r} lies outside [{lo}, {hi}] by more than rounding ({tol:.1e}); clamped",
            RuntimeWarning,
            stacklevel=3,
        )
    return value.clamp(lo, hi)


def _dual_is_cheaper(n: int, p: int, q: int) -> bool:
    """Flop count of n × n Gram work, n²(p + q), against p × q cross-products, n(p² + q² + pq)."""
    return n * (p + q) + 2 * n <= p * p + q * q + p * q


def _narrow(A: torch.Tensor) -> torch.Tensor:
    """An n × min(n, width) matrix with the same Gram matrix AAᵀ and the same paired rows.

    A side wider than it is long is replaced by Rᵀ from the thin QR factorisation Aᵀ = QR (so A = RᵀQᵀ and
    AAᵀ = RᵀR); this is an orthogonal change of feature basis restricted to A's row space, which no metric here
    can see, and it avoids squaring the condition number as forming AAᵀ would.
    """
    n, width = A.shape
    if width <= n:
        return A
    return torch.linalg.qr(A.T, mode="reduced").R.T


def _prepare_pair(
    X: ArrayLike, Y: ArrayLike, center: bool, dtype: torch.dtype, min_rows: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    Xt, Yt = as_pair(X, Y, min_rows=min_rows, dtype=dtype)
    return prepare(Xt, center, "X (teacher)"), prepare(Yt, center, "Y (student)")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _check_nonnegative(name: str, value: Any, strictly: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{name} must be a number, got {value!r}") from exc
    if not math.isfinite(v) or v < 0 or (strictly and v == 0):
        raise UserError(f"{name} must be a finite number {'>' if strictly else '≥'} 0, got {value!r}")
    return v


# ----------------------------------------------------------------------------------------------------------------
# Procrustes
# ----------------------------------------------------------------------------------------------------------------

def _procrustes_squared(Xt: torch.Tensor, Yt: torch.Tensor) -> torch.Tensor:
    """min over orthogonal Q of ‖X̃ − [Ỹ, 0]Q‖²_F = 2 − 2‖X̃ᵀỸ‖_* for unit-norm X̃, Ỹ.

    The nuclear norm ρ comes from the singular values of the (narrowed) cross-product. When 2 − 2ρ is small
    (nearly identical inputs) it is recomputed from the residual itself with the optimal Q = UVᵀ, which keeps
    its relative accuracy instead of the ~1e-16 absolute error of 2 − 2ρ.
    """
    Xn, Yn = _narrow(Xt), _narrow(Yt)
    rho = torch.linalg.svdvals(Xn.T @ Yn).sum()
    norms = Xt.square().sum() + Yt.square().sum()  # ‖X̃‖² + ‖Ỹ‖² = 2 up to rounding
    squared = norms - 2 * rho
    if float(squared) < _refine_below(squared) * float(norms):
        squared = _procrustes_squared_direct(Xn, Yn)
    tol = 100.0 * min(Xn.shape[1], Yn.shape[1]) * _eps(squared) * float(norms)
    return _clamp_rounding(squared, 0.0, float(norms), tol, "squared Procrustes distance 2 − 2ρ")


def _procrustes_squared_direct(Xn: torch.Tensor, Yn: torch.Tensor) -> torch.Tensor:
    """‖A − BQ‖² + ‖B − BQQᵀ‖² with B the wider side, Q = UVᵀ from BᵀA = USVᵀ (Q has orthonormal columns).

    Padding A with zeros to B's width and rotating B by the orthogonal completion [Q, Q⊥] gives
    ‖[A, 0] − B[Q, Q⊥]‖² = ‖A − BQ‖² + ‖BQ⊥‖², and ‖BQ⊥‖ = ‖B(I − QQᵀ)‖; both terms are residuals, so no
    digits cancel.
    """
    A, B = (Xn, Yn) if Yn.shape[1] >= Xn.shape[1] else (Yn, Xn)
    U, _, Vh = torch.linalg.svd(B.T @ A, full_matrices=False)
    Q = U @ Vh
    BQ = B @ Q
    return (A - BQ).square().sum() + (B - BQ @ Q.T).square().sum()


def _cross_moment_estimates(K: torch.Tensor, L: torch.Tensor, moments: int) -> torch.Tensor:
    """U-statistics m̂_k of tr((Σ_xy Σ_yx)^k), k = 1 … ``moments``, from the n × n Grams K = AAᵀ, L = BBᵀ of rows
    treated as independent draws (Kong & Valiant 2017's increasing-path trick, as used by Pospisil et al. 2024).

    With K₊, L₊ the strict upper triangles, tr((K₊L₊)^{k−1} K₊ L) sums (a_{i1}ᵀa_{i2})(b_{i2}ᵀb_{i3})…(b_{i2k}ᵀb_{i1})
    over increasing index paths i1 < … < i2k: every term has 2k distinct rows and expectation tr((Σ_xy Σ_yx)^k), so
    dividing by their number C(n, 2k) gives an unbiased estimate (for zero-mean rows). The paths starting with K
    and those starting with L give two such estimates; their mean is returned, which makes the estimate symmetric in
    the two sides."""
    n = K.shape[0]
    Ku, Lu = torch.triu(K, 1), torch.triu(L, 1)
    total = torch.zeros(moments, dtype=K.dtype, device=K.device)
    for first, second, full in ((Ku, Lu, L), (Lu, Ku, K)):
        G0, G = first @ second, first @ full
        total[0] += torch.trace(G) / math.comb(n, 2)
        for k in range(2, moments + 1):
            G = G0 @ G
            total[k - 1] += torch.trace(G) / math.comb(n, 2 * k)
    return total / 2


def _mom_weights(cov: np.ndarray, rank: int, grid: int = MOM_GRID) -> tuple[np.ndarray, float]:
    """Coefficients γ of p(λ) = Σ_k γ_k λ^k ≈ √λ on [0, 1] and its largest error t on the grid, minimising
    γᵀ C γ + (rank·t)², the estimated variance of Σ_k γ_k m̂_k (C: covariance of the moment estimates) plus the square
    of the worst-case bias rank·t of a sum of √λ over ``rank`` eigenvalues (Pospisil et al.'s trade-off at α = 1).
    Solved by SLSQP on the K + 1 unknowns (γ, t) with the 2·grid linear constraints |p(x) − √x| ≤ t."""
    from scipy.optimize import minimize

    moments = cov.shape[0]
    x = np.linspace(0.0, 1.0, grid)
    V = np.stack([x ** k for k in range(1, moments + 1)], axis=1)
    root = np.sqrt(x)
    start, *_ = np.linalg.lstsq(V, root, rcond=None)
    z0 = np.append(start, np.abs(V @ start - root).max())
    r2 = float(rank) ** 2

    def objective(z):
        return float(z[:-1] @ cov @ z[:-1] + r2 * z[-1] ** 2)

    def gradient(z):
        return np.append(2 * cov @ z[:-1], 2 * r2 * z[-1])

    ones = np.ones((grid, 1))
    above, below = np.hstack([-V, ones]), np.hstack([V, ones])
    constraints = [{"type": "ineq", "fun": lambda z: z[-1] - (V @ z[:-1] - root), "jac": lambda z: above},
                   {"type": "ineq", "fun": lambda z: z[-1] + (V @ z[:-1] - root), "jac": lambda z: below}]
    res = minimize(objective, z0, jac=gradient, constraints=constraints, method="SLSQP",
                   options={"maxiter": 1000, "ftol": 1e-14})
    z = res.x if res.success else z0
    return z[:-1], float(z[-1])


def _procrustes_rho_mom(Xt: torch.Tensor, Yt: torch.Tensor, moments: int = MOM_MOMENTS,
                        bootstraps: int = MOM_BOOTSTRAPS, seed: int = 0) -> torch.Tensor:
    """Pospisil, Larsen, Harvey & Williams (ICLR 2024)'s method-of-moments estimate of ρ = ‖Σ_xy‖_*/√(tr Σ_xx tr Σ_yy)
    from centred, unit-Frobenius X̃ (n × p), Ỹ (n × q); see :func:`procrustes` (``estimator="mom"``).

    Rows are rescaled so the sample cross-covariance's top singular value is 1 (its eigenvalues λ = σ² then lie in
    about [0, 1]); ‖Σ_xy‖_* = Σ √λ_i is estimated as Σ_k γ_k m̂_k with the unbiased moments m̂_k
    (:func:`_cross_moment_estimates`) and the polynomial weights γ of :func:`_mom_weights`, whose variance term uses
    the covariance of m̂ over ``bootstraps`` seeded resamples of the rows. In those units the denominator is 1/s₁."""
    n = Xt.shape[0]
    if n < 2 * moments:
        raise UserError(f"the moment estimator with moments={moments} needs at least {2 * moments} samples, got {n}")
    s1 = torch.linalg.matrix_norm(_narrow(Xt).T @ _narrow(Yt), ord=2)
    if not float(s1) > 0:
        return Xt.new_zeros(())
    K = (Xt @ Xt.T) * (n / s1)
    L = (Yt @ Yt.T) * (n / s1)
    estimate = _cross_moment_estimates(K, L, moments)
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(bootstraps):
        idx = torch.as_tensor(rng.integers(0, n, n), device=K.device)
        reps.append(_cross_moment_estimates(K[idx][:, idx], L[idx][:, idx], moments))
    cov = np.atleast_2d(np.cov(torch.stack(reps).cpu().numpy().T)) if bootstraps > 1 else np.zeros((moments, moments))
    gamma, _ = _mom_weights(cov, min(Xt.shape[1], Yt.shape[1]))
    nuclear = estimate @ torch.as_tensor(gamma, dtype=estimate.dtype, device=estimate.device)
    return (nuclear * s1).clamp(0.0, 1.0)


def procrustes(
    X: ArrayLike, Y: ArrayLike, output: str = "distance", center: bool = True, *, estimator: str = "plugin",
    moments: int = MOM_MOMENTS, dtype: torch.dtype = torch.float64
) -> float | torch.Tensor:
    """Procrustes shape distance between teacher ``X`` (n × p) and student ``Y`` (n × q).

    With X̃, Ỹ centred and unit-Frobenius, ρ = ‖X̃ᵀỸ‖_* (nuclear norm, in [0, 1]) and

    - ``output="distance"``: √(2 − 2ρ) = min over orthogonal Q of ‖X̃ − [Ỹ, 0]Q‖_F, in [0, √2];
    - ``output="angular"``: arccos ρ in radians, in [0, π/2] (Williams et al. 2021), computed as 2·arcsin(d/2)
      from the distance d, which is the same angle without arccos' loss of precision near ρ = 1;
    - ``output="squared"``: 2 − 2ρ, in [0, 2].

    Lower is more similar; 0 iff Ỹ is an orthogonal transform of X̃ (up to zero padding when p ≠ q).
    Symmetric; invariant to translation, isotropic scaling and orthogonal maps of either side.

    ``estimator="plugin"`` (default) is the value of the sample itself. It estimates the population
    ρ = ‖Σ_xy‖_*/√(tr Σ_xx tr Σ_yy) with an upward bias at small n (sampling noise adds singular values: two
    unrelated isotropic r-wide layers give ρ ≈ 0.85·√(r/n)). ``estimator="mom"`` is the method-of-moments estimator
    of Pospisil, Larsen, Harvey & Williams (ICLR 2024): unbiased U-statistics of tr((Σ_xy Σ_yx)^k), k ≤ ``moments``,
    combined by a polynomial p(λ) ≈ √λ chosen to trade the estimate's variance (bootstrap) against its worst-case
    bias min(p, q)·max|p − √·|; ρ is clipped to [0, 1]. Its bias is small when the cross-covariance has few strong
    directions, and it leans low when many weak ones carry the total (the polynomial misses √λ near 0); it is
    noisier than the plug-in, costs O(2·(moments + 1)·(bootstraps + 1)·n³), and centring the rows is an O(1/n)
    approximation (the U-statistics treat the centred rows as independent).
    """
    _check_choice("output", output, PROCRUSTES_OUTPUTS)
    _check_choice("estimator", estimator, PROCRUSTES_ESTIMATORS)
    Xt, Yt = _prepare_pair(X, Y, center, dtype)
    if estimator == "mom":
        if isinstance(moments, bool) or not isinstance(moments, (int, np.integer)) or moments < 1:
            raise UserError(f"moments must be an integer ≥ 1, got {moments!r}")
        squared = 2 - 2 * _procrustes_rho_mom(Xt, Yt, int(moments))
    else:
        squared = _procrustes_squared(Xt, Yt)
    if output == "squared":
        value = squared
    elif output == "distance":
        value = squared.sqrt()
    else:
        value = 2 * torch.asin((squared.sqrt() / 2).clamp(max=1.0))
    return to_output(value, X)


# ----------------------------------------------------------------------------------------------------------------
# Gram-Frobenius
# ----------------------------------------------------------------------------------------------------------------

def _gram_frobenius_squared(Xt: torch.Tensor, Yt: torch.Tensor) -> torch.Tensor:
    """‖X̃X̃ᵀ − ỸỸᵀ‖²_F, never forming an n × n matrix when n exceeds p + q.

    Primal form ‖X̃ᵀX̃‖² + ‖ỸᵀỸ‖² − 2‖X̃ᵀỸ‖²; if that has cancelled to below √eps of its terms, it is recomputed
    from Z = [X̃, Ỹ] = QR as ‖R₁R₁ᵀ − R₂R₂ᵀ‖² (R₁, R₂ the column blocks of R), a difference of matrices whose
    entries carry only ~eps absolute error.
    """
    n, p = Xt.shape
    q = Yt.shape[1]
    if _dual_is_cheaper(n, p, q):
        return (Xt @ Xt.T - Yt @ Yt.T).square().sum()
    terms = (Xt.T @ Xt).square().sum() + (Yt.T @ Yt).square().sum()
    squared = terms - 2 * (Xt.T @ Yt).square().sum()
    if float(squared) < _refine_below(squared) * float(terms):
        R = torch.linalg.qr(torch.cat([Xt, Yt], dim=1), mode="r").R
        R1, R2 = R[:, :p], R[:, p:]
        return (R1 @ R1.T - R2 @ R2.T).square().sum()
    return _clamp_rounding(squared, 0.0, float(terms), 100.0 * (p + q) * _eps(squared) * float(terms),
                           "squared Gram-Frobenius distance")


def gram_frobenius(
    X: ArrayLike, Y: ArrayLike, squared: bool = False, center: bool = True, *, dtype: torch.dtype = torch.float64
) -> float | torch.Tensor:
    """Distance between the normalised Gram matrices: ‖X̃X̃ᵀ − ỸỸᵀ‖_F in [0, √2] (``squared=True``: its square).

    Lower is more similar; 0 iff Ỹ is an orthogonal transform of X̃ (up to zero padding). Symmetric; invariant to
    translation, isotropic scaling and orthogonal maps of either side; never exceeds 2 × the Procrustes distance.
    """
    Xt, Yt = _prepare_pair(X, Y, center, dtype)
    value = _gram_frobenius_squared(Xt, Yt)
    return to_output(value if squared else value.sqrt(), X)


# ----------------------------------------------------------------------------------------------------------------
# CKA
# ----------------------------------------------------------------------------------------------------------------

def _center_gram(K: torch.Tensor) -> torch.Tensor:
    """HKH with H = I − 11ᵀ/n (double centring)."""
    return K - K.mean(dim=0, keepdim=True) - K.mean(dim=1, keepdim=True) + K.mean()


def _u_center_gram(K: torch.Tensor) -> torch.Tensor:
    """U-centring (Székely & Rizzo): ⟨Ũ(K), Ũ(L)⟩ / (n(n − 3)) is Song et al.'s unbiased HSIC.

    Zero the diagonal, subtract row and column sums / (n − 2), add the total / ((n − 1)(n − 2)), zero the
    diagonal again (Kornblith et al.'s ``center_gram(unbiased=True)``).
    """
    n = K.shape[0]
    K = K.clone()
    K.fill_diagonal_(0)
    means = K.sum(dim=0) / (n - 2)
    means = means - means.sum() / (2 * (n - 1))
    K = K - means[:, None] - means[None, :]
    K.fill_diagonal_(0)
    return K


def _u_centred_checked(K: torch.Tensor, side: str) -> torch.Tensor:
    """U(K), refusing a self-HSIC ‖U(K)‖²_F that is 0 up to rounding (repsim.measures.arrays.check_self_hsic), judged
    against K's terms ‖K‖²_F, ‖K̃1‖², (1ᵀK̃1)² (K̃ = K with a zero diagonal)."""
    n = K.shape[0]
    off_rows = K.sum(dim=1) - torch.diagonal(K)
    magnitude = self_hsic_magnitude(K.square().sum(), off_rows.square().sum(), off_rows.sum().square(), n)
    U = _u_center_gram(K)
    check_self_hsic(U.square().sum(), magnitude, n, K.dtype, side)
    return U


def _cka_from_grams(K: torch.Tensor, L: torch.Tensor, estimator: str, centred: bool) -> torch.Tensor:
    if estimator == "debiased":
        K, L = _u_centred_checked(K, "X (teacher)"), _u_centred_checked(L, "Y (student)")
    elif not centred:
        K, L = _center_gram(K), _center_gram(L)
    return _cka_ratio((K * L).sum(), K.square().sum(), L.square().sum())


def _cka_ratio(hsic_xy: torch.Tensor, hsic_xx: torch.Tensor, hsic_yy: torch.Tensor) -> torch.Tensor:
    for value, side in ((hsic_xx, "X (teacher)"), (hsic_yy, "Y (student)")):
        if not float(value) > 0:
            raise UserError(f"the HSIC of {side} with itself is {float(value):.3g} (not positive): CKA is undefined")
    return hsic_xy / (hsic_xx.sqrt() * hsic_yy.sqrt())


def _linear_cka_primal(Xt: torch.Tensor, Yt: torch.Tensor, estimator: str) -> torch.Tensor:
    """Linear CKA from p × q cross-products (Kornblith et al.'s ``feature_space_linear_cka``).

    Biased: ‖X̃ᵀỸ‖² / (‖X̃ᵀX̃‖ ‖ỸᵀỸ‖). Debiased (needs centred columns): each ‖AᵀB‖² becomes
    ‖AᵀB‖² − n/(n − 2)·Σᵢ‖aᵢ‖²‖bᵢ‖² + ‖A‖²‖B‖²/((n − 1)(n − 2)), which is n(n − 3) × Song's unbiased HSIC.
    """
    xy = (Xt.T @ Yt).square().sum()
    xx = (Xt.T @ Xt).square().sum()
    yy = (Yt.T @ Yt).square().sum()
    if estimator == "debiased":
        n = Xt.shape[0]
        rx, ry = Xt.square().sum(dim=1), Yt.square().sum(dim=1)
        sx, sy = rx.sum(), ry.sum()

        xy = xy - n / (n - 2) * (rx @ ry) + sx * sy / ((n - 1) * (n - 2))
        xx, mx = debiased_self_hsic(xx, rx @ rx, sx * sx, n)
        yy, my = debiased_self_hsic(yy, ry @ ry, sy * sy, n)
        check_self_hsic(xx, mx, n, Xt.dtype, "X (teacher)")
        check_self_hsic(yy, my, n, Yt.dtype, "Y (student)")
    return _cka_ratio(xy, xx, yy)


def _median(values: torch.Tensor) -> torch.Tensor:
    """numpy's median: the middle value, or the mean of the two middle values for an even count."""
    flat = values.reshape(-1)
    count = flat.numel()
    upper = torch.kthvalue(flat, count // 2 + 1).values
    if count % 2:
        return upper
    return (torch.kthvalue(flat, count // 2).values + upper) / 2


def _rbf_gram(A: torch.Tensor, sigma: float, side: str) -> torch.Tensor:
    """exp(−d²ᵢⱼ / (2σ²m)), m = median of all n² squared distances, diagonal included (Kornblith's gram_rbf).

    Squared distances come from the Gram matrix, ‖aᵢ‖² + ‖aⱼ‖² − 2aᵢᵀaⱼ; negative results are clamped to 0 only
    when they are at rounding level relative to ‖aᵢ‖² + ‖aⱼ‖² (otherwise a RuntimeWarning names them).
    """
    G = A @ A.T
    sq_norms = torch.diagonal(G)
    scale = sq_norms[:, None] + sq_norms[None, :]
    D = scale - 2 * G
    D.fill_diagonal_(0)
    worst = float((-D / scale.clamp(min=torch.finfo(D.dtype).tiny)).max())
    tol = 100.0 * _eps(D)
    if worst > tol:
        warnings.warn(f"squared distances of {side} negative beyond rounding (relative {worst:.2e}); clamped to 0",
                      RuntimeWarning, stacklevel=4)
    D = D.clamp(min=0)
    m = _median(D)
    if not float(m) > 0:
        raise UserError(f"the median squared distance between rows of {side} is 0 (more than half the pairs of rows "
                        "coincide): the RBF bandwidth is undefined")
    # c = 1/(2σ²m) without forming σ² (which over- or underflows for σ near the ends of the float range)
    c = min(1.0 / (2.0 * float(m)) / sigma / sigma, 1e300)
    # K − 1 = expm1(−cD) instead of K: centring (and U-centring) removes constants, so CKA is unchanged, and the
    # part that matters keeps its relative accuracy when cD is small (exp would round it against the 1). Once
    # cD < 1e-100, expm1(−cD)/c = −D + cD²/2 − … is −D to every digit (CKA removes the scale c): linear CKA, the
    # σ → ∞ limit, without underflow.
    if c * float(D.max()) < 1e-100:
        return -D
    return torch.expm1(-c * D)


def cka(
    X: ArrayLike,
    Y: ArrayLike,
    kernel: str = "linear",
    estimator: str = "biased",
    sigma: float = 1.0,
    center: bool = True,
    *,
    dtype: torch.dtype = torch.float64,
) -> float | torch.Tensor:
    """Centered kernel alignment (Kornblith et al. 2019): HSIC(K, L) / √(HSIC(K, K)·HSIC(L, L)).

    - ``kernel="linear"``: K = X̃X̃ᵀ, L = ỸỸᵀ. ``estimator="biased"``: HSIC = tr(KHLH) (Gretton), CKA in [0, 1].
      ``center=False`` skips the column centring, which turns it into uncentred kernel alignment
      ⟨K, L⟩/(‖K‖‖L‖).
    - ``estimator="debiased"``: Song et al. (2012)'s unbiased U-statistic HSIC, computed as Kornblith's
      ``debiased=True`` (U-centred Gram matrices); in [−1, 1]; needs n ≥ 4. The U-statistic is translation
      invariant, so ``center`` does not change it.
    - ``kernel="rbf"``: K = exp(−d²/(2·sigma²·m)) with m the median of the full n × n matrix of squared distances
      (diagonal included, numpy median), Kornblith's convention; K is always double-centred (HSIC's H), and
      distances are translation invariant, so ``center`` does not change it. Any finite sigma > 0: for very
      large sigma K − 1 = expm1(·) keeps the digits exp would round away (centring removes the constant), reaching
      linear CKA (the σ → ∞ limit); for very small sigma K is the identity on distinct rows.

    Higher is more similar; symmetric; invariant to translation, isotropic scaling and orthogonal maps, not to
    general invertible linear maps.
    """
    _check_choice("kernel", kernel, CKA_KERNELS)
    _check_choice("estimator", estimator, CKA_ESTIMATORS)
    sigma = _check_nonnegative("sigma", sigma, strictly=True)
    debiased = estimator == "debiased"
    # the debiased estimator is translation invariant: centring is exact there and keeps its primal form valid
    Xt, Yt = _prepare_pair(X, Y, center or debiased, dtype, min_rows=4 if debiased else 2)
    if kernel == "rbf":
        value = _cka_from_grams(_rbf_gram(Xt, sigma, "X (teacher)"), _rbf_gram(Yt, sigma, "Y (student)"),
                                estimator, centred=False)
    elif _dual_is_cheaper(*Xt.shape, Yt.shape[1]):
        value = _cka_from_grams(Xt @ Xt.T, Yt @ Yt.T, estimator, centred=True)
    else:
        value = _linear_cka_primal(Xt, Yt, estimator)
    return to_output(value, X)


# ----------------------------------------------------------------------------------------------------------------
# projection residual
# ----------------------------------------------------------------------------------------------------------------

def fold_assignment(n: int, folds: int, seed: int = 0) -> np.ndarray:
    """Fold index (0 … folds−1) of each of n rows: a seeded random permutation cut into ``folds`` nearly equal parts.

    ``np.random.default_rng(seed).permutation(n)`` split by ``np.array_split``; fold sizes differ by at most 1.
    Streaming code that must reproduce :func:`projection_residual`'s folds calls this.
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


def _least_squares(B: torch.Tensor, A: torch.Tensor, ridge: float) -> torch.Tensor:
    """The (ridge) least-squares map Ŵ fitting A ≈ BŴ: Ŵ = V diag(g) UᵀA from the thin SVD B = USVᵀ.

    ridge = 0: g = 1/s on singular values above numpy's lstsq cutoff eps·max(rows, cols)·s_max, 0 below (the
    minimum-norm solution, valid for rank-deficient B and n < width). ridge = λ > 0: g = s/(s² + λ), the minimiser
    of ‖A − BW‖² + λ‖W‖². SVD rather than normal equations, so cond(B) is not squared, and it runs on any device.
    """
    U, s, Vh = torch.linalg.svd(B, full_matrices=False)
    if ridge > 0:
        gain = s / (s.square() + ridge)
    else:
        cutoff = _eps(s) * max(B.shape) * s.max()
        gain = torch.where(s > cutoff, 1 / s.clamp(min=torch.finfo(s.dtype).tiny), torch.zeros_like(s))
    return Vh.T @ (gain[:, None] * (U.T @ A))


def projection_residual(
    X: ArrayLike,
    Y: ArrayLike,
    ridge: float = 0.0,
    folds: int | None = None,
    seed: int = 0,
    center: bool = True,
    *,
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
    """
    ridge = _check_nonnegative("ridge", ridge)
    Xt, Yt = _prepare_pair(X, Y, center, dtype)
    n = Xt.shape[0]
    if folds is None:
        value = (Xt - Yt @ _least_squares(Yt, Xt, ridge)).square().sum()
        return to_output(value, X)
    fold_of_row = torch.as_tensor(fold_assignment(n, folds, seed), device=Xt.device)
    value = Xt.new_zeros(())
    for fold in range(int(folds)):
        test = fold_of_row == fold
        X_train, Y_train, X_test, Y_test = Xt[~test], Yt[~test], Xt[test], Yt[test]
        if center:
            mean_x, mean_y = X_train.mean(dim=0), Y_train.mean(dim=0)
            X_train, Y_train, X_test, Y_test = X_train - mean_x, Y_train - mean_y, X_test - mean_x, Y_test - mean_y
        value = value + (X_test - Y_test @ _least_squares(Y_train, X_train, ridge)).square().sum()
    return to_output(value, X)


# ----------------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------------

#: transformations a metric may be invariant to, each applied to one side at a time
TRANSFORMS = ("translation", "isotropic_scale", "orthogonal", "permutation", "invertible_linear")

_SHAPE = frozenset({"translation", "isotropic_scale", "orthogonal", "permutation"})

#: the declarative invariance table: family → transformations that leave the value unchanged when applied to
#: either side (one side at a time). Every other transformation of TRANSFORMS changes the value in general.
INVARIANCES: Mapping[str, frozenset[str]] = MappingProxyType({
    "procrustes": _SHAPE,
    "gram_frobenius": _SHAPE,
    "cka": _SHAPE,
    "projection_residual": _SHAPE,
})


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "procrustes": procrustes,
    "gram_frobenius": gram_frobenius,
    "cka": cka,
    "projection_residual": projection_residual,
}


@dataclass(frozen=True)
class MetricSpec:
    """One metric with its convention: ``spec(X, Y)`` computes it (teacher X, student Y)."""

    id: str
    family: str
    kwargs: Mapping[str, Any]
    direction: str  # "lower" or "higher" is more similar
    range: tuple[float, float]
    invariances: frozenset[str]
    symmetric: bool
    linear: bool  # linear kernel: exactly computable by repsim.measures.moments from (per-fold) second moments
    label: str  # for plot colour bars
    #: further invariances when only the student Y is transformed: the unregularised projection residual sees only
    #: the student's column space, so any invertible linear map of the student is invisible (its blind spot)
    student_invariances: frozenset[str] = frozenset()

    def __call__(self, X: ArrayLike, Y: ArrayLike) -> float | torch.Tensor:
        return _FUNCTIONS[self.family](X, Y, **self.kwargs)

    def __hash__(self) -> int:
        return hash(self.id)


def _g(x: float) -> str:
    return f"{x:g}"


def _make(family: str, **kwargs: Any) -> MetricSpec:
    """Build the spec (canonical id, direction, range, label) for one family and its convention arguments."""
    inv = INVARIANCES[family]
    if family == "procrustes":
        out = kwargs["output"]
        ranges = {"distance": (0.0, math.sqrt(2)), "angular": (0.0, math.pi / 2), "squared": (0.0, 2.0)}
        labels = {"distance": "Procrustes distance √(2−2ρ)", "angular": "Procrustes angle arccos ρ (radians)",
                  "squared": "Procrustes squared distance 2−2ρ"}
        if kwargs.get("estimator", "plugin") == "mom":
            k = int(kwargs.get("moments", MOM_MOMENTS))
            cid = f"procrustes[{out},mom]" if k == MOM_MOMENTS else f"procrustes[{out},mom,moments={k}]"
            return MetricSpec(cid, family, {"output": out, "estimator": "mom", "moments": k}, "lower", ranges[out],
                              inv, True, False, f"{labels[out]}, ρ by moments (k≤{k}) (lower = more similar)")
        return MetricSpec(f"procrustes[{out}]", family, {"output": out}, "lower", ranges[out], inv, True, True,
                          f"{labels[out]} (lower = more similar)")
    if family == "gram_frobenius":
        sq = kwargs["squared"]
        return MetricSpec("gram_frobenius[squared]" if sq else "gram_frobenius", family, {"squared": sq}, "lower",
                          (0.0, 2.0 if sq else math.sqrt(2)), inv, True, True,
                          f"Gram-Frobenius ‖K̃−L̃‖{'²' if sq else ''}_F (lower = more similar)")
    if family == "cka":
        kernel, estimator, sigma = kwargs["kernel"], kwargs["estimator"], float(kwargs.get("sigma", 1.0))
        if kernel == "linear":
            cid, args, what = f"cka[linear,{estimator}]", {"kernel": kernel, "estimator": estimator}, "linear CKA"
        else:
            suffix = ",debiased" if estimator == "debiased" else ""
            cid = f"cka[rbf,sigma={_g(sigma)}{suffix}]"
            args = {"kernel": kernel, "estimator": estimator, "sigma": sigma}
            what = f"RBF CKA, σ={_g(sigma)}·median"
        what += ", debiased (Song U-statistic)" if estimator == "debiased" else ", biased"
        return MetricSpec(cid, family, args, "higher", (-1.0, 1.0) if estimator == "debiased" else (0.0, 1.0), inv,
                          True, kernel == "linear", f"{what} (higher = more similar)")
    if family == "projection_residual":
        folds, ridge = kwargs.get("folds"), float(kwargs.get("ridge", 0.0))
        parts = ["in_sample" if folds is None else f"folds={folds}"] + ([f"ridge={_g(ridge)}"] if ridge else [])
        args: dict[str, Any] = {"folds": folds, "ridge": ridge}
        where = "in-sample" if folds is None else f"{folds}-fold held-out"
        return MetricSpec(f"projection_residual[{','.join(parts)}]", family, args, "lower",
                          (0.0, 1.0) if folds is None else (0.0, math.inf), inv, False, True,
                          f"projection residual 1−R², {where} (lower = more similar)",
                          frozenset() if ridge else frozenset({"invertible_linear"}))
    raise UserError(f"unknown metric family {family!r}")


_ALIASES = {
    "procrustes": "procrustes[distance]",
    "angular": "procrustes[angular]",
    "cka": "cka[linear,biased]",
    "cka[debiased]": "cka[linear,debiased]",
    "projection_residual": "projection_residual[folds=5]",
}

_ID_PATTERN = re.compile(r"^(?P<family>[a-z_]+)(?:\[(?P<args>[^\[\]]*)\])?$")


def _number(token: str, key: str, spec: str) -> float:
    try:
        return float(token)
    except ValueError:
        raise UserError(f"metric {spec!r}: {key} must be a number, got {token!r}") from None


def _parse(spec: str) -> MetricSpec:
    text = re.sub(r"\s+", "", spec).lower()
    text = _ALIASES.get(text, text)
    match = _ID_PATTERN.match(text)
    family = match["family"] if match else None
    if family not in _FUNCTIONS:
        raise UserError(f"unknown metric {spec!r}; known: {', '.join(sorted(set(METRICS) | set(_ALIASES)))}")
    tokens = [t for t in (match["args"] or "").split(",") if t]
    flags = [t for t in tokens if "=" not in t]
    options = dict(t.split("=", 1) for t in tokens if "=" in t)

    def bad(why: str) -> UserError:
        return UserError(f"metric {spec!r}: {why}")

    if family == "procrustes":
        outputs = [f for f in flags if f in PROCRUSTES_OUTPUTS]
        estimators = [f for f in flags if f in PROCRUSTES_ESTIMATORS]
        if len(outputs) > 1 or len(estimators) > 1 or len(outputs) + len(estimators) != len(flags) \
                or set(options) - {"moments"} or ("moments" in options and estimators != ["mom"]):
            raise bad(f"expected procrustes[OUTPUT] or procrustes[OUTPUT,mom,moments=K] with OUTPUT one of "
                      f"{', '.join(PROCRUSTES_OUTPUTS)}")
        output = outputs[0] if outputs else "distance"
        if estimators != ["mom"]:
            return _make(family, output=output)
        moments = options.get("moments", str(MOM_MOMENTS))
        if not moments.isdigit() or int(moments) < 1:
            raise bad(f"moments must be an integer ≥ 1, got {moments!r}")
        return _make(family, output=output, estimator="mom", moments=int(moments))
    if family == "gram_frobenius":
        if options or flags not in ([], ["squared"]):
            raise bad("expected gram_frobenius or gram_frobenius[squared]")
        return _make(family, squared=bool(flags))
    if family == "cka":
        kernels = [f for f in flags if f in CKA_KERNELS]
        estimators = [f for f in flags if f in CKA_ESTIMATORS]
        if len(kernels) > 1 or len(estimators) > 1 or len(kernels) + len(estimators) != len(flags) \
                or set(options) - {"sigma"}:
            raise bad("expected cka[KERNEL,ESTIMATOR,sigma=S] with KERNEL linear|rbf, ESTIMATOR biased|debiased")
        kernel = kernels[0] if kernels else ("rbf" if "sigma" in options else "linear")
        if kernel == "linear" and "sigma" in options:
            raise bad("sigma applies to the rbf kernel only")
        sigma = _number(options.get("sigma", "1"), "sigma", spec)
        if not (math.isfinite(sigma) and sigma > 0):
            raise bad(f"sigma must be > 0, got {sigma:g}")
        return _make(family, kernel=kernel, estimator=estimators[0] if estimators else "biased", sigma=sigma)
    # projection_residual
    if set(options) - {"folds", "ridge"} or [f for f in flags if f != "in_sample"] or \
            (flags and "folds" in options) or not (flags or "folds" in options):
        raise bad("expected projection_residual[in_sample] or projection_residual[folds=K] (optionally ,ridge=R)")
    folds = None
    if "folds" in options:
        if not options["folds"].isdigit() or int(options["folds"]) < 2:
            raise bad(f"folds must be an integer ≥ 2, got {options['folds']!r}")
        folds = int(options["folds"])
    ridge = _number(options.get("ridge", "0"), "ridge", spec)
    if not (math.isfinite(ridge) and ridge >= 0):
        raise bad(f"ridge must be ≥ 0, got {ridge:g}")
    return _make(family, folds=folds, ridge=ridge)


METRICS: dict[str, MetricSpec] = {
    s.id: s
    for s in (
        _make("procrustes", output="distance"),
        _make("procrustes", output="angular"),
        _make("procrustes", output="squared"),
        _make("gram_frobenius", squared=False),
        _make("gram_frobenius", squared=True),
        _make("cka", kernel="linear", estimator="biased"),
        _make("cka", kernel="linear", estimator="debiased"),
        _make("cka", kernel="rbf", estimator="biased", sigma=1.0),
        _make("projection_residual", folds=None),
        _make("projection_residual", folds=5),
    )
}

DEFAULT_METRICS = ("procrustes[distance]", "gram_frobenius", "cka[linear,biased]", "projection_residual[folds=5]")


def get_metric(spec: str | MetricSpec) -> MetricSpec:
    """The :class:`MetricSpec` for a metric id, an alias (``procrustes``, ``cka``, ``angular``, ...) or a spec.

    Accepts every canonical id of :data:`METRICS` and parameterised forms such as ``cka[rbf,sigma=0.5]``,
    ``projection_residual[folds=10]`` or ``projection_residual[in_sample,ridge=0.01]``; raises
    :class:`~repsim.system.errors.UserError` naming an unknown id.
    """
    if isinstance(spec, MetricSpec):
        return spec
    if not isinstance(spec, str):
        raise UserError(f"a metric id must be a string, got {type(spec).__name__}")
    return _parse(spec)
