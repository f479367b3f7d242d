"""Comparison on synthetic layer stacks: table = metric functions per cell, identity / rotation facts,
monotone layer map against brute force, atomic file output, figures."""

from __future__ import annotations

import itertools
import json
import struct

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repsim.analysis.comparison import Comparison, monotone_map, parse_layers, sample_size_warnings
from repsim.analysis.plot import DPI, HEATMAP_FIGSIZE
from repsim.measures import functions as M
from repsim.measures.registry import get_metric, metric_names
from repsim.system.errors import UserError

DEFAULTS = list(M.DEFAULT_METRICS)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _layers(rng, n, widths):
    return [rng.standard_normal((n, w)) for w in widths]


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(0)
    teacher = _layers(rng, 60, [10, 10, 10])
    student = [teacher[0] @ rng.standard_normal((10, 6)) + 0.3 * rng.standard_normal((60, 6)),
               rng.standard_normal((60, 6))]
    return teacher, student


def test_table_is_long_format_and_equals_metric_functions(synthetic):
    teacher, student = synthetic
    comp = Comparison.from_layers(teacher, student, DEFAULTS, teacher_layer_ids=[0, 2, 4])
    t = comp.table
    assert list(t.columns) == ["teacher_layer", "student_layer", "metric", "value", "chance", "chance_sd", "ci_low",
                                   "ci_high", "p_value"]
    assert len(t) == 3 * 2 * len(DEFAULTS)
    assert comp.metrics == DEFAULTS
    assert comp.teacher_layers == [0, 2, 4] and comp.student_layers == [0, 1]
    for m in DEFAULTS:
        mat = comp.matrix(m)
        assert mat.shape == (3, 2)
        for i, j in itertools.product(range(3), range(2)):
            assert mat[i, j] == pytest.approx(M.get_metric(m)(teacher[i], student[j]), rel=1e-8, abs=1e-10)
    assert t["ci_low"].isna().all() and t["p_value"].isna().all()
    # aliases resolve to the canonical id
    np.testing.assert_array_equal(comp.matrix("procrustes"), comp.matrix("procrustes[distance]"))
    with pytest.raises(UserError, match="not computed"):
        comp.matrix("cka[linear,debiased]")


def test_model_against_itself_is_identical_on_the_diagonal():
    rng = np.random.default_rng(1)
    layers = _layers(rng, 50, [8, 8, 8])
    comp = Comparison.from_layers(layers, layers, DEFAULTS)
    assert np.diag(comp.matrix("procrustes[distance]")) == pytest.approx([0, 0, 0], abs=1e-6)
    assert np.diag(comp.matrix("gram_frobenius")) == pytest.approx([0, 0, 0], abs=1e-6)
    assert np.diag(comp.matrix("cka[linear,biased]")) == pytest.approx([1, 1, 1], abs=1e-9)
    assert np.diag(comp.matrix("projection_residual[folds=5,ridge=auto]")) == pytest.approx([0, 0, 0], abs=1e-9)
    # and off the diagonal, independent random layers are not identical
    off = comp.matrix("procrustes[distance]")[~np.eye(3, dtype=bool)]
    assert (off > 0.3).all()
    assert comp.suggest_map("procrustes") == [(0, 0), (1, 1), (2, 2)]


def test_rotated_and_scaled_copy_is_identical_for_procrustes_and_gram_but_a_linear_map_is_not():
    rng = np.random.default_rng(2)
    teacher = _layers(rng, 80, [6, 6])
    Q = np.linalg.qr(rng.standard_normal((9, 9)))[0]
    rotated = [3.7 * np.hstack([x, np.zeros((80, 3))]) @ Q + 5.0 for x in teacher]  # wider, rotated, scaled, shifted
    comp = Comparison.from_layers(teacher, rotated, ["procrustes", "gram_frobenius", "cka", "angular"])
    for m in ("procrustes[distance]", "gram_frobenius", "procrustes[angular]"):
        assert np.diag(comp.matrix(m)) == pytest.approx([0, 0], abs=1e-6)
    assert np.diag(comp.matrix("cka")) == pytest.approx([1, 1], abs=1e-9)
    # a general invertible linear map keeps the projection residual at 0 but changes the geometry
    A = rng.standard_normal((6, 6)) @ np.diag([10, 5, 1, 0.5, 0.2, 0.1])
    skewed = [x @ A for x in teacher]
    comp2 = Comparison.from_layers(teacher, skewed, ["procrustes", "gram_frobenius",
                                                     "projection_residual[in_sample]"])
    assert np.diag(comp2.matrix("projection_residual[in_sample]")) == pytest.approx([0, 0], abs=1e-9)
    assert (np.diag(comp2.matrix("procrustes")) > 0.1).all()
    assert (np.diag(comp2.matrix("gram_frobenius")) > 0.1).all()


