"""Operating-system faults a user can cause: a read-only cache, a cache path that is a file, a full disk (cache and
output folder), a file size limit. Each ends in one `repsim: error:` line naming the path and the cause, exit
status 2, and leaves what was already written intact.

Small full filesystems are tmpfs mounts with a size limit (needs root and a kernel that allows the mount; the tests
skip otherwise); the file size limit is RLIMIT_FSIZE in a child process (SIGXFSZ ignored, so writes fail with
EFBIG instead of killing it)."""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import WORDS

from repsim.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tmpfs(tmp_path):
    """Factory: tmpfs(size) mounts a fresh tmpfs of that size (e.g. "256k") and returns its folder."""
    mounted: list[Path] = []

    def make(size: str, name: str = "fs") -> Path:
        folder = tmp_path / name
        folder.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[:200]}")
        mounted.append(folder)
        return folder

    yield make
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _read_only(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, capture_output=True)


def _texts(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)) + "\n")
    return path


def _repsim(args: list[str], *, cwd: Path, env: dict[str, str] | None = None, fsize: int | None = None):
    """Run ``python -m repsim`` in a child (a SIGBUS or a file size limit must not hit the test process)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    full_env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
                **(env or {})}
    return subprocess.run([sys.executable, "-m", "repsim", *args], cwd=cwd, capture_output=True, text=True,
                          env=full_env, timeout=600, preexec_fn=limit)


def _one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("repsim:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_full_disk_for_the_cache_is_an_error_not_sigbus(tmp_path, tmpfs, tiny_model):
    """The layer arrays need ~1 MB; the cache disk has 256 kB. Memory-mapped writes into a sparse file died of
    SIGBUS (rc 135, nothing said); allocated up front, it is ENOSPC naming the file, and the space is given back."""
    cache = tmpfs("256k")
    data = _texts(tmp_path / "texts.txt", 2000)
    proc = _repsim(["extract", str(tiny_model("bert", seed=0)), "--data", str(data), "--quiet"], cwd=tmp_path,
                   env={"REPSIM_CACHE": str(cache)})
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    line = _one_error_line(proc.stderr)
    assert "No space left on device" in line and str(cache) in line and "REPSIM_CACHE" in line
    st = os.statvfs(cache)
    assert st.f_bfree * st.f_frsize > 200 * 1024  # half-made arrays removed: the disk is not left full


def test_file_size_limit_is_an_error_naming_the_file(tmp_path, tiny_model):
    data = _texts(tmp_path / "texts.txt", 2000)
    proc = _repsim(["extract", str(tiny_model("bert", seed=0)), "--data", str(data), "--quiet"], cwd=tmp_path,
                   env={"REPSIM_CACHE": str(tmp_path / "cache")}, fsize=100 * 1024)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    line = _one_error_line(proc.stderr)
    assert "File too large" in line and "ulimit -f" in line and str(tmp_path / "cache") in line


def test_read_only_cache_on_a_miss_and_cache_rm_prune_there(tmp_path, tmpfs, tiny_model, monkeypatch, capsys):
    cache = tmpfs("4m")
    monkeypatch.setenv("REPSIM_CACHE", str(cache))
    teacher = str(tiny_model("bert", seed=0))
    data = _texts(tmp_path / "texts.txt", 12)
    assert main(["extract", teacher, "--data", str(data), "--quiet"]) == 0  # one entry, written while writable
    capsys.readouterr()
    _read_only(cache)
    before = _tree(cache)
    other = _texts(tmp_path / "other.txt", 12, seed=1)
    assert main(["extract", teacher, "--data", str(other), "--quiet"]) == 2  # a miss needs a new entry
    line = _one_error_line(capsys.readouterr().err)
    assert "Read-only file system" in line and str(cache) in line and "--no-cache" in line
    assert main(["extract", teacher, "--data", str(data), "--quiet"]) == 0  # the entry that exists is served
    capsys.readouterr()
    key = next(p.name for p in (cache / "activations").iterdir() if p.is_dir())
    for argv in (["cache", "rm", key], ["cache", "rm", "--all"], ["cache", "prune", "--older-than", "0"]):
        status = main(argv)
        err = capsys.readouterr().err
        assert status == 2, (argv, err)
        assert "Read-only file system" in _one_error_line(err), argv
    assert _tree(cache) == before


def test_cache_path_that_is_a_file(tmp_path, tiny_model, monkeypatch, capsys):
    target = tmp_path / "not-a-folder"
    target.write_text("keep")
    monkeypatch.setenv("REPSIM_CACHE", str(target))
    data = _texts(tmp_path / "texts.txt", 12)
    for argv in (["extract", str(tiny_model("bert", seed=0)), "--data", str(data), "--quiet"], ["cache", "list"]):
        assert main(argv) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "is a file, not a folder" in line and str(target) in line
    assert target.read_text() == "keep"


def test_full_disk_for_out_keeps_the_previous_results(tmp_path, tmpfs, tiny_model, capsys):
    disk = tmpfs("256k")
    out = disk / "out"
    out.mkdir()
    (out / "results.csv").write_text("previous results\n")
    (disk / "filler").write_bytes(b"\0" * (256 * 1024 - 4 * 4096 - 8192))  # a few kB left: no room for figures
    data = _texts(tmp_path / "texts.txt", 12)
    status = main(["compare", str(tiny_model("bert", seed=0)), str(tiny_model("bert", seed=1)), "--data", str(data),
                   "--metrics", "procrustes", "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2, err
    line = _one_error_line(err)
    assert "No space left on device" in line and str(out) in line
    assert (out / "results.csv").read_text() == "previous results\n"
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "out"]  # no temporary folder left behind
    assert sorted(p.name for p in out.iterdir()) == ["results.csv"]


@pytest.mark.parametrize("argv", [
    ["check", "{t}", "{s}", "--data", "{data}", "--out", "{out}"],
    ["counterexample", "projection", "--out", "{out}"],
    ["compare", "{t}", "{s}", "--data", "{data}", "--out", "{out}"],
    ["distill", "{t}", "{s}", "--data", "{data}", "--out", "{out}"],
])
def test_unwritable_out_is_refused_before_any_work(tmp_path, tmpfs, tiny_model, capsys, argv):
    """A read-only output folder is found before extraction or training (one line, nothing else on stderr)."""
    disk = tmpfs("64k")
    _read_only(disk)
    data = _texts(tmp_path / "texts.txt", 12)
    values = {"t": str(tiny_model("bert", seed=0)), "s": str(tiny_model("bert", seed=1)), "data": str(data),
              "out": str(disk / "out")}
    status = main([a.format(**values) for a in argv])
    captured = capsys.readouterr()
    assert status == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("repsim: error: cannot write output folder"), captured.err
    assert "Read-only file system" in lines[0] and captured.out == ""


def test_full_disk_under_finetune_out_is_one_line_and_leaves_no_partial_files(tmp_path, tmpfs, tiny_model, capsys):
    """Checkpoints (torch.save) and model folders (safetensors) on a full disk: an OSError naming the file,
    not a RuntimeError / SafetensorError traceback, and no hidden temporary file or folder left behind."""
    disk = tmpfs("64k")
    rng = random.Random(0)
    data = tmp_path / "labelled.csv"
    data.write_text("text,label\n" + "".join(f"{' '.join(rng.choice(WORDS) for _ in range(5))},{i % 2}\n"
                                             for i in range(24)))
    status = main(["finetune", str(tiny_model("bert", seed=0)), "--data", str(data), "--epochs", "1",
                   "--no-progress", "--out", str(disk / "run")])
    err = capsys.readouterr().err
    assert status == 2, err
    line = _one_error_line(err)
    assert "No space left on device" in line and str(disk / "run") in line
    leftovers = [str(p.relative_to(disk)) for p in disk.rglob("*") if p.name.startswith(".")]
    assert leftovers == []
