"""pairwise: every (teacher layer, student layer) value equals the per-pair metric and the slow formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_moments import slow_values

from repsim.measures import functions as metrics
from repsim.measures.allpairs import pairwise
from repsim.measures.moments import LayerMoments
from repsim.system.errors import UserError

ALL_IDS = ["procrustes[distance]", "procrustes[angular]", "procrustes[squared]", "gram_frobenius",
           "gram_frobenius[squared]", "cka[linear,biased]", "cka[linear,debiased]", "projection_residual[in_sample]",
           "projection_residual[in_sample,ridge=0.01]", "projection_residual[folds=5]",
           "projection_residual[folds=3,ridge=0.1]", "cka[rbf,sigma=0.5]"]


def stacks(n, teacher_widths, student_widths, seed=0):
    """Teacher layers, and student layers that share some signal with them (so values are not all trivial)."""
    rng = np.random.default_rng(seed)
    T = [rng.standard_normal((n, p)) + rng.standard_normal(p) * 3 for p in teacher_widths]
    S = [T[i % len(T)][:, :1] @ rng.standard_normal((1, q)) + rng.standard_normal((n, q))
         for i, q in enumerate(student_widths)]
    return T, S


def per_pair(mid, T, S):
    spec = metrics.get_metric(mid)
    return np.array([[float(spec(x, y)) for y in S] for x in T])


@pytest.mark.parametrize("n,tw,sw", [
    (50, [7, 12], [5, 9, 30]),  # p ≠ q, widths differ between layers
    (40, [60, 60], [80, 80, 80]),  # n < p and n < q: dual factors on both sides
    (30, [8, 45], [45, 6]),  # primal and dual layers mixed on both sides
    (90, [10, 10, 10], [10, 10]),  # square, uniform
])
def test_pairwise_equals_per_pair_metric_calls(n, tw, sw):
    T, S = stacks(n, tw, sw, seed=n)
    got = pairwise(T, S, metrics=ALL_IDS, chunk_size=2)
    assert list(got) == ALL_IDS
    for mid in ALL_IDS:
        assert got[mid].shape == (len(tw), len(sw))
        np.testing.assert_allclose(got[mid], per_pair(mid, T, S), atol=1e-8, rtol=1e-8, err_msg=mid)


def test_pairwise_equals_slow_formulas():
    T, S = stacks(35, [6, 50], [4, 40], seed=3)
    got = pairwise(T, S, metrics=list(slow_values(T[0], S[0])))
    for i, x in enumerate(T):
        for j, y in enumerate(S):
            for mid, v in slow_values(x, y).items():
                assert got[mid][i, j] == pytest.approx(v, rel=1e-8, abs=1e-8), (mid, i, j)


def test_reference_values_through_pairwise():
    rng = np.random.RandomState(1337)
    X = rng.randn(100, 10)
    Y = rng.randn(100, 10) + X
    got = pairwise([X], np.stack([Y, X]), metrics=["cka", "cka[debiased]", "angular", "gram_frobenius"])
    assert got["cka[linear,biased]"][0, 0] == pytest.approx(0.5576132566, abs=1e-10)
    assert got["cka[linear,debiased]"][0, 0] == pytest.approx(0.5134564895, abs=1e-10)
    assert got["procrustes[angular]"][0, 0] == pytest.approx(0.7432764761, abs=1e-10)
    assert got["gram_frobenius"][0, 0] == pytest.approx(0.3129930176, abs=1e-10)
    # a layer against itself: CKA 1, distances 0
    assert got["cka[linear,biased]"][0, 1] == pytest.approx(1.0, abs=1e-12)
    assert got["procrustes[angular]"][0, 1] == pytest.approx(0.0, abs=1e-6)
    assert got["gram_frobenius"][0, 1] == pytest.approx(0.0, abs=1e-7)


def test_default_metrics_and_input_forms():
    T, S = stacks(40, [6, 6, 6], [4, 4], seed=1)
    default = pairwise(T, S)
    assert tuple(default) == metrics.DEFAULT_METRICS
    stacked = pairwise(np.stack(T), torch.from_numpy(np.stack(S)))
    as_torch = pairwise([torch.from_numpy(t).float() for t in T], [s.astype(np.float32) for s in S])
    for mid in metrics.DEFAULT_METRICS:
        np.testing.assert_array_equal(stacked[mid], default[mid])
        T32 = [t.astype(np.float32) for t in T]
        S32 = [s.astype(np.float32) for s in S]
        np.testing.assert_allclose(as_torch[mid], per_pair(mid, T32, S32), atol=1e-8)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(5, 30), tw=st.lists(st.integers(1, 40), min_size=1, max_size=3),
       sw=st.lists(st.integers(1, 40), min_size=1, max_size=3), chunk=st.integers(1, 9), seed=st.integers(0, 999))
def test_any_shapes_and_chunk_sizes_agree_with_metrics(n, tw, sw, chunk, seed):
    T, S = stacks(n, tw, sw, seed=seed)
    ids = ["procrustes[squared]", "gram_frobenius[squared]", "cka[linear,biased]", "cka[linear,debiased]",
           "projection_residual[in_sample]"]
    got = pairwise(T, S, metrics=ids, chunk_size=chunk)
    for mid in ids:
        np.testing.assert_allclose(got[mid], per_pair(mid, T, S), atol=1e-8, rtol=1e-8, err_msg=mid)


def test_pairwise_equals_streamed_layer_moments():
    T, S = stacks(60, [5, 9], [7, 7, 3], seed=2)
    lm = LayerMoments([5, 9], [7, 7, 3])
    for a, b in ((0, 13), (13, 40), (40, 60)):
        lm.update([t[a:b] for t in T], [s[a:b] for s in S])
    ids = ["procrustes[distance]", "gram_frobenius", "cka[linear,biased]", "cka[linear,debiased]",
           "projection_residual[in_sample]"]
    got = pairwise(T, S, metrics=ids)
    for mid in ids:
        np.testing.assert_allclose(lm.matrix(mid), got[mid], atol=1e-10, err_msg=mid)


def test_in_sample_residual_vanishes_when_n_at_most_q_but_held_out_does_not():
    T, S = stacks(20, [6], [25], seed=4)
    got = pairwise(T, S, metrics=["projection_residual[in_sample]", "projection_residual[folds=5]"])
    assert got["projection_residual[in_sample]"][0, 0] == pytest.approx(0.0, abs=1e-10)
    assert got["projection_residual[folds=5]"][0, 0] > 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    T, S = stacks(64, [32, 32], [16, 80], seed=6)
    ids = ["procrustes[distance]", "gram_frobenius", "cka[linear,debiased]", "projection_residual[folds=5]"]
    cpu = pairwise(T, S, metrics=ids)
    gpu = pairwise(T, S, metrics=ids, device="cuda")
    for mid in ids:
        np.testing.assert_allclose(gpu[mid], cpu[mid], atol=1e-8)


def test_bad_input():
    T, S = stacks(20, [4], [3])
    with pytest.raises(UserError, match="same number of rows"):
        pairwise(T, [S[0][:10]])
    with pytest.raises(UserError, match="unknown|expected"):
        pairwise(T, S, metrics=["no_such_metric"])
    with pytest.raises(UserError, match="empty"):
        pairwise([], S)
    with pytest.raises(UserError, match="layers, n, width"):
        pairwise(T[0], S)
    with pytest.raises(UserError, match="NaN or inf"):
        pairwise([np.full((20, 4), np.inf)], S)
    with pytest.raises(UserError, match="zero variance"):
        pairwise([np.ones((20, 4))], S, metrics=["cka"])
    with pytest.raises(UserError, match="at least 4 samples"):
        pairwise([T[0][:3]], [S[0][:3]], metrics=["cka[debiased]"])
    with pytest.raises(UserError, match="chunk_size"):
        pairwise(T, S, metrics=["cka"], chunk_size=0)


def test_nuclear_norm_fast_path_and_fallback_agree_with_svdvals():
    from repsim.measures.linalg import nuclear_norms as _nuclear_norms

    g = torch.Generator().manual_seed(0)
    well = torch.randn(6, 40, 12, generator=g, dtype=torch.float64)
    low = torch.randn(6, 40, 3, generator=g, dtype=torch.float64) @ torch.randn(6, 3, 12, generator=g,
                                                                                 dtype=torch.float64)
    graded = well * torch.logspace(0, -9, 12, dtype=torch.float64)  # singular values down to ~1e-9
    for batch in (well, low, graded, well.transpose(1, 2)):
        batch = batch / torch.linalg.matrix_norm(batch)[:, None, None]
        np.testing.assert_allclose(_nuclear_norms(batch).numpy(), torch.linalg.svdvals(batch).sum(-1).numpy(),
                                   rtol=1e-12, atol=1e-12)


def test_cross_check_against_installed_peers():
    """ckatorch (full batch, biased and unbiased; a test dependency) and, where installed, pytorch-cka (unbiased
    HSIC) agree on every pair."""
    import ckatorch.core as ckatorch_core  # a [test] dependency: the cross-check never skips
    T, S = stacks(40, [6, 9], [5, 12], seed=12)
    got = pairwise(T, S, metrics=["cka[linear,biased]", "cka[linear,debiased]"])
    for i, x in enumerate(T):
        for j, y in enumerate(S):
            xt, yt = torch.from_numpy(x), torch.from_numpy(y)
            assert float(ckatorch_core.cka_base(xt, yt)) == pytest.approx(
                got["cka[linear,biased]"][i, j], rel=1e-10, abs=1e-10)
            assert float(ckatorch_core.cka_base(xt, yt, unbiased=True)) == pytest.approx(
                got["cka[linear,debiased]"][i, j], rel=1e-10, abs=1e-10)
    try:
        from cka import cka_from_features
    except ImportError:
        return
    peer = cka_from_features([torch.from_numpy(x) for x in T], [torch.from_numpy(y) for y in S])
    np.testing.assert_allclose(np.asarray(peer), np.clip(got["cka[linear,debiased]"], 0, 1), atol=1e-10)


HELD_OUT = ["projection_residual[folds=5]", "projection_residual[folds=3,ridge=0.1]",
            "projection_residual[folds=4,ridge=0.001]"]


def test_leave_fold_out_form_is_chosen_for_wide_layers_and_equals_fold_by_fold_fits():
    """Wide layers and few texts (the default comparison's regime): the n × n leave-fold-out identity is the
    cheaper form, is chosen, and gives the fold-by-fold value of every pair."""
    from repsim.measures import allpairs as layer_pairs

    T, S = stacks(60, [50] * 4, [20] * 3, seed=21)
    assert layer_pairs._dual_held_out_fits(60, [50] * 4, [20] * 3, [5], torch.device("cpu"))
    got = pairwise(T, S, metrics=HELD_OUT + ["gram_frobenius", "cka[linear,biased]"])
    for mid in got:
        np.testing.assert_allclose(got[mid], per_pair(mid, T, S), atol=1e-10, rtol=1e-10, err_msg=mid)


@pytest.mark.parametrize("case", ["student wider than the training folds", "collinear student", "mixed widths"])
def test_leave_fold_out_form_falls_back_where_its_certificate_fails(monkeypatch, case):
    """Forced onto the leave-fold-out form, student layers whose training fits are rank-deficient (n − n/k ≤ q,
    or exactly collinear columns) are refitted fold by fold; every value still equals the metric's."""
    from repsim.measures import allpairs as layer_pairs

    monkeypatch.setattr(layer_pairs, "_dual_held_out_fits", lambda *a: True)
    if case == "student wider than the training folds":
        T, S = stacks(30, [12, 40], [8, 26], seed=5)  # 24 training rows < 26 columns
    elif case == "collinear student":
        T, S = stacks(50, [10, 10], [6, 6], seed=6)
        S[1][:, 5] = S[1][:, 0] - 2 * S[1][:, 1]
    else:
        T, S = stacks(45, [7, 30], [5, 9, 14], seed=7)
    for mid in HELD_OUT:
        np.testing.assert_allclose(pairwise(T, S, metrics=[mid])[mid], per_pair(mid, T, S), atol=1e-9, rtol=1e-9,
                                   err_msg=mid)


KERNEL_IDS = ["cka[linear,biased]", "cka[linear,debiased]", "gram_frobenius", "gram_frobenius[squared]"]


def test_kernel_form_is_chosen_where_it_is_cheaper():
    """CKA and Gram-Frobenius alone on the default shapes (13 layers of width 768 against 7 of width 384): through
    the n × n kernels at a few hundred texts (872 in the default comparison), through the factors at 5000 (more
    multiply-adds) and at 20000 (the kernels would not fit the memory budget)."""
    from repsim.measures.allpairs import _kernel_form

    cpu = torch.device("cpu")
    for n in (100, 600, 872, 2000):
        assert _kernel_form(n, [768] * 13, [384] * 7, cpu, False), n
    for n in (5000, 20000):
        assert not _kernel_form(n, [768] * 13, [384] * 7, cpu, False), n
    assert not _kernel_form(600, [8] * 13, [4] * 7, cpu, False)  # narrow layers: the p × q products are smaller


@pytest.mark.parametrize("n,tw,sw,teacher_chunk", [
    (40, [60, 60, 60], [80, 30], None),  # wider than n on both sides, and narrower
    (50, [7, 12, 70], [5, 9, 30], 1),  # teacher kernels one at a time (small memory budget)
    (90, [10, 10, 10], [10, 10], 2),
])
@pytest.mark.parametrize("held_out", [False, True])
def test_kernel_form_equals_per_pair_metric_calls(monkeypatch, n, tw, sw, teacher_chunk, held_out):
    """Forced onto the n × n kernel form (‖X̃ᵀỸ‖²_F = ⟨X̃X̃ᵀ, ỸỸᵀ⟩), alone or with the held-out residual's own
    teacher kernels, and with the teacher's kernels in chunks, every CKA and Gram-Frobenius value equals the
    per-pair metric to 1e-12 relative."""
    from repsim.measures import allpairs as layer_pairs

    monkeypatch.setattr(layer_pairs, "_kernel_form", lambda *a: True)
    if teacher_chunk is not None:
        monkeypatch.setattr(layer_pairs, "CPU_CHUNK_BUDGET_BYTES", 8 * n * n * (len(sw) + teacher_chunk))
    if held_out:
        monkeypatch.setattr(layer_pairs, "_dual_held_out_fits", lambda *a: True)
    T, S = stacks(n, tw, sw, seed=n + 1)
    ids = KERNEL_IDS + (["projection_residual[folds=5]"] if held_out else [])
    got = pairwise(T, S, metrics=ids)
    for mid in ids:
        np.testing.assert_allclose(got[mid], per_pair(mid, T, S), rtol=1e-12 if mid in KERNEL_IDS else 1e-10,
                                   atol=1e-15, err_msg=mid)


def test_dual_factors_from_qr_give_the_per_pair_values():
    """Layers wider than n without the in-sample residual get the factor Rᵀ of X̃ᵀ = QR (not an SVD): Procrustes,
    Gram-Frobenius and CKA still equal the per-pair metrics to 1e-12 relative."""
    T, S = stacks(40, [60, 60, 25], [80, 80, 30], seed=4)
    ids = ["procrustes[distance]", "procrustes[squared]", "gram_frobenius", "cka[linear,biased]",
           "cka[linear,debiased]"]
    got = pairwise(T, S, metrics=ids)
    for mid in ids:
        np.testing.assert_allclose(got[mid], per_pair(mid, T, S), rtol=1e-12, atol=1e-15, err_msg=mid)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(12, 40), tw=st.lists(st.integers(1, 30), min_size=1, max_size=3),
       sw=st.lists(st.integers(1, 30), min_size=1, max_size=3), folds=st.integers(2, 5), seed=st.integers(0, 999))
