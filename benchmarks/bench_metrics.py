"""In-memory metrics against straightforward implementations of their definitions, timed in the same run.

    python benchmarks/bench_metrics.py [--n 2000] [--p 768] [--q 384] [--device cpu|cuda] [--repeats 3]

Baselines (numpy/scipy, float64, what a careful user would write from the definitions): CKA and debiased CKA from
explicit n × n Gram matrices and the centring matrix H; Procrustes by scipy's orthogonal_procrustes on
zero-padded features; Gram-Frobenius from explicit n × n Gram matrices; the projection residual by numpy's lstsq
(in-sample, and a 5-fold loop). repsim runs on ``--device`` (torch tensors there); each value is checked
against its baseline, and on a GPU also against repsim on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import scipy.linalg
import torch

from repsim.measures import functions as metrics


def normalised(A: np.ndarray) -> np.ndarray:
    A = A - A.mean(axis=0)
    return A / np.linalg.norm(A)


def baseline_cka(X: np.ndarray, Y: np.ndarray) -> float:
    n = X.shape[0]
    H = np.eye(n) - 1.0 / n
    K, L = H @ (X @ X.T) @ H, H @ (Y @ Y.T) @ H
    return float(np.sum(K * L) / (np.linalg.norm(K) * np.linalg.norm(L)))


def baseline_debiased_cka(X: np.ndarray, Y: np.ndarray) -> float:
    def u_centre(K: np.ndarray) -> np.ndarray:
        n = K.shape[0]
        K = K.copy()
        np.fill_diagonal(K, 0)
        means = K.sum(axis=0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        K -= means[:, None] + means[None, :]
        np.fill_diagonal(K, 0)
        return K

    K, L = u_centre(X @ X.T), u_centre(Y @ Y.T)
    return float(np.sum(K * L) / (np.linalg.norm(K) * np.linalg.norm(L)))


def baseline_procrustes(X: np.ndarray, Y: np.ndarray) -> float:
    Xn, Yn = normalised(X), normalised(Y)
    width = max(Xn.shape[1], Yn.shape[1])
    Xp, Yp = (np.pad(A, ((0, 0), (0, width - A.shape[1]))) for A in (Xn, Yn))
    R, _ = scipy.linalg.orthogonal_procrustes(Yp, Xp)
    return float(np.linalg.norm(Yp @ R - Xp))


def baseline_gram_frobenius(X: np.ndarray, Y: np.ndarray) -> float:
    Xn, Yn = normalised(X), normalised(Y)
    return float(np.linalg.norm(Xn @ Xn.T - Yn @ Yn.T))


def baseline_residual(X: np.ndarray, Y: np.ndarray) -> float:
    Xn, Yn = normalised(X), normalised(Y)
    return float(np.linalg.norm(Xn - Yn @ np.linalg.lstsq(Yn, Xn, rcond=None)[0]) ** 2)


def baseline_heldout_residual(X: np.ndarray, Y: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    Xn, Yn = normalised(X), normalised(Y)
    n = Xn.shape[0]
    total = 0.0
    for test in np.array_split(np.random.default_rng(seed).permutation(n), folds):
        train = np.setdiff1d(np.arange(n), test)
        mx, my = Xn[train].mean(axis=0), Yn[train].mean(axis=0)
        W = np.linalg.lstsq(Yn[train] - my, Xn[train] - mx, rcond=None)[0]
        total += np.linalg.norm(Xn[test] - mx - (Yn[test] - my) @ W) ** 2
    return float(total)


CASES: list[tuple[str, Callable[..., float], Callable[[np.ndarray, np.ndarray], float]]] = [
    ("procrustes[distance]", metrics.procrustes, baseline_procrustes),
    ("gram_frobenius", metrics.gram_frobenius, baseline_gram_frobenius),
    ("cka[linear,biased]", metrics.cka, baseline_cka),
    ("cka[linear,debiased]", lambda X, Y: metrics.cka(X, Y, estimator="debiased"), baseline_debiased_cka),
    ("projection_residual[in_sample]", metrics.projection_residual, baseline_residual),
    ("projection_residual[folds=5]", lambda X, Y: metrics.projection_residual(X, Y, folds=5),
     baseline_heldout_residual),
]


def timed(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> tuple[float, object]:
    value = fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--p", type=int, default=768)
    parser.add_argument("--q", type=int, default=384)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    X = rng.standard_normal((args.n, args.p))
    Y = np.tanh(X @ rng.standard_normal((args.p, args.q)) / np.sqrt(args.p)) + 0.5 * rng.standard_normal(
        (args.n, args.q))
    device = torch.device(args.device)
    Xd, Yd = torch.tensor(X, device=device), torch.tensor(Y, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"n={args.n} p={args.p} q={args.q} float64; repsim on {name}; baseline numpy/scipy on CPU")
    print(f"{'metric':32s} {'repsim s':>10s} {'baseline s':>11s} {'speed-up':>9s} {'|Δ| vs baseline':>16s}")
    for metric_id, ours, baseline in CASES:
        t_ours, value = timed(lambda ours=ours: ours(Xd, Yd), args.repeats, sync)
        t_base, expected = timed(lambda baseline=baseline: baseline(X, Y), 1, lambda: None)
        error = abs(float(value) - expected)
        line = f"{metric_id:32s} {t_ours:10.4f} {t_base:11.3f} {t_base / t_ours:8.1f}× {error:16.2e}"
        if device.type != "cpu":
            line += f"   |Δ| vs repsim on CPU {abs(float(value) - float(ours(X, Y))):.2e}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
