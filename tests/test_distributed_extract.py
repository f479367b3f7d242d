"""Sharded extraction under torch.distributed (gloo, 2 CPU processes) equals one process.

Each rank extracts its shard of the batches into its own shard files of the store entry and rank 0 writes the
manifest; streamed moments are summed with all_reduce. The entry must be bitwise the same as a one-process
entry (same batches, same arithmetic), and the metrics the same up to summation order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from repsim.activations.extract import extract, extract_moments

WORDS = "the a movie film is was good bad great terrible funny boring and but not very plot acting story".split()
METRICS = ("procrustes[distance]", "cka[linear,biased]", "gram_frobenius")


def _texts(n: int) -> list[str]:
    rng = np.random.default_rng(11)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 20)))) for _ in range(n)]


def _run_all(teacher: str, student: str, texts: list[str]) -> dict:
    """What both the distributed and the single-process run compute."""
    out = {}
    for pool in ("mean", "tokens"):
        acts = extract(teacher, texts, pool=pool, batch_size=4, chunk_size=8, progress=False)
        manifest = json.loads((Path(acts.meta["path"]) / "manifest.json").read_text())
        out[pool] = {"stack": acts.stack(), "sha": {n: a["sha256"] for n, a in manifest["arrays"].items()},
                     "hit": acts.meta["cache_hit"], "world": manifest["meta"]["world_size"]}
    out["memory"] = extract(teacher, texts, pool="last", batch_size=4, cache=False, progress=False).stack()
    moments = extract_moments(teacher, student, texts, batch_size=4, progress=False)
    out["n"] = moments.n
    out["metrics"] = {m: moments.matrix(m) for m in METRICS}
    return out


def _worker(rank: int, world: int, init_file: str, cache: str, teacher: str, student: str, texts: list[str],
            out_dir: str) -> None:
    os.environ["REPSIM_CACHE"] = cache
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        res = _run_all(teacher, student, texts)
        # a second distributed call finds the finished entry
        again = extract(teacher, texts, pool="mean", batch_size=4, progress=False)
        res["second_hit"] = again.meta["cache_hit"]
        np.savez(Path(out_dir) / f"rank{rank}.npz", mean=res["mean"]["stack"], tokens=res["tokens"]["stack"],
                 memory=res["memory"], **{f"m_{i}": res["metrics"][m] for i, m in enumerate(METRICS)})
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(
            {"sha_mean": res["mean"]["sha"], "sha_tokens": res["tokens"]["sha"], "n": res["n"],
             "world": res["mean"]["world"], "hit": res["mean"]["hit"], "second_hit": res["second_hit"]}))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_gloo_ranks_equal_one_process(tiny_model, tmp_path, monkeypatch):
    teacher, student = str(tiny_model("llama", padding_side="left")), str(tiny_model("llama", seed=1))
    texts = _texts(37)  # 10 batches of 4 (the last one short): ranks get 5 batches each
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "dist-cache"), teacher, student, texts,
                            str(out_dir)), nprocs=2, join=True)
    monkeypatch.setenv("REPSIM_CACHE", str(tmp_path / "single-cache"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _run_all(teacher, student, texts)
    finally:
        torch.set_num_threads(before)
    for rank in (0, 1):
        info = json.loads((out_dir / f"rank{rank}.json").read_text())
        arrays = np.load(out_dir / f"rank{rank}.npz")
        assert info["world"] == 2 and info["hit"] is False and info["second_hit"] is True
        assert info["sha_mean"] == single["mean"]["sha"] and info["sha_tokens"] == single["tokens"]["sha"]
        np.testing.assert_array_equal(arrays["mean"], single["mean"]["stack"])  # every rank sees everything
        np.testing.assert_array_equal(arrays["tokens"], single["tokens"]["stack"])
        np.testing.assert_array_equal(arrays["memory"], single["memory"])
        assert info["n"] == single["n"] == len(texts)
        for i, m in enumerate(METRICS):
            np.testing.assert_allclose(arrays[f"m_{i}"], single["metrics"][m], rtol=1e-9, atol=1e-12)
    assert single["mean"]["world"] == 1
    entries = [p for p in (tmp_path / "dist-cache" / "activations").iterdir() if p.is_dir()]
    assert len(entries) == 2 and not any(p.name.endswith(".partial") for p in entries)
