"""Figures read as they should: best-match values in the metric's units, thinned layer ticks, the number of texts
in titles, and axes that name models only when the names are known."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from repsim.analysis.comparison import Comparison
from repsim.analysis.plot import MAX_TICK_LABELS, best_match_curve, heatmap, tick_positions
from repsim.measures import functions as M


def _table(n_teacher: int, n_student: int, metrics=("procrustes[distance]", "cka[linear,biased]"), seed=0):
    rng = np.random.default_rng(seed)
    frames = []
    for m in metrics:
        t, s = np.meshgrid(np.arange(n_teacher), np.arange(n_student), indexing="ij")
        frames.append(pd.DataFrame({"teacher_layer": t.ravel(), "student_layer": s.ravel(), "metric": m,
                                    "value": rng.uniform(0.1, 1.2, t.size)}))
    return pd.concat(frames, ignore_index=True)


@given(st.integers(1, 200), st.integers(2, 40))
def test_tick_positions_are_few_spread_and_keep_both_ends(count, max_labels):
    pos = tick_positions(count, max_labels)
    assert pos == sorted(set(pos)) and pos[0] == 0 and pos[-1] == count - 1
    if count <= max_labels:
        assert pos == list(range(count))
    else:
        step = -(-count // max_labels)
        assert len(pos) <= max_labels + 1
        gaps = np.diff(pos)
        assert (gaps[:-1] == step).all() and step / 2 <= gaps[-1] <= 1.5 * step


def test_heatmap_of_31_student_layers_labels_every_second_layer():
    fig = heatmap(_table(13, 31), "procrustes", teacher_name="SmolLM2", student_name="MiniLM", n_texts=50)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(k) for k in range(0, 31, 2)]
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(k) for k in range(13)]
    assert len(ax.get_xticklabels()) <= MAX_TICK_LABELS
    assert ax.get_title().startswith("procrustes[distance], n = 50 texts:")
    assert ax.get_xlabel() == "student layer (MiniLM)" and ax.get_ylabel() == "teacher layer (SmolLM2)"


def test_unknown_names_and_count_are_left_out_not_invented():
    fig = heatmap(_table(3, 4), "cka")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "student layer" and ax.get_ylabel() == "teacher layer"
    assert "n =" not in ax.get_title()


def test_best_match_panels_show_the_best_values_in_the_metrics_own_units():
    metrics = ("procrustes[distance]", "cka[linear,biased]", "gram_frobenius")
    table = _table(5, 4, metrics, seed=3)
    fig = best_match_curve(table, n_texts=20)
    layer_ax, *value_axes = fig.axes
    assert len(value_axes) == len(metrics)
    for metric, ax in zip(metrics, value_axes, strict=True):
        spec = M.get_metric(metric)
        mat = table[table.metric == metric].pivot(index="teacher_layer", columns="student_layer", values="value")
        best = mat.min(axis=1) if spec.direction == "lower" else mat.max(axis=1)
        (line,) = ax.get_lines()
        np.testing.assert_array_equal(line.get_xdata(), np.arange(5))
        np.testing.assert_array_equal(line.get_ydata(), best.to_numpy())  # raw values, not rescaled
        title = ax.get_title(loc="left").splitlines()[-1]
        assert title.startswith(metric) and f"{spec.direction} = more similar" in title
    assert "n = 20 texts" in layer_ax.get_title()


def test_comparison_figures_name_models_and_texts_from_meta():
    rng = np.random.default_rng(1)
    X = [rng.standard_normal((12, 5)) for _ in range(2)]
    comp = Comparison.from_layers(X, X, ["cka"], meta={"teacher": {"name": "org/big-model"},
                                                       "student": {"name": "small"}})
    assert comp.figure_labels() == {"teacher_name": "big-model", "student_name": "small", "n_texts": 12}
    ax = comp.plot("cka").axes[0]
    assert ax.get_ylabel() == "teacher layer (big-model)" and "n = 12 texts" in ax.get_title()


def test_plot_cli_on_a_bare_csv_says_names_are_unknown(tmp_path):
    rng = np.random.default_rng(2)
    X = [rng.standard_normal((10, 4)) for _ in range(2)]
    comp = Comparison.from_layers(X, X, ["cka"], meta={"teacher": {"name": "tea"}, "student": {"name": "stu"}})
    comp.save(tmp_path / "run")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "results.csv").write_bytes((tmp_path / "run" / "results.csv").read_bytes())
    proc = subprocess.run([sys.executable, "-m", "repsim", "plot", str(tmp_path / "bare" / "results.csv")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("\n") == 1 and "model names and the number of texts are unknown" in proc.stderr
    svg = (tmp_path / "bare" / "heatmap_cka_linear_biased.svg").read_text()
    assert "teacher layer<" in svg and "(teacher)" not in svg and "n = " not in svg
    # with report.json beside it, the names and n come back
    proc = subprocess.run([sys.executable, "-m", "repsim", "plot", str(tmp_path / "run" / "results.csv")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""
    svg = (tmp_path / "run" / "heatmap_cka_linear_biased.svg").read_text()
    assert "teacher layer (tea)" in svg and "n = 10 texts" in svg
    assert json.loads((tmp_path / "run" / "report.json").read_text())["teacher"]["name"] == "tea"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
