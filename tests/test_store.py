"""The activation store: resume after kill -9, one writer per entry, checksums, cache hits, management, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModel, AutoTokenizer

from repsim.activations import store
from repsim.activations.extract import extract
from repsim.activations.store import DamagedEntry, Store, open_entry, verify_entry

WORDS = ("the a movie film is was good bad great terrible funny boring and but not very really quite plot acting "
         "story characters long short it this that i loved hated scene music ending slow fast beautiful").split()


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 30)))) for _ in range(n)]


pytestmark = pytest.mark.usefixtures("one_thread")


def _pair_with_counter(folder) -> tuple[tuple, list[int]]:
    """A (model, tokenizer) pair whose forward passes are counted by a pre-hook."""
    model = AutoModel.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return (model, tok), calls


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in (root / "activations").iterdir() if p.is_dir() and not p.name.endswith(".partial"))


WORKER = r"""
import hashlib, json, sys, time
import torch
torch.set_num_threads(1)
from transformers import AutoModel, AutoTokenizer
from repsim.activations.extract import extract
folder, slow, out, texts_file, pool = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
stall = int(sys.argv[6])  # > 0: the forward pass number `stall` waits forever (a process to kill at a known point)
texts = json.load(open(texts_file))
model = AutoModel.from_pretrained(folder).eval()
tok = AutoTokenizer.from_pretrained(folder)
calls = [0]
def hook(*_):
    calls[0] += 1
    time.sleep(3600 if calls[0] == stall else slow)
model.register_forward_pre_hook(hook)
acts = extract((model, tok), texts, pool=pool, batch_size=4, chunk_size=8, progress=False)
digest = hashlib.sha256(acts.stack().tobytes()).hexdigest()
json.dump({"calls": calls[0], "cache_hit": acts.meta["cache_hit"], "waited": acts.meta.get("waited"),
           "resumed": acts.meta.get("resumed_chunks"), "sha": digest, "path": acts.meta["path"]}, open(out, "w"))
