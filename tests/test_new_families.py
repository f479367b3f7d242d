"""The shape, CCA, SVCCA, PWCCA, RSA and nearest-neighbour families: agreement with their authors' code
(tests/fixtures/peer_values.json: netrep, google/svcca, rsatoolbox 0.3.2, platonic-rep) after mapping conventions,
with the reason wherever a peer differs, and theorems that hold for all inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import pdist
from scipy.stats import rankdata

from repsim.measures.families.cca import cca
from repsim.measures.families.neighbours import cknna, layer_neighbours, mutual_knn
from repsim.measures.families.procrustes import procrustes
from repsim.measures.families.pwcca import pwcca
from repsim.measures.families.rsa import FAMILY as RSA
from repsim.measures.families.rsa import KendallState, average_ranks, kendall_tau_a, rdm_vector, rsa
from repsim.measures.families.shape import shape_metric
from repsim.measures.families.svcca import svcca
from repsim.system.errors import UserError

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "peer_values.json").read_text())
CASES = {c["name"]: c for c in FIXTURE["inputs"]["cases"]}
ROWS = {(r["case"], r["measure"]): r for r in FIXTURE["values"]}
seeds = st.integers(0, 2**31 - 1)


def inputs(case: dict) -> tuple[np.ndarray, np.ndarray]:
    """The fixture's generator (its ``inputs.generator`` text), rows = stimuli, float64."""
    rng = np.random.default_rng(case["seed"])
    n, p, q = case["n"], case["p"], case["q"]
    X = rng.standard_normal((n, p))
    A = rng.standard_normal((p, q)) / np.sqrt(p)
    Y = X @ A + case["noise"] * rng.standard_normal((n, q))
    return X, Y


def peer(case: str, measure: str) -> float:
    row = ROWS[case, measure]
    assert row["error"] is None, row["error"]
    return row["value"]


def centred(A: np.ndarray) -> np.ndarray:
    return A - A.mean(axis=0)


def random_orthogonal(rng: np.random.Generator, width: int) -> np.ndarray:
    Q, R = np.linalg.qr(rng.standard_normal((width, width)))
    return Q * np.sign(np.diag(R))


def test_the_fixture_inputs_are_the_generator_recorded_with_them():
    namespace: dict = {}
    exec(FIXTURE["inputs"]["generator"], namespace)  # the fixture's own text, run once to pin our copy to it
    for case in CASES.values():
        for ours, theirs in zip(inputs(case), namespace["inputs"](case), strict=True):
            assert np.array_equal(ours, theirs)


# ---------------------------------------------------------------------------------------------------------------
# shape metrics (netrep's LinearMetric)
# ---------------------------------------------------------------------------------------------------------------

ALPHAS = (0.0, 0.25, 0.5, 1.0)
#: (case, α) with a defined value: α = 0 on "wide_small_n" is degenerate (test_full_whitening_is_refused_where_cca_is)
SHAPE_CASES = [(c, a) for c in CASES for a in ALPHAS if not (a == 0 and c == "wide_small_n")]


@pytest.mark.parametrize("case, alpha", SHAPE_CASES)
def test_shape_angular_equals_netrep_on_the_unit_frobenius_sides(case, alpha):
    """repsim whitens the centred, unit-Frobenius side, so its value is netrep's on X_c/‖X_c‖_F (incl. zero padding:
    p ≠ q in "related" and "wide_small_n", and the rank-deficient student of "wide_small_n")."""
    X, Y = inputs(CASES[case])
    assert shape_metric(X, Y, alpha) == pytest.approx(peer(case, f"netrep_angular_alpha{alpha}_unit"), rel=1e-12)


def test_full_whitening_is_refused_where_cca_is():
    """"wide_small_n" (n = 40, ranks 30 and 39): the whitened sides span 30- and 39-dimensional subspaces of the
    39-dimensional centred space, so all 30 canonical correlations are 1 and netrep's α = 0 value,
    arccos(30/√(30·39)) = 0.5011, depends on the ranks alone."""
    X, Y = inputs(CASES["wide_small_n"])
    assert peer("wide_small_n", "netrep_angular_alpha0.0_unit") == pytest.approx(math.acos(30 / math.sqrt(30 * 39)),
                                                                                rel=1e-12)
    for score in ("angular", "euclidean"):
        with pytest.raises(UserError, match=r"degenerate.*shape\[alpha=0.5\]"):
            shape_metric(X, Y, 0.0, score=score)
    assert shape_metric(X, Y, 1e-3) > 0  # partial whitening is defined


@pytest.mark.parametrize("case", CASES)
def test_netrep_raw_data_agree_at_alpha_0_and_1_only_because_its_partial_whitening_is_not_scale_invariant(case):
    """netrep whitens with C = X_cᵀX_c (no normalisation), so αI + (1 − α)C^{-1/2} mixes two terms whose ratio
    changes with the data's scale: on the raw inputs its 0 < α < 1 scores differ from those on the unit-Frobenius
    sides (and from ours); α = 0 and α = 1 are scale free and agree with ours on the raw inputs too."""
    X, Y = inputs(CASES[case])
    for alpha in (0.0, 1.0) if case != "wide_small_n" else (1.0,):
        assert shape_metric(X, Y, alpha) == pytest.approx(peer(case, f"netrep_linear_angular_alpha{alpha}"), rel=1e-12)
    for alpha in (0.25, 0.5):
        ours = shape_metric(X, Y, alpha)
        assert ours == pytest.approx(shape_metric(1e3 * X, 1e-3 * Y, alpha), rel=1e-12)  # ours: scale free
        assert abs(peer(case, f"netrep_linear_angular_alpha{alpha}") - ours) > 1e-3 * ours


