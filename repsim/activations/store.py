"""The on-disk activation store: one folder per entry, one memory-mapped ``.npy`` per layer, no pickle.

Entry key (docs/activations.md §3): sha256 of the model name and its resolved revision or weights hash, the tokenizer
fingerprint, the data fingerprint (hash of the texts in order) and count, pooling, max length, layer set,
compute dtype, accumulation and storage dtype, padding side and the transformers MAJOR version. The folder
is ``<cache_dir>/activations/<model-slug>-<hash20>/`` holding ``manifest.json`` (shapes, dtypes and sha256
of every array, plus provenance) and ``layer_KKK.npy`` (+ ``offsets.npy`` and ``token_ids.npy`` for
``pool="tokens"``; for ``pool="words"`` the same two files, ``token_ids.npy`` then counting the tokens
averaged into each word), read with ``np.load(mmap_mode="r", allow_pickle=False)``.

Life of an entry:

* **build**: under a :class:`filelock.FileLock` (``<key>.lock``) so two processes never write one entry: the
  second waits, then reads what the first wrote. Work happens in ``<key>.partial/``; each rank (one, or one
  per ``torch.distributed`` process) fills its own shard files chunk by chunk (``chunk_size`` texts, whole
  batches) and records completed chunks in ``progress.json`` after flushing the data. An interrupted build
  (crash, ``kill -9``) resumes from the last complete chunk; the result is bitwise equal to an uninterrupted
  run because the batches are the same. Rank 0 then assembles the layer arrays in input order, writes the
  manifest and renames the folder into place (atomic).
* **open**: the manifest is checked on every open (its own sha256, a strict schema: the arrays it lists are
  exactly those of its layers with the shapes its widths and row count give, its key fields hash to the folder
  name and equal those asked), and so are the array headers; checksums of the arrays are verified on the first
  open of an entry in each process (``verify=None``), always with ``verify=True`` or
  ``repsim cache info --verify``. A damaged entry is reported with one warning line, removed and rebuilt; it is
  never silently used. The manifest records ``built_with`` (batch size, dtypes, device, versions): values that
  the key leaves out because they change only the float32 rounding.
* **remove**: renamed aside to ``<key>.trash-<pid>-<ns>`` and deleted under the entry's lock (``rm KEY`` waits
  for a build, ``rm --all`` and ``prune`` skip locked entries); trash of dead processes is reclaimed by listings.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from repsim.activations.assets import acquire_lock, cache_dir
from repsim.activations.rows import Activations, rows_of
from repsim.moved import moved_name
from repsim.system.errors import UserError, naming_path
from repsim.system.files import sha256_file, write_json_atomic
from repsim.system.outputs import pid_alive, remove_path

FORMAT_VERSION = 1  # part of the entry key: a change of layout gives new keys
MANIFEST_FORMAT = 2  # 2: the manifest carries its own checksum and ``built_with``; older manifests are rebuilt
KEY_FIELDS = ("model", "revision", "tokenizer", "texts_sha256", "n_texts", "pool", "max_length", "layers",
              "dtype", "accumulate", "storage_dtype", "padding_side")
_VERIFIED: set[str] = set()  # entries whose checksums this process has verified


class DamagedEntry(Exception):
    """An entry whose files do not match its manifest, or whose manifest is missing, edited or malformed."""


# ---------------------------------------------------------------------------------------------- locations


def cache_root() -> Path:
    """repsim's cache folder: ``repsim.activations.assets.cache_dir()`` ($REPSIM_CACHE, $XDG_CACHE_HOME/repsim,
    ~/.cache/repsim)."""
    return Path(cache_dir())


def activations_root() -> Path:
    """``cache_root()/activations``; a UserError when the cache root (or this folder) exists as a file."""
    root = cache_root()
    for path in (root, root / "activations"):
        if path.exists() and not path.is_dir():
            source = "$REPSIM_CACHE" if os.environ.get("REPSIM_CACHE") else "the default cache location"
            raise UserError(f"the repsim cache {path} ({source}) is a file, not a folder; point REPSIM_CACHE to "
                            "a folder")
    return root / "activations"


def _slug(name: str) -> str:
    base = name.rstrip("/").split("/")[-1] or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base)[:40]


def key_fields(meta: dict) -> dict:
    import transformers  # noqa: PLC0415 - transformers only when a model is loaded

    fields = {k: meta.get(k) for k in KEY_FIELDS}
    fields["format"] = FORMAT_VERSION
    if meta.get("pool") == "words":
        fields["word_rule"] = meta.get("word_rule")
    fields["transformers_major"] = int(transformers.__version__.split(".")[0])
    return fields


def entry_key(meta: dict) -> str:
    """``<model-slug>-<first 20 hex of sha256(key fields)>``."""
    digest = hashlib.sha256(json.dumps(key_fields(meta), sort_keys=True).encode()).hexdigest()[:20]
    return f"{_slug(str(meta.get('model', 'model')))}-{digest}"


# ---------------------------------------------------------------------------------------------- small file helpers


def _new_memmap(path: Path, dtype: Any, shape: tuple[int, ...]) -> np.memmap:
    """A new ``.npy`` file opened as a writable memory map, with its blocks allocated on disk first.

    ``open_memmap`` alone makes a sparse file; writing through the map into a full disk then kills the
    process with SIGBUS. Allocating up front turns a full disk or a file size limit into an ``OSError``
    (ENOSPC / EFBIG) naming the file, before any work is spent on it."""
    with naming_path(path):
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        try:
            with open(path, "r+b") as fh:
                os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                del arr
                path.unlink(missing_ok=True)  # a partial allocation would keep the disk full
                raise
    return arr


def _read_json(path: Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


def _rmtree(path: Path) -> None:
    """Remove a folder (or a stray file or link in its place): renamed aside to ``<name>.trash-<pid>-<ns>`` first,
    so that a half-removed entry never looks like an entry; :func:`reclaim_trash` finishes what a killed removal
    left."""
    if not os.path.lexists(path):
        return
    trash = path.with_name(f"{path.name}.trash-{os.getpid()}-{time.time_ns()}")
    os.rename(path, trash)
    remove_path(trash)


def reclaim_trash(root: Path) -> int:
    """Delete the ``*.trash-<pid>-<ns>`` leftovers of removals whose process is gone; returns the bytes freed."""
    freed = 0
    with contextlib.suppress(OSError):
        for path in Path(root).iterdir():
            m = re.search(r"\.trash-(\d+)-\d+$", path.name)
            if m and (int(m.group(1)) == os.getpid() or not pid_alive(int(m.group(1)))):
                freed += _dir_size(path) if path.is_dir() else 0
                remove_path(path)
    return freed


def _dir_size(path: Path) -> int:
    """Bytes of the files under ``path``; files that vanish meanwhile (a running build) are skipped."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


