"""Peak memory and time of repsim.pairwise at large n: the default metrics beside the four linear metrics alone.

Workload: 13 teacher layers of width 768 × 7 student layers of width 384, float32 inputs (as stored activations
are), rows sharing a 64-dimensional signal plus noise and an offset; n = 5,000, 20,000, 50,000 by default.
Each case runs in a fresh subprocess (so one case's allocations cannot hide another's): the child builds its
inputs, records its resident set (RSS, from /proc/self/statm) and its peak so far (ru_maxrss), runs pairwise once,
and reports the time and the new peak. "increase" = peak after − RSS before, the memory pairwise itself added
(valid when the peak after exceeds the peak before, which the table states). The documented budget is one
float64 copy of the inputs (n·(Σp + Σq)·8 bytes) plus the chunk budget (1 GiB on the CPU).

    python benchmarks/bench_scale.py                       # n = 5000 20000 50000, one thread
    python benchmarks/bench_scale.py --n 5000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

LINEAR4 = ("procrustes[distance]", "gram_frobenius", "cka[linear,biased]", "projection_residual[in_sample]")
GIB = 1 << 30


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(n: int, which: str, threads: int) -> None:
    import torch

    from repsim.measures.allpairs import pairwise
    from repsim.measures.functions import DEFAULT_METRICS

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, 64, generator=g)
    teacher = [base @ torch.randn(64, 768, generator=g) + torch.randn(n, 768, generator=g) + 3.0 for _ in range(13)]
    student = [base @ torch.randn(64, 384, generator=g) + torch.randn(n, 384, generator=g) - 1.0 for _ in range(7)]
    del base
    metrics = list(DEFAULT_METRICS) if which == "default" else list(LINEAR4)
    before = rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    pairwise(teacher, student, metrics=metrics, device="cpu")
    seconds = time.perf_counter() - t0
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"n": n, "metrics": which, "seconds": seconds, "rss_before": before,
                      "peak_before": peak_before, "peak_after": peak_after}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[5000, 20000, 50000])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", nargs=2, metavar=("N", "WHICH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(int(args.child[0]), args.child[1], args.threads)
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads))
    print(f"# {platform.machine()} {os.cpu_count()} CPUs, {args.threads} thread(s), python {platform.python_version()}")
    print("| n | metrics | time (s) | peak increase (GiB) | documented budget (GiB) | inputs float32 (GiB) |")
    print("|---|---|---|---|---|---|")
    for n in args.n:
        inputs = n * (13 * 768 + 7 * 384) * 4
        budget = 2 * inputs + GIB
        for which in ("linear4", "default"):
            proc = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--child", str(n),
                                   which], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"| {n} | {which} | failed: {proc.stderr.strip().splitlines()[-1:]} | | | |")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            increase = r["peak_after"] - r["rss_before"]
            note = "" if r["peak_after"] > r["peak_before"] else " (peak not raised by pairwise)"
            print(f"| {n} | {which} | {r['seconds']:.1f} | {increase / GIB:.2f}{note} | {budget / GIB:.2f} | "
                  f"{inputs / GIB:.2f} |", flush=True)


if __name__ == "__main__":
    main()
