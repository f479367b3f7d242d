"""The distillation trainer: a frozen teacher, a student, and a loss with a geometry-aware feature term.

Total loss per batch (classification, ``task="sequence-classification"``)::

    L = CE(student logits, labels)
        + alpha · T² · KL( softmax(teacher logits / T) ‖ softmax(student logits / T) )     (Hinton et al. 2015)
        + beta  · Σ_{(t, s) in layer map} feature_loss(teacher hidden state t, student hidden state s)

``feature_loss`` is one of ``none`` (no term), ``projection``, ``cka``, ``procrustes``, ``gram_frobenius``
(:func:`repsim.measures.losses.make_feature_loss`; one module per mapped pair, so the projection baseline learns one
linear map per pair). Features are either mean-pooled over real tokens (``features="mean"``, attention-mask
weighted) or token level (``features="tokens"``, (batch, tokens, width) with the mask; needs identical
tokenizers, checked on the data). Layer ``k`` is ``hidden_states[k]``: 0 = embeddings, k = output of block k.

Causal LMs (``task="causal-lm"``): CE is the next-token loss on the text, and KD is the same temperature-scaled
KL on every real next-token distribution (averaged over predicted tokens); teacher and student must share the
vocabulary (identical tokenizers).

The teacher is frozen. For classification its logits and mapped features are computed once, in data order and
eval mode, and cached on disk (safetensors, keyed by a digest of the teacher's weights, the tokenised data, the
layers, pooling and max length), so every loss and seed of a grid reuses them. For causal LMs the full
next-token distributions are too large to store, so the teacher runs alongside the student (still frozen).

Determinism: the epoch's data order is a permutation drawn from ``seed`` and the epoch number, every random
initialisation (projection maps, new heads, narrow students) and dropout are seeded, and a checkpoint stores the
student, the feature-loss parameters, optimiser, schedule, RNG state and the training curve, so a resumed run
equals an uninterrupted one exactly (on the same machine and library versions).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from repsim.activations.layers import num_layers, parse_layer_map
from repsim.activations.models import hidden_width
from repsim.distill.config import RUNTIME_ONLY, DistillConfig, resolve_device
from repsim.distill.data import Encoded, align_token_rows, check_same_tokenization, collate, encode, pooled_mean
from repsim.distill.massive import drop_first_token, resolve_first_token
from repsim.distill.teacher_cache import teacher_outputs
from repsim.measures.families.projection_residual import gcv_ridge, least_squares
from repsim.measures.losses import make_feature_loss
from repsim.system.errors import UserError
from repsim.system.files import write_atomic, write_text_atomic


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - libraries that draw from numpy's global state
    torch.manual_seed(seed)


class DistillTrainer:
    """One distillation (or, with ``teacher=None``, plain fine-tuning) run.

    Build it, then call :meth:`fit`. :meth:`train_step` runs one optimizer step on the given example indices
    and returns the loss terms; gradients stay on the parameters until the next step (for inspection).
    """

    def __init__(self, teacher: nn.Module | None, student: nn.Module, tokenizer: Any, train: Encoded,
                 config: DistillConfig, *, teacher_tokenizer: Any = None, train_texts: Sequence[str] | None = None,
                 out: str | Path | None = None):
        config.validate()
        self.config = config
        self.device = resolve_device(config.device)
        self.teacher = teacher
        self.student = student.to(self.device)
        self.tokenizer = tokenizer
        self.train = train
        self.out = Path(out) if out is not None else None
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.padding_side = getattr(tokenizer, "padding_side", "right")
        causal = config.task == "causal-lm"
        if not causal and train.labels is None:
            raise UserError("the training data has no labels; classification needs a label column")
        Ls = num_layers(student, required=True)
        if teacher is not None:
            teacher.to(self.device).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            Lt = num_layers(teacher, required=True)
            self.layer_map = parse_layer_map(config.layer_map, Lt, Ls) if config.loss != "none" else []
            needs_same_tokens = causal or (config.features == "tokens" and config.loss != "none")
            if needs_same_tokens and teacher_tokenizer is not None and train_texts is not None:
                what = "token-level KD for causal LMs" if causal else "token-level features"
                check_same_tokenization(teacher_tokenizer, tokenizer, train_texts, config.max_length, what)
        else:
            self.layer_map = []
        torch.manual_seed(config.seed)
        self.feature_losses = nn.ModuleList()
        if self.layer_map:
            for _pair in self.layer_map:
                self.feature_losses.append(make_feature_loss(config.loss, hidden_width(teacher), hidden_width(student)))
            self.feature_losses.to(self.device)
        self.mask_first_token, self.first_token_ratios = False, {}  # token-level features: repsim.distill.massive
        if self.layer_map and config.features == "tokens":
            self.mask_first_token, self.first_token_ratios = resolve_first_token(
                config.first_token, teacher, train, [t for t, _ in self.layer_map], self.pad_id,
                padding_side=self.padding_side, device=self.device)
        self.cached = None
        if teacher is not None and not causal:
            teacher_data, teacher_pad = train, self.pad_id
            if teacher_tokenizer is not None and teacher_tokenizer is not tokenizer and train_texts is not None:
                # the frozen teacher reads the texts through its own tokenizer: its logits and pooled features are
                # per text, so they pair with the student's rows whatever the student's tokenizer
                teacher_data = encode(teacher_tokenizer, train_texts, train.labels, config.max_length)
                teacher_pad = teacher_tokenizer.pad_token_id if teacher_tokenizer.pad_token_id is not None else 0
            self.cached = teacher_outputs(teacher, teacher_data, [t for t, _ in self.layer_map], config.features,
                                          teacher_pad, batch_size=config.eval_batch_size, device=self.device,
                                          cache=config.cache_teacher, progress=config.progress)
        self.ridge_lambdas: list[float] = []
        if config.projection_init == "ridge" and self.layer_map and _is_projection(config.loss):
            self.ridge_lambdas = self.init_projection_ridge()
        self.feature_weights = torch.ones(len(self.layer_map))
        if config.feature_scale == "gradient" and self.layer_map:
            self.feature_weights = self.calibrate_feature_weights()
        student_params = [p for p in self.student.parameters() if p.requires_grad]
        groups = []
        for params, lr in ((student_params, config.lr),
                           (list(self.feature_losses.parameters()), config.projection_lr or config.lr)):
            groups += [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay, "lr": lr},
                       {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": lr}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)
        self.steps_per_epoch = math.ceil(len(train) / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        warmup = int(config.warmup_ratio * self.total_steps)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (self.total_steps - step) / max(1, self.total_steps - warmup))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.train_seconds = 0.0  # seconds of training steps over every call that made this run (with resumes)

    # -- data order
    def epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train), generator=g).tolist()

    # -- losses
    def _forward(self, index: Sequence[int]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], tuple]:
        """The student on the examples ``index``: the task terms (``ce``, ``kd``), the feature loss of every mapped
        pair (unweighted, in layer-map order) and the student's hidden states (empty without a layer map)."""
        cfg = self.config
        batch = {k: v.to(self.device) for k, v in collate(self.train, index, self.pad_id, self.padding_side).items()}
        mask = batch["attention_mask"]
        want_hidden = bool(self.layer_map)
        out = self.student(input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=want_hidden)
        terms: dict[str, torch.Tensor] = {}
        T = cfg.temperature
        if cfg.task == "causal-lm":
            logits = out.logits[:, :-1]
            target = batch["input_ids"][:, 1:]
            valid = (mask[:, 1:] * mask[:, :-1]).bool()
            terms["ce"] = F.cross_entropy(logits[valid].float(), target[valid])
            t_hidden = None
            if self.teacher is not None:
                with torch.no_grad():
                    t_out = self.teacher(input_ids=batch["input_ids"], attention_mask=mask,
                                         output_hidden_states=want_hidden)
                t_logits = t_out.logits[:, :-1][valid].float()
                terms["kd"] = _kd(logits[valid].float(), t_logits, T)
                t_hidden = t_out.hidden_states if want_hidden else None
        else:
            terms["ce"] = F.cross_entropy(out.logits.float(), batch["labels"])
            if self.teacher is not None:
                t_logits = self.cached["logits"][list(index)].to(self.device)
                terms["kd"] = _kd(out.logits.float(), t_logits, T)
            t_hidden = None
        pair_losses = []
        token_mask = drop_first_token(mask) if self.mask_first_token else mask
        for (t, s), loss_fn in zip(self.layer_map, self.feature_losses, strict=True):
            h_s = out.hidden_states[s]
            h_t = self._teacher_features(t, index, mask, t_hidden)
            if cfg.features == "mean":
                pair_losses.append(loss_fn(h_t, pooled_mean(h_s, mask)))
            else:
                pair_losses.append(loss_fn(h_t, h_s, attention_mask=token_mask))
        return terms, pair_losses, (out.hidden_states if want_hidden else ())

    def _teacher_features(self, t: int, index: Sequence[int], mask: torch.Tensor, t_hidden: tuple | None
                          ) -> torch.Tensor:
        """The teacher's layer-``t`` features for the batch ``index``: from its forward pass ``t_hidden`` (pooled
        when features are mean-pooled), else from the cache (token rows aligned with the student's padding)."""
        if t_hidden is not None:
            h_t = t_hidden[t].float()
            return pooled_mean(h_t, mask) if self.config.features == "mean" else h_t
        h_t = self.cached[f"feat{t}"][list(index)].to(self.device)
        return h_t if self.config.features == "mean" else align_token_rows(h_t, mask, self.padding_side)

    def _task_loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """CE + α·KD (CE alone without a teacher)."""
        return terms["ce"] + self.config.alpha * terms["kd"] if "kd" in terms else terms["ce"]

    def _loss_terms(self, index: Sequence[int]) -> dict[str, torch.Tensor]:
        terms, pair_losses, _hidden = self._forward(index)
        total = self._task_loss(terms)
        if pair_losses:
            weights = self.feature_weights.to(self.device)
            terms["feature"] = torch.stack(pair_losses).sum()  # unweighted: the losses' own values
            total = total + self.config.beta * (weights.to(pair_losses[0].dtype) * torch.stack(pair_losses)).sum()
        terms["total"] = total
        return terms

    # -- the fair-comparison settings: feature weights from gradients, a fitted projection map
    def _fixed_batches(self, count: int, size: int) -> list[list[int]]:
        """The first ``count`` batches of ``size`` examples in data order (independent of the seed)."""
        n = len(self.train)
        return [list(range(a, min(n, a + size))) for a in range(0, min(n, count * size), size)]

    def _ridge_batches(self) -> list[list[int]]:
        """The ridge fit's rows: up to ``ridge_rows`` training texts in data order after the calibration batches
        (so the calibration measures the map on texts it was not fitted to), or from the start when fewer than
        two would be left; in batches of ``eval_batch_size``."""
        cfg, n = self.config, len(self.train)
        first = min(n, cfg.calibration_batches * cfg.batch_size) if cfg.feature_scale == "gradient" else 0
        first = first if n - first >= 2 else 0
        rows = list(range(first, min(n, first + cfg.ridge_rows)))
        return [rows[a:a + cfg.eval_batch_size] for a in range(0, len(rows), cfg.eval_batch_size)]

    def calibrate_feature_weights(self) -> torch.Tensor:
        """w_k = mean ‖∇_θ(CE + α·KD)‖ / (K · mean ‖∇_θ ℓ_k‖) over the calibration batches, θ the student's
        trainable parameters, K the number of mapped pairs (see DistillConfig)."""
        was_training = self.student.training
        self.student.eval()
        params = [p for p in self.student.parameters() if p.requires_grad]

        def norm(loss: torch.Tensor) -> float:
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)))

        task_norm, feat_norm = 0.0, torch.zeros(len(self.layer_map), dtype=torch.float64)
        for index in self._fixed_batches(self.config.calibration_batches, self.config.batch_size):
            terms, pair_losses, _hidden = self._forward(index)
            task_norm += norm(self._task_loss(terms))
            for k, loss in enumerate(pair_losses):
                feat_norm[k] += norm(loss)
        self.student.train(was_training)
        if not bool((feat_norm > 0).all() and task_norm > 0):
            raise UserError("a feature loss or the task sends no gradient to the student at initialisation "
                            f"(task {task_norm}, feature {feat_norm.tolist()}); use feature_scale='fixed'")
        return (task_norm / (len(self.layer_map) * feat_norm)).to(torch.float32)

    @torch.no_grad()
    def init_projection_ridge(self) -> list[float]:
        """Set each projection map to the ridge fit X ≈ YW + b from the student's (at initialisation, eval mode)
        features Y to the teacher's X on the rows of :meth:`_ridge_batches`; λ by generalised cross-validation
        (:func:`repsim.measures.families.projection_residual.gcv_ridge`). Returns the chosen λ per pair."""
        cfg = self.config
        was_training = self.student.training
        self.student.eval()
        rows: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = [([], []) for _ in self.layer_map]
        for index in self._ridge_batches():
            batch = collate(self.train, index, self.pad_id, self.padding_side)
            mask = batch["attention_mask"].to(self.device)
            out = self.student(input_ids=batch["input_ids"].to(self.device), attention_mask=mask,
                               output_hidden_states=True)
            t_hidden = None
            if self.cached is None:
                t_hidden = self.teacher(input_ids=batch["input_ids"].to(self.device), attention_mask=mask,
                                        output_hidden_states=True).hidden_states
            for k, (t, s) in enumerate(self.layer_map):
                h_s = out.hidden_states[s].double()
                h_t = self._teacher_features(t, index, mask, t_hidden).double()
                if cfg.features == "mean":
                    rows[k][0].append(h_t)
                    rows[k][1].append(pooled_mean(h_s, mask))
                else:
                    keep = (drop_first_token(mask) if self.mask_first_token else mask).bool()
                    rows[k][0].append(h_t[keep])
                    rows[k][1].append(h_s[keep])
        self.student.train(was_training)
        chosen = []
        for (t_rows, s_rows), loss_fn in zip(rows, self.feature_losses, strict=True):
            X, Y = torch.cat(t_rows), torch.cat(s_rows)
            mu_x, mu_y = X.mean(0), Y.mean(0)
            Xc, Yc = X - mu_x, Y - mu_y
            U, sv, _ = torch.linalg.svd(Yc, full_matrices=False)
            lam = float(gcv_ridge(sv, (U.T @ Xc).square().sum(1), Xc.square().sum(), X.shape[0], True))
            W = least_squares(Yc, Xc, lam)  # (q, p): X ≈ Y W + b
            loss_fn.proj.weight.copy_(W.T.to(loss_fn.proj.weight.dtype))
            if loss_fn.proj.bias is not None:
                loss_fn.proj.bias.copy_((mu_x - mu_y @ W).to(loss_fn.proj.bias.dtype))
            chosen.append(lam)
        return chosen

    def train_step(self, index: Sequence[int]) -> dict[str, float]:
        """One optimizer step on the examples ``index``; returns the loss terms (floats)."""
        self.student.train()
        self.feature_losses.train()
        self.optimizer.zero_grad(set_to_none=True)
        terms = self._loss_terms(index)
        terms["total"].backward()
        # the student's gradient norm (clipped); a projection map is an auxiliary head with its own learning rate
        params = [p for p in self.student.parameters() if p.requires_grad]
        if self.config.max_grad_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        else:
            grad_norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None))
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        values = {k: float(v.detach()) for k, v in terms.items()}
        values["grad_norm"] = float(grad_norm)
        values["clipped"] = float(bool(self.config.max_grad_norm) and values["grad_norm"] > self.config.max_grad_norm)
        return values

    # -- checkpoints
    def _checkpoint_path(self) -> Path | None:
        return self.out / "checkpoint.pt" if self.out is not None else None

    def save_checkpoint(self) -> None:
        path = self._checkpoint_path()
        if path is None:
            return
        state = {
            "step": self.step,
            "student": self.student.state_dict(),
            "feature_losses": self.feature_losses.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "history": json.dumps(self.history),
            "config": json.dumps(dataclasses.asdict(self.config)),
            "train_seconds": torch.tensor(self._bank_seconds(), dtype=torch.float64),
            "feature_weights": self.feature_weights,
        }
        write_atomic(path, lambda fh: torch.save(state, fh))  # through a Python file: a full disk is an OSError
        self.write_log()

    def load_checkpoint(self) -> bool:
        """Restore the last checkpoint in ``out`` (if any and made with the same config); True when restored."""
        path = self._checkpoint_path()
        if path is None or not path.exists():
            return False
        state = torch.load(path, map_location=self.device, weights_only=True)
        saved = json.loads(state["config"])
        now = dataclasses.asdict(self.config)
        diff = sorted(k for k in now if k not in RUNTIME_ONLY and saved.get(k) != now[k])
        if diff:
            raise UserError(f"{path} was made with different settings ({', '.join(diff)}); "
                            "use another output folder or remove the checkpoint")
        self.student.load_state_dict(state["student"])
        self.feature_losses.load_state_dict(state["feature_losses"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if torch.cuda.is_available() and state["rng_cuda"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng_cuda"]])
        self.step = int(state["step"])
        self.history = json.loads(state["history"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        if "feature_weights" in state:  # calibrated at the run's start, not on the partly trained student
            self.feature_weights = state["feature_weights"].cpu()
        return True

    def write_log(self) -> None:
        if self.out is None or not self.history:
            return
        write_text_atomic(self.out / "train_log.csv", pd.DataFrame(self.history).to_csv(index=False))

    # -- the loop
    def fit(self, resume: bool = True) -> pd.DataFrame:
        """Train to the configured number of epochs (resuming from ``out/checkpoint.pt`` when present)."""
        cfg = self.config
        restored = resume and self.load_checkpoint()
        if not restored:
            torch.manual_seed(cfg.seed)  # dropout draws start from the seed; a checkpoint restores its own RNG state
        done_this_call = 0
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not cfg.progress,
                   desc=f"distill {cfg.loss}" if self.teacher is not None else "fine-tune", leave=False)
        running: dict[str, float] = {}
        self._call_start = time.perf_counter()
        while self.step < self.total_steps:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            order = self.epoch_order(epoch)
            index = order[offset * cfg.batch_size: (offset + 1) * cfg.batch_size]
            t0 = time.perf_counter()
            values = self.train_step(index)
            seconds = time.perf_counter() - t0
            if not all(math.isfinite(v) for v in values.values()):
                raise RuntimeError(f"non-finite loss at step {self.step}: {values}")
            row = {"step": self.step, "epoch": epoch, "lr": self.scheduler.get_last_lr()[0],
                   "examples_per_s": len(index) / seconds, **values}
            self.history.append(row)
            for k in ("total", "ce", "kd", "feature"):
                if k in values:
                    running[k] = values[k] if k not in running else 0.9 * running[k] + 0.1 * values[k]
            bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()})
            bar.update(1)
            done_this_call += 1
            at_epoch_end = self.step % self.steps_per_epoch == 0
            periodic = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
            stopping = cfg.stop_after is not None and self.step >= cfg.stop_after
            if at_epoch_end or periodic or stopping:
                self.save_checkpoint()
            if stopping:
                break
        bar.close()
        if done_this_call and getattr(self, "_banked_at_step", None) != self.step:
            self._bank_seconds()  # (a run that ends on a checkpoint was banked there: metrics equal the checkpoint)
        self._call_start = None
        self.write_log()
        return pd.DataFrame(self.history)

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    def _bank_seconds(self) -> float:
        """Add the time since the last call (or the start of fit) to ``train_seconds``; return the total."""
        start, now = getattr(self, "_call_start", None), time.perf_counter()
        if start is not None:
            self.train_seconds += now - start
            self._call_start = now
        self._banked_at_step = self.step
        return self.train_seconds


def _is_projection(loss: str) -> bool:
    return "".join(loss.split()).lower() == "projection"


def _kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), averaged over rows (Hinton et al. 2015)."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * temperature**2
