"""Centered kernel alignment (Kornblith et al. 2019): ``cka[KERNEL,ESTIMATOR,sigma=S]``.

KERNEL linear (a function of second moments) or rbf (needs the rows), ESTIMATOR biased (Gretton's HSIC) or
debiased (Song et al.'s U-statistic); aliases ``cka`` (linear, biased) and ``cka[debiased]``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from repsim.measures.arrays import (
    ArrayLike,
    as_pair,
    check_self_hsic,
    debiased_hsic,
    debiased_self_hsic,
    prepare,
    self_hsic_magnitude,
    to_output,
)
from repsim.measures.linalg import dual_is_cheaper, eps
from repsim.measures.registry import (
    SHAPE_INVARIANCES,
    Family,
    MetricSpec,
    PairMoments,
    check_choice,
    check_number,
    register,
)
from repsim.system.errors import UserError

KERNELS = ("linear", "rbf")
ESTIMATORS = ("biased", "debiased")


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
    """HSIC(K, L)/√(HSIC(K, K)·HSIC(L, L)), elementwise; UserError where a self-HSIC is not positive."""
    for value, side in ((hsic_xx, "X (teacher)"), (hsic_yy, "Y (student)")):
        v = value.detach()
        if not bool((v > 0).all()):
            raise UserError(f"the HSIC of {side} with itself is {float(v.min()):.3g} (not positive): CKA is undefined")
    return hsic_xy / (hsic_xx.sqrt() * hsic_yy.sqrt())


def hsic_from_moments(m: PairMoments, estimator: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(HSIC(K, L), HSIC(K, K), HSIC(L, L)) of the linear kernels, up to a common factor, from the pair moments.

    Biased: ‖X̃ᵀỸ‖², ‖X̃ᵀX̃‖², ‖ỸᵀỸ‖² (Kornblith et al.'s ``feature_space_linear_cka``). Debiased (centred
    columns): each ‖AᵀB‖² becomes ‖AᵀB‖² − n/(n − 2)·Σᵢ‖aᵢ‖²‖bᵢ‖² + ‖A‖²‖B‖²/((n − 1)(n − 2)), which is n(n − 3) ×
    Song's unbiased HSIC (:func:`repsim.measures.arrays.debiased_hsic`; ‖X̃‖ = ‖Ỹ‖ = 1); self-HSICs that are 0 up
    to rounding are refused (:func:`repsim.measures.arrays.check_self_hsic`).
    """
    xy = m.cross_sq_norm()
    xx, yy = m.self_sq_norms()
    if estimator == "biased":
        return xy, xx, yy
    n = m.n
    quart_x, quart_y, s_ab = m.debiasing_sums()
    one = torch.ones((), dtype=xy.dtype, device=xy.device)  # (Σ‖x̃_i‖²)² = 1: unit-Frobenius sides
    xy = debiased_hsic(xy, s_ab, one, n)
    xx, mx = debiased_self_hsic(xx, quart_x, one, n)
    yy, my = debiased_self_hsic(yy, quart_y, one, n)
    check_self_hsic(xx, mx, n, xy.dtype, "the teacher")
    check_self_hsic(yy, my, n, xy.dtype, "the student")
    return xy, xx, yy


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
    tol = 100.0 * eps(D)
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