@pytest.mark.parametrize("case, alpha", SHAPE_CASES)
def test_shape_euclidean_is_the_chord_of_the_angle_and_netrep_differs_only_where_it_pads(case, alpha):
    """Ours: ‖φ(X̃)‖ = ‖φ(Ỹ)‖ = 1, so the Euclidean score is 2·sin(θ/2) of netrep's angle. netrep's Euclidean score
    equals that on "unrelated" (p = q, full rank). Where it zero-pads a side (or a side is rank-deficient), its
    variance rescaling also counts the padded/null directions, whose eigenvalues it clips to 1e-7: at α = 0 each
    side (unit norm, so Σλ = 1 before clipping) then keeps the squared norm a² = r(1 + (w − r)·1e-7)/w (r its rank,
    w the padded width), and its score is √(a² + b² − 2ab·cos θ), which the test reproduces."""
    X, Y = inputs(CASES[case])
    theta = peer(case, f"netrep_angular_alpha{alpha}_unit")
    ours = shape_metric(X, Y, alpha, score="euclidean")
    assert ours == pytest.approx(2 * math.sin(theta / 2), rel=1e-12)
    theirs = peer(case, f"netrep_euclidean_alpha{alpha}_unit")
    p, q = X.shape[1], Y.shape[1]
    rank_x, rank_y = np.linalg.matrix_rank(centred(X)), np.linalg.matrix_rank(centred(Y))
    if alpha == 1 or (p == q == rank_x == rank_y):
        assert theirs == pytest.approx(ours, rel=1e-12)
    else:
        assert abs(theirs - ours) > 1e-3 * ours
    if alpha == 0:
        w = max(p, q)
        a, b = (math.sqrt(r * (1 + (w - r) * 1e-7) / w) for r in (rank_x, rank_y))
        assert theirs == pytest.approx(math.sqrt(a * a + b * b - 2 * a * b * math.cos(theta)), rel=1e-10)


@settings(max_examples=25, deadline=None)
@given(seeds, st.integers(4, 30), st.integers(1, 8), st.integers(1, 8), st.floats(0.0, 3.0))
def test_shape_at_alpha_1_is_the_procrustes_distance(seed, n, p, q, noise):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p))
    Y = X @ rng.standard_normal((p, q)) + noise * rng.standard_normal((n, q))
    assert shape_metric(X, Y, 1.0) == procrustes(X, Y, output="angular")
    assert shape_metric(X, Y, 1.0, score="euclidean") == procrustes(X, Y, output="distance")


@pytest.mark.parametrize("case", ["related", "unrelated"])
def test_shape_at_alpha_0_is_the_angle_of_the_mean_canonical_correlation(case):
    """Full whitening maps each side to an orthonormal basis of its column space, so ρ₀ = Σρᵢ/√(r_x r_y)."""
    X, Y = inputs(CASES[case])
    k = min(X.shape[1], Y.shape[1])
    rho = cca(X, Y, "mean_r") * k
    assert shape_metric(X, Y, 0.0) == pytest.approx(math.acos(rho / math.sqrt(X.shape[1] * Y.shape[1])), rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(seeds, st.integers(15, 25), st.lists(st.integers(1, 7), min_size=3, max_size=3), st.floats(0.0, 1.0),
       st.sampled_from(["angular", "euclidean"]))
def test_shape_metrics_obey_the_triangle_inequality(seed, n, widths, alpha, score):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, widths[0]))
    B = A @ rng.standard_normal((widths[0], widths[1])) + 0.5 * rng.standard_normal((n, widths[1]))
    C = B @ rng.standard_normal((widths[1], widths[2])) + 0.5 * rng.standard_normal((n, widths[2]))
    sides = (A, B, C)
    d = {(i, j): shape_metric(u, v, alpha, score=score) for i, u in enumerate(sides) for j, v in enumerate(sides)}
    for i, j, k in [(0, 1, 2), (0, 2, 1), (1, 0, 2)]:
        assert d[i, k] <= d[i, j] + d[j, k] + 1e-9


def test_shape_at_alpha_0_ignores_invertible_linear_maps_and_partial_whitening_does_not():
    X, Y = inputs(CASES["related"])
    rng = np.random.default_rng(3)
    M = random_orthogonal(rng, 30) @ np.diag(np.geomspace(0.1, 10, 30)) @ random_orthogonal(rng, 30)
    assert shape_metric(X @ M, Y, 0.0) == pytest.approx(shape_metric(X, Y, 0.0), rel=1e-10)
    assert abs(shape_metric(X @ M, Y, 0.5) - shape_metric(X, Y, 0.5)) > 1e-3


