"""projection_residual[folds=K,ridge=auto] (λ by generalised cross-validation per fold) and the reverse direction."""

import numpy as np
import pytest
import torch

from repsim.measures.allpairs import pairwise
from repsim.measures.arrays import prepare
from repsim.measures.families.projection_residual import held_out_fits
from repsim.measures.functions import get_metric, projection_residual
from repsim.measures.registry import metric_names
from repsim.system.errors import UserError

AUTO = "projection_residual[folds=5,ridge=auto]"
REVERSE = "projection_residual[folds=5,ridge=auto,reverse]"


def slow_gcv_residual(X, Y, folds=5, seed=0):
    """Held-out ridge residual, λ per fold by brute-force GCV with explicit hat matrices (numpy only).

    Returns (value, chosen λ per fold). Folds: a seeded permutation of the rows cut into nearly equal parts. Each
    side centred and scaled to unit Frobenius norm; per fold the training rows are re-centred (the intercept),
    H_λ = 𝟙𝟙ᵀ/n + Y(YᵀY + λI)⁻¹Yᵀ, GCV(λ) = n‖(I − H_λ)X‖² / (n − tr H_λ)² over λ = σ_max²·10^t,
    t = −8, −7.875, …, 2; the smallest minimiser is used."""
    X = X - X.mean(0)
    X = X / np.linalg.norm(X)
    Y = Y - Y.mean(0)
    Y = Y / np.linalg.norm(Y)
    n = X.shape[0]
    parts = np.array_split(np.random.default_rng(seed).permutation(n), folds)
    total, chosen = 0.0, []
    for test in parts:
        train = np.setdiff1d(np.arange(n), test)
        mx, my = X[train].mean(0), Y[train].mean(0)
        Xtr, Ytr, Xte, Yte = X[train] - mx, Y[train] - my, X[test] - mx, Y[test] - my
        m = len(train)
        smax = np.linalg.svd(Ytr, compute_uv=False)[0]
        grid = smax ** 2 * 10.0 ** np.linspace(-8, 2, 81)
        scores = []
        for lam in grid:
            H = np.full((m, m), 1.0 / m) + Ytr @ np.linalg.solve(Ytr.T @ Ytr + lam * np.eye(Ytr.shape[1]), Ytr.T)
            scores.append(m * np.sum(((np.eye(m) - H) @ Xtr) ** 2) / (m - np.trace(H)) ** 2)
        lam = grid[int(np.argmin(scores))]
        W = np.linalg.solve(Ytr.T @ Ytr + lam * np.eye(Ytr.shape[1]), Ytr.T @ Xtr)
        total += np.sum((Xte - Yte @ W) ** 2)
        chosen.append(lam)
    return total, np.array(chosen)


def related(rng, n, p, q, noise):
    """A teacher and a student that is a noisy linear map of it."""
    X = rng.standard_normal((n, p)) * np.geomspace(3, 0.1, p)
    return X, X @ rng.standard_normal((p, q)) + noise * rng.standard_normal((n, q))


@pytest.mark.parametrize("seed,n,p,q,noise", [(0, 60, 7, 12, 0.5), (1, 40, 5, 3, 2.0), (2, 30, 6, 40, 0.3),
                                              (3, 80, 20, 10, 5.0)])
def test_in_memory_agrees_with_brute_force_gcv(seed, n, p, q, noise):
    rng = np.random.default_rng(seed)
    X, Y = related(rng, n, p, q, noise)
    want, lams = slow_gcv_residual(X, Y)
    assert projection_residual(X, Y, ridge="auto", folds=5) == pytest.approx(want, rel=1e-9)
    assert get_metric(AUTO)(X, Y) == pytest.approx(want, rel=1e-9)
    chosen = []
    prep = [prepare(torch.as_tensor(a), True, "x") for a in (X, Y)]
    held_out_fits([prep[1]], [prep[0]], 5, "auto", chosen=chosen)
    np.testing.assert_allclose(chosen[0][:, 0, 0].numpy(), lams, rtol=1e-12)  # the same grid point per fold


def test_reverse_predicts_the_student_from_the_teacher():
    rng = np.random.default_rng(4)
    X, Y = related(rng, 50, 8, 5, 1.0)
    assert projection_residual(X, Y, ridge="auto", folds=5, reverse=True) == pytest.approx(
        slow_gcv_residual(Y, X)[0], rel=1e-9)
    assert get_metric(REVERSE)(X, Y) == pytest.approx(projection_residual(Y, X, ridge="auto", folds=5), rel=1e-12)
    assert get_metric("projection_residual[folds=5,reverse]")(X, Y) == pytest.approx(
        projection_residual(Y, X, folds=5), rel=1e-9)