class CKA(Family):
    """The CKA family (module docstring)."""

    name = "cka"
    grammar = "cka[KERNEL,ESTIMATOR,sigma=S] with KERNEL linear|rbf, ESTIMATOR biased|debiased"
    examples = ("cka[linear,biased]", "cka[linear,debiased]", "cka[rbf,sigma=1]")
    uses = frozenset({"cross_sq", "self_sq"})
    aliases = {"cka": "cka[linear,biased]", "cka[debiased]": "cka[linear,debiased]"}

    def spec(self, kernel: str = "linear", estimator: str = "biased", sigma: float = 1.0) -> MetricSpec:
        sigma = float(sigma)
        if kernel == "linear":
            cid, args, what = f"cka[linear,{estimator}]", {"kernel": kernel, "estimator": estimator}, "linear CKA"
        else:
            suffix = ",debiased" if estimator == "debiased" else ""
            cid = f"cka[rbf,sigma={sigma:g}{suffix}]"
            args = {"kernel": kernel, "estimator": estimator, "sigma": sigma}
            what = f"RBF CKA, σ={sigma:g}·median"
        what += ", debiased (Song U-statistic)" if estimator == "debiased" else ", biased"
        return MetricSpec(cid, self.name, args, "higher", (-1.0, 1.0) if estimator == "debiased" else (0.0, 1.0),
                          SHAPE_INVARIANCES, True, "moments" if kernel == "linear" else "rows",
                          f"{what} (higher = more similar)")

    def parse(self, flags: list[str], options: dict[str, str], text: str) -> MetricSpec:
        kernels = [f for f in flags if f in KERNELS]
        estimators = [f for f in flags if f in ESTIMATORS]
        if len(kernels) > 1 or len(estimators) > 1 or len(kernels) + len(estimators) != len(flags) \
                or set(options) - {"sigma"}:
            raise self.error(text)
        kernel = kernels[0] if kernels else ("rbf" if "sigma" in options else "linear")
        if kernel == "linear" and "sigma" in options:
            raise self.error(text, "sigma applies to the rbf kernel only")
        sigma = self.number(options, "sigma", 1.0, text)
        if not sigma > 0:
            raise self.error(text, f"sigma must be > 0, got {sigma:g}")
        return self.spec(kernel, estimators[0] if estimators else "biased", sigma)

    def plugin_biased(self, estimator: str = "biased", **kwargs: Any) -> bool:
        return estimator == "biased"  # unrelated isotropic layers of rank r score ≈ r/n; the U-statistic ≈ 0

    def needs(self, estimator: str = "biased", **kwargs: Any) -> frozenset[str]:
        return self.uses | {"debiasing"} if estimator == "debiased" else self.uses

    def min_rows(self, estimator: str = "biased", **kwargs: Any) -> int:
        return 4 if estimator == "debiased" else 2

    def compute(self, X: torch.Tensor, Y: torch.Tensor, kernel: str = "linear", estimator: str = "biased",
                sigma: float = 1.0, center: bool = True) -> torch.Tensor:
        debiased = estimator == "debiased"
        # the debiased estimator is translation invariant: centring is exact there and keeps its primal form valid
        Xt, Yt = prepare(X, center or debiased, "X (teacher)"), prepare(Y, center or debiased, "Y (student)")
        if kernel == "rbf":
            return _cka_from_grams(_rbf_gram(Xt, sigma, "X (teacher)"), _rbf_gram(Yt, sigma, "Y (student)"),
                                   estimator, centred=False)
        if dual_is_cheaper(Xt.shape[0], Xt.shape[1], Yt.shape[1]):
            return _cka_from_grams(Xt @ Xt.T, Yt @ Yt.T, estimator, centred=True)
        return self.finalize(PairMoments.from_rows(Xt, Yt), kernel, estimator)

    def finalize(self, m: PairMoments, kernel: str = "linear", estimator: str = "biased", **kwargs: Any
                 ) -> torch.Tensor:
        if kernel != "linear":
            raise UserError("RBF CKA needs the rows, not second moments")
        return _cka_ratio(*hsic_from_moments(m, estimator))


FAMILY = register(CKA())


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
    check_choice("kernel", kernel, KERNELS)
    check_choice("estimator", estimator, ESTIMATORS)
    sigma = check_number("sigma", sigma, strictly=True)
    Xt, Yt = as_pair(X, Y, min_rows=4 if estimator == "debiased" else 2, dtype=dtype)
    return to_output(FAMILY.compute(Xt, Yt, kernel, estimator, sigma, center), X)

