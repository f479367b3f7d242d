"""Runs: fine-tuning (CE only), one distillation, and the grid of every loss × seed with its summary; and the
glue behind ``repsim finetune`` and ``repsim distill``."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from repsim.activations.layers import parse_layer_map
from repsim.analysis.comparison import check_out_dir
from repsim.distill.config import (
    CONTROLS,
    FEATURE_LOSSES,
    RUNTIME_ONLY,
    DistillConfig,
    DistillResult,
    teacher_finetune_config,
)
from repsim.distill.data import encode, label_count, load_train_validation, texts_labels
from repsim.distill.evaluation import classification_metrics, evaluate, summarize_grid
from repsim.distill.geometry import geometry_table, layer_features, loss_values
from repsim.distill.students import has_trained_head, load, make_student
from repsim.distill.study import write_study_report
from repsim.distill.trainer import DistillTrainer, seed_everything
from repsim.system.errors import UserError
from repsim.system.files import write_text_atomic, writing


def finetune(model: str | tuple[nn.Module, Any], train: Any, validation: Any = None, *,
             config: DistillConfig | None = None, out: str | Path | None = None) -> DistillResult:
    """Fine-tune a classifier (CE only) — e.g. a teacher without a trained head. Saves the model to ``out/model``.

    ``train`` / ``validation``: TextData, (texts, labels), or lists. Returns metrics on ``validation``.
    """
    config = dataclasses.replace(config or DistillConfig(), loss="none", alpha=0.0, beta=0.0)
    texts, labels = texts_labels(train)
    if config.task == "sequence-classification" and labels is None:
        raise UserError("the training data has no labels; classification needs a label column")
    seed_everything(config.seed)
    net, tok = load(model, config.task, label_count(labels)) if isinstance(model, (str, Path)) else model
    return _run(None, net, tok, texts, labels, validation, config, out, teacher_tokenizer=None)


def distill(teacher: str | tuple[nn.Module, Any], student: str | tuple[nn.Module, Any], train: Any,
            validation: Any = None, *, config: DistillConfig | None = None, out: str | Path | None = None,
            finetune_teacher: bool = False, teacher_config: DistillConfig | None = None,
            save_student: bool = True) -> DistillResult:
    """Distil ``teacher`` into ``student`` (see the module docstring for the loss) and evaluate on ``validation``.

    ``teacher``: spec (hub id, short name, local folder) or a loaded (model, tokenizer). A classifier teacher
    without a trained head raises UserError unless ``finetune_teacher`` (then it is fine-tuned first with
    ``teacher_config``, saved under ``out/teacher``). ``student``: spec, ``drop:N``, ``drop:i,j``,
    ``narrow:HIDDEN:LAYERS`` (see :func:`make_student`) or a loaded pair. With ``out``, writes ``config.json``,
    ``train_log.csv``, ``metrics.json``, ``checkpoint.pt`` (resumable), ``predictions.csv`` (classification: index,
    label, prediction, correct per validation text) and, with ``save_student``, the student under ``out/student``.
    """
    config = config or DistillConfig()
    config.validate()
    texts, labels = texts_labels(train)
    classify = config.task == "sequence-classification"
    if classify and labels is None:
        raise UserError("the training data has no labels; classification needs a label column")
    t_model, t_tok = load(teacher, config.task, label_count(labels)) if isinstance(teacher, (str, Path)) else teacher
    if not has_trained_head(t_model, config.task):
        if not finetune_teacher:
            raise UserError(f"the teacher {teacher if isinstance(teacher, str) else type(t_model).__name__} has no "
                            "trained head for this task; fine-tune it first (repsim finetune, or "
                            "`finetune_teacher=True`)")
        tcfg = teacher_config or teacher_finetune_config(config)
        res = finetune((t_model, t_tok), (texts, labels), validation, config=tcfg,
                       out=None if out is None else Path(out) / "teacher")
        t_model = res.student
    seed_everything(config.seed)
    if isinstance(student, (str, Path)):
        s_model, s_tok = make_student(str(student), t_model, t_tok, config.task, label_count(labels), config.seed)
    else:
        s_model, s_tok = student
    return _run(t_model, s_model, s_tok, texts, labels, validation, config, out, teacher_tokenizer=t_tok,
                save_model=save_student)


def _run(teacher: nn.Module | None, student: nn.Module, tokenizer: Any, texts: list[str], labels: list[int] | None,
         validation: Any, config: DistillConfig, out: str | Path | None, *, teacher_tokenizer: Any,
         save_model: bool = True) -> DistillResult:
    out_path = Path(out) if out is not None else None
    encoded = encode(tokenizer, texts, labels, config.max_length)
    trainer = DistillTrainer(teacher, student, tokenizer, encoded, config, teacher_tokenizer=teacher_tokenizer,
                             train_texts=texts, out=out_path)
    if out_path is not None:
        write_text_atomic(out_path / "config.json", json.dumps(dataclasses.asdict(config), indent=2))
    history = trainer.fit(resume=out_path is not None)
    metrics: dict[str, Any] = {}
    validation_features = None
    if trainer.finished and validation is not None:
        v_texts, v_labels = texts_labels(validation)
        v_encoded = encode(tokenizer, v_texts, v_labels, config.max_length)
        if config.task == "sequence-classification" and v_labels is not None:
            logits, validation_features = layer_features(trainer.student, v_encoded, trainer.pad_id,
                                                         batch_size=config.eval_batch_size, device=trainer.device)
            predictions = logits.argmax(-1).numpy()
            metrics = classification_metrics(v_labels, predictions)
            if out_path is not None:
                table = pd.DataFrame({"index": range(len(v_labels)), "label": v_labels, "prediction": predictions})
                table["correct"] = (table["label"] == table["prediction"]).astype(int)
                write_text_atomic(out_path / "predictions.csv", table.to_csv(index=False))
        else:
            metrics = evaluate(trainer.student, tokenizer, v_encoded, config.task, config.eval_batch_size)
        metrics["train_seconds"] = float(getattr(trainer, "train_seconds", float("nan")))
        metrics.update(training_facts(trainer))
    if out_path is not None and trainer.finished:
        if save_model:
            _save_model(trainer.student, tokenizer, out_path / ("model" if teacher is None else "student"))
        if metrics:  # last: a run folder with metrics.json is finished (run_grid skips it)
            write_text_atomic(out_path / "metrics.json", json.dumps(metrics, indent=2))
    return DistillResult(metrics=metrics, history=history, student=trainer.student, tokenizer=tokenizer,
                         out=out_path, layer_map=trainer.layer_map, feature_losses=trainer.feature_losses,
                         validation_features=validation_features)


def training_facts(trainer: DistillTrainer) -> dict[str, Any]:
    """What a run's optimisation did: steps, the fraction of steps whose gradient norm was clipped, the median
    gradient norm, the feature weights w_k (1 unless calibrated) and the projection maps' ridge λ (if fitted)."""
    history = pd.DataFrame(trainer.history)
    facts: dict[str, Any] = {"steps": int(trainer.step)}
    if len(history):
        facts["clipped_fraction"] = float(history["clipped"].mean()) if "clipped" in history else float("nan")
        facts["grad_norm_median"] = float(history["grad_norm"].median())
    if trainer.layer_map:
        facts["feature_weights"] = [float(w) for w in trainer.feature_weights]
    if trainer.ridge_lambdas:
        facts["ridge_lambdas"] = trainer.ridge_lambdas
    return facts


