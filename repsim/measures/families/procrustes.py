"""Procrustes shape distance: √(2 − 2ρ), arccos ρ or 2 − 2ρ with ρ = ‖X̃ᵀỸ‖_* (plug-in or method of moments).

Ids: ``procrustes[OUTPUT]`` (plug-in ρ, a function of second moments) and ``procrustes[OUTPUT,mom]`` /
``procrustes[OUTPUT,mom,moments=K]`` (Pospisil et al.'s moment estimator, which needs the rows), OUTPUT one of
distance, angular, squared; aliases ``procrustes`` (distance) and ``angular``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize

from repsim.measures.arrays import ArrayLike, as_pair, prepare, to_output
from repsim.measures.linalg import clamp_rounding, eps, narrow, refine_below, safe_sqrt
from repsim.measures.registry import (
    SHAPE_INVARIANCES,
    Family,
    MetricSpec,
    PairMoments,
    check_choice,
    register,
)
from repsim.system.errors import UserError

OUTPUTS = ("distance", "angular", "squared")
ESTIMATORS = ("plugin", "mom")
#: defaults of the moment estimator of ρ (``procrustes[OUTPUT,mom]``): moments used, bootstrap replicates that
#: estimate their covariance, points of the grid on which the polynomial's error is bounded
MOM_MOMENTS = 4
MOM_BOOTSTRAPS = 50
MOM_GRID = 200
#: accuracy (absolute, on ρ) of an engine's batched nuclear norm at its default tolerance: rounding above this
#: in 2 − 2ρ is a breakdown (warned), not rounding
NUCLEAR_ACCURACY = 1e-9

_RANGES = {"distance": (0.0, math.sqrt(2)), "angular": (0.0, math.pi / 2), "squared": (0.0, 2.0)}
_LABELS = {"distance": "Procrustes distance √(2−2ρ)", "angular": "Procrustes angle arccos ρ (radians)",
           "squared": "Procrustes squared distance 2−2ρ"}


def residual_squared(Xn: torch.Tensor, Yn: torch.Tensor) -> torch.Tensor:
    """‖A − BQ‖² + ‖B − BQQᵀ‖² with B the wider side, Q = UVᵀ from BᵀA = USVᵀ (Q has orthonormal columns).

    Padding A with zeros to B's width and rotating B by the orthogonal completion [Q, Q⊥] gives
    ‖[A, 0] − B[Q, Q⊥]‖² = ‖A − BQ‖² + ‖BQ⊥‖², and ‖BQ⊥‖ = ‖B(I − QQᵀ)‖; both terms are residuals, so no
    digits cancel: the cancellation-free value of 2 − 2ρ for nearly identical inputs.
    """
    A, B = (Xn, Yn) if Yn.shape[1] >= Xn.shape[1] else (Yn, Xn)
    U, _, Vh = torch.linalg.svd(B.T @ A, full_matrices=False)
    Q = U @ Vh
    BQ = B @ Q
    return (A - BQ).square().sum() + (B - BQ @ Q.T).square().sum()


def cross_moment_estimates(K: torch.Tensor, L: torch.Tensor, moments: int) -> torch.Tensor:
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


def mom_weights(cov: np.ndarray, rank: int, grid: int = MOM_GRID) -> tuple[np.ndarray, float]:
    """Coefficients γ of p(λ) = Σ_k γ_k λ^k ≈ √λ on [0, 1] and its largest error t on the grid, minimising
    γᵀ C γ + (rank·t)², the estimated variance of Σ_k γ_k m̂_k (C: covariance of the moment estimates) plus the square
    of the worst-case bias rank·t of a sum of √λ over ``rank`` eigenvalues (Pospisil et al.'s trade-off at α = 1).
    Solved by SLSQP on the K + 1 unknowns (γ, t) with the 2·grid linear constraints |p(x) − √x| ≤ t."""
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


def rho_mom(Xt: torch.Tensor, Yt: torch.Tensor, moments: int = MOM_MOMENTS,
                        bootstraps: int = MOM_BOOTSTRAPS, seed: int = 0) -> torch.Tensor:
    """Pospisil, Larsen, Harvey & Williams (ICLR 2024)'s method-of-moments estimate of ρ = ‖Σ_xy‖_*/√(tr Σ_xx tr Σ_yy)
    from centred, unit-Frobenius X̃ (n × p), Ỹ (n × q); see :func:`procrustes` (``estimator="mom"``).

    Rows are rescaled so the sample cross-covariance's top singular value is 1 (its eigenvalues λ = σ² then lie in
    about [0, 1]); ‖Σ_xy‖_* = Σ √λ_i is estimated as Σ_k γ_k m̂_k with the unbiased moments m̂_k
    (:func:`cross_moment_estimates`) and the polynomial weights γ of :func:`mom_weights`, whose variance term uses
    the covariance of m̂ over ``bootstraps`` seeded resamples of the rows. In those units the denominator is 1/s₁."""
    n = Xt.shape[0]
    if n < 2 * moments:
        raise UserError(f"the moment estimator with moments={moments} needs at least {2 * moments} samples, got {n}")
    s1 = torch.linalg.matrix_norm(narrow(Xt).T @ narrow(Yt), ord=2)
    if not float(s1) > 0:
        return Xt.new_zeros(())
    K = (Xt @ Xt.T) * (n / s1)
    L = (Yt @ Yt.T) * (n / s1)
    estimate = cross_moment_estimates(K, L, moments)
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(bootstraps):
        idx = torch.as_tensor(rng.integers(0, n, n), device=K.device)
        reps.append(cross_moment_estimates(K[idx][:, idx], L[idx][:, idx], moments))
    cov = np.atleast_2d(np.cov(torch.stack(reps).cpu().numpy().T)) if bootstraps > 1 else np.zeros((moments, moments))
    gamma, _ = mom_weights(cov, min(Xt.shape[1], Yt.shape[1]))
    nuclear = estimate @ torch.as_tensor(gamma, dtype=estimate.dtype, device=estimate.device)
    return (nuclear * s1).clamp(0.0, 1.0)


def _output(squared: torch.Tensor, output: str) -> torch.Tensor:
    """The Procrustes output from 2 − 2ρ (in [0, 2]); "angular" as 2·arcsin(d/2), the angle arccos ρ without
    arccos' loss of precision near ρ = 1. Differentiable, with gradient 0 at distance 0."""
    if output == "squared":
        return squared
    distance = safe_sqrt(squared)
    if output == "distance":
        return distance
    if output == "angular":
        return 2 * torch.asin((distance / 2).clamp(max=1.0))
    if output == "rho":
        return 1 - squared / 2
    raise UserError(f"procrustes output must be one of {', '.join(OUTPUTS)}, got {output!r}")


