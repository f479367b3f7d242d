"""report.html: what the page holds (provenance, one figure and table per measure, links to the definitions,
escaping), its regeneration by `repsim plot`, the check page, and the page opened in headless Chromium (no
console error, no request leaving the file, every figure drawn)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from browser import chromium, open_page

from repsim.analysis import report
from repsim.analysis.comparison import Comparison
from repsim.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

NO_CHROMIUM = "chromium is not installed (Debian: apt-get install -y --no-install-recommends chromium)"


def _comparison(bootstrap: int = 0, permutations: int = 0, name: str = "teacher-model", chance: int = 0) -> Comparison:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 6))
    teacher = [X @ rng.standard_normal((6, 6)) + 0.1 * k * rng.standard_normal((40, 6)) for k in range(3)]
    student = [X[:, :4] + 0.2 * rng.standard_normal((40, 4)) for _ in range(2)]
    meta = {"teacher": {"name": name, "revision": "sha256:abc123", "width": 6, "layers": [0, 1, 2]},
            "student": {"name": "student-model", "revision": "sha256:def456", "width": 4, "layers": [0, 1]},
            "data": {"spec": "sst2", "name": "sst2-like", "source": "test", "fingerprint": "f" * 64, "n_texts": 40},
            "pooling": "mean", "versions": {"repsim": "0.1.0"}}
    return Comparison.from_layers(teacher, student, ["procrustes", "cka", "gram_frobenius"], bootstrap=bootstrap,
                                  permutations=permutations, chance_permutations=chance, meta=meta)


def _links_resolve(html: str) -> tuple[set[str], set[str]]:
    hrefs = set(re.findall(r'href="#([^"]+)"', html))
    ids = set(re.findall(r'id="([^"]+)"', html))
    return hrefs, ids


def test_page_holds_provenance_figures_tables_and_linked_definitions(tmp_path):
    comp = _comparison(bootstrap=20, permutations=20)
    comp.save(tmp_path / "out")
    html = (tmp_path / "out" / "report.html").read_text()
    for text in ("sha256:abc123", "sha256:def456", "f" * 64, "mean", "repsim 0.1.0", "seed", "95% interval",
                 "p-value", "lower = more similar", "higher = more similar", "Content-Security-Policy"):
        assert text in html, text
    assert html.count('<div class="figure"') == len(comp.metrics) + 1  # one heatmap per measure + best match
    hrefs, ids = _links_resolve(html)
    assert {report.anchor(m) for m in comp.metrics} <= hrefs
    assert hrefs <= ids  # every measure id links to a definition present on the page
    for m in comp.metrics:  # the best-match table and the monotone map as computed by the library
        for t, s in comp.suggest_map(m):
            row = comp.table[(comp.table.metric == m) & (comp.table.teacher_layer == t)
                             & (comp.table.student_layer == s)]
            assert report._num(row["value"].iloc[0]) in html
    assert re.findall(r'(?:src|href)="(?!#|data:)[^"]*"', html) == []  # nothing to load: local anchors only
    assert "<script" not in html


def test_names_are_escaped(tmp_path):
    comp = _comparison(name="<script>alert(1)</script>")
    html = report.comparison_html(comp)
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_chance_levels_are_shown_when_the_results_carry_them():
    comp = _comparison(chance=4)
    html = report.comparison_html(comp)
    assert "<th>chance level</th>" in html
    best = comp.best_matches("procrustes")
    chance = comp.table.set_index(["metric", "teacher_layer", "student_layer"])["chance"]
    for r in best.itertuples():
        assert report._num(chance[(r.metric, r.teacher_layer, r.student_layer)]) in html
    assert "<th>chance level</th>" not in report.comparison_html(_comparison(chance=0))


def test_repsim_plot_regenerates_the_page_from_the_folder(tmp_path, capsys):
    comp = _comparison(bootstrap=10)
    out = comp.save(tmp_path / "out")
    first = (out / "report.html").read_text()
    (out / "report.html").unlink()
    assert main(["plot", str(out)]) == 0
    again = (out / "report.html").read_text()
    strip = re.compile(r"<svg.*?</svg>", re.S)
    assert strip.sub("", again) == strip.sub("", first)  # same text; figures redrawn from the CSV's 10 digits
    # results.csv alone: still a page, provenance says it was not recorded
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(out / "results.csv", alone / "results.csv")
    assert main(["plot", str(alone / "results.csv")]) == 0
    assert "not recorded" in (alone / "report.html").read_text()


def test_plot_into_a_folder_that_cannot_be_written_is_one_line(tmp_path, capsys):
    out = _comparison().save(tmp_path / "out")
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    capsys.readouterr()
    assert main(["plot", str(out), "--out", str(blocker)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("repsim: error:")
    assert blocker.read_text() == "keep"
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_unwritable_report_path_is_a_user_error(tmp_path):
    from repsim.system.errors import UserError

    with pytest.raises(UserError, match="cannot write the report"):
        report.write(tmp_path / "no-such-folder" / "report.html", "<html></html>")


def _check_table() -> pd.DataFrame:
    return pd.DataFrame({"teacher_layer": [6, 12], "student_layer": [3, 6], "procrustes[distance]": [0.5, 0.4],
                         "cka[linear,biased]": [0.9, 0.95], "preserved_fraction": [0.7, 0.8]})


def test_check_page_links_its_measure_columns():
    meta = {"teacher": {"model": "t", "revision": "sha256:1"}, "layer_map": "uniform"}
    html = report.check_html(_check_table(), meta, verdicts=["layer 6 ↔ 3: ok"])
    hrefs, ids = _links_resolve(html)
    assert {"def-procrustes_distance", "def-cka_linear_biased"} <= hrefs <= ids
    assert "preserved_fraction" in html and "sha256:1" in html and html.count('<div class="figure"') == 1


# ------------------------------------------------------------------------------------------- in a browser


def _assert_clean(result: dict, n_figures: int) -> None:
    assert result["leaving"] == [], result["leaving"]
    assert [c for c in result["console"] if c[0] in ("error", "warning", "assert")] == []
    assert result["exceptions"] == []
    assert [entry for entry in result["log"] if entry[0] in ("error", "warning")] == []
    assert len(result["figures"]) == n_figures
    for fig in result["figures"]:
        assert fig["width"] > 200 and fig["height"] > 150 and fig["drawn"] > 10, fig


@pytest.mark.skipif(chromium() is None, reason=NO_CHROMIUM)
def test_report_opens_in_chromium_with_no_error_no_request_and_every_figure_drawn(tmp_path):
    comp = _comparison(bootstrap=10, permutations=10)
    out = comp.save(tmp_path / "out")
    result = open_page(out / "report.html", screenshot=tmp_path / "shot.png")
    _assert_clean(result, len(comp.metrics) + 1)
    assert (tmp_path / "shot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    check_page = tmp_path / "check.html"
    check_page.write_text(report.check_html(_check_table(), {"layer_map": "uniform"}))
    _assert_clean(open_page(check_page), 1)


@pytest.mark.skipif(chromium() is None, reason=NO_CHROMIUM)
def test_the_browser_check_sees_requests_console_errors_and_missing_figures(tmp_path):
    """The checker itself can fail: a page that fetches, logs an error and draws an empty figure is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><div class="figure"><svg width="0" height="0"></svg></div>'
                   '<img src="http://127.0.0.1:9/x.png"><script>console.error("boom")</script></body></html>')
    result = open_page(bad)
    assert result["leaving"] == ["http://127.0.0.1:9/x.png"]
    assert ("error", "boom") in result["console"]
    with pytest.raises(AssertionError):
        _assert_clean(result, 1)


def test_report_json_round_trip_keeps_words_provenance(tmp_path):
    comp = _comparison()
    comp.meta["pooling"] = "words"
    comp.meta["words"] = {"rule": "words-v1", "n_words": 100, "n_used": 90, "dropped": 10}
    out = comp.save(tmp_path / "out")
    assert json.loads((out / "report.json").read_text())["words"]["dropped"] == 10
    assert "90 kept by both models" in Path(out / "report.html").read_text()
