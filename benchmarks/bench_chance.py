"""Cost of the chance levels next to the plain metric pass on the embedded default (872 texts, 13 × 768 vs 7 × 384).

In one process, alternating, ``--repeats`` times each:
  1. the metric pass: ``repsim.measures.allpairs.pairwise`` of the four default metrics (what `compare` times as
     "metrics"),
  2. the chance pass: ``repsim.analysis.stats.permutation_replicates`` with K student-row permutations (default 4) of
  the
     metrics that get chance levels by default (all but the k-fold residual), what `compare` adds by default.
Reads the activations from the cache (extracting them on a cold cache). Prints seconds and the ratio chance/metrics.

    python benchmarks/bench_chance.py [--permutations 4] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--permutations", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch

    from repsim.activations import assets
    from repsim.activations.data import load_texts
    from repsim.activations.extract import extract
    from repsim.analysis import stats
    from repsim.analysis.comparison import check_stats_metrics
    from repsim.measures.allpairs import pairwise
    from repsim.measures.functions import DEFAULT_METRICS

    if args.threads:
        torch.set_num_threads(args.threads)
    texts = load_texts("sst2")
    t_act = extract(assets.DEFAULT_TEACHER, texts, pool="mean", progress=False)
    s_act = extract(assets.DEFAULT_STUDENT, texts, pool="mean", progress=False)
    teacher = [np.array(t_act[k]) for k in t_act.layers]
    student = [np.array(s_act[k]) for k in s_act.layers]
    chance_ids = check_stats_metrics(None, list(DEFAULT_METRICS))
    print(f"{platform.machine()} {torch.get_num_threads()} torch threads; n = {teacher[0].shape[0]}, "
          f"{len(teacher)} x {teacher[0].shape[1]} vs {len(student)} x {student[0].shape[1]}; "
          f"chance metrics {chance_ids}, K = {args.permutations}")
    rows = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        pairwise(teacher, student, DEFAULT_METRICS)
        metrics_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats.permutation_replicates(teacher, student, chance_ids, args.permutations, seed=1)
        chance_s = time.perf_counter() - t0
        rows.append((metrics_s, chance_s))
        print(f"repeat {r}: metric pass {metrics_s:.2f} s, chance ({args.permutations} permutations) {chance_s:.2f} s, "
              f"ratio {chance_s / metrics_s:.2f}", flush=True)
    m, c = np.median(np.array(rows), axis=0)
    print(f"median: metric pass {m:.2f} s, chance {c:.2f} s, ratio {c / m:.2f}")


if __name__ == "__main__":
    main()
