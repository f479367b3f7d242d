"""The field's pitfalls (docs/pitfalls.md): each number that circulates under a metric's name is computed here
from its own slow formula, checked against its published value on Kornblith's demo data, and shown to differ from
what repsim computes; repsim's own value is checked against the definition it documents (docs/measures.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from slow_formulas import (
    lower_median,
    slow_cka,
    slow_gram_frobenius,
    slow_gram_spectral,
    slow_hsic,
    slow_mixed_cka,
    slow_procrustes_distance,
    slow_rbf_gram,
    slow_rbf_gram_lower_median,
    slow_rho,
    slow_size_and_shape_distance,
    slow_unbiased_hsic,
    slow_zero_diagonal_hsic,
)

import repsim
from repsim.measures.functions import cka, gram_frobenius, procrustes
from repsim.system.errors import UserError

#: the published values on Kornblith's demo data (docs/pitfalls.md, "Numbers that mean different things")
DEBIASED_SONG = 0.5134564895
ZERO_DIAGONAL = 0.5139463662
MIXED = 0.4645521269
RBF_NUMPY_MEDIAN = 0.6548311823
RBF_TORCH_MEDIAN = 0.6548522355
RHO = 0.7362553106
ONE_MINUS_RHO = 0.2637446894
SIZE_AND_SHAPE = 30.083272229
GRAM_FROBENIUS = 0.3129930176


def kornblith_demo() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(1337)
    X = rng.randn(100, 10)
    Y = rng.randn(100, 10) + X
    return X, Y


def test_debiased_cka_is_song_not_centre_then_zero_diagonal_nor_the_mixed_estimator():
    """Pitfall 1: three numbers are shipped as "unbiased CKA"; repsim's is Song et al.'s U-statistic."""
    X, Y = kornblith_demo()
    K, L = X @ X.T, Y @ Y.T
    song = slow_cka(K, L, slow_unbiased_hsic)
    zero_diagonal = slow_cka(K, L, slow_zero_diagonal_hsic)
    mixed = slow_mixed_cka(K, L)
    assert song == pytest.approx(DEBIASED_SONG, abs=1e-10)
    assert zero_diagonal == pytest.approx(ZERO_DIAGONAL, abs=1e-10)
    assert mixed == pytest.approx(MIXED, abs=1e-10)
    ours = cka(X, Y, estimator="debiased")
    assert ours == pytest.approx(song, abs=1e-12)
    # the nearest variant is 4.9e-4 away: 10⁸ times the agreement asserted above
    assert min(abs(ours - zero_diagonal), abs(ours - mixed)) > 4e-4
    # and the biased estimator is a fourth number again
    assert cka(X, Y) == pytest.approx(slow_cka(K, L, slow_hsic), abs=1e-12)
    assert abs(cka(X, Y) - ours) > 0.04


def test_rbf_cka_bandwidth_is_numpy_median_not_torch_median():
    """Pitfall 1: torch.median returns the lower middle value of an even count; Kornblith's convention (and
    repsim's) is numpy's median, the mean of the two middle values."""
    X, Y = kornblith_demo()
    D = torch.cdist(torch.from_numpy(X), torch.from_numpy(X)) ** 2
    assert float(torch.median(D)) == pytest.approx(lower_median(D.numpy()), rel=1e-12)
    assert lower_median(D.numpy()) < float(np.median(D.numpy()))  # 10⁴ entries: the two middle values differ
    numpy_median = slow_cka(slow_rbf_gram(X, 0.5), slow_rbf_gram(Y, 0.5))
    torch_median = slow_cka(slow_rbf_gram_lower_median(X, 0.5), slow_rbf_gram_lower_median(Y, 0.5))
    assert numpy_median == pytest.approx(RBF_NUMPY_MEDIAN, abs=1e-10)
    assert torch_median == pytest.approx(RBF_TORCH_MEDIAN, abs=1e-10)
    ours = cka(X, Y, kernel="rbf", sigma=0.5)
    assert ours == pytest.approx(numpy_median, abs=1e-12)
    assert abs(ours - torch_median) > 2e-5


def test_procrustes_distance_is_not_one_minus_rho_which_breaks_the_triangle_inequality():
    """Pitfall 1: one package reports "1 − ρ" as the Procrustes distance. It is half the squared distance; it is
    not a metric. repsim's distance √(2 − 2ρ) and angle arccos ρ are."""
    X, Y = kornblith_demo()
    rho = slow_rho(X, Y)
    assert rho == pytest.approx(RHO, abs=1e-10)
    assert 1 - rho == pytest.approx(ONE_MINUS_RHO, abs=1e-10)
    for output in ("distance", "angular", "squared"):
        assert abs(procrustes(X, Y, output=output) - ONE_MINUS_RHO) > 0.2
    assert procrustes(X, Y, output="squared") / 2 == pytest.approx(1 - rho, abs=1e-12)
    # three one-column representations at angles 0, θ, 2θ on a great circle of centred unit vectors: ρ = |cos|
    n, theta = 50, 0.3
    centred = np.random.default_rng(0).standard_normal((n, 2))
    a, b = np.linalg.qr(centred - centred.mean(0))[0].T  # orthonormal, and still centred
    A, B, C = (np.cos(t) * a[:, None] + np.sin(t) * b[:, None] for t in (0.0, theta, 2 * theta))

    def one_minus_rho(P, Q):
        return 1 - slow_rho(P, Q)

    assert one_minus_rho(A, C) > one_minus_rho(A, B) + one_minus_rho(B, C) + 0.05  # violated: 0.175 > 0.089
    for output in ("distance", "angular"):
        d = lambda P, Q, o=output: procrustes(P, Q, output=o)  # noqa: E731
        assert d(A, C) <= d(A, B) + d(B, C) + 1e-12
    assert procrustes(A, C, output="angular") == pytest.approx(2 * theta, abs=1e-12)


