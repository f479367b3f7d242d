"""The fair-comparison recipe: calibrated feature weights, the ridge-initialised projection baseline, clipping
statistics, the CE-only control, saved predictions and the held-out geometry of a run."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from test_distill import FAST, TRAIN, VALID, load_teacher, teacher_dir  # noqa: F401

import repsim.distill as D
from repsim.cli import main
from repsim.distill.geometry import geometry_table, loss_values, reported_pairs
from repsim.distill.grid import arm_config
from repsim.distill.trainer import DistillTrainer
from repsim.system.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = dataclasses.replace(FAST, feature_scale="gradient", projection_init="ridge", projection_lr=1e-2,
                             max_grad_norm=5.0, calibration_batches=2)


@pytest.fixture(scope="module")
def teacher(teacher_dir):  # noqa: F811 - test_distill's fine-tuned tiny BERT classifier
    """A tiny BERT classifier with a trained head (three blocks)."""
    return load_teacher(teacher_dir)


def trainer_for(teacher, loss: str, student: str = "drop:1", **changes) -> DistillTrainer:
    t_model, t_tok = teacher
    cfg = dataclasses.replace(RECIPE, loss=loss, **changes)
    student, tok = D.make_student(student, t_model, t_tok, cfg.task, 2, seed=0)
    encoded = D.encode(tok, TRAIN[0], TRAIN[1], cfg.max_length)
    return DistillTrainer(t_model, student, tok, encoded, cfg, teacher_tokenizer=t_tok, train_texts=TRAIN[0])


def pushes(trainer: DistillTrainer) -> tuple[float, np.ndarray]:
    """Mean ‖∇_θ(CE + α·KD)‖ and mean ‖∇_θ(w_k·ℓ_k)‖ over the calibration batches (θ: the student's weights),
    recomputed here with backward() on fresh gradients."""
    trainer.student.eval()
    params = [p for p in trainer.student.parameters() if p.requires_grad]

    def grad_norm(loss: torch.Tensor) -> float:
        for p in params:
            p.grad = None
        loss.backward(retain_graph=True)
        return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None)))

    task, feat = 0.0, np.zeros(len(trainer.layer_map))
    batches = trainer._fixed_batches(trainer.config.calibration_batches, trainer.config.batch_size)
    for index in batches:
        terms, losses, _hidden = trainer._forward(index)
        task += grad_norm(terms["ce"] + trainer.config.alpha * terms["kd"])
        for k, loss in enumerate(losses):
            feat[k] += grad_norm(trainer.feature_weights[k] * loss)
    return task / len(batches), feat / len(batches)


@pytest.mark.parametrize("loss", ["projection", "cka", "procrustes", "gram_frobenius"])
def test_calibrated_feature_pushes_as_hard_as_the_task(teacher, loss):
    trainer = trainer_for(teacher, loss, student="drop:2")
    assert len(trainer.layer_map) == 2
    task, feat = pushes(trainer)
    np.testing.assert_allclose(feat * len(trainer.layer_map), task, rtol=1e-4)
    assert not np.allclose(trainer.feature_weights.numpy(), 1.0)  # the unweighted losses push differently


def test_calibration_undoes_a_constant_factor_on_the_loss(teacher):
    """procrustes[squared] = d², so near a fixed point its weight differs, but a loss times c gets weight w/c:
    scaling the loss module's output by 10 divides the calibrated weight by 10 exactly."""
    plain = trainer_for(teacher, "procrustes")

    class Scaled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *a, **kw):
            return 10.0 * self.inner(*a, **kw)

    scaled = trainer_for(teacher, "procrustes", feature_scale="fixed")
    scaled.feature_losses = torch.nn.ModuleList([Scaled(m) for m in scaled.feature_losses])
    np.testing.assert_allclose(scaled.calibrate_feature_weights().numpy(), plain.feature_weights.numpy() / 10,
                               rtol=1e-5)


def test_fixed_scale_keeps_unit_weights(teacher):
    trainer = trainer_for(teacher, "cka", feature_scale="fixed")
    assert torch.equal(trainer.feature_weights, torch.ones(len(trainer.layer_map)))