"""


def _worker(tmp_path, folder, texts, *, slow: float, name: str, pool: str = "mean",
            stall: int = 0) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    texts_file = tmp_path / "texts.json"
    texts_file.write_text(json.dumps(texts))
    out = tmp_path / f"{name}.json"
    proc = subprocess.Popen([sys.executable, str(script), str(folder), str(slow), str(out), str(texts_file), pool,
                             str(stall)], env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return proc, out


# ------------------------------------------------------------------------------------ cache hits


def test_second_run_hits_cache_and_runs_no_forward(tiny_model):
    pair, calls = _pair_with_counter(tiny_model("bert"))
    texts = _texts(20)
    first = extract(pair, texts, batch_size=4, progress=False)
    assert calls[0] == 5 and first.meta["cache_hit"] is False
    second = extract(pair, texts, batch_size=4, progress=False)
    assert calls[0] == 5 and second.meta["cache_hit"] is True
    np.testing.assert_array_equal(first.stack(), second.stack())
    assert isinstance(second[0], np.memmap) and not second[0].flags.writeable
    # a different batch size reuses the entry too (batching does not change the features)
    extract(pair, texts, batch_size=7, progress=False)
    assert calls[0] == 5


def test_all_layer_entry_serves_layer_subsets(tiny_model):
    pair, calls = _pair_with_counter(tiny_model("bert"))
    texts = _texts(9)
    full = extract(pair, texts, batch_size=4, progress=False)
    part = extract(pair, texts, layers=[0, -1], batch_size=4, progress=False)
    assert calls[0] == 3 and part.layers == [0, 3] and part.meta["cache_hit"]
    np.testing.assert_array_equal(part.stack(), full.stack([0, 3]))
    assert len(_entries(Path(os.environ["REPSIM_CACHE"]))) == 1


def test_spec_string_cache_hit_and_store_equals_memory(tiny_model):
    folder = str(tiny_model("gpt2", padding_side="left"))
    texts = _texts(13)
    for pool in ("last", "tokens"):
        built = extract(folder, texts, pool=pool, batch_size=4, chunk_size=4, progress=False)
        hit = extract(folder, texts, pool=pool, batch_size=4, progress=False)
        mem = extract(folder, texts, pool=pool, batch_size=4, cache=False, progress=False)
        assert not built.meta["cache_hit"] and hit.meta["cache_hit"]
        np.testing.assert_array_equal(hit.stack(), mem.stack())
        if pool == "tokens":
            np.testing.assert_array_equal(hit.offsets, mem.offsets)
            np.testing.assert_array_equal(hit.token_ids, mem.token_ids)


def test_entry_key_covers_every_option(tiny_model, tmp_path):
    folder = str(tiny_model("bert"))
    texts = _texts(6)
    extract(folder, texts, progress=False)
    extract(folder, texts, progress=False)  # same key
    extract(folder, texts, pool="cls", progress=False)
    extract(folder, texts, max_length=8, progress=False)
    extract(folder, texts, layers=[0, 2], progress=False)  # served by the all-layer entry: no new entry
    extract(folder, texts[::-1], progress=False)
    extract(folder, texts, dtype="bfloat16", progress=False)
    extract(str(tiny_model("bert", seed=1)), texts, progress=False)
    root = Path(os.environ["REPSIM_CACHE"])
    assert len(_entries(root)) == 6
    meta = json.loads((_entries(root)[0] / "manifest.json").read_text())["meta"]
    keys = {store.entry_key(dict(meta, **change)) for change in
            ({}, {"layers": [0, 2]}, {"padding_side": "left"}, {"accumulate": "float64"}, {"revision": "x"},
             {"tokenizer": "y"}, {"n_texts": 1})}
    assert len(keys) == 7


def test_entry_files_are_plain_npy_and_json(tiny_model):
    acts = extract(str(tiny_model("llama")), _texts(9), pool="tokens", progress=False)
    path = Path(acts.meta["path"])
    manifest = json.loads((path / "manifest.json").read_text())
    names = sorted(p.name for p in path.iterdir())
    assert names == sorted(["manifest.json", "offsets.npy", "token_ids.npy",
                            *[f"layer_{k:03d}.npy" for k in acts.layers]])
    for name, spec in manifest["arrays"].items():
        arr = np.load(path / name, allow_pickle=False)
        assert list(arr.shape) == spec["shape"] and str(arr.dtype) == spec["dtype"]
    assert manifest["meta"]["model"] and manifest["meta"]["final_norm"] == "norm"
    assert manifest["key_fields"]["transformers_major"] >= 4


# ------------------------------------------------------------------------------------ damage


def test_flipped_byte_is_detected_and_rebuilt(tiny_model):
    folder = str(tiny_model("bert"))
    texts = _texts(10)
    acts = extract(folder, texts, progress=False)
    good = acts.stack()
    path = Path(acts.meta["path"])
    del acts
    target = path / "layer_002.npy"
    raw = bytearray(target.read_bytes())
    raw[-5] ^= 0x01
    target.write_bytes(bytes(raw))
    problems = verify_entry(path)
    assert len(problems) == 1 and "layer_002.npy" in problems[0]
    with pytest.raises(DamagedEntry, match="layer_002"):
        open_entry(path, verify=True)
    # CLI: info --verify says so and exits 1
    res = subprocess.run([sys.executable, "-m", "repsim", "cache", "info", path.name[:12], "--verify"],
                         capture_output=True, text=True, env=dict(os.environ))
    assert res.returncode == 1 and "DAMAGED" in res.stdout
    # a new process (first open verifies) rebuilds with a warning
    store._VERIFIED.clear()
    with pytest.warns(UserWarning, match="damaged.*rebuilding"):
        again = extract(folder, texts, progress=False)
    assert again.meta["cache_hit"] is False
    np.testing.assert_array_equal(again.stack(), good)
    assert verify_entry(path) == []


def test_truncated_array_file_is_detected(tiny_model):
    acts = extract(str(tiny_model("bert")), _texts(5), progress=False)
    path = Path(acts.meta["path"])
    del acts
    f = path / "layer_000.npy"
    f.write_bytes(f.read_bytes()[:-16])
    with pytest.raises(DamagedEntry):
        open_entry(path, verify=False)  # even without checksums the shape check fails


# ------------------------------------------------------------------------------------ crashes and concurrency


def test_kill_9_then_resume_is_bitwise_equal(tiny_model, tmp_path, monkeypatch):
    folder = tiny_model("bert")
    texts = _texts(64, seed=3)  # 16 batches of 4, chunks of 2 batches
    # the 7th forward pass never returns: 3 chunks are flushed and the process is alive when killed, however
    # slowly a loaded machine runs either process
    proc, _ = _worker(tmp_path, folder, texts, slow=0.05, name="killed", stall=7)
    root = Path(os.environ["REPSIM_CACHE"]) / "activations"
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        progs = list(root.glob("*.partial/shard-000/progress.json")) if root.exists() else []
        if progs:
            done = json.loads(progs[0].read_text())["chunks_done"]
            if done >= 3:
                break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    proc.kill()  # SIGKILL: no cleanup handlers run
    proc.wait()
    progs = list(root.glob("*.partial/shard-000/progress.json"))
    assert len(progs) == 1 and not _entries(root.parent)
    done = json.loads(progs[0].read_text())["chunks_done"]
    assert done == 3
    pair, calls = _pair_with_counter(folder)
    resumed = extract(pair, texts, batch_size=4, chunk_size=8, progress=False)
    assert resumed.meta["resumed_chunks"] == done
    assert calls[0] == 16 - 2 * done
    assert not list(root.glob("*.partial"))
    # an uninterrupted run in a fresh cache
    monkeypatch.setenv("REPSIM_CACHE", str(tmp_path / "fresh"))
    pair2, calls2 = _pair_with_counter(folder)
    fresh = extract(pair2, texts, batch_size=4, chunk_size=8, progress=False)
    assert calls2[0] == 16
    for k in fresh.layers:
        assert np.array_equal(np.asarray(resumed[k]), np.asarray(fresh[k]))  # bitwise
    m1 = json.loads((Path(resumed.meta["path"]) / "manifest.json").read_text())
    m2 = json.loads((Path(fresh.meta["path"]) / "manifest.json").read_text())
    assert {n: a["sha256"] for n, a in m1["arrays"].items()} == {n: a["sha256"] for n, a in m2["arrays"].items()}


def test_two_processes_one_key_give_one_entry(tiny_model, tmp_path):
    folder = tiny_model("bert")
    texts = _texts(32, seed=5)  # 8 batches
    procs = [_worker(tmp_path, folder, texts, slow=0.05, name=f"w{i}", pool="tokens") for i in range(2)]
    results = []
    for proc, out in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err.decode()[-2000:]
        results.append(json.loads(out.read_text()))
    root = Path(os.environ["REPSIM_CACHE"])
    entries = _entries(root)
    assert len(entries) == 1 and verify_entry(entries[0]) == []
    assert sorted(r["calls"] for r in results) == [0, 8]  # one process computed, the other read its entry
    assert sorted(r["cache_hit"] for r in results) == [False, True]
    assert results[0]["sha"] == results[1]["sha"]
    assert not list((root / "activations").glob("*.partial"))


def test_partial_from_other_plan_is_discarded(tiny_model):
    """A partial build made with other batches cannot be resumed: it is thrown away, not mixed in."""
    pair, calls = _pair_with_counter(tiny_model("bert"))
    texts = _texts(12)
    with pytest.raises(KeyboardInterrupt):
        extract(pair, texts, batch_size=4, chunk_size=4, progress=False, on_batch=_stop_after(1))
    root = Path(os.environ["REPSIM_CACHE"]) / "activations"
    assert len(list(root.glob("*.partial"))) == 1
    calls[0] = 0
    acts = extract(pair, texts, batch_size=3, chunk_size=3, progress=False)
    assert acts.meta["resumed_chunks"] == 0 and calls[0] == 4
    ref = extract(pair, texts, batch_size=4, cache=False, progress=False)
    np.testing.assert_allclose(acts.stack(), ref.stack(), rtol=1e-5, atol=1e-6)


def _stop_after(n: int):
    def on_batch(j: int) -> None:
        if j >= n:
            raise KeyboardInterrupt
    return on_batch


# ------------------------------------------------------------------------------------ management and CLI


def test_store_list_info_rm_prune(tiny_model):
    folder = str(tiny_model("bert"))
    a = extract(folder, _texts(5), progress=False)
    b = extract(folder, _texts(6, seed=1), progress=False)
    s = Store()
    keys = {e.key for e in s.entries()}
    assert keys == {Path(a.meta["path"]).name, Path(b.meta["path"]).name}
    info = s.info(Path(a.meta["path"]).name, verify=True)
    assert info["verified"] and info["meta"]["n_texts"] == 5
    old = time.time() - 10 * 86400
    os.utime(a.meta["path"], (old, old))
    assert [e.key for e in s.prune(older_than_days=5, dry_run=True)] == [Path(a.meta["path"]).name]
    assert {e.key for e in s.entries()} == keys
    s.prune(older_than_days=5)
    assert {e.key for e in s.entries()} == {Path(b.meta["path"]).name}
    s.prune(max_size=0)
    assert s.entries() == []
    assert store.parse_size("1.5KB") == 1536 and store.parse_size("2G") == 2 * 1024 ** 3


def test_cli_extract_and_cache(tiny_model, tmp_path):
    folder = str(tiny_model("bert"))
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(_texts(7)) + "\n")
    env = dict(os.environ)
    run = lambda *a: subprocess.run([sys.executable, "-m", "repsim", *a], capture_output=True, text=True, env=env)  # noqa: E731
    res = run("extract", folder, "--data", str(data), "--layers", "0", "-1", "--quiet")
    assert res.returncode == 0, res.stderr
    assert "7 texts" in res.stdout and "2 layers x (7, 32)" in res.stdout
    res = run("cache", "list")
    assert res.returncode == 0 and "1 entries" in res.stdout
    key = Store().entries()[0].key
    res = run("cache", "rm", key)
    assert res.returncode == 0 and Store().entries() == []


def test_cli_prune_dry_run_reports_what_would_be_left(tiny_model, capsys):
    from repsim.cli import main

    folder = str(tiny_model("bert"))
    for seed in range(3):
        extract(folder, _texts(5 + seed, seed=seed), progress=False)
    entries = Store().entries()
    total = sum(e.size_bytes for e in entries)
    smallest = min(e.size_bytes for e in entries)
    assert main(["cache", "prune", "--max-size", str(smallest), "--dry-run"]) == 0
    out = capsys.readouterr().out
    would = [e for e in entries if e.key in {line.split()[-1] for line in out.splitlines()
                                             if line.startswith("would remove")}]
    assert would and len(Store().entries()) == 3  # nothing removed
    left = total - sum(e.size_bytes for e in would)
    assert left <= smallest
    assert f"{len(would)} entries would be removed; {store.human_size(left)} would be left in" in out
    assert main(["cache", "prune", "--max-size", str(smallest)]) == 0
    assert f"{store.human_size(Store().total_size())} left in" in capsys.readouterr().out
    assert Store().total_size() == left


def test_cache_actions_answer_to_their_usual_aliases(tiny_model, capsys):
    from repsim.cli import main

    extract(str(tiny_model("bert")), _texts(5), progress=False)
    key = Store().entries()[0].key
    assert main(["cache", "list"]) == 0
    listed = capsys.readouterr().out
    assert main(["cache", "ls"]) == 0
    assert capsys.readouterr().out == listed and key in listed
    assert main(["cache", "show", key[:10]]) == 0
    assert key in capsys.readouterr().out
    assert main(["cache", "remove", key]) == 0
    assert Store().entries() == []


def test_output_to_a_closed_pipe_stops_quietly(tiny_model, tmp_path):
    """`repsim ... | head`: the reader goes away before repsim writes; no BrokenPipeError traceback, status 141
    (128 + SIGPIPE) as for other command-line tools."""
    folder = str(tiny_model("bert"))
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(_texts(6)) + "\n")
    assert subprocess.run([sys.executable, "-m", "repsim", "extract", folder, "--data", str(data), "--quiet"],
                          capture_output=True, env=dict(os.environ)).returncode == 0
    key = Store().entries()[0].key
    for args in (["cache", "info", key, "--json"], ["cache", "list"], ["compare", "--help"]):
        proc = subprocess.Popen([sys.executable, "-m", "repsim", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=dict(os.environ))
        proc.stdout.close()  # the reader is gone before repsim prints anything
        err = proc.stderr.read().decode()
        # (argparse's --help swallows the failed write itself and exits 0)
        assert proc.wait(timeout=120) == (0 if "--help" in args else 141), (args, err)
        assert err == "", (args, err)


def test_cache_damage_warning_is_one_repsim_line(tiny_model, tmp_path):
    folder = str(tiny_model("bert"))
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(_texts(6)) + "\n")
    run = lambda: subprocess.run([sys.executable, "-m", "repsim", "extract", folder, "--data", str(data),  # noqa: E731
                                  "--quiet"], capture_output=True, text=True, env=dict(os.environ))
    assert run().returncode == 0
    target = Path(Store().entries()[0].path) / "layer_001.npy"
    raw = bytearray(target.read_bytes())
    raw[-3] ^= 0x01
    target.write_bytes(bytes(raw))
    res = run()
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert any(ln.startswith("repsim: warning: activation cache entry") and "damaged" in ln for ln in lines), lines
    assert "UserWarning" not in res.stderr and "warnings.warn" not in res.stderr and ".py:" not in res.stderr


def test_cli_no_cache_writes_nothing(tiny_model, tmp_path, capsys):
    from repsim.cli import main

    data = tmp_path / "texts.txt"
    data.write_text("\n".join(_texts(5)) + "\n")
    assert main(["extract", str(tiny_model("bert")), "--data", str(data), "--no-cache", "--quiet"]) == 0
    assert "5 texts" in capsys.readouterr().out
    assert Store().entries() == []


def test_cli_bad_input_is_one_line_exit_2(tiny_model, tmp_path):
    folder = str(tiny_model("bert"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    good = tmp_path / "good.txt"
    good.write_text("one text\nanother text\n")
    cases = {
        "missing data file": ["extract", folder, "--data", str(tmp_path / "nope.txt")],
        "empty data": ["extract", folder, "--data", str(empty)],
        "unknown layer": ["extract", folder, "--data", str(good), "--layers", "9"],
        "unknown model": ["extract", str(tmp_path / "no-model"), "--data", str(good)],
        "unknown cache key": ["cache", "info", "zzzz"],
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "repsim", *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=dict(os.environ))
             for name, args in cases.items()}
    errors = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, err)
        lines = [ln for ln in err.splitlines() if ln.strip() and "Loading" not in ln]
        assert len(lines) == 1 and lines[0].startswith("repsim: error:"), (name, err)
        errors[name] = lines[0]
    assert "nope.txt" in errors["missing data file"]
    assert "unknown layer index 9" in errors["unknown layer"]
    root = Path(os.environ["REPSIM_CACHE"]) / "activations"
    assert not root.exists() or not list(root.glob("*.partial"))
