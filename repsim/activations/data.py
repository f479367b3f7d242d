"""Data specs → a list of texts (and labels where present), with a fingerprint of the texts.

Specs understood by :func:`load_texts`:

- ``sst2``: GLUE SST-2 (``nyu-mll/glue``, config ``sst2``) through ``datasets``, split ``validation`` by default
  (872 sentences), when the hub answers or a local ``datasets`` cache has it. Offline (``HF_HUB_OFFLINE=1`` /
  ``HF_DATASETS_OFFLINE=1``, or the hub does not answer within ``$REPSIM_HUB_TIMEOUT`` s) it falls back, with a
  warning, to an **SST-like sample**: the Rotten Tomatoes snippets with human sentiment scores that SST was
  built from (Hutto & Gilbert 2014, shipped in the vaderSentiment 3.3.2 sdist, MIT): sentences with
  ``|score| >= 1`` (9,171 distinct), label ``score > 0``; ``validation`` is a fixed seeded subset of 872
  sentences and ``train`` the disjoint rest (8,299), both in file order. ``TextData.offline_fallback`` and
  ``TextData.source`` say which one was used.
- a local file: ``.txt`` (one text per line; blank lines dropped and counted), ``.csv``, ``.tsv`` (standard
  double-quote quoting, as pandas and the csv module write them), ``.jsonl``,
  ``.parquet`` with ``text_column`` (default: ``text``, ``sentence``, or the only column) and ``label_column``
  (default: ``label`` when present; values must be integers).
- ``hf:NAME[:CONFIG][@SPLIT]``: any ``datasets`` data set (default split: ``validation`` if it has one, else
  ``train``).

Texts are stripped of surrounding whitespace; empty texts are dropped and counted in ``n_dropped``.
``max_samples=k`` keeps a seeded random subset of k texts **in their original order**; the subsets for one
seed are nested (k₁ < k₂ ⇒ subset₁ ⊂ subset₂).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from repsim.activations.assets import hub_reachable, snippets_file
from repsim.system.errors import UserError, first_line

logger = logging.getLogger(__name__)

SST2_VALIDATION_SIZE = 872
FALLBACK_SEED = 2014  # the seed of the fixed validation/train split of the offline SST-like sample
FALLBACK_MIN_ABS_SCORE = 1.0
FILE_FORMATS = (".txt", ".csv", ".tsv", ".jsonl", ".parquet")
_TEXT_COLUMN_GUESSES = ("text", "sentence", "content", "review")
_LABEL_COLUMN_GUESSES = ("label", "labels")


@dataclass(frozen=True)
class TextData:
    """Texts (and integer labels, or None) resolved from a data spec.

    ``fingerprint`` = :func:`fingerprint_texts` of ``texts`` (labels, name and source do not enter it).
    ``n_dropped``: texts dropped as empty. ``offline_fallback``: the SST-like sample stood in for GLUE SST-2.
    """

    texts: list[str]
    labels: list[int] | None
    name: str
    source: str
    offline_fallback: bool = False
    fingerprint: str = ""
    n_dropped: int = 0
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.labels is not None and len(self.labels) != len(self.texts):
            raise ValueError(f"{len(self.labels)} labels for {len(self.texts)} texts")
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", fingerprint_texts(self.texts))

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def from_texts(cls, texts: Sequence[str], labels: Sequence[int] | None = None, *, name: str = "texts",
                   source: str = "texts given in memory") -> TextData:
        """Wrap texts held in memory (no dropping, no reordering)."""
        texts = [str(t) for t in texts]
        return cls(texts, None if labels is None else [int(x) for x in labels], name, source)


def fingerprint_texts(texts: Sequence[str]) -> str:
    """sha256 over the texts in order, each as its UTF-8 byte length (8 bytes, little endian) then its bytes.

    The length prefix makes boundaries count: ``["ab", "c"]`` and ``["a", "bc"]`` differ.
    """
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def load_texts(spec: str | Path | TextData, *, text_column: str | None = None, label_column: str | None = None,
               max_samples: int | None = None, seed: int = 0, split: str | None = None,
               labels: bool = True) -> TextData:
    """Resolve a data spec (see the module docstring) to :class:`TextData`.

    ``labels=False`` (callers that never use labels, e.g. comparisons): labels are neither read nor checked
    (``TextData.labels`` is None); a ``label_column`` that is named must still exist.

    Raises :class:`UserError` (one line naming the problem) for a missing file, an unknown format, a missing
    column (the message lists those available), non-UTF-8 text (line and byte named), a text that is not a
    string (a number, ``null``, a list: named with its row), a ``.jsonl`` line that is not a JSON object,
    non-integer labels, or no texts at all.
    """
    if max_samples is not None and (isinstance(max_samples, bool) or max_samples < 1):
        raise UserError(f"max_samples must be at least 1, got {max_samples}")
    check_seed(seed)
    if isinstance(spec, TextData):
        data = spec
    else:
        text = str(spec).strip()
        if not text:
            raise UserError("empty data spec; use 'sst2', a file path, or hf:NAME[:CONFIG][@SPLIT]")
        if text.lower() == "sst2" and not Path(text).exists():
            if text_column or label_column:
                raise UserError("`text_column`/`label_column` do not apply to the sst2 data set")
            data = _load_sst2(split or "validation")
        elif text.lower().startswith("hf:"):
            data = _load_hf(text, text_column=text_column, label_column=label_column, split=split, labels=labels)
        else:
            if split is not None:
                raise UserError(f"split={split!r} does not apply to a local file ({text})")
            data = _load_file(Path(text).expanduser(), text_column=text_column, label_column=label_column,
                              labels=labels)
        if not labels and data.labels is not None:
            data = dataclasses.replace(data, labels=None)
    if not data.texts:
        raise UserError(f"no texts in {data.name} ({data.n_dropped} empty dropped)")
    return subsample(data, max_samples, seed=seed)


def check_seed(seed: Any) -> int:
    """A seed is an integer in 0 .. 2**32 − 1 (what numpy's and torch's generators all accept)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise UserError(f"seed must be an integer in 0..{2**32 - 1}, got {seed!r}")
    return int(seed)


