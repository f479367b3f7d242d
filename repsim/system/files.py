"""Files written whole or not at all, and checksums.

Every write goes to a temporary file beside its target (same folder, so the final :func:`os.replace` is an atomic
rename), is flushed to disk, gets the permissions an ordinary new file would get (the umask's), and only then
replaces the target: a reader, or a run killed midway, sees the old file or the new one, never a mix. On any
failure the temporary file is removed and the error names the target (:func:`writing`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from repsim.system.errors import naming_path

#: bytes read at a time when hashing a file
CHUNK = 1 << 22


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` with the process umask applied: the permissions a plain ``open(path, "w")`` would give."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


@contextlib.contextmanager
def writing(path: str | os.PathLike, tmp: str | os.PathLike | None = None) -> Iterator[None]:
    """Writes to ``path`` (through ``tmp``): an OSError names ``path``; a writer whose own error hides the operating
    system's (torch.save's RuntimeError raised while closing after the OSError, or Rust's "(os error N)" text from
    safetensors) becomes that OSError; the temporary file or folder is removed on any failure, so a full disk
    leaves nothing half-written behind."""
    try:
        with naming_path(path):
            try:
                yield
            except OSError:
                raise
            except Exception as exc:
                cause: BaseException | None = exc  # torch.save's writer fails again while closing: look behind it
                while cause is not None and not (isinstance(cause, OSError) and cause.errno):
                    cause = cause.__cause__ or cause.__context__
                if isinstance(cause, OSError):
                    raise OSError(cause.errno, cause.strerror, os.fspath(path)) from exc
                code = re.search(r"\(os error (\d+)\)", str(exc))
                if code is None:
                    raise
                raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), os.fspath(path)) from exc
    except BaseException:
        if tmp is not None:
            if Path(tmp).is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
        raise


def write_atomic(path: str | os.PathLike, write: Callable[[IO[Any]], Any], *, binary: bool = True) -> None:
    """Write ``path`` whole or not at all: ``write(fh)`` fills a temporary file beside it, which is flushed,
    synced, given the umask's permissions and renamed onto ``path``. The parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with writing(path, tmp):
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, umask_mode())  # mkstemp makes 0600
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """A temporary file name beside ``path`` with the same suffix, for writers that take a file name and choose a
    format by its suffix (``savefig``, safetensors); when the block succeeds the file gets the umask's permissions
    and replaces ``path``, on any failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    with writing(path, tmp):
        yield tmp
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text to ``path`` atomically (:func:`write_atomic`)."""
    write_atomic(path, lambda fh: fh.write(text), binary=False)


def write_json_atomic(path: str | os.PathLike, obj: Any, **dump: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically; ``dump`` goes to :func:`json.dump` (default: ``indent=1``,
    sorted keys, anything else through ``str``)."""
    options: dict[str, Any] = {"indent": 1, "sort_keys": True, "default": str, **dump}
    write_atomic(path, lambda fh: json.dump(obj, fh, **options), binary=False)


__all__ = ["CHUNK", "atomic_file", "sha256_file", "umask_mode", "write_atomic", "write_json_atomic",
           "write_text_atomic", "writing"]
