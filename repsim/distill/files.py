"""Writes that never leave a half-written file: a temporary file beside the target, renamed into place, removed on
any failure, with the operating system's error naming the target."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from repsim.system.errors import naming_path


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def writing(path: Path, tmp: str | Path | None = None):
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
                    raise OSError(cause.errno, cause.strerror, str(path)) from exc
                code = re.search(r"\(os error (\d+)\)", str(exc))
                if code is None:
                    raise
                raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from exc
    except BaseException:
        if tmp is not None:
            if Path(tmp).is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with writing(path, tmp):
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, _umask_mode())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with writing(path, tmp):
        with os.fdopen(fd, "wb") as fh:  # through a Python file, a full disk is an OSError (ENOSPC)
            torch.save(obj, fh)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[str]:
    """A temporary file name beside ``path`` with the same suffix (so writers that choose a format by the suffix,
    e.g. ``savefig``, pick the right one); when the block succeeds the file gets the usual permissions and replaces
    ``path``, on any failure it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    with writing(path, tmp):
        yield tmp
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