def subsample(data: TextData, max_samples: int | None, *, seed: int = 0) -> TextData:
    """A seeded random subset of ``max_samples`` texts, kept in their original order (nested across sizes).

    ``extra["supersets"]`` records, for ``data`` and each list ``data`` was itself drawn from, its fingerprint,
    size and the rows taken, plus the subset's own fingerprint, so :func:`repsim.activations.extract.extract` can
    serve the
    subset from a cached extraction of the larger list."""
    if max_samples is not None and max_samples < 1:
        raise UserError(f"max_samples must be at least 1, got {max_samples}")
    check_seed(seed)
    if max_samples is None or max_samples >= len(data.texts):
        return data
    keep = sample_rows(len(data.texts), max_samples, seed)
    texts = [data.texts[i] for i in keep]
    labels = None if data.labels is None else [data.labels[i] for i in keep]
    fingerprint = fingerprint_texts(texts)
    # where these texts sit in the larger lists they come from, so a cached extraction of those serves them
    supersets = [{"fingerprint": data.fingerprint, "n_texts": len(data.texts), "rows": keep}]
    supersets += [dict(r, rows=np.asarray(r["rows"])[keep]) for r in data.extra.get("supersets", [])]
    extra = dict(data.extra, supersets=[dict(r, subset_fingerprint=fingerprint) for r in supersets])
    return TextData(texts, labels, data.name, f"{data.source}; random {max_samples} of {len(data.texts)} (seed {seed})",
                    data.offline_fallback, fingerprint, data.n_dropped, data.split, extra)


def sample_rows(n: int, k: int, seed: int = 0) -> np.ndarray:
    """The rows ``max_samples=k`` keeps out of ``n``: the first k of a seeded permutation, sorted (so nested
    across k for one seed). Applies to texts and to saved activation rows alike."""
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])


# ------------------------------------------------------------------------------------ sst2


