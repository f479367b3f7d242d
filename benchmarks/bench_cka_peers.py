"""Linear CKA over all layer pairs: repsim.pairwise against the peers ckatorch and pytorch-cka, same stacks.

Stacks: 13 teacher layers of width 768 × 7 student layers of width 384, n = 5000 (as bench_pairwise.py).

- ckatorch (``ckatorch.core.cka_base``, full batch, biased linear CKA, float64): called per pair, as the package
  does for a layer grid; it forms both n×n Gram matrices for every pair. Timed on --peer-pairs pairs and scaled
  linearly to all pairs (every pair has the same shapes); compared with ``cka[linear,biased]``.
- pytorch-cka (``cka.cka_from_features``, all pairs in one call, debiased/unbiased-HSIC CKA): forms the n×n Gram
  of every layer once. Fed float32 features (its memory in float64 would be 20 Gram matrices of n² doubles);
  compared with ``cka[linear,debiased]`` (float64); ``--pytorch-cka-dtype float64`` for a like-for-like run.
Peers that are not installed are skipped with a note (``pip install ckatorch pytorch-cka``).

    python benchmarks/bench_cka_peers.py [--n 5000] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import time

import numpy as np
import torch

from repsim.measures.allpairs import pairwise


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--teacher-layers", type=int, default=13)
    ap.add_argument("--student-layers", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peer-repeats", type=int, default=2)
    ap.add_argument("--peer-pairs", type=int, default=2, help="pairs timed for the per-pair peer (ckatorch)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--pytorch-cka-dtype", choices=("float32", "float64"), default="float32",
                    help="features fed to pytorch-cka (float64 holds 20 n×n Gram matrices: ~4 GB at n=5000)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench_pairwise import make_stacks

    lt, ls = args.teacher_layers, args.student_layers
    pairs = lt * ls
    teacher, student = make_stacks(args.n, lt, 768, ls, 384, torch.device("cpu"))
    print(f"machine: {platform.machine()} CPU, {torch.get_num_threads()} torch threads; n={args.n}, {lt}×768 vs "
          f"{ls}×384 ({pairs} pairs); ours median of {args.repeats}, peers median of {args.peer_repeats}")

    pairwise(teacher[:1], student[:1], metrics=["cka"])  # warm-up
    t_b, ours_b = timed(lambda: pairwise(teacher, student, metrics=["cka[linear,biased]"]), args.repeats)
    t_d, ours_d = timed(lambda: pairwise(teacher, student, metrics=["cka[linear,debiased]"]), args.repeats)
    ours_b, ours_d = ours_b["cka[linear,biased]"], ours_d["cka[linear,debiased]"]
    print(f"repsim.pairwise cka[linear,biased]:   {t_b:8.3f} s")
    print(f"repsim.pairwise cka[linear,debiased]: {t_d:8.3f} s")

    if importlib.util.find_spec("ckatorch") is None:
        print("ckatorch: not installed, skipped")
    else:
        from ckatorch.core import cka_base

        k = min(args.peer_pairs, pairs)
        idx = [(i // ls, i % ls) for i in range(k)]
        t_k, vals = timed(lambda: [float(cka_base(teacher[i], student[j])) for i, j in idx], args.peer_repeats)
        diff = max(abs(v - ours_b[i, j]) for v, (i, j) in zip(vals, idx, strict=True))
        t_all = t_k * pairs / k
        print(f"ckatorch cka_base (full batch, biased): {t_all:8.3f} s  ({k} pairs timed {t_k:.3f} s, ×{pairs}/{k}); "
              f"max |Δ| vs repsim {diff:.1e}")
        print(f"RATIO ckatorch / repsim (biased):       {t_all / t_b:6.1f}×  (aim ≥ 5)")

    if importlib.util.find_spec("cka") is None or importlib.util.find_spec("cka.hsic") is None:
        print("pytorch-cka: not installed, skipped")
    else:
        from cka import cka_from_features

        dt = getattr(torch, args.pytorch_cka_dtype)
        tp = [x.to(dt) for x in teacher]
        sp = [y.to(dt) for y in student]
        t_p, peer = timed(lambda: cka_from_features(tp, sp), args.peer_repeats)
        diff = float(np.abs(np.asarray(peer, dtype=np.float64) - ours_d).max())
        print(f"pytorch-cka cka_from_features ({args.pytorch_cka_dtype}, debiased): {t_p:8.3f} s; "
              f"max |Δ| vs repsim {diff:.1e}")
        print(f"RATIO pytorch-cka / repsim (debiased):  {t_p / t_d:6.1f}×  (aim ≥ 5)")


if __name__ == "__main__":
    main()
