"""The distillation study end to end in miniature: every arm × two seeds on a tiny model with the fair recipe,
then the report (examples/distill_sst.py runs the same code at full size)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from test_distill import TRAIN, VALID, teacher_dir  # noqa: F401 - the fixture behind `teacher`
from test_distill_recipe import RECIPE
from test_distill_recipe import teacher as teacher  # noqa: F401 - the module-scoped fixture

import repsim.distill as D
from repsim.distill.study import before_after, read_study, write_study_report

pytestmark = pytest.mark.usefixtures("one_thread")

ARMS = ["ce_only", "none", "projection", "cka", "procrustes", "gram_frobenius"]


@pytest.fixture(scope="module")
def study(teacher, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("study")
    cfg = dataclasses.replace(RECIPE, epochs=1)
    runs = D.run_grid(teacher, "drop:1", TRAIN, VALID, losses=ARMS, seeds=2, config=cfg, out=out,
                      geometry_permutations=5)
    return out, runs


def test_every_run_leaves_scores_predictions_and_geometry(study, teacher):  # noqa: F811
    out, runs = study
    mapped = [(D.num_layers(teacher[0]), 1)]  # drop:1 keeps the last block; uniform maps it to the teacher's last
    assert sorted(map(tuple, runs[["loss", "seed"]].to_numpy())) == sorted((a, s) for a in ARMS for s in (0, 1))
    for arm in ARMS:
        for seed in (0, 1):
            run = out / "runs" / arm / f"seed{seed}"
            assert {p.name for p in run.iterdir()} >= {"metrics.json", "predictions.csv", "geometry.csv",
                                                      "train_log.csv", "config.json"}
            assert not (run / "student").exists() and not (run / "checkpoint.pt").exists()
            config = json.loads((run / "config.json").read_text())
            assert (config["loss"], config["alpha"]) == (("none", 0.0) if arm == "ce_only" else
                                                         (arm, RECIPE.alpha))
            metrics = json.loads((run / "metrics.json").read_text())
            assert ("feature_weights" in metrics) == (arm not in ("ce_only", "none"))
            assert ("ridge_lambdas" in metrics) == (arm == "projection")
            geometry = pd.read_csv(run / "geometry.csv")
            trained = geometry.loc[geometry.measure == "procrustes[distance]"].query("trained")
            assert sorted(zip(trained.teacher_layer, trained.student_layer, strict=True)) == mapped
            assert ("loss:projection_trained@all" in set(geometry.measure)) == (arm == "projection")
    # the same data order and initialisation per seed: the CE-only run differs from CE + KD only through KD
    first = pd.read_csv(out / "runs" / "ce_only" / "seed0" / "train_log.csv")
    kd = pd.read_csv(out / "runs" / "none" / "seed0" / "train_log.csv")
    assert first["ce"].iloc[0] == pytest.approx(kd["ce"].iloc[0], rel=1e-6)


def test_report_tables_agree_with_the_runs(study):
    out, _runs = study
    paths = write_study_report(out, replicates=200, permutations=200)
    runs, correct, seeds = read_study(out)
    assert set(correct) == set(ARMS) and all(seeds[a] == [0, 1] for a in ARMS)
    for arm in ARMS:
        accuracies = runs.loc[runs.arm == arm].sort_values("seed")["accuracy"].to_numpy()
        np.testing.assert_allclose(correct[arm].mean(axis=1), accuracies, rtol=0, atol=1e-12)
    table = pd.read_csv(paths["comparisons"])
    none, ce = correct["none"].mean(), correct["ce_only"].mean()
    row = table[(table.arm == "none") & (table.baseline == "ce_only")].iloc[0]
    assert row["diff_pp"] == pytest.approx(100 * (none - ce), abs=1e-9)
    ba = pd.read_csv(paths["before_after"])
    before = pd.read_csv(out / "before" / "geometry.csv")
    want = before[(before.measure == "procrustes[distance]") & before.trained].value.mean()
    got = ba[(ba.measure == "procrustes[distance]") & (ba.pairs == "trained")]["before"]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert paths["before_after_figure"].stat().st_size > 0 and paths["accuracy_figure"].stat().st_size > 0
    assert before_after(out, replicates=50)["n_seeds"].eq(2).all()
