"""Training data for distillation: tokenised texts (:class:`Encoded`), batches, the tokenisation check for
token-level work, mask-weighted mean pooling, and the train / validation splits of a data spec."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from repsim.activations.data import fingerprint_texts, load_texts, subsample
from repsim.activations.pooling import pool_hidden
from repsim.system.errors import UserError


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


def align_token_rows(cached: torch.Tensor, mask: torch.Tensor, padding_side: str) -> torch.Tensor:
    """Cached teacher token features (batch, longest, width), each text's tokens from row 0 (computed right-padded),
    as the student's batch lays them out: the first ``mask.shape[1]`` rows, shifted right by each row's padding
    when the batch is left-padded (pad rows then hold a copy of row 0; the mask drops them)."""
    width = mask.shape[1]
    if padding_side != "left":
        return cached[:, :width]
    pads = width - mask.sum(dim=1, keepdim=True)
    rows = (torch.arange(width, device=mask.device).unsqueeze(0) - pads).clamp(min=0)
    return cached.gather(1, rows.unsqueeze(-1).expand(-1, -1, cached.shape[-1]))


def check_same_tokenization(teacher_tok: Any, student_tok: Any, texts: Sequence[str], max_length: int,
                            what: str) -> None:
    """Raise UserError unless both tokenizers turn every text into the same ids (needed for token-level work)."""
    if teacher_tok is student_tok:
        return
    a = teacher_tok(list(texts), truncation=True, max_length=max_length)["input_ids"]
    b = student_tok(list(texts), truncation=True, max_length=max_length)["input_ids"]
    if a != b:
        raise UserError(f"{what} needs identical tokenizers, but the student's tokenizer splits the texts differently "
                        "from the teacher's; use `features='mean'` (pooled per text) or a student with the "
                        "teacher's tokenizer")


def pooled_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens: Σ_t mask·h / Σ_t mask, shape (batch, width), in the hidden states' own precision
    (the extraction's mask-aware mean pooling, so training and comparison pool the same way)."""

    return pool_hidden(hidden, mask, "mean", accumulate=hidden.dtype)


def texts_labels(data: Any) -> tuple[list[str], list[int] | None]:
    if hasattr(data, "texts"):
        return list(data.texts), (None if data.labels is None else list(data.labels))
    if isinstance(data, tuple) and len(data) == 2:
        return list(data[0]), (None if data[1] is None else list(data[1]))
    return list(data), None


def label_count(labels: Sequence[int] | None) -> int | None:
    return None if labels is None else max(2, int(max(labels)) + 1)


def load_split(spec: str, split: str, *, max_samples: int | None = None, seed: int = 0) -> Any:
    """``repsim.activations.data.load_texts`` with ``split`` for specs that have splits (sst2, hf:NAME without
    @SPLIT)."""

    has_splits = spec.lower() == "sst2" or (spec.lower().startswith("hf:") and "@" not in spec)
    return load_texts(spec, split=split if has_splits else None, max_samples=max_samples, seed=seed)


def load_train_validation(data: str, val_data: str | None = None, *, max_train: int | None = None,
                          max_val: int | None = None, holdout: float = 0.1) -> tuple[Any, Any]:
    """Training and validation TextData for a data spec.

    ``sst2``: the ``train`` and ``validation`` splits (offline: the fixed, disjoint SST-like splits). Another
    spec with ``val_data``: both as given. Otherwise a fixed random ``holdout`` fraction of ``data``
    (seed 0) becomes the validation set. ``max_train`` / ``max_val`` keep a fixed random subset of N
    (``repsim.activations.data.subsample`` with seed 0: the same texts for every training seed, nested across sizes).
    """

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
