"""The layer grammar: which hidden-state layers a user means, and which teacher layer meets which student layer.

Layers are numbered as ``hidden_states``: ``0`` is the embedding output, ``k`` the output of block ``k`` (1..L);
negative indices count from the end (``-1`` = L). A selection is a list of tokens, each an integer, an inclusive
range ``a-b`` (or ``a:b``), optionally prefixed ``t:``/``teacher:`` or ``s:``/``student:`` to apply to one side
(:func:`parse_layers`); ``"all"`` is every layer. A layer map pairs teacher and student layers: ``"uniform"``
(student block j with teacher block round(j·Lt/Ls)), pairs ``"12:6,6:3"`` (``12->6`` and ``12→6`` too), or a file
(CSV with ``teacher_layer`` and ``student_layer`` columns, JSON pairs, or the line ``repsim compare --suggest-map``
prints) (:func:`parse_layer_map`).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from repsim.system.errors import UserError

#: the longest layer range a selection may spell out (``0-1000000000`` would build a list of 10^9 indices)
MAX_LAYER_RANGE = 100_000

# ---------------------------------------------------------------------------------------------- layer counts


def num_layers_of_config(cfg: Any) -> int | None:
    """Number of blocks whose outputs are hidden states 1..L (encoder side for encoder-decoders); None when the
    config names none."""
    if hasattr(cfg, "get_text_config"):
        with contextlib.suppress(Exception):
            cfg = cfg.get_text_config()
    names = ("encoder_layers", "num_layers", "num_hidden_layers", "n_layer") if getattr(
        cfg, "is_encoder_decoder", False) else ("num_hidden_layers", "n_layer", "num_layers")
    for name in names:
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def num_layers(model: Any, *, required: bool = False) -> int | None:
    """Number of blocks of a loaded model (see :func:`num_layers_of_config`); with ``required``, a UserError
    instead of None when the config does not say."""
    n = num_layers_of_config(model.config)
    if n is None and required:
        raise UserError(f"cannot tell how many layers {type(model).__name__} has (its config names no layer count)")
    return n


# ---------------------------------------------------------------------------------------------- selections


def check_layer_range(lo: int, hi: int, text: str) -> range:
    """``range(lo, hi + 1)`` for a layer range ``lo-hi``, refused (UserError) beyond :data:`MAX_LAYER_RANGE`."""
    if hi - lo >= MAX_LAYER_RANGE:
        raise UserError(f"layer range {text!r} spans {hi - lo + 1} layers; no model has more than {MAX_LAYER_RANGE}")
    return range(lo, hi + 1)


def parse_layer_token(tok: str) -> list[int]:
    """One token: an integer (negative counts from the end) or an inclusive range ``a-b`` / ``a:b`` with a ≤ b."""
    try:
        if tok.lstrip("-").isdigit():
            return [int(tok)]
        for sep in ("-", ":"):
            if sep in tok.lstrip("-"):
                head = "-" if tok.startswith("-") else ""
                a, b = tok.lstrip("-").split(sep, 1)
                lo, hi = int(head + a), int(b)
                if hi < lo:
                    raise ValueError
                return list(check_layer_range(lo, hi, tok))
        raise ValueError
    except UserError:
        raise
    except ValueError:
        raise UserError(f"bad layer spec {tok!r}: use integers, ranges like 0-6, or t:/s: prefixes") from None


def parse_layers(tokens: Sequence[str] | None) -> tuple[list[int] | None, list[int] | None]:
    """Layer tokens for a teacher and a student -> (teacher layers, student layers); None = all.

    Each token (or comma-separated part) is an integer or range (:func:`parse_layer_token`), optionally prefixed
    ``t:``/``teacher:`` or ``s:``/``student:`` to apply to one side; unprefixed tokens apply to both. Negative values
    stay negative here; :func:`resolve_layer_ids` resolves them against each model's layer count.
    """
    if not tokens:
        return None, None
    sides: dict[str, list[int]] = {"t": [], "s": []}
    for raw in tokens:
        if not str(raw).strip(" ,"):
            raise UserError(f"empty layer spec {raw!r}: use integers, ranges like 0-6, or t:/s: prefixes")
        for tok in str(raw).split(","):
            tok = tok.strip()
            if not tok:
                continue
            targets = ("t", "s")
            for prefix, side in (("teacher:", "t"), ("student:", "s"), ("t:", "t"), ("s:", "s")):
                if tok.startswith(prefix):
                    tok, targets = tok[len(prefix):], (side,)
                    break
            vals = parse_layer_token(tok)
            for side in targets:
                sides[side].extend(vals)
    return (sides["t"] or None), (sides["s"] or None)


def resolve_layer_ids(requested: Sequence[int] | None, available: int, who: str) -> list[int] | None:
    """Check requested layer indices against 0..available−1 (negatives count from the end); sorted, unique.
    ``who`` ("teacher", "student") names the side in the error."""
    if requested is None:
        return None
    out = []
    for k in requested:
        kk = k + available if k < 0 else k
        if not 0 <= kk < available:
            raise UserError(f"unknown {who} layer {k}: the {who} has layers 0..{available - 1} "
                            f"(0 = embeddings, k = block k)")
        out.append(kk)
    return sorted(set(out))


def resolve_layers(layers: Sequence[int] | int | str | None, n_blocks: int | None) -> list[int] | None:
    """Normalise a layer selection to sorted unique indices in 0..L; None means all layers.

    Accepts ints (negative counts from the end: -1 = L), a list, or a string like ``"0,3,6"`` / ``"4-6"`` /
    ``"all"``. Raises UserError for indices outside 0..L.
    """
    if layers is None or (isinstance(layers, str) and layers.strip().lower() in ("", "all")):
        return None if n_blocks is None else list(range(n_blocks + 1))
    if isinstance(layers, int):
        items: list[int] = [layers]
    elif isinstance(layers, str):
        items = [k for part in layers.replace(" ", "").split(",") if part for k in parse_layer_token(part)]
    else:
        items = [int(k) for k in layers]
    if not items:
        raise UserError("empty layer selection")
    if n_blocks is None:
        if any(k < 0 for k in items):
            raise UserError("negative layer indices need a model config with a known number of layers")
        return sorted(set(items))
    out = []
    for k in items:
        kk = k + n_blocks + 1 if k < 0 else k
        if not 0 <= kk <= n_blocks:
            raise UserError(f"unknown layer index {k}: this model has layers 0..{n_blocks} "
                            f"(0 = embeddings, k = block k)")
        out.append(kk)
    return sorted(set(out))


# ---------------------------------------------------------------------------------------------- layer maps


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


def parse_layer_map(spec: str | Sequence[tuple[int, int]], teacher_layers: int | Sequence[int],
                    student_layers: int | Sequence[int]) -> list[tuple[int, int]]:
    """Parse a layer map into (teacher layer, student layer) pairs, layers indexed as hidden_states (0 = embeddings).

    ``spec``: ``"uniform"``; ``"t:s,t:s"`` (e.g. ``"2:1,4:2,6:3"``); a list of pairs; or a path to a file from
    ``repsim compare --suggest-map`` — CSV with ``teacher_layer`` and ``student_layer`` columns, JSON (a list of
    [teacher, student] pairs or an object with a ``pairs`` / ``layer_map`` entry), or text ``t:s,t:s``.
    ``teacher_layers``/``student_layers``: a block count L (layers 0..L exist) or the layer ids available (e.g.
    those extracted; ``uniform`` then uses the largest). Raises UserError for malformed specs and for layers that
    do not exist. A named file that does not exist is a FileNotFoundError.
    """
    pairs = layer_map_pairs(spec) if isinstance(spec, str) else [(int(t), int(s)) for t, s in spec]
    t_ids = _layer_ids(teacher_layers)
    s_ids = _layer_ids(student_layers)
    if pairs is None:
        pairs = uniform_layer_map(max(t_ids), max(s_ids))
    if not pairs:
        raise UserError("the layer map is empty")
    for t, s in pairs:
        for side, k, ids in (("teacher", t, t_ids), ("student", s, s_ids)):
            if not 0 <= k <= ids[-1]:
                raise UserError(f"layer map pair {t}:{s}: {side} layer {k} out of range 0..{ids[-1]}")
            if k not in ids:
                raise UserError(f"layer map: {side} has no layer {k} (layers {ids[0]}..{ids[-1]})")
    return pairs


def _layer_ids(layers: int | Sequence[int]) -> list[int]:
    if isinstance(layers, int):
        return list(range(layers + 1))
    ids = sorted({int(k) for k in layers})
    if not ids:
        raise UserError("no layers to map")
    return ids


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


__all__ = ["MAX_LAYER_RANGE", "check_layer_range", "layer_map_pairs", "num_layers", "num_layers_of_config",
           "parse_layer_map", "parse_layer_token", "parse_layers", "resolve_layer_ids", "resolve_layers",
           "uniform_layer_map"]
