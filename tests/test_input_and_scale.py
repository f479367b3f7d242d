"""Every entry point (the functions, pairwise, CrossMoments, the losses) on hostile input: any float64 scale gives
the value at scale 1 (the metrics are scale invariant) or one clear UserError; identical rows are zero variance
whatever their scale; unusual but valid array forms give the plain array's value; invalid ones are refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import repsim
from repsim.measures import functions as metrics
from repsim.measures import losses
from repsim.measures.allpairs import pairwise
from repsim.measures.moments import CrossMoments
from repsim.system.errors import UserError

FUNCTION_IDS = ["procrustes[distance]", "procrustes[angular]", "procrustes[squared]", "gram_frobenius",
                "cka[linear,biased]", "cka[linear,debiased]", "cka[rbf,sigma=0.5]", "projection_residual[in_sample]",
                "projection_residual[in_sample,ridge=0.01]", "projection_residual[folds=5]"]
MOMENT_IDS = ["procrustes[distance]", "gram_frobenius", "cka[linear,biased]", "cka[linear,debiased]",
              "projection_residual[in_sample]"]
LOSSES = {"procrustes": losses.ProcrustesLoss(), "gram_frobenius": losses.GramFrobeniusLoss(),
          "cka": losses.CKALoss(), "cka_debiased": losses.CKALoss(estimator="debiased")}


def data(n=40, p=7, q=5, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)) + 2.0
    Y = X[:, :q] @ rng.standard_normal((q, q)) + 0.5 * rng.standard_normal((n, q))
    return X, Y


def streamed(X, Y, cuts=(7, 20)):
    m = CrossMoments(X.shape[1], Y.shape[1])
    for lo, hi in zip((0, *cuts), (*cuts, X.shape[0]), strict=True):
        m.update(X[lo:hi], Y[lo:hi])
    return m


def every_entry_point(X, Y):
    """{(engine, metric): value} from the functions, pairwise, CrossMoments and the losses."""
    out = {("function", mid): float(metrics.get_metric(mid)(X, Y)) for mid in FUNCTION_IDS}
    out.update({("pairwise", mid): float(v[0, 0]) for mid, v in pairwise([X], [Y], metrics=FUNCTION_IDS).items()})
    m = streamed(X, Y)
    out.update({("moments", mid): m.value(mid) for mid in MOMENT_IDS})
    Xt, Yt = torch.as_tensor(X), torch.as_tensor(Y)
    out.update({("loss", name): float(loss(Xt, Yt)) for name, loss in LOSSES.items()})
    return out


REFERENCE = every_entry_point(*data())


def assert_same_values(got, reference=REFERENCE, rtol=1e-11, atol=1e-13):
    assert set(got) == set(reference)
    for key, value in reference.items():
        assert got[key] == pytest.approx(value, rel=rtol, abs=atol), key


@settings(max_examples=25, deadline=None)
@given(kx=st.integers(-300, 300), ky=st.integers(-300, 300))
def test_every_entry_point_is_scale_invariant_over_the_float64_range(kx, ky):
    X, Y = data()
    assert_same_values(every_entry_point(X * 10.0 ** kx, Y * 10.0 ** ky))


@pytest.mark.parametrize("exponent", [-1060, -1040, -1000, 1000])
def test_subnormal_and_near_overflow_data_keep_their_values(exponent):
    """Integers below 2^10 times 2^exponent are exact float64 numbers (subnormal below 2^-1022), so these are
    exactly the integer data, scaled: every entry point must give the integer data's values."""
    rng = np.random.default_rng(3)
    X = rng.integers(-500, 500, size=(30, 6)).astype(np.float64)
    Y = X[:, :4] + rng.integers(-300, 300, size=(30, 4))
    scaled = np.ldexp(X, exponent), np.ldexp(Y, exponent)
    assert np.array_equal(np.ldexp(scaled[0], -exponent), X)  # the scaling is exact
    assert_same_values(every_entry_point(*scaled), every_entry_point(X, Y))


@pytest.mark.parametrize("scale", [1e-300, 1e-200, 1.0, 1e200, 1e300])
def test_both_sides_large_or_tiny_are_not_called_identical(scale):
    X, Y = data()
    got = every_entry_point(X * scale, Y * scale)
    assert got[("function", "procrustes[distance]")] > 0.1
    assert_same_values(got)


def rows_of(n, x, scale):
    return np.tile(x * scale, (n, 1))