def _brute_force_map(sim):
    rows, cols = sim.shape
    best, best_path = -np.inf, None
    for path in itertools.combinations_with_replacement(range(cols), rows):  # all non-decreasing choices
        total = sim[np.arange(rows), list(path)].sum()
        if total > best + 1e-12:
            best, best_path = total, list(path)
    return best, best_path


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.integers(0, 10_000))
def test_monotone_map_is_optimal_and_monotone(rows, cols, seed):
    sim = np.random.default_rng(seed).standard_normal((rows, cols))
    path = monotone_map(sim)
    assert len(path) == rows and all(a <= b for a, b in itertools.pairwise(path))
    best, _ = _brute_force_map(sim)
    assert sim[np.arange(rows), path].sum() == pytest.approx(best)


def test_suggest_map_reads_direction(synthetic):
    teacher, student = synthetic
    comp = Comparison.from_layers(teacher, student, ["procrustes", "cka"])
    for m in ("procrustes", "cka"):
        mapping = comp.suggest_map(m)
        assert [t for t, _ in mapping] == [0, 1, 2]
        # teacher layer 0 generated student layer 0: the map must send it there under either direction
        assert mapping[0] == (0, 0)


def test_bootstrap_and_permutation_columns(synthetic):
    teacher, student = synthetic
    comp = Comparison.from_layers(teacher, student, ["procrustes", "cka"], bootstrap=20, permutations=19, seed=3)
    t = comp.table
    assert t[["ci_low", "ci_high", "p_value"]].notna().all().all()
    assert (t["ci_low"] <= t["ci_high"]).all()
    assert ((t["p_value"] >= 1 / 20) & (t["p_value"] <= 1)).all()
    related = t[(t["teacher_layer"] == 0) & (t["student_layer"] == 0)]
    np.testing.assert_allclose(related["p_value"], 1 / 20)
    again = Comparison.from_layers(teacher, student, ["procrustes", "cka"], bootstrap=20, permutations=19, seed=3)
    pd.testing.assert_frame_equal(t, again.table)


def test_chance_level_is_the_mean_over_the_first_permutations_of_the_student(synthetic):
    """chance = mean of the metric over K seeded student-row permutations, computed here independently with
    pairwise on the permuted rows; the same K shuffles open the permutation test (asking for p-values does not
    change the chance level); K = 0 leaves the column empty."""
    from repsim.analysis.stats import permutation_indices
    from repsim.measures.allpairs import pairwise

    teacher, student = synthetic
    ids = ["procrustes", "gram_frobenius", "cka"]
    comp = Comparison.from_layers(teacher, student, ids, chance_permutations=3, seed=5)
    perms = permutation_indices(len(teacher[0]), 3, seed=6)
    reps = [pairwise(teacher, [y[p] for y in student], ids) for p in perms]
    for m in comp.metrics:
        expected = np.mean([r[m] for r in reps], axis=0)
        spread = np.std([r[m] for r in reps], axis=0, ddof=1)
        np.testing.assert_allclose(comp.matrix(m, "chance"), expected, rtol=1e-6)
        np.testing.assert_allclose(comp.matrix(m, "chance_sd"), spread, rtol=1e-4, atol=1e-9)
    with_p = Comparison.from_layers(teacher, student, ids, chance_permutations=3, permutations=19, seed=5)
    pd.testing.assert_series_equal(with_p.table["chance"], comp.table["chance"])
    assert with_p.table["p_value"].notna().all()
    assert comp.meta["chance"]["permutations"] == 3 and comp.meta["chance"]["seed"] == 6
    off = Comparison.from_layers(teacher, student, ids, chance_permutations=0)
    assert off.table["chance"].isna().all() and off.meta["chance"] is None


