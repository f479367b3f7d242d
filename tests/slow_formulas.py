"""Slow reference formulas, written from the definitions: the oracle the metric, loss and moment tests check against.

Explicit n × n Gram matrices, the explicit centering matrix H = I − 11ᵀ/n, the explicit minimisation over orthogonal Q
(scipy's orthogonal Procrustes on zero-padded inputs) and numpy least squares. numpy and scipy only: nothing here
imports repsim, so a bug in the fast code cannot leak into the reference values.

Notation: X is the teacher (n × p), Y the student (n × q); X̃ = (X − 1μ_Xᵀ)/‖X − 1μ_Xᵀ‖_F is the centred input
scaled to unit Frobenius norm, and likewise Ỹ.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import scipy.linalg
import scipy.spatial.distance

# ---------------------------------------------------------------------------------------------------------------
# normalisation


def normalised(A: np.ndarray, center: bool = True) -> np.ndarray:
    """Ã = (A − 1μᵀ)/‖A − 1μᵀ‖_F (μ the column means; with center=False, A/‖A‖_F), in float64."""
    A = np.asarray(A, dtype=np.float64)
    if center:
        A = A - A.mean(axis=0)
    return A / np.linalg.norm(A)


def centering_matrix(n: int) -> np.ndarray:
    """H = I − 11ᵀ/n."""
    return np.eye(n) - np.ones((n, n)) / n


# ---------------------------------------------------------------------------------------------------------------
# Procrustes


def procrustes_residual(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """X̃_p − Ỹ_p Q* with Q* = argmin over orthogonal Q of ‖X̃_p − Ỹ_p Q‖_F, where X̃_p, Ỹ_p are X̃, Ỹ padded with
    zero columns to the common width max(p, q) (so [Ỹ, 0]Q ranges over all isometric embeddings of the narrower
    side); Q* by scipy.linalg.orthogonal_procrustes."""
    Xn, Yn = normalised(X), normalised(Y)
    width = max(Xn.shape[1], Yn.shape[1])
    Xp = np.pad(Xn, ((0, 0), (0, width - Xn.shape[1])))
    Yp = np.pad(Yn, ((0, 0), (0, width - Yn.shape[1])))
    Q, _ = scipy.linalg.orthogonal_procrustes(Yp, Xp)
    return Xp - Yp @ Q


def slow_procrustes_distance(X: np.ndarray, Y: np.ndarray) -> float:
    """min over orthogonal Q of ‖X̃ − [Ỹ, 0]Q‖_F (the norm of the explicit residual: no cancellation near 0)."""
    return float(np.linalg.norm(procrustes_residual(X, Y)))


def slow_procrustes_squared(X: np.ndarray, Y: np.ndarray) -> float:
    """min over orthogonal Q of ‖X̃ − [Ỹ, 0]Q‖²_F, as the sum of the squared entries of the explicit residual."""
    return float(np.sum(procrustes_residual(X, Y) ** 2))


def slow_rho(X: np.ndarray, Y: np.ndarray) -> float:
    """ρ = ‖X̃ᵀỸ‖_* (nuclear norm: the sum of the singular values), so that min_Q ‖X̃ − [Ỹ, 0]Q‖²_F = 2 − 2ρ."""
    return np.linalg.svd(normalised(X).T @ normalised(Y), compute_uv=False).sum()


# ---------------------------------------------------------------------------------------------------------------
# Gram-Frobenius


def slow_gram_frobenius(X: np.ndarray, Y: np.ndarray) -> float:
    """‖X̃X̃ᵀ − ỸỸᵀ‖_F, with the n × n Gram matrices formed explicitly."""
    Xn, Yn = normalised(X), normalised(Y)
    return float(np.linalg.norm(Xn @ Xn.T - Yn @ Yn.T))


# ---------------------------------------------------------------------------------------------------------------
# HSIC and CKA


def slow_hsic(K: np.ndarray, L: np.ndarray) -> float:
    """Gretton's biased HSIC: tr(KHLH)/(n − 1)²."""
    H = centering_matrix(K.shape[0])
    return float(np.trace(K @ H @ L @ H)) / (K.shape[0] - 1) ** 2


