"""The on-disk activation store: one folder per entry, one memory-mapped ``.npy`` per layer, no pickle.

Entry key (docs/activations.md §3): sha256 of the model name and its resolved revision or weights hash, the tokenizer
fingerprint, the data fingerprint (hash of the texts in order) and count, pooling, max length, layer set,
compute dtype, accumulation and storage dtype, padding side and the transformers MAJOR version. The folder
is ``<cache_dir>/activations/<model-slug>-<hash20>/`` holding ``manifest.json`` (shapes, dtypes and sha256
of every array, plus provenance) and ``layer_KKK.npy`` (+ ``offsets.npy`` and ``token_ids.npy`` for
``pool="tokens"``), read with ``np.load(mmap_mode="r", allow_pickle=False)``.

Life of an entry:

* **build**: under a :class:`filelock.FileLock` (``<key>.lock``) so two processes never write one entry: the
  second waits, then reads what the first wrote. Work happens in ``<key>.partial/``; each rank (one, or one
  per ``torch.distributed`` process) fills its own shard files chunk by chunk (``chunk_size`` texts, whole
  batches) and records completed chunks in ``progress.json`` after flushing the data. An interrupted build
  (crash, ``kill -9``) resumes from the last complete chunk; the result is bitwise equal to an uninterrupted
  run because the batches are the same. Rank 0 then assembles the layer arrays in input order, writes the
  manifest and renames the folder into place (atomic).
* **open**: shapes and dtypes are always checked against the manifest; checksums are verified on the first
  open of an entry in each process (``verify=None``), always with ``verify=True`` or
  ``repsim cache info --verify``. Hashing runs at disk speed (~1 GB/s), cheap next to extraction.
  A damaged entry is reported with a warning, removed and rebuilt; it is never silently used.
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

from repsim.errors import UserError, naming_path

FORMAT_VERSION = 1
KEY_FIELDS = ("model", "revision", "tokenizer", "texts_sha256", "n_texts", "pool", "max_length", "layers",
              "dtype", "accumulate", "storage_dtype", "padding_side")
_VERIFIED: set[str] = set()  # entries whose checksums this process has verified


class DamagedEntry(Exception):
    """An entry whose files do not match its manifest."""


# ---------------------------------------------------------------------------------------------- locations


def cache_root() -> Path:
    """repsim's cache folder: ``repsim.assets.cache_dir()`` ($REPSIM_CACHE, $XDG_CACHE_HOME/repsim, ~/.cache/repsim)."""
    try:
        from repsim.assets import cache_dir  # noqa: PLC0415

        return Path(cache_dir())
    except ImportError:
        if os.environ.get("REPSIM_CACHE"):
            return Path(os.environ["REPSIM_CACHE"])
        if os.environ.get("XDG_CACHE_HOME"):
            return Path(os.environ["XDG_CACHE_HOME"]) / "repsim"
        return Path.home() / ".cache" / "repsim"


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
    import transformers  # noqa: PLC0415

    fields = {k: meta.get(k) for k in KEY_FIELDS}
    fields["format"] = FORMAT_VERSION
    fields["transformers_major"] = int(transformers.__version__.split(".")[0])
    return fields


def entry_key(meta: dict) -> str:
    """``<model-slug>-<first 20 hex of sha256(key fields)>``."""
    digest = hashlib.sha256(json.dumps(key_fields(meta), sort_keys=True).encode()).hexdigest()[:20]
    return f"{_slug(str(meta.get('model', 'model')))}-{digest}"


