"""`repsim compare` / `repsim plot` end to end: tiny random models in a subprocess, the real default pair
(marked real), and the user errors that must be one line with exit status 2 and no output left behind."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_compare import png_size
from tiny_models import WORDS

from repsim.analysis.plot import DPI, HEATMAP_FIGSIZE
from repsim.cli import main
from repsim.measures import functions as M

HEATMAP_PX = (round(HEATMAP_FIGSIZE[0] * DPI), round(HEATMAP_FIGSIZE[1] * DPI))


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "repsim", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=600)


@pytest.fixture
def texts_file(tmp_path) -> Path:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(40)]
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def pair(tiny_model):
    return tiny_model("bert", seed=0), tiny_model("bert", seed=1, hidden=16, layers=2)


def _check_csv_against_features(table: pd.DataFrame, teacher: str, student: str, data) -> None:
    """Every value in results.csv equals the metric function on the features in the activation store."""
    from repsim.activations.data import load_texts
    from repsim.activations.extract import extract

    texts = load_texts(str(data))
    t_act = extract(teacher, texts, pool="mean", progress=False)
    s_act = extract(student, texts, pool="mean", progress=False)
    assert t_act.meta.get("cache_hit", True) is not False  # the comparison stored them; this read them back
    for row in table.itertuples():
        expected = M.get_metric(row.metric)(np.array(t_act[row.teacher_layer]), np.array(s_act[row.student_layer]))
        assert row.value == pytest.approx(expected, rel=1e-6, abs=1e-9), row


def test_compare_end_to_end_on_tiny_models(tmp_path, pair, texts_file):
    teacher, student = map(str, pair)
    proc = run_cli("compare", teacher, student, "--data", str(texts_file), "--out", "out", "--bootstrap", "10",
                   "--permutations", "9", "--stats-metrics", "procrustes", "cka", "--suggest-map", "procrustes",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = tmp_path / "out"
    assert "40 texts" in proc.stdout and "best student layer per teacher layer" in proc.stdout
    assert "suggested monotone layer map under procrustes[distance]" in proc.stdout
    table = pd.read_csv(out / "results.csv")
    assert list(table.columns) == ["teacher_layer", "student_layer", "metric", "value", "chance", "chance_sd", "ci_low",
                                   "ci_high", "p_value"]
    assert len(table) == 4 * 3 * 4  # 4 teacher layers (3 blocks + embeddings) × 3 student layers × 4 metrics
    assert set(table["metric"]) == set(M.DEFAULT_METRICS)
    with_stats = table["metric"].isin(["procrustes[distance]", "cka[linear,biased]"])
    assert table.loc[with_stats, ["ci_low", "ci_high", "p_value"]].notna().all().all()
    assert table.loc[~with_stats, ["ci_low", "ci_high", "p_value"]].isna().all().all()
    sub = table[with_stats]
    assert (sub["ci_low"] <= sub["value"] + 1e-12).all() and (sub["value"] <= sub["ci_high"] + 1e-12).all()
    for stem in ("procrustes_distance", "gram_frobenius", "cka_linear_biased",
                 "projection_residual_folds_5_ridge_auto"):
        assert png_size(out / f"heatmap_{stem}.png") == HEATMAP_PX
        assert (out / f"heatmap_{stem}.svg").stat().st_size > 1000
    assert png_size(out / "best_match.png")[0] > 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["n_texts"] == 40 and report["data"]["fingerprint"]
    assert report["pooling"] == "mean" and report["versions"]["repsim"]
    assert report["teacher"]["revision"] and report["student"]["layers"] == [0, 1, 2]
    assert {"load", "extract", "metrics", "bootstrap", "permutations", "plots"} <= set(report["timings"])
    # every warning is one `repsim: warning:` line on stderr and one entry of report.json
    assert report["warnings"] and "n = 40 texts < 10 ×" in report["warnings"][0]
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("repsim: warning:")] == [
        f"repsim: warning: {w}" for w in report["warnings"]]
    assert table["chance"].notna().sum() == 2 * 4 * 3  # procrustes and cka (the statistics' metrics)
    assert report["chance"]["permutations"] == 4 and len(report["chance"]["best_matches"]["cka[linear,biased]"]) == 4
    last = proc.stdout.strip().splitlines()[-1]  # the closing line names every stage's time, as report.json does
    assert last.startswith("wrote ")
    for stage in ("load", "extract", "metrics", "bootstrap", "permutations", "plots"):
        assert f"{stage} {report['timings'][stage]:.1f}s" in last, (stage, last)
    _check_csv_against_features(table, teacher, student, texts_file)

    # `repsim plot` redraws every figure from the CSV alone
    proc = run_cli("plot", str(out / "results.csv"), "--out", "redrawn", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert png_size(tmp_path / "redrawn" / "heatmap_cka_linear_biased.png") == HEATMAP_PX


def test_model_against_itself_through_the_cli(tmp_path, tiny_model, texts_file, capsys):
    model = str(tiny_model("bert", seed=0))
    assert main(["compare", model, model, "--data", str(texts_file), "--out", str(tmp_path / "o")]) == 0
    table = pd.read_csv(tmp_path / "o" / "results.csv")
    diag = table[table["teacher_layer"] == table["student_layer"]]
    for metric, expected in [("procrustes[distance]", 0.0), ("gram_frobenius", 0.0), ("cka[linear,biased]", 1.0),
                             ("projection_residual[folds=5,ridge=auto]", 0.0)]:
        values = diag[diag["metric"] == metric]["value"].to_numpy()
        assert len(values) == 4
        np.testing.assert_allclose(values, expected, atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--metrics", "nonsense_metric"], "nonsense_metric"),
    (["--layers", "s:7"], "unknown student layer 7"),
    (["--layers", "9"], "unknown teacher layer 9"),
    (["--max-samples", "1"], "--max-samples"),
    (["--suggest-map", "cka[linear,debiased]"], "--suggest-map"),
])
def test_bad_input_is_one_line_status_2_and_writes_nothing(tmp_path, pair, texts_file, capsys, args, message):
    teacher, student = map(str, pair)
    out = tmp_path / "out"
    status = main(["compare", teacher, student, "--data", str(texts_file), "--out", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["texts.txt"]


def test_output_folder_that_is_a_file(tmp_path, pair, texts_file, capsys):
    teacher, student = map(str, pair)
    target = tmp_path / "taken"
    target.write_text("keep me")
    assert main(["compare", teacher, student, "--data", str(texts_file), "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a folder" in err
    assert target.read_text() == "keep me"


def test_pool_tokens_with_different_tokenizers_is_refused_before_extraction(tmp_path, tiny_model, texts_file, capsys):
    """Token pooling with different tokenizers: one line naming --pool words, before any extraction (no progress
    bars; the row counts are never compared, since two tokenizers can give equal counts by chance)."""
    teacher, student = str(tiny_model("bert", seed=0)), str(tiny_model("gpt2", seed=0))
    capsys.readouterr()  # what writing the tiny models printed
    out = tmp_path / "out"
    status = main(["compare", teacher, student, "--data", str(texts_file), "--pool", "tokens", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("repsim: error:") and "tokenizers differ" in err and "--pool words" in err
    assert not out.exists()


def test_pool_words_on_different_tokenizers_writes_results(tmp_path, tiny_model, texts_file, capsys):
    teacher, student = str(tiny_model("bert", seed=0)), str(tiny_model("gpt2", seed=0))
    out = tmp_path / "out"
    assert main(["compare", teacher, student, "--data", str(texts_file), "--pool", "words", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(out / "results.csv")
    report = json.loads((out / "report.json").read_text())
    n_words = sum(len(line.split()) for line in texts_file.read_text().splitlines())  # plain words, no punctuation
    assert report["pooling"] == "words" and report["words"]["n_words"] == n_words == report["words"]["n_used"]
    assert f"{n_words} words" in printed
    assert set(table["metric"]) == {"procrustes[distance]", "gram_frobenius", "cka[linear,biased]",
                                    "projection_residual[in_sample]"}


def test_cli_user_error_has_no_traceback_in_a_real_process(tmp_path, pair, texts_file):
    teacher, student = map(str, pair)
    proc = run_cli("compare", teacher, student, "--data", str(texts_file), "--metrics", "bogus", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().startswith("repsim: error:")
    proc = run_cli("plot", str(tmp_path / "missing.csv"), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


@pytest.mark.real
def test_default_pair_end_to_end(tmp_path):
    proc = run_cli("compare", "--max-samples", "64", "--out", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "all-mpnet-base-v2" in proc.stdout and "all-MiniLM-L6-v2" in proc.stdout
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    assert len(table) == 13 * 7 * 4
    assert png_size(tmp_path / "out" / "heatmap_procrustes_distance.png") == HEATMAP_PX
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["teacher"]["width"] == 768 and report["student"]["width"] == 384
    assert report["data"]["n_texts"] == 64
    # the values are the metric functions on the stored features
    from repsim.activations import assets
    from repsim.activations.data import load_texts
    from repsim.activations.extract import extract

    texts = load_texts("sst2", max_samples=64, seed=0)
    t_act = extract(assets.DEFAULT_TEACHER, texts, layers=[0, 12], progress=False)
    s_act = extract(assets.DEFAULT_STUDENT, texts, layers=[0, 6], progress=False)
    for t_layer, s_layer in [(0, 0), (12, 6)]:
        for metric in M.DEFAULT_METRICS:
            row = table[(table.teacher_layer == t_layer) & (table.student_layer == s_layer) & (table.metric == metric)]
            expected = M.get_metric(metric)(np.array(t_act[t_layer]), np.array(s_act[s_layer]))
            assert row["value"].iloc[0] == pytest.approx(expected, rel=1e-5, abs=1e-8)
