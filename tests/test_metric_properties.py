"""Theorems about the metrics, for all inputs: invariances read from the registry (both ways), metric axioms,
zero sets and the projection residual's blind spot."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repsim.measures.functions import (
    DEFAULT_METRICS,
    METRICS,
    TRANSFORMS,
    MetricSpec,
    cka,
    get_metric,
    gram_frobenius,
    procrustes,
    projection_residual,
)
from repsim.measures.registry import metric_names

#: every registered metric (a family registered later is covered here too), plus parameterised conventions
SPECS = sorted(
    {s.id: s for s in map(get_metric, (*metric_names(), "cka[rbf,sigma=0.5]", "cka[rbf,sigma=2,debiased]",
                                       "projection_residual[folds=3]", "projection_residual[in_sample,ridge=0.01]"))
     }.values(),
    key=lambda s: s.id,
)
seeds = st.integers(0, 2**31 - 1)


def random_orthogonal(rng: np.random.Generator, width: int) -> np.ndarray:
    Q, R = np.linalg.qr(rng.standard_normal((width, width)))
    return Q * np.sign(np.diag(R))


def transform(kind: str, A: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply one of TRANSFORMS to the features (columns) of A."""
    width = A.shape[1]
    if kind == "translation":
        return A + 5 * rng.standard_normal(width)
    if kind == "isotropic_scale":
        return A * rng.uniform(0.1, 10)
    if kind == "orthogonal":
        return A @ random_orthogonal(rng, width)
    if kind == "permutation":
        return A[:, np.roll(np.arange(width), 1 + int(rng.integers(width - 1)))]  # never the identity
    if kind == "invertible_linear":  # anisotropic: singular values spread over [0.2, 5]
        return A @ random_orthogonal(rng, width) @ np.diag(np.geomspace(0.2, 5, width)) @ random_orthogonal(rng, width)
    raise AssertionError(kind)