@pytest.mark.parametrize("metric", [AUTO, REVERSE, "projection_residual[folds=4,ridge=0.05,reverse]",
                                    "projection_residual[folds=3,reverse]"])
def test_pairwise_equals_the_in_memory_function(metric):
    rng = np.random.default_rng(5)
    T = [rng.standard_normal((90, 12)) * np.geomspace(4, 0.2, 12) for _ in range(3)]
    S = [T[0] @ rng.standard_normal((12, 9)) + 0.5 * rng.standard_normal((90, 9)), rng.standard_normal((90, 20))]
    spec = get_metric(metric)
    got = pairwise(T, S, [metric])[spec.id]
    want = np.array([[spec(x, y) for y in S] for x in T])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


def test_stays_near_or_below_one_where_the_unregularised_fit_overfits():
    """n = 600 rows, teacher width 768, student 384 (the default pair's shapes): 480 training rows per fold for
    384 student features, where the least-squares held-out residual is far above 1."""
    rng = np.random.default_rng(6)
    z = rng.standard_normal((600, 40)) * np.geomspace(0.5, 0.05, 40)  # a shared 40-dimensional signal
    X = z @ rng.standard_normal((40, 768)) + rng.standard_normal((600, 768))
    Y = z @ rng.standard_normal((40, 384)) + rng.standard_normal((600, 384))
    unrelated = rng.standard_normal((600, 384)) * np.geomspace(3, 0.1, 384)
    old = projection_residual(X, Y, folds=5)
    assert old > 1.5
    auto = projection_residual(X, Y, folds=5, ridge="auto")
    assert 0 <= auto < 1 and auto < old
    reverse = projection_residual(X, Y, folds=5, ridge="auto", reverse=True)
    assert 0 <= reverse < 1
    for value in (projection_residual(X, unrelated, folds=5, ridge="auto"),
                  projection_residual(X, unrelated, folds=5, ridge="auto", reverse=True)):
        assert 1 - 1e-3 < value < 1.02  # an unrelated predictor: the training mean, nearly


@pytest.mark.parametrize("seed", range(3))
def test_a_noisy_linear_map_scores_below_an_unrelated_student(seed):
    rng = np.random.default_rng(seed)
    X, Y = related(rng, 120, 30, 20, 3.0)
    other = rng.standard_normal((120, 20)) * np.geomspace(3, 0.1, 20)
    for metric in (AUTO, REVERSE):
        spec = get_metric(metric)
        assert spec(X, Y) < spec(X, other)


def test_spec_claims_no_invariance_to_invertible_maps_and_the_value_changes():
    for metric in (AUTO, REVERSE):
        spec = get_metric(metric)
        assert "invertible_linear" not in spec.invariances | spec.student_invariances
        assert spec.statistics == "rows" and spec.direction == "lower" and not spec.symmetric
    rng = np.random.default_rng(7)
    X, Y = related(rng, 100, 10, 10, 3.0)
    A = np.diag(np.geomspace(0.02, 50, 10))  # invertible, not a multiple of an orthogonal map
    assert abs(projection_residual(X, Y @ A, folds=5, ridge="auto") - projection_residual(X, Y, folds=5, ridge="auto")
               ) > 5e-3


def test_ids_parse_and_are_registered():
    assert AUTO in metric_names() and REVERSE in metric_names()
    assert get_metric("projection_residual[ ridge=AUTO, folds=5 ]").id == AUTO
    assert get_metric("projection_residual[reverse,folds=5,ridge=auto]").id == REVERSE
    assert get_metric(AUTO).kwargs == {"folds": 5, "ridge": "auto"}
    for bad, why in [("projection_residual[in_sample,ridge=auto]", "needs folds=K"),
                     ("projection_residual[in_sample,reverse]", "reverse is offered with folds=K"),
                     ("projection_residual[folds=5,reverse,reverse]", "expected"),
                     ("projection_residual[folds=5,ridge=sometimes]", "ridge must be a number")]:
        with pytest.raises(UserError, match=why):
            get_metric(bad)
    with pytest.raises(UserError, match="give folds"):
        projection_residual(np.eye(5), np.eye(5), ridge="auto")