def test_shape_of_a_side_with_a_nearly_identical_copy_keeps_its_digits():
    """2 − 2ρ_α cancels for nearly identical sides; the value is recomputed as a residual of the whitened rows."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 6))
    E = rng.standard_normal((50, 6))
    small, smaller = shape_metric(X, X + 1e-9 * E, 0.5), shape_metric(X, X + 1e-10 * E, 0.5)
    assert 0 < smaller < small < 1e-7
    assert small / smaller == pytest.approx(10, rel=1e-3)  # first order in the perturbation


# ---------------------------------------------------------------------------------------------------------------
# CCA, SVCCA, PWCCA (google/svcca)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["related", "unrelated"])
def test_mean_canonical_correlations_equal_svcca_reference_code(case):
    """svcca's ``np.mean(cca_coef1)`` and ``np.mean(cca_coef1 ** 2)`` (epsilon 0): scaling and 1/(n − 1) cancel."""
    X, Y = inputs(CASES[case])
    assert cca(X, Y, "mean_r") == pytest.approx(peer(case, "cca_mean_r"), rel=1e-12)
    assert cca(X, Y, "mean_r2") == pytest.approx(peer(case, "cca_mean_r2"), rel=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_svcca_equals_the_svcca_tutorial_recipe_where_it_is_not_degenerate(case):
    """svcca[k=10] and svcca[var=0.99] (K the fewest directions holding 99 % of the variance, squared singular
    values) against the tutorial's SVD-then-CCA recipe on the same K. On "wide_small_n" the 99 % reduction keeps
    26 + 34 ≥ n = 40 directions: 21 canonical correlations are 1 by construction, and the recipe still returns
    0.947 where repsim refuses."""
    X, Y = inputs(CASES[case])
    n = CASES[case]["n"]
    assert svcca(X, Y, k=10) == pytest.approx(peer(case, "svcca_k10"), rel=1e-12)
    row = ROWS[case, "svcca_var99"]
    if row["kx"] + row["ky"] < n:
        assert svcca(X, Y, var=0.99) == pytest.approx(peer(case, "svcca_var99"), rel=1e-12)
    else:
        with pytest.raises(UserError, match="degenerate"):
            svcca(X, Y, var=0.99)


def test_cca_refuses_the_degenerate_sample_where_the_reference_code_crashes_or_returns_one():
    """n = 40 ≤ p + q = 90: svcca's code fails (its pinv of the rank-39 student covariance has negative
    eigenvalues, NaN, "SVD did not converge") or, with epsilon = 1e-6, returns 0.99999563 (all correlations 1)."""
    X, Y = inputs(CASES["wide_small_n"])
    assert "SVD did not converge" in ROWS["wide_small_n", "cca_mean_r"]["error"]
    for f in (lambda: cca(X, Y), lambda: cca(X, Y, "mean_r2"), lambda: pwcca(X, Y), lambda: pwcca(Y, X)):
        with pytest.raises(UserError) as info:
            f()
        message = str(info.value)
        assert "degenerate" in message and "equal 1 by construction" in message
        assert "ridge" in message and "svcca[k=K]" in message  # the fixes, named


@settings(max_examples=25, deadline=None)
@given(seeds, st.integers(1, 8), st.integers(1, 8), st.integers(-3, 3))
def test_cca_is_refused_exactly_when_n_is_at_most_p_plus_q(seed, p, q, offset):
    n = max(3, p + q + offset)
    rng = np.random.default_rng(seed)
    X, Y = rng.standard_normal((n, p)), rng.standard_normal((n, q))
    if n <= p + q:
        with pytest.raises(UserError, match="degenerate"):
            cca(X, Y)
        assert 0 <= cca(X, Y, ridge=0.1) <= 1  # the named fix works
    else:
        assert 0 <= cca(X, Y) <= 1


def ridge_cca_slow(X: np.ndarray, Y: np.ndarray, ridge: float) -> np.ndarray:
    """The k = min(r_x, r_y) largest singular values of (C_xx + κₓI)^{-1/2} C_xy (C_yy + κ_yI)^{-1/2} on the
    covariances' ranges, κ = ridge·tr C/r (numpy: eigh, range by numpy's matrix_rank rule on the singular values)."""
    Xu, Yu = centred(X), centred(Y)
    Xu, Yu = Xu / np.linalg.norm(Xu), Yu / np.linalg.norm(Yu)

    def whiten(A):
        U, s, Vt = np.linalg.svd(A, full_matrices=False)
        r = int((s > s[0] * max(A.shape) * np.finfo(float).eps).sum())
        lam = s[:r] ** 2
        return Vt[:r].T / np.sqrt(lam + ridge * lam.sum() / r), r

    (Wx, rx), (Wy, ry) = whiten(Xu), whiten(Yu)
    return np.linalg.svd(Wx.T @ Xu.T @ Yu @ Wy, compute_uv=False)[:min(rx, ry)]


@pytest.mark.parametrize("case", CASES)
def test_ridge_cca_is_the_regularised_formula_and_shrinks_every_correlation(case):
    X, Y = inputs(CASES[case])
    rho = ridge_cca_slow(X, Y, 0.1)
    assert cca(X, Y, ridge=0.1) == pytest.approx(rho.mean(), rel=1e-10)
    assert cca(X, Y, "mean_r2", ridge=0.1) == pytest.approx((rho ** 2).mean(), rel=1e-10)
    if case != "wide_small_n":
        assert cca(X, Y, ridge=0.1) < cca(X, Y)
        assert cca(X, Y, ridge=1e-9) == pytest.approx(cca(X, Y), rel=1e-6)


def pwcca_paper(X: np.ndarray, Y: np.ndarray) -> float:
    """Morcos et al. 2018, written from the paper: canonical variates hᵢ = Qₓuᵢ of the first argument (Q an
    orthonormal basis of its centred columns, uᵢ the left singular vectors of QₓᵀQ_y), αᵢ = Σⱼ|⟨hᵢ, x_j⟩| over its
    centred neurons, PWCCA = Σαᵢρᵢ/Σαᵢ."""
    Qx = np.linalg.svd(centred(X), full_matrices=False)[0]
    Qy = np.linalg.svd(centred(Y), full_matrices=False)[0]
    U, rho, _ = np.linalg.svd(Qx.T @ Qy, full_matrices=False)
    alpha = np.abs((Qx @ U).T @ centred(X)).sum(axis=1)
    return float((alpha * rho).sum() / alpha.sum())


def pwcca_svcca_algebra(X: np.ndarray, Y: np.ndarray, whiten: bool, centre: bool) -> float:
    """google/svcca's compute_pwcca (its branch that weighs its first argument), re-derived: canonical
    "directions" uᵀ(A − μ) + μ with u from the SVD of Σ_xx^{-1/2}Σ_xyΣ_yy^{-1/2}, QR-orthonormalised, weights
    Σⱼ|⟨Pᵢ, aⱼ⟩| over the raw neurons aⱼ. The variate of canonical pair i is (Σ_xx^{-1/2}uᵢ)ᵀ(A − μ): the code
    omits Σ_xx^{-1/2}, and it adds the neuron means back and weighs uncentred neurons. ``whiten=True`` inserts the
    missing factor, ``centre=True`` drops the means."""
    A1, A2 = X.T, Y.T
    C = np.cov(np.vstack([A1, A2]))
    p = len(A1)
    sxx, sxy, syy = C[:p, :p], C[:p, p:], C[p:, p:]

    def inv_sqrt(S):
        w, V = np.linalg.eigh(S)
        return (V / np.sqrt(w)) @ V.T

    u, s, _ = np.linalg.svd(inv_sqrt(sxx) @ sxy @ inv_sqrt(syy))
    coef = u.T @ inv_sqrt(sxx) if whiten else u.T
    mu = A1.mean(axis=1, keepdims=True)
    P, _ = np.linalg.qr((coef @ (A1 - mu) + (0 if centre else mu)).T)
    w = np.abs(P.T @ (A1 - mu if centre else A1).T).sum(axis=1)[: len(s)]
    return float((w * s).sum() / w.sum())


def test_pwcca_is_the_papers_definition_and_the_reference_code_misses_the_whitening():
    """"unrelated" (p = q = 25): svcca's compute_pwcca returns 0.30457, 2 % above the paper's 0.29844. Its
    algebra re-derived here reproduces 0.30457; the same algebra with Σ_xx^{-1/2} inserted gives the paper value,
    which is repsim's. On "related" (p = 30 > q = 20) the code raises IndexError (it indexes the first argument
    with the second's mask); with the arguments swapped it weighs the student."""
    X, Y = inputs(CASES["unrelated"])
    ours = pwcca(X, Y)
    assert ours == pytest.approx(pwcca_paper(X, Y), rel=1e-12)
    assert pwcca_svcca_algebra(X, Y, whiten=True, centre=True) == pytest.approx(ours, rel=1e-10)
    theirs = peer("unrelated", "pwcca")
    assert pwcca_svcca_algebra(X, Y, whiten=False, centre=False) == pytest.approx(theirs, rel=1e-10)
    assert abs(pwcca_svcca_algebra(X, Y, whiten=False, centre=True) - ours) > 1e-2 * ours  # the whitening is the 2 %
    assert abs(theirs - ours) > 1e-2 * ours
    X, Y = inputs(CASES["related"])
    assert "IndexError" in ROWS["related", "pwcca"]["error"]
    assert pwcca(X, Y) == pytest.approx(pwcca_paper(X, Y), rel=1e-12)
    assert pwcca(Y, X) == pytest.approx(pwcca_paper(Y, X), rel=1e-12)
    assert pwcca_svcca_algebra(Y, X, whiten=False, centre=False) == pytest.approx(peer("related", "pwcca_swapped_args"),
                                                                               rel=1e-10)


def test_pwcca_weighs_the_teacher_so_it_is_asymmetric_and_between_the_extremes_of_the_correlations():
    X, Y = inputs(CASES["related"])
    rho = np.linalg.svd(np.linalg.svd(centred(X), full_matrices=False)[0].T
                        @ np.linalg.svd(centred(Y), full_matrices=False)[0], compute_uv=False)
    assert rho.min() < pwcca(X, Y) < rho.max()
    assert abs(pwcca(X, Y) - pwcca(Y, X)) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# RSA (rsatoolbox)
# ---------------------------------------------------------------------------------------------------------------

COMPARE_NAMES = {"spearman": "spearman", "pearson": "corr", "kendall_a": "tau-a", "cosine": "cosine"}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rdm", ["correlation", "euclidean", "cosine"])
@pytest.mark.parametrize("compare", COMPARE_NAMES)
def test_rsa_equals_rsatoolbox(case, rdm, compare):
    """rsatoolbox on the column-centred sides (repsim centres columns first, as for every measure); with
    ``center=False`` on the raw sides. rsatoolbox's "euclidean" RDM is the squared distance divided by the width,
    a common factor no comparison sees; it has no cosine RDM, so its comparisons were fed the 1 − cosine vectors."""
    X, Y = inputs(CASES[case])
    theirs = peer(case, f"rsa_{rdm}_{COMPARE_NAMES[compare]}_centred")
    assert rsa(X, Y, rdm, compare) == pytest.approx(theirs, rel=1e-10, abs=1e-15)
    raw = peer(case, f"rsa_{rdm}_{COMPARE_NAMES[compare]}")
    assert rsa(X, Y, rdm, compare, center=False) == pytest.approx(raw, rel=1e-9, abs=1e-15)


def test_rdms_are_the_textbook_dissimilarities():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((12, 5))
    Xu = torch.as_tensor(centred(X) / np.linalg.norm(centred(X)))
    np.testing.assert_allclose(rdm_vector(Xu, "euclidean").numpy(), pdist(Xu.numpy(), "sqeuclidean"), rtol=1e-12)
    np.testing.assert_allclose(rdm_vector(Xu, "cosine").numpy(), pdist(Xu.numpy(), "cosine"), rtol=1e-12)
    np.testing.assert_allclose(rdm_vector(Xu, "correlation").numpy(), pdist(Xu.numpy(), "correlation"), rtol=1e-12)


def test_spearman_ranks_share_tied_ranks_and_kendall_a_counts_ties_neither_way():
    v = torch.tensor([3.0, 1.0, 3.0, 2.0, 1.0, 3.0, 0.5])
    np.testing.assert_array_equal(average_ranks(v).numpy(), rankdata(v.numpy()))
    rng = np.random.default_rng(1)
    a = rng.integers(0, 6, 40).astype(float)  # many ties in both vectors
    b = a + rng.integers(-3, 4, 40)
    s = np.sign(a[:, None] - a[None, :]) * np.sign(b[:, None] - b[None, :])
    tau_a = s.sum() / 2 / (a.size * (a.size - 1) / 2)
    value = kendall_tau_a(KendallState(torch.as_tensor(a)), KendallState(torch.as_tensor(b)))
    assert value == pytest.approx(tau_a, rel=1e-12)


@settings(max_examples=10, deadline=None)
@given(seeds, st.sampled_from(["euclidean", "cosine"]), st.sampled_from(list(COMPARE_NAMES)))
def test_rsa_is_invariant_to_isotropic_scaling_and_orthogonal_maps(seed, rdm, compare):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((25, 6))
    Y = np.tanh(X @ rng.standard_normal((6, 4))) + 0.3 * rng.standard_normal((25, 4))
    moved = rng.uniform(0.1, 10) * X @ random_orthogonal(rng, 6)
    assert rsa(moved, Y, rdm, compare) == pytest.approx(rsa(X, Y, rdm, compare), rel=1e-9, abs=1e-12)


def test_the_correlation_rdm_sees_rotations_of_the_features_but_not_their_order():
    """Centring a row across its features is not preserved by a rotation of the features (it is by a
    permutation), so rsa[rdm=correlation,...] is not orthogonally invariant: the registry says so."""
    rng = np.random.default_rng(2)
    X = rng.standard_normal((30, 6)) * np.geomspace(3, 0.3, 6)
    Y = X @ rng.standard_normal((6, 5)) + rng.standard_normal((30, 5))
    base = rsa(X, Y, "correlation", "pearson")
    assert abs(rsa(X @ random_orthogonal(rng, 6), Y, "correlation", "pearson") - base) > 1e-3
    assert rsa(X[:, ::-1], Y, "correlation", "pearson") == pytest.approx(base, rel=1e-12)
    assert "orthogonal" not in RSA.spec("correlation", "pearson").invariances
    assert "orthogonal" in RSA.spec("cosine", "pearson").invariances


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(-4, 4), min_size=1, max_size=300), st.integers(0, 2**31 - 1))
def test_average_ranks_equal_scipy_rankdata_on_vectors_with_ties(values, seed):
    """The unstable sort orders tied entries arbitrarily; their shared mean rank must not depend on it."""
    rng = np.random.default_rng(seed)
    v = np.asarray(values, dtype=float) / 3 + rng.choice([0.0, 1e-300, -0.0], len(values))
    np.testing.assert_array_equal(average_ranks(torch.as_tensor(v)).numpy(), rankdata(v))