# ---------------------------------------------------------------------------------------------- small file helpers


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with naming_path(tmp), open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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
    """Remove a folder: renamed aside first so that a half-removed entry never looks like an entry."""
    if not path.exists():
        return
    trash = path.with_name(f"{path.name}.trash-{os.getpid()}-{time.time_ns()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- open / verify


def verify_entry(path: Path) -> list[str]:
    """Problems found in an entry (missing files, shape/dtype/sha256 mismatches); empty when it is intact."""
    path = Path(path)
    try:
        manifest = _read_json(path / "manifest.json")
    except (OSError, json.JSONDecodeError) as exc:
        return [f"manifest.json unreadable: {exc}"]
    problems = []
    for name, spec in manifest.get("arrays", {}).items():
        f = path / name
        if not f.is_file():
            problems.append(f"{name}: missing")
            continue
        digest = _sha256_file(f)
        if digest != spec["sha256"]:
            problems.append(f"{name}: sha256 {digest[:12]}… != manifest {spec['sha256'][:12]}…")
    return problems


def open_entry(path: Path, verify: bool | None = None) -> Any:
    """Open a finished entry as :class:`repsim.extract.Activations` (memory-mapped, read-only).

    verify: True = check every checksum; False = shapes only; None = checksums on first open in this process.
    Raises :class:`DamagedEntry` when anything does not match the manifest.
    """
    from repsim.extract import Activations  # noqa: PLC0415

    path = Path(path)
    try:
        manifest = _read_json(path / "manifest.json")
    except (OSError, json.JSONDecodeError) as exc:
        raise DamagedEntry(f"manifest.json unreadable: {exc}") from exc
    if verify or (verify is None and str(path) not in _VERIFIED):
        problems = verify_entry(path)
        if problems:
            raise DamagedEntry("; ".join(problems))
        _VERIFIED.add(str(path))
    arrays_spec = manifest["arrays"]

    def load(name: str) -> np.ndarray:
        try:
            arr = np.load(path / name, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DamagedEntry(f"{name}: {exc}") from exc
        spec = arrays_spec[name]
        if list(arr.shape) != list(spec["shape"]) or str(arr.dtype) != spec["dtype"]:
            raise DamagedEntry(f"{name}: shape/dtype {arr.shape}/{arr.dtype} != manifest {spec['shape']}/"
                               f"{spec['dtype']}")
        return arr

    layers = [int(k) for k in manifest["layers"]]
    arrays = {k: load(_layer_file(k)) for k in layers}
    offsets = load("offsets.npy") if "offsets.npy" in arrays_spec else None
    token_ids = load("token_ids.npy") if "token_ids.npy" in arrays_spec else None
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
    from repsim.extract import run_batches  # noqa: PLC0415

    runner = make_runner()
    tokens = runner.pool == "tokens"
    shard = partial / f"shard-{rank:03d}"
    shard.mkdir(exist_ok=True)
    mine = list(batches[rank::world])
    chunks = _chunks(mine, max(1, int(chunk_size)))
    total_rows = sum(_batch_rows(b, lengths, tokens) for b in mine)
    prog_path = shard / "progress.json"
    prog = _read_json(prog_path) if prog_path.is_file() else {"chunks_done": 0, "rows_done": 0, "widths": None}
    arrays: dict[int, np.ndarray] = {}
    token_ids: np.ndarray | None = None
    if prog["widths"] is not None:
        runner.layers = [int(k) for k in prog["widths"]]
        for k, w in prog["widths"].items():
            arrays[int(k)] = np.lib.format.open_memmap(shard / _layer_file(int(k)), mode="r+")
            if arrays[int(k)].shape != (total_rows, w):
                raise DamagedEntry(f"shard file {_layer_file(int(k))} has the wrong shape")
        if tokens:
            token_ids = np.lib.format.open_memmap(shard / "token_ids.npy", mode="r+")
    resumed = int(prog["chunks_done"])
    cursor = int(prog["rows_done"])
    todo = [j for c in chunks[resumed:] for j in c]
    chunk_end = {c[-1]: i + 1 for i, c in enumerate(chunks)}
    done_texts = sum(len(mine[j]) for c in chunks[:resumed] for j in c)
    for pos, _idx, feats, tok_ids in run_batches(runner, texts, [mine[j] for j in todo], progress=progress,
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
            _write_json_atomic(prog_path, prog)
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
        arrays[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "sha256": _sha256_file(partial / name)}
        del arr
    for r in range(world):
        shutil.rmtree(partial / f"shard-{r:03d}", ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(partial / "plan.json")
    manifest = {"format": FORMAT_VERSION, "key": key, "key_fields": key_fields(meta),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "layers": sorted(widths),
                "widths": {str(k): v for k, v in sorted(widths.items())}, "arrays": arrays,
                "meta": dict(meta, layers=sorted(widths), world_size=world)}
    _write_json_atomic(partial / "manifest.json", manifest)


def _assemble(partial: Path, names: Sequence[str], shards: Sequence[tuple[int, list[np.ndarray]]],
              widths: dict[int, int], n_rows: int, offsets: np.ndarray | None) -> None:
    """Write each layer's array (and token ids) in input order from the ranks' shard files."""
    from repsim.extract import _rows_of  # noqa: PLC0415

    for name in names:
        if name == "token_ids.npy":
            final = _new_memmap(partial / name, np.int64, (n_rows,))
        else:
            final = _new_memmap(partial / name, np.float32, (n_rows, widths[int(name[6:9])]))
        for r, mine in shards:
            src = np.load(partial / f"shard-{r:03d}" / name, mmap_mode="r", allow_pickle=False)
            cursor = 0
            for idx in mine:
                dest = _rows_of(idx, offsets)
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
        _write_json_atomic(partial / "plan.json", plan)


def _try_open(entry: Path, verify: bool | None) -> tuple[Any, str | None]:
    """(activations or None, damage report or None)."""
    if not (entry / "manifest.json").is_file():
        return None, None
    try:
        return open_entry(entry, verify), None
    except DamagedEntry as exc:
        return None, str(exc)


def lookup(meta: dict, verify: bool | None = None) -> Any:
    """The finished, intact entry for ``meta`` if the store has one, else None (never builds or waits)."""
    entry = activations_root() / entry_key(meta)
    acts, _ = _try_open(entry, verify)
    return acts


def get_or_build(meta: dict, texts: Sequence[str], lengths: np.ndarray, make_runner: Callable[[], Any],
                 batches: Sequence[np.ndarray],
                 *, progress: bool = True, chunk_size: int = 1024, verify: bool | None = None,
                 on_batch: Callable[[int], None] | None = None) -> Any:
    """Return the entry for ``meta`` from the store, building (or resuming, or rebuilding) it when needed."""
    import torch  # noqa: PLC0415

    from repsim.extract import dist_info  # noqa: PLC0415

    rank, world = dist_info()
    key = entry_key(meta)
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
        acts, damage = _try_open(entry, verify)
        if acts is not None and world == 1:
            return finish(acts, resumed_chunks=0, waited=False)
        status = "hit" if acts is not None else "miss"
        if status == "miss":
            lock.acquire()
            acts, damage2 = _try_open(entry, verify)
            damage = damage or damage2
            if acts is not None:
                status = "hit"
                lock.release()
                if world == 1:
                    return finish(acts, resumed_chunks=0, waited=True)
            elif damage:
                warnings.warn(f"activation cache entry {key} is damaged ({damage}); rebuilding it", stacklevel=3)
                _rmtree(entry)
            if status == "miss":
                _prepare_partial(partial, _plan_record(meta, world, chunk_size))
    if world > 1:
        box = [status]
        torch.distributed.broadcast_object_list(box, src=0)
        status = box[0]
        if status == "hit":
            return finish(open_entry(entry, verify), resumed_chunks=0, waited=False)
    try:
        t1 = time.perf_counter()
        runner_box: list[Any] = []

        def runner_factory() -> Any:
            runner_box.append(make_runner())
            return runner_box[0]

        resumed = _build_shard(partial, rank, world, texts, lengths, runner_factory, batches, chunk_size=chunk_size,
                               progress=progress and rank == 0, on_batch=on_batch, desc=desc)
        runner = runner_box[0]
        forward_s = time.perf_counter() - t1
        if world > 1:
            resumed_box = [None] * world
            torch.distributed.all_gather_object(resumed_box, resumed)
            resumed = sum(resumed_box)
        if rank == 0:
            full_meta = dict(meta, layers=runner.layers, timings={"forward_s": forward_s})
            _finalise(partial, key, full_meta, world, lengths, batches, runner.pool == "tokens")
            os.rename(partial, entry)
            _VERIFIED.add(str(entry))
    finally:
        if rank == 0 and lock.is_locked:
            lock.release()
    if world > 1:
        torch.distributed.barrier()
    return finish(open_entry(entry, verify=False if rank == 0 else verify), cache_hit=False,
                  resumed_chunks=resumed, waited=False)


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

    def row(self) -> str:
        age_h = (time.time() - self.last_used) / 3600
        state = "" if self.complete else "  (unfinished)"
        return (f"{self.key:<62} {self.model[-40:]:<40} {self.pool:<6} n={self.n_texts:<7} "
                f"L={len(self.layers):<3} {_human(self.size_bytes):>9}  used {age_h:6.1f} h ago{state}")


def _human(n: float) -> str:
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


class Store:
    """The activation cache folder: list, inspect, verify, remove and prune entries."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else activations_root()

    def entries(self, include_partial: bool = False) -> list[EntryInfo]:
        if not self.root.is_dir():
            return []
        out = []
        for path in sorted(self.root.iterdir()):
            if not path.is_dir() or ".trash-" in path.name:
                continue
            complete = not path.name.endswith(".partial")
            if not complete and not include_partial:
                continue
            try:
                manifest = _read_json(path / "manifest.json") if complete else {}
            except (OSError, json.JSONDecodeError):
                manifest = {}
            meta = manifest.get("meta", {})
            out.append(EntryInfo(
                key=path.name, path=path, model=str(meta.get("model", "?")), data=str(meta.get("data", "?")),
                pool=str(meta.get("pool", "?")), n_texts=int(meta.get("n_texts", 0)),
                layers=list(manifest.get("layers", [])), size_bytes=_dir_size(path),
                created=str(manifest.get("created", "?")), last_used=path.stat().st_mtime, complete=complete))
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
        path = self.find(key)
        manifest = _read_json(path / "manifest.json")
        out = {"key": path.name, "path": str(path), "size_bytes": _dir_size(path), **manifest}
        if verify:
            problems = verify_entry(path)
            out["verified"] = not problems
            out["problems"] = problems
        return out

    def rm(self, key: str) -> Path:
        path = self.find(key)
        with FileLock(str(self.root / f"{path.name}.lock")):
            _rmtree(path)
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.root / f"{path.name}.lock")
        return path

    def prune(self, older_than_days: float | None = None, max_size: int | None = None,
              dry_run: bool = False) -> list[EntryInfo]:
        """Remove entries not used for ``older_than_days`` days, then least recently used entries until the
        store is at most ``max_size`` bytes; abandoned unfinished builds (not locked) count as entries too."""
        if older_than_days is not None and not older_than_days >= 0:
            raise UserError(f"--older-than must be a number of days ≥ 0, got {older_than_days}")
        if max_size is not None and max_size < 0:
            raise UserError(f"--max-size must be ≥ 0, got {max_size}")
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
        done = []
        for e in removed:
            if dry_run:
                done.append(e)
                continue
            base = e.key[:-len(".partial")] if not e.complete else e.key
            try:
                with FileLock(str(self.root / f"{base}.lock"), timeout=0):
                    _rmtree(e.path)
                done.append(e)
            except Timeout:
                continue  # in use by a running extraction
        return done

    def total_size(self) -> int:
        return sum(e.size_bytes for e in self.entries(include_partial=True))


# ---------------------------------------------------------------------------------------------- CLI entry points


def cache_command(args: Any) -> int:
    """`repsim cache list|info|rm|prune` (argparse namespace from repsim.cli)."""
    store = Store()
    action = args.cache_action
    if action == "list" or action is None:
        entries = store.entries(include_partial=True)
        if not entries:
            print(f"no cached activations in {store.root}")
            return 0
        for e in entries:
            print(e.row())
        print(f"{len(entries)} entries, {_human(sum(e.size_bytes for e in entries))} in {store.root}")
        return 0
    if action == "info":
        info = store.info(args.key, verify=args.verify)
        if args.json:
            print(json.dumps(info, indent=1, default=str))
        else:
            meta = info.get("meta", {})
            print(f"key       {info['key']}\npath      {info['path']}\nsize      {_human(info['size_bytes'])}")
            print(f"created   {info.get('created')}")
            for k in ("model", "revision", "data", "data_fingerprint", "n_texts", "pool", "max_length",
                      "n_truncated", "dtype", "final_norm", "transformers"):
                print(f"{k:<17} {meta.get(k)}")
            print(f"layers    {info.get('layers')} widths {sorted(set(info.get('widths', {}).values()))}")
            if args.verify:
                print("checksums OK" if info["verified"] else "DAMAGED: " + "; ".join(info["problems"]))
        return 0 if info.get("verified", True) else 1
    if action == "rm":
        if args.all:
            for e in store.entries(include_partial=True):
                _rmtree(e.path)
            print(f"removed every entry in {store.root}")
            return 0
        if not args.keys:
            raise UserError("name the entries to remove (keys or prefixes from `repsim cache list`) or use --all")
        for key in args.keys:
            print(f"removed {store.rm(key)}")
        return 0
    if action == "prune":
        if args.older_than is None and args.max_size is None:
            raise UserError("prune needs --older-than DAYS and/or --max-size SIZE")
        removed = store.prune(args.older_than, parse_size(args.max_size) if args.max_size else None,
                              dry_run=args.dry_run)
        for e in removed:
            print(("would remove " if args.dry_run else "removed ") + e.key)
        left = store.total_size() - (sum(e.size_bytes for e in removed) if args.dry_run else 0)
        would = "would be " if args.dry_run else ""
        print(f"{len(removed)} entries {would}removed; {_human(left)} {would}left in {store.root}")
        return 0
    raise UserError(f"unknown cache action {action!r}")


def extract_command(args: Any) -> int:
    """`repsim extract MODEL --data ...`: extract (or find in the cache) and print a summary."""
    from repsim.data import load_texts  # noqa: PLC0415

    data = load_texts(args.data, text_column=args.text_column, label_column=args.label_column,
                      max_samples=args.max_samples, seed=args.seed, labels=False)
    from repsim.extract import extract  # noqa: PLC0415

    if getattr(data, "offline_fallback", False):
        print(f"data: {getattr(data, 'source', '')}")
    acts = extract(args.model, data, layers=args.layers, pool=args.pool, batch_size=args.batch_size,
                   max_length=args.max_length, device=args.device, dtype=args.dtype, cache=not args.no_cache,
                   progress=not args.quiet)
    m = acts.meta
    print(f"{m['model']} ({m.get('revision', '')[:19]}) on {m['data']}: {m['n_texts']} texts, pool={m['pool']}, "
          f"{len(acts.layers)} layers x ({acts.n}, {acts.width}); truncated {m['n_truncated']}; "
          f"{'cache hit' if m.get('cache_hit') else 'extracted'} in {m['timings']['total_s']:.2f} s")
    if m.get("path"):
        print(f"stored in {m['path']}")
    return 0


__all__ = ["Store", "EntryInfo", "DamagedEntry", "entry_key", "open_entry", "verify_entry", "get_or_build", "lookup",
           "cache_root", "activations_root", "cache_command", "extract_command", "parse_size"]
