"""Bootstrap intervals and permutation p-values (repsim.analysis.stats): exactness of the Gram shortcut against the
metric functions on resampled rows, coverage of the point estimate, shrinkage with n, null calibration."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from repsim.analysis import stats
from repsim.measures import functions as M

FAST_IDS = ["gram_frobenius", "gram_frobenius[squared]", "cka[linear,biased]", "procrustes[distance]",
            "procrustes[angular]", "procrustes[squared]"]


def _stack(rng, n, widths):
    return [rng.standard_normal((n, w)) for w in widths]


def _related(rng, n, p=12, q=8, noise=0.5, layers=2):
    """Teacher layers X_k; student layers Y_k = X_k A_k + noise (shared text structure)."""
    X = [rng.standard_normal((n, p)) for _ in range(layers)]
    Y = [X[k] @ rng.standard_normal((p, q)) + noise * rng.standard_normal((n, q)) for k in range(layers)]
    return X, Y


def test_shortcuts_equal_generic_recomputation():
    """Gram gathers (Gram-Frobenius, CKA) and weighted distinct rows (Procrustes) = the metrics on the resample."""
    rng = np.random.default_rng(0)
    X, Y = _related(rng, 40)
    fast = stats.bootstrap_replicates(X, Y, FAST_IDS, 5, seed=3, method="fast")
    slow = stats.bootstrap_replicates(X, Y, FAST_IDS, 5, seed=3, method="generic")
    for m in FAST_IDS:
        np.testing.assert_allclose(fast[m], slow[m], rtol=1e-9, atol=1e-10)
    pf = stats.permutation_replicates(X, Y, FAST_IDS, 5, seed=3, method="fast")
    ps = stats.permutation_replicates(X, Y, FAST_IDS, 5, seed=3, method="generic")
    for m in FAST_IDS:
        np.testing.assert_allclose(pf[m], ps[m], rtol=1e-9, atol=1e-10)


def test_replicate_is_the_metric_on_resampled_rows():
    """Replicate b is, independently of any shortcut, the metric function on rows idx_b of both sides."""
    rng = np.random.default_rng(1)
    X, Y = _related(rng, 30, layers=1)
    ids = ["procrustes[distance]", "gram_frobenius", "cka[linear,biased]"]
    reps = stats.bootstrap_replicates(X, Y, ids, 3, seed=11)
    idx = stats.resample_indices(30, 3, seed=11)
    for b in range(3):
        Xb, Yb = X[0][idx[b]], Y[0][idx[b]]
        assert reps["procrustes[distance]"][b, 0, 0] == pytest.approx(M.procrustes(Xb, Yb), rel=1e-9, abs=1e-9)
        assert reps["gram_frobenius"][b, 0, 0] == pytest.approx(M.gram_frobenius(Xb, Yb), rel=1e-9, abs=1e-9)
        assert reps["cka[linear,biased]"][b, 0, 0] == pytest.approx(M.cka(Xb, Yb), rel=1e-9, abs=1e-9)
    perms = stats.permutation_indices(30, 2, seed=5)
    null = stats.permutation_replicates(X, Y, ["procrustes[distance]", "cka"], 2, seed=5)
    for b in range(2):
        assert null["procrustes[distance]"][b, 0, 0] == pytest.approx(
            M.procrustes(X[0], Y[0][perms[b]]), rel=1e-9, abs=1e-9)
        assert null["cka[linear,biased]"][b, 0, 0] == pytest.approx(M.cka(X[0], Y[0][perms[b]]), rel=1e-9, abs=1e-9)


def test_replicates_of_ill_conditioned_features_are_within_the_replicate_tolerance():
    """Features with LayerNorm's exact linear relation and near-null directions (where point estimates need exact
    SVDs): every Procrustes and k-fold residual replicate is within REPLICATE_TOL of the metric on the resample."""
    rng = np.random.default_rng(7)
    n = 120
    base = rng.standard_normal((n, 20))
    X = [base @ rng.standard_normal((20, 90)) + 1e-3 * rng.standard_normal((n, 90)) for _ in range(2)]
    Y = []
    for _ in range(2):
        y = base @ rng.standard_normal((20, 70)) + 0.1 * rng.standard_normal((n, 70))
        y -= y.mean(axis=1, keepdims=True)  # rows sum to zero: an exact linear relation among the features
        y[:, 3] = y[:, 4] + 1e-9 * rng.standard_normal(n)  # a near-null direction
        Y.append(y)
    ids = ["procrustes[distance]", "projection_residual[folds=3]"]
    reps = stats.bootstrap_replicates(X, Y, ids, 3, seed=2)
    idx = stats.resample_indices(n, 3, seed=2)
    for b in range(3):
        for i in range(2):
            for j in range(2):
                Xb, Yb = X[i][idx[b]], Y[j][idx[b]]
                assert reps["procrustes[distance]"][b, i, j] == pytest.approx(
                    M.procrustes(Xb, Yb), rel=stats.REPLICATE_TOL, abs=stats.REPLICATE_TOL)
                assert reps["projection_residual[folds=3]"][b, i, j] == pytest.approx(
                    M.projection_residual(Xb, Yb, folds=3), rel=stats.REPLICATE_TOL, abs=stats.REPLICATE_TOL)


def test_seeded_and_reproducible():
    rng = np.random.default_rng(2)
    X, Y = _related(rng, 25)
    a = stats.bootstrap(X, Y, ["cka"], 8, seed=4)
    b = stats.bootstrap(X, Y, ["cka"], 8, seed=4)
    c = stats.bootstrap(X, Y, ["cka"], 8, seed=5)
    np.testing.assert_array_equal(a["cka[linear,biased]"].replicates, b["cka[linear,biased]"].replicates)
    assert not np.array_equal(a["cka[linear,biased]"].replicates, c["cka[linear,biased]"].replicates)


@pytest.mark.parametrize("metric", ["procrustes[distance]", "gram_frobenius", "cka[linear,biased]"])
def test_interval_contains_estimate_and_shrinks_with_n(metric):
    rng = np.random.default_rng(3)
    widths = {}
    for n in (40, 400):
        X, Y = _related(rng, n, layers=1)
        point = M.get_metric(metric)(X[0], Y[0])
        iv = stats.bootstrap(X, Y, [metric], 60, seed=0)[metric]
        assert iv.low[0, 0] <= point <= iv.high[0, 0]
        assert iv.low[0, 0] < iv.high[0, 0]
        widths[n] = iv.high[0, 0] - iv.low[0, 0]
    # the spread of a smooth statistic scales like 1/√n: 10× the texts → about a third of the width
    assert widths[400] < 0.6 * widths[40]


def test_permutation_pvalue_counts_in_the_similar_direction():
    observed = np.array([[0.1]])
    null = np.array([0.05, 0.2, 0.3, 0.1]).reshape(4, 1, 1)
    # lower = similar: null values ≤ 0.1 are 0.05 and the tie 0.1 → (1 + 2) / 5
    assert stats.permutation_pvalue(observed, null, "lower")[0, 0] == pytest.approx(3 / 5)
    # higher = similar: null values ≥ 0.1 are 0.2, 0.3 and the tie → (1 + 3) / 5
    assert stats.permutation_pvalue(observed, null, "higher")[0, 0] == pytest.approx(4 / 5)


def test_permutation_p_values_small_for_self_comparison():
    rng = np.random.default_rng(4)
    X = _stack(rng, 50, [6, 6])
    Q = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    Y = [2.0 * x @ Q for x in X]  # the same model up to rotation and scale
    ids = ["procrustes[distance]", "gram_frobenius", "cka[linear,biased]"]
    p = stats.permutation_test(X, Y, ids, 99, seed=0)
    for m in ids:
        assert np.diag(p[m]) == pytest.approx([0.01, 0.01])  # 1 / (P + 1): no shuffle is as similar


def test_permutation_p_values_roughly_uniform_for_unrelated_features():
    """Under independence every cell's p-value is uniform on {1/(P+1), ..., 1}: a loose KS test over cells/seeds."""
    ps = []
    for seed in range(4):
        rng = np.random.default_rng(100 + seed)
        X, Y = _stack(rng, 30, [5] * 4), _stack(rng, 30, [4] * 4)
        p = stats.permutation_test(X, Y, ["cka[linear,biased]", "gram_frobenius"], 49, seed=seed)
        ps.extend(np.concatenate([v.ravel() for v in p.values()]))
    ps = np.asarray(ps)
    assert sps.kstest(ps, "uniform").pvalue > 1e-3
    assert 0.35 < ps.mean() < 0.65
    # and a related pair is detected far more often than α
    rng = np.random.default_rng(7)
    X, Y = _related(rng, 30, layers=1, noise=1.0)
    assert stats.permutation_test(X, Y, ["cka"], 99, seed=1)["cka[linear,biased]"][0, 0] <= 0.05


def test_bad_input_is_a_user_error():
    rng = np.random.default_rng(5)
    X, Y = _stack(rng, 20, [3]), _stack(rng, 21, [3])
    with pytest.raises(ValueError, match="same number of rows"):
        stats.bootstrap(X, Y, ["cka"], 5)
    with pytest.raises(ValueError, match="at least 1"):
        stats.bootstrap(X, X, ["cka"], 0)
    with pytest.raises(ValueError):
        stats.bootstrap(X, X, ["no_such_metric"], 3)