def test_rsa_refuses_all_pairs_beyond_the_available_memory_with_the_estimate(monkeypatch, tmp_path, capsys):
    """The RDMs of all pairs are estimated before any is built; too large: one line naming the metric, the GiB and
    max_samples, exit 2 through the CLI (and the same rows pass under a budget just large enough)."""
    from repsim.cli import main
    from repsim.measures.allpairs import pairwise
    from repsim.measures.families import rsa as rsa_module

    rng = np.random.default_rng(0)
    teacher = rng.standard_normal((3, 40, 6))
    student = rng.standard_normal((2, 40, 4))
    need = rsa_module.rsa_memory_bytes(40, 2)
    assert need == 8 * 780 * (2 + rsa_module.WORKING_VECTORS)
    monkeypatch.setattr(rsa_module, "available_bytes", lambda device: need - 1)
    with pytest.raises(UserError, match=r"rsa\[rdm=correlation,compare=spearman\].*GiB.*max_samples"):
        pairwise(list(teacher), list(student), metrics=["rsa"])
    np.save(tmp_path / "t.npy", teacher)
    np.save(tmp_path / "s.npy", student)
    out = tmp_path / "out"
    code = main(["compare", "--teacher-acts", str(tmp_path / "t.npy"), "--student-acts", str(tmp_path / "s.npy"),
                 "--metrics", "rsa", "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "max_samples" in err and "Traceback" not in err
    monkeypatch.setattr(rsa_module, "available_bytes", lambda device: need)
    values = pairwise(list(teacher), list(student), metrics=["rsa"])["rsa[rdm=correlation,compare=spearman]"]
    assert values[2, 1] == pytest.approx(rsa(teacher[2], student[1]), rel=1e-12)


@pytest.mark.parametrize("compare", list(COMPARE_NAMES))
def test_rsa_all_pairs_equal_the_pair_by_pair_values(compare):
    rng = np.random.default_rng(4)
    teacher = [torch.as_tensor(rng.standard_normal((20, w))) for w in (3, 5, 4)]
    student = [torch.as_tensor(rng.standard_normal((20, w))) for w in (2, 6)]
    states_t = [RSA.layer_state(x, rdm="cosine", compare=compare) for x in teacher]
    states_s = [RSA.layer_state(y, rdm="cosine", compare=compare) for y in student]
    values = RSA.pair_values(states_t, states_s, rdm="cosine", compare=compare)
    for i, x in enumerate(teacher):
        for j, y in enumerate(student):
            assert float(values[i, j]) == pytest.approx(rsa(x.numpy(), y.numpy(), "cosine", compare), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# nearest neighbours (platonic-rep)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_mutual_knn_equals_platonic_rep_up_to_its_float32_masks(case):
    """platonic-rep builds its neighbour masks with torch.zeros (float32), so its value carries float32 rounding
    (~1e-7 relative); the exact value is a count over n·k."""
    X, Y = inputs(CASES[case])
    n, k = CASES[case]["n"], 10
    for ours, theirs in ((mutual_knn(X, Y), peer(case, "mutual_knn_k10_centred_rownorm")),
                         (mutual_knn(X, Y, center=False), peer(case, "mutual_knn_k10_rownorm"))):
        assert ours * n * k == pytest.approx(round(ours * n * k), abs=1e-9)
        assert ours == pytest.approx(theirs, rel=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_cknna_equals_platonic_rep_without_its_scale_dependent_epsilon(case):
    """platonic-rep returns s(K,L)/(√(s(K,K)·s(L,L)) + 1e-6). On unit rows the 1e-6 shifts the value by ~1e-4
    relative, and by a different amount when the data are rescaled; scaled by 1000 (HSIC 1e12-fold) it is below
    1e-12, and then the peer equals repsim's s(K,L)/√(s(K,K)·s(L,L)). The unscaled peer value is reproduced from
    repsim's own self-similarities with the 1e-6 put back."""
    X, Y = inputs(CASES[case])
    ours = cknna(X, Y)
    assert ours == pytest.approx(peer(case, "cknna_k10_centred_rownorm_x1000"), rel=1e-12)
    kk = layer_neighbours(torch.as_tensor(X), 10, similarity=True).self_similarity
    ll = layer_neighbours(torch.as_tensor(Y), 10, similarity=True).self_similarity
    root = float((kk * ll).sqrt())
    theirs = peer(case, "cknna_k10_centred_rownorm")
    assert theirs == pytest.approx(ours * root / (root + 1e-6), rel=1e-12)
    assert abs(theirs - ours) > 1e-6 * ours
    assert cknna(X, Y, center=False) == pytest.approx(ROWS[case, "cknna_k10_rownorm"]["hand_value_no_eps"], rel=1e-12)


def test_cknna_is_not_symmetric_as_in_platonic_rep():
    """1ᵀ(M∘K)(M∘L)1 ≠ 1ᵀ(M∘L)(M∘K)1 for the row-wise (non-symmetric) neighbour masks M."""
    X, Y = inputs(CASES["related"])
    assert cknna(Y, X) == pytest.approx(peer("related", "cknna_k10_centred_rownorm_swapped_x1000"), rel=1e-12)
    assert abs(cknna(X, Y) - cknna(Y, X)) > 1e-4


def test_cknna_can_exceed_1_so_its_declared_range_is_unbounded():
    """The masked HSIC is not an inner product (the row-wise masks differ between s(K, L), s(K, K) and s(L, L)), so
    no Cauchy-Schwarz bound holds: 7 rows, k = 2."""
    from repsim.measures.registry import get_metric

    rng = np.random.default_rng(21)
    X = rng.standard_normal((7, 2))
    Y = X @ rng.standard_normal((2, 2)) + 0.5 * rng.standard_normal((7, 2))
    assert cknna(X, Y, 2) == pytest.approx(cknna_dense(X, Y, 2), rel=1e-10)
    assert cknna(X, Y, 2) > 1.004
    assert get_metric("cknna[k=2]").range == (-math.inf, math.inf)


def cknna_dense(X: np.ndarray, Y: np.ndarray, k: int) -> float:
    """CKNNA with n × n masks and matrices, as written in platonic-rep (without its 1e-6)."""
    def unit(A):
        A = centred(A)
        return A / np.linalg.norm(A, axis=1, keepdims=True)

    K, L = unit(X) @ unit(X).T, unit(Y) @ unit(Y).T
    n = len(K)

    def mask(G):
        G = G.copy()
        np.fill_diagonal(G, -np.inf)
        out = np.zeros_like(G)
        out[np.arange(n)[:, None], np.argsort(-G, axis=1)[:, :k]] = 1
        return out

    def hsic(A, B):
        A, B = A.copy(), B.copy()
        np.fill_diagonal(A, 0)
        np.fill_diagonal(B, 0)
        return (np.trace(A @ B) + A.sum() * B.sum() / ((n - 1) * (n - 2)) - 2 * (A @ B).sum() / (n - 2)) / (n * (n - 3))

    mk, ml = mask(K), mask(L)
    m = mk * ml
    return hsic(m * K, m * L) / math.sqrt(hsic(mk * K, mk * K) * hsic(ml * L, ml * L))


@settings(max_examples=15, deadline=None)
@given(seeds, st.integers(8, 40), st.integers(2, 6))
def test_cknna_equals_the_dense_formula(seed, n, k):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 5))
    Y = X @ rng.standard_normal((5, 3)) + rng.standard_normal((n, 3))
    k = min(k, n - 1)
    assert cknna(X, Y, k) == pytest.approx(cknna_dense(X, Y, k), rel=1e-10)


@settings(max_examples=15, deadline=None)
@given(seeds, st.integers(5, 40), st.integers(1, 6))
def test_mutual_knn_of_a_layer_with_itself_is_1_and_neighbours_see_only_the_geometry(seed, n, k):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 4))
    Y = np.tanh(X @ rng.standard_normal((4, 3))) + 0.5 * rng.standard_normal((n, 3))
    k = min(k, n - 1)
    assert mutual_knn(X, X, k) == 1.0
    moved = rng.uniform(0.1, 10) * X @ random_orthogonal(rng, 4) + rng.standard_normal(4)
    assert mutual_knn(moved, Y, k) == mutual_knn(X, Y, k)
    if n >= 4 and k >= 2:
        assert cknna(X, X, k) == pytest.approx(1.0, rel=1e-12)
        assert cknna(moved, Y, k) == pytest.approx(cknna(X, Y, k), rel=1e-9)


