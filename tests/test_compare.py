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

from repsim import metrics as M
from repsim.comparison import Comparison, monotone_map, parse_layers
from repsim.errors import UserError
from repsim.plot import DPI, HEATMAP_FIGSIZE

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
    assert list(t.columns) == ["teacher_layer", "student_layer", "metric", "value", "ci_low", "ci_high", "p_value"]
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
    assert np.diag(comp.matrix("projection_residual[folds=5]")) == pytest.approx([0, 0, 0], abs=1e-9)
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
    expected = {"results.csv", "report.json", "best_match.png", "best_match.svg"}
    expected |= {f"heatmap_{s}.{e}" for s in ("procrustes_distance", "gram_frobenius", "cka_linear_biased",
                                               "projection_residual_folds_5") for e in ("png", "svg")}
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
    assert len(heat_ax.patches) == 3  # one best-match box per teacher layer