def slow_unbiased_hsic(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al. (2012), eq. 5: with zero-diagonal K̃, L̃,
    [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3))."""
    n = K.shape[0]
    Kt, Lt = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
    one = np.ones(n)
    return (np.trace(Kt @ Lt) + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (one @ Kt @ Lt @ one)) / (n * (n - 3))


def u_centered_gram(K: np.ndarray) -> np.ndarray:
    """Kornblith's center_gram(unbiased=True), the U-centred Gram matrix (Song et al. 2012): with K̃ the Gram with
    zero diagonal, m = K̃ᵀ1/(n − 2) − 1ᵀK̃1/(2(n − 1)(n − 2)), U(K) = K̃ − m1ᵀ − 1mᵀ with the diagonal set to 0."""
    K = np.array(K, dtype=np.float64)
    n = K.shape[0]
    np.fill_diagonal(K, 0)
    means = K.sum(axis=0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    K -= means[:, None]
    K -= means[None, :]
    np.fill_diagonal(K, 0)
    return K


def slow_u_centered_hsic(K: np.ndarray, L: np.ndarray) -> float:
    """The unbiased HSIC through U-centring: ⟨U(K), U(L)⟩_F/(n(n − 3)) (equal to slow_unbiased_hsic, written the
    other way)."""
    n = K.shape[0]
    return float((u_centered_gram(K) * u_centered_gram(L)).sum()) / (n * (n - 3))


def slow_cka(K: np.ndarray, L: np.ndarray, hsic: Callable[[np.ndarray, np.ndarray], float] = slow_hsic) -> float:
    """CKA(K, L) = HSIC(K, L)/√(HSIC(K, K)·HSIC(L, L)) for n × n Gram matrices K, L."""
    return hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))


def slow_linear_cka(X: np.ndarray, Y: np.ndarray, hsic: Callable[[np.ndarray, np.ndarray], float] = slow_hsic,
                    center: bool = False) -> float:
    """Linear CKA: slow_cka(XXᵀ, YYᵀ, hsic) on the raw, uncentred Grams (as in Kornblith's notebook; the centring is
    inside the HSIC estimator). With center=True the features are centred first (X − 1μᵀ), which leaves both HSIC
    estimators unchanged in exact arithmetic."""
    X, Y = np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64)
    if center:
        X, Y = X - X.mean(0), Y - Y.mean(0)
    return slow_cka(X @ X.T, Y @ Y.T, hsic)


def slow_rbf_gram(A: np.ndarray, sigma: float) -> np.ndarray:
    """K_ij = exp(−‖a_i − a_j‖²/(2σ²·median‖a_k − a_l‖²)), the median over all n² squared distances (numpy's
    median: the mean of the two middle values)."""
    D = scipy.spatial.distance.cdist(A, A, "sqeuclidean")
    return np.exp(-D / (2 * sigma**2 * np.median(D)))


# ---------------------------------------------------------------------------------------------------------------
# projection residual


def slow_projection_residual(X: np.ndarray, Y: np.ndarray, ridge: float = 0.0) -> float:
    """In-sample residual min_W ‖X̃ − ỸW‖²_F by least squares; with ridge λ > 0, W = (ỸᵀỸ + λI)⁻¹ỸᵀX̃."""
    Xn, Yn = normalised(X), normalised(Y)
    if ridge:
        W = np.linalg.solve(Yn.T @ Yn + ridge * np.eye(Yn.shape[1]), Yn.T @ Xn)
    else:
        W = np.linalg.lstsq(Yn, Xn, rcond=None)[0]
    return float(np.linalg.norm(Xn - Yn @ W) ** 2)


def slow_heldout_residual(X: np.ndarray, Y: np.ndarray, folds: int, seed: int) -> float:
    """k-fold held-out residual: rows split by np.random.default_rng(seed).permutation(n) into `folds` parts
    (np.array_split); each part's teacher rows predicted by least squares with an intercept fitted on the other
    rows, Σ_folds ‖X̃_test − μ_X − (Ỹ_test − μ_Y)W‖²_F (μ the train-row means, W the lstsq fit on centred train rows)."""
    Xn, Yn = normalised(X), normalised(Y)
    n = Xn.shape[0]
    order = np.random.default_rng(seed).permutation(n)
    total = 0.0
    for test in np.array_split(order, folds):
        train = np.setdiff1d(np.arange(n), test)
        mx, my = Xn[train].mean(axis=0), Yn[train].mean(axis=0)
        W = np.linalg.lstsq(Yn[train] - my, Xn[train] - mx, rcond=None)[0]
        total += np.linalg.norm(Xn[test] - mx - (Yn[test] - my) @ W) ** 2
    return float(total)


# ---------------------------------------------------------------------------------------------------------------
# quantities that circulate under the same names (docs/pitfalls.md): written here to show they are other numbers


def slow_zero_diagonal_hsic(K: np.ndarray, L: np.ndarray) -> float:
    """"Centre, then zero the diagonal": ⟨K̂, L̂⟩_F with K̂ = HKH whose diagonal is then set to 0 (no normalising
    constant: it cancels in the CKA ratio). Another "unbiased" HSIC in circulation; not Song et al.'s."""
    H = centering_matrix(K.shape[0])
    Kc, Lc = H @ K @ H, H @ L @ H
    np.fill_diagonal(Kc, 0)
    np.fill_diagonal(Lc, 0)
    return float((Kc * Lc).sum())


