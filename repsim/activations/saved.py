"""Activations saved by other tools, read from files: one (n, width) array per layer, rows = texts.

Accepted layouts (:func:`load_saved_layers`):

* a ``.npy`` file holding one (n, width) array (one layer) or a (layers, n, width) stack;
* a ``.safetensors`` file: every tensor is one layer (each (n, width)), or one (layers, n, width) tensor;
* a folder: either exactly one such file, or one file per layer (``.npy`` and/or ``.safetensors``, each with one
  (n, width) array); other files in the folder are ignored.

Layers are ordered by natural sort of their file or tensor names (``layer_2`` before ``layer_10``). A layer's
number is the last integer in its name when every name has one and they are all different (``layer_2`` → 2,
``h.10`` → 10); otherwise layers are numbered 0, 1, … in that order. The layers of a stack are 0 … L−1.

``.npy`` files are memory-mapped copy-on-write: pages are read when a metric needs them and the file is never
written. ``.safetensors`` tensors are read into memory (bfloat16 becomes float32). Every array must be 2-D,
floating point and finite; its provenance (file, tensor, shape, dtype, sha256 of its bytes in C order as
stored) goes into ``report.json``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors import safe_open

from repsim.system.errors import UserError

SUFFIXES = (".npy", ".safetensors")
HASH_BLOCK_BYTES = 1 << 24  # rows hashed and checked for finiteness per block (16 MiB)


class Entry(NamedTuple):
    """One layer as read: its name, file, tensor (name or stack index; None for a plain .npy), array, and
    whether it is a slice of a (layers, n, width) stack."""

    name: str
    file: Path
    tensor: str | None
    array: np.ndarray
    stacked: bool


@dataclass
class SavedLayers:
    """The layers of one side: ``ids[k]`` names ``arrays[k]`` (n, width); ``provenance`` is for report.json."""

    ids: list[int]
    names: list[str]
    arrays: list[np.ndarray] = field(repr=False)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.arrays[0].shape[0])

    def select(self, requested: list[int] | None, side: str) -> SavedLayers:
        """The layers ``requested`` by number (negative: counted from the end of the sorted numbers)."""
        if requested is None:
            return self
        order = sorted(self.ids)
        chosen = []
        for k in requested:
            kk = order[k] if -len(order) <= k < 0 else k
            if kk not in self.ids:
                raise UserError(f"unknown {side} layer {k}: the saved {side} activations have layers "
                                f"{', '.join(map(str, order))}")
            chosen.append(kk)
        keep = [self.ids.index(k) for k in sorted(set(chosen))]
        prov = dict(self.provenance, layers=[self.provenance["layers"][i] for i in keep])
        return SavedLayers([self.ids[i] for i in keep], [self.names[i] for i in keep],
                           [self.arrays[i] for i in keep], prov)

    def take_rows(self, rows: np.ndarray) -> SavedLayers:
        """The same layers restricted to ``rows`` (sorted row indices), copied into memory."""
        return SavedLayers(self.ids, self.names, [np.asarray(a[rows]) for a in self.arrays], self.provenance)


def natural_key(name: str) -> tuple:
    """Sort key that orders digit runs by value: ``layer_2`` < ``layer_10``."""
    return tuple(int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name))


def layer_numbers(names: list[str]) -> list[int]:
    """The last integer in each name when all names have one and they differ; else 0, 1, … in order."""
    found = [re.findall(r"\d+", name) for name in names]
    numbers = [int(f[-1]) for f in found if f]
    if len(numbers) == len(names) and len(set(numbers)) == len(numbers):
        return numbers
    return list(range(len(names)))


def load_saved_layers(path: str | Path, side: str = "teacher") -> SavedLayers:
    """Read one side's saved activations from ``path`` (see the module docstring); UserError on anything wrong."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{side} activations not found: {path}")
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES),
                       key=lambda p: natural_key(p.name))
        if not files:
            raise UserError(f"no .npy or .safetensors files in {path} ({side} activations)")
        if len(files) == 1:
            entries = _read_file(files[0], side)
        else:
            entries = []
            for f in files:
                inner = _read_file(f, side)
                if len(inner) != 1 or inner[0].stacked:
                    raise UserError(f"{f} holds {len(inner)} layers; a folder of several files needs one (n, width) "
                                    f"array per file ({side} activations)")
                entries.append(inner[0]._replace(name=f.stem))
    elif path.suffix.lower() in SUFFIXES:
        entries = _read_file(path, side)
    else:
        raise UserError(f"{path}: {side} activations must be a .npy or .safetensors file or a folder of them")
    entries.sort(key=lambda e: natural_key(e.name))
    names = [e.name for e in entries]
    one_stack = all(e.stacked for e in entries) and len({(e.file, e.tensor.rsplit("[", 1)[0]) for e in entries}) == 1
    ids = list(range(len(entries))) if one_stack else layer_numbers(names)
    rows = {int(e.array.shape[0]) for e in entries}
    if len(rows) != 1:
        counts = ", ".join(f"{e.name}: {e.array.shape[0]}" for e in entries)
        raise UserError(f"the {side} layers have different row counts ({counts}); every layer must hold one row "
                        "per text")
    layers = []
    for e, k in zip(entries, ids, strict=True):
        where = f"{e.file}" + (f" tensor {e.tensor}" if e.tensor else "")
        layers.append({"layer": k, "name": e.name, "file": str(e.file), "tensor": e.tensor,
                       "shape": list(e.array.shape), "dtype": str(e.array.dtype),
                       "sha256": _check_and_hash(e.array, where, side)})
    order = np.argsort(ids, kind="stable")
    prov = {"path": str(path), "layers": [layers[i] for i in order]}
    return SavedLayers([ids[i] for i in order], [names[i] for i in order], [entries[i].array for i in order], prov)