def _load_sst2(split: str) -> TextData:
    if split not in {"validation", "train", "test"}:
        raise UserError(f"unknown sst2 split {split!r}; use validation or train")
    reachable = not _env_flag("HF_DATASETS_OFFLINE") and hub_reachable()
    reason = "the Hugging Face hub is offline or unreachable"
    try:
        dataset = _hf_load("nyu-mll/glue", "sst2", split, offline=not reachable)
    except _HFUnavailable as exc:
        if reachable:
            reason = f"GLUE SST-2 could not be loaded ({exc})"
        if split == "test":
            raise UserError("sst2 split 'test' is only available from GLUE SST-2 (hub unreachable, and its labels "
                            "are hidden anyway); use validation or train") from exc
        return sst_like_sample(split, reason=reason)
    texts, labels, n_dropped = _clean(list(dataset["sentence"]), list(dataset["label"]))
    if split == "test":
        labels = None  # GLUE hides test labels (all -1)
    return TextData(texts, labels, f"sst2@{split}", f"GLUE SST-2 {split} (nyu-mll/glue through datasets)",
                    False, "", n_dropped, split)


def sst_like_sample(split: str = "validation", *, reason: str | None = None) -> TextData:
    """The offline SST-like sample (see module docstring): ``validation`` (872) or ``train`` (the rest)."""
    if split not in {"validation", "train"}:
        raise UserError(f"the offline SST-like sample has splits validation and train, not {split!r}")
    path = snippets_file()
    raw = path.read_bytes()
    seen: set[str] = set()
    texts: list[str] = []
    labels: list[int] = []
    for line_number, line in enumerate(_decode(raw, path).splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise UserError(f"{path}: line {line_number} is not 'id<TAB>score<TAB>text'")
        score, text = float(parts[1]), parts[2].strip()
        if abs(score) < FALLBACK_MIN_ABS_SCORE or not text or text in seen:
            continue
        seen.add(text)
        texts.append(text)
        labels.append(int(score > 0))
    order = np.random.default_rng(FALLBACK_SEED).permutation(len(texts))
    chosen = np.zeros(len(texts), dtype=bool)
    chosen[order[:SST2_VALIDATION_SIZE]] = True
    keep = np.flatnonzero(chosen if split == "validation" else ~chosen)
    source = (f"SST-like sample (offline fallback for GLUE SST-2): Rotten Tomatoes snippets with human sentiment "
              f"scores (Hutto & Gilbert 2014, vaderSentiment 3.3.2), |score| >= {FALLBACK_MIN_ABS_SCORE:g}, "
              f"label = score > 0, {split} split of {len(keep)} (fixed seed {FALLBACK_SEED})")
    why = f" because {reason}" if reason else ""
    logger.warning("sst2: using the offline SST-like sample%s (%s split, %d texts), not GLUE SST-2",
                   why, split, len(keep))
    return TextData([texts[i] for i in keep], [labels[i] for i in keep], f"sst2@{split}", source, True, "", 0,
                    split, {"reason": reason} if reason else {})


# ------------------------------------------------------------------------------------ hf:


class _HFUnavailable(Exception):
    """The data set could not be loaded through `datasets` (offline miss, unknown name, no such split)."""


def _hf_load(name: str, config: str | None, split: str | None, *, offline: bool) -> Any:
    """``datasets.load_dataset(name, config, split=split)``; with ``offline`` only the local cache is used, and a
    miss fails at once (no retries against an unreachable hub)."""
    import datasets  # noqa: PLC0415 - datasets only when a hub corpus is loaded
    import huggingface_hub.constants as hub_constants  # noqa: PLC0415 - huggingface_hub only when the hub is used

    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    if offline:
        datasets.config.HF_HUB_OFFLINE = True
        hub_constants.HF_HUB_OFFLINE = True
    previous_level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        raise _HFUnavailable(first_line(exc)) from exc
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved
        datasets.logging.set_verbosity(previous_level)


_HF_SPEC = re.compile(r"^hf:(?P<name>[^:@]+)(:(?P<config>[^@]+))?(@(?P<split>.+))?$", re.IGNORECASE)


def _load_hf(spec: str, *, text_column: str | None, label_column: str | None, split: str | None,
             labels: bool = True) -> TextData:
    match = _HF_SPEC.match(spec.strip())
    if not match:
        raise UserError(f"bad data spec {spec!r}; use hf:NAME[:CONFIG][@SPLIT]")
    name, config = match["name"].strip(), (match["config"] or "").strip() or None
    if match["split"] and split and match["split"] != split:
        raise UserError(f"{spec} names split {match['split']!r} but split={split!r} was also given")
    split = match["split"] or split
    offline = _env_flag("HF_DATASETS_OFFLINE") or not hub_reachable()
    try:
        loaded = _hf_load(name, config, split, offline=offline)
    except _HFUnavailable as exc:
        if offline:
            raise UserError(f"cannot reach the Hugging Face hub for data set {name!r} and it is not in the local "
                            f"datasets cache; use a local file (.txt/.csv/.tsv/.jsonl/.parquet) or sst2 (works "
                            f"offline)") from exc
        raise UserError(f"cannot load data set {spec!r}: {exc}") from exc
    if split is None:  # a DatasetDict: pick validation, else train, else the first split
        splits = list(loaded.keys())
        split = next((s for s in ("validation", "train") if s in splits), splits[0])
        loaded = loaded[split]
    columns = list(loaded.column_names)
    text_col = _pick_text_column(columns, text_column, spec)
    label_col = _pick_label_column(columns, label_column, spec)
    raw_labels = list(loaded[label_col]) if label_col is not None and labels else None
    texts, kept_labels, n_dropped = _clean(list(loaded[text_col]), raw_labels, where=spec, label_name=label_col)
    display = f"hf:{name}" + (f":{config}" if config else "") + f"@{split}"
    return TextData(texts, kept_labels, display, f"{display} through datasets, column {text_col!r}", False, "",
                    n_dropped, split)


# ------------------------------------------------------------------------------------ local files


def _load_file(path: Path, *, text_column: str | None, label_column: str | None, labels: bool = True) -> TextData:
    if not path.exists():
        raise UserError(f"data file not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a data file ({', '.join(FILE_FORMATS)}), sst2, or hf:NAME")
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise UserError(f"unknown data format {suffix or '(no extension)'!r} for {path}; use one of "
                        f"{', '.join(FILE_FORMATS)}")
    if suffix == ".txt":
        if text_column or label_column:
            raise UserError(f"{path.name} is plain text (one text per line): it has no columns")
        lines = _decode(path.read_bytes(), path).splitlines()
        texts, _, n_dropped = _clean(lines, None, where=str(path))
        return TextData(texts, None, path.name, f"text file {path} (one text per line)", False, "", n_dropped)
    table, row_names = _read_table(path, suffix)
    columns = list(table)
    if not columns:
        raise UserError(f"no texts in {path}: the file holds no rows")
    text_col = _pick_text_column(columns, text_column, str(path))
    label_col = _pick_label_column(columns, label_column, str(path))
    texts, kept_labels, n_dropped = _clean(table[text_col], table[label_col] if label_col and labels else None,
                                           where=str(path), label_name=label_col, text_name=text_col,
                                           row_names=row_names)
    return TextData(texts, kept_labels, path.name, f"{suffix[1:]} file {path}, column {text_col!r}", False, "",
                    n_dropped)


_MISSING = object()  # a .jsonl object without the column


def _read_table(path: Path, suffix: str) -> tuple[dict[str, list[Any]], list[str] | None]:
    """{column name: values in row order} and, for ``.jsonl``, each row's name ("line K") for messages."""
    if suffix == ".jsonl":
        return _read_jsonl(path)
    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            content = io.StringIO(_decode(path.read_bytes(), path))
            frame = pd.read_csv(content, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
    except UserError:
        raise
    except pd.errors.EmptyDataError:
        raise UserError(f"no texts in {path}: the file is empty") from None
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # the operating system's error (permissions, ...) names the file itself
        raise UserError(f"cannot read {path} as {suffix[1:]}: {first_line(exc)}") from exc
    return {str(c): frame[c].tolist() for c in frame.columns}, None


def _read_jsonl(path: Path) -> tuple[dict[str, list[Any]], list[str]]:
    """One JSON object per line (blank lines skipped); anything else is refused with its line number."""
    rows: list[dict[str, Any]] = []
    names: list[str] = []
    for number, line in enumerate(_decode(path.read_bytes(), path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: line {number} is not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}: line {number} is a JSON {_json_kind(obj)}, not an object; each line must be "
                            'an object such as {"text": "...", "label": 1}')
        rows.append(obj)
        names.append(f"line {number}")
    if not rows:
        raise UserError(f"no texts in {path}: the file holds no JSON lines")
    columns = list(dict.fromkeys(str(k) for row in rows for k in row))
    return {c: [row.get(c, _MISSING) for row in rows] for c in columns}, names


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return "number"


def _decode(raw: bytes, path: Path) -> str:
    """UTF-8 text (a leading BOM is dropped); a bad byte is reported with its line and offset."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise UserError(f"{path} is not UTF-8 text: byte 0x{raw[exc.start]:02x} at line {line} (byte offset "
                        f"{exc.start}); re-save it as UTF-8") from exc


def _pick_text_column(columns: list[str], wanted: str | None, where: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise UserError(f"no text column {wanted!r} in {where}; columns: {', '.join(columns)}")
        return wanted
    for guess in _TEXT_COLUMN_GUESSES:
        if guess in columns:
            return guess
    if len(columns) == 1:
        return columns[0]
    raise UserError(f"which column holds the text in {where}? give `text_column`; columns: {', '.join(columns)}")


def _pick_label_column(columns: list[str], wanted: str | None, where: str) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise UserError(f"no label column {wanted!r} in {where}; columns: {', '.join(columns)}")
        return wanted
    return next((guess for guess in _LABEL_COLUMN_GUESSES if guess in columns), None)


def _clean(texts: list[Any], labels: list[Any] | None, *, where: str = "", label_name: str | None = None,
           text_name: str | None = None, row_names: Sequence[str] | None = None
           ) -> tuple[list[str], list[int] | None, int]:
    """Strip texts, drop the empty ones (with their labels), and check that labels are integers.

    A text must be a string: a number, ``null``, a boolean or a list in the text column is refused with its row
    (converting it would compare models on "5" or "None", dropping it would shift the rows silently)."""
    kept_texts: list[str] = []
    kept_labels: list[int] | None = None if labels is None else []
    n_dropped = 0
    for row, value in enumerate(texts):
        if not isinstance(value, str):
            name = row_names[row] if row_names else f"row {row + 1}"
            shown = "no value" if value is _MISSING else f"{_json_kind(value)} {value!r}" if value is None or \
                isinstance(value, (bool, int, float, list)) else f"{type(value).__name__} {value!r}"
            column = f"text column {text_name!r}" if text_name else "the text column"
            raise UserError(f"{column} in {where} must hold strings; {name} has {shown}"[:300])
        text = value.strip()
        if not text:
            n_dropped += 1
            continue
        kept_texts.append(text)
        if kept_labels is not None and labels is not None:
            kept_labels.append(_as_label(labels[row], row, where, label_name, row_names))
    return kept_texts, kept_labels, n_dropped


def _as_label(value: Any, row: int, where: str, label_name: str | None,
              row_names: Sequence[str] | None = None) -> int:
    try:
        if isinstance(value, str):
            value = value.strip()
            number = int(value)
        elif isinstance(value, (bool, np.bool_)):
            number = int(value)
        else:
            as_float = float(value)
            number = int(as_float)
            if number != as_float:
                raise ValueError
    except (TypeError, ValueError, OverflowError):
        name = row_names[row] if row_names else f"row {row + 1}"
        shown = "no value" if value is _MISSING else repr(value)
        raise UserError(f"label column {label_name!r} in {where} must hold integers; {name} has {shown}") from None
    return number


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
