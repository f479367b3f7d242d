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

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from repsim.system.errors import UserError, naming_path

TASKS = ("sequence-classification", "causal-lm")
FEATURE_LOSSES = ("none", "projection", "cka", "procrustes", "gram_frobenius")
FEATURE_MODES = ("mean", "tokens")


@dataclass
class DistillConfig:
    """Everything that decides a training run (saved as ``config.json`` next to the results).

    ``alpha`` weights the KD term, ``beta`` the summed feature loss; ``temperature`` is T in the KD term.
    ``layer_map`` is ``"uniform"``, ``"t:s,t:s,..."`` or a path to a file (see :func:`parse_layer_map`).
    ``lr`` peaks after a linear warm-up over ``warmup_ratio`` of the steps and decays linearly to 0 (AdamW).
    ``checkpoint_every`` (optimizer steps, 0 = only at the end of each epoch). ``stop_after`` halts this
    invocation after that many optimizer steps in total (with a checkpoint), as an interruption would.
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
    max_grad_norm: float = 1.0
    max_length: int = 64
    seed: int = 0
    checkpoint_every: int = 0
    stop_after: int | None = None
    device: str = "auto"
    cache_teacher: bool = True
    progress: bool = True

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
        if self.checkpoint_every < 0:
            raise UserError(f"checkpoint_every must be ≥ 0, got {self.checkpoint_every}")
        from repsim.activations.data import check_seed  # noqa: PLC0415

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


@dataclass
class DistillResult:
    """What a run produced: validation metrics, the training curve, and where things were written."""

    metrics: dict[str, float]
    history: pd.DataFrame
    student: nn.Module
    tokenizer: Any
    out: Path | None = None
    layer_map: list[tuple[int, int]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- helpers


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda if available, else cpu; anything else is checked by
    :func:`repsim.activations.extract.resolve_device`
    (an unknown or unavailable device is a UserError)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from repsim.activations.extract import resolve_device as checked_device  # noqa: PLC0415

    return checked_device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - libraries that draw from numpy's global state
    torch.manual_seed(seed)


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def _writing(path: Path, tmp: str | Path | None = None):
    """Writes to ``path`` (through ``tmp``): an OSError names ``path``; a writer whose own error hides the operating
    system's (torch.save's RuntimeError raised while closing after the OSError, or Rust's "(os error N)" text from
    safetensors) becomes that OSError; the temporary file or folder is removed on any failure, so a full disk
    leaves nothing half-written behind."""
    try:
        with naming_path(path):
            try:
                yield
            except OSError:
                raise
            except Exception as exc:
                cause: BaseException | None = exc  # torch.save's writer fails again while closing: look behind it
                while cause is not None and not (isinstance(cause, OSError) and cause.errno):
                    cause = cause.__cause__ or cause.__context__
                if isinstance(cause, OSError):
                    raise OSError(cause.errno, cause.strerror, str(path)) from exc
                code = re.search(r"\(os error (\d+)\)", str(exc))
                if code is None:
                    raise
                raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from exc
    except BaseException:
        if tmp is not None:
            if Path(tmp).is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with _writing(path, tmp):
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, _umask_mode())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with _writing(path, tmp):
        with os.fdopen(fd, "wb") as fh:  # through a Python file, a full disk is an OSError (ENOSPC)
            torch.save(obj, fh)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)


def num_layers(model: nn.Module) -> int:
    """Number of transformer blocks (hidden_states has this many entries plus the embeddings)."""
    cfg = model.config
    n = getattr(cfg, "num_hidden_layers", None)
    if n is None:
        raise UserError(f"cannot tell how many layers {type(model).__name__} has (no num_hidden_layers)")
    return int(n)


def hidden_width(model: nn.Module) -> int:
    return int(model.config.hidden_size)


# ----------------------------------------------------------------------------------------------- layer maps


def uniform_layer_map(teacher_layers: int, student_layers: int) -> list[tuple[int, int]]:
    """Student block s (1..Ls) ↔ teacher block round(s·Lt/Ls): the last blocks always meet, blocks spread evenly."""
    if teacher_layers < 1 or student_layers < 1:
        raise UserError("a uniform layer map needs at least one block on each side")
    return [(int(round(s * teacher_layers / student_layers)), s) for s in range(1, student_layers + 1)]


def layer_map_pairs(spec: str) -> list[tuple[int, int]] | None:
    """The pairs a layer-map string or file names (None for ``"uniform"``), before any model is known: malformed
    text and unreadable files are UserErrors here, layer ranges are checked by :func:`parse_layer_map`."""
    text = str(spec).strip()
    if not text:
        raise UserError("the layer map is empty: give 'uniform', teacher:student pairs like 2:1,4:2, or a file")
    if text == "uniform":
        return None
    path = Path(text)
    pairs = (_read_layer_map_file(path) if path.suffix.lower() in (".csv", ".json", ".txt") or path.exists()
             else _parse_pairs_text(text))
    if not pairs:
        raise UserError(f"the layer map {text[:60]!r} names no pairs")
    return pairs


def parse_layer_map(spec: str | Sequence[tuple[int, int]], teacher_layers: int,
                    student_layers: int) -> list[tuple[int, int]]:
    """Parse a layer map into (teacher layer, student layer) pairs, layers indexed as hidden_states (0 = embeddings).

    ``spec``: ``"uniform"``; ``"t:s,t:s"`` (e.g. ``"2:1,4:2,6:3"``); a list of pairs; or a path to a file from
    ``repsim compare --suggest-map`` — CSV with ``teacher_layer`` and ``student_layer`` columns, JSON (a list of
    [teacher, student] pairs or an object with a ``pairs`` / ``layer_map`` entry), or text ``t:s,t:s``.
    Raises UserError for malformed specs and layers out of range (0..Lt, 0..Ls). This is the one layer-map
    grammar: ``repsim distill --layer-map`` and ``repsim check --map`` both use it.
    """
    pairs = layer_map_pairs(spec) if isinstance(spec, str) else [(int(t), int(s)) for t, s in spec]
    if pairs is None:
        return uniform_layer_map(teacher_layers, student_layers)
    if not pairs:
        raise UserError("the layer map is empty")
    for t, s in pairs:
        if not 0 <= t <= teacher_layers:
            raise UserError(f"layer map pair {t}:{s}: teacher layer {t} out of range 0..{teacher_layers}")
        if not 0 <= s <= student_layers:
            raise UserError(f"layer map pair {t}:{s}: student layer {s} out of range 0..{student_layers}")
    return pairs


_PAIR = r"(-?\d+)\s*(?::|->|→)\s*(-?\d+)"


def _parse_pairs_text(text: str) -> list[tuple[int, int]]:
    """``t:s`` pairs separated by commas or spaces (``t->s`` and ``t→s``, as compare prints them, also work)."""
    text = text.strip()
    if not re.fullmatch(rf"{_PAIR}(?:\s*,?\s*{_PAIR})*,?", text):
        raise UserError(f"bad layer map {text[:60]!r}: expected 'uniform' or teacher:student pairs like 2:1,4:2")
    return [(int(t), int(s)) for t, s in re.findall(_PAIR, text)]


def _read_layer_map_file(path: Path) -> list[tuple[int, int]]:
    if not path.exists():
        raise FileNotFoundError(2, "layer map file not found", str(path))
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a layer map file")
    if path.suffix.lower() == ".csv":
        try:
            table = pd.read_csv(path)
        except (ValueError, pd.errors.ParserError) as exc:
            raise UserError(f"{path}: not a readable CSV layer map ({str(exc).splitlines()[0]})") from exc
        if not {"teacher_layer", "student_layer"} <= set(table.columns):
            raise UserError(f"{path}: a layer map CSV needs teacher_layer and student_layer columns")
        try:
            return [(int(t), int(s)) for t, s in zip(table["teacher_layer"], table["student_layer"], strict=True)]
        except (TypeError, ValueError) as exc:
            raise UserError(f"{path}: teacher_layer and student_layer must hold integers") from exc
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: a layer map file must be UTF-8 text") from exc
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc
        if isinstance(data, dict):
            data = data.get("pairs", data.get("layer_map"))
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a list of [teacher, student] pairs or an object with 'pairs'")
        try:
            return [(int(t), int(s)) for t, s in data]
        except (TypeError, ValueError) as exc:
            raise UserError(f"{path}: expected a list of [teacher, student] pairs") from exc
    if "suggested" in text:  # the line `repsim compare --suggest-map` prints: "... (teacher→student): 1→0, 2→1"
        text = text.split("):", 1)[-1]
    return _parse_pairs_text(text)


# ----------------------------------------------------------------------------------------------- models


def load(spec: str, task: str, num_labels: int | None = None) -> tuple[nn.Module, Any]:
    """A model and its tokenizer through :func:`repsim.activations.assets.load_model` (hub id, short name or local
    folder)."""
    from repsim.activations.assets import load_model

    kwargs: dict[str, Any] = {"task": task}
    if task == "sequence-classification" and num_labels is not None:
        kwargs["num_labels"] = num_labels
    model, tokenizer, _source = load_model(str(spec), **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def has_trained_head(model: nn.Module, task: str) -> bool:
    """True when the checkpoint was saved with the task's head (config.architectures names it).

    A base encoder (``BertModel``, sentence-transformers folders) loaded for sequence classification gets a new,
    random head: it must be fine-tuned before it can teach.
    """
    suffix = "ForSequenceClassification" if task == "sequence-classification" else "ForCausalLM"
    archs = getattr(model.config, "architectures", None) or []
    return any(str(a).endswith(suffix) or (task == "causal-lm" and str(a).endswith("LMHeadModel")) for a in archs)


def _block_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The (parent, attribute, ModuleList) that holds the transformer blocks."""
    n = num_layers(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            return parent, attr, module
    raise UserError(f"cannot find the list of {n} blocks in {type(model).__name__} to drop layers from")


def drop_layers(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A copy of ``model`` with only the blocks ``keep`` (0-based block indices, in order); embeddings, head kept."""
    n = num_layers(model)
    keep = list(keep)
    if not keep or any(not 0 <= k < n for k in keep) or sorted(set(keep)) != keep:
        raise UserError(f"layers to keep must be increasing block indices in 0..{n - 1}, got {keep}")
    student = copy.deepcopy(model)
    for p in student.parameters():
        p.requires_grad_(True)  # the teacher may be frozen; its copy trains
    parent, attr, blocks = _block_list(student)
    kept = nn.ModuleList([blocks[k] for k in keep])
    setattr(parent, attr, kept)
    for new_index, block in enumerate(kept):
        for sub in block.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = new_index
    cfg = student.config
    cfg.num_hidden_layers = len(keep)
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == n:
        cfg.layer_types = [layer_types[k] for k in keep]
    return student


def narrow_model(teacher: nn.Module, hidden: int, layers: int, seed: int) -> nn.Module:
    """A randomly initialised model of the teacher's architecture with width ``hidden`` and ``layers`` blocks.

    Heads: hidden // 64 when that divides (at least 1), else the largest divisor of ``hidden`` ≤ the teacher's
    head count; feed-forward width scaled by hidden / teacher hidden. The vocabulary (and tokenizer) is the teacher's.
    """
    cfg = copy.deepcopy(teacher.config)
    t_hidden = int(cfg.hidden_size)
    if hidden < 8 or layers < 1:
        raise UserError(f"narrow student needs width ≥ 8 and ≥ 1 layer, got {hidden}:{layers}")
    t_heads = int(getattr(cfg, "num_attention_heads", 1))
    heads = max(1, hidden // 64) if hidden % 64 == 0 else max(h for h in range(1, t_heads + 1) if hidden % h == 0)
    cfg.hidden_size = hidden
    cfg.num_hidden_layers = layers
    cfg.num_attention_heads = heads
    if hasattr(cfg, "num_key_value_heads"):
        cfg.num_key_value_heads = heads
    if getattr(cfg, "head_dim", None) is not None:
        cfg.head_dim = hidden // heads
    for ffn in ("intermediate_size", "ffn_dim"):
        if getattr(cfg, ffn, None):
            setattr(cfg, ffn, max(1, int(round(getattr(cfg, ffn) * hidden / t_hidden))))
    if getattr(cfg, "word_embed_proj_dim", None):
        cfg.word_embed_proj_dim = hidden
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list):
        cfg.layer_types = layer_types[:layers] if len(layer_types) >= layers else [layer_types[0]] * layers
    torch.manual_seed(seed)
    return type(teacher)(cfg)


def make_student(spec: str, teacher: nn.Module, teacher_tokenizer: Any, task: str, num_labels: int | None,
                 seed: int) -> tuple[nn.Module, Any]:
    """Build the student from ``spec``.

    - ``drop:N``: keep N of the teacher's blocks, evenly spaced and including the last (N=3 of 6 keeps blocks
      2, 4, 6, i.e. every 2nd); ``drop:1,3,5`` keeps those 1-based blocks. Weights (and head) copied from the teacher.
    - ``narrow:HIDDEN:LAYERS``: random initialisation of the teacher's architecture, width HIDDEN, LAYERS blocks.
    - anything else: a hub id or local folder, loaded with a new head when it has none (seeded).
    Derived students share the teacher's tokenizer.
    """
    if spec.startswith("drop:"):
        arg = spec[len("drop:"):]
        n = num_layers(teacher)
        if re.fullmatch(r"\d+", arg):
            k = int(arg)
            if not 1 <= k <= n:
                raise UserError(f"drop:{k}: the teacher has {n} blocks; keep between 1 and {n}")
            keep = sorted({int(round((i + 1) * n / k)) - 1 for i in range(k)})
        elif re.fullmatch(r"\d+(,\d+)*", arg):
            keep = [int(x) - 1 for x in arg.split(",")]
            if any(not 0 <= b < n for b in keep):
                raise UserError(f"{spec}: blocks are numbered 1..{n}")
        else:
            raise UserError(f"bad student spec {spec!r}: use drop:N or drop:i,j,k (1-based blocks)")
        return drop_layers(teacher, keep), teacher_tokenizer
    if spec.startswith("narrow:"):
        m = re.fullmatch(r"narrow:(\d+):(\d+)", spec)
        if not m:
            raise UserError(f"bad student spec {spec!r}: use narrow:HIDDEN:LAYERS, e.g. narrow:192:3")
        return narrow_model(teacher, int(m.group(1)), int(m.group(2)), seed), teacher_tokenizer
    torch.manual_seed(seed)
    return load(spec, task, num_labels)


# ----------------------------------------------------------------------------------------------- data


@dataclass
class Encoded:
    """Tokenised texts (no padding) with their labels."""

    input_ids: list[list[int]]
    labels: list[int] | None
    fingerprint: str

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(tokenizer: Any, texts: Sequence[str], labels: Sequence[int] | None, max_length: int) -> Encoded:
    ids = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)["input_ids"]
    digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
    return Encoded(input_ids=[list(x) for x in ids], labels=None if labels is None else [int(y) for y in labels],
                   fingerprint=digest)


def collate(encoded: Encoded, index: Sequence[int], pad_id: int,
            padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad the chosen examples to the longest among them; returns input_ids, attention_mask (and labels)."""
    rows = [encoded.input_ids[i] for i in index]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, row in enumerate(rows):
        if padding_side == "left":
            ids[j, width - len(row):] = torch.tensor(row)
            mask[j, width - len(row):] = 1
        else:
            ids[j, : len(row)] = torch.tensor(row)
            mask[j, : len(row)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if encoded.labels is not None:
        batch["labels"] = torch.tensor([encoded.labels[i] for i in index], dtype=torch.long)
    return batch


def check_same_tokenization(teacher_tok: Any, student_tok: Any, texts: Sequence[str], max_length: int,
                            what: str) -> None:
    """Raise UserError unless both tokenizers turn every text into the same ids (needed for token-level work)."""
    if teacher_tok is student_tok:
        return
    a = teacher_tok(list(texts), truncation=True, max_length=max_length)["input_ids"]
    b = student_tok(list(texts), truncation=True, max_length=max_length)["input_ids"]
    if a != b:
        raise UserError(f"{what} needs identical tokenizers, but the student's tokenizer splits the texts differently "
                        "from the teacher's; use --features mean (pooled per text) or a student with the "
                        "teacher's tokenizer")


def pooled_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens: Σ_t mask·h / Σ_t mask, shape (batch, width), in the hidden states' own precision
    (the extraction's mask-aware mean pooling, so training and comparison pool the same way)."""
    from repsim.activations.extract import pool_hidden

    return pool_hidden(hidden, mask, "mean", accumulate=hidden.dtype)


# ----------------------------------------------------------------------------------------------- teacher cache


def _model_digest(model: nn.Module) -> str:
    h = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _cache_root() -> Path:
    from repsim.activations.assets import cache_dir

    return Path(cache_dir()) / "distill-teacher"


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, encoded: Encoded, teacher_layers: Sequence[int], features: str,
                    pad_id: int, *, batch_size: int = 64, device: torch.device | None = None,
                    cache: bool = True, progress: bool = False) -> dict[str, torch.Tensor]:
    """The frozen teacher's logits (n, classes) and mapped features, in data order.

    Features: ``feat{k}`` for each teacher layer k, (n, width) mean-pooled, or (n, T, width) token level padded to
    the longest text (rows beyond a text's length are zero). Cached as one safetensors file per key (teacher
    weights digest, tokenised-data digest, layers, pooling); written atomically.
    """
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    device = device or next(teacher.parameters()).device
    layers = sorted(set(int(k) for k in teacher_layers))
    key_src = json.dumps({"model": _model_digest(teacher), "data": encoded.fingerprint, "layers": layers,
                          "features": features, "v": 1})
    key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
    path = _cache_root() / f"{key}.safetensors" if cache else None
    if path is not None and path.exists():
        return load_file(str(path))
    teacher.eval()
    n = len(encoded)
    longest = max(len(r) for r in encoded.input_ids)
    logits, feats = [], {k: [] for k in layers}
    for start in tqdm(range(0, n, batch_size), desc="teacher outputs", disable=not progress, leave=False):
        index = list(range(start, min(n, start + batch_size)))
        batch = collate(encoded, index, pad_id)
        mask = batch["attention_mask"].to(device)
        out = teacher(input_ids=batch["input_ids"].to(device), attention_mask=mask, output_hidden_states=True)
        logits.append(out.logits.float().cpu())
        for k in layers:
            h = out.hidden_states[k].float()
            if features == "mean":
                feats[k].append(pooled_mean(h, mask).cpu())
            else:
                padded = torch.zeros(h.shape[0], longest, h.shape[-1])
                padded[:, : h.shape[1]] = (h * mask.unsqueeze(-1)).cpu()
                feats[k].append(padded)
    result = {"logits": torch.cat(logits)}
    result.update({f"feat{k}": torch.cat(v) for k, v in feats.items()})
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        with _writing(path, tmp):
            save_file({k: v.contiguous() for k, v in result.items()}, tmp)
            os.replace(tmp, path)
    return result


# ----------------------------------------------------------------------------------------------- trainer


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
        Ls = num_layers(student)
        if teacher is not None:
            teacher.to(self.device).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            Lt = num_layers(teacher)
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
            from repsim.measures.losses import make_feature_loss

            for _pair in self.layer_map:
                self.feature_losses.append(make_feature_loss(config.loss, hidden_width(teacher), hidden_width(student)))
            self.feature_losses.to(self.device)
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
        params = [p for p in self.student.parameters() if p.requires_grad] + list(self.feature_losses.parameters())
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
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
    def _loss_terms(self, index: Sequence[int]) -> dict[str, torch.Tensor]:
        cfg = self.config
        batch = {k: v.to(self.device) for k, v in collate(self.train, index, self.pad_id, self.padding_side).items()}
        mask = batch["attention_mask"]
        want_hidden = bool(self.layer_map)
        out = self.student(input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=want_hidden)
        zero = out.logits.new_zeros(())
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
        if self.layer_map:
            feat = zero
            width = mask.shape[1]
            for (t, s), loss_fn in zip(self.layer_map, self.feature_losses, strict=True):
                h_s = out.hidden_states[s]
                if t_hidden is not None:
                    h_t = t_hidden[t].float()
                    h_t = pooled_mean(h_t, mask) if cfg.features == "mean" else h_t
                else:
                    h_t = self.cached[f"feat{t}"][list(index)].to(self.device)
                    if cfg.features == "tokens":
                        h_t = h_t[:, :width]
                if cfg.features == "mean":
                    feat = feat + loss_fn(h_t, pooled_mean(h_s, mask))
                else:
                    feat = feat + loss_fn(h_t, h_s, attention_mask=mask)
            terms["feature"] = feat
        total = terms["ce"]
        if "kd" in terms:
            total = total + cfg.alpha * terms["kd"]
        if "feature" in terms:
            total = total + cfg.beta * terms["feature"]
        terms["total"] = total
        return terms

    def train_step(self, index: Sequence[int]) -> dict[str, float]:
        """One optimizer step on the examples ``index``; returns the loss terms (floats)."""
        self.student.train()
        self.feature_losses.train()
        self.optimizer.zero_grad(set_to_none=True)
        terms = self._loss_terms(index)
        terms["total"].backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.config.max_grad_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        else:
            grad_norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None))
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        values = {k: float(v.detach()) for k, v in terms.items()}
        values["grad_norm"] = float(grad_norm)
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
        }
        _atomic_torch_save(state, path)
        self.write_log()

    def load_checkpoint(self) -> bool:
        """Restore the last checkpoint in ``out`` (if any and made with the same config); True when restored."""
        path = self._checkpoint_path()
        if path is None or not path.exists():
            return False
        state = torch.load(path, map_location=self.device, weights_only=True)
        saved = json.loads(state["config"])
        now = dataclasses.asdict(self.config)
        diff = sorted(k for k in now if k not in _RUNTIME_ONLY and saved.get(k) != now[k])
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
        return True

    def write_log(self) -> None:
        if self.out is None or not self.history:
            return
        _atomic_write_text(self.out / "train_log.csv", pd.DataFrame(self.history).to_csv(index=False))

    # -- the loop
    def fit(self, resume: bool = True) -> pd.DataFrame:
        """Train to the configured number of epochs (resuming from ``out/checkpoint.pt`` when present)."""
        from tqdm.auto import tqdm

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