@example(n=28, tw=[28], sw=[20], folds=4, seed=0)  # a residual of 8.2e4 (21 training rows, 20 columns): relative
def test_leave_fold_out_form_agrees_for_any_shapes(n, tw, sw, folds, seed):
    from repsim.measures import allpairs as layer_pairs

    T, S = stacks(n, tw, sw, seed=seed)
    ids = [f"projection_residual[folds={folds}]", f"projection_residual[folds={folds},ridge=0.01]"]
    original = layer_pairs._dual_held_out_fits
    try:
        layer_pairs._dual_held_out_fits = lambda *a: True
        got = pairwise(T, S, metrics=ids)
    finally:
        layer_pairs._dual_held_out_fits = original
    for mid in ids:
        np.testing.assert_allclose(got[mid], per_pair(mid, T, S), atol=1e-8, rtol=1e-8, err_msg=mid)


def test_in_sample_residual_from_the_pair_gram_handles_ill_conditioned_students():
    """Equal widths with Procrustes asked: the in-sample residual is read off each pair's CᵀC through
    M = V diag(w) Vᵀ; a student layer too ill-conditioned for its Gram's eigenvectors is rotated instead."""
    T, S = stacks(80, [12, 12], [9, 9], seed=8)
    S[1] = S[1] * np.logspace(0, -5, 9)  # Gram condition number 1e10 > 1e6: rotated from an SVD
    ids = ["procrustes[distance]", "projection_residual[in_sample]", "projection_residual[in_sample,ridge=0.01]"]
    got = pairwise(T, S, metrics=ids)
    for mid in ids:
        np.testing.assert_allclose(got[mid], per_pair(mid, T, S), atol=1e-9, rtol=1e-9, err_msg=mid)


