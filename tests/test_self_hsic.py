"""Debiased CKA when a side's self-HSIC is 0 in exact arithmetic: every engine raises the same UserError instead of
returning a ratio of rounding noise, and the rounding rule (repsim.measures.arrays.check_self_hsic) changes nothing on
ordinary or nearly degenerate but valid data."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from repsim import cka
from repsim.analysis.stats import bootstrap_replicates, resample_indices
from repsim.measures.allpairs import pairwise
from repsim.measures.arrays import HSIC_ROUNDING_FACTOR
from repsim.measures.losses import CKALoss
from repsim.measures.moments import CrossMoments
from repsim.system.errors import UserError

DEBIASED = "cka[linear,debiased]"
MESSAGE = "debiased HSIC of .* with itself is not positive beyond rounding"


def exact_self_hsic(X) -> Fraction:
    """n(n−3)·HSIC_u(K, K) of K = XXᵀ in exact rational arithmetic (Song et al. 2012, eq. 5, zero-diagonal K̃):
    tr(K̃²) + (1ᵀK̃1)²/((n−1)(n−2)) − 2/(n−2)·‖K̃1‖²."""
    R = [[Fraction(float(v)) for v in row] for row in X]
    n = len(R)
    K = [[sum((a * b for a, b in zip(R[i], R[j], strict=True)), Fraction(0)) if i != j else Fraction(0)
          for j in range(n)] for i in range(n)]
    rows = [sum(r, Fraction(0)) for r in K]
    total = sum(rows, Fraction(0))
    return (sum(v * v for r in K for v in r) + total * total / ((n - 1) * (n - 2))
            - Fraction(2, n - 2) * sum(r * r for r in rows))


def magnitude(X) -> Fraction:
    """M = ‖K‖²_F + n/(n−2)·Σ‖x_i‖⁴ + (Σ‖x_i‖²)²/((n−1)(n−2)) of the centred rows, exactly (repsim.measures.arrays)."""
    R = [[Fraction(float(v)) for v in row] for row in X]
    n, p = len(R), len(R[0])
    mean = [sum((r[j] for r in R), Fraction(0)) / n for j in range(p)]
    C = [[r[j] - mean[j] for j in range(p)] for r in R]
    a = [sum((v * v for v in r), Fraction(0)) for r in C]
    K2 = sum(sum((x * y for x, y in zip(C[i], C[k], strict=True)), Fraction(0)) ** 2
             for i in range(n) for k in range(n))
    return K2 + Fraction(n, n - 2) * sum(v * v for v in a) + sum(a) ** 2 / ((n - 1) * (n - 2))


def engine_values(X: np.ndarray, Y: np.ndarray) -> dict[str, float]:
    """Debiased linear CKA of (X, Y) from each engine."""
    return {
        "cka": cka(X, Y, estimator="debiased"),
        "pairwise": float(pairwise([X], [Y], [DEBIASED])[DEBIASED][0, 0]),
        "moments": CrossMoments(X.shape[1], Y.shape[1]).update(X, Y).cka("debiased"),
        "loss": 1.0 - float(CKALoss("debiased")(torch.from_numpy(X), torch.from_numpy(Y))),
    }


def single_row_teacher(n: int, p: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = np.zeros((n, p))
    X[0] = rng.standard_normal(p) * 2.0 ** rng.integers(-40, 40)
    return X, rng.standard_normal((n, 5))


@pytest.mark.parametrize("n", [4, 5, 8, 13, 21])
def test_one_row_differing_or_one_hot_rows_have_exactly_zero_self_hsic(n):
    """The fact the rule rests on: ‖U(K)‖² = 0 exactly when the rows are a common point plus mutually orthogonal
    offsets (all rows equal but one; one-hot rows), while generic rows give a positive value."""
    rng = np.random.default_rng(n)
    X, _ = single_row_teacher(n, 3, n)
    assert exact_self_hsic(X) == 0
    assert exact_self_hsic(X + rng.integers(-9, 9, size=3)) == 0  # translation invariant
    assert exact_self_hsic(np.eye(n)) == 0
    assert exact_self_hsic(np.diag(rng.integers(1, 9, size=n)) + 2.0) == 0
    assert exact_self_hsic(rng.integers(-9, 9, size=(n, 3))) > 0


@pytest.mark.parametrize("n", range(4, 41))
def test_single_nonzero_row_teacher_raises_in_every_engine(n):
    X, Y = single_row_teacher(n, 6, seed=n)
    with pytest.raises(UserError, match=MESSAGE):
        cka(X, Y, estimator="debiased")
    with pytest.raises(UserError, match=MESSAGE):
        cka(X[:, :1], Y, estimator="debiased")  # n > p: the primal (feature-space) form
    with pytest.raises(UserError, match=MESSAGE):
        cka(Y, np.tile(X, 10), estimator="debiased")  # the student side, through the n × n Gram form
    with pytest.raises(UserError, match=MESSAGE):
        pairwise([Y, X], [Y], [DEBIASED])
    with pytest.raises(UserError, match=MESSAGE):
        CrossMoments(6, 5).update(X[: n // 2], Y[: n // 2]).update(X[n // 2:], Y[n // 2:]).cka("debiased")
    with pytest.raises(UserError, match=MESSAGE):
        CKALoss("debiased")(torch.from_numpy(X), torch.from_numpy(Y))


def test_bootstrap_replicate_with_the_row_drawn_once_raises():
    """A resample holding the non-zero row exactly once is again all rows equal but one."""
    n = 12
    X, Y = single_row_teacher(n, 6, seed=1)
    seed = next(s for s in range(100) if (resample_indices(n, 1, s)[0] == 0).sum() == 1)
    with pytest.raises(UserError, match=MESSAGE):
        bootstrap_replicates([X], [Y], [DEBIASED], 1, seed=seed, method="generic")


@pytest.mark.parametrize("n", [4, 8, 40])
def test_nearly_degenerate_but_valid_teacher_gives_the_same_value_everywhere(n):
    """A second row 1e-3 times a random vector: the exact self-HSIC is more than 1000 times the rounding bound
    HSIC_ROUNDING_FACTOR·n·eps·M, so every engine returns a value, and they agree."""
    rng = np.random.default_rng(n)
    X = np.zeros((n, 6))
    X[0] = rng.standard_normal(6)
    X[1] = 1e-3 * rng.standard_normal(6)
    Y = rng.standard_normal((n, 5))
    bound = HSIC_ROUNDING_FACTOR * n * np.finfo(np.float64).eps
    assert exact_self_hsic(X) / magnitude(X) > 1000 * bound
    values = engine_values(X, Y)
    for name, value in values.items():
        assert value == pytest.approx(values["cka"], rel=1e-6, abs=1e-9), name


@settings(max_examples=40)
@given(n=st.integers(4, 30), p=st.integers(1, 8), q=st.integers(1, 8), exponent=st.integers(-60, 60),
       offset=st.floats(-3, 3), seed=st.integers(0, 2**32 - 1))
def test_engines_agree_on_generic_data_of_any_scale(n, p, q, exponent, offset, seed):
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((n, p)) + offset) * 2.0 ** exponent
    Y = rng.standard_normal((n, q)) * 10.0 ** (exponent / 4)
    values = engine_values(X, Y)
    for name, value in values.items():
        assert value == pytest.approx(values["cka"], rel=1e-7, abs=1e-9), name
