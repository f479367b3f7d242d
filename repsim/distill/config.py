"""What decides a distillation run (:class:`DistillConfig`, saved as ``config.json``), the teacher's own fine-tuning
settings (:func:`teacher_finetune_config`), the device a run uses, and what a run returns (:class:`DistillResult`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from repsim.activations.data import check_seed
from repsim.activations.layers import layer_map_pairs
from repsim.system import devices
from repsim.system.errors import UserError

TASKS = ("sequence-classification", "causal-lm")


FEATURE_LOSSES = ("none", "projection", "cka", "procrustes", "gram_frobenius")


FEATURE_MODES = ("mean", "tokens")


FIRST_TOKEN_MODES = ("auto", "mask", "keep")


#: how the feature term is weighted: ``fixed`` (β as given) or ``gradient`` (β × the calibrated per-pair weights)
FEATURE_SCALES = ("fixed", "gradient")


#: how the projection baseline's linear maps start: ``random`` (nn.Linear's init) or ``ridge`` (closed form)
PROJECTION_INITS = ("random", "ridge")


#: controls of a distillation grid besides the feature losses: ``ce_only`` trains on the labels alone (α = 0, no
#: feature term); ``none`` (a feature loss) is the KD-only control (CE + KD)
CONTROLS = ("ce_only",)


@dataclass
class DistillConfig:
    """Everything that decides a training run (saved as ``config.json`` next to the results).

    ``alpha`` weights the KD term, ``beta`` the summed feature loss; ``temperature`` is T in the KD term.
    ``layer_map`` is ``"uniform"``, ``"t:s,t:s,..."`` or a path to a file (see :func:`parse_layer_map`).
    ``lr`` peaks after a linear warm-up over ``warmup_ratio`` of the steps and decays linearly to 0 (AdamW).
    ``checkpoint_every`` (optimizer steps, 0 = only at the end of each epoch). ``stop_after`` halts this
    invocation after that many optimizer steps in total (with a checkpoint), as an interruption would.
    ``first_token`` (token-level features only): ``"mask"`` leaves each text's first real token out of the feature
    loss, ``"keep"`` keeps it, ``"auto"`` masks when the teacher has massive activations there
    (:mod:`repsim.distill.massive`).

    ``feature_scale="gradient"`` weights mapped pair k by w_k = mean ‖∇_θ(CE + α·KD)‖ / (K · mean ‖∇_θ ℓ_k‖), θ the
    student's trainable parameters, K the number of mapped pairs, measured once at initialisation (eval mode) on the
    first ``calibration_batches`` batches of the training data in data order (the same for every seed): each pair
    term starts with 1/K of the task's push on the student's weights, so the feature term as a whole pushes about
    as hard as the task, whichever loss it is; β scales that push.
    ``projection_init="ridge"`` starts each projection map at the ridge least-squares fit (GCV-chosen λ) from the
    student's features at initialisation to the teacher's on up to ``ridge_rows`` training texts (those after the
    calibration batches, so the calibration sees the map on texts it was not fitted to);
    ``projection_lr`` is its own peak learning rate (None: ``lr``), on the same schedule. ``max_grad_norm``
    clips the student's gradient norm (0: no clipping); the projection maps are not clipped.
    """

    task: str = "sequence-classification"
    loss: str = "none"
    alpha: float = 1.0
    beta: float = 1.0
    temperature: float = 2.0
    layer_map: str = "uniform"
    features: str = "mean"
    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 50.0
    max_length: int = 64
    seed: int = 0
    checkpoint_every: int = 0
    stop_after: int | None = None
    device: str = "auto"
    cache_teacher: bool = True
    progress: bool = True
    first_token: str = "auto"
    feature_scale: str = "gradient"
    calibration_batches: int = 2
    projection_init: str = "ridge"
    projection_lr: float | None = 1e-3
    ridge_rows: int = 1024

    def validate(self) -> None:
        if self.task not in TASKS:
            raise UserError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.loss.split("[")[0].strip() not in FEATURE_LOSSES:
            raise UserError(f"unknown feature loss {self.loss!r}; choose one of {', '.join(FEATURE_LOSSES)} "
                            "(optionally with a convention, e.g. procrustes[squared])")
        if self.features not in FEATURE_MODES:
            raise UserError(f"unknown feature mode {self.features!r}; choose 'mean' or 'tokens'")
        if self.epochs < 1 or self.batch_size < 1 or self.max_length < 2:
            raise UserError("epochs and batch size must be ≥ 1 and max length ≥ 2")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise UserError(f"temperature must be a finite number > 0, got {self.temperature}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"lr must be a finite number > 0, got {self.lr}")
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"{name} must be a finite number ≥ 0, got {value}")
        if self.first_token not in FIRST_TOKEN_MODES:
            raise UserError(f"unknown first_token {self.first_token!r}; choose one of {', '.join(FIRST_TOKEN_MODES)}")
        if self.first_token == "mask" and self.features != "tokens":
            raise UserError("first_token='mask' applies to token-level features only; add features='tokens'")
        if self.feature_scale not in FEATURE_SCALES:
            raise UserError(f"unknown feature scale {self.feature_scale!r}; choose one of {', '.join(FEATURE_SCALES)}")
        if self.projection_init not in PROJECTION_INITS:
            raise UserError(f"unknown projection init {self.projection_init!r}; choose one of "
                            f"{', '.join(PROJECTION_INITS)}")
        if self.calibration_batches < 1 or self.ridge_rows < 2:
            raise UserError("calibration_batches must be ≥ 1 and ridge_rows ≥ 2")
        if self.projection_lr is not None and not (math.isfinite(self.projection_lr) and self.projection_lr > 0):
            raise UserError(f"projection_lr must be a finite number > 0, got {self.projection_lr}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise UserError(f"max_grad_norm must be a finite number ≥ 0 (0: no clipping), got {self.max_grad_norm}")
        if self.checkpoint_every < 0:
            raise UserError(f"checkpoint_every must be ≥ 0, got {self.checkpoint_every}")

        check_seed(self.seed)
        resolve_device(self.device)
        if isinstance(self.layer_map, str):
            layer_map_pairs(self.layer_map)


# what the teacher's fine-tuning shares with the student's run: the task, the data as tokenised, the machine
_SHARED_WITH_TEACHER = ("task", "max_length", "device", "progress", "checkpoint_every", "eval_batch_size")


def teacher_finetune_config(config: DistillConfig, *, epochs: int | None = None, lr: float | None = None,
                            batch_size: int | None = None, seed: int = 0) -> DistillConfig:
    """The settings of ``--finetune-teacher``: the teacher's own (DistillConfig's defaults, 3 epochs, lr 1e-4,
    batch 32, seed 0, unless given), not the student's ``--epochs``/``--lr``/``--batch-size``/``--seed``, so the
    student's settings can change between runs without refitting the teacher. Task, max length, device,
    progress and checkpointing are shared with ``config``."""
    base = DistillConfig()
    return DistillConfig(**{k: getattr(config, k) for k in _SHARED_WITH_TEACHER}, loss="none",
                         epochs=base.epochs if epochs is None else epochs, lr=base.lr if lr is None else lr,
                         batch_size=base.batch_size if batch_size is None else batch_size, seed=seed)


RUNTIME_ONLY = ("stop_after", "progress", "checkpoint_every", "device", "cache_teacher")


@dataclass
class DistillResult:
    """What a run produced: validation metrics, the training curve, and where things were written."""

    metrics: dict[str, float]
    history: pd.DataFrame
    student: nn.Module
    tokenizer: Any
    out: Path | None = None
    layer_map: list[tuple[int, int]] = field(default_factory=list)
    feature_losses: nn.ModuleList | None = None
    validation_features: list[torch.Tensor] | None = None  # classification: hidden_states[0..L] mean-pooled


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda if available, else cpu (training never picks MPS by itself); anything else is checked by
    :func:`repsim.system.devices.resolve_device` (an unknown or unavailable device is a UserError)."""
    return devices.resolve_device(device, auto=("cuda",))