@settings(max_examples=15, deadline=None)
@given(k=st.integers(-300, 300), n=st.integers(4, 300), seed=st.integers(0, 99))
def test_identical_rows_are_zero_variance_at_every_scale_and_entry_point(k, n, seed):
    """Centring identical rows leaves ~eps noise that unit scaling would blow up into a made-up geometry: every
    entry point must refuse them (either side), relative to the data's own scale."""
    rng = np.random.default_rng(seed)
    T = rows_of(n, rng.standard_normal(6) + 3, 10.0 ** k)
    Y = rng.standard_normal((n, 4))
    for X, other in ((T, Y), (Y, T)):
        for mid in FUNCTION_IDS:
            with pytest.raises(UserError, match="zero variance"):
                metrics.get_metric(mid)(X, other)
        with pytest.raises(UserError, match="zero variance"):
            pairwise([X], [other], metrics=FUNCTION_IDS[:-3] + ["projection_residual[folds=2]"])
        with pytest.raises(UserError, match="zero variance"):
            streamed(X, other, cuts=(1, n // 2)).procrustes()
        for loss in LOSSES.values():
            with pytest.raises(UserError, match="zero variance"):
                loss(torch.as_tensor(X), torch.as_tensor(other))


def test_tiny_genuine_spread_on_a_large_offset_is_not_zero_variance():
    """The rule is relative to the data's size: a spread of 1e-9 on an offset of 1 (well above τ ≈ 1e-13) is data,
    and its values are those of the spread alone (translation invariance), to the digits the offset leaves."""
    from repsim.measures.arrays import variance_tolerance

    X, Y = data()
    spread = (X - X.mean(axis=0)) * 1e-9
    assert variance_tolerance(40, torch.float64) < 1e-12
    got = every_entry_point(spread + 1.0, Y)
    ref = every_entry_point(spread, Y)
    assert_same_values(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_input_forms_give_the_plain_arrays_value():
    import pandas as pd

    X, Y = data()
    forms = {
        "negative row stride": (np.ascontiguousarray(X[::-1])[::-1], np.ascontiguousarray(Y[::-1])[::-1]),
        "negative column stride": (X, np.ascontiguousarray(Y[:, ::-1])[:, ::-1]),
        "Fortran order": (np.asfortranarray(X), np.asfortranarray(Y)),
        "lists": (X.tolist(), Y.tolist()),
        "pandas": (pd.DataFrame(X), pd.DataFrame(Y)),
        "non-contiguous tensors": (torch.as_tensor(X).T.contiguous().T, torch.as_tensor(np.tile(Y, 2))[:, :5]),
        "read-only": (np.asarray(X).copy(), np.asarray(Y).copy()),
        "sparse tensors": (torch.as_tensor(X).to_sparse(), torch.as_tensor(Y).to_sparse_csr()),
    }
    forms["read-only"][0].setflags(write=False)
    for name, (A, B) in forms.items():
        for mid in FUNCTION_IDS:
            assert float(metrics.get_metric(mid)(A, B)) == pytest.approx(REFERENCE[("function", mid)],
                                                                           rel=1e-12), (name, mid)
        got = pairwise([A], [B], metrics=FUNCTION_IDS)
        for mid in FUNCTION_IDS:
            assert got[mid][0, 0] == pytest.approx(REFERENCE[("pairwise", mid)], rel=1e-12), (name, mid)
        if name != "sparse tensors":
            m = CrossMoments(7, 5).update(A, B)
            assert m.procrustes() == pytest.approx(REFERENCE[("moments", "procrustes[distance]")], rel=1e-12), name


def test_reversed_rows_are_the_same_paired_rows():
    """X[::-1] with Y[::-1] is the same set of paired rows: the same value (the held-out residual's folds move
    with the rows, so it is left out)."""
    X, Y = data()
    for mid in FUNCTION_IDS[:-1]:
        assert float(metrics.get_metric(mid)(X[::-1], Y[::-1])) == pytest.approx(REFERENCE[("function", mid)],
                                                                                 rel=1e-12), mid
    got = pairwise([X[::-1]], [Y[::-1, ::-1]], metrics=FUNCTION_IDS[:-1])  # columns reversed: a permutation
    for mid in FUNCTION_IDS[:-1]:
        assert got[mid][0, 0] == pytest.approx(REFERENCE[("function", mid)], rel=1e-12), mid


def test_integer_and_boolean_features_equal_their_float64_values():
    rng = np.random.default_rng(4)
    ints = rng.integers(0, 9, size=(30, 5))
    bools = rng.random((30, 4)) > 0.5
    for mid in FUNCTION_IDS:
        spec = metrics.get_metric(mid)
        assert float(spec(ints, bools)) == float(spec(ints.astype(float), bools.astype(float))), mid
    assert CrossMoments(5, 4).update(ints, bools).cka() == pytest.approx(
        metrics.cka(ints.astype(float), bools.astype(float)), rel=1e-12)


def test_pairwise_accepts_tensors_that_require_grad():
    X, Y = data()
    Xg = torch.tensor(X, requires_grad=True)
    got = pairwise([Xg], [torch.tensor(Y, requires_grad=True)], metrics=FUNCTION_IDS)
    for mid in FUNCTION_IDS:
        assert got[mid][0, 0] == pytest.approx(REFERENCE[("pairwise", mid)], rel=1e-12), mid
    assert Xg.grad is None


def test_complex_input_is_refused_everywhere():
    X, Y = data()
    Z = X + 1j * X
    with pytest.raises(UserError, match="complex"):
        repsim.procrustes(Z, Y)
    with pytest.raises(UserError, match="complex"):
        pairwise([Y], [torch.as_tensor(Z)])
    with pytest.raises(UserError, match="complex"):
        CrossMoments(7, 5).update(Z, Y)


def test_nan_in_one_side_is_refused_everywhere():
    X, Y = data()
    Y = Y.copy()
    Y[3, 2] = np.nan
    for mid in FUNCTION_IDS:
        with pytest.raises(UserError, match="NaN or inf"):
            metrics.get_metric(mid)(X, Y)
    with pytest.raises(UserError, match="NaN or inf"):
        pairwise([X], [Y], metrics=FUNCTION_IDS)
    with pytest.raises(UserError, match="NaN or inf"):
        CrossMoments(7, 5).update(X, Y)
    for loss in LOSSES.values():
        with pytest.raises(UserError, match="NaN or inf"):
            loss(torch.as_tensor(X), torch.as_tensor(Y))


def test_a_narrow_compute_dtype_names_the_range_it_cannot_hold():
    X, Y = data()
    with pytest.raises(UserError, match="beyond the range of torch.float32"):
        repsim.procrustes(X * 1e200, Y, dtype=torch.float32)
    # pairwise in float32 rescales before it casts, so the value is the float32 one of the unscaled data
    got = pairwise([X * 1e200], [Y], metrics=["procrustes"], dtype=torch.float32)["procrustes[distance]"]
    assert got[0, 0] == pytest.approx(REFERENCE[("function", "procrustes[distance]")], rel=1e-5)


def test_rbf_bandwidth_anywhere_in_the_float_range():
    """σ → ∞: exp(−d²/(2σ²m)) = 1 − d²/(2σ²m) + …, and CKA removes the constant and the scale, so RBF CKA tends
    to linear CKA with a gap ∝ 1/σ² (checked across the switch to the expansion); σ → 0: K is the identity on
    distinct rows on both sides, so biased CKA = 1, while the identity's U-centred Gram is exactly 0 (one-hot
    rows), so the debiased estimator is undefined and raises."""
    rng = np.random.RandomState(1337)
    X = rng.randn(100, 10)
    Y = rng.randn(100, 10) + X
    for estimator in ("biased", "debiased"):
        linear = repsim.cka(X, Y, estimator=estimator)
        gaps = [repsim.cka(X, Y, kernel="rbf", sigma=s, estimator=estimator) - linear for s in (1e3, 1e4, 1e5)]
        assert gaps[0] / gaps[1] == pytest.approx(100, rel=0.01) and gaps[1] / gaps[2] == pytest.approx(100, rel=0.01)
        for sigma in (1e8, 1e150, 1e300):
            assert repsim.cka(X, Y, kernel="rbf", sigma=sigma, estimator=estimator) == pytest.approx(linear,
                                                                                                    rel=1e-12)
        for sigma in (1e-3, 1e-300):
            if estimator == "biased":
                assert repsim.cka(X, Y, kernel="rbf", sigma=sigma) == pytest.approx(1.0, abs=1e-12)
            else:
                with pytest.raises(UserError, match="debiased HSIC of X .* not positive beyond rounding"):
                    repsim.cka(X, Y, kernel="rbf", sigma=sigma, estimator=estimator)
    got = pairwise([X], [Y], metrics=["cka[rbf,sigma=1e300]"])["cka[rbf,sigma=1e+300]"]
    assert got[0, 0] == pytest.approx(repsim.cka(X, Y), rel=1e-12)


def test_streaming_moments_follow_a_scale_that_grows_between_batches():
    """Rows whose magnitudes span 1e-150 … 1e150 arrive smallest first: each larger batch raises the layer's
    scale exponent and rescales the state exactly; merges and saved states keep it. Values equal the in-memory
    functions'."""
    rng = np.random.default_rng(5)
    X, Y = data(n=60)
    mags = 10.0 ** np.repeat([-150, -20, 0, 150], 15)[:, None]
    Xs, Ys = X * mags, Y * mags[::-1]
    want = {mid: float(metrics.get_metric(mid)(Xs, Ys)) for mid in MOMENT_IDS}
    whole = streamed(Xs, Ys, cuts=(15, 30, 45))
    parts = [streamed(Xs[lo:lo + 15], Ys[lo:lo + 15], cuts=(5,)) for lo in range(0, 60, 15)]
    merged = CrossMoments(7, 5)
    for i in rng.permutation(4):
        merged.merge(CrossMoments.from_state_dict(parts[i].state_dict()))
    for m in (whole, merged):
        for mid in MOMENT_IDS:
            assert m.value(mid) == pytest.approx(want[mid], rel=1e-10, abs=1e-12), mid
    assert merged.exp_t == [math.frexp(float(np.abs(Xs).max()))[1]]
    np.testing.assert_allclose(merged.teacher_mean.numpy(), Xs.mean(axis=0), rtol=1e-12)


def test_a_state_saved_without_scale_exponents_loads_as_unscaled():
    """Data with max|x| in [1/2, 1) have exponent 0: their state is what an unscaled accumulator saved. Without
    its exponent entries it loads with exponent 0 and the same values, and keeps streaming at any scale."""
    X, Y = data()
    X0 = np.ldexp(X, -math.frexp(float(np.abs(X).max()))[1])
    Y0 = np.ldexp(Y, -math.frexp(float(np.abs(Y).max()))[1])
    state = streamed(X0[:30], Y0[:30]).state_dict()
    m = CrossMoments.from_state_dict({k: v for k, v in state.items() if k not in ("exp_t", "exp_s")})
    assert m.exp_t == [0] and m.exp_s == [0]
    m.update(X0[30:] * 2.0 ** 600, Y0[30:] * 2.0 ** 600)
    want = streamed(X0[:30], Y0[:30]).update(X0[30:] * 2.0 ** 600, Y0[30:] * 2.0 ** 600)
    for mid in MOMENT_IDS:
        assert m.value(mid) == pytest.approx(want.value(mid), rel=1e-12), mid


@pytest.mark.parametrize("scale", [1e-300, 1e-200, 1e200, 1e300])
def test_bootstrap_and_permutation_replicates_are_scale_invariant(scale):
    """The resampling engine sees the same rows, scaled: every replicate equals the unscaled one (it raised a raw
    eigh failure at 1e-200 and gave wrong Procrustes replicates at 1e200)."""
    from repsim.analysis import stats

    X, Y = data(n=60)
    ids = ["procrustes[distance]", "gram_frobenius", "cka[linear,biased]", "cka[linear,debiased]"]
    for fn in (stats.bootstrap_replicates, stats.permutation_replicates):
        ref = fn([X], [Y], ids, 12, seed=0)
        got = fn([X * scale], [Y * scale], ids, 12, seed=0)
        for mid in ids:
            np.testing.assert_allclose(got[mid], ref[mid], rtol=1e-12, atol=1e-14, err_msg=mid)


def test_streaming_a_tensor_that_requires_grad_keeps_no_graph():
    """Batches straight from a model (requires_grad) are read detached: the state holds plain tensors, so no
    autograd graph grows batch after batch, and the values are those of the detached data."""
    X, Y = data()
    m = CrossMoments(7, 5)
    m.update(torch.tensor(X[:20], requires_grad=True), torch.tensor(Y[:20]))
    m.update(torch.tensor(X[20:], requires_grad=True), torch.tensor(Y[20:], requires_grad=True))
    assert not any(v.requires_grad for v in m.state_dict().values())
    assert m.cka() == pytest.approx(REFERENCE[("moments", "cka[linear,biased]")], rel=1e-12)
