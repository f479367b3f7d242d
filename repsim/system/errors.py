"""The one error type a user can cause.

Everything the command line turns into "one clear line and exit status 2" is a :class:`UserError`.
It subclasses :class:`ValueError`, so library callers can catch either. Operating-system faults a user can cause
(a full disk, a read-only or missing folder, a file size limit) stay :class:`OSError`; :func:`naming_path` makes
sure they name the file or folder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


class UserError(ValueError):
    """Bad input a user can fix (unknown model, missing file, bad column, too few samples, ...).

    The message is a single line that names the problem; the command line prints it and exits with 2.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty): what a one-line
    error can quote of a library's multi-line message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def naming_path(path: str | os.PathLike) -> Iterator[None]:
    """Give an :class:`OSError` raised inside the block the file name ``path`` when it has none.

    A failed ``write()``, ``close()``, ``posix_fallocate()`` or memory map (full disk, file size limit) raises
    without a file name; the command line's one line then still says which file or folder it was.
    """
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), os.fspath(path)) from exc
