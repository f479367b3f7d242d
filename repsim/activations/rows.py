"""Hidden states as rows: the :class:`Activations` container that extraction returns and the store serves, and
where a batch's output rows go (:func:`rows_of`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from repsim.system.errors import UserError


@dataclass
class Activations:
    """Hidden states of one model on one list of texts, one (rows, width) float32 array per layer.

    ``act[k]`` is layer ``k`` (0 = embeddings, k = block k; negative k counts from the end); arrays from the
    store are memory-mapped read-only. For ``pool="tokens"`` rows are tokens: ``offsets`` (n_texts + 1,)
    delimits the rows of each text and ``token_ids`` (rows,) gives their ids. For ``pool="words"`` rows are words
    and ``token_ids`` counts the tokens averaged into each word (0 = dropped by this model, see ``kept``).
    """

    layers: list[int]
    arrays: dict[int, np.ndarray] = field(repr=False)
    meta: dict[str, Any] = field(default_factory=dict)
    offsets: np.ndarray | None = field(default=None, repr=False)
    token_ids: np.ndarray | None = field(default=None, repr=False)
    path: Path | None = None

    def _resolve(self, layer: int) -> int:
        layer = int(layer)
        if layer < 0:
            n_blocks = self.meta.get("num_layers") or max(self.layers)
            layer += n_blocks + 1
        if layer not in self.arrays:
            raise UserError(f"layer {layer} was not extracted; available layers: {self.layers}")
        return layer

    def __getitem__(self, layer: int) -> np.ndarray:
        return self.arrays[self._resolve(layer)]

    def __contains__(self, layer: object) -> bool:
        return layer in self.arrays

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.arrays[k] for k in self.layers)

    def stack(self, layers: Sequence[int] | None = None) -> np.ndarray:
        """(L, rows, width) array of the given layers (all extracted layers by default), loaded in memory."""
        chosen = self.layers if layers is None else [self._resolve(k) for k in layers]
        return np.stack([np.asarray(self.arrays[k]) for k in chosen])

    @property
    def width(self) -> int:
        return int(self.arrays[self.layers[0]].shape[1])

    @property
    def n(self) -> int:
        """Number of rows: texts for pooled features, tokens for ``pool="tokens"``."""
        return int(self.arrays[self.layers[0]].shape[0])

    @property
    def kept(self) -> np.ndarray | None:
        """Word pooling: True for the words this model kept (not truncated, at least one token); else None."""
        if self.meta.get("pool") != "words" or self.token_ids is None:
            return None
        return np.asarray(self.token_ids) > 0

    @property
    def n_texts(self) -> int:
        return int(self.meta.get("n_texts", self.n))

    def texts_rows(self, i: int) -> slice:
        """Rows of text ``i`` (token pooling) or the single row ``i`` (pooled features)."""
        if self.offsets is None:
            return slice(i, i + 1)
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))


def rows_of(idx: np.ndarray, offsets: np.ndarray | None) -> np.ndarray:
    """Destination rows (input order) of a batch's output rows: the texts themselves, or their tokens."""
    if offsets is None:
        return np.asarray(idx, dtype=np.int64)
    if len(idx) == 0:
        return np.empty(0, dtype=np.int64)
    return np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in idx]).astype(np.int64)


__all__ = ["Activations", "rows_of"]