# ---------------------------------------------------------------------------------------------- open / verify


def _manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own ``manifest_sha256`` field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _expected_arrays(manifest: dict) -> dict[str, tuple[list[int], str]]:
    """The array files a well-formed manifest must list, with their shapes and dtypes (from layers, widths and
    the row count: texts, tokens for ``pool="tokens"``, words for ``pool="words"``)."""
    meta = manifest["meta"]
    tokens = meta.get("pool") in ("tokens", "words")
    rows = {"tokens": meta.get("n_tokens"), "words": meta.get("n_words")}.get(meta.get("pool"), meta.get("n_texts"))
    if not (_is_int(rows) and rows >= 1 and _is_int(meta.get("n_texts"))):
        raise DamagedEntry("manifest.json: no row count (meta n_texts / n_tokens / n_words)")
    widths = manifest["widths"]
    out = {_layer_file(k): ([rows, widths[str(k)]], "float32") for k in manifest["layers"]}
    if tokens:
        out["offsets.npy"] = ([meta["n_texts"] + 1], "int64")
        out["token_ids.npy"] = ([rows], "int64")
    return out


def read_manifest(path: str | Path) -> dict:
    """The entry's manifest, checked: present, parsable, its own checksum intact, and consistent with itself
    (the array files it lists are exactly those of its layers, with the shapes its widths and row count give).
    Raises :class:`DamagedEntry` with a one-line reason otherwise."""
    f = Path(path) / "manifest.json"
    if not f.is_file():
        raise DamagedEntry("manifest.json is missing" if not os.path.lexists(f) else "manifest.json is not a file")
    try:
        manifest = _read_json(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedEntry(f"manifest.json unreadable: {exc}") from exc
    if not isinstance(manifest, dict):
        raise DamagedEntry("manifest.json is not a JSON object")
    if manifest.get("format") != MANIFEST_FORMAT or "manifest_sha256" not in manifest:
        raise DamagedEntry(f"manifest.json has format {manifest.get('format')!r}, not {MANIFEST_FORMAT} "
                           "(written by an older repsim)")
    if manifest["manifest_sha256"] != _manifest_digest(manifest):
        raise DamagedEntry("manifest.json was changed after it was written (its own checksum does not match)")
    if manifest.get("key") != Path(path).name:
        raise DamagedEntry(f"manifest.json names entry {manifest.get('key')!r}, not its folder {Path(path).name!r}")
    layers, widths, arrays = manifest.get("layers"), manifest.get("widths"), manifest.get("arrays")
    if not (isinstance(layers, list) and layers and all(_is_int(k) and k >= 0 for k in layers)
            and layers == sorted(set(layers))):
        raise DamagedEntry("manifest.json: layers is not a sorted list of layer numbers")
    if not (isinstance(widths, dict) and sorted(widths) == sorted(str(k) for k in layers)
            and all(_is_int(w) and w > 0 for w in widths.values())):
        raise DamagedEntry("manifest.json: widths do not match layers")
    if not isinstance(manifest.get("meta"), dict) or not isinstance(manifest.get("key_fields"), dict):
        raise DamagedEntry("manifest.json: meta or key_fields missing")
    fields = manifest["key_fields"]
    if not Path(path).name.endswith("-" + hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]):
        raise DamagedEntry("manifest.json: its key fields do not hash to its folder name")
    if fields.get("layers") is not None and sorted(fields["layers"]) != layers:
        raise DamagedEntry(f"manifest.json: layers {layers} are not those of its key {sorted(fields['layers'])}")
    if not isinstance(arrays, dict):
        raise DamagedEntry("manifest.json: arrays missing")
    expected = _expected_arrays(manifest)
    if sorted(arrays) != sorted(expected):
        raise DamagedEntry(f"manifest.json lists arrays {sorted(arrays)}, its layers need {sorted(expected)}")
    for name, (shape, dtype) in expected.items():
        spec = arrays[name]
        if not (isinstance(spec, dict) and spec.get("shape") == shape and spec.get("dtype") == dtype
                and isinstance(spec.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", spec["sha256"])
                and _is_int(spec.get("bytes"))):
            raise DamagedEntry(f"manifest.json: {name} should be {dtype} {shape} with a sha256 and a size, not {spec}")
    return manifest


def _load_array(path: Path, name: str, spec: dict, checksum: bool) -> np.ndarray:
    f = path / name
    if not f.is_file():
        raise DamagedEntry(f"{name}: missing" if not os.path.lexists(f) else f"{name}: not a file")
    try:
        if checksum:
            digest = sha256_file(f)
            if digest != spec["sha256"]:
                raise DamagedEntry(f"{name}: sha256 {digest[:12]}… != manifest {spec['sha256'][:12]}…")
        arr = np.load(f, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DamagedEntry(f"{name}: {exc}") from exc
    if list(arr.shape) != list(spec["shape"]) or str(arr.dtype) != spec["dtype"]:
        raise DamagedEntry(f"{name}: shape/dtype {arr.shape}/{arr.dtype} != manifest {spec['shape']}/{spec['dtype']}")
    return arr


def _size_problem(path: Path, manifest: dict) -> str | None:
    """A cheap look (no reading): every array is a plain file of the size the manifest records."""
    for name, spec in manifest["arrays"].items():
        f = path / name
        if not f.is_file():
            return f"{name}: missing" if not os.path.lexists(f) else f"{name}: not a file"
        if f.stat().st_size != spec["bytes"]:
            return f"{name}: {f.stat().st_size} bytes, manifest {spec['bytes']}"
    return None


def verify_entry(path: Path) -> list[str]:
    """Problems found in an entry (manifest missing, edited or malformed; array files missing, not plain files,
    unreadable, or with another shape, dtype or sha256 than the manifest says); empty when it is intact."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except DamagedEntry as exc:
        return [str(exc)]
    problems = []
    for name, spec in manifest["arrays"].items():
        try:
            _load_array(path, name, spec, checksum=True)
        except DamagedEntry as exc:
            problems.append(str(exc))
    return problems


def open_entry(path: Path, verify: bool | None = None, expect: dict | None = None) -> Any:
    """Open a finished entry as :class:`repsim.activations.rows.Activations` (memory-mapped, read-only).

    verify: True = check every checksum; False = manifest and array headers only; None = checksums on first
    open in this process. expect: the key fields the caller asked for (see :func:`key_fields`); the entry must
    have been built for exactly those. Raises :class:`DamagedEntry` when anything does not match.
    """

    path = Path(path)
    manifest = read_manifest(path)
    if expect is not None:
        asked = json.loads(json.dumps(expect, sort_keys=True, default=str))
        if manifest["key_fields"] != asked:
            differ = sorted(k for k in set(asked) | set(manifest["key_fields"])
                            if asked.get(k) != manifest["key_fields"].get(k))
            raise DamagedEntry(f"built for other options than asked ({', '.join(differ)})")
        if asked.get("layers") is not None and manifest["layers"] != sorted(asked["layers"]):
            raise DamagedEntry(f"holds layers {manifest['layers']}, asked {sorted(asked['layers'])}")
    if verify or (verify is None and str(path) not in _VERIFIED):
        problems = verify_entry(path)
        if problems:
            raise DamagedEntry("; ".join(problems))
        _VERIFIED.add(str(path))
    specs = manifest["arrays"]
    layers = list(manifest["layers"])
    arrays = {k: _load_array(path, _layer_file(k), specs[_layer_file(k)], checksum=False) for k in layers}
    offsets = _load_array(path, "offsets.npy", specs["offsets.npy"], False) if "offsets.npy" in specs else None
    token_ids = _load_array(path, "token_ids.npy", specs["token_ids.npy"], False) if "token_ids.npy" in specs else None
    with contextlib.suppress(OSError):
        os.utime(path)  # last use, for `repsim cache prune --older-than`
    meta = dict(manifest["meta"], key=manifest["key"], path=str(path), cache_hit=True)
    return Activations(layers, arrays, meta, offsets, token_ids, path)


def _layer_file(k: int) -> str:
    return f"layer_{k:03d}.npy"


def find_superset(meta: dict, drawn_from: Sequence[tuple[str, int, np.ndarray]] = (), verify: bool | None = None
                  ) -> tuple[Any, np.ndarray | None] | None:
    """A finished, intact entry that serves ``meta`` without a forward pass, and the rows of it to take.

    Every key field must be equal except that the entry's layers include all of ``meta["layers"]`` and its texts
    hold ``meta``'s texts: they are the same texts (rows None), or one of the larger lists ``drawn_from`` names as
    (texts_sha256, n_texts, rows) with ``meta``'s text j at row ``rows[j]``, or a list itself drawn from one of
    those (its manifest's ``meta["drawn_from"]`` marks its rows there, see :func:`rows_mask`) that contains all
    of ``rows``. Prefers the same texts, then fewer rows, then fewer layers; skips damaged entries. Returns
    (activations, rows) or None; never builds, waits or removes anything."""
    root = activations_root()
    if not root.is_dir() or meta.get("layers") is None:
        return None
    fixed = {k: v for k, v in key_fields(meta).items() if k not in ("layers", "texts_sha256", "n_texts")}
    own = (meta["texts_sha256"], int(meta["n_texts"]))
    parents = {(str(fp), int(n)): np.asarray(rows, dtype=np.int64) for fp, n, rows in drawn_from}
    wanted = set(meta["layers"])
    found = []
    for path in root.iterdir():
        if not path.is_dir() or path.name.endswith(".partial") or ".trash-" in path.name:
            continue
        try:
            manifest = _read_json(path / "manifest.json")
            fields = manifest["key_fields"]
            texts = (fields["texts_sha256"], int(fields["n_texts"]))
            layers = set(fields["layers"])
            marks = [((d["fingerprint"], int(d["n_texts"])), d["rows_mask"]) for d in
                     manifest["meta"].get("drawn_from") or []]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if not wanted <= layers or any(fields.get(k) != v for k, v in fixed.items()):
            continue
        rows: np.ndarray | None = None
        if texts == own:
            found.append((0, texts[1], len(layers), path.name, path, None))
            continue
        if texts in parents:
            rows = parents[texts]
        for parent, mask_hex in marks:
            if rows is None and parent in parents:
                mask = _unmask(mask_hex, parent[1])
                if int(mask.sum()) == texts[1] and mask[parents[parent]].all():
                    rows = (np.cumsum(mask) - 1)[parents[parent]]
        if rows is not None:
            found.append((1, texts[1], len(layers), path.name, path, rows))
    for *_, path, rows in sorted(found, key=lambda f: f[:4]):
        try:
            return open_entry(path, verify), rows
        except DamagedEntry:
            continue
    return None


def rows_mask(rows: np.ndarray, n: int) -> str:
    """Rows of a list of ``n`` texts as a hex bit mask (bit i set = text i kept; ``n / 4`` characters)."""
    mask = np.zeros(n, dtype=bool)
    mask[np.asarray(rows, dtype=np.int64)] = True
    return np.packbits(mask).tobytes().hex()


def _unmask(mask_hex: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(mask_hex), dtype=np.uint8))[:n].astype(bool)


# ---------------------------------------------------------------------------------------------- build


def _chunks(batches: Sequence[np.ndarray], texts_per_chunk: int) -> list[list[int]]:
    """Group consecutive batch numbers into chunks of about ``texts_per_chunk`` texts (whole batches)."""
    out: list[list[int]] = []
    cur: list[int] = []
    count = 0
    for j, b in enumerate(batches):
        cur.append(j)
        count += len(b)
        if count >= texts_per_chunk:
            out.append(cur)
            cur, count = [], 0
    if cur:
        out.append(cur)
    return out


def _batch_rows(idx: np.ndarray, lengths: np.ndarray, tokens: bool) -> int:
    return int(lengths[idx].sum()) if tokens else len(idx)


def _build_shard(partial: Path, rank: int, world: int, texts: Sequence[str], lengths: np.ndarray, make_runner: Any,
                 batches: Sequence[np.ndarray], *, chunk_size: int, progress: bool,
                 on_batch: Callable[[int], None] | None, desc: str) -> int:
    """Extract this rank's batches into ``partial/shard-RRR``, resuming after its last complete chunk.

    Returns the number of chunks that were already done (resumed)."""
    runner = make_runner()
    tokens = runner.pool in ("tokens", "words")  # several rows per text: offsets + one int64 per row
    shard = partial / f"shard-{rank:03d}"
    shard.mkdir(exist_ok=True)
    mine = list(batches[rank::world])
    chunks = _chunks(mine, max(1, int(chunk_size)))
    total_rows = sum(_batch_rows(b, lengths, tokens) for b in mine)
    prog_path = shard / "progress.json"
    arrays: dict[int, np.ndarray] = {}
    token_ids: np.ndarray | None = None
    try:
        prog = _read_json(prog_path) if os.path.lexists(prog_path) else {"chunks_done": 0, "rows_done": 0,
                                                                          "widths": None}
        if prog["widths"] is not None:
            for k, w in prog["widths"].items():
                arrays[int(k)] = np.lib.format.open_memmap(shard / _layer_file(int(k)), mode="r+")
                if arrays[int(k)].shape != (total_rows, w):
                    raise DamagedEntry(f"shard file {_layer_file(int(k))} has the wrong shape")
            if tokens:
                token_ids = np.lib.format.open_memmap(shard / "token_ids.npy", mode="r+")
        resumed = int(prog["chunks_done"])
        cursor = int(prog["rows_done"])
        if not 0 <= resumed <= len(chunks):
            raise DamagedEntry(f"progress.json counts {resumed} of {len(chunks)} chunks")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DamagedEntry(f"shard {rank}: {type(exc).__name__}: {exc}") from exc
    if prog["widths"] is not None:
        runner.layers = [int(k) for k in prog["widths"]]
    todo = [j for c in chunks[resumed:] for j in c]
    chunk_end = {c[-1]: i + 1 for i, c in enumerate(chunks)}
    done_texts = sum(len(mine[j]) for c in chunks[:resumed] for j in c)
    for pos, _idx, feats, tok_ids in runner.run_batches(texts, [mine[j] for j in todo], progress=progress,
                                                 desc=desc, on_batch=on_batch, done=done_texts):
        j = todo[pos]
        if not arrays:
            try:
                for k, v in feats.items():
                    arrays[k] = _new_memmap(shard / _layer_file(k), np.float32, (total_rows, v.shape[1]))
                if tokens:
                    token_ids = _new_memmap(shard / "token_ids.npy", np.int64, (total_rows,))
            except OSError:  # nothing is done yet: give the space back
                arrays.clear()
                for f in shard.glob("*.npy"):
                    f.unlink(missing_ok=True)
                raise
            prog["widths"] = {str(k): int(v.shape[1]) for k, v in feats.items()}
        rows = next(iter(feats.values())).shape[0]
        for k, v in feats.items():
            arrays[k][cursor:cursor + rows] = v
        if token_ids is not None:
            token_ids[cursor:cursor + rows] = tok_ids
        cursor += rows
        if j in chunk_end:
            for a in arrays.values():
                a.flush()
            if token_ids is not None:
                token_ids.flush()
            prog["chunks_done"], prog["rows_done"] = chunk_end[j], cursor
            write_json_atomic(prog_path, prog)
    for a in list(arrays.values()) + ([token_ids] if token_ids is not None else []):
        del a
    if not mine:
        return 0
    if prog["chunks_done"] != len(chunks):
        raise RuntimeError(f"shard {rank}: {prog['chunks_done']} of {len(chunks)} chunks done")
    return resumed


def _finalise(partial: Path, key: str, meta: dict, world: int, lengths: np.ndarray,
              batches: Sequence[np.ndarray], tokens: bool) -> None:
    """Assemble the shards into per-layer arrays in input order, hash them, write the manifest."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64) if tokens else None
    n_rows = int(offsets[-1]) if tokens else len(lengths)
    widths: dict[int, int] | None = None
    shards = []
    for r in range(world):
        if not list(batches[r::world]):
            continue  # more ranks than batches: this rank had nothing to do
        prog = _read_json(partial / f"shard-{r:03d}" / "progress.json")
        shards.append((r, list(batches[r::world])))
        w = {int(k): int(v) for k, v in prog["widths"].items()}
        if widths is not None and w != widths:
            raise RuntimeError(f"shard {r} has layer widths {w}, expected {widths}")
        widths = w
    assert widths is not None
    names = [_layer_file(k) for k in sorted(widths)] + (["token_ids.npy"] if tokens else [])
    try:
        _assemble(partial, names, shards, widths, n_rows, offsets)
    except OSError:  # the shards stay (a rerun assembles again); the half-made layer files would hold the space
        for name in names:
            (partial / name).unlink(missing_ok=True)
        raise
    if tokens:
        with naming_path(partial / "offsets.npy"):
            np.save(partial / "offsets.npy", offsets, allow_pickle=False)
        names.append("offsets.npy")
    arrays = {}
    for name in names:
        arr = np.load(partial / name, mmap_mode="r", allow_pickle=False)
        arrays[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "sha256": sha256_file(partial / name),
                        "bytes": (partial / name).stat().st_size}
        del arr
    for r in range(world):
        shutil.rmtree(partial / f"shard-{r:03d}", ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(partial / "plan.json")
    manifest = {"format": MANIFEST_FORMAT, "key": key, "key_fields": key_fields(meta),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "layers": sorted(widths),
                "widths": {str(k): v for k, v in sorted(widths.items())}, "arrays": arrays,
                "built_with": meta.get("built_with"), "meta": dict(meta, layers=sorted(widths), world_size=world)}
    manifest = json.loads(json.dumps(manifest, sort_keys=True, default=str))  # the digest is of what is read back
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    write_json_atomic(partial / "manifest.json", manifest)


def _assemble(partial: Path, names: Sequence[str], shards: Sequence[tuple[int, list[np.ndarray]]],
              widths: dict[int, int], n_rows: int, offsets: np.ndarray | None) -> None:
    """Write each layer's array (and token ids) in input order from the ranks' shard files."""

    for name in names:
        if name == "token_ids.npy":
            final = _new_memmap(partial / name, np.int64, (n_rows,))
        else:
            final = _new_memmap(partial / name, np.float32, (n_rows, widths[int(name[6:9])]))
        for r, mine in shards:
            src = np.load(partial / f"shard-{r:03d}" / name, mmap_mode="r", allow_pickle=False)
            cursor = 0
            for idx in mine:
                dest = rows_of(idx, offsets)
                final[dest] = src[cursor:cursor + len(dest)]
                cursor += len(dest)
            del src
        final.flush()
        del final


def _plan_record(meta: dict, world: int, chunk_size: int) -> dict:
    return {"key_fields": key_fields(meta), "world_size": world, "batch_size": meta["batch_size"],
            "sort_by_length": meta["sort_by_length"], "chunk_size": int(chunk_size)}


def _prepare_partial(partial: Path, plan: dict) -> None:
    """Keep a partial build only if it was made with the same plan (same batches and chunks)."""
    if partial.exists():
        try:
            same = _read_json(partial / "plan.json") == json.loads(json.dumps(plan, default=str))
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:
            _rmtree(partial)
    if not partial.exists():
        partial.mkdir(parents=True)
        write_json_atomic(partial / "plan.json", plan)


def _try_open(entry: Path, verify: bool | None, expect: dict) -> tuple[Any, str | None]:
    """(activations or None, damage report or None); (None, None) when there is no entry at all."""
    if not os.path.lexists(entry):
        return None, None
    if not entry.is_dir():
        return None, "not a folder"
    try:
        return open_entry(entry, verify, expect), None
    except DamagedEntry as exc:
        return None, str(exc)


def lookup(meta: dict, verify: bool | None = None) -> Any:
    """The finished, intact entry for ``meta`` if the store has one, else None (never builds or waits)."""
    entry = activations_root() / entry_key(meta)
    acts, _ = _try_open(entry, verify, key_fields(meta))
    return acts


def get_or_build(meta: dict, texts: Sequence[str], lengths: np.ndarray, make_runner: Callable[[], Any],
                 batches: Sequence[np.ndarray],
                 *, progress: bool = True, chunk_size: int = 1024, verify: bool | None = None,
                 on_batch: Callable[[int], None] | None = None) -> Any:
    """Return the entry for ``meta`` from the store, building (or resuming, or rebuilding) it when needed.

    Anything at the entry's place that cannot be served for ``meta`` (damaged files or manifest, other options,
    other layers, a stray file) is reported in one warning line, removed and rebuilt."""
    import torch  # noqa: PLC0415 - a build runs a model: torch is loaded by then; listing the cache never needs it

    from repsim.system.devices import dist_info  # noqa: PLC0415 - the same

    rank, world = dist_info()
    key = entry_key(meta)
    expect = key_fields(meta)
    root = activations_root()
    root.mkdir(parents=True, exist_ok=True)
    entry, partial = root / key, root / f"{key}.partial"
    lock = FileLock(str(root / f"{key}.lock"))
    desc = f"extract {_slug(str(meta['model']))}"
    t0 = time.perf_counter()

    def finish(acts: Any, **extra: Any) -> Any:
        acts.meta.update(extra)
        acts.meta.setdefault("timings", {})
        acts.meta["timings"] = dict(acts.meta["timings"], store_s=time.perf_counter() - t0)
        return acts

    status = "miss"
    if rank == 0:
        acts, _ = _try_open(entry, verify, expect)  # without the lock: a damage seen here may be a removal
        if acts is not None and world == 1:
            return finish(acts, resumed_chunks=0, waited=False)
        status = "hit" if acts is not None else "miss"
        if status == "miss":
            acquire_lock(lock, f"the activation cache entry {key}, which another process is building")
            acts, damage = _try_open(entry, verify, expect)
            if acts is not None:
                status = "hit"
                lock.release()
                if world == 1:
                    return finish(acts, resumed_chunks=0, waited=True)
            else:
                if damage:
                    warnings.warn(f"activation cache entry {key} is damaged ({damage}); rebuilding it",
                                  stacklevel=3)
                _rmtree(entry)  # whatever is in the entry's place goes before the build (we hold the lock)
                _prepare_partial(partial, _plan_record(meta, world, chunk_size))
    if world > 1:
        box = [status]
        torch.distributed.broadcast_object_list(box, src=0)
        status = box[0]
        if status == "hit":
            return finish(open_entry(entry, verify, expect), resumed_chunks=0, waited=False)
    acts = None
    try:
        t1 = time.perf_counter()
        runner_box: list[Any] = []

        def runner_factory() -> Any:
            if not runner_box:
                runner_box.append(make_runner())
            return runner_box[0]

        def build_shard() -> int:
            return _build_shard(partial, rank, world, texts, lengths, runner_factory, batches, chunk_size=chunk_size,
                                progress=progress and rank == 0, on_batch=on_batch, desc=desc)

        try:
            resumed = build_shard()
        except DamagedEntry as exc:
            if world > 1:
                raise
            warnings.warn(f"unfinished build {partial.name} is damaged ({exc}); starting it over", stacklevel=3)
            _rmtree(partial)
            _prepare_partial(partial, _plan_record(meta, world, chunk_size))
            resumed = build_shard()
        runner = runner_box[0]
        forward_s = time.perf_counter() - t1
        if world > 1:
            resumed_box = [None] * world
            torch.distributed.all_gather_object(resumed_box, resumed)
            resumed = sum(resumed_box)
        if rank == 0:
            full_meta = dict(meta, layers=runner.layers, timings={"forward_s": forward_s})
            _finalise(partial, key, full_meta, world, lengths, batches, runner.pool in ("tokens", "words"))
            _rmtree(entry)
            os.rename(partial, entry)
            _VERIFIED.add(str(entry))
            acts = open_entry(entry, verify=False)  # mapped before the lock goes: a removal cannot race it
    finally:
        if rank == 0 and lock.is_locked:
            lock.release()
    if world > 1:
        torch.distributed.barrier()
    if acts is None:
        acts = open_entry(entry, verify=verify)
    return finish(acts, cache_hit=False, resumed_chunks=resumed, waited=False)


# ---------------------------------------------------------------------------------------------- management


@dataclass
class EntryInfo:
    key: str
    path: Path
    model: str
    data: str
    pool: str
    n_texts: int
    layers: list[int]
    size_bytes: int
    created: str
    last_used: float
    complete: bool = True
    problem: str | None = None  # why the manifest cannot be read, for a damaged entry

    def row(self) -> str:
        age_h = max(0.0, time.time() - self.last_used) / 3600  # an mtime in the future (clock skew) reads as now
        state = "" if self.complete else "  (unfinished)"
        if self.problem:
            state = f"  (damaged: {self.problem}; rebuilt on next use)"
        return (f"{self.key:<62} {self.model[-40:]:<40} {self.pool:<6} n={self.n_texts:<7} "
                f"L={len(self.layers):<3} {human_size(self.size_bytes):>9}  used {age_h:6.1f} h ago{state}")


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def parse_size(text: str) -> int:
    """'500MB', '2G', '1.5 GB', '1000' (bytes) -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not m:
        raise UserError(f"bad size {text!r}; use e.g. 500MB or 2GB")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def _base_key(name: str) -> str:
    return name[:-len(".partial")] if name.endswith(".partial") else name


class Store:
    """The activation cache folder: list, inspect, verify, remove and prune entries.

    Removal takes the entry's lock: ``rm KEY`` waits for a running build of that entry (and says so after a
    few seconds); ``rm --all`` and ``prune`` skip entries whose lock is held and report them in ``skipped``.
    Every listing first deletes what killed removals left (``*.trash-*`` of processes that are gone)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else activations_root()
        self.skipped: list[str] = []  # keys the last rm_all/prune left alone because a build holds their lock
        self.reclaimed = 0  # bytes of interrupted removals deleted by the last listing

    def entries(self, include_partial: bool = False) -> list[EntryInfo]:
        if not self.root.is_dir():
            return []
        self.reclaimed = reclaim_trash(self.root)
        out = []
        for path in sorted(self.root.iterdir()):
            if not path.is_dir() or ".trash-" in path.name:
                continue
            complete = not path.name.endswith(".partial")
            if not complete and not include_partial:
                continue
            manifest, problem = {}, None
            if complete:
                try:
                    manifest = read_manifest(path)
                    problem = _size_problem(path, manifest)
                except DamagedEntry as exc:
                    problem = str(exc)
            meta = manifest.get("meta", {})
            try:
                last_used = path.stat().st_mtime
            except OSError:
                continue  # removed or renamed meanwhile (a build finishing, another removal)
            out.append(EntryInfo(
                key=path.name, path=path, model=str(meta.get("model", "?")), data=str(meta.get("data", "?")),
                pool=str(meta.get("pool", "?")), n_texts=int(meta.get("n_texts", 0)),
                layers=list(manifest.get("layers", [])), size_bytes=_dir_size(path),
                created=str(manifest.get("created", "?")), last_used=last_used, complete=complete,
                problem=problem))
        return out

    def find(self, key: str) -> Path:
        """Entry folder for a key or a unique key prefix."""
        if not key.strip():
            raise UserError("empty cache key; give a key or a unique prefix from `repsim cache list`")
        if not self.root.is_dir():
            raise UserError(f"the activation cache {self.root} is empty")
        matches = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(key) and ".trash-" not in
                   p.name and not p.name.endswith(".partial")]
        exact = [p for p in matches if p.name == key]
        if exact:
            return exact[0]
        if len(matches) != 1:
            raise UserError(f"{'no' if not matches else 'more than one'} cache entry matches {key!r}; "
                            "see `repsim cache list`")
        return matches[0]

    def info(self, key: str, verify: bool = False) -> dict:
        """The entry's manifest plus key, path and size; with ``verify`` (or when the manifest itself is damaged)
        also ``verified`` and ``problems``."""
        path = self.find(key)
        out: dict[str, Any] = {"key": path.name, "path": str(path), "size_bytes": _dir_size(path)}
        try:
            out.update(read_manifest(path))
        except DamagedEntry as exc:
            return dict(out, verified=False, problems=[str(exc)])
        if verify:
            problems = verify_entry(path)
            out["verified"] = not problems
            out["problems"] = problems
        return out

    def _lock(self, name: str) -> FileLock:
        return FileLock(str(self.root / f"{_base_key(name)}.lock"))

    def rm(self, key: str) -> Path:
        """Remove one entry, waiting for a build that holds its lock."""

        path = self.find(key)
        lock = self._lock(path.name)
        acquire_lock(lock, f"the build of {path.name} to finish before removing it")
        try:
            _rmtree(path)
        finally:
            lock.release()  # the lock file stays: deleting it would let two processes lock "the same" file
        return path

    def _remove_unless_locked(self, e: EntryInfo) -> bool:
        try:
            with self._lock(e.key).acquire(timeout=0):
                _rmtree(e.path)
            return True
        except Timeout:
            self.skipped.append(e.key)
            return False

    def rm_all(self) -> list[EntryInfo]:
        """Remove every entry and unfinished build that no running build holds; those are listed in
        ``skipped``."""
        self.skipped = []
        return [e for e in self.entries(include_partial=True) if self._remove_unless_locked(e)]

    def prune(self, older_than_days: float | None = None, max_size: int | None = None,
              dry_run: bool = False) -> list[EntryInfo]:
        """Remove entries not used for ``older_than_days`` days, then least recently used entries until the
        store is at most ``max_size`` bytes; abandoned unfinished builds (not locked) count as entries too.
        Entries whose lock a running build holds are left alone and listed in ``skipped``."""
        if older_than_days is not None and not older_than_days >= 0:
            raise UserError(f"`older_than_days` must be a number of days ≥ 0, got {older_than_days}")
        if max_size is not None and max_size < 0:
            raise UserError(f"`max_size` must be ≥ 0, got {max_size}")
        self.skipped = []
        entries = sorted(self.entries(include_partial=True), key=lambda e: e.last_used)
        removed: list[EntryInfo] = []
        now = time.time()
        keep = []
        for e in entries:
            if older_than_days is not None and now - e.last_used > older_than_days * 86400:
                removed.append(e)
            else:
                keep.append(e)
        if max_size is not None:
            total = sum(e.size_bytes for e in keep)
            while keep and total > max_size:
                e = keep.pop(0)
                removed.append(e)
                total -= e.size_bytes
        if dry_run:
            return removed
        return [e for e in removed if self._remove_unless_locked(e)]

    def total_size(self) -> int:
        return sum(e.size_bytes for e in self.entries(include_partial=True))


__all__ = ["Store", "EntryInfo", "DamagedEntry", "entry_key", "open_entry", "verify_entry", "read_manifest",
           "get_or_build", "lookup", "reclaim_trash", "cache_root", "activations_root", "human_size", "parse_size"]


def __getattr__(name: str):  # noqa: ANN202
    """Names that moved to the plumbing's one home still resolve, with a DeprecationWarning (repsim/moved.py)."""
    return moved_name(__name__, name)
