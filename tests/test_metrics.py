"""repsim.measures.functions against published numbers, closed forms and slow formulas written from the definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from slow_formulas import (
    normalised,
    slow_cka,
    slow_gram_frobenius,
    slow_heldout_residual,
    slow_procrustes_distance,
    slow_projection_residual,
    slow_rbf_gram,
    slow_unbiased_hsic,
)

from repsim.measures import functions as metrics
from repsim.measures.functions import cka, gram_frobenius, procrustes, projection_residual
from repsim.measures.linalg import clamp_rounding
from repsim.system.errors import UserError

# slow formulas written from the definitions (n × n matrices, explicit H, explicit minimisation over Q, lstsq):
# tests/slow_formulas.py


def kornblith_demo() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(1337)
    X = rng.randn(100, 10)
    Y = rng.randn(100, 10) + X
    return X, Y


# ---------------------------------------------------------------------------------------------------------------
# published reference values (docs/measures.md §5, docs/pitfalls.md)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "compute, expected",
    [
        (lambda X, Y: cka(X, Y), 0.5576132566),
        (lambda X, Y: cka(X, Y, estimator="debiased"), 0.5134564895),
        (lambda X, Y: cka(X, Y, kernel="rbf", sigma=0.5), 0.6548311823),
        (lambda X, Y: 1 - procrustes(X, Y, output="squared") / 2, 0.7362553106),
        (lambda X, Y: procrustes(X, Y, output="angular"), 0.7432764761),
        (lambda X, Y: procrustes(X, Y, output="squared"), 0.5274893788),
        (lambda X, Y: procrustes(X, Y, output="distance"), 0.7262846403),
        (lambda X, Y: gram_frobenius(X, Y), 0.3129930176),
    ],
    ids=["cka", "cka_debiased", "cka_rbf_0.5", "rho", "angular", "squared", "distance", "gram_frobenius"],
)
def test_published_reference_values(compute, expected):
    X, Y = kornblith_demo()
    assert compute(X, Y) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_debiased_cka_is_the_song_u_statistic_not_the_variants_in_circulation():
    X, Y = kornblith_demo()
    value = cka(X, Y, estimator="debiased")
    assert value == pytest.approx(slow_cka(X @ X.T, Y @ Y.T, slow_unbiased_hsic), rel=1e-12, abs=1e-12)
    for variant in (0.5139463662, 0.4645521269):  # "centre then zero the diagonal"; unbiased over biased
        assert abs(value - variant) > 4e-4
    assert abs(cka(X, Y, kernel="rbf", sigma=0.5) - 0.6548522355) > 2e-5  # torch.median's lower middle value


# ---------------------------------------------------------------------------------------------------------------
# Theorem 1 of the paper: CKA near 1 while Procrustes and Gram-Frobenius stay large
# ---------------------------------------------------------------------------------------------------------------

def theorem1_pair(n: int, m: int, eps: float, d_t: int, d_s: int) -> tuple[np.ndarray, np.ndarray]:
    """Teacher: n/2 rows +e₁, n/2 rows −e₁ in d_t dims; for k < m/2, row k gets +ε·e_{k+2} and row n/2+k gets
    −ε·e_{k+2}. Student: the unperturbed ±e₁ rows in d_s dims."""
    X = np.zeros((n, d_t))
    X[: n // 2, 0], X[n // 2:, 0] = 1.0, -1.0
    for k in range(m // 2):
        X[k, k + 1], X[n // 2 + k, k + 1] = eps, -eps
    Y = np.zeros((n, d_s))
    Y[: n // 2, 0], Y[n // 2:, 0] = 1.0, -1.0
    return X, Y


def theorem1_closed_forms(n: int, m: int, eps: float) -> tuple[float, float, float]:
    """With E = mε²: CKA = (n² + 2E)/(n·√(n² + 4E + 2mε⁴)), ρ = √(n² + 2E)/√(n(n + E)), procrustes = √(2 − 2ρ).
    Gram-Frobenius: K = L + P (P the perturbation's Gram), ‖X‖² = n + E, ‖L‖² = n², ⟨K, L⟩ = n² + 2E,
    ‖K‖² = n² + 4E + 2mε⁴, so ‖K/(n + E) − L/n‖² = ‖K‖²/(n + E)² + 1 − 2⟨K, L⟩/(n(n + E))."""
    E = m * eps**2
    cka_value = (n**2 + 2 * E) / (n * math.sqrt(n**2 + 4 * E + 2 * m * eps**4))
    rho = math.sqrt(n**2 + 2 * E) / math.sqrt(n * (n + E))
    gram = math.sqrt((n**2 + 4 * E + 2 * m * eps**4) / (n + E) ** 2 + 1 - 2 * (n**2 + 2 * E) / (n * (n + E)))
    return cka_value, math.sqrt(2 - 2 * rho), gram


@pytest.mark.parametrize(
    "n, m, eps, d_t, d_s, published",
    [
        (8, 4, math.sqrt(2), 3, 1, (0.883883, 0.647195, 0.5)),
        (20, 4, 3.0, 3, 2, (0.683556, 0.837645, 0.732970)),
        (50, 10, 0.7, 8, 4, None),
        (64, 32, 2.0, 20, 3, None),
    ],
)
def test_theorem1_closed_forms(n, m, eps, d_t, d_s, published):
    X, Y = theorem1_pair(n, m, eps, d_t, d_s)
    measured = (cka(X, Y), procrustes(X, Y), gram_frobenius(X, Y))
    assert measured == pytest.approx(theorem1_closed_forms(n, m, eps), rel=1e-12, abs=1e-12)
    if published is not None:
        assert measured == pytest.approx(published, rel=1e-6, abs=1e-6)


def test_theorem1_limit_cka_to_one_while_procrustes_and_gram_stay_large():
    n, m = 400, 200  # ε² = n/m
    X, Y = theorem1_pair(n, m, math.sqrt(n / m), m // 2 + 1, 2)
    assert cka(X, Y) > 0.99
    assert procrustes(X, Y) == pytest.approx(math.sqrt(2 - math.sqrt(2)), rel=5e-3, abs=5e-3)
    assert gram_frobenius(X, Y) == pytest.approx(0.5, abs=5e-3)


# ---------------------------------------------------------------------------------------------------------------
# agreement with the slow formulas on random shapes (p ≠ q, n < p, n > p; primal and dual paths)
# ---------------------------------------------------------------------------------------------------------------

shapes = st.tuples(st.integers(4, 24), st.integers(1, 30), st.integers(1, 30), st.integers(0, 2**31 - 1))


def random_pair(n: int, p: int, q: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Correlated teacher/student with distinct column means and scales."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)) * rng.uniform(0.5, 3, p) + rng.standard_normal(p)
    Y = X @ rng.standard_normal((p, q)) / math.sqrt(p) + 0.5 * rng.standard_normal((n, q)) + 2.0
    return X, Y


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_procrustes_and_gram_frobenius_agree_with_slow_formulas(shape):
    X, Y = random_pair(*shape)
    distance = slow_procrustes_distance(X, Y)
    assert procrustes(X, Y) == pytest.approx(distance, rel=1e-8, abs=1e-8)
    assert procrustes(X, Y, output="squared") == pytest.approx(distance**2, rel=1e-8, abs=1e-8)
    assert procrustes(X, Y, output="angular") == pytest.approx(math.acos(1 - distance**2 / 2), rel=1e-7, abs=1e-7)
    assert gram_frobenius(X, Y) == pytest.approx(slow_gram_frobenius(X, Y), rel=1e-8, abs=1e-8)
    assert gram_frobenius(X, Y, squared=True) == pytest.approx(slow_gram_frobenius(X, Y) ** 2, rel=1e-8, abs=1e-8)


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_cka_agrees_with_explicit_hsic(shape):
    X, Y = random_pair(*shape)
    K, L = X @ X.T, Y @ Y.T
    assert cka(X, Y) == pytest.approx(slow_cka(K, L), rel=1e-8, abs=1e-8)
    assert cka(X, Y, estimator="debiased") == pytest.approx(slow_cka(K, L, slow_unbiased_hsic), rel=1e-8, abs=1e-8)
    assert cka(X, Y, center=False) == pytest.approx(
        np.sum(K * L) / (np.linalg.norm(K) * np.linalg.norm(L)), rel=1e-8, abs=1e-8)
    for sigma in (0.5, 2.0):
        expected = slow_cka(slow_rbf_gram(X, sigma), slow_rbf_gram(Y, sigma))
        assert cka(X, Y, kernel="rbf", sigma=sigma) == pytest.approx(expected, rel=1e-8, abs=1e-8)


@settings(max_examples=40, deadline=None)
@given(shapes, st.sampled_from([0.0, 1e-3, 0.1]))
def test_projection_residual_agrees_with_lstsq(shape, ridge):
    X, Y = random_pair(*shape)
    assert projection_residual(X, Y, ridge=ridge) == pytest.approx(
        slow_projection_residual(X, Y, ridge), rel=1e-8, abs=1e-8)


@settings(max_examples=30, deadline=None)
@given(st.integers(12, 40), st.integers(1, 30), st.integers(1, 30), st.integers(0, 2**31 - 1),
       st.integers(2, 6), st.integers(0, 100))
def test_heldout_residual_agrees_with_explicit_fold_loop(n, p, q, data_seed, folds, seed):
    X, Y = random_pair(n, p, q, data_seed)
    expected = slow_heldout_residual(X, Y, folds, seed)
    # relative as well: with near-singular training folds the residual itself can reach 1e8 (wild overfitting)
    assert projection_residual(X, Y, folds=folds, seed=seed) == pytest.approx(expected, abs=1e-8, rel=1e-9)


def test_heldout_intercept_equals_an_appended_constant_column_when_train_folds_have_full_rank():
    X, Y = random_pair(60, 7, 5, 3)
    Xn, Yn = normalised(X), normalised(Y)
    total = 0.0
    for test in np.array_split(np.random.default_rng(11).permutation(60), 4):
        train = np.setdiff1d(np.arange(60), test)
        design = np.column_stack([Yn, np.ones(60)])
        W = np.linalg.lstsq(design[train], Xn[train], rcond=None)[0]
        total += np.linalg.norm(Xn[test] - design[test] @ W) ** 2
    assert projection_residual(X, Y, folds=4, seed=11) == pytest.approx(total, rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("n, p, q", [(6, 200, 150), (300, 3, 4), (40, 40, 40), (10, 1, 1)])
def test_primal_and_dual_regimes_agree_with_slow_formulas(n, p, q):
    X, Y = random_pair(n, p, q, 0)
    assert procrustes(X, Y) == pytest.approx(slow_procrustes_distance(X, Y), rel=1e-9, abs=1e-9)
    assert gram_frobenius(X, Y) == pytest.approx(slow_gram_frobenius(X, Y), rel=1e-9, abs=1e-9)
    assert cka(X, Y) == pytest.approx(slow_cka(X @ X.T, Y @ Y.T), rel=1e-9, abs=1e-9)
    assert cka(X, Y, estimator="debiased") == pytest.approx(
        slow_cka(X @ X.T, Y @ Y.T, slow_unbiased_hsic), rel=1e-9, abs=1e-9)
    assert projection_residual(X, Y) == pytest.approx(slow_projection_residual(X, Y), rel=1e-9, abs=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# near-identical inputs (docs/pitfalls.md, item 8: feature-space formulas square the condition number)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, p", [(200, 10), (5, 50), (60, 60)])
def test_near_identical_inputs_keep_their_tiny_distances(n, p):
    rng = np.random.default_rng(5)
    X = rng.standard_normal((n, p))
    Y = X + 1e-9 * rng.standard_normal((n, p))
    expected = slow_procrustes_distance(X, Y)  # a residual, computed directly: no cancellation
    assert 0 < expected < 1e-8
    assert procrustes(X, Y) == pytest.approx(expected, rel=1e-3)
    assert procrustes(X, Y, output="angular") == pytest.approx(expected, rel=1e-3)  # angle ≈ chord when tiny
    assert gram_frobenius(X, Y) == pytest.approx(slow_gram_frobenius(X, Y), rel=1e-3)
    assert procrustes(X, X) < 1e-14
    assert gram_frobenius(X, X) < 1e-14
    assert cka(X, Y) == pytest.approx(1.0, abs=1e-12)


def test_rounding_check_clamps_silently_only_at_rounding_level():
    tiny = torch.tensor(-1e-17, dtype=torch.float64)
    assert float(clamp_rounding(tiny, 0.0, 2.0, 1e-13, "x")) == 0.0
    with pytest.warns(RuntimeWarning, match="outside"):
        clamp_rounding(torch.tensor(-1e-3, dtype=torch.float64), 0.0, 2.0, 1e-13, "x")


# ---------------------------------------------------------------------------------------------------------------
# numpy / torch boundary and precision
# ---------------------------------------------------------------------------------------------------------------

ALL_CALLS = [
    lambda X, Y, **kw: procrustes(X, Y, **kw),
    lambda X, Y, **kw: procrustes(X, Y, output="angular", **kw),
    lambda X, Y, **kw: gram_frobenius(X, Y, **kw),
    lambda X, Y, **kw: cka(X, Y, **kw),
    lambda X, Y, **kw: cka(X, Y, estimator="debiased", **kw),
    lambda X, Y, **kw: cka(X, Y, kernel="rbf", sigma=0.8, **kw),
    lambda X, Y, **kw: projection_residual(X, Y, **kw),
    lambda X, Y, **kw: projection_residual(X, Y, folds=3, **kw),
]


@pytest.mark.parametrize("call", ALL_CALLS)
def test_torch_input_returns_a_0dim_float64_tensor_equal_to_the_numpy_result(call):
    X, Y = random_pair(30, 6, 4, 1)
    X32, Y32 = torch.tensor(X, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32)
    from_numpy = call(X32.numpy(), Y32.numpy())
    assert isinstance(from_numpy, float)
    from_torch = call(X32, Y32)
    assert isinstance(from_torch, torch.Tensor) and from_torch.ndim == 0
    assert from_torch.dtype == torch.float64  # float32 in, float64 arithmetic by default
    assert float(from_torch) == pytest.approx(from_numpy, rel=1e-12, abs=1e-12)
    in_float32 = call(X32, Y32, dtype=torch.float32)
    assert in_float32.dtype == torch.float32 and float(in_float32) == pytest.approx(from_numpy, rel=1e-4, abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# bad input: each is a ValueError (UserError) that names the problem
# ---------------------------------------------------------------------------------------------------------------

GOOD = np.random.default_rng(0).standard_normal((10, 3))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: procrustes(GOOD, GOOD[:9]), "same number of rows"),
        (lambda: cka(GOOD[:1], GOOD[:1]), "at least 2 samples"),
        (lambda: cka(GOOD[:3], GOOD[:3], estimator="debiased"), "at least 4 samples"),
        (lambda: gram_frobenius(np.where(np.eye(10, 3) > 0, np.nan, GOOD), GOOD), "NaN or inf"),
        (lambda: projection_residual(GOOD, np.full((10, 3), np.inf)), "NaN or inf"),
        (lambda: procrustes(GOOD[:, 0], GOOD), "2-D"),
        (lambda: procrustes(GOOD, np.ones((10, 3))), "zero variance"),
        (lambda: cka(np.ones((10, 3)), GOOD), "zero variance"),
        (lambda: procrustes(GOOD, GOOD, output="similarity"), "output"),
        (lambda: cka(GOOD, GOOD, kernel="poly"), "kernel"),
        (lambda: cka(GOOD, GOOD, estimator="song"), "estimator"),
        (lambda: cka(GOOD, GOOD, kernel="rbf", sigma=0), "sigma"),
        (lambda: projection_residual(GOOD, GOOD, ridge=-1), "ridge"),
        (lambda: projection_residual(GOOD, GOOD, folds=1), "folds"),
        (lambda: projection_residual(GOOD, GOOD, folds=11), "folds"),
        (lambda: projection_residual(GOOD[:3], GOOD[:3], folds=2), "fewer than 2 training rows"),
        (lambda: cka(np.vstack([np.zeros((8, 3)), GOOD[:2]]), GOOD, kernel="rbf"), "median squared distance"),
        (lambda: metrics.get_metric("cosine"), "unknown metric"),
        (lambda: metrics.get_metric("cka[poly]"), "cka"),
        (lambda: metrics.get_metric("procrustes[similarity]"), "procrustes"),
        (lambda: metrics.get_metric("projection_residual[folds=1]"), "folds"),
        (lambda: metrics.get_metric("cka[linear,sigma=2]"), "sigma"),
    ],
)
def test_bad_input_raises_a_value_error_that_names_the_problem(call, message):
    with pytest.raises(UserError, match=message) as info:
        call()
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# optional peer cross-check
# ---------------------------------------------------------------------------------------------------------------

def test_agrees_with_ckatorch_on_linear_cka_and_differs_on_its_rbf_median():
    import ckatorch.core as ckatorch_core  # a [test] dependency: the cross-check never skips
    X, Y = kornblith_demo()
    Xt, Yt = torch.tensor(X), torch.tensor(Y)
    assert cka(X, Y) == pytest.approx(float(ckatorch_core.cka_base(Xt, Yt)), rel=1e-12, abs=1e-12)
    assert cka(X, Y, estimator="debiased") == pytest.approx(
        float(ckatorch_core.cka_base(Xt, Yt, unbiased=True)), rel=1e-12, abs=1e-12)
    # ckatorch takes torch.median (the lower middle value) where Kornblith's convention is numpy's median
    theirs = float(ckatorch_core.cka_base(Xt, Yt, kernel="rbf", threshold=0.5))
    assert theirs == pytest.approx(0.6548522355, abs=1e-9)
    assert cka(X, Y, kernel="rbf", sigma=0.5) == pytest.approx(0.6548311823, abs=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n, p, q", [(40, 6, 4), (8, 50, 30), (500, 64, 32)])
@pytest.mark.parametrize("call", ALL_CALLS)
def test_cuda_tensors_give_the_cpu_value_on_the_device(call, n, p, q):
    X, Y = random_pair(n, p, q, 2)
    on_cuda = call(torch.tensor(X, device="cuda"), torch.tensor(Y, device="cuda"))
    assert on_cuda.device.type == "cuda" and on_cuda.ndim == 0 and on_cuda.dtype == torch.float64
    assert float(on_cuda) == pytest.approx(call(X, Y), rel=1e-10, abs=1e-10)
    near = torch.tensor(X + 1e-9 * np.random.default_rng(0).standard_normal(X.shape), device="cuda")
    assert float(procrustes(torch.tensor(X, device="cuda"), near)) == pytest.approx(
        slow_procrustes_distance(X, near.cpu().numpy()), rel=1e-3)