def _kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), averaged over rows (Hinton et al. 2015)."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * temperature**2


# ----------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(model: nn.Module, tokenizer: Any, encoded: Encoded, batch_size: int = 128,
            device: torch.device | None = None) -> np.ndarray:
    """Class predictions (argmax of logits) for every example, in order."""
    device = device or next(model.parameters()).device
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    preds = []
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded, range(start, min(len(encoded), start + batch_size)), pad,
                        getattr(tokenizer, "padding_side", "right"))
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        preds.append(logits.argmax(-1).cpu().numpy())
    return np.concatenate(preds)


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Any, encoded: Encoded, batch_size: int = 16,
               device: torch.device | None = None) -> float:
    """exp(mean next-token negative log-likelihood over all predicted real tokens) (nats → perplexity)."""
    device = device or next(model.parameters()).device
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded, range(start, min(len(encoded), start + batch_size)), pad, "right")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        valid = (mask[:, 1:] * mask[:, :-1]).bool()
        total += float(F.cross_entropy(logits[valid], ids[:, 1:][valid], reduction="sum"))
        count += int(valid.sum())
    if count == 0:
        raise UserError("no tokens to score: every text is shorter than 2 tokens")
    return math.exp(total / count)


def evaluate(model: nn.Module, tokenizer: Any, encoded: Encoded, task: str, batch_size: int = 128) -> dict[str, float]:
    """Validation metrics: accuracy, MCC, F1 (classification) or perplexity (causal LM)."""
    from repsim.distill.evaluation import classification_metrics

    if task == "causal-lm":
        return {"perplexity": perplexity(model, tokenizer, encoded, batch_size=max(1, batch_size // 8))}
    if encoded.labels is None:
        raise UserError("the validation data has no labels; classification needs a label column")
    return classification_metrics(np.asarray(encoded.labels), predict(model, tokenizer, encoded, batch_size))


# ----------------------------------------------------------------------------------------------- public entry points


def _texts_labels(data: Any) -> tuple[list[str], list[int] | None]:
    if hasattr(data, "texts"):
        return list(data.texts), (None if data.labels is None else list(data.labels))
    if isinstance(data, tuple) and len(data) == 2:
        return list(data[0]), (None if data[1] is None else list(data[1]))
    return list(data), None


def load_split(spec: str, split: str, *, max_samples: int | None = None, seed: int = 0) -> Any:
    """``repsim.activations.data.load_texts`` with ``split`` for specs that have splits (sst2, hf:NAME without
    @SPLIT)."""
    from repsim.activations.data import load_texts

    has_splits = spec.lower() == "sst2" or (spec.lower().startswith("hf:") and "@" not in spec)
    return load_texts(spec, split=split if has_splits else None, max_samples=max_samples, seed=seed)


def _num_labels(labels: Sequence[int] | None) -> int | None:
    return None if labels is None else max(2, int(max(labels)) + 1)


def finetune(model: str | tuple[nn.Module, Any], train: Any, validation: Any = None, *,
             config: DistillConfig | None = None, out: str | Path | None = None) -> DistillResult:
    """Fine-tune a classifier (CE only) — e.g. a teacher without a trained head. Saves the model to ``out/model``.

    ``train`` / ``validation``: TextData, (texts, labels), or lists. Returns metrics on ``validation``.
    """
    config = dataclasses.replace(config or DistillConfig(), loss="none", alpha=0.0, beta=0.0)
    texts, labels = _texts_labels(train)
    if config.task == "sequence-classification" and labels is None:
        raise UserError("the training data has no labels; classification needs a label column")
    seed_everything(config.seed)
    net, tok = load(model, config.task, _num_labels(labels)) if isinstance(model, (str, Path)) else model
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
    texts, labels = _texts_labels(train)
    classify = config.task == "sequence-classification"
    if classify and labels is None:
        raise UserError("the training data has no labels; classification needs a label column")
    t_model, t_tok = load(teacher, config.task, _num_labels(labels)) if isinstance(teacher, (str, Path)) else teacher
    if not has_trained_head(t_model, config.task):
        if not finetune_teacher:
            raise UserError(f"the teacher {teacher if isinstance(teacher, str) else type(t_model).__name__} has no "
                            "trained head for this task; fine-tune it first (repsim finetune, or --finetune-teacher)")
        tcfg = teacher_config or teacher_finetune_config(config)
        res = finetune((t_model, t_tok), (texts, labels), validation, config=tcfg,
                       out=None if out is None else Path(out) / "teacher")
        t_model = res.student
    seed_everything(config.seed)
    if isinstance(student, (str, Path)):
        s_model, s_tok = make_student(str(student), t_model, t_tok, config.task, _num_labels(labels), config.seed)
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
        _atomic_write_text(out_path / "config.json", json.dumps(dataclasses.asdict(config), indent=2))
    history = trainer.fit(resume=out_path is not None)
    metrics: dict[str, float] = {}
    if trainer.finished and validation is not None:
        v_texts, v_labels = _texts_labels(validation)
        metrics = evaluate(trainer.student, tokenizer, encode(tokenizer, v_texts, v_labels, config.max_length),
                           config.task, config.eval_batch_size)
        metrics["train_seconds"] = float(getattr(trainer, "train_seconds", float("nan")))
    if out_path is not None and trainer.finished:
        _save_model(trainer.student, tokenizer, out_path / ("model" if teacher is None else "student"))
        if metrics:
            _atomic_write_text(out_path / "metrics.json", json.dumps(metrics, indent=2))
    return DistillResult(metrics=metrics, history=history, student=trainer.student, tokenizer=tokenizer,
                         out=out_path, layer_map=trainer.layer_map)


_RUNTIME_ONLY = ("stop_after", "progress", "checkpoint_every", "device", "cache_teacher")


def _same_settings(saved_config: Path, config: DistillConfig) -> bool:
    """True when ``saved_config`` (a run's config.json) equals ``config`` up to runtime-only options."""
    if not saved_config.exists():
        return False
    saved = json.loads(saved_config.read_text())
    now = dataclasses.asdict(config)
    return all(saved.get(k) == v for k, v in now.items() if k not in _RUNTIME_ONLY)


def _save_model(model: nn.Module, tokenizer: Any, path: Path) -> None:
    """save_pretrained into a temporary folder, then rename (no half-written model folders)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    with _writing(path, tmp):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- grids of runs


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
    from repsim.distill.evaluation import summarize_grid

    config = config or DistillConfig()
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    for loss in losses:
        dataclasses.replace(config, loss=loss).validate()
    out = Path(out)
    texts, labels = _texts_labels(train)
    t_model, t_tok = load(teacher, config.task, _num_labels(labels)) if isinstance(teacher, (str, Path)) else teacher
    if not has_trained_head(t_model, config.task):
        if not finetune_teacher:
            raise UserError("the teacher has no trained head for this task; fine-tune it first "
                            "(repsim finetune, or --finetune-teacher)")
        tcfg = teacher_config or teacher_finetune_config(config)
        t_model = finetune((t_model, t_tok), (texts, labels), validation, config=tcfg, out=out / "teacher").student
    if validation is not None and config.task == "sequence-classification":
        v_texts, v_labels = _texts_labels(validation)
        teacher_metrics = evaluate(t_model, t_tok, encode(t_tok, v_texts, v_labels, config.max_length), config.task)
        _atomic_write_text(out / "teacher_metrics.json", json.dumps(teacher_metrics, indent=2))
    rows = []
    for seed in seed_list:
        for loss in losses:
            run_dir = out / "runs" / loss / f"seed{seed}"
            done = run_dir / "metrics.json"
            cfg = dataclasses.replace(config, loss=loss, seed=seed)
            if done.exists() and not _same_settings(run_dir / "config.json", cfg):
                raise UserError(f"{run_dir} holds a finished run with other settings; use another --out")
            if not done.exists():
                seed_everything(seed)
                s_model, s_tok = make_student(student, t_model, t_tok, cfg.task, _num_labels(labels), seed)
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


def load_train_validation(data: str, val_data: str | None = None, *, max_train: int | None = None,
                          max_val: int | None = None, holdout: float = 0.1) -> tuple[Any, Any]:
    """Training and validation TextData for a data spec.

    ``sst2``: the ``train`` and ``validation`` splits (offline: the fixed, disjoint SST-like splits). Another
    spec with ``val_data``: both as given. Otherwise a fixed random ``holdout`` fraction of ``data``
    (seed 0) becomes the validation set. ``max_train`` / ``max_val`` keep a fixed random subset of N
    (``repsim.activations.data.subsample`` with seed 0: the same texts for every training seed, nested across sizes).
    """
    from repsim.activations.data import fingerprint_texts, subsample

    if data == "sst2" and val_data is None:
        train = load_split(data, "train")
        validation = load_split(data, "validation")
    elif val_data is not None:
        train, validation = load_split(data, "train"), load_split(val_data, "validation")
    else:
        full = load_split(data, "train")
        n_val = max(1, int(round(holdout * len(full.texts))))
        chosen = set(np.random.default_rng(0).permutation(len(full.texts))[:n_val].tolist())
        keep_val = [i in chosen for i in range(len(full.texts))]

        def part(flag: bool, name: str) -> Any:
            texts = [t for t, v in zip(full.texts, keep_val, strict=True) if v == flag]
            labels = None if full.labels is None else [y for y, v in zip(full.labels, keep_val, strict=True)
                                                       if v == flag]
            return dataclasses.replace(full, texts=texts, labels=labels, name=f"{full.name}[{name}]",
                                       fingerprint=fingerprint_texts(texts))

        train, validation = part(False, "train"), part(True, "validation")

    return subsample(train, max_train, seed=0), subsample(validation, max_val, seed=0)


# ----------------------------------------------------------------------------------------------- command line glue


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
    from repsim.analysis.comparison import check_out_dir  # noqa: PLC0415

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
    from repsim.analysis.comparison import check_out_dir  # noqa: PLC0415

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
