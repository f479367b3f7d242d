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
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("load", "extract", "metrics", "bootstrap", "plots")


def run(label: str, cache: Path, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "repsim", "compare", "--out", str(out), *extra]
    env = {**os.environ, "REPSIM_CACHE": str(cache), "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{label} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    timings = {k: float(v) for k, v in report["timings"].items() if isinstance(v, (int, float))}
    timings["wall"] = wall
    print(f"[{label}] wall {wall:.1f}s  " + "  ".join(f"{k} {timings.get(k, 0):.1f}s" for k in STAGES), flush=True)
    return timings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-samples", type=int, default=None, help="default: all 872 texts")
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--stats-metrics", nargs="+", default=None)
    ap.add_argument("--cache", default=None, help="cache folder (default: a fresh temporary one = cold)")
    ap.add_argument("--skip-cold", action="store_true", help="reuse --cache as is (no cold run)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    cache = Path(args.cache) if args.cache else work / "cache"
    common = ["--max-samples", str(args.max_samples)] if args.max_samples else []
    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}")
    results = {}
    if not args.skip_cold:
        results["cold"] = run("cold", cache, work / "cold", common)
    results["warm"] = run("warm", cache, work / "warm", common)
    stats = ["--bootstrap", str(args.bootstrap)]
    if args.stats_metrics:
        stats += ["--stats-metrics", *args.stats_metrics]
    results["bootstrap"] = run(f"warm + bootstrap {args.bootstrap}", cache, work / "boot", common + stats)

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
    print(f"bootstrap {args.bootstrap} run / run without (warm, end to end) = "
          f"{results['bootstrap']['wall'] / results['warm']['wall']:.2f}x;  bootstrap stage / metrics stage = "
          f"{results['bootstrap'].get('bootstrap', 0) / results['warm'].get('metrics', 1):.1f}x")
    if not args.cache:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