def teacher_student(seed: int, n: int = 40, p: int = 12, q: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """Related but not linearly equivalent sides, with n > q + 1 so that no residual is trivially 0, n > p + q so
    that canonical correlations are not 1 by construction, and widths above 10 so that svcca[k=10] reduces them."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)) * np.geomspace(3, 0.5, p)
    Y = np.tanh(X @ rng.standard_normal((p, q))) + 0.3 * rng.standard_normal((n, q))
    return X, Y


def expected_invariant(spec: MetricSpec, kind: str, side: str) -> bool:
    return kind in spec.invariances or (side == "student" and kind in spec.student_invariances)


def value_after(spec: MetricSpec, kind: str, side: str, X: np.ndarray, Y: np.ndarray, seed: int) -> float:
    rng = np.random.default_rng(seed)
    return spec(transform(kind, X, rng), Y) if side == "teacher" else spec(X, transform(kind, Y, rng))


def test_registry_holds_the_canonical_ids_with_their_conventions():
    assert set(DEFAULT_METRICS) <= set(METRICS)
    for canonical in ("procrustes[distance]", "procrustes[angular]", "procrustes[squared]", "gram_frobenius",
                      "gram_frobenius[squared]", "cka[linear,biased]", "cka[linear,debiased]", "cka[rbf,sigma=1]",
                      "projection_residual[in_sample]", "projection_residual[folds=5]"):
        spec = METRICS[canonical]
        assert spec.id == canonical and get_metric(canonical) == spec
        assert spec.direction in ("lower", "higher") and spec.direction in spec.label
        assert spec.range[0] < spec.range[1] and spec.invariances <= set(TRANSFORMS)
    for alias, canonical in [("procrustes", "procrustes[distance]"), ("cka", "cka[linear,biased]"),
                             ("cka[debiased]", "cka[linear,debiased]"), ("angular", "procrustes[angular]"),
                             ("projection_residual", "projection_residual[folds=5]"),
                             (" CKA[ rbf , sigma=0.50 ] ", "cka[rbf,sigma=0.5]")]:
        assert get_metric(alias).id == canonical
    assert get_metric("cka[rbf,sigma=0.5]").kwargs["sigma"] == 0.5
    assert get_metric("projection_residual[folds=10]").kwargs["folds"] == 10


def test_a_spec_computes_its_function_with_its_convention():
    X, Y = teacher_student(0)
    assert get_metric("angular")(X, Y) == procrustes(X, Y, output="angular")
    assert get_metric("cka[rbf,sigma=0.5]")(X, Y) == cka(X, Y, kernel="rbf", sigma=0.5)
    assert get_metric("projection_residual")(X, Y) == projection_residual(X, Y, folds=5)
    assert get_metric("gram_frobenius[squared]")(X, Y) == gram_frobenius(X, Y, squared=True)


# ---------------------------------------------------------------------------------------------------------------
# the invariance table, both ways
# ---------------------------------------------------------------------------------------------------------------

INVARIANT_CASES = [(s, k, side) for s in SPECS for k in TRANSFORMS for side in ("teacher", "student")
                   if expected_invariant(s, k, side)]
CHANGING_CASES = [(s, k, side) for s in SPECS for k in TRANSFORMS for side in ("teacher", "student")
                  if not expected_invariant(s, k, side)]


@pytest.mark.parametrize("spec, kind, side", INVARIANT_CASES, ids=lambda v: getattr(v, "id", v))
@settings(max_examples=4, deadline=None)
@given(data_seed=seeds, transform_seed=seeds)
def test_declared_invariance_holds(spec, kind, side, data_seed, transform_seed):
    X, Y = teacher_student(data_seed)
    assert value_after(spec, kind, side, X, Y, transform_seed) == pytest.approx(spec(X, Y), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("spec, kind, side", CHANGING_CASES, ids=lambda v: getattr(v, "id", v))
def test_undeclared_transformation_changes_the_value(spec, kind, side):
    X, Y = teacher_student(7)
    assert abs(value_after(spec, kind, side, X, Y, 8) - spec(X, Y)) > 1e-3


def test_every_metric_is_changed_by_some_transformation_and_each_transformation_is_tested_both_ways():
    # canonical correlations (and full whitening) see only the column spaces: invariant to every map in the table
    affine_invariant = {s.id for s in SPECS if set(TRANSFORMS) <= s.invariances}
    assert affine_invariant == {"cca[mean_r]", "cca[mean_r2]", "shape[alpha=0]"}
    assert {s.id for s, _, _ in CHANGING_CASES} == {s.id for s in SPECS} - affine_invariant
    assert {k for _, k, _ in INVARIANT_CASES} == set(TRANSFORMS)


def test_without_centring_translation_is_no_longer_invisible():
    X, Y = teacher_student(1)
    shifted = X + 3.0
    for metric in (procrustes, gram_frobenius, cka, projection_residual):
        assert abs(metric(shifted, Y, center=False) - metric(X, Y, center=False)) > 1e-3
        assert metric(shifted, Y) == pytest.approx(metric(X, Y), rel=1e-9, abs=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# metric axioms
# ---------------------------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(seeds, st.integers(3, 20), st.lists(st.integers(1, 8), min_size=3, max_size=3),
       st.floats(0.05, 2.0), st.floats(0.05, 2.0))
def test_triangle_inequality_for_procrustes_distance_and_angle(seed, n, widths, noise1, noise2):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, widths[0]))
    B = A @ rng.standard_normal((widths[0], widths[1])) + noise1 * rng.standard_normal((n, widths[1]))
    C = B @ rng.standard_normal((widths[1], widths[2])) + noise2 * rng.standard_normal((n, widths[2]))
    for output in ("distance", "angular"):
        d = {(i, j): procrustes(u, v, output=output) for i, u in enumerate((A, B, C)) for j, v in enumerate((A, B, C))}
        for i, j, k in [(0, 1, 2), (0, 2, 1), (1, 0, 2)]:
            assert d[i, k] <= d[i, j] + d[j, k] + 1e-12


@settings(max_examples=40, deadline=None)
@given(seeds, st.integers(3, 30), st.integers(1, 12), st.integers(1, 12), st.floats(0.0, 3.0))
def test_gram_frobenius_is_at_most_twice_procrustes(seed, n, p, q, noise):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p))
    Y = X @ rng.standard_normal((p, q)) + noise * rng.standard_normal((n, q))
    assert gram_frobenius(X, Y) <= 2 * procrustes(X, Y) + 1e-12


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
def test_symmetric_exactly_where_declared(spec):
    X, Y = teacher_student(3)
    if spec.symmetric:
        assert spec(Y, X) == pytest.approx(spec(X, Y), rel=1e-10, abs=1e-10)
    else:
        assert abs(spec(Y, X) - spec(X, Y)) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# zero sets
# ---------------------------------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(seeds, st.integers(3, 30), st.integers(1, 10), st.integers(0, 6), st.booleans())
def test_zero_for_an_orthogonal_transform_up_to_zero_padding(seed, n, width, extra, student_wider):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, width))
    Y = np.hstack([X, np.zeros((n, extra))]) @ random_orthogonal(rng, width + extra)
    Y = rng.uniform(0.1, 10) * Y + rng.standard_normal(width + extra)  # and any shift and scale
    if not student_wider:
        X, Y = Y, X
    assert procrustes(X, Y) < 1e-10
    assert gram_frobenius(X, Y) < 1e-10
    assert cka(X, Y) == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(seeds, st.integers(8, 30), st.integers(2, 8))
def test_positive_for_a_map_that_is_not_orthogonal(seed, n, width):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, width))
    stretch = np.ones(width)
    stretch[0] = 3.0  # one direction stretched three-fold relative to the rest
    Y = X @ random_orthogonal(rng, width) @ np.diag(stretch)
    assert procrustes(X, Y) > 1e-3 and gram_frobenius(X, Y) > 1e-3
    assert projection_residual(X, Y) < 1e-20  # while the projection residual cannot see it


def test_projection_residual_is_zero_for_an_invertible_linear_map_of_the_teacher_though_geometry_differs():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((50, 6))
    Y = transform("invertible_linear", X, rng) + 1.5
    assert projection_residual(X, Y) < 1e-20
    assert projection_residual(X, Y, folds=5) < 1e-20
    assert procrustes(X, Y) > 0.1 and gram_frobenius(X, Y) > 0.1 and cka(X, Y) < 0.95


@settings(max_examples=15, deadline=None)
@given(seeds, st.integers(5, 30), st.integers(0, 10))
def test_in_sample_residual_vanishes_once_the_centred_student_reaches_rank_n_minus_1(seed, n, extra):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 4))
    Y = rng.standard_normal((n, n - 1 + extra))  # unrelated to the teacher
    assert projection_residual(X, Y) < 1e-20


def test_held_out_residual_is_not_blind_where_in_sample_is():
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((30, 8)), rng.standard_normal((30, 40))  # n = 30, q = 40: unrelated sides
    assert projection_residual(X, Y) < 1e-20
    assert projection_residual(X, Y, folds=5) > 0.5
    assert projection_residual(X, Y, folds=5, seed=1) > 0.5
