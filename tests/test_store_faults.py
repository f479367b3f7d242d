"""The activation store under attack: damaged or edited manifests, removal and pruning during a build, waiting
on a held lock, interrupted removals, concurrent builds, a symlinked cache folder, clock skew."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock
from test_store import _stop_after, _texts, _worker

from repsim.activations import assets, store
from repsim.activations.extract import extract
from repsim.activations.store import DamagedEntry, Store, open_entry, verify_entry
from repsim.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _root() -> Path:
    return Path(os.environ["REPSIM_CACHE"]) / "activations"


def _resign(manifest: dict) -> dict:
    """A manifest edited and given a matching checksum (what a hash collision or a careful forger could do)."""
    manifest["manifest_sha256"] = store._manifest_digest(manifest)
    return manifest


def _drop_last_layer(m: dict) -> dict:
    last = m["layers"].pop()
    del m["widths"][str(last)], m["arrays"][f"layer_{last:03d}.npy"]
    return m


def _edit_manifest(change):
    def damage(path: Path) -> None:
        m = json.loads((path / "manifest.json").read_text())
        (path / "manifest.json").write_text(json.dumps(change(m)))
    return damage


def _replace_with_dir(name: str):
    def damage(path: Path) -> None:
        (path / name).unlink()
        (path / name / "inner").mkdir(parents=True)
    return damage


def _truncate(path: Path) -> None:
    f = path / "layer_001.npy"
    f.write_bytes(f.read_bytes()[:-40])


DAMAGES = {
    "layer dropped from layers, widths and arrays": _edit_manifest(_drop_last_layer),
    "layer dropped, checksum forged": _edit_manifest(lambda m: _resign(_drop_last_layer(m))),
    "shape edited": _edit_manifest(lambda m: (m["arrays"]["layer_001.npy"]["shape"].__setitem__(0, 3), m)[1]),
    "shape edited, checksum forged": _edit_manifest(
        lambda m: _resign((m["arrays"]["layer_001.npy"]["shape"].__setitem__(0, 3), m)[1])),
    "options edited, checksum forged": _edit_manifest(lambda m: _resign((m["key_fields"].update(pool="cls"), m)[1])),
    "layers key missing": _edit_manifest(lambda m: {k: v for k, v in m.items() if k != "layers"}),
    "manifest of an older repsim": _edit_manifest(
        lambda m: {k: v for k, v in dict(m, format=1).items() if k != "manifest_sha256"}),
    "manifest not JSON": lambda p: (p / "manifest.json").write_text('{"format": 2, "layers": [0, '),
    "manifest a JSON list": lambda p: (p / "manifest.json").write_text("[1, 2]"),
    "manifest missing": lambda p: (p / "manifest.json").unlink(),
    "manifest replaced by a folder": _replace_with_dir("manifest.json"),
    "layer file replaced by a folder": _replace_with_dir("layer_002.npy"),
    "layer file truncated": _truncate,
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_every_damage_is_detected_reported_on_one_line_and_rebuilt(tiny_model, damage, capsys):
    folder = str(tiny_model("bert"))
    texts = _texts(6)
    first = extract(folder, texts, progress=False)
    good, layers, path = first.stack(), list(first.layers), Path(first.meta["path"])
    del first
    DAMAGES[damage](path)
    store._VERIFIED.clear()
    assert verify_entry(path)  # detected without reading any array
    with pytest.raises(DamagedEntry):
        open_entry(path, verify=False)
    assert main(["cache", "info", path.name, "--verify"]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "rebuilt automatically" in out
    assert main(["cache", "list"]) == 0
    assert "(damaged" in capsys.readouterr().out
    with pytest.warns(UserWarning, match=r"damaged \(.*\); rebuilding it") as caught:
        again = extract(folder, texts, progress=False)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert again.layers == layers and not again.meta["cache_hit"]
    np.testing.assert_array_equal(again.stack(), good)
    assert verify_entry(path) == []
    assert extract(folder, texts, progress=False).meta["cache_hit"]  # and it is served from then on


def test_an_entry_built_for_other_options_is_never_served(tiny_model):
    """Even a self-consistent manifest (checksum matching) is refused when its key fields are not those asked."""
    folder = str(tiny_model("bert"))
    texts = _texts(6)
    acts = extract(folder, texts, progress=False)
    path = Path(acts.meta["path"])
    m = json.loads((path / "manifest.json").read_text())
    asked = m["key_fields"]
    with pytest.raises(DamagedEntry, match="other options than asked \\(pool\\)"):
        open_entry(path, verify=False, expect=dict(asked, pool="cls"))
    with pytest.raises(DamagedEntry, match="layers"):
        _edit_manifest(lambda x: _resign(_drop_last_layer(x)))(path)
        open_entry(path, verify=False, expect=asked)


def test_copied_entry_under_another_key_is_not_served(tiny_model):
    folder = str(tiny_model("bert"))
    a = extract(folder, _texts(6), progress=False)
    b = extract(folder, _texts(6, seed=1), progress=False)
    pa, pb = Path(a.meta["path"]), Path(b.meta["path"])
    good = b.stack()
    del a, b
    shutil.rmtree(pb)
    shutil.copytree(pa, pb)  # the wrong data under b's key
    with pytest.warns(UserWarning, match="names entry"):
        again = extract(folder, _texts(6, seed=1), progress=False)
    np.testing.assert_array_equal(again.stack(), good)


# ------------------------------------------------------------------------------------ locks


def _wait_for_progress(proc: subprocess.Popen, chunks: int = 1) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        progs = list(_root().glob("*.partial/shard-000/progress.json")) if _root().exists() else []
        if progs and json.loads(progs[0].read_text())["chunks_done"] >= chunks:
            return
        time.sleep(0.02)
    raise AssertionError(f"the build did not start: {proc.communicate()[1].decode()[-2000:]}")


def test_rm_all_and_prune_during_a_build_skip_it_and_say_so(tiny_model, tmp_path, capsys):
    folder = tiny_model("bert")
    texts = _texts(48, seed=2)
    done = extract(str(folder), _texts(5), progress=False)  # a finished entry, free to remove
    done_path = Path(done.meta["path"])
    del done
    proc, out = _worker(tmp_path, folder, texts, slow=0.1, name="w")
    _wait_for_progress(proc)
    assert main(["cache", "prune", "--max-size", "0"]) == 0
    said = capsys.readouterr().out
    assert f"removed {done_path.name}" in said and "skipped" in said and ".partial: a running extraction" in said
    assert main(["cache", "rm", "--all"]) == 0
    said = capsys.readouterr().out
    assert "skipped" in said and "removed 0 entries" in said
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err.decode()[-2000:]
    result = json.loads(out.read_text())
    assert verify_entry(Path(result["path"])) == []
    ref = extract(str(folder), texts, batch_size=4, cache=False, progress=False)
    import hashlib
    assert result["sha"] == hashlib.sha256(ref.stack().tobytes()).hexdigest()


def test_waiting_on_a_held_lock_is_said_once_and_the_wait_goes_on(tiny_model, monkeypatch, capfd):
    folder = str(tiny_model("bert"))
    texts = _texts(5)
    first = extract(folder, texts, progress=False)
    key, good = first.meta["key"], first.stack()
    del first
    Store().rm(key)
    monkeypatch.setattr(assets, "LOCK_NOTICE_S", 0.3)
    holder = FileLock(str(_root() / f"{key}.lock"))
    holder.acquire()
    result = {}
    thread = threading.Thread(target=lambda: result.update(acts=extract(folder, texts, progress=False)))
    thread.start()
    time.sleep(1.5)
    assert thread.is_alive()  # still waiting
    holder.release()
    thread.join(60)
    np.testing.assert_array_equal(result["acts"].stack(), good)
    lines = [ln for ln in capfd.readouterr().err.splitlines() if "waiting for" in ln]
    assert len(lines) == 1 and key in lines[0] and "another process is building" in lines[0]


def test_asset_lock_wait_is_said_too(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("REPSIM_ASSETS_CACHE", str(tmp_path / "assets"))
    monkeypatch.setattr(assets, "LOCK_NOTICE_S", 0.2)
    (tmp_path / "assets" / ".locks").mkdir(parents=True)
    holder = FileLock(str(tmp_path / "assets" / ".locks" / "thing.lock"))
    holder.acquire()

    def build(folder: Path) -> dict:
        (folder / "m").write_bytes(b"x")
        return {"main": "m", "sha256": "0" * 64}

    thread = threading.Thread(target=assets.ensure_entry, args=("thing", build))
    thread.start()
    time.sleep(1.0)
    holder.release()
    thread.join(30)
    assert (tmp_path / "assets" / "thing" / "m").read_bytes() == b"x"
    assert sum("waiting for the asset thing" in ln for ln in capfd.readouterr().err.splitlines()) == 1


def test_leftovers_of_a_killed_removal_are_reclaimed(tiny_model, capsys):
    extract(str(tiny_model("bert")), _texts(5), progress=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = _root() / f"model-abc.trash-{dead.pid}-1"  # what `cache rm` leaves when killed after its rename
    (orphan / "deep").mkdir(parents=True)
    (orphan / "deep" / "layer_000.npy").write_bytes(b"x" * 5000)
    busy = _root() / f"model-def.trash-{os.getppid()}-1"  # a removal still running in a live process
    busy.mkdir()
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert not orphan.exists() and busy.exists()
    assert "deleted 4.9 KB left by an interrupted removal" in out and "1 entries" in out


# ------------------------------------------------------------------------------------ more attacks


def test_two_processes_building_different_entries(tiny_model, tmp_path):
    folder = tiny_model("bert")
    runs = [_worker(tmp_path / f"p{i}", folder, _texts(24, seed=10 + i), slow=0.02, name="w")
            for i in range(2) if (tmp_path / f"p{i}").mkdir() is None]
    for proc, _ in runs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err.decode()[-2000:]
    paths = {json.loads(out.read_text())["path"] for _, out in runs}
    assert len(paths) == 2 and all(verify_entry(Path(p)) == [] for p in paths)


def test_prune_racing_a_build_never_breaks_it(tiny_model, tmp_path):
    folder = tiny_model("bert")
    texts = _texts(32, seed=4)
    proc, out = _worker(tmp_path, folder, texts, slow=0.03, name="w")
    pruned = 0
    while proc.poll() is None:
        pruned += len(Store().prune(max_size=0))  # removes everything not locked, over and over
    _, err = proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert json.loads(out.read_text())["calls"] == 8


def test_symlinked_cache_folder(tiny_model, tmp_path, monkeypatch, capsys):
    real = tmp_path / "real-cache"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    monkeypatch.setenv("REPSIM_CACHE", str(tmp_path / "link"))
    folder = str(tiny_model("bert"))
    first = extract(folder, _texts(5), progress=False)
    assert extract(folder, _texts(5), progress=False).meta["cache_hit"]
    assert (real / "activations" / first.meta["key"] / "manifest.json").is_file()
    # an entry folder that is itself a link is removed as a link: what it points to stays
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(first.meta["path"], elsewhere)
    (real / "activations" / "linked-entry").symlink_to(elsewhere, target_is_directory=True)
    assert main(["cache", "rm", "--all"]) == 0
    assert (tmp_path / "link").is_symlink() and real.is_dir() and (elsewhere / "manifest.json").is_file()
    assert sorted(p.name for p in (real / "activations").iterdir() if not p.name.endswith(".lock")) == []


def test_mtime_in_the_future_reads_as_just_used(tiny_model):
    acts = extract(str(tiny_model("bert")), _texts(5), progress=False)
    future = time.time() + 86400
    os.utime(acts.meta["path"], (future, future))
    (entry,) = Store().entries()
    assert "used    0.0 h ago" in entry.row()
    assert Store().prune(older_than_days=0.5) == []  # not "old"


# ------------------------------------------------------------------------------------ reproducibility


def test_batch_size_and_dtype_of_a_build_are_recorded_and_reported(tiny_model, tmp_path, capsys):
    """The key leaves the batch size out: an entry serves any batch size, bitwise as it was built, and says how it
    was built (manifest, activations meta, report.json, one warning line in the summary)."""
    teacher, student = str(tiny_model("bert")), str(tiny_model("bert", seed=1))
    texts = _texts(23, seed=7)
    built = extract(teacher, texts, batch_size=3, progress=False)
    manifest = json.loads((Path(built.meta["path"]) / "manifest.json").read_text())
    assert manifest["built_with"]["batch_size"] == 3 and manifest["built_with"]["dtype"] == "float32"
    assert manifest["built_with"]["device"] == "cpu" and manifest["built_with"]["world_size"] == 1
    served = extract(teacher, texts, batch_size=8, progress=False)
    assert served.meta["cache_hit"] and served.meta["built_with"]["batch_size"] == 3
    np.testing.assert_array_equal(served.stack(), built.stack())  # what was built, not what batch 8 would give
    fresh = extract(teacher, texts, batch_size=8, cache=False, progress=False)
    assert fresh.meta["built_with"]["batch_size"] == 8
    np.testing.assert_allclose(fresh.stack(), built.stack(), rtol=1e-5, atol=1e-6)  # equal to float32 rounding
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(texts) + "\n")
    assert main(["compare", teacher, student, "--data", str(data), "--batch-size", "8", "--metrics", "cka",
                 "--out", str(tmp_path / "out")]) == 0
    said = capsys.readouterr()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["batch_size"] == 8
    assert report["teacher"]["built_with"]["batch_size"] == 3 and report["student"]["built_with"]["batch_size"] == 8
    (warning,) = [w for w in report["warnings"] if "activations come from the cache" in w]
    assert warning.startswith("teacher activations") and "batch size 3" in warning and "batch size 8" in warning
    assert f"warning: {warning}" in said.out + said.err


@pytest.mark.parametrize("damage", ["progress not JSON", "shard file truncated", "shard file a folder"])
def test_damaged_unfinished_build_starts_over(tiny_model, damage):
    folder = str(tiny_model("bert"))
    texts = _texts(16, seed=9)
    with pytest.raises(KeyboardInterrupt):
        extract(folder, texts, batch_size=4, chunk_size=4, progress=False, on_batch=_stop_after(2))
    (shard,) = _root().glob("*.partial/shard-000")
    if damage == "progress not JSON":
        (shard / "progress.json").write_text('{"chunks_done": ')
    elif damage == "shard file truncated":
        (shard / "layer_001.npy").write_bytes((shard / "layer_001.npy").read_bytes()[:100])
    else:
        (shard / "layer_001.npy").unlink()
        (shard / "layer_001.npy").mkdir()
    with pytest.warns(UserWarning, match=r"unfinished build .*\.partial is damaged .*; starting it over"):
        acts = extract(folder, texts, batch_size=4, chunk_size=4, progress=False)
    assert acts.meta["resumed_chunks"] == 0 and verify_entry(Path(acts.meta["path"])) == []
    ref = extract(folder, texts, batch_size=4, cache=False, progress=False)
    np.testing.assert_array_equal(acts.stack(), ref.stack())


def test_cli_says_a_damaged_entry_is_rebuilt_on_one_line(tiny_model, tmp_path):
    folder = str(tiny_model("bert"))
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(_texts(5)) + "\n")
    run = lambda: subprocess.run([sys.executable, "-m", "repsim", "extract", folder, "--data", str(data),  # noqa: E731
                                  "--quiet"], capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert run().returncode == 0
    (entry,) = [p for p in _root().iterdir() if p.is_dir()]
    (entry / "manifest.json").write_text("{")
    res = run()
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == [f"repsim: warning: activation cache entry {entry.name} is damaged (manifest.json unreadable: "
                     "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)); rebuilding it"]