def _read_file(path: Path, side: str) -> list[Entry]:
    """One :class:`Entry` per layer in one file."""
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, mmap_mode="c", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {path} as a .npy array ({side} activations): "
                            f"{str(exc).splitlines()[0]}") from None
        return _layers_of(path.stem, path, None, arr, side)
    out = []
    try:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                t = fh.get_tensor(key)
                if t.dtype == torch.bfloat16:  # numpy has no bfloat16
                    t = t.float()
                out.extend(_layers_of(key, path, key, t.numpy(), side))
    except (OSError, ValueError, RuntimeError) as exc:  # safetensors' own error derives from Exception only
        raise UserError(f"cannot read {path} as safetensors ({side} activations): "
                        f"{str(exc).splitlines()[0]}") from None
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        raise UserError(f"cannot read {path} as safetensors ({side} activations): "
                        f"{str(exc).splitlines()[0]}") from None
    if not out:
        raise UserError(f"{path} holds no tensors ({side} activations)")
    return out


def _layers_of(name: str, file: Path, tensor: str | None, arr: np.ndarray, side: str) -> list[Entry]:
    where = f"{file}" + (f" (tensor {tensor!r})" if tensor and tensor != name else "")
    if not np.issubdtype(arr.dtype, np.floating):
        raise UserError(f"{where}: {side} activations must be floating point, got {arr.dtype}")
    if arr.ndim == 2:
        return [Entry(name, file, tensor, arr, False)]
    if arr.ndim == 3:
        return [Entry(f"{name}[{k}]", file, f"[{k}]" if tensor is None else f"{tensor}[{k}]", arr[k], True)
                for k in range(arr.shape[0])]
    raise UserError(f"{where}: expected a 2-D (texts, width) array or a 3-D (layers, texts, width) stack, "
                    f"got shape {tuple(arr.shape)} ({side} activations)")


def _check_and_hash(arr: np.ndarray, where: str, side: str) -> str:
    """sha256 of the array's bytes (C order, as stored), checking finiteness block by block on the way."""
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise UserError(f"{where}: empty {side} array of shape {tuple(arr.shape)}")
    h = hashlib.sha256()
    step = max(1, HASH_BLOCK_BYTES // max(1, arr.shape[1] * arr.itemsize))
    for start in range(0, arr.shape[0], step):
        block = np.ascontiguousarray(arr[start:start + step])
        finite = np.isfinite(block)
        if not finite.all():
            row = start + int(np.argmin(finite.all(axis=1)))
            raise UserError(f"{where}: row {row} holds NaN or inf ({side} activations)")
        h.update(block.tobytes())
    return h.hexdigest()


__all__ = ["SavedLayers", "load_saved_layers", "natural_key", "layer_numbers"]
