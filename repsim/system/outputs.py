"""Output folders replaced as one set: a reader sees either the previous set of files or the new one, never a mix.

:func:`replace_folder` writes the new set into a staging folder beside the target (``.<name>.tmp-<pid>-<rand>``),
then swaps the two folders in one step (Linux ``renameat2(RENAME_EXCHANGE)``; a target that does not exist yet
is simply renamed into place). Entries of the target that the writer does not own (a user's notes, a subfolder,
or, for a figure redraw, the results file) are carried into the new folder: files as hard links before the swap,
so they are present at every instant, folders moved across right after it. The previous set, now under the
staging name, is then deleted.

A process killed at any point leaves the target either old or new; its staging folder is recognised by the dead
process id in its name and cleaned up by the next write beside it, which first gives back any entry of it that
is not part of the set and that the target lacks. Where the swap is not available (not Linux, a file system
without it, a target that is a mount point), the files are moved in one by one, which is not atomic.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from repsim.system.errors import UserError

_OUTPUT_FILE = re.compile(r"(results|curve)\.csv|report\.(json|html)|(heatmap_.+|best_match|curve)\.(png|svg|pdf)")
_FIGURE_FILE = re.compile(r"(heatmap_.+|best_match)\.(png|svg|pdf)")


def is_output_file(name: str) -> bool:
    """Whether a top-level name in an output folder belongs to the set `repsim compare --out` writes."""
    return _OUTPUT_FILE.fullmatch(name) is not None


def is_figure_file(name: str) -> bool:
    """Whether a top-level name in an output folder is one of the figures (`repsim plot` redraws them)."""
    return _FIGURE_FILE.fullmatch(name) is not None


_STAGING = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[A-Za-z0-9_]+$")
_LEGACY = re.compile(r"\.(?P<name>.+)\.tmp-[A-Za-z0-9_]{8}$")  # older releases: no process id in the name
_LEGACY_AGE_S = 3600.0


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EXDEV, errno.EBUSY, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one we may not signal counts as existing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_path(path: Path) -> None:
    """Delete a folder tree, a file or a link (not what a link points to); a missing path is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _give_back(aside: Path, out: Path, ours: Callable[[str], bool]) -> None:
    """Move every entry of ``aside`` that is not the writer's and that ``out`` lacks into ``out``."""
    if not out.is_dir():
        return
    for entry in sorted(aside.iterdir()):
        if not ours(entry.name) and not os.path.lexists(out / entry.name):
            os.rename(entry, out / entry.name)


def reclaim_stale(out: Path, ours: Callable[[str], bool]) -> list[Path]:
    """Clean up the staging folders that killed writers left beside ``out``; returns what went."""
    removed = []
    now = time.time()
    with contextlib.suppress(OSError):
        for path in out.parent.iterdir():
            m = _STAGING.fullmatch(path.name)
            if m and m["name"] == out.name and not pid_alive(int(m["pid"])):
                if path.is_dir():
                    _give_back(path, out, ours)
                remove_path(path)
                removed.append(path)
                continue
            m = _LEGACY.fullmatch(path.name)
            if m and m["name"] == out.name and now - path.stat().st_mtime > _LEGACY_AGE_S:
                remove_path(path)
                removed.append(path)
    return removed


def _carry(src: Path, dest: Path) -> None:
    """Put a file or link of the old folder into the new one without copying data (hard link) if possible."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dest)
        return
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def replace_folder(out: str | Path, fill: Callable[[Path], object], ours: Callable[[str], bool]) -> Path:
    """Write a new set of files into the folder ``out`` as one step (see the module docstring).

    fill(folder): writes the new set into an empty folder. ours(name): whether a top-level name in ``out``
    belongs to the set being replaced (those of the previous set that ``fill`` does not write again go away);
    every other entry is kept. A failure in ``fill`` leaves ``out`` untouched. Returns ``out``.
    """
    out = Path(out)
    if out.is_symlink():
        out = out.resolve()  # replace the contents of the folder the link points to; the link stays
    out = Path(os.path.abspath(out))
    cwd = Path.cwd().resolve()
    if out.exists() and (cwd == out.resolve() or out.resolve() in cwd.parents):
        raise UserError(f"output folder {out} holds the current folder; name a folder below it for the output")
    out.parent.mkdir(parents=True, exist_ok=True)
    reclaim_stale(out, ours)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    swapped = False
    try:
        os.chmod(staging, out.stat().st_mode & 0o7777 if out.is_dir() else 0o777 & ~umask)
        fill(staging)
        if not out.exists():
            os.rename(staging, out)
            return out
        for entry in sorted(out.iterdir()):
            if not ours(entry.name) and not entry.is_dir() and not os.path.lexists(staging / entry.name):
                _carry(entry, staging / entry.name)
        swapped = _exchange(staging, out)
        if not swapped:  # one by one: the new set in, then what remains of the previous set out
            new = {f.name for f in staging.iterdir() if ours(f.name)}
            for name in sorted(new):
                os.replace(staging / name, out / name)
            for entry in sorted(out.iterdir()):
                if ours(entry.name) and entry.name not in new:
                    remove_path(entry)
            return out
        _give_back(staging, out, ours)  # now the previous set: its folders, and files added meanwhile, go back
        remove_path(staging)
    finally:
        if not swapped and staging.exists():
            remove_path(staging)
    return out
