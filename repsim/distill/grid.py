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

from repsim.analysis.comparison import check_out_dir
from repsim.distill.config import FEATURE_LOSSES, RUNTIME_ONLY, DistillConfig, DistillResult, teacher_finetune_config
from repsim.distill.data import encode, label_count, load_train_validation, texts_labels
from repsim.distill.evaluation import evaluate, summarize_grid
from repsim.distill.students import has_trained_head, load, make_student
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
            finetune_teacher: bool = False, teacher_config: DistillConfig | None = None) -> DistillResult:
    """Distil ``teacher`` into ``student`` (see the module docstring for the loss) and evaluate on ``validation``.

    ``teacher``: spec (hub id, short name, local folder) or a loaded (model, tokenizer). A classifier teacher
    without a trained head raises UserError unless ``finetune_teacher`` (then it is fine-tuned first with
    ``teacher_config``, saved under ``out/teacher``). ``student``: spec, ``drop:N``, ``drop:i,j``,
    ``narrow:HIDDEN:LAYERS`` (see :func:`make_student`) or a loaded pair. With ``out``, writes ``config.json``,
    ``train_log.csv``, ``metrics.json``, ``checkpoint.pt`` (resumable) and the student under ``out/student``.
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
    return _run(t_model, s_model, s_tok, texts, labels, validation, config, out, teacher_tokenizer=t_tok)


def _run(teacher: nn.Module | None, student: nn.Module, tokenizer: Any, texts: list[str], labels: list[int] | None,
         validation: Any, config: DistillConfig, out: str | Path | None, *, teacher_tokenizer: Any) -> DistillResult:
    out_path = Path(out) if out is not None else None
    encoded = encode(tokenizer, texts, labels, config.max_length)
    trainer = DistillTrainer(teacher, student, tokenizer, encoded, config, teacher_tokenizer=teacher_tokenizer,
                             train_texts=texts, out=out_path)
    if out_path is not None:
        write_text_atomic(out_path / "config.json", json.dumps(dataclasses.asdict(config), indent=2))
    history = trainer.fit(resume=out_path is not None)
    metrics: dict[str, float] = {}
    if trainer.finished and validation is not None:
        v_texts, v_labels = texts_labels(validation)
        metrics = evaluate(trainer.student, tokenizer, encode(tokenizer, v_texts, v_labels, config.max_length),
                           config.task, config.eval_batch_size)
        metrics["train_seconds"] = float(getattr(trainer, "train_seconds", float("nan")))
    if out_path is not None and trainer.finished:
        _save_model(trainer.student, tokenizer, out_path / ("model" if teacher is None else "student"))
        if metrics:
            write_text_atomic(out_path / "metrics.json", json.dumps(metrics, indent=2))
    return DistillResult(metrics=metrics, history=history, student=trainer.student, tokenizer=tokenizer,
                         out=out_path, layer_map=trainer.layer_map)


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
             keep_students: bool = False) -> pd.DataFrame:
    """Every loss × every seed with the same teacher, data and settings; then tables, tests and a figure.

    Each run lives in ``out/runs/<loss>/seed<k>/``; finished runs (with ``metrics.json``) are skipped, so an
    interrupted grid continues where it stopped. Student weights are deleted after evaluation unless
    ``keep_students`` (then ``.../seedK/student`` is a loadable model folder, e.g. for geometry checks).
    Returns one row per run (loss, seed, metrics, seconds) and writes the summary files of
    :func:`repsim.distill.evaluation.summarize_grid` into ``out``.
    """

    config = config or DistillConfig()
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    for loss in losses:
        dataclasses.replace(config, loss=loss).validate()
    out = Path(out)
    texts, labels = texts_labels(train)
    t_model, t_tok = load(teacher, config.task, label_count(labels)) if isinstance(teacher, (str, Path)) else teacher
    if not has_trained_head(t_model, config.task):
        if not finetune_teacher:
            raise UserError("the teacher has no trained head for this task; fine-tune it first "
                            "(repsim finetune, or `finetune_teacher=True`)")
        tcfg = teacher_config or teacher_finetune_config(config)
        t_model = finetune((t_model, t_tok), (texts, labels), validation, config=tcfg, out=out / "teacher").student
    if validation is not None and config.task == "sequence-classification":
        v_texts, v_labels = texts_labels(validation)
        teacher_metrics = evaluate(t_model, t_tok, encode(t_tok, v_texts, v_labels, config.max_length), config.task)
        write_text_atomic(out / "teacher_metrics.json", json.dumps(teacher_metrics, indent=2))
    rows = []
    for seed in seed_list:
        for loss in losses:
            run_dir = out / "runs" / loss / f"seed{seed}"
            done = run_dir / "metrics.json"
            cfg = dataclasses.replace(config, loss=loss, seed=seed)
            if done.exists() and not _same_settings(run_dir / "config.json", cfg):
                raise UserError(f"{run_dir} holds a finished run with other settings; use another `out`")
            if not done.exists():
                seed_everything(seed)
                s_model, s_tok = make_student(student, t_model, t_tok, cfg.task, label_count(labels), seed)
                result = distill((t_model, t_tok), (s_model, s_tok), (texts, labels), validation, config=cfg,
                                 out=run_dir)
                if not keep_students:  # keep the grid small: curves and metrics
                    shutil.rmtree(run_dir / "student", ignore_errors=True)
                (run_dir / "checkpoint.pt").unlink(missing_ok=True)
                if not result.metrics:
                    continue
            metrics = json.loads(done.read_text())
            rows.append({"loss": loss, "seed": seed, **metrics})
        if rows:  # after every seed, so a long grid has readable partial results
            summarize_grid(pd.DataFrame(rows), out, "perplexity" if config.task == "causal-lm" else "accuracy", title)
    return pd.DataFrame(rows)


def _loss_list(losses: Sequence[str]) -> list[str]:
    names: list[str] = []
    for item in losses:
        for name in str(item).split(","):
            name = name.strip()
            if name == "all":
                names.extend(FEATURE_LOSSES)
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
                    out: str | Path = "distill-out", keep_students: bool = False, **options: Any) -> str:
    """``repsim distill``: every loss × seeds (seed, seed+1, ...) into ``out``; returns the summary (markdown)."""

    config = DistillConfig(**options)
    if not _loss_list(losses):
        raise UserError(f"no feature loss given; choose from {', '.join(FEATURE_LOSSES)} or all")
    for loss in _loss_list(losses):
        dataclasses.replace(config, loss=loss).validate()
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
                    title=f"{teacher} → {student} on {getattr(train, 'name', data)}", keep_students=keep_students)
    summary = Path(out) / "summary.md"
    text = summary.read_text() if summary.exists() else runs.to_string()
    return f"{text}\nresults in {out}"