def test_chance_level_separates_related_from_unrelated_layers(synthetic):
    """Student layer 0 is a noisy linear map of teacher layer 0, student layer 1 is independent noise: the related
    cell beats its chance level by far, the unrelated one sits within a few chance standard deviations of it."""
    teacher, student = synthetic
    comp = Comparison.from_layers(teacher, student, ["cka"], chance_permutations=8, seed=0)
    value, chance, sd = (comp.matrix("cka", c) for c in ("value", "chance", "chance_sd"))
    assert value[0, 0] > chance[0, 0] + 10 * sd[0, 0]
    assert abs(value[1, 1] - chance[1, 1]) < 4 * sd[1, 1]


def test_warnings_name_the_rule_and_what_to_do():
    """Small n against the widths (n < 10·r), k-fold training rows < 2(q + 1), and bootstrap intervals of biased
    estimators at small n each give one line in meta["warnings"]; a large enough n gives none."""
    rng = np.random.default_rng(0)
    five = Comparison.from_layers(_layers(rng, 5, [8]), _layers(rng, 5, [6]), ["procrustes", "cka"])
    assert len(five.meta["warnings"]) == 1 and "n = 5 texts < 10 × 6" in five.meta["warnings"][0]
    assert "procrustes[distance,mom]" in five.meta["warnings"][0]  # says what to use instead
    folds = Comparison.from_layers(_layers(rng, 60, [4]), _layers(rng, 60, [30]), ["projection_residual[folds=5]"],
                                   chance_permutations=0).meta["warnings"]
    assert len(folds) == 1 and "48 training texts per fold < 2 × (student width 30 + 1)" in folds[0]
    ridged = Comparison.from_layers(_layers(rng, 60, [4]), _layers(rng, 60, [30]),
                                    ["projection_residual[folds=5,ridge=auto]",
                                     "projection_residual[folds=5,ridge=0.1]"], chance_permutations=0).meta["warnings"]
    assert ridged == []  # a ridge bounds the overfitting the rule is about
    boot = Comparison.from_layers(_layers(rng, 30, [5]), _layers(rng, 30, [5]), ["cka"], bootstrap=5,
                                  chance_permutations=0).meta["warnings"]
    assert len(boot) == 2 and boot[1].startswith("bootstrap intervals of cka[linear,biased] at n = 30")
    enough = Comparison.from_layers(_layers(rng, 60, [5]), _layers(rng, 60, [5]),
                                    ["procrustes", "cka", "projection_residual[folds=5]"], bootstrap=5,
                                    chance_permutations=0)
    assert enough.meta["warnings"] == []


def test_curve_recomputes_each_metric_on_the_documented_subsamples(synthetic, tmp_path):
    """The convergence curve: at the full n it is the table's value; at a smaller size m, subsample s is the rows
    np.sort(default_rng([seed, s]).permutation(n)[:m]) and the value is the metric on them; chance uses the same
    rows with the student's shuffled (so for the unrelated student layer it stays near the value)."""
    teacher, student = synthetic
    comp = Comparison.from_layers(teacher, student, ["procrustes", "cka"], curve=True, curve_sizes=[20, 40, 60],
                                  curve_subsamples=3, seed=7, chance_permutations=0)
    pairs = comp.curve_pairs()
    assert pairs[-1] == (2, 1) and (0, 0) in pairs  # best pair, then last ↔ last
    c = comp.curve
    assert sorted(set(c["n"])) == [20, 40, 60] and len(c[c["n"] == 60]) == 2 * len(pairs)
    assert len(c[c["n"] == 20]) == 3 * 2 * len(pairs)
    for r in c[c["n"] == 60].itertuples():
        assert r.value == pytest.approx(comp.matrix(r.metric)[r.teacher_layer, r.student_layer], rel=1e-9)
    for r in c[(c["n"] == 20) & (c["subsample"] == 2)].itertuples():
        rows = np.sort(np.random.default_rng([7, 2]).permutation(60)[:20])
        expected = M.get_metric(r.metric)(teacher[r.teacher_layer][rows], student[r.student_layer][rows])
        assert r.value == pytest.approx(expected, rel=1e-9)
    comp.save(tmp_path / "out")
    assert {"curve.csv", "curve.png", "curve.svg"} <= {p.name for p in (tmp_path / "out").iterdir()}
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "out" / "curve.csv"), c, check_exact=False, rtol=1e-9)
    with pytest.raises(UserError, match=r"\[4, 60\]"):
        Comparison.from_layers(teacher, student, ["cka"], curve=True, curve_sizes=[80])