def test_threads_do_not_change_the_values():
    """Layers prepared concurrently (several torch threads) give the one-thread values to rounding."""
    T, S = stacks(120, [70, 70, 70], [65, 65], seed=9)
    ids = ["procrustes[distance]", "gram_frobenius", "cka[linear,debiased]", "projection_residual[in_sample]",
           "projection_residual[folds=5]"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pairwise(T, S, metrics=ids)
        torch.set_num_threads(2)
        two = pairwise(T, S, metrics=ids)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    for mid in ids:
        np.testing.assert_allclose(two[mid], one[mid], atol=1e-12, rtol=1e-12, err_msg=mid)


def test_wide_nuclear_norms_through_numpy_lapack_agree_with_svdvals():
    """Batches of ≥ 64-wide Grams go through numpy's eigvalsh split over threads: same values as svdvals."""
    from repsim.measures.linalg import nuclear_norms as _nuclear_norms

    g = torch.Generator().manual_seed(1)
    well = torch.randn(5, 150, 80, generator=g, dtype=torch.float64)
    graded = well * torch.logspace(0, -9, 80, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            for batch in (well, graded, well.transpose(1, 2)):
                batch = batch / torch.linalg.matrix_norm(batch)[:, None, None]
                np.testing.assert_allclose(_nuclear_norms(batch).numpy(),
                                           torch.linalg.svdvals(batch).sum(-1).numpy(), rtol=1e-12, atol=1e-12)
    finally:
        torch.set_num_threads(threads)


def test_nan_input_is_named_and_overflowing_squares_are_rescaled():
    T, S = stacks(20, [4], [3])
    with pytest.raises(UserError, match="teacher layer 0 contains NaN or inf"):
        pairwise([np.where(np.arange(80).reshape(20, 4) == 7, np.nan, T[0])], S, metrics=["procrustes"])
    # squares that overflow are no reason to refuse: the layer is divided by a power of two first (exact)
    big = pairwise([T[0] * 1e160], S, metrics=["procrustes"])["procrustes[distance]"]
    assert big[0, 0] == pytest.approx(metrics.procrustes(T[0], S[0]), rel=1e-12)


@pytest.mark.parametrize("kind", ["well conditioned", "near-null directions", "mixed"])
def test_nuclear_norm_probe_paths_agree_with_svdvals(kind):
    """With a probe (the first slice decides whether the rest goes straight to SVDs), 3-D and 4-D (strided)
    batches give svdvals' nuclear norms, and the Grams returned equal DᵀD whichever path was taken."""
    from repsim.measures.linalg import nuclear_norms as _nuclear_norms

    g = torch.Generator().manual_seed(2)
    well = torch.randn(4, 5, 150, 80, generator=g, dtype=torch.float64)
    bad = well * torch.logspace(0, -12, 80, dtype=torch.float64)
    d = {"well conditioned": well, "near-null directions": bad, "mixed": torch.cat([bad[:1], well[1:]])}[kind]
    d = d / torch.linalg.matrix_norm(d)[..., None, None]
    exact = torch.linalg.svdvals(d).sum(-1)
    strided = torch.cat([d, d], dim=-1)[..., :80]  # the same matrices as a non-contiguous view
    for batch in (d, strided, d.reshape(20, 150, 80)):
        norms, gram = _nuclear_norms(batch, probe=4, with_gram=True)
        np.testing.assert_allclose(norms.reshape(4, 5).numpy(), exact.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(gram.reshape(4, 5, 80, 80).numpy(), (d.transpose(-1, -2) @ d).numpy(),
                                   rtol=1e-14, atol=1e-14)
        np.testing.assert_allclose(_nuclear_norms(batch, probe=4).reshape(4, 5).numpy(), exact.numpy(),
                                   rtol=1e-12, atol=1e-12)


def _primal(monkeypatch):
    from repsim.measures import allpairs as layer_pairs

    monkeypatch.setattr(layer_pairs, "_dual_held_out_fits", lambda *a: False)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(12, 60), tw=st.lists(st.integers(1, 30), min_size=1, max_size=3),
       sw=st.lists(st.integers(1, 30), min_size=1, max_size=3), folds=st.integers(2, 5), seed=st.integers(0, 999))
def test_primal_held_out_form_agrees_for_any_shapes(n, tw, sw, folds, seed):
    """The held-out residual from per-fold sums of the full-data factors (rows in fold order, no training copies)
    equals the fold-by-fold fits of projection_residual(folds=k) to 1e-10 relative, for every shape, including
    students wider than the training folds (its certificate then sends them to the fold-by-fold SVDs); a second
    fold count, whose folds are not contiguous in the stored order, too."""
    import pytest as _pytest

    mp = _pytest.MonkeyPatch()
    try:
        _primal(mp)
        T, S = stacks(n, tw, sw, seed=seed)
        other = 2 if folds != 2 else 3
        ids = [f"projection_residual[folds={folds}]", f"projection_residual[folds={folds},ridge=0.01]",
               f"projection_residual[folds={other}]"]
        got = pairwise(T, S, metrics=ids + ["procrustes[distance]", "cka[linear,debiased]"])
    finally:
        mp.undo()
    for mid in got:
        np.testing.assert_allclose(got[mid], per_pair(mid, T, S), rtol=1e-10, atol=1e-13, err_msg=mid)


@pytest.mark.parametrize("case", ["predictable teacher", "collinear student", "graded student", "wide student"])
def test_primal_held_out_form_on_hard_students(monkeypatch, case):
    """A teacher that is an exact linear map of the student (held-out residual ~0: the error expansion cancels and
    is recomputed from the rows), exactly collinear or strongly graded student columns (directions at and near
    the lstsq cutoff), and a student wider than n: every value equals the metric's."""
    from repsim.measures import allpairs as layer_pairs

    _primal(monkeypatch)
    T, S = stacks(120, [10, 30], [8, 12], seed=13)
    if case == "predictable teacher":
        T[0] = S[1] @ np.random.default_rng(1).standard_normal((12, 10))
    elif case == "collinear student":
        S[1][:, 5] = S[1][:, 0] - 2 * S[1][:, 1]
    elif case == "graded student":
        S[1] = S[1] * np.logspace(0, -7, 12)
    else:
        S[1] = np.random.default_rng(2).standard_normal((120, 150))
    calls = []
    original = layer_pairs._held_out_residual
    monkeypatch.setattr(layer_pairs, "_held_out_residual", lambda *a, **k: calls.append(1) or original(*a, **k))
    for mid in HELD_OUT:
        got = pairwise(T, S, metrics=[mid])[mid]
        want = per_pair(mid, T, S)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=mid)
    assert calls


def test_large_n_default_metrics_take_the_primal_held_out_form():
    """Where the n × n matrices exceed the memory budget the primal form is chosen, and it is not the per-fold
    SVD path for well-conditioned students."""
    from repsim.measures import allpairs as layer_pairs

    assert not layer_pairs._dual_held_out_fits(20000, [768] * 13, [384] * 7, [5], torch.device("cpu"))
    assert layer_pairs._dual_held_out_fits(872, [768] * 13, [384] * 7, [5], torch.device("cpu"))


def test_primal_held_out_form_refits_nothing_fold_by_fold(monkeypatch):
    """Well-conditioned students at large n: the held-out residual comes from per-fold sums in the singular basis
    the student's preparation already has, so no SVD of any training fold is computed (the fold-by-fold path
    computed k per student layer, on copies of the training rows)."""
    _primal(monkeypatch)
    T, S = stacks(400, [40, 40], [30, 30, 30], seed=4)
    calls = []
    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(a[0].shape) or svd(*a, **k))
    got = pairwise(T, S, metrics=["projection_residual[folds=5]"])["projection_residual[folds=5]"]
    assert calls == []
    np.testing.assert_allclose(got, per_pair("projection_residual[folds=5]", T, S), rtol=1e-10, atol=0)
