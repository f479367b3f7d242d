"""The measure registry: every registered metric id through every engine, on inputs that stress each engine.

One property test over ``metric_names()`` (a family registered later is covered without a new test): the
in-memory function, ``pairwise``, ``CrossMoments``/``LayerMoments`` (metrics of second moments; the others must be
refused by name), the bootstrap's and the permutation test's identity replicate and the feature loss (for the
metrics ``make_feature_loss`` accepts) agree on

- random correlated inputs of different widths,
- nearly identical inputs (X vs X + 1e-9·noise, n = 500, 64 columns),
- rank-deficient inputs (exact linear relations among the columns of both sides),
- fewer rows than columns (n < width).

Tolerances. Engines that hold the rows (pairwise, the replicates, the losses) agree to 1e-12 relative, except on
the nearly identical pair: there each side's centring and scaling rounds its entries by ~eps relative, which is
eps/δ ≈ 2e-7 relative to the difference X̃ − Ỹ of relative size δ = 1e-9 that those values measure, so the
engines (each preparing the rows its own way) agree to NEAR_RTOL = 1e-6 relative. The streaming moments agree
to 1e-9 relative (the nuclear norm's accepted rounding bound) plus the absolute accuracy repsim.measures.moments
documents where a value cancels: STREAMING_ACCURACY on the squared forms (a residual that is 0 once n ≤ q), its
square root on the distances (asked of every value of the nearly identical pair). No engine returns an exact 0
where the in-memory value is positive.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from repsim.analysis import stats
from repsim.measures.allpairs import pairwise
from repsim.measures.losses import make_feature_loss
from repsim.measures.moments import STREAMING_ACCURACY, CrossMoments, LayerMoments
from repsim.measures.registry import (
    Family,
    MetricSpec,
    PairMoments,
    families,
    get_metric,
    metric_names,
    register,
)
from repsim.system.errors import UserError

NAMES = metric_names()
KINDS = ("random", "near_identical", "rank_deficient", "n_below_width")
ROWS_RTOL = 1e-12
NEAR_RTOL = 1e-6
MOMENTS_RTOL = 1e-9
EPS = np.finfo(np.float64).eps


def inputs(kind: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(KINDS.index(kind))
    if kind == "random":
        X = rng.standard_normal((150, 12)) + 3.0
        Y = X[:, :9] @ rng.standard_normal((9, 9)) + 0.5 * rng.standard_normal((150, 9)) - 1.0
    elif kind == "near_identical":
        X = rng.standard_normal((500, 64))
        Y = X + 1e-9 * rng.standard_normal((500, 64))
    elif kind == "rank_deficient":
        X = rng.standard_normal((120, 6)) @ rng.standard_normal((6, 10))  # rank 6 of 10
        Y = np.hstack([X[:, :4] @ rng.standard_normal((4, 5)) + 0.3 * rng.standard_normal((120, 5)),
                       np.zeros((120, 2))])  # rank 5 of 7, two zero columns
        Y[:, 6] = Y[:, 0] - 2 * Y[:, 1]
    else:
        X = rng.standard_normal((24, 40))
        Y = X[:, :30] + 0.7 * rng.standard_normal((24, 30))
    return X, Y


def identity_replicates(monkeypatch, X, Y, mid, method):
    """The bootstrap's and the permutation test's replicate that keeps every row once, in order."""
    n = X.shape[0]
    monkeypatch.setattr(stats, "resample_indices", lambda n_, b, seed=0: np.tile(np.arange(n_), (b, 1)))
    monkeypatch.setattr(stats, "permutation_indices", lambda n_, b, seed=0: np.tile(np.arange(n_), (b, 1)))
    # the replicates' documented accuracy is REPLICATE_TOL on ρ (for speed); the point estimate's is asked here
    monkeypatch.setattr(stats, "REPLICATE_TOL", 1e-9)
    assert n == Y.shape[0]
    boot = stats.bootstrap_replicates([X], [Y], [mid], 1, method=method)[mid][0, 0, 0]
    perm = stats.permutation_replicates([X], [Y], [mid], 1, method=method)[mid][0, 0, 0]
    return boot, perm


def loss_value(spec: MetricSpec, X: np.ndarray, Y: np.ndarray) -> float | None:
    """The feature loss of the metric, as the metric's value (1 − loss for a higher-is-similar metric), or None
    when the metric is no feature loss."""
    try:
        loss = make_feature_loss(spec.id, X.shape[1], Y.shape[1])
    except UserError:
        return None
    value = float(loss(torch.as_tensor(X), torch.as_tensor(Y)))
    return 1.0 - value if spec.direction == "higher" else value


def agree(got: float, want: float, rtol: float, atol: float, what: str) -> None:
    assert abs(got - want) <= rtol * abs(want) + atol, f"{what}: {got!r} vs in-memory {want!r}"


def test_every_registered_id_parses_to_itself_and_its_family_owns_it():
    assert NAMES and len(NAMES) == len(set(NAMES))
    for mid in NAMES:
        spec = get_metric(mid)
        assert spec.id == mid and get_metric(spec.id) is not None and get_metric(spec) is spec
        assert spec.family in families() and mid in families()[spec.family].examples
        assert spec.statistics in ("moments", "rows") and spec.linear == (spec.statistics == "moments")
        assert get_metric(mid.upper().replace(",", " , ")).id == mid  # spaces and case are ignored
    for fam in families().values():
        for alias, target in fam.aliases.items():
            assert get_metric(alias).id == get_metric(target).id


def test_unknown_ids_and_options_name_the_problem():
    with pytest.raises(UserError, match="unknown metric 'nope'; known: .*procrustes"):
        get_metric("nope")
    for fam in families().values():
        with pytest.raises(UserError, match=fam.name):
            get_metric(f"{fam.name}[no_such_option_xyz]")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mid", NAMES)
def test_every_engine_equals_the_in_memory_function(monkeypatch, mid, kind):
    spec = get_metric(mid)
    X, Y = inputs(kind)
    try:
        want = float(spec(X, Y))
    except UserError as refusal:  # undefined here (e.g. CCA once rank_x + rank_y ≥ n): every engine refuses alike
        reason = str(refusal).split(":")[0]
        engines = [lambda: pairwise([X], [Y], [mid])] + [
            lambda method=method: identity_replicates(monkeypatch, X, Y, mid, method) for method in ("fast", "generic")]
        if spec.linear:
            engines += [lambda: CrossMoments(X.shape[1], Y.shape[1]).update(X, Y).value(mid),
                        lambda: LayerMoments([X.shape[1]], [Y.shape[1]]).update([X], [Y]).matrix(mid)]
        for engine in engines:
            with pytest.raises(UserError, match=re.escape(reason)):
                engine()
        return
    near = kind == "near_identical"
    rtol = NEAR_RTOL if near else ROWS_RTOL
    scale_atol = 1e-15  # values that are 0 up to rounding (e.g. the in-sample residual once n ≤ q)
    got = {"pairwise": float(pairwise([X], [Y], [mid])[spec.id][0, 0])}
    for method in ("fast", "generic"):
        got[f"bootstrap[{method}]"], got[f"permutation[{method}]"] = identity_replicates(monkeypatch, X, Y, mid, method)
    loss = loss_value(spec, X, Y)
    if loss is not None:
        got["loss"] = loss
    for engine, value in got.items():
        agree(value, want, rtol, scale_atol, f"{mid} {kind} {engine}")
    if spec.linear:
        cut = X.shape[0] // 3  # two batches: the merge is part of the engine
        streamed = {"CrossMoments": CrossMoments(X.shape[1], Y.shape[1]).update(X[:cut], Y[:cut]).update(
            X[cut:], Y[cut:]).value(mid),
            "LayerMoments": float(LayerMoments([X.shape[1]], [Y.shape[1]]).update([X], [Y]).matrix(mid)[0, 0])}
        for engine, value in streamed.items():
            # documented absolute accuracy (repsim.measures.moments, Accuracy) where a value cancels: STREAMING_ACCURACY
            # on the squared forms, its square root on the distances (asked of every value of the nearly identical
            # pair, where the distances cancel)
            atol = math.sqrt(STREAMING_ACCURACY) if near else STREAMING_ACCURACY
            agree(value, want, MOMENTS_RTOL, atol, f"{mid} {kind} {engine}")
            got[engine] = value
    else:
        with pytest.raises(UserError, match=r"not computable from streaming moments"):
            CrossMoments(X.shape[1], Y.shape[1]).update(X, Y).value(mid)
    if want > 0:
        assert all(v != 0.0 for v in got.values()), f"{mid} {kind}: an engine claims identical inputs: {got}"


def test_the_nearly_identical_pair_is_resolved_by_every_engine_that_holds_the_rows():
    """X vs X + 1e-9·noise: Procrustes distance ~1e-9 (not 0, not the ~1e-8 of 2 − 2ρ's cancellation) from
    the in-memory function, pairwise and the loss; the streaming moments to their documented accuracy."""
    X, Y = inputs("near_identical")
    want = float(get_metric("procrustes")(X, Y))
    # independent: the optimal rotation's residual written out with numpy
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    Xc, Yc = Xc / np.linalg.norm(Xc), Yc / np.linalg.norm(Yc)
    U, _, Vt = np.linalg.svd(Yc.T @ Xc)
    direct = np.linalg.norm(Xc - Yc @ (U @ Vt))
    assert 5e-10 < want < 2e-9 and want == pytest.approx(direct, rel=NEAR_RTOL)
    assert float(pairwise([X], [Y], ["procrustes"])["procrustes[distance]"][0, 0]) == pytest.approx(want, rel=NEAR_RTOL)
    assert loss_value(get_metric("procrustes"), X, Y) == pytest.approx(want, rel=NEAR_RTOL)
    streamed = CrossMoments(64, 64).update(X, Y).procrustes()
    assert 0 < streamed and abs(streamed - want) <= math.sqrt(STREAMING_ACCURACY)


def test_a_family_registered_later_is_parsed_listed_and_computed_by_every_engine(monkeypatch):
    """A toy family of second moments (ρ itself, higher is more similar): one class, registered, and the parser,
    metric_names, pairwise and the streaming moments all reach it through the registry."""
    from repsim.measures import registry

    class Rho(Family):
        name = "toy_rho"
        grammar = "toy_rho"
        examples = ("toy_rho",)
        uses = frozenset({"nuclear"})

        def parse(self, flags, options, text):
            if flags or options:
                raise self.error(text)
            return MetricSpec("toy_rho", self.name, {}, "higher", (0.0, 1.0), frozenset(), True, "moments", "ρ")

        def compute(self, X, Y):
            Xc, Yc = X - X.mean(0), Y - Y.mean(0)
            return self.finalize(PairMoments.from_rows(Xc / Xc.norm(), Yc / Yc.norm()))

        def finalize(self, m, **kwargs):
            return m.nuclear_norm()

    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))
    register(Rho())
    assert "toy_rho" in metric_names()
    X, Y = inputs("random")
    want = float(get_metric("toy_rho")(X, Y))
    assert want == pytest.approx(1 - float(get_metric("procrustes[squared]")(X, Y)) / 2, rel=1e-12)
    assert pairwise([X], [Y], ["toy_rho"])["toy_rho"][0, 0] == pytest.approx(want, rel=1e-12)
    assert CrossMoments(12, 9).update(X, Y).value("toy_rho") == pytest.approx(want, rel=1e-9)


def test_streaming_refuses_rows_metrics_by_name_never_a_substitute():
    X, Y = inputs("random")
    m = LayerMoments([12], [9]).update([X], [Y])
    for mid in NAMES:
        spec = get_metric(mid)
        if not spec.linear:
            with pytest.raises(UserError, match=re.escape(spec.id)):
                m.matrix(mid)

