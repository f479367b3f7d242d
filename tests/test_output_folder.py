"""An output folder holds either the previous set of files or the new one, whatever instant a run is killed at;
files that are not part of the set survive; what a killed run leaves beside the folder is cleaned up."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from repsim.analysis.comparison import Comparison
from repsim.system.errors import UserError
from repsim.system.outputs import is_output_file, replace_folder

_SAVER = textwrap.dedent("""
    import os, shutil, signal, sys
    from pathlib import Path
    import repsim.system.outputs as outputs

    out, crash_at, new_set = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    count = [0]

    def crashing(fn):
        def wrapped(*args, **kwargs):
            count[0] += 1
            if count[0] == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return wrapped

    def fill(folder):
        for f in sorted(new_set.iterdir()):
            shutil.copy2(f, folder / f.name)
            if crash_at == 0:  # killed while writing, with part of the set in the staging folder
                os.kill(os.getpid(), signal.SIGKILL)
        for name in ("rename", "replace"):
            setattr(os, name, crashing(getattr(os, name)))
        for name in ("_carry", "_exchange", "_give_back", "remove_path"):  # each step of the replacement
            setattr(outputs, name, crashing(getattr(outputs, name)))

    outputs.replace_folder(out, fill, outputs.is_output_file)
    print("saved")
""")

_PLOT_KILLER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    import repsim.analysis.comparison as comparison
    from repsim.analysis.comparison import Comparison

    rng = np.random.default_rng(1)
    comp = Comparison.from_layers([rng.standard_normal((12, 3))], [rng.standard_normal((12, 3))], ["cka"])
    draw = comparison.save_figures

    def save_figures(*args, **kwargs):
        draw(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    comparison.save_figures = save_figures  # the name the comparison calls
    comp.save(sys.argv[1])
""")


def test_killed_while_plotting_leaves_the_old_set_and_the_next_save_cleans_up(tmp_path):
    out = _comparison(0, "procrustes").save(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = subprocess.run([sys.executable, "-c", _PLOT_KILLER, str(out)], capture_output=True, timeout=120)
    assert proc.returncode == -9
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".run.tmp-")]) == 1  # the dead run's
    _comparison(0, "cka").save(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def _comparison(seed: int, metric: str) -> Comparison:
    rng = np.random.default_rng(seed)
    return Comparison.from_layers([rng.standard_normal((12, 3)) for _ in range(2)],
                                  [rng.standard_normal((12, 3)) for _ in range(2)], [metric])


def _set(folder: Path) -> dict[str, bytes]:
    """The output set in a folder, without report.json (its timings differ from run to run) and SVGs (dated)."""
    return {p.name: p.read_bytes() for p in folder.iterdir()
            if is_output_file(p.name) and p.suffix not in (".svg",) and p.name != "report.json"}


def test_a_killed_save_leaves_the_old_set_or_the_new_one_and_user_files(tmp_path):
    pristine = tmp_path / "pristine" / "run"
    _comparison(0, "cka").save(pristine)
    (pristine / "notes.txt").write_text("mine")
    (pristine / "extra").mkdir()
    (pristine / "extra" / "keep.txt").write_text("also mine")
    old = _set(pristine)
    ref = _comparison(1, "procrustes").save(tmp_path / "ref")
    new = _set(ref)
    assert set(old) != set(new) and "best_match.png" in old and "best_match.png" in new
    outcomes = []
    for crash_at in range(0, 40):
        case = tmp_path / f"case{crash_at}"
        shutil.copytree(pristine, case / "run", symlinks=True)
        proc = subprocess.run([sys.executable, "-c", _SAVER, str(case / "run"), str(crash_at), str(ref)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode in (0, -9), proc.stderr[-2000:]
        now = _set(case / "run")
        assert now in (old, new), (crash_at, sorted(now))  # never a mix
        assert (case / "run" / "notes.txt").read_text() == "mine"  # a user file is never missing
        outcomes.append("new" if now == new else "old")
        # the next save cleans up whatever the killed one left, and gives back what it held
        replace_folder(case / "run", lambda folder: [shutil.copy2(f, folder) for f in ref.iterdir()], is_output_file)
        assert _set(case / "run") == new
        assert (case / "run" / "extra" / "keep.txt").read_text() == "also mine"
        assert sorted(p.name for p in case.iterdir()) == ["run"], crash_at  # no staging folder left
        if proc.returncode == 0:
            break
    assert proc.returncode == 0 and outcomes[0] == "old" and outcomes[-1] == "new"
    assert "old" in outcomes[1:] or "new" in outcomes[:-1]  # some kills landed inside the replacement


def test_staging_folder_of_a_live_process_is_left_alone(tmp_path):
    out = tmp_path / "run"
    busy = tmp_path / f".run.tmp-{os.getppid()}-abcdefgh"  # another save, still running
    busy.mkdir()
    legacy = tmp_path / ".run.tmp-k3j4h5g6"  # an older release's name, recent: could still be in use
    legacy.mkdir()
    _comparison(0, "cka").save(out)
    assert busy.is_dir() and legacy.is_dir()
    os.utime(legacy, (0, 0))  # older than an hour: reclaimed
    _comparison(0, "cka").save(out)
    assert busy.is_dir() and not legacy.exists()


def test_new_set_replaces_old_set_files_not_written_again_and_keeps_others(tmp_path):
    out = _comparison(0, "cka").save(tmp_path / "run")
    (out / "my_heatmap_notes.md").write_text("x")
    _comparison(0, "procrustes").save(out)
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if "cka" in n] and "heatmap_procrustes_distance.png" in names
    assert (out / "my_heatmap_notes.md").read_text() == "x"


def test_failure_while_writing_leaves_the_folder_untouched(tmp_path):
    out = _comparison(0, "cka").save(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(folder: Path) -> None:
        (folder / "results.csv").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        replace_folder(out, broken, is_output_file)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_symlinked_output_folder_keeps_its_link(tmp_path):
    real = _comparison(0, "cka").save(tmp_path / "real")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    _comparison(0, "procrustes").save(tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (real / "heatmap_procrustes_distance.png").is_file()


def test_output_folder_holding_the_current_folder_is_refused(tmp_path, monkeypatch):
    (tmp_path / "run" / "inside").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "run" / "inside")
    with pytest.raises(UserError, match="holds the current folder"):
        _comparison(0, "cka").save(tmp_path / "run")
    _comparison(0, "cka").save("sub")  # a folder below the current one is fine
    assert (tmp_path / "run" / "inside" / "sub" / "results.csv").is_file()