def arm_config(config: DistillConfig, arm: str) -> DistillConfig:
    """The settings of one arm of a grid: a feature loss (``none``: CE + KD, the KD-only control) or a control of
    :data:`repsim.distill.config.CONTROLS` (``ce_only``: CE alone, α = 0 and no feature term)."""
    if arm == "ce_only":
        return dataclasses.replace(config, loss="none", alpha=0.0)
    if str(arm).split("[")[0].strip() not in FEATURE_LOSSES:
        arms = ", ".join((*CONTROLS, *FEATURE_LOSSES))
        raise UserError(f"unknown feature loss {arm!r}; choose one of {arms} (a feature loss optionally with a "
                        "convention, e.g. procrustes[squared]), or all")
    return dataclasses.replace(config, loss=arm)


def write_geometry(teacher_layers: list, student_layers: list, trained: Sequence[tuple[int, int]] | None,
                   maps: dict | None, config: DistillConfig, permutations: int, out: Path) -> None:
    """Write ``out/geometry.csv``: :func:`repsim.distill.geometry.geometry_table` and
    :func:`repsim.distill.geometry.loss_values` of the student's layers against the teacher's on the same held-out
    texts; ``trained``: the run's layer map (None: the pairs ``config.layer_map`` would train); ``maps``: a
    projection student's trained maps by pair."""
    pairs = [tuple(p) for p in trained] if trained else _uniform_pairs(teacher_layers, student_layers, config)
    table = pd.concat([geometry_table(teacher_layers, student_layers, pairs, permutations=permutations),
                       loss_values(teacher_layers, student_layers, pairs, batch_size=config.batch_size,
                                   trained_maps=maps)], ignore_index=True)
    write_text_atomic(out / "geometry.csv", table.to_csv(index=False))