def test_default_statistics_leave_out_the_cross_validated_residual(synthetic):
    """By default the k-fold held-out residual gets no interval (duplicated texts leak across its folds); named
    explicitly it gets one, and alone it is the default."""
    teacher, student = synthetic
    ids = ["cka", "projection_residual[folds=3]"]
    comp = Comparison.from_layers(teacher, student, ids, bootstrap=5, seed=1)
    t = comp.table
    held = t["metric"] == "projection_residual[folds=3]"
    assert t.loc[held, "ci_low"].isna().all() and t.loc[~held, "ci_low"].notna().all()
    named = Comparison.from_layers(teacher, student, ids, bootstrap=5, seed=1,
                                   stats_metrics=["projection_residual[folds=3]"]).table
    assert named.loc[named["metric"] == "projection_residual[folds=3]", "ci_low"].notna().all()
    alone = Comparison.from_layers(teacher, student, ids[1:], bootstrap=5, seed=1).table
    assert alone["ci_low"].notna().all()


def test_in_sample_projection_residual_is_flagged_at_n_le_q():
    rng = np.random.default_rng(4)
    X, Y = _layers(rng, 20, [30]), _layers(rng, 20, [25])
    comp = Comparison.from_layers(X, Y, ["projection_residual[in_sample]", "procrustes"])
    assert comp.matrix("projection_residual[in_sample]")[0, 0] == pytest.approx(0, abs=1e-9)  # the blind spot
    assert any("in-sample" in w for w in comp.meta["warnings"])
    assert "warning:" in comp.summary()
    X, Y = _layers(rng, 40, [30]), _layers(rng, 40, [25])
    assert not Comparison.from_layers(X, Y, ["projection_residual[in_sample]"]).meta["warnings"]


def test_bad_inputs_are_user_errors():
    rng = np.random.default_rng(5)
    X, Y = _layers(rng, 20, [4]), _layers(rng, 19, [4])
    with pytest.raises(UserError, match="same number of rows"):
        Comparison.from_layers(X, Y)
    with pytest.raises(UserError, match="unknown metric|metric"):
        Comparison.from_layers(X, X, ["no_such_metric"])
    with pytest.raises(UserError, match="at least 2"):
        Comparison.from_layers([X[0][:1]], [X[0][:1]])
    with pytest.raises(UserError, match="bad layer"):
        parse_layers(["x-y"])
    assert parse_layers(["t:0-2", "s:1", "-1"]) == ([0, 1, 2, -1], [1, -1])


def test_save_writes_everything_and_reads_back(tmp_path, synthetic):
    teacher, student = synthetic
    comp = Comparison.from_layers(teacher, student, DEFAULTS, meta={"teacher": {"name": "t"}})
    out = comp.save(tmp_path / "run")
    names = {p.name for p in out.iterdir()}
    expected = {"results.csv", "report.json", "report.html", "best_match.png", "best_match.svg"}
    expected |= {f"heatmap_{s}.{e}" for s in ("procrustes_distance", "gram_frobenius", "cka_linear_biased",
                                               "projection_residual_folds_5_ridge_auto") for e in ("png", "svg")}
    assert names == expected
    assert png_size(out / "heatmap_procrustes_distance.png") == (round(HEATMAP_FIGSIZE[0] * DPI),
                                                                 round(HEATMAP_FIGSIZE[1] * DPI))
    assert (out / "heatmap_cka_linear_biased.svg").read_text().lstrip().startswith("<?xml")
    back = Comparison.from_csv(out / "results.csv")
    for m in DEFAULTS:
        np.testing.assert_allclose(back.matrix(m), comp.matrix(m), rtol=1e-9)
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"] == DEFAULTS and "plots" in report["timings"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.tmp")]


