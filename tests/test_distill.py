"""The distillation trainer, derived students, layer maps, evaluation metrics and the paired tests."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import repsim.distill as D
from repsim.distill.evaluation import classification_metrics, paired_table, paired_test
from repsim.system.errors import UserError

POS = "good great funny charming beautiful smart loved".split()
NEG = "bad terrible boring dull ugly awful hated".split()
FILL = "the movie film plot acting story was is very really quite it this".split()


def toy_task(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Linearly separable sentiment: one positive or negative word among neutral fillers."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILL, 5)
        words.insert(rng.randrange(6), rng.choice(POS if label else NEG))
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


TRAIN = toy_task(192, 0)
VALID = toy_task(64, 1)
FAST = D.DistillConfig(epochs=1, batch_size=16, lr=1e-3, progress=False, cache_teacher=False, max_length=16)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_model):
    """A tiny BERT classifier fine-tuned on the toy task, saved with its head (so it can teach)."""
    base = tiny_model("bert")
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    tok = AutoTokenizer.from_pretrained(base)
    out = tmp_path_factory.mktemp("teacher")
    cfg = dataclasses.replace(FAST, epochs=6, lr=3e-3)
    result = D.finetune((model, tok), TRAIN, VALID, config=cfg, out=out)
    assert result.metrics["accuracy"] >= 0.9, result.metrics
    return out / "model"


def load_teacher(path):
    return AutoModelForSequenceClassification.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- one step


@pytest.mark.parametrize("loss", D.FEATURE_LOSSES)
@pytest.mark.parametrize("features", ["mean", "tokens"])
def test_one_step_changes_student_not_teacher_with_finite_grads(teacher_dir, loss, features):
    teacher, tok = load_teacher(teacher_dir)
    student, s_tok = D.make_student("drop:2", teacher, tok, "sequence-classification", 2, seed=0)
    cfg = dataclasses.replace(FAST, loss=loss, features=features)
    encoded = D.encode(tok, *TRAIN, cfg.max_length)
    trainer = D.DistillTrainer(teacher, student, s_tok, encoded, cfg, teacher_tokenizer=tok, train_texts=TRAIN[0])
    t_before, s_before = state(teacher), state(trainer.student)
    values = trainer.train_step(list(range(16)))
    assert all(math.isfinite(v) for v in values.values())
    assert ("feature" in values) == (loss != "none")
    grads = [p.grad for p in trainer.student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(torch.equal(t_before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    changed = [k for k, v in trainer.student.state_dict().items() if not torch.equal(s_before[k], v)]
    assert changed
    if loss != "none":  # the feature loss reaches the mapped blocks: the lower block's weights get a gradient
        lower = trainer.student.bert.encoder.layer[0].attention.self.query.weight.grad
        assert lower is not None and float(lower.abs().sum()) > 0


def test_teacher_reads_texts_through_its_own_tokenizer(teacher_dir, tiny_model):
    """A student with another tokenizer: the cached teacher logits and pooled features are the teacher's own on
    the same texts (feeding the student's token ids to the teacher would give other numbers)."""
    from transformers import BertConfig, BertForSequenceClassification

    teacher, tok = load_teacher(teacher_dir)
    s_tok = AutoTokenizer.from_pretrained(tiny_model("opt"))  # word-level ids, no [CLS]/[SEP]: not BERT's
    torch.manual_seed(0)
    student = BertForSequenceClassification(BertConfig(vocab_size=len(s_tok), hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=4, intermediate_size=64, num_labels=2,
                                                       pad_token_id=s_tok.pad_token_id))
    cfg = dataclasses.replace(FAST, loss="procrustes", layer_map="2:1")
    texts, labels = TRAIN[0][:24], TRAIN[1][:24]
    assert D.encode(tok, texts, labels, 16).input_ids != D.encode(s_tok, texts, labels, 16).input_ids
    trainer = D.DistillTrainer(teacher, student, s_tok, D.encode(s_tok, texts, labels, cfg.max_length), cfg,
                               teacher_tokenizer=tok, train_texts=texts)
    batch = tok(texts, padding=True, truncation=True, max_length=cfg.max_length, return_tensors="pt")
    with torch.no_grad():
        out = teacher(**batch, output_hidden_states=True)
    pooled = D.pooled_mean(out.hidden_states[2], batch["attention_mask"])
    torch.testing.assert_close(trainer.cached["logits"], out.logits.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trainer.cached["feat2"], pooled.float(), atol=1e-5, rtol=1e-5)


def test_feature_gradient_reaches_blocks_only_through_the_feature_loss(teacher_dir):
    """With CE and KD weighted 0, the gradient is the feature loss's alone, and it is non-zero for each loss."""
    teacher, tok = load_teacher(teacher_dir)
    for loss in ("projection", "cka", "procrustes", "gram_frobenius"):
        student, s_tok = D.make_student("drop:2", teacher, tok, "sequence-classification", 2, seed=0)
        cfg = dataclasses.replace(FAST, loss=loss, alpha=0.0)
        trainer = D.DistillTrainer(teacher, student, s_tok, D.encode(tok, *TRAIN, 16), cfg)
        trainer.student.train()
        terms = trainer._loss_terms(list(range(32)))
        grad = torch.autograd.grad(terms["feature"], trainer.student.bert.encoder.layer[0].output.dense.weight)[0]
        assert torch.isfinite(grad).all() and float(grad.abs().max()) > 0, loss


# ---------------------------------------------------------------------------------------------- determinism


def _run(teacher_dir, out=None, **changes):
    teacher, tok = load_teacher(teacher_dir)
    cfg = dataclasses.replace(FAST, **{"loss": "procrustes", "epochs": 2, **changes})
    return D.distill((teacher, tok), "drop:2", TRAIN, VALID, config=cfg, out=out)


def test_same_seed_same_result_and_other_seed_differs(teacher_dir):
    a, b = _run(teacher_dir, seed=3), _run(teacher_dir, seed=3)
    c = _run(teacher_dir, seed=4)
    assert a.history.drop(columns="examples_per_s").equals(b.history.drop(columns="examples_per_s"))
    assert a.metrics["accuracy"] == b.metrics["accuracy"]
    assert all(torch.equal(v, b.student.state_dict()[k]) for k, v in a.student.state_dict().items())
    assert not all(torch.equal(v, c.student.state_dict()[k]) for k, v in a.student.state_dict().items())


def test_resume_from_checkpoint_equals_uninterrupted_run(teacher_dir, tmp_path):
    full = _run(teacher_dir, out=tmp_path / "full", loss="projection")
    steps = len(full.history)
    partial = _run(teacher_dir, out=tmp_path / "cut", loss="projection", stop_after=steps // 2 + 1)
    assert len(partial.history) == steps // 2 + 1 and not partial.metrics
    resumed = _run(teacher_dir, out=tmp_path / "cut", loss="projection")
    assert all(torch.equal(v, resumed.student.state_dict()[k]) for k, v in full.student.state_dict().items())
    cols = [c for c in full.history.columns if c != "examples_per_s"]
    assert full.history[cols].equals(resumed.history[cols])
    assert resumed.metrics["accuracy"] == full.metrics["accuracy"]
    log = (tmp_path / "cut" / "train_log.csv").read_text().splitlines()
    assert len(log) == steps + 1


def test_rerun_of_a_finished_run_keeps_its_training_time(tiny_model, tmp_path):
    """metrics.json's train_seconds is the time the run trained (summed over resumes), also after a rerun that
    finds the run finished and trains nothing."""
    base = tiny_model("bert")

    def pair():
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
        return model, AutoTokenizer.from_pretrained(base)

    cut = D.finetune(pair(), TRAIN, VALID, config=dataclasses.replace(FAST, stop_after=4), out=tmp_path / "ft")
    assert not cut.metrics
    first = D.finetune(pair(), TRAIN, VALID, config=FAST, out=tmp_path / "ft")
    saved = json.loads((tmp_path / "ft" / "metrics.json").read_text())["train_seconds"]
    assert saved == first.metrics["train_seconds"] > 0
    D.finetune(pair(), TRAIN, VALID, config=FAST, out=tmp_path / "ft")
    again = json.loads((tmp_path / "ft" / "metrics.json").read_text())["train_seconds"]
    assert again == saved


def test_resume_with_other_settings_is_refused(teacher_dir, tmp_path):
    _run(teacher_dir, out=tmp_path / "r", stop_after=2)
    with pytest.raises(UserError, match="different settings"):
        _run(teacher_dir, out=tmp_path / "r", lr=5e-4)


# ---------------------------------------------------------------------------------------------- it really trains


@pytest.mark.parametrize("loss", D.FEATURE_LOSSES)
def test_random_narrow_student_learns_separable_task_with_every_loss(teacher_dir, loss):
    teacher, tok = load_teacher(teacher_dir)
    cfg = dataclasses.replace(FAST, loss=loss, epochs=10, lr=3e-3, seed=1)
    student, s_tok = D.make_student("narrow:16:2", teacher, tok, cfg.task, 2, seed=1)
    before = classification_metrics(VALID[1], D.predict(student, s_tok, D.encode(s_tok, *VALID, 16)))["accuracy"]
    result = D.distill((teacher, tok), (student, s_tok), TRAIN, VALID, config=cfg)
    assert result.metrics["accuracy"] >= 0.9, (before, result.metrics)
    assert result.metrics["accuracy"] > before + 0.2


# ---------------------------------------------------------------------------------------------- students


def test_drop_keeps_evenly_spaced_blocks_with_teacher_weights(teacher_dir):
    teacher, tok = load_teacher(teacher_dir)
    student, _ = D.make_student("drop:1", teacher, tok, "sequence-classification", 2, seed=0)
    assert student.config.num_hidden_layers == 1
    kept = student.bert.encoder.layer[0].attention.self.query.weight
    assert torch.equal(kept, teacher.bert.encoder.layer[2].attention.self.query.weight)  # the last block
    explicit, _ = D.make_student("drop:1,3", teacher, tok, "sequence-classification", 2, seed=0)
    last = teacher.bert.encoder.layer[2].output.dense.weight
    assert torch.equal(explicit.bert.encoder.layer[1].output.dense.weight, last)
    x = tok(["good movie"], return_tensors="pt")
    out = explicit(**x, output_hidden_states=True)
    assert len(out.hidden_states) == 3
    with pytest.raises(UserError, match="1..3"):
        D.make_student("drop:4,5", teacher, tok, "sequence-classification", 2, seed=0)
    with pytest.raises(UserError, match="between 1 and 3"):
        D.make_student("drop:9", teacher, tok, "sequence-classification", 2, seed=0)


def test_narrow_student_is_random_and_seeded(teacher_dir):
    teacher, tok = load_teacher(teacher_dir)
    a, _ = D.make_student("narrow:16:2", teacher, tok, "sequence-classification", 2, seed=5)
    b, _ = D.make_student("narrow:16:2", teacher, tok, "sequence-classification", 2, seed=5)
    assert a.config.hidden_size == 16 and a.config.num_hidden_layers == 2
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    with pytest.raises(UserError, match="narrow:HIDDEN:LAYERS"):
        D.make_student("narrow:16", teacher, tok, "sequence-classification", 2, seed=0)


# ---------------------------------------------------------------------------------------------- layer maps


def test_layer_maps():
    assert D.parse_layer_map("uniform", 6, 3) == [(2, 1), (4, 2), (6, 3)]
    assert D.parse_layer_map("uniform", 12, 6)[-1] == (12, 6)
    assert D.parse_layer_map("0:0, 6:3", 6, 3) == [(0, 0), (6, 3)]
    with pytest.raises(UserError, match="teacher layer 7 out of range 0..6"):
        D.parse_layer_map("7:1", 6, 3)
    with pytest.raises(UserError, match="student layer 4 out of range 0..3"):
        D.parse_layer_map("2:4", 6, 3)
    with pytest.raises(UserError, match="bad layer map"):
        D.parse_layer_map("2-1", 6, 3)
    assert D.parse_layer_map("0->0 3->1", 6, 3) == [(0, 0), (3, 1)]


def test_layer_map_from_suggest_map_files(tmp_path):
    csv = tmp_path / "map.csv"
    csv.write_text("teacher_layer,student_layer,value\n3,1,0.2\n6,2,0.1\n")
    assert D.parse_layer_map(str(csv), 6, 2) == [(3, 1), (6, 2)]
    js = tmp_path / "map.json"
    js.write_text('{"pairs": [[2, 1], [5, 2]]}')
    assert D.parse_layer_map(str(js), 6, 2) == [(2, 1), (5, 2)]
    printed = tmp_path / "map.txt"  # the line `repsim compare --suggest-map` prints, saved from the terminal
    printed.write_text("suggested monotone layer map under cka[linear,biased] (teacher→student): 0→0, 3→1, 6→2\n")
    assert D.parse_layer_map(str(printed), 6, 2) == [(0, 0), (3, 1), (6, 2)]


# ---------------------------------------------------------------------------------------------- bad input


def test_token_features_with_a_different_tokenizer_is_a_clear_error(teacher_dir, tiny_model):
    teacher, tok = load_teacher(teacher_dir)
    other = tiny_model("opt")
    student = AutoModelForSequenceClassification.from_pretrained(other, num_labels=2)
    s_tok = AutoTokenizer.from_pretrained(other)
    cfg = dataclasses.replace(FAST, loss="cka", features="tokens")
    with pytest.raises(UserError, match="identical tokenizers"):
        D.distill((teacher, tok), (student, s_tok), TRAIN, VALID, config=cfg)
    pooled = D.distill((teacher, tok), (student, s_tok), TRAIN, VALID, config=dataclasses.replace(cfg, features="mean"))
    assert 0 <= pooled.metrics["accuracy"] <= 1


def test_classification_without_labels_is_a_clear_error(teacher_dir):
    with pytest.raises(UserError, match="no labels"):
        D.distill(load_teacher(teacher_dir), "drop:2", TRAIN[0], VALID, config=FAST)


def test_teacher_without_trained_head_is_refused_unless_finetuned(tiny_model):
    base = tiny_model("bert")
    pair = (AutoModelForSequenceClassification.from_pretrained(base, num_labels=2), AutoTokenizer.from_pretrained(base))
    pair[0].config.architectures = ["BertModel"]
    with pytest.raises(UserError, match="no trained head"):
        D.distill(pair, "drop:2", TRAIN, VALID, config=FAST)
    result = D.distill(pair, "drop:2", TRAIN, VALID, config=FAST, finetune_teacher=True)
    assert "accuracy" in result.metrics


def test_student_settings_change_without_refitting_the_teacher(tiny_model, tmp_path):
    """--finetune-teacher has its own settings (--teacher-lr, --teacher-epochs, --teacher-batch-size, seed 0): a
    second grid with another --lr, --epochs or --seed reuses OUT/teacher instead of being refused."""
    data = tmp_path / "toy.csv"
    data.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(*TRAIN, strict=True)))
    common = dict(data=str(data), finetune_teacher=True, teacher_epochs=1, out=tmp_path / "o",
                  batch_size=16, max_length=16, progress=False, cache_teacher=False)
    D.distill_command(str(tiny_model("bert")), "drop:1", lr=1e-3, epochs=1, **common)
    teacher_metrics = (tmp_path / "o" / "teacher" / "metrics.json").read_text()
    teacher_log = (tmp_path / "o" / "teacher" / "train_log.csv").read_text()
    config = json.loads((tmp_path / "o" / "teacher" / "config.json").read_text())
    assert (config["lr"], config["epochs"], config["seed"], config["batch_size"]) == (1e-4, 1, 0, 32)
    D.distill_command(str(tiny_model("bert")), "drop:1", lr=3e-4, epochs=2, seed=1, **common)
    assert (tmp_path / "o" / "teacher" / "metrics.json").read_text() == teacher_metrics  # not refitted
    assert (tmp_path / "o" / "teacher" / "train_log.csv").read_text() == teacher_log
    assert (tmp_path / "o" / "runs" / "none" / "seed1" / "metrics.json").exists()
    with pytest.raises(UserError, match="different settings"):  # the teacher's own settings still guard it
        D.distill_command(str(tiny_model("bert")), "drop:1", lr=3e-4, **{**common, "teacher_lr": 1e-3})