def test_ridge_projection_init_is_the_ridge_solution(teacher):
    trainer = trainer_for(teacher, "projection", ridge_rows=150)
    (t, s), = trainer.layer_map
    lam = trainer.ridge_lambdas[0]
    # the same rows (after the 2 calibration batches of 16), recomputed independently: the student at
    # initialisation in eval mode, numpy normal equations
    rows = list(range(32, 182))
    trainer.student.eval()
    batch = D.collate(trainer.train, rows, trainer.pad_id)
    with torch.no_grad():
        out = trainer.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              output_hidden_states=True)
    Y = D.pooled_mean(out.hidden_states[s].double(), batch["attention_mask"]).numpy()
    X = trainer.cached[f"feat{t}"][rows].double().numpy()
    Yc, Xc = Y - Y.mean(0), X - X.mean(0)
    W = np.linalg.solve(Yc.T @ Yc + lam * np.eye(Yc.shape[1]), Yc.T @ Xc)
    proj = trainer.feature_losses[0].proj
    np.testing.assert_allclose(proj.weight.detach().double().numpy(), W.T, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(proj.bias.detach().double().numpy(), X.mean(0) - Y.mean(0) @ W, rtol=1e-3,
                               atol=1e-5)
    fitted = ((Y @ W + (X.mean(0) - Y.mean(0) @ W) - X) ** 2).mean()
    assert fitted < ((X - X.mean(0)) ** 2).mean()  # better than predicting the teacher's mean
    random_init = trainer_for(teacher, "projection", projection_init="random").feature_losses[0]
    with torch.no_grad():
        random_mse = random_init(torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(Y, dtype=torch.float32))
    assert fitted < float(random_mse)
    assert lam > 0


def test_projection_has_its_own_learning_rate(teacher):
    trainer = trainer_for(teacher, "projection")
    lrs = {id(p): g["initial_lr"] for g in trainer.optimizer.param_groups for p in g["params"]}  # peak lr
    assert {lrs[id(p)] for p in trainer.feature_losses.parameters()} == {RECIPE.projection_lr}
    assert {lrs[id(p)] for p in trainer.student.parameters()} == {RECIPE.lr}


def test_clipped_flag_matches_the_gradient_norm(teacher):
    trainer = trainer_for(teacher, "procrustes", max_grad_norm=1.0)
    rows = [trainer.train_step(list(range(a, a + 16))) for a in range(0, 64, 16)]
    for row in rows:
        assert row["clipped"] == float(row["grad_norm"] > 1.0)
    unclipped = trainer_for(teacher, "procrustes", max_grad_norm=0.0)
    assert all(unclipped.train_step(list(range(a, a + 16)))["clipped"] == 0.0 for a in range(0, 32, 16))


def test_resume_restores_the_calibrated_weights(teacher, tmp_path):
    """The weights come from the student at initialisation: a resumed run keeps them (it does not recalibrate on
    the partly trained student), so it equals an uninterrupted one."""
    t_model, t_tok = teacher
    cfg = dataclasses.replace(RECIPE, loss="cka", epochs=2)
    full = D.distill((t_model, t_tok), "drop:1", TRAIN, VALID, config=cfg, out=tmp_path / "full")
    D.distill((t_model, t_tok), "drop:1", TRAIN, VALID, config=dataclasses.replace(cfg, stop_after=13),
              out=tmp_path / "cut")
    resumed = D.distill((t_model, t_tok), "drop:1", TRAIN, VALID, config=cfg, out=tmp_path / "cut")
    assert resumed.metrics["feature_weights"] == full.metrics["feature_weights"]
    cols = ["total", "ce", "kd", "feature"]
    pd.testing.assert_frame_equal(full.history[cols], resumed.history[cols])


def test_ce_only_arm_has_no_teacher_terms(teacher, tmp_path):
    with pytest.raises(UserError, match="ce_only, none, projection"):  # an unknown arm names the controls too
        arm_config(RECIPE, "bogus")
    cfg = arm_config(RECIPE, "ce_only")
    assert (cfg.loss, cfg.alpha) == ("none", 0.0)
    result = D.distill(teacher, "drop:1", TRAIN, VALID, config=cfg, out=tmp_path)
    np.testing.assert_array_equal(result.history["total"], result.history["ce"])
    assert "feature" not in result.history


def test_predictions_are_saved_and_score_the_run(teacher, tmp_path):
    result = D.distill(teacher, "drop:1", TRAIN, VALID, config=dataclasses.replace(RECIPE, loss="cka"), out=tmp_path)
    table = pd.read_csv(tmp_path / "predictions.csv")
    assert list(table["index"]) == list(range(len(VALID[0])))
    assert list(table["label"]) == VALID[1]
    assert (table["correct"] == (table["label"] == table["prediction"])).all()
    assert result.metrics["accuracy"] == pytest.approx(table["correct"].mean(), abs=0)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= saved["clipped_fraction"] <= 1.0 and saved["steps"] == len(result.history)


def test_unknown_recipe_settings_are_user_errors():
    for bad in ({"feature_scale": "auto"}, {"projection_init": "zeros"}, {"projection_lr": 0.0},
                {"calibration_batches": 0}, {"max_grad_norm": float("nan")}):
        with pytest.raises(UserError):
            dataclasses.replace(D.DistillConfig(), **bad).validate()


# ------------------------------------------------------------------------------------------ held-out geometry


def test_reported_pairs_add_the_untrained_neighbours_and_embeddings():
    assert reported_pairs([(2, 1), (4, 2), (6, 3)]) == [(2, 1), (4, 2), (6, 3), (1, 1), (3, 2), (5, 3), (0, 0)]
    assert reported_pairs([(1, 1), (2, 2)]) == [(1, 1), (2, 2), (0, 1), (0, 0)]


def test_geometry_of_a_copy_and_of_a_shuffled_copy():
    rng = np.random.default_rng(0)
    layers = [rng.standard_normal((120, 16)) @ rng.standard_normal((16, 16)) for _ in range(3)]
    shuffled = [x[rng.permutation(120)] for x in layers]
    same = geometry_table(layers, layers, [(1, 1), (2, 2)], permutations=19, seed=1)
    diag = same[(same.teacher_layer == same.student_layer)]
    np.testing.assert_allclose(diag.loc[diag.measure == "procrustes", "value"], 0.0, atol=1e-6)
    reported = diag.dropna(subset=["p"])
    assert (reported["p"] == 1 / 20).all()  # no permutation is as similar as the copy itself
    assert (reported.loc[reported.measure == "procrustes", "z"] < -5).all()
    other = geometry_table(layers, shuffled, [(1, 1), (2, 2)], permutations=19, seed=1)
    assert same["null_mean"].notna().sum() == other["null_mean"].notna().sum() == 4 * 3  # 4 reported pairs
    other = other.dropna(subset=["z"])
    assert (other["z"].abs() < 4).all()  # a row-shuffled copy sits inside its null


def test_loss_values_of_a_linear_map_fool_only_the_projection():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((96, 8))
    A = np.diag([5.0, 1, 1, 1, 1, 1, 1, 0.2])  # invertible, not a multiple of an orthogonal matrix
    table = loss_values([X, X], [X, X @ A], [(1, 1)], batch_size=32).set_index(["teacher_layer", "measure"])
    assert table.loc[(1, "loss:projection_optimal@all"), "value"] == pytest.approx(0.0, abs=1e-20)
    assert table.loc[(1, "loss:procrustes@all"), "value"] > 0.3
    assert table.loc[(1, "loss:cka@all"), "value"] > 0.05
    # a batch of 32 rows is not the population: the batch means differ from the all-rows values
    assert table.loc[(1, "loss:procrustes@batch32"), "value"] != pytest.approx(
        table.loc[(1, "loss:procrustes@all"), "value"], rel=1e-3)


def test_clipping_bounds_the_student_not_the_projection_maps(teacher):
    trainer = trainer_for(teacher, "projection", max_grad_norm=1e-3)
    row = trainer.train_step(list(range(16)))
    student = torch.sqrt(sum((p.grad ** 2).sum() for p in trainer.student.parameters() if p.grad is not None))
    maps = torch.sqrt(sum((p.grad ** 2).sum() for p in trainer.feature_losses.parameters()))
    assert row["clipped"] == 1.0 and row["grad_norm"] > 1e-3
    assert float(student) == pytest.approx(1e-3, rel=1e-4)
    assert float(maps) > 1e-2  # the auxiliary maps keep their own gradient


def test_command_line_passes_the_recipe_and_runs_the_controls(teacher_dir, tmp_path, capsys):  # noqa: F811
    data = tmp_path / "toy.csv"
    data.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(*TRAIN, strict=True)))
    out = tmp_path / "o"
    args = ["distill", str(teacher_dir), "drop:1", "--data", str(data), "--loss", "ce_only", "projection",
            "--feature-scale", "fixed", "--projection-init", "random", "--projection-lr", "0.002",
            "--max-grad-norm", "0", "--epochs", "1", "--batch-size", "16", "--max-length", "16", "--no-progress",
            "--out", str(out)]
    assert main(args) == 0
    control = json.loads((out / "runs" / "ce_only" / "seed0" / "config.json").read_text())
    assert (control["loss"], control["alpha"]) == ("none", 0.0)
    run = json.loads((out / "runs" / "projection" / "seed0" / "config.json").read_text())
    assert (run["feature_scale"], run["projection_init"], run["projection_lr"], run["max_grad_norm"]) == (
        "fixed", "random", 0.002, 0.0)
    metrics = json.loads((out / "runs" / "projection" / "seed0" / "metrics.json").read_text())
    assert metrics["feature_weights"] == [1.0] and metrics["clipped_fraction"] == 0.0
    assert "ce_only" in capsys.readouterr().out
    assert main([*args[:-2], "--out", str(tmp_path / "p"), "--feature-scale", "both"]) == 2


def test_command_line_grid_of_seeds_writes_the_study_report(teacher_dir, tmp_path, capsys):  # noqa: F811
    data = tmp_path / "toy.csv"
    data.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(*TRAIN, strict=True)))
    out = tmp_path / "o"
    assert main(["distill", str(teacher_dir), "drop:1", "--data", str(data), "--loss", "none", "cka", "--seeds", "2",
                 "--geometry", "3", "--epochs", "1", "--batch-size", "16", "--max-length", "16", "--no-progress",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| cka | none |" in printed and "Geometry before and after" in printed
    for run in ("none/seed0", "none/seed1", "cka/seed0", "cka/seed1"):
        geometry = pd.read_csv(out / "runs" / run / "geometry.csv")
        assert geometry["z"].notna().any()
    assert (out / "before" / "geometry.csv").exists() and (out / "study_before_after.csv").exists()