def test_failed_save_keeps_previous_files(tmp_path, synthetic):
    teacher, student = synthetic
    good = Comparison.from_layers(teacher, student, ["cka"])
    out = good.save(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = Comparison(good.table.assign(metric="no_such_metric"), {})
    with pytest.raises(UserError):
        broken.save(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        good.save(a_file)
    assert a_file.read_text() == "x"


def test_plot_returns_a_figure_with_labelled_colour_bar(synthetic):
    teacher, student = synthetic
    comp = Comparison.from_layers(teacher, student, ["procrustes"])
    fig = comp.plot("procrustes")
    heat_ax, cbar_ax = fig.axes
    assert "lower = more similar" in cbar_ax.get_ylabel() and "procrustes[distance]" in cbar_ax.get_ylabel()
    assert [t.get_text() for t in heat_ax.get_yticklabels()] == ["0", "1", "2"]
    boxes = [p for p in heat_ax.patches if p.get_edgecolor()[:3] == (1.0, 0.0, 0.0)]
    assert len(boxes) == 3  # one best-match box per teacher layer
    # every other patch hatches a cell whose value is within CHANCE_SPREADS chance sd of its chance level
    from repsim.analysis.plot import within_chance

    near = within_chance(*(comp.matrix("procrustes", c) for c in ("value", "chance", "chance_sd")))
    hatched = {(round(p.get_y() + 0.5), round(p.get_x() + 0.5)) for p in heat_ax.patches if p.get_hatch()}
    assert hatched == {tuple(map(int, ij)) for ij in np.argwhere(near)}
    assert near[:, 1].all() and not near[0, 0]  # student layer 1 is independent noise, layer 0 a map of teacher 0
    no_chance = Comparison.from_layers(teacher, student, ["procrustes"], chance_permutations=0).plot("procrustes")
    assert len(no_chance.axes[0].patches) == 3


def test_declared_plugin_bias_is_a_small_sample_bias_on_unrelated_layers():
    """Independent isotropic layers of width r at n = 3r: a convention declared plug-in biased sits far from its
    unrelated value (biased CKA ≈ r/n, Procrustes ρ ≈ 0.85·√(r/n)), its unbiased sibling stays near it."""
    rng = np.random.default_rng(0)
    r, n = 20, 60
    X, Y = rng.standard_normal((n, r)), rng.standard_normal((n, r))
    biased, debiased = get_metric("cka"), get_metric("cka[linear,debiased]")
    assert biased.plugin_biased and not debiased.plugin_biased
    assert biased(X, Y) > 0.5 * r / n
    assert abs(debiased(X, Y)) < 0.1
    plugin, mom = get_metric("procrustes"), get_metric("procrustes[distance,mom]")
    assert plugin.plugin_biased and not mom.plugin_biased
    rho = 1 - plugin(X, Y) ** 2 / 2
    assert rho > 0.5 * 0.85 * np.sqrt(r / n)


def test_small_sample_warning_names_exactly_the_plugin_biased_conventions():
    ids = ["procrustes[distance]", "procrustes[distance,mom]", "cka[linear,biased]", "cka[linear,debiased]",
           "gram_frobenius", "projection_residual"]
    declared = [m for m in ids if get_metric(m).plugin_biased]
    assert declared == ["procrustes[distance]", "cka[linear,biased]", "gram_frobenius"]
    small = [w for w in sample_size_warnings(ids, 100, [64], [64]) if "small-sample bias" in w]
    assert len(small) == 1 and small[0].split(": ", 1)[1].startswith(", ".join(declared) + " are dominated")
    assert not [w for w in sample_size_warnings(ids, 10 * 64, [64], [64]) if "small-sample bias" in w]


def test_the_fit_declarations_say_what_each_metric_does():
    """The comparison's warnings and default statistics read each spec's declarations; they must match the values:
    an in-sample fit is 0 at n ≤ q for an unrelated student (its blind spot), a held-out fit has the id's k folds,
    and only fits without a ridge declare the least-squares overfitting regime."""
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((30, 8)), rng.standard_normal((30, 40))  # n = 30 ≤ q = 40, unrelated
    in_sample = []
    for mid in metric_names():
        sp = get_metric(mid)
        k = int(mid.split("folds=")[1].split(",")[0].rstrip("]")) if "folds=" in mid else None
        assert sp.held_out_folds == k, mid
        assert sp.unregularised_folds == (k if k and "ridge" not in mid else None), mid
        if sp.fits_in_sample:
            in_sample.append(mid)
            assert sp(X, Y) < 1e-10, mid
    assert in_sample == ["projection_residual[in_sample]"]
    warned = sample_size_warnings(["projection_residual[folds=5]", "projection_residual[folds=5,ridge=auto]"], 100,
                                  [8], [40])
    assert len(warned) == 1 and warned[0].startswith("projection_residual[folds=5]:")
