"""Word-level rows: one rule splits every text into words, each model's sub-token states are averaged into them.

Teacher and student rarely share a tokenizer, so their token rows do not pair. Words do: they are cut from the
original string by one rule that knows nothing of either model, and each model's hidden states are averaged
into those words through its fast tokenizer's character offsets. Row ``i`` of both sides is then the same word.

**The word rule** (``WORD_RULE``), applied to the original string (Python code points, no normalisation):

1. a *word* is a maximal run of letters, combining marks and digits (Unicode ``L``, ``M``, ``N``), which may
   continue across a single internal apostrophe (``'`` or ``’``) or hyphen between two such runs: ``don't``,
   ``state-of-the-art``, ``café`` (precomposed or ``e`` + U+0301), ``naïve``, ``42``, ``3-2``;
2. except that each Han ideograph (CJK) is a word of its own (Chinese and Japanese are written without spaces;
   this is what BERT's basic tokenizer does too);
3. every other character that is not white space is a word of its own, taken as a whole grapheme cluster
   (Unicode ``\\X``): ``.``, ``,``, ``!``, ``_``, ``$``, and an emoji with its modifiers or joiners (``👍🏽``).

White space separates words and belongs to none.

**Sub-tokens to words.** A token is assigned to every word its character span ``[start, end)`` overlaps
(spans are half-open; a token spanning two words, e.g. a merged ``".\\""``, counts in both). Special tokens
(``[CLS]``, ``<s>``, padding; the tokenizer's special-tokens mask) and tokens with an empty span are excluded.
The word's row is the plain mean of its tokens' hidden states (in the accumulation precision).

**Dropped words.** A word is kept by a model only when every token overlapping it in the untruncated encoding is
also in the truncated one (``max_length``), and it has at least one token. Words a model cuts (truncation) or
never sees (a character its normaliser removes) are dropped for BOTH sides when a pair is compared, and counted.

Word-level comparison streams: rows are read in chunks into :class:`repsim.measures.moments.LayerMoments`, so memory
does
not grow with the number of words; only measures computable from second moments are available
(:func:`streamable`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import regex
import torch

from repsim.measures.functions import get_metric
from repsim.measures.moments import LayerMoments
from repsim.system.errors import UserError

WORD_RULE = "words-v1: runs of L/M/N with internal ' ’ -, each Han ideograph, each other non-space grapheme"
_RUN = r"[[\p{L}\p{M}\p{N}]--\p{Han}]+"
WORD_PATTERN = regex.compile(rf"\p{{Han}}|{_RUN}(?:['’\-]{_RUN})*|(?!\s)\X", flags=regex.V1)


def split_words(text: str) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the words of ``text`` under :data:`WORD_RULE`, in order."""
    return [m.span() for m in WORD_PATTERN.finditer(text)]


def words(text: str) -> list[str]:
    """The words of ``text`` as strings (for reading; the extraction uses :func:`split_words`)."""
    return [text[a:b] for a, b in split_words(text)]


def word_counts(texts: Sequence[str]) -> np.ndarray:
    """Number of words of each text (int64)."""
    return np.fromiter((len(split_words(t)) for t in texts), dtype=np.int64, count=len(texts))


