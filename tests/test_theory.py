"""Theorems and counterexamples of repsim.theory, checked against repsim.measures.functions and independent
formulas."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import repsim.theory as theory
from repsim import cli
from repsim.measures import functions as metrics
from repsim.system.errors import UserError
from repsim.theory.constructions import three_metrics

TOL = 1e-9


# ------------------------------------------------------------------------------------ Theorem 1


@pytest.mark.parametrize(
    ("n", "m", "eps", "d_t", "d_s", "ref_cka", "ref_proc", "ref_gram"),
    [(8, 4, math.sqrt(2), 3, 1, 0.883883, 0.647195, 0.5), (20, 4, 3.0, 3, 2, 0.683556, 0.837645, 0.732970)],
)
def test_theorem1_reference_values(n, m, eps, d_t, d_s, ref_cka, ref_proc, ref_gram):
    th = theory.theorem1(n, m, eps, d_t=d_t, d_s=d_s)
    cf, meas = th.closed_form, th.measured()
    for key, ref in [("cka[linear,biased]", ref_cka), ("procrustes[distance]", ref_proc), ("gram_frobenius", ref_gram)]:
        assert abs(cf[key] - meas[key]) < TOL, key
        assert round(cf[key], 6) == pytest.approx(ref, rel=1e-12, abs=1e-12), key


@settings(max_examples=40, deadline=None)
@given(half=st.integers(1, 30), pairs=st.integers(0, 30), eps=st.floats(0.0, 20.0), extra_t=st.integers(0, 3),
       d_s=st.integers(1, 4))
def test_theorem1_closed_forms_match_metrics(half, pairs, eps, extra_t, d_s):
    n = 2 * half
    m = 2 * min(pairs, half)
    th = theory.theorem1(n, m, eps, d_t=1 + m // 2 + extra_t, d_s=d_s)
    cf, meas = th.closed_form, th.measured()
    for key in ("cka[linear,biased]", "procrustes[distance]", "gram_frobenius", "procrustes_rho"):
        # Procrustes distance is √(2−2ρ): near ρ = 1 a 1e-16 error in ρ becomes 1e-8 in the distance
        tol = 1e-7 if key == "procrustes[distance]" and cf[key] < 1e-6 else TOL
        assert abs(cf[key] - meas[key]) < tol, (key, cf[key], meas[key])


def test_theorem1_construction_and_sign_convention():
    th = theory.theorem1(8, 4, 2.0)
    b = th.teacher
    # row n/2+k is exactly −(row k): the teacher is centred, the perturbations antipodal
    np.testing.assert_array_equal(b[4:], -b[:4])
    np.testing.assert_array_equal(b.mean(axis=0), np.zeros(3))
    assert b[0].tolist() == [1.0, 2.0, 0.0] and b[1].tolist() == [1.0, 0.0, 2.0] and b[2].tolist() == [1.0, 0.0, 0.0]
    # (a) and (c) are the same configuration up to zero padding: every metric says identical
    a_vs_c = three_metrics(th.teacher_unperturbed, th.student)
    assert a_vs_c["procrustes[distance]"] < 1e-7 and a_vs_c["gram_frobenius"] < TOL
    assert abs(a_vs_c["cka[linear,biased]"] - 1) < TOL
    # uncentred cosines that show the distortion
    cos = theory.cosine_matrix(b)
    assert abs(cos[0, 1] - th.cosines()["teacher_cos_two_perturbed"]) < TOL
    assert abs(cos[0, 2] - th.cosines()["teacher_cos_perturbed_vs_axis"]) < TOL


def test_theorem1_sweep_limits():
    sweep = theory.theorem1_sweep(ms=(4, 16, 64, 256, 4096, 2**20), measure_up_to=256)
    measured = sweep.dropna()
    for key in ("cka[linear,biased]", "procrustes[distance]", "gram_frobenius"):
        np.testing.assert_allclose(measured[key], measured[f"measured {key}"], atol=TOL)
    last = sweep.iloc[-1]
    assert 1 - last["cka[linear,biased]"] < 1e-5
    assert abs(last["procrustes[distance]"] - math.sqrt(2 - math.sqrt(2))) < 1e-5
    assert abs(last["gram_frobenius"] - 0.5) < 1e-5
    # CKA rises monotonically towards 1 from m = 8 on, while both distances rise towards their limits
    tail = sweep[sweep.m >= 8]
    assert tail["cka[linear,biased]"].is_monotonic_increasing
    assert tail["procrustes[distance]"].is_monotonic_increasing and tail["gram_frobenius"].is_monotonic_increasing


def test_near_orthogonal_variant_asymptotics():
    m, eps = 4, 3.0
    near = theory.near_orthogonal_sweep(ns=(100, 1000, 10000, 100000), m=m, eps=eps)
    E = m * eps**2
    big = near.iloc[-1]
    n = big["n"]
    # 1 − CKA ≈ m ε⁴ / n², Procrustes ≈ √(E/n), Gram-Frobenius ≈ √(E² + 2mε⁴)/n
    assert big["1 - cka"] * n**2 / (m * eps**4) == pytest.approx(1, rel=1e-2)
    # CKA's own distance √(2 − 2·CKA) ≈ √(2m)·ε²/n falls like 1/n, as Gram-Frobenius does (1 − CKA is not a distance)
    assert big["cka_distance"] * n / (math.sqrt(2 * m) * eps**2) == pytest.approx(1, rel=1e-2)
    assert near["cka_distance"].to_numpy() == pytest.approx(np.sqrt(2 - 2 * near["cka[linear,biased]"]), rel=1e-6)
    assert big["procrustes[distance]"] / math.sqrt(E / n) == pytest.approx(1, rel=1e-2)
    assert big["gram_frobenius"] * n / math.sqrt(E**2 + 2 * m * eps**4) == pytest.approx(1, rel=1e-2)
    # measured at n = 1000 (the closed form is the metric)
    th = theory.theorem1(1000, m, eps)
    meas = th.measured()
    row = near[near.n == 1000].iloc[0]
    assert abs(meas["cka[linear,biased]"] - row["cka[linear,biased]"]) < TOL


@pytest.mark.parametrize("bad", [dict(n=7, m=2, eps=1.0), dict(n=8, m=3, eps=1.0), dict(n=8, m=10, eps=1.0),
                                 dict(n=8, m=4, eps=-1.0), dict(n=8, m=4, eps=1.0, d_t=2)])
def test_theorem1_bad_parameters(bad):
    with pytest.raises(UserError):
        theory.theorem1(**bad)


# ------------------------------------------------------------------------------------ projection


def test_projection_counterexample_zero_loss_and_cosine():
    pc = theory.projection_counterexample()
    assert pc.loss <= 1e-30  # exact least squares: W = S⁻¹, machine precision
    np.testing.assert_allclose(pc.student @ pc.map, pc.teacher, atol=1e-15)
    assert pc.teacher_cos_12 == 0.0
    assert abs(pc.student_cos_12 - 0.99 / math.sqrt(1 + 0.99**2)) < 1e-15
    assert f"{pc.student_cos_12:.4f}" == "0.7035"
    # the normalised residual of repsim.measures.functions agrees, while the geometric metrics see the distortion
    assert metrics.projection_residual(pc.teacher, pc.student) < 1e-28
    assert pc.metrics["procrustes[distance]"] > 0.3 and pc.metrics["gram_frobenius"] > 0.4


def test_invertible_map_gives_zero_projection_residual_even_held_out():
    lm = theory.linear_map_counterexample(n=200, d=8, condition=10.0, seed=3)
    assert lm.projection_loss < 1e-25
    assert lm.metrics["projection_residual[in_sample]"] < 1e-25
    assert lm.metrics["projection_residual[folds=5]"] < 1e-25
    assert lm.metrics["procrustes[distance]"] > 0.3
    assert lm.max_angle_change_deg > 30
    assert np.linalg.cond(lm.A) == pytest.approx(10.0, rel=1e-9)
    # an orthogonal A (condition 1) is the one case where the geometry is kept
    ortho = theory.linear_map_counterexample(n=200, d=8, condition=1.0, seed=3)
    assert ortho.metrics["procrustes[distance]"] < 1e-6 and ortho.max_angle_change_deg < 1e-5


def test_teacher_side_map_collapses():
    tc = theory.teacher_side_collapse(n=40, d_t=5, d_s=3, seed=1)
    assert tc.zero_loss == 0.0 and not tc.student_zero.any()
    assert tc.rank_one_residual < 1e-25
    assert abs(tc.rank_one_abs_cos_min - 1) < 1e-9  # every student pair is (anti)parallel
    assert np.linalg.matrix_rank(tc.student_rank_one) == 1
    assert tc.metrics_rank_one["procrustes[distance]"] > 0.5


# ------------------------------------------------------------------------------------ bounds and equivalences


def _check_bounds(X, Y, tol=1e-9):
    b = theory.geometry_bounds(X, Y)
    assert b.gram_frobenius <= 2 * b.procrustes + tol
    assert b.max_inner_product_error <= b.gram_frobenius + tol
    assert b.holds(tol)
    return b


@settings(max_examples=60, deadline=None)
@given(n=st.integers(3, 30), p=st.integers(1, 8), q=st.integers(1, 8), seed=st.integers(0, 10**6),
       mix=st.floats(0.0, 1.0))
def test_bounds_random(n, p, q, seed, mix):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p))
    Y = mix * (X[:, :q] if q <= p else np.pad(X, ((0, 0), (0, q - p)))) + rng.standard_normal((n, q))
    _check_bounds(X, Y)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(4, 25), p=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_gram_frobenius_cka_identity(n, p, seed):
    """GF² = ‖K‖² + ‖L‖² − 2·CKA·‖K‖·‖L‖ with K = X̃X̃ᵀ, L = ỸỸᵀ: CKA = 1 forces GF = |‖K‖ − ‖L‖| = 0."""
    rng = np.random.default_rng(seed)
    X, Y = rng.standard_normal((n, p)), rng.standard_normal((n, p + 1))
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    K = Xc @ Xc.T / np.sum(Xc**2)
    L = Yc @ Yc.T / np.sum(Yc**2)
    nk, nl = np.linalg.norm(K), np.linalg.norm(L)
    gf2 = metrics.gram_frobenius(X, Y, squared=True)
    assert gf2 == pytest.approx(nk**2 + nl**2 - 2 * metrics.cka(X, Y) * nk * nl, rel=1e-12, abs=1e-12)


def _adversarial_pairs():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 6))
    Q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    A = np.diag(np.geomspace(1, 100, 6))
    yield "rotated+padded", X, np.hstack([X @ Q, np.zeros((50, 3))]) * 7.0 + 3.0, True
    yield "invertible non-orthogonal", X, X @ A, False
    yield "near identical", X, X + 1e-9 * rng.standard_normal(X.shape), True
    yield "rank one", X, X[:, :1] @ rng.standard_normal((1, 4)), False
    yield "huge scale gap", X * 1e8, X[:, :3] * 1e-8, False
    yield "duplicated rows", np.vstack([X[:10]] * 5), np.vstack([X[:10, :2]] * 5), False
    yield "antipodal theorem-1", theory.theorem1(40, 40, 1.0).teacher, theory.theorem1(40, 40, 1.0).student, False


@pytest.mark.parametrize(("name", "X", "Y", "same_geometry"), list(_adversarial_pairs()),
                         ids=[p[0] for p in _adversarial_pairs()])
def test_bounds_and_equivalence_adversarial(name, X, Y, same_geometry):
    b = _check_bounds(X, Y, tol=1e-8)
    if same_geometry:  # Procrustes = 0 ⇔ Gram-Frobenius = 0 ⇔ equal Grams
        assert b.procrustes < 1e-6 and b.gram_frobenius < 1e-8 and b.max_inner_product_error < 1e-8
    else:
        assert b.procrustes > 1e-3 and b.gram_frobenius > 1e-4


def test_zero_procrustes_iff_zero_gram_frobenius():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((30, 4))
    Q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    same = theory.geometry_bounds(X, X @ Q)
    assert same.procrustes < 1e-6 and same.gram_frobenius < 1e-10
    # scaling one axis changes the Gram matrix and both distances become positive together
    B = np.diag([1.0, 1.0, 1.0, 1.01])
    diff = theory.geometry_bounds(X, X @ Q @ B)
    assert diff.procrustes > 1e-4 and diff.gram_frobenius > 1e-4


# ------------------------------------------------------------------------------------ synthetic distillation


def test_synthetic_teacher_kinds():
    T = theory.synthetic_teacher(20, 32, kind="orthonormal", seed=1)
    np.testing.assert_allclose(T @ T.T, np.eye(20), atol=1e-12)
    R = theory.synthetic_teacher(20, 8, kind="random", seed=1)
    np.testing.assert_allclose(np.linalg.norm(R, axis=1), 1.0, atol=1e-12)
    with pytest.raises(UserError):
        theory.synthetic_teacher(20, 8, kind="orthonormal")
    with pytest.raises(UserError):
        theory.synthetic_teacher(20, 8, kind="bogus")


def test_synthetic_reproducible_and_each_loss_lowers_its_objective():
    T = theory.synthetic_teacher(24, 8, seed=2)
    for loss in theory.SYNTHETIC_LOSSES:
        a = theory.synthetic_distill(T, 4, loss, steps=40, lr=0.05, seed=7, log_every=10)
        b = theory.synthetic_distill(T, 4, loss, steps=40, lr=0.05, seed=7, log_every=10)
        pd.testing.assert_frame_equal(a, b)
        assert list(a.step) == [0, 10, 20, 30, 40]
        assert a.loss.iloc[-1] < 0.8 * a.loss.iloc[0], loss
        assert (a.preserved_pairs <= a.teacher_eps_orthogonal_pairs).all()
    other = theory.synthetic_distill(T, 4, "cka", steps=40, lr=0.05, seed=8, log_every=10)
    assert other.loss.iloc[0] != a.loss.iloc[0]  # a different seed is a different student init


def test_full_width_student_trained_to_zero_procrustes_keeps_every_inner_product():
    """Guaranteed: d_s ≥ rank(teacher) lets Procrustes reach 0, and then max |Δ⟨x̃ᵢ,x̃ⱼ⟩| ≤ GF ≤ 2·Procrustes → 0.
    (The squared form 2 − 2ρ is smooth at 0; Adam at a fixed step size plateaus near 1e-3 on the distance form.)"""
    k, d = 30, 6
    T = theory.synthetic_teacher(k, d, seed=0)
    h = theory.synthetic_distill(T, d, "procrustes[squared]", steps=300, lr=0.05, seed=0, log_every=300)
    final = h.iloc[-1]
    assert final["procrustes[distance]"] < 1e-5
    assert final["max_inner_product_error"] <= final["gram_frobenius"] + TOL
    assert final["gram_frobenius"] <= 2 * final["procrustes[distance]"] + TOL
    assert final["preserved_fraction"] == 1.0


def test_synthetic_final_table_shape():
    hist = theory.synthetic_experiment(sizes=[(12, 6, 3)], seeds=[0, 1], losses=("cka", "procrustes"), steps=5,
                                       log_every=5)
    final = theory.synthetic_final_table(hist)
    assert len(final) == 2 and set(final.loss_name) == {"cka", "procrustes"}
    last = hist[hist.step == 5].groupby("loss_name")["loss"].mean()
    assert final.set_index("loss_name")["loss"].to_dict() == pytest.approx(last.to_dict(), abs=0)


# ------------------------------------------------------------------------------------ command line


def _repsim(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "repsim", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_cli_counterexample_theorem1(tmp_path):
    r = _repsim("counterexample", "theorem1", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "0.883883" in r.stdout and "0.647195" in r.stdout and "0.732970" in r.stdout
    assert (tmp_path / "theory_theorem1.png").stat().st_size > 0
    sweep = pd.read_csv(tmp_path / "theory_theorem1_sweep.csv")
    assert {"m", "n", "cka[linear,biased]", "procrustes[distance]", "gram_frobenius"} <= set(sweep.columns)


def test_cli_counterexample_projection(capsys):
    assert cli.main(["counterexample", "projection"]) == 0
    assert "0.703545" in capsys.readouterr().out


def test_cli_counterexample_bad_input_is_one_line(capsys):
    assert cli.main(["counterexample", "synthetic", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "--steps" in err and "Traceback" not in err