def test_mutual_knn_counts_shared_neighbour_sets():
    rng = np.random.default_rng(5)
    X, Y = rng.standard_normal((30, 4)), rng.standard_normal((30, 3))

    def knn(A):
        A = centred(A)
        A = A / np.linalg.norm(A, axis=1, keepdims=True)
        G = A @ A.T
        np.fill_diagonal(G, -np.inf)
        return [set(np.argsort(-row)[:5]) for row in G]

    expected = np.mean([len(a & b) / 5 for a, b in zip(knn(X), knn(Y), strict=True)])
    assert mutual_knn(X, Y, 5) == pytest.approx(expected, rel=1e-15)


# ---------------------------------------------------------------------------------------------------------------
# batched over layer pairs (what the all-pairs engines hand a family)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["shape[alpha=0]", "shape[alpha=0.3]", "shape[alpha=0.7,score=euclidean]",
                                    "cca[mean_r]", "cca[mean_r2,ridge=0.1]", "svcca[k=3]", "svcca[var=0.9]",
                                    "pwcca"])
@pytest.mark.parametrize("with_state", [True, False])
def test_moments_families_finalize_all_layer_pairs_at_once(metric, with_state):
    """PairMoments with leading (L_t, L_s) dimensions, per-layer statistics stacked to broadcast, give every pair's
    in-memory value: no loop over pairs inside the family."""
    from repsim.measures.arrays import prepare
    from repsim.measures.registry import PairMoments, get_metric

    spec = get_metric(metric)
    family = spec.family_object
    rng = np.random.default_rng(6)
    base = rng.standard_normal((60, 4))
    teacher = [torch.as_tensor(base @ rng.standard_normal((4, 7)) + rng.standard_normal((60, 7)) * s)
               for s in (0.3, 1.0, 3.0)]
    student = [torch.as_tensor(base @ rng.standard_normal((4, 5)) + rng.standard_normal((60, 5)) * s)
               for s in (0.5, 2.0)]
    Xs = torch.stack([prepare(x) for x in teacher])[:, None]  # (L_t, 1, n, p)
    Ys = torch.stack([prepare(y) for y in student])[None]  # (1, L_s, n, q)
    cov_x, cov_y = Xs.mT @ Xs, Ys.mT @ Ys
    m = PairMoments(60, cov_x.expand(3, 2, 7, 7), cov_y.expand(3, 2, 5, 5), Xs.mT @ Ys)
    if with_state:
        m.state_x = family.layer_statistics(cov_x, 60, **spec.kwargs)
        m.state_y = family.layer_statistics(cov_y, 60, **spec.kwargs)
    values = family.finalize(m, **spec.kwargs)
    assert values.shape == (3, 2)
    for i, x in enumerate(teacher):
        for j, y in enumerate(student):
            assert float(values[i, j]) == pytest.approx(spec(x.numpy(), y.numpy()), rel=1e-11)