def _cli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "repsim", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120, env=env)


def test_cli_bad_input_gives_one_line_and_status_2(teacher_dir, tiny_model, tmp_path):
    unlabelled = tmp_path / "texts.txt"
    unlabelled.write_text("\n".join(TRAIN[0]) + "\n")
    runs = {
        "no labels": _cli("distill", str(teacher_dir), "drop:2", "--data", str(unlabelled), "--no-progress",
                          "--out", str(tmp_path / "o1"), cwd=tmp_path),
        "out of range": _cli("distill", str(tiny_model("opt")), "drop:2", "--data", str(unlabelled), "--no-progress",
                             "--task", "causal-lm", "--loss", "cka", "--layer-map", "9:1", "--out",
                             str(tmp_path / "o2"), cwd=tmp_path),
    }
    for what, proc in runs.items():
        assert proc.returncode == 2, (what, proc.stderr[-2000:])
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith("repsim: error:"), (what, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
    assert "label" in runs["no labels"].stderr
    assert "out of range" in runs["out of range"].stderr


# ---------------------------------------------------------------------------------------------- decoders


@pytest.mark.parametrize("loss", D.FEATURE_LOSSES)
def test_causal_lm_step_on_tiny_opt(tiny_model, loss):
    path = tiny_model("opt")
    teacher, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    student, s_tok = D.make_student("drop:2", teacher, tok, "causal-lm", None, seed=0)
    cfg = dataclasses.replace(FAST, task="causal-lm", loss=loss, features="tokens")
    trainer = D.DistillTrainer(teacher, student, s_tok, D.encode(tok, TRAIN[0], None, 16), cfg,
                               teacher_tokenizer=tok, train_texts=TRAIN[0])
    t_before, s_before = state(teacher), state(trainer.student)
    values = trainer.train_step(list(range(16)))
    assert {"ce", "kd"} <= set(values) and all(math.isfinite(v) for v in values.values())
    assert all(torch.equal(t_before[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(s_before[k], v) for k, v in trainer.student.state_dict().items())
    assert all(torch.isfinite(p.grad).all() for p in trainer.student.parameters() if p.grad is not None)


def test_causal_lm_distillation_lowers_perplexity(tiny_model):
    path = tiny_model("opt")
    teacher, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    tuned = D.finetune((teacher, tok), TRAIN[0], config=dataclasses.replace(FAST, task="causal-lm", epochs=3))
    teacher = tuned.student
    student, s_tok = D.make_student("drop:2", teacher, tok, "causal-lm", None, seed=0)
    valid = D.encode(tok, VALID[0], None, 16)
    before = D.perplexity(student, s_tok, valid)
    cfg = dataclasses.replace(FAST, task="causal-lm", loss="procrustes", features="tokens", epochs=2)
    result = D.distill((teacher, tok), (student, s_tok), TRAIN[0], VALID[0], config=cfg)
    assert result.metrics["perplexity"] < before
    assert result.metrics["perplexity"] < len(tok)  # better than uniform over the vocabulary


def test_drop_layers_on_decoders_renumbers_blocks(tiny_model):
    for kind in ("opt", "llama", "gpt2"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model(kind))
        tok = AutoTokenizer.from_pretrained(tiny_model(kind))
        student = D.drop_layers(model, [0, 2])
        ids = tok(["the movie was good"], return_tensors="pt")
        out = student(**ids, output_hidden_states=True, use_cache=True)
        assert len(out.hidden_states) == 3 and torch.isfinite(out.logits).all()


# ---------------------------------------------------------------------------------------------- evaluation


def test_classification_metrics_against_counts():
    y = [1, 1, 1, 0, 0, 0, 1, 0]
    p = [1, 1, 0, 0, 0, 1, 1, 0]
    tp, tn, fp, fn = 3, 3, 1, 1
    m = classification_metrics(y, p)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert m["mcc"] == pytest.approx(mcc)
    assert classification_metrics(y, y)["mcc"] == pytest.approx(1.0)
    assert classification_metrics(y, [1 - v for v in y])["mcc"] == pytest.approx(-1.0)
    assert classification_metrics(y, [1] * 8)["mcc"] == 0.0  # constant predictor: MCC defined as 0


def test_paired_test_agrees_with_scipy_on_a_hand_example():
    a = [0.81, 0.83, 0.80, 0.85, 0.82, 0.84]
    b = [0.79, 0.80, 0.81, 0.82, 0.78, 0.80]
    r = paired_test(a, b)
    t = stats.ttest_rel(a, b)
    w = stats.wilcoxon(a, b)
    assert r["t"] == pytest.approx(t.statistic) and r["p_t"] == pytest.approx(t.pvalue)
    assert r["w"] == pytest.approx(w.statistic) and r["p_wilcoxon"] == pytest.approx(w.pvalue)
    d = np.subtract(a, b)
    assert r["t"] == pytest.approx(d.mean() / (d.std(ddof=1) / math.sqrt(len(d))))  # the t formula itself
    assert r["w"] == 1.0  # the one negative difference (−0.01) has the smallest |d|: rank 1 = min(R+, R−)
    assert r["mean_diff"] == pytest.approx(d.mean())


def test_a_loss_against_itself_gives_p_one():
    a = [0.8, 0.82, 0.79, 0.85, 0.81]
    r = paired_test(a, a)
    assert r["p_t"] == 1.0 and r["p_wilcoxon"] == 1.0 and r["mean_diff"] == 0.0
    # nearly identical (one seed differs) is a valid test with a large p
    r2 = paired_test(a, [0.8, 0.82, 0.79, 0.85, 0.8101])
    assert r2["p_t"] > 0.3 and r2["p_wilcoxon"] == pytest.approx(1.0)


def test_paired_table_pairs_by_seed():
    import pandas as pd

    runs = pd.DataFrame({"loss": ["none"] * 5 + ["cka"] * 5 + ["procrustes"] * 5, "seed": list(range(5)) * 3,
                         "accuracy": [0.80, 0.81, 0.79, 0.82, 0.80, 0.81, 0.82, 0.80, 0.82, 0.81,
                                      0.83, 0.84, 0.82, 0.85, 0.83]})
    table = paired_table(runs)
    row = table[(table["loss"] == "procrustes") & (table["baseline"] == "none")].iloc[0]
    assert row["mean_diff"] == pytest.approx(0.03) and row["n"] == 5
    assert row["p_wilcoxon"] == pytest.approx(0.0625)  # 5 seeds, all better: the smallest two-sided exact p
    assert set(table["baseline"]) == {"none", "cka"}


def test_grid_writes_tables_and_figure_resumes_and_refuses_other_settings(teacher_dir, tmp_path):
    teacher = load_teacher(teacher_dir)
    runs = D.run_grid(teacher, "drop:2", TRAIN, VALID, losses=["none", "cka"], seeds=2, config=FAST, out=tmp_path)
    assert sorted(zip(runs["loss"], runs["seed"], strict=True)) == [("cka", 0), ("cka", 1), ("none", 0), ("none", 1)]
    for name in ("runs.csv", "summary.csv", "summary.md", "paired_tests.csv", "accuracy.png", "teacher_metrics.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert not (tmp_path / "runs" / "cka" / "seed0" / "checkpoint.pt").exists()
    stamp = (tmp_path / "runs" / "cka" / "seed0" / "metrics.json").stat().st_mtime_ns
    again = D.run_grid(teacher, "drop:2", TRAIN, VALID, losses=["none", "cka"], seeds=2, config=FAST, out=tmp_path)
    assert again.equals(runs) and (tmp_path / "runs" / "cka" / "seed0" / "metrics.json").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="other settings"):
        D.run_grid(teacher, "drop:2", TRAIN, VALID, losses=["none"], seeds=1, config=dataclasses.replace(FAST, lr=1e-2),
                   out=tmp_path)


def test_rouge_l_on_hand_examples():
    from repsim.distill.evaluation import rouge_l

    # LCS("the cat sat on the mat", "the cat is on the mat") = the cat on the mat = 5 of 6 tokens each side
    assert rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    # P = 2/2, R = 2/4 → F = 2·1·0.5/1.5
    assert rouge_l("police killed", "police killed the gunman") == pytest.approx(2 / 3)
    assert rouge_l("a b c", "c b a") == pytest.approx(1 / 3)  # order matters: LCS is 1 token
    assert rouge_l("", "anything") == 0.0 and rouge_l("x y", "x y") == 1.0


def test_holdout_split_is_fixed_disjoint_and_random(tmp_path):
    path = tmp_path / "toy.csv"
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(*TRAIN, strict=True)))
    train, valid = D.load_train_validation(str(path))
    again = D.load_train_validation(str(path))[1]
    assert len(valid.texts) == round(0.1 * len(TRAIN[0])) and len(train.texts) + len(valid.texts) == len(TRAIN[0])
    assert valid.texts == again.texts
    assert 0 < sum(valid.labels) < len(valid.labels)  # not a periodic pick of one class
    small, _ = D.load_train_validation(str(path), max_train=50)
    assert len(small.texts) == 50 and set(small.texts) <= set(train.texts)
    assert small.texts != train.texts[:50]  # a seeded random subset, not the first N, as the help says
    order = {t: i for i, t in enumerate(train.texts)}
    assert [order[t] for t in small.texts] == sorted(order[t] for t in small.texts)


def test_max_train_and_max_val_help_says_what_the_code_does():
    from repsim.cli import build_parser

    for command in ("distill", "finetune"):
        sub = build_parser()._subparsers._group_actions[0].choices[command]
        helps = {a.dest: a.help for a in sub._actions}
        for dest in ("max_train", "max_val"):
            assert "random" in helps[dest] and "first" not in helps[dest], (command, dest, helps[dest])
