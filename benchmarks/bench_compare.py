"""Benchmark of `repsim compare` on the embedded default (872 texts, 13 × 7 layers, four metrics), end to end.

Runs the command line three times in fresh processes and reads the stage timings from report.json:
  1. cold: an empty cache folder (model assets unpacked, activations extracted),
  2. warm: the same cache (activations read from the store),
  3. warm with `--bootstrap B` (default 200) on the statistics metrics (default: all four).
Prints a table of seconds per stage and the ratios warm/cold and bootstrap/no-bootstrap.

    python benchmarks/bench_compare.py [--max-samples N] [--bootstrap B] [--stats-metrics ...] [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from compare_process import run_compare

STAGES = ("load", "extract", "metrics", "bootstrap", "plots")


def run(label: str, cache: Path, out: Path, extra: list[str], assets: Path | None = None) -> dict:
    report, wall, _ = run_compare(label, extra, cache, out, assets)
    timings = {k: float(v) for k, v in report["timings"].items() if isinstance(v, (int, float))}
    timings["wall"] = wall
    print(f"[{label}] wall {wall:.1f}s  " + "  ".join(f"{k} {timings.get(k, 0):.1f}s" for k in STAGES), flush=True)
    return timings


def synthetic(device: str, replicates: int, generic_replicates: int) -> None:
    """Statistics cost at the default's shapes on random features (872 rows, 13 × 768 vs 7 × 384), one device:
    all-pairs metrics once vs B bootstrap replicates per path, in the same process."""
    import numpy as np
    import torch

    from repsim.analysis import stats
    from repsim.measures.allpairs import pairwise

    rng = np.random.default_rng(0)
    T = torch.as_tensor(rng.standard_normal((13, 872, 768)), dtype=torch.float64, device=device)
    S = torch.as_tensor(rng.standard_normal((7, 872, 384)), dtype=torch.float64, device=device)
    T, S = list(T), list(S)

    def timed(fn):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    print(f"synthetic default shapes on {device} "
          f"({torch.cuda.get_device_name() if device.startswith('cuda') else platform.processor() or 'cpu'})")
    pairwise(T[:1], S[:1], device=device)  # warm-up
    base = {m: timed(lambda m=m: pairwise(T, S, metrics=[m], device=device)) for m in
            ("procrustes[distance]", "gram_frobenius", "cka[linear,biased]", "projection_residual[folds=5]")}
    base_all = timed(lambda: pairwise(T, S, device=device))
    print(f"  pairwise, all four metrics once: {base_all:.2f}s  (" + ", ".join(f"{k} {v:.2f}s" for k, v in
                                                                            base.items()) + ")")
    for label, ids, b in [("gram path (gram_frobenius + cka)", ["gram_frobenius", "cka"], replicates),
                          ("procrustes path", ["procrustes"], replicates),
                          ("generic (projection_residual[folds=5])", ["projection_residual"], generic_replicates)]:
        if b <= 0:
            continue
        t = timed(lambda ids=ids, b=b: stats.bootstrap_replicates(T, S, ids, b, device=device))
        print(f"  bootstrap {b} {label}: {t:.2f}s = {t / b:.3f}s per replicate = "
              f"{t / base_all:.1f}x the all-metrics pass")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", default=None, metavar="DEVICE",
                    help="only time the statistics on random features of the default's shapes on DEVICE")
    ap.add_argument("--generic-replicates", type=int, default=0,
                    help="with --synthetic: replicates for the generic (projection residual) path")
    ap.add_argument("--max-samples", type=int, default=None, help="default: all 872 texts")
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--stats-metrics", nargs="+", default=None)
    ap.add_argument("--cache", default=None, help="cache folder (default: a fresh temporary one = cold)")
    ap.add_argument("--skip-cold", action="store_true", help="reuse --cache as is (no cold run)")
    ap.add_argument("--assets", default=None,
                    help="an unpacked model-assets folder to share (REPSIM_ASSETS_CACHE): cold then means an empty "
                         "activation store with the models already downloaded, the stricter comparison")
    ap.add_argument("--repeats", type=int, default=1, help="warm runs (the median is reported)")
    args = ap.parse_args()
    if args.synthetic:
        synthetic(args.synthetic, args.bootstrap, args.generic_replicates)
        return

    work = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    cache = Path(args.cache) if args.cache else work / "cache"
    common = ["--max-samples", str(args.max_samples)] if args.max_samples else []
    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}")
    assets = Path(args.assets) if args.assets else None
    results = {}
    if not args.skip_cold:
        results["cold"] = run("cold", cache, work / "cold", common, assets)
    warm = [run(f"warm {i + 1}", cache, work / f"warm{i}", common, assets) for i in range(args.repeats)]
    results["warm"] = sorted(warm, key=lambda t: t["wall"])[len(warm) // 2]
    stats = ["--bootstrap", str(args.bootstrap)]
    if args.stats_metrics:
        stats += ["--stats-metrics", *args.stats_metrics]
    if args.bootstrap:
        results["bootstrap"] = run(f"warm + bootstrap {args.bootstrap}", cache, work / "boot", common + stats, assets)

    print()
    print(f"{'stage':<10}" + "".join(f"{k:>14}" for k in results))
    for stage in (*STAGES, "wall"):
        print(f"{stage:<10}" + "".join(f"{results[k].get(stage, 0.0):>14.1f}" for k in results))
    if "cold" in results:
        cached = ("load", "extract")
        cold_c = sum(results["cold"].get(s, 0) for s in cached)
        warm_c = sum(results["warm"].get(s, 0) for s in cached)
        print(f"\nload+extract: cold / warm = {cold_c / warm_c:.1f}x   "
              f"end to end: cold / warm = {results['cold']['wall'] / results['warm']['wall']:.1f}x")
    if "bootstrap" not in results:
        return
    if "cold" in results:
        extra = results["bootstrap"]["wall"] - results["warm"]["wall"]
        print(f"bootstrap {args.bootstrap}: a cold run with it / the cold run without = "
              f"{(results['cold']['wall'] + extra) / results['cold']['wall']:.2f}x (cold run + the bootstrap's "
              f"extra time over the warm run)")
    print(f"bootstrap {args.bootstrap} run / run without (warm, end to end) = "
          f"{results['bootstrap']['wall'] / results['warm']['wall']:.2f}x;  bootstrap stage / metrics stage = "
          f"{results['bootstrap'].get('bootstrap', 0) / results['warm'].get('metrics', 1):.1f}x")
    if not args.cache:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
