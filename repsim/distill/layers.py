"""Layer counts and the layer-map grammar shared by ``repsim distill --layer-map`` and ``repsim check --map``:
``uniform``, ``t:s`` pairs, or a file (CSV, JSON, or the line ``repsim compare --suggest-map`` prints)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from torch import nn

from repsim.system.errors import UserError


def num_layers(model: nn.Module) -> int:
    """Number of transformer blocks (hidden_states has this many entries plus the embeddings)."""
    cfg = model.config
    n = getattr(cfg, "num_hidden_layers", None)
    if n is None:
        raise UserError(f"cannot tell how many layers {type(model).__name__} has (no num_hidden_layers)")
    return int(n)


def hidden_width(model: nn.Module) -> int:
    return int(model.config.hidden_size)


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
