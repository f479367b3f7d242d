"""Streaming moments: every linear metric from CrossMoments / LayerMoments equals the in-memory definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from slow_formulas import (
    slow_gram_frobenius,
    slow_linear_cka,
    slow_procrustes_squared,
    slow_projection_residual,
    slow_rho,
    slow_u_centered_hsic,
)

from repsim.measures import functions as metrics
from repsim.measures.moments import CrossMoments, LayerMoments
from repsim.system.errors import UserError

LINEAR_IDS = ["procrustes[distance]", "procrustes[angular]", "procrustes[squared]", "gram_frobenius",
              "gram_frobenius[squared]", "cka[linear,biased]", "cka[linear,debiased]", "projection_residual[in_sample]",
              "projection_residual[in_sample,ridge=0.01]"]


# ------------------------------------------------------------------ slow formulas from the definitions
# (tests/slow_formulas.py; slow_values gathers them under the metric ids)
def slow_values(X, Y) -> dict[str, float]:
    """The linear metrics by id, from the shared slow formulas."""
    rho = slow_rho(X, Y)
    sq = slow_procrustes_squared(X, Y)
    return {"procrustes[distance]": np.sqrt(max(sq, 0.0)), "procrustes[squared]": 2 - 2 * rho,
            "procrustes[angular]": np.arccos(np.clip(rho, 0, 1)), "gram_frobenius": slow_gram_frobenius(X, Y),
            "cka[linear,biased]": slow_linear_cka(X, Y),
            "cka[linear,debiased]": slow_linear_cka(X, Y, slow_u_centered_hsic),
            "projection_residual[in_sample]": slow_projection_residual(X, Y)}


def stream(X, Y, cuts, cls=CrossMoments) -> CrossMoments:
    m = cls(X.shape[1], Y.shape[1])
    edges = [0, *sorted(cuts), X.shape[0]]
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        if b > a:
            m.update(X[a:b], Y[a:b])
    return m


def pair(n, p, q, seed=0, offset=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)) * scale + offset
    Y = (X[:, :1] - offset) @ rng.standard_normal((1, q)) + rng.standard_normal((n, q)) * scale + offset
    return X, Y


# ------------------------------------------------------------------ published values
def test_reference_values_from_streamed_batches():
    rng = np.random.RandomState(1337)
    X = rng.randn(100, 10)
    Y = rng.randn(100, 10) + X
    m = stream(X, Y, cuts=[7, 8, 30, 31, 64, 99])
    assert m.n == 100
    assert m.cka() == pytest.approx(0.5576132566, abs=1e-10)
    assert m.cka("debiased") == pytest.approx(0.5134564895, abs=1e-10)
    assert m.procrustes("rho") == pytest.approx(0.7362553106, abs=1e-10)
    assert m.procrustes("angular") == pytest.approx(0.7432764761, abs=1e-10)
    assert m.procrustes("squared") == pytest.approx(0.5274893788, abs=1e-10)
    assert m.procrustes() == pytest.approx(0.7262846403, abs=1e-10)
    assert m.gram_frobenius() == pytest.approx(0.3129930176, abs=1e-10)


# ------------------------------------------------------------------ streaming = in-memory = slow formulas
@pytest.mark.parametrize("n,p,q", [(60, 5, 9), (40, 12, 12), (30, 50, 20), (25, 8, 64), (200, 3, 1)])
def test_stream_matches_slow_formulas_and_metrics(n, p, q):
    X, Y = pair(n, p, q, seed=n + p + q)
    m = stream(X, Y, cuts=[1, 2, 17, n // 2])
    slow = slow_values(X, Y)
    for mid, v in slow.items():
        assert m.value(mid) == pytest.approx(v, rel=1e-8, abs=1e-8), mid
    for mid in LINEAR_IDS:
        assert m.value(mid) == pytest.approx(float(metrics.get_metric(mid)(X, Y)), rel=1e-8, abs=1e-8), mid


def test_procrustes_from_moments_equals_explicit_orthogonal_minimisation():
    X, Y = pair(80, 6, 11, seed=3)
    m = stream(X, Y, cuts=[13, 50])
    assert m.procrustes("squared") == pytest.approx(slow_procrustes_squared(X, Y), rel=1e-10, abs=1e-10)


def test_projection_residual_is_zero_once_student_spans_the_rows():
    """n ≤ q: the centred student has rank n − 1 and predicts any teacher exactly in-sample (docs/measures.md §3)."""
    X, Y = pair(20, 7, 30, seed=5)
    m = stream(X, Y, cuts=[4, 9])
    assert m.projection_residual() == pytest.approx(0.0, abs=1e-10)
    assert m.projection_residual(ridge=0.1) > 1e-3  # a ridge fit no longer interpolates


def test_projection_residual_ridge_matches_metrics():
    X, Y = pair(50, 9, 6, seed=8)
    m = stream(X, Y, cuts=[10, 11, 40])
    for ridge in (1e-3, 0.1, 2.0):
        assert m.projection_residual(ridge) == pytest.approx(
            metrics.projection_residual(X, Y, ridge=ridge), rel=1e-10, abs=1e-10)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(6, 40), p=st.integers(1, 12), q=st.integers(1, 12), seed=st.integers(0, 2**16),
       data=st.data())
def test_merge_in_any_order_and_batching_equals_one_pass(n, p, q, seed, data):
    X, Y = pair(n, p, q, seed=seed)
    cuts = sorted(data.draw(st.lists(st.integers(1, n - 1), max_size=5, unique=True)))
    edges = [0, *cuts, n]
    parts = [CrossMoments(p, q).update(X[a:b], Y[a:b]) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    order = data.draw(st.permutations(range(len(parts))))
    merged = CrossMoments(p, q)
    for i in order:
        merged.merge(parts[i])
    whole = CrossMoments(p, q).update(X, Y)
    assert merged.n == n
    for key, value in whole.state_dict().items():
        np.testing.assert_allclose(merged.state_dict()[key].numpy(), value.numpy(), rtol=1e-9, atol=1e-9,
                                   err_msg=key)
    for mid in ("procrustes[squared]", "gram_frobenius[squared]", "cka[linear,biased]", "cka[linear,debiased]"):
        assert merged.value(mid) == pytest.approx(float(metrics.get_metric(mid)(X, Y)), rel=1e-8, abs=1e-8), mid


def test_large_mean_offset_with_small_variance():
    """Offset 1e6, spread 1e-3: raw sums Σx² would lose every digit of the variance; centred merging keeps them."""
    X, Y = pair(300, 6, 4, seed=11, offset=1e6, scale=1e-3)
    m = stream(X, Y, cuts=[1, 50, 51, 202])
    Xs, Ys = X - 1e6, Y - 1e6  # exact (Sterbenz): the same data without the offset
    for mid in ("procrustes[distance]", "gram_frobenius", "cka[linear,biased]", "cka[linear,debiased]",
                "projection_residual[in_sample]"):
        assert m.value(mid) == pytest.approx(float(metrics.get_metric(mid)(Xs, Ys)), rel=1e-10, abs=1e-10), mid
    scale = 2.0 ** m.exp_t[0]  # the statistics are kept for rows / 2^exp_t (exact)
    np.testing.assert_allclose((m.mean_t * scale - 1e6 + m.mean_lo_t * scale).numpy(), Xs.mean(axis=0), rtol=1e-12)
    # and the offset alone changes nothing: translation invariance through the accumulator
    m0 = stream(Xs, Ys, cuts=[100])
    assert m.cka("debiased") == pytest.approx(m0.cka("debiased"), rel=1e-10, abs=1e-10)


def test_torch_and_float32_batches_are_accumulated_in_float64():
    X, Y = pair(64, 5, 3, seed=2)
    m = CrossMoments(5, 3)
    m.update(torch.from_numpy(X[:30]).float(), torch.from_numpy(Y[:30]).float())
    m.update(X[30:].astype(np.float32), Y[30:].astype(np.float32))
    assert m.cross.dtype == torch.float64
    X32, Y32 = X.astype(np.float32).astype(np.float64), Y.astype(np.float32).astype(np.float64)
    assert m.cka() == pytest.approx(metrics.cka(X32, Y32), rel=1e-10, abs=1e-10)


def test_state_dict_is_tensors_only_and_round_trips(tmp_path):
    X, Y = pair(50, 4, 7, seed=4)
    m = stream(X, Y, cuts=[20])
    state = m.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    torch.save(state, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=True)
    m2 = CrossMoments.from_state_dict(loaded)
    assert isinstance(m2, CrossMoments) and m2.n == 50
    for mid in LINEAR_IDS:
        assert m2.value(mid) == m.value(mid)
    m2.update(X[:5], Y[:5])  # keeps accumulating
    assert m2.n == 55


def test_all_reduce_without_a_process_group_is_a_world_of_one():
    """Outside torchrun (no process group) all_reduce pools over one process: a no-op, so the README's
    single-process snippet runs unchanged."""
    import torch.distributed as dist

    assert not (dist.is_available() and dist.is_initialized())
    X, Y = pair(40, 5, 3, seed=6)
    m = stream(X, Y, cuts=[10])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert m.all_reduce() is m
    for key, value in m.state_dict().items():
        assert torch.equal(value, before[key]), key
    lm = LayerMoments([5], [3]).update([X], [Y])
    assert lm.all_reduce() is lm and lm.matrix("cka")[0, 0] == pytest.approx(m.cka(), rel=1e-12, abs=1e-12)


# ------------------------------------------------------------------ LayerMoments
def test_layer_moments_matrix_equals_per_pair_metrics():
    rng = np.random.default_rng(7)
    n = 45
    T = [rng.standard_normal((n, p)) + 5 for p in (6, 6, 10)]
    S = [T[0][:, :2] @ rng.standard_normal((2, q)) + rng.standard_normal((n, q)) for q in (4, 30)]
    lm = LayerMoments([6, 6, 10], [4, 30])
    for a, b in ((0, 11), (11, 12), (12, 45)):
        lm.update([t[a:b] for t in T], [s[a:b] for s in S])
    for mid in LINEAR_IDS:
        expected = np.array([[float(metrics.get_metric(mid)(x, y)) for y in S] for x in T])
        np.testing.assert_allclose(lm.matrix(mid), expected, atol=1e-8, err_msg=mid)


def test_layer_moments_stacked_input_and_merge():
    rng = np.random.default_rng(9)
    T = rng.standard_normal((3, 40, 5))
    S = rng.standard_normal((2, 40, 8)) + T[0, :, :1]
    a = LayerMoments(5 * np.ones(3, int), [8, 8]).update(T[:, :25], S[:, :25])
    b = LayerMoments([5, 5, 5], [8, 8]).update(torch.from_numpy(T[:, 25:]), torch.from_numpy(S[:, 25:]))
    whole = LayerMoments([5, 5, 5], [8, 8]).update(T, S)
    b.merge(a)
    for mid in ("cka[linear,debiased]", "procrustes[angular]", "projection_residual[in_sample]"):
        np.testing.assert_allclose(b.matrix(mid), whole.matrix(mid), atol=1e-10)
    single = CrossMoments(5, 8).update(T[2], S[1])
    assert whole.matrix("cka")[2, 1] == pytest.approx(single.cka(), rel=1e-12, abs=1e-12)


# ------------------------------------------------------------------ bad input
def test_bad_input_raises_user_errors():
    rng = np.random.default_rng(0)
    m = CrossMoments(3, 2)
    with pytest.raises(UserError, match="width 4, expected 3"):
        m.update(np.ones((5, 4)), np.ones((5, 2)))
    with pytest.raises(UserError, match="same number of rows"):
        m.update(rng.standard_normal((5, 3)), rng.standard_normal((6, 2)))
    with pytest.raises(UserError, match="NaN or inf"):
        m.update(np.full((5, 3), np.nan), np.ones((5, 2)))
    with pytest.raises(UserError, match="2-D"):
        m.update(np.ones(3), np.ones(2))
    with pytest.raises(UserError, match="at least 2 samples"):
        m.cka()
    m.update(rng.standard_normal((3, 3)), rng.standard_normal((3, 2)))
    with pytest.raises(UserError, match="at least 4 samples"):
        m.cka("debiased")
    with pytest.raises(UserError, match="different layer widths"):
        m.merge(CrossMoments(3, 3))
    with pytest.raises(UserError, match="not computable from streaming moments"):
        m.value("cka[rbf,sigma=1]")
    with pytest.raises(UserError, match="held-out"):
        m.value("projection_residual[folds=5]")
    with pytest.raises(UserError, match="unknown|expected"):
        m.value("no_such_metric")
    with pytest.raises(UserError, match="ridge"):
        m.projection_residual(ridge=-1.0)
    with pytest.raises(UserError, match="output"):
        m.procrustes("nope")
    with pytest.raises(UserError, match="not initialised"):
        m.all_reduce(group=object())
    z = CrossMoments(2, 2).update(np.ones((5, 2)), rng.standard_normal((5, 2)))
    with pytest.raises(UserError, match="zero variance"):
        z.procrustes()
    lm = LayerMoments([3, 3], [2])
    with pytest.raises(UserError, match="expected 2 teacher layer"):
        lm.update([np.ones((4, 3))], [np.ones((4, 2))])
    with pytest.raises(UserError, match="same number of rows"):
        lm.update([np.ones((4, 3)), np.ones((5, 3))], [np.ones((4, 2))])
    with pytest.raises(UserError, match="positive"):
        LayerMoments([3, 0], [2])
    with pytest.raises(UserError, match="missing entry"):
        CrossMoments.from_state_dict({"teacher_widths": torch.tensor([3]), "student_widths": torch.tensor([2])})
