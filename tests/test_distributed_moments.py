"""all_reduce across torch.distributed ranks (gloo, 2 CPU processes) equals one process seeing every row."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from repsim.measures.moments import CrossMoments, LayerMoments

WORLD = 2
SPLIT = 37  # rank 0 gets rows [0, 37), rank 1 the rest: uneven shards


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((100, 5)) * 1e-2 + 1e6  # large common offset, small spread
    Y = (X[:, :2] - 1e6) @ rng.standard_normal((2, 3)) + rng.standard_normal((100, 3)) * 1e-2 - 3e5
    T = [rng.standard_normal((100, p)) for p in (4, 6)]
    S = [T[1][:, :3] + rng.standard_normal((100, 3))]
    return X, Y, T, S


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        X, Y, T, S = _data()
        rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        cm = CrossMoments(5, 3)
        for start in range(rows.start or 0, rows.stop or 100, 16):  # several uneven batches per rank
            stop = min(start + 16, rows.stop or 100)
            cm.update(X[start:stop], Y[start:stop])
        cm.all_reduce()
        torch.save(cm.state_dict(), f"{out_dir}/cross{rank}.pt")

        lm = LayerMoments([4, 6], [3])
        lm.update([t[rows] for t in T], [s[rows] for s in S])
        lm.all_reduce(group=dist.group.WORLD)
        torch.save(lm.state_dict(), f"{out_dir}/layers{rank}.pt")

        only0 = CrossMoments(5, 3)  # rank 1 contributes no rows at all
        if rank == 0:
            only0.update(X, Y)
        only0.all_reduce()
        torch.save(only0.state_dict(), f"{out_dir}/only0_{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return tmp


def _load(path, cls=CrossMoments):
    return cls.from_state_dict(torch.load(path, weights_only=True))


CROSS_IDS = ("procrustes[distance]", "gram_frobenius", "cka[linear,biased]", "cka[linear,debiased]",
             "projection_residual[in_sample]")


def test_all_reduce_cross_moments_equals_single_process(reduced):
    X, Y, _, _ = _data()
    single = CrossMoments(5, 3).update(X, Y)
    for rank in range(WORLD):
        got = _load(reduced / f"cross{rank}.pt")
        assert got.n == 100
        for mid in CROSS_IDS:
            assert got.value(mid) == pytest.approx(single.value(mid), rel=1e-10, abs=1e-10), (rank, mid)
        np.testing.assert_allclose(got.cross.numpy(), single.cross.numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got.teacher_mean.numpy(), X.mean(axis=0), rtol=1e-15)


def test_all_reduce_layer_moments_equals_single_process(reduced):
    _, _, T, S = _data()
    single = LayerMoments([4, 6], [3]).update(T, S)
    for rank in range(WORLD):
        got = _load(reduced / f"layers{rank}.pt", LayerMoments)
        for mid in CROSS_IDS + ("procrustes[angular]",):
            np.testing.assert_allclose(got.matrix(mid), single.matrix(mid), atol=1e-10, err_msg=mid)


def test_all_reduce_with_an_empty_rank(reduced):
    X, Y, _, _ = _data()
    single = CrossMoments(5, 3).update(X, Y)
    for rank in range(WORLD):
        got = _load(reduced / f"only0_{rank}.pt")
        assert got.n == 100
        assert got.cka("debiased") == pytest.approx(single.cka("debiased"), rel=1e-12, abs=1e-12)