def _uniform_pairs(teacher_layers: list, student_layers: list, config: DistillConfig) -> list[tuple[int, int]]:
    """The pairs a run of this grid's layer map would train (for arms without a feature loss)."""
    return parse_layer_map(config.layer_map, len(teacher_layers) - 1, len(student_layers) - 1)


def _same_settings(saved_config: Path, config: DistillConfig) -> bool:
    """True when ``saved_config`` (a run's config.json) equals ``config`` up to runtime-only options."""
    if not saved_config.exists():
        return False
    saved = json.loads(saved_config.read_text())
    now = dataclasses.asdict(config)
    return all(saved.get(k) == v for k, v in now.items() if k not in RUNTIME_ONLY)


def _save_model(model: nn.Module, tokenizer: Any, path: Path) -> None:
    """save_pretrained into a temporary folder, then rename (no half-written model folders)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    with writing(path, tmp):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def run_grid(teacher: str | tuple[nn.Module, Any], student: str, train: Any, validation: Any, *,
             losses: Sequence[str] = FEATURE_LOSSES, seeds: int | Sequence[int] = 5,
             config: DistillConfig | None = None, out: str | Path, finetune_teacher: bool = False,
             teacher_config: DistillConfig | None = None, title: str | None = None,
             keep_students: bool = False, geometry_permutations: int = 0) -> pd.DataFrame:
    """Every arm × every seed with the same teacher, data and settings; then tables, tests and a figure.

    ``losses``: the arms, feature losses or controls (:func:`arm_config`). Each run lives in
    ``out/runs/<arm>/seed<k>/`` (config.json, train_log.csv, metrics.json, predictions.csv for classification);
    finished runs (with ``metrics.json``) are skipped, so an interrupted grid continues where it stopped. Student
    weights are not saved unless ``keep_students`` (then ``.../seedK/student`` is a loadable model
    folder). With ``geometry_permutations`` > 0 (classification with validation texts) each run also writes
    ``geometry.csv`` (:func:`run_geometry` on the validation texts) and ``out/before/geometry.csv`` holds the same
    for the untrained student of the first seed. Returns one row per run (loss, seed, metrics) and writes the
    summary files of :func:`repsim.distill.evaluation.summarize_grid` into ``out``.
    """

    config = config or DistillConfig()
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    for arm in losses:
        arm_config(config, arm).validate()
    out = Path(out)
    texts, labels = texts_labels(train)
    t_model, t_tok = load(teacher, config.task, label_count(labels)) if isinstance(teacher, (str, Path)) else teacher
    if not has_trained_head(t_model, config.task):
        if not finetune_teacher:
            raise UserError("the teacher has no trained head for this task; fine-tune it first "
                            "(repsim finetune, or `finetune_teacher=True`)")
        tcfg = teacher_config or teacher_finetune_config(config)
        t_model = finetune((t_model, t_tok), (texts, labels), validation, config=tcfg, out=out / "teacher").student
    teacher_layers, v_encoded = None, None
    if validation is not None and config.task == "sequence-classification":
        v_texts, v_labels = texts_labels(validation)
        v_encoded = encode(t_tok, v_texts, v_labels, config.max_length)
        teacher_metrics = evaluate(t_model, t_tok, v_encoded, config.task)
        write_text_atomic(out / "teacher_metrics.json", json.dumps(teacher_metrics, indent=2))
        if geometry_permutations:
            pad = t_tok.pad_token_id if t_tok.pad_token_id is not None else 0
            teacher_layers = layer_features(t_model, v_encoded, pad, batch_size=config.eval_batch_size, cache=True)[1]
            if not (out / "before" / "geometry.csv").exists():
                s_model, s_tok = make_student(student, t_model, t_tok, config.task, label_count(labels), seed_list[0])
                s_pad = s_tok.pad_token_id if s_tok.pad_token_id is not None else 0
                before = layer_features(s_model, encode(s_tok, v_texts, v_labels, config.max_length), s_pad,
                                        batch_size=config.eval_batch_size)[1]
                write_geometry(teacher_layers, before, None, None, config, geometry_permutations, out / "before")
    rows = []
    for seed in seed_list:
        for arm in losses:
            run_dir = out / "runs" / arm / f"seed{seed}"
            done = run_dir / "metrics.json"
            cfg = dataclasses.replace(arm_config(config, arm), seed=seed)
            if done.exists() and not _same_settings(run_dir / "config.json", cfg):
                raise UserError(f"{run_dir} holds a finished run with other settings; use another `out`")
            if done.exists() and teacher_layers is not None and not (run_dir / "geometry.csv").exists():
                done.unlink()  # stopped between its scores and its geometry: run it again (it is deterministic)
            if not done.exists():
                seed_everything(seed)
                s_model, s_tok = make_student(student, t_model, t_tok, cfg.task, label_count(labels), seed)
                result = distill((t_model, t_tok), (s_model, s_tok), (texts, labels), validation, config=cfg,
                                 out=run_dir, save_student=keep_students)
                if result.metrics and teacher_layers is not None:
                    maps = None
                    if result.layer_map and cfg.loss == "projection":
                        maps = dict(zip(map(tuple, result.layer_map), result.feature_losses, strict=True))
                    write_geometry(teacher_layers, result.validation_features, result.layer_map or None, maps, cfg,
                                   geometry_permutations, run_dir)
                (run_dir / "checkpoint.pt").unlink(missing_ok=True)
                if not result.metrics:
                    continue
            metrics = json.loads(done.read_text())
            rows.append({"loss": arm, "seed": seed, **{k: v for k, v in metrics.items() if not isinstance(v, list)}})
        if rows:  # after every seed, so a long grid has readable partial results
            summarize_grid(pd.DataFrame(rows), out, "perplexity" if config.task == "causal-lm" else "accuracy", title)
    return pd.DataFrame(rows)


def _loss_list(losses: Sequence[str]) -> list[str]:
    names: list[str] = []
    for item in losses:
        for name in str(item).split(","):
            name = name.strip()
            if name == "all":
                names.extend([*CONTROLS, *FEATURE_LOSSES])
            elif name:
                names.append(name)
    return list(dict.fromkeys(names))


def finetune_command(model: str, *, data: str = "sst2", val_data: str | None = None, max_train: int | None = None,
                     max_val: int | None = None, out: str | Path = "finetune-out", **options: Any) -> str:
    """``repsim finetune``: fine-tune ``model`` on ``data``; saves ``out/model``; returns a one-paragraph report."""

    config = DistillConfig(**options)
    config.validate()
    check_out_dir(out)
    train, validation = load_train_validation(data, val_data, max_train=max_train, max_val=max_val)
    result = finetune(model, train, validation, config=config, out=out)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if k != "train_seconds")
    return (f"fine-tuned {model} on {getattr(train, 'source', data)} ({len(train.texts)} texts): {shown} on "
            f"{len(validation.texts)} validation texts; model saved to {Path(out) / 'model'}")


def distill_command(teacher: str, student: str, *, data: str = "sst2", val_data: str | None = None,
                    max_train: int | None = None, max_val: int | None = None, losses: Sequence[str] = ("none",),
                    seeds: int = 1, finetune_teacher: bool = False, teacher_epochs: int | None = None,
                    teacher_lr: float | None = None, teacher_batch_size: int | None = None,
                    out: str | Path = "distill-out", keep_students: bool = False, geometry_permutations: int = 0,
                    **options: Any) -> str:
    """``repsim distill``: every loss × seeds (seed, seed+1, ...) into ``out``; returns the summary (markdown).

    Classification with at least two seeds also gets the study report of :func:`repsim.distill.study.
    write_study_report` (per-text tests, Holm, and with ``geometry_permutations`` > 0 each run's held-out
    geometry, before/after and the geometry-accuracy test), appended to the summary."""

    config = DistillConfig(**options)
    if not _loss_list(losses):
        raise UserError(f"no feature loss given; choose from {', '.join(FEATURE_LOSSES)} or all")
    for arm in _loss_list(losses):
        arm_config(config, arm).validate()
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise UserError(f"seeds must be an integer ≥ 1, got {seeds!r}")
    check_out_dir(out)
    train, validation = load_train_validation(data, val_data, max_train=max_train, max_val=max_val)
    if options.get("task", "sequence-classification") == "sequence-classification" and train.labels is None:
        raise UserError(f"the data {data!r} has no labels; classification needs a label column")
    teacher_config = teacher_finetune_config(config, epochs=teacher_epochs, lr=teacher_lr,
                                             batch_size=teacher_batch_size)
    first = config.seed
    runs = run_grid(teacher, student, train, validation, losses=_loss_list(losses),
                    seeds=list(range(first, first + seeds)), config=config, out=out,
                    finetune_teacher=finetune_teacher, teacher_config=teacher_config,
                    title=f"{teacher} → {student} on {getattr(train, 'name', data)}", keep_students=keep_students,
                    geometry_permutations=geometry_permutations)
    summary = Path(out) / "summary.md"
    text = summary.read_text() if summary.exists() else runs.to_string()
    if config.task == "sequence-classification" and seeds >= 2 and len(runs):
        text += "\n" + write_study_report(out)["markdown"].read_text()
    return f"{text}\nresults in {out}"