# ---------------------------------------------------------------------------------------------------------------
# the registry and the command line
# ---------------------------------------------------------------------------------------------------------------

NEW_FAMILIES = ("shape", "cca", "svcca", "pwcca", "rsa", "mutual_knn", "cknna")


def new_ids() -> list[str]:
    from repsim.measures.registry import get_metric, metric_names

    return [i for i in metric_names() if get_metric(i).family in NEW_FAMILIES]


def test_every_new_id_is_registered_canonical_and_labelled_with_its_direction():
    from repsim.analysis.plot import metric_label
    from repsim.measures.registry import get_metric

    ids = new_ids()
    assert {get_metric(i).family for i in ids} == set(NEW_FAMILIES)
    for i in ids:
        spec = get_metric(i)
        assert spec.id == i and get_metric(f" {i.upper()} ") == spec
        assert f"({spec.direction} = more similar)" in spec.label and spec.label in metric_label(i)
    for alias, canonical in [("rsa", "rsa[rdm=correlation,compare=spearman]"), ("mutual_knn", "mutual_knn[k=10]"),
                             ("cknna", "cknna[k=10]"), ("shape[alpha=0.50,score=angular]", "shape[alpha=0.5]"),
                             ("rsa[compare=pearson,rdm=cosine]", "rsa[rdm=cosine,compare=pearson]")]:
        assert get_metric(alias).id == canonical
    for bad in ("shape", "shape[alpha=2]", "shape[alpha=0.5,score=manhattan]", "cca", "cca[mean_r,ridge=-1]",
                "svcca[k=0]", "svcca[var=1.5]", "svcca[k=3,var=0.9]", "pwcca[k=3]", "rsa[rdm=manhattan]",
                "rsa[compare=tau_b]", "mutual_knn[k=0]", "cknna[k=1]"):
        with pytest.raises(UserError, match="metric"):
            get_metric(bad)