def test_unscaled_size_and_shape_distance_follows_the_scale_repsim_does_not():
    """Pitfall 3: Procrustes is scale invariant only after dividing by the Frobenius norm. The centred, unscaled
    distance is 30.08 on the demo data and changes with the student's scale; repsim's does not."""
    X, Y = kornblith_demo()
    unscaled = slow_size_and_shape_distance(X, Y)
    assert unscaled == pytest.approx(SIZE_AND_SHAPE, rel=1e-10)
    assert slow_size_and_shape_distance(X, 3 * Y) > 2 * unscaled
    ours = procrustes(X, Y)
    assert ours == pytest.approx(slow_procrustes_distance(X, Y), abs=1e-12)
    assert ours == pytest.approx(math.sqrt(2 - 2 * RHO), abs=1e-9)
    assert procrustes(X, 3 * Y) == pytest.approx(ours, abs=1e-12)
    assert procrustes(X * 1e-3 + 7, 3 * Y - 2) == pytest.approx(ours, abs=1e-12)


def test_gram_frobenius_uses_the_frobenius_norm_not_the_spectral_norm():
    """Pitfall 4: an "RSM norm difference" in circulation takes the spectral norm where the Frobenius norm is
    meant; on the demo data they differ by a factor near 3."""
    X, Y = kornblith_demo()
    frobenius = slow_gram_frobenius(X, Y)
    assert frobenius == pytest.approx(GRAM_FROBENIUS, abs=1e-10)
    assert gram_frobenius(X, Y) == pytest.approx(frobenius, abs=1e-12)
    spectral = slow_gram_spectral(X, Y)
    assert spectral < frobenius / 2


def test_minibatch_cka_is_not_cka_but_streamed_moments_are():
    """Pitfall 2: the mean of per-batch CKA depends on the batch size and differs from CKA on all rows; the
    streamed sufficient statistics over the same batches give CKA on all rows."""
    X, Y = kornblith_demo()
    full = cka(X, Y)

    def batch_mean(size):
        return np.mean([cka(X[i:i + size], Y[i:i + size]) for i in range(0, 100, size)])

    assert abs(batch_mean(10) - full) > 1e-2
    assert abs(batch_mean(10) - batch_mean(25)) > 1e-3
    for size in (10, 25, 7, 3, 1):  # 7: a last batch of 2 rows; 3, 1: too few for per-batch debiased CKA
        moments = repsim.CrossMoments(10, 10)
        for i in range(0, 100, size):
            moments.update(X[i:i + size], Y[i:i + size])
        assert float(moments.cka("biased")) == pytest.approx(full, abs=1e-12)
        assert float(moments.cka("debiased")) == pytest.approx(DEBIASED_SONG, abs=1e-9)


def test_debiased_cka_is_returned_negative_and_undefined_cases_raise_instead_of_nan():
    """Pitfall 2: unbiased HSIC can be negative (so a square root gives NaN); repsim neither clamps nor returns
    NaN: a negative debiased CKA is returned as computed, a non-positive self-HSIC is an error."""
    rng = np.random.default_rng(4)
    X, Y = rng.standard_normal((8, 2)), rng.standard_normal((8, 2))
    expected = slow_cka(X @ X.T, Y @ Y.T, slow_unbiased_hsic)
    assert expected < -0.1
    assert cka(X, Y, estimator="debiased") == pytest.approx(expected, abs=1e-12)
    one_hot = np.zeros((4, 1))
    one_hot[0] = 1.0  # its U-centred Gram matrix is exactly zero: the self-HSIC is 0
    assert slow_unbiased_hsic(one_hot @ one_hot.T, one_hot @ one_hot.T) == 0.0
    with pytest.raises(UserError, match="not positive"):
        cka(one_hot, rng.standard_normal((4, 2)), estimator="debiased")


def test_extraction_adds_no_hooks_and_reads_layers_by_index(tiny_model):
    """Pitfall 13: hooks left behind change every later forward pass. repsim registers none of its own: it reads
    ``hidden_states`` by explicit index, so a model passed in comes back with the hooks it had (transformers
    installs its own output-capturing hooks on the first forward pass that asks for hidden states)."""
    from transformers import AutoModel, AutoTokenizer

    from repsim.activations.extract import extract

    folder = tiny_model("bert")
    model, tok = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    texts = ["a short text", "a somewhat longer text than that"]
    with torch.no_grad():
        hidden = model(**tok(texts[:1], return_tensors="pt"), output_hidden_states=True).hidden_states

    def hooks():
        return {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()}

    before, weights = hooks(), {k: v.clone() for k, v in model.state_dict().items()}
    acts = extract((model, tok), texts, pool="mean", cache=False, progress=False)
    assert hooks() == before
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items()) and not model.training
    for k in (0, model.config.num_hidden_layers):
        np.testing.assert_allclose(acts[k][0], hidden[k][0].mean(0).numpy(), rtol=1e-5, atol=1e-6)