def check_offsets(tokenizer: Any, name: str = "model") -> None:
    """Word pooling reads character offsets, which only fast (Rust ``tokenizers``) tokenizers give."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"`pool='words'` needs character offsets, but the {name} tokenizer "
                        f"({type(tokenizer).__name__}) is a slow tokenizer without them; load a fast one "
                        f"(AutoTokenizer.from_pretrained(..., use_fast=True), or a PreTrainedTokenizerFast)")


def _overlaps(spans: np.ndarray, a: int, b: int) -> range:
    """Indices of the words (sorted, disjoint ``spans``) overlapping the half-open span [a, b)."""
    first = int(np.searchsorted(spans[:, 1], a, side="right"))
    last = int(np.searchsorted(spans[:, 0], b, side="left"))
    return range(first, last)


def token_word_pairs(spans: np.ndarray, offsets: Sequence[Sequence[int]], special: Sequence[int],
                     keep: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """(word index, token position) for every real token of one text and every word it overlaps.

    ``offsets``: (start, end) per token position; ``special``: 1 for special tokens (excluded), as is any token
    with an empty span or with ``keep[t] == 0`` (padding)."""
    w_idx: list[int] = []
    t_idx: list[int] = []
    if len(spans) == 0:
        return w_idx, t_idx
    for t, ((a, b), sp) in enumerate(zip(offsets, special, strict=True)):
        if sp or b <= a or (keep is not None and not keep[t]):
            continue
        for w in _overlaps(spans, int(a), int(b)):
            w_idx.append(w)
            t_idx.append(t)
    return w_idx, t_idx


def encode_words(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[dict[str, torch.Tensor], Any]:
    """Tokenise a batch for word pooling: the padded, truncated tensors and, per text, the word assignment.

    Returns (encoding with ``input_ids``/``attention_mask``, plan) where plan is
    (word_rows, token_flat_index, counts): for every kept (word, token) pair the batch-wide word row and the
    flat index b·T + t of the token; ``counts`` (int64, one per word of the batch) is the number of tokens
    averaged into each word, 0 for a dropped word (truncated, or no token at all)."""
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt",
                    return_offsets_mapping=True, return_special_tokens_mask=True)
    full = tokenizer(list(texts), truncation=False, padding=False, return_offsets_mapping=True,
                     return_special_tokens_mask=True, verbose=False)
    T = enc["input_ids"].shape[1]
    rows: list[int] = []
    flat: list[int] = []
    counts: list[np.ndarray] = []
    base = 0
    for i, text in enumerate(texts):
        spans = np.asarray(split_words(text), dtype=np.int64).reshape(-1, 2)
        n_w = len(spans)
        fw, _ = token_word_pairs(spans, full["offset_mapping"][i], full["special_tokens_mask"][i])
        need = np.bincount(np.asarray(fw, dtype=np.int64), minlength=n_w)
        w_idx, t_idx = token_word_pairs(spans, enc["offset_mapping"][i].tolist(),
                                        enc["special_tokens_mask"][i].tolist(), enc["attention_mask"][i].tolist())
        have = np.bincount(np.asarray(w_idx, dtype=np.int64), minlength=n_w)
        kept = (have == need) & (need > 0)
        counts.append(np.where(kept, have, 0).astype(np.int64))
        for w, t in zip(w_idx, t_idx, strict=True):
            if kept[w]:
                rows.append(base + w)
                flat.append(i * T + t)
        base += n_w
    plan = (torch.tensor(rows, dtype=torch.int64), torch.tensor(flat, dtype=torch.int64),
            np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64))
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, plan


def streamable(metric: str) -> bool:
    """True when a measure is computed exactly from pooled second moments (word-level comparison streams)."""
    spec = get_metric(metric)
    return bool(spec.linear) and dict(spec.kwargs).get("folds") is None


def check_streamable(metric_ids: Sequence[str]) -> None:
    """UserError naming the measures that need every row in memory (not available at word level)."""
    bad = [m for m in metric_ids if not streamable(m)]
    if bad:
        raise UserError(f"`pool='words'` streams word rows through second moments; {', '.join(bad)} need(s) every "
                        f"row in memory (RBF kernels, held-out folds): use linear measures such as procrustes, "
                        f"gram_frobenius, cka, projection_residual[in_sample], or a pooled `pool='mean'` run")


def paired_moments(teacher: Any, student: Any, *, chunk_rows: int = 8192, device: Any = None) -> tuple[Any, dict]:
    """Stream the word rows both models kept into :class:`repsim.measures.moments.LayerMoments`.

    ``teacher``/``student``: word-pooled :class:`repsim.activations.extract.Activations` of the same texts (same
    offsets).
    Rows are read ``chunk_rows`` at a time (memory-mapped from the store). Returns (moments, counts) with
    counts = {n_words, n_used, dropped_teacher, dropped_student, dropped}."""
    for side, act in (("teacher", teacher), ("student", student)):
        if act.meta.get("pool") != "words" or act.token_ids is None:
            raise UserError(f"the {side} activations are not word-pooled (pool={act.meta.get('pool')!r})")
    if teacher.offsets is None or student.offsets is None or not np.array_equal(teacher.offsets, student.offsets):
        raise UserError("teacher and student word rows come from different texts or word rules; cannot pair them")
    kt, ks = np.asarray(teacher.token_ids) > 0, np.asarray(student.token_ids) > 0
    keep = kt & ks
    counts = {"n_words": int(len(keep)), "n_used": int(keep.sum()), "dropped_teacher": int((~kt).sum()),
              "dropped_student": int((~ks).sum()), "dropped": int((~keep).sum())}
    if counts["n_used"] < 2:
        raise UserError(f"only {counts['n_used']} word(s) kept by both models; a comparison needs at least 2")
    moments = LayerMoments([teacher[k].shape[1] for k in teacher.layers],
                           [student[k].shape[1] for k in student.layers], device=device)
    for lo in range(0, len(keep), chunk_rows):
        sel = keep[lo:lo + chunk_rows]
        if not sel.any():
            continue
        xs = [torch.from_numpy(np.asarray(teacher[k][lo:lo + chunk_rows])[sel]) for k in teacher.layers]
        ys = [torch.from_numpy(np.asarray(student[k][lo:lo + chunk_rows])[sel]) for k in student.layers]
        moments.update(xs, ys)
    return moments, counts