def test_compare_accepts_every_new_id_and_labels_each_heatmap(tmp_path, tiny_model):
    """`repsim compare --metrics ID` on two tiny models (4 × 32 teacher, 3 × 16 student layers, 120 texts)."""
    import random

    import pandas as pd
    from tiny_models import WORDS

    from repsim.cli import main
    from repsim.measures.allpairs import pairwise

    rng = random.Random(0)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(120)))
    teacher, student = str(tiny_model("bert", seed=0)), str(tiny_model("bert", seed=1, hidden=16, layers=2))
    ids = new_ids()
    assert main(["compare", teacher, student, "--data", str(texts), "--out", str(tmp_path / "o"),
                 "--metrics", *ids]) == 0
    table = pd.read_csv(tmp_path / "o" / "results.csv")
    assert set(table["metric"]) == set(ids)
    from repsim.activations.data import load_texts
    from repsim.activations.extract import extract

    t_act = extract(teacher, load_texts(str(texts)), pool="mean", progress=False)
    s_act = extract(student, load_texts(str(texts)), pool="mean", progress=False)
    t_layers = [np.array(t_act[i]) for i in sorted(set(table["teacher_layer"]))]
    s_layers = [np.array(s_act[j]) for j in sorted(set(table["student_layer"]))]
    expected = pairwise(t_layers, s_layers, metrics=ids)
    from repsim.analysis.plot import file_stem

    for i in ids:
        rows = table[table["metric"] == i].sort_values(["teacher_layer", "student_layer"])
        np.testing.assert_allclose(rows["value"].to_numpy(), expected[i].ravel(), rtol=1e-9, atol=1e-12)
        assert (tmp_path / "o" / f"heatmap_{file_stem(i)}.png").exists()


