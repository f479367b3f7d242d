"""projection_residual[folds=5] against [folds=5,ridge=auto] (and its reverse) on the embedded default pair.

All 91 layer pairs through ``repsim.pairwise`` on the cached activations of all-mpnet-base-v2 and all-MiniLM-L6-v2
(sst2, mean pooling), at n = 872 and a seeded 600 of them: time (best of 2), range, best student layer per
teacher layer, and the λ that generalised cross-validation chose. Run with OMP_NUM_THREADS=1 MKL_NUM_THREADS=1.
"""
import time

import numpy as np
import torch

from repsim.activations.data import load_texts
from repsim.activations.extract import extract
from repsim.measures.allpairs import pairwise
from repsim.measures.arrays import prepare
from repsim.measures.families.projection_residual import held_out_fits


def main() -> None:
    data = load_texts("sst2")
    T = extract("sentence-transformers/all-mpnet-base-v2", data, progress=False)
    S = extract("sentence-transformers/all-MiniLM-L6-v2", data, progress=False)
    tl = [np.asarray(T.arrays[l]) for l in T.layers]
    sl = [np.asarray(S.arrays[l]) for l in S.layers]
    for n in (872, 600):
        rows = np.sort(np.random.default_rng(0).choice(872, n, replace=False)) if n < 872 else np.arange(872)
        t = [x[rows] for x in tl]
        s = [y[rows] for y in sl]
        for m in ("projection_residual[folds=5]", "projection_residual[folds=5,ridge=auto]",
                  "projection_residual[folds=5,ridge=auto,reverse]"):
            best = []
            for _ in range(2):
                t0 = time.perf_counter()
                v = pairwise(t, s, [m])[m]
                best.append(time.perf_counter() - t0)
            print(f"n={n} {m}: {min(best):.2f} s (best of 2), range {v.min():.3f}..{v.max():.3f}, "
                  f"best student per teacher {v.argmin(1).tolist()}", flush=True)
        chosen = []
        held_out_fits([prepare(torch.as_tensor(y, dtype=torch.float64), True, "s") for y in s],
                      [prepare(torch.as_tensor(x, dtype=torch.float64), True, "t") for x in t], 5, "auto",
                      chosen=chosen)
        lam = chosen[0]
        print(f"n={n} chosen λ (unit-Frobenius data): {lam.min():.3g}..{lam.max():.3g}, median {lam.median():.3g}")


if __name__ == "__main__":
    main()
