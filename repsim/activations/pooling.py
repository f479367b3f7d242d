"""The pooling registry: how a model's (batch, tokens, width) hidden states become rows.

Every mode is one :class:`Pool` in :data:`POOLS` (the command line's ``--pool`` choices come from it). Pooling uses
the attention mask, so the padding side and the batch composition never leak into features:

* ``mean``: Σ_t m_t h_t / Σ_t m_t over real tokens (m = attention mask), accumulated in float32 or float64;
* ``cls``: the first real token (``[CLS]`` for BERT-like models; under left padding, the first non-pad position);
* ``last``: the last real token, found from the mask, correct under left or right padding;
* ``tokens``: every real token is one row (row-major over the batch);
* ``words``: every word (:mod:`repsim.activations.words`) is one row, the mean of the sub-tokens overlapping it.

The functions use only tensor methods, so this module (and the command line reading :data:`POOL_NAMES`) does not
import torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from repsim.system.errors import UserError

if TYPE_CHECKING:
    import torch


def first_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first real token of each row of a (b, T) 0/1 mask."""
    return mask.long().argmax(dim=1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row of a (b, T) 0/1 mask; right or left padding alike."""
    return mask.shape[1] - 1 - mask.long().flip(dims=[1]).argmax(dim=1)


def _at(h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(b, w): row i of ``h`` (b, T, w) at token ``index[i]``."""
    return h.gather(1, index.to(h.device).view(-1, 1, 1).expand(-1, 1, h.shape[-1])).squeeze(1)


def pool_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t m_t h_t / Σ_t m_t, in ``h``'s dtype (a text without tokens gives zeros)."""
    m = mask.to(device=h.device, dtype=h.dtype).unsqueeze(-1)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def pool_cls(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """h at the first real token of each text."""
    return _at(h, first_token_index(mask))


def pool_last(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """h at the last real token of each text."""
    return _at(h, last_token_index(mask))


def pool_tokens(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The real-token rows, concatenated row-major: (Σ m, w)."""
    return h[mask.to(h.device).bool()]


def pool_words(hidden: torch.Tensor, plan: Any, accumulate: torch.dtype | None = None) -> torch.Tensor:
    """(words, w) means of the tokens assigned to each word of the batch (zeros for dropped words), computed in
    ``accumulate`` precision (default float32).

    ``hidden``: (b, T, w) hidden states; ``plan``: (word rows, flat token indices, token counts per word) from
    :func:`repsim.activations.words.encode_words`."""
    rows, flat, counts = plan
    h = (hidden.float() if accumulate is None else hidden.to(accumulate)).reshape(-1, hidden.shape[-1])
    out = h.new_zeros((len(counts), h.shape[1]))
    out.index_add_(0, rows.to(h.device), h[flat.to(h.device)])
    return out / h.new_tensor(counts).clamp_min(1).unsqueeze(1)


@dataclass(frozen=True)
class Pool:
    """One pooling mode. ``rows``: what a row is (``"text"``, ``"token"`` or ``"word"``); ``function(h, mask)``
    pools (b, T, w) hidden states with their (b, T) attention mask (None for ``words``, which needs the
    tokenizer's word plan: :func:`pool_words`)."""

    name: str
    rows: str
    function: Callable[[Any, Any], Any] | None
    help: str

    @property
    def per_text(self) -> bool:
        """True when every text gives exactly one row."""
        return self.rows == "text"


POOLS: dict[str, Pool] = {p.name: p for p in (
    Pool("mean", "text", pool_mean, "the mean over the text's real tokens"),
    Pool("cls", "text", pool_cls, "the first real token ([CLS] for BERT-like models)"),
    Pool("last", "text", pool_last, "the last real token"),
    Pool("tokens", "token", pool_tokens, "every real token (same tokenizer on both sides)"),
    Pool("words", "word", None, "every word, its sub-tokens averaged (any two tokenizers)"),
)}
#: every pooling mode, in order
POOL_NAMES = tuple(POOLS)
#: modes with one row per text
TEXT_POOLS = tuple(name for name, p in POOLS.items() if p.per_text)
#: modes with several rows per text (``offsets`` delimit each text's rows)
ROW_POOLS = tuple(name for name, p in POOLS.items() if not p.per_text)


def check_pool(pool: str, allowed: Sequence[str] = POOL_NAMES) -> str:
    """``pool`` if it is one of ``allowed`` (default: every mode), else a UserError naming them."""
    if pool not in allowed:
        raise UserError(f"unknown pooling {pool!r}; use one of {', '.join(allowed)}")
    return pool


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, pool: str,
                accumulate: torch.dtype | None = None) -> torch.Tensor:
    """Pool (b, T, w) hidden states with a (b, T) attention mask by a mode of :data:`POOLS` that needs only the
    mask (all but ``words``), computed in ``accumulate`` precision (default float32)."""
    function = POOLS[check_pool(pool)].function
    if function is None:
        raise UserError(f"pooling {pool!r} needs the tokenizer's word plan (repsim.activations.words.encode_words)")
    return function(hidden.float() if accumulate is None else hidden.to(accumulate), mask)


__all__ = ["POOLS", "POOL_NAMES", "ROW_POOLS", "TEXT_POOLS", "Pool", "check_pool", "first_token_index",
           "last_token_index", "pool_hidden", "pool_words"]