@pytest.mark.parametrize("shape", ["mixed widths", "rank-deficient", "n below the widths"])
def test_pairwise_equals_the_in_memory_value_or_refuses_alike_for_every_new_id(shape):
    from repsim.measures.allpairs import pairwise
    from repsim.measures.registry import get_metric

    rng = np.random.default_rng(8)
    n = 20 if shape == "n below the widths" else 80
    base = rng.standard_normal((n, 5))

    def layer(width):
        A = base @ rng.standard_normal((5, width)) + rng.standard_normal((n, width))
        if shape == "rank-deficient":
            half = width // 2
            A[:, width - half:] = A[:, :width - half] @ rng.standard_normal((width - half, half))
        return A

    widths_t, widths_s = ((30, 24), (8,)) if shape == "n below the widths" else ((12, 12, 9), (7, 10))
    teacher, student = [layer(w) for w in widths_t], [layer(w) for w in widths_s]
    for i in new_ids():
        spec = get_metric(i)
        try:
            expected = np.array([[spec(x, y) for y in student] for x in teacher])
        except UserError as error:
            with pytest.raises(UserError, match="degenerate|rotated" if "degenerate" in str(error) else None):
                pairwise(teacher, student, metrics=[i])
            continue
        np.testing.assert_allclose(pairwise(teacher, student, metrics=[i])[i], expected, rtol=1e-12, atol=1e-15,
                                   err_msg=i)


def test_streamed_moments_give_the_in_memory_values_and_refuse_the_rows_families(monkeypatch):
    import repsim.analysis.stats as stats
    from repsim.measures.moments import LayerMoments
    from repsim.measures.registry import get_metric

    rng = np.random.default_rng(9)
    base = rng.standard_normal((90, 5))
    teacher = [base @ rng.standard_normal((5, w)) + rng.standard_normal((90, w)) for w in (12, 9)]
    student = [base @ rng.standard_normal((5, w)) + rng.standard_normal((90, w)) for w in (7, 10)]
    moments = LayerMoments([12, 9], [7, 10])
    for lo in range(0, 90, 25):  # four batches
        moments.update([x[lo:lo + 25] for x in teacher], [y[lo:lo + 25] for y in student])
    # a bootstrap "resample" that keeps every row once
    monkeypatch.setattr(stats, "resample_indices", lambda n, replicates, seed=0: np.arange(n)[None])
    for i in new_ids():
        spec = get_metric(i)
        expected = np.array([[spec(x, y) for y in student] for x in teacher])
        if spec.statistics == "moments":
            np.testing.assert_allclose(moments.matrix(i), expected, rtol=1e-10, err_msg=i)
        else:
            with pytest.raises(UserError, match="needs the rows"):
                moments.matrix(i)
        replicate = stats.bootstrap_replicates(teacher, student, [i], 1, method="generic")[i][0]
        np.testing.assert_allclose(replicate, expected, rtol=1e-10, err_msg=i)