def slow_mixed_cka(K: np.ndarray, L: np.ndarray) -> float:
    """Song's unbiased HSIC(K, L) over √ of Gretton's biased HSIC(K, K)·HSIC(L, L) (each with its own
    normalisation, n(n − 3) and (n − 1)²): a mixed estimator, not a CKA of either kind."""
    return slow_unbiased_hsic(K, L) / math.sqrt(slow_hsic(K, K) * slow_hsic(L, L))


def lower_median(values: np.ndarray) -> float:
    """The lower of the two middle values of an even count (what torch.median returns), not their mean."""
    flat = np.sort(np.asarray(values, dtype=np.float64).ravel())
    return float(flat[(flat.size - 1) // 2])


def slow_rbf_gram_lower_median(A: np.ndarray, sigma: float) -> np.ndarray:
    """slow_rbf_gram with the bandwidth from lower_median instead of numpy's median."""
    D = scipy.spatial.distance.cdist(A, A, "sqeuclidean")
    return np.exp(-D / (2 * sigma**2 * lower_median(D)))


def slow_size_and_shape_distance(X: np.ndarray, Y: np.ndarray) -> float:
    """min over orthogonal Q of ‖X_c − Y_c Q‖_F with X_c, Y_c centred but NOT scaled (equal widths): the
    unnormalised Procrustes distance, which carries the data's scale."""
    Xc = np.asarray(X, dtype=np.float64) - np.mean(X, axis=0)
    Yc = np.asarray(Y, dtype=np.float64) - np.mean(Y, axis=0)
    Q, _ = scipy.linalg.orthogonal_procrustes(Yc, Xc)
    return float(np.linalg.norm(Xc - Yc @ Q))


def slow_gram_spectral(X: np.ndarray, Y: np.ndarray) -> float:
    """‖X̃X̃ᵀ − ỸỸᵀ‖₂ (the spectral norm, the largest singular value) where the Frobenius norm is meant."""
    Xn, Yn = normalised(X), normalised(Y)
    return float(np.linalg.norm(Xn @ Xn.T - Yn @ Yn.T, 2))