def squared_from_moments(m: PairMoments) -> torch.Tensor:
    """2 − 2ρ from the pair moments, recomputed as :func:`residual_squared` from the rows where it is below
    ``refine_below``·2 (cancellation) and the engine holds the rows; batched over m's leading dimensions.

    Where gradients flow (the losses), the recomputed value replaces the fast one as a correction that carries no
    gradient: the gradient stays that of 2 − 2ρ (the polar factor), which is the residual's exact derivative;
    below (n·eps)² that gradient is rounding noise against √(value), and the value carries none (the minimum).
    """
    rho = m.nuclear_norm()
    single = m.pair_rows(()) if rho.ndim == 0 else None
    if single is not None:
        norms = single[0].square().sum() + single[1].square().sum()  # ‖X̃‖² + ‖Ỹ‖² = 2 up to rounding
    else:
        norms = torch.full_like(rho, 2.0)
    squared = norms - 2 * rho
    low = squared.detach() < refine_below(squared) * norms.detach()
    if bool(low.any()) and m.rows_x is not None:
        exact = squared.detach().clone()
        for index in (torch.nonzero(low).tolist() if low.ndim else [[]]):
            Xr, Yr = m.pair_rows(tuple(index))
            exact[tuple(index)] = residual_squared(narrow(Xr.detach()), narrow(Yr.detach()))
        # below (n·eps)² the gradient of the fast form is rounding noise against √(value): 0 there (the minimum)
        squared = torch.where(exact < (m.n * eps(exact)) ** 2, exact, squared + (exact - squared.detach()))
    tol = max(2 * NUCLEAR_ACCURACY, 200.0 * m.n * eps(squared))
    return clamp_rounding(squared, 0.0, float(norms.detach().max()), tol, "squared Procrustes distance 2 − 2ρ",
                          resolution=None if m.rows_x is not None else eps(squared) * 2)


class Procrustes(Family):
    """The Procrustes family (module docstring)."""

    name = "procrustes"
    grammar = ("procrustes[OUTPUT] or procrustes[OUTPUT,mom,moments=K] with OUTPUT one of "
               + ", ".join(OUTPUTS))
    examples = ("procrustes[distance]", "procrustes[angular]", "procrustes[squared]")
    uses = frozenset({"nuclear"})
    aliases = {"procrustes": "procrustes[distance]", "angular": "procrustes[angular]"}

    def plugin_biased(self, estimator: str = "plugin", **kwargs: Any) -> bool:
        return estimator == "plugin"  # ρ of unrelated isotropic layers ≈ 0.85·√(r/n); the moments estimator is not

    def spec(self, output: str = "distance", estimator: str = "plugin", moments: int = MOM_MOMENTS) -> MetricSpec:
        """The spec of one convention."""
        if estimator == "mom":
            suffix = "" if moments == MOM_MOMENTS else f",moments={moments}"
            cid = f"procrustes[{output},mom{suffix}]"
            return MetricSpec(cid, self.name, {"output": output, "estimator": "mom", "moments": moments}, "lower",
                              _RANGES[output], SHAPE_INVARIANCES, True, "rows",
                              f"{_LABELS[output]}, ρ by moments (k≤{moments}) (lower = more similar)")
        return MetricSpec(f"procrustes[{output}]", self.name, {"output": output}, "lower", _RANGES[output],
                          SHAPE_INVARIANCES, True, "moments", f"{_LABELS[output]} (lower = more similar)")

    def parse(self, flags: list[str], options: dict[str, str], text: str) -> MetricSpec:
        outputs = [f for f in flags if f in OUTPUTS]
        estimators = [f for f in flags if f in ESTIMATORS]
        if len(outputs) > 1 or len(estimators) > 1 or len(outputs) + len(estimators) != len(flags) \
                or set(options) - {"moments"} or ("moments" in options and estimators != ["mom"]):
            raise self.error(text)
        output = outputs[0] if outputs else "distance"
        if estimators != ["mom"]:
            return self.spec(output)
        return self.spec(output, "mom", self.integer(options, "moments", MOM_MOMENTS, text, 1))

    def compute(self, X: torch.Tensor, Y: torch.Tensor, output: str = "distance", estimator: str = "plugin",
                moments: int = MOM_MOMENTS, center: bool = True) -> torch.Tensor:
        Xt, Yt = prepare(X, center, "X (teacher)"), prepare(Y, center, "Y (student)")
        if estimator == "mom":
            squared = 2 - 2 * rho_mom(Xt, Yt, int(moments))
            return _output(squared, output)
        Xn, Yn = narrow(Xt), narrow(Yt)
        m = PairMoments.from_rows(Xn, Yn, nuclear=torch.linalg.svdvals(Xn.T @ Yn).sum())
        return self.finalize(m, output)

    def finalize(self, m: PairMoments, output: str = "distance", **kwargs: Any) -> torch.Tensor:
        if kwargs.get("estimator", "plugin") != "plugin":
            raise UserError("the moment estimator of ρ needs the rows, not second moments")
        return _output(squared_from_moments(m), output)


FAMILY = register(Procrustes())


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
    check_choice("output", output, OUTPUTS)
    check_choice("estimator", estimator, ESTIMATORS)
    if estimator == "mom" and (isinstance(moments, bool) or not isinstance(moments, (int, np.integer))
                               or moments < 1):
        raise UserError(f"moments must be an integer ≥ 1, got {moments!r}")
    Xt, Yt = as_pair(X, Y, dtype=dtype)
    return to_output(FAMILY.compute(Xt, Yt, output, estimator, moments, center), X)
