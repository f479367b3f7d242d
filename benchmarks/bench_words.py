"""Word-level against sentence-level comparison of the embedded default pair, in one run.

Runs `repsim compare --pool mean` and `repsim compare --pool words` on the same data in fresh processes, each
cold (empty activation cache: both models extract) and then warm (activations read from the store), alternating
the two poolings. Reports rows compared (texts or words, words dropped), wall time, the stage timings from
report.json and the peak resident memory of each process (ru_maxrss).

    python benchmarks/bench_words.py [--max-samples N] [--assets DIR] [--extra ARG ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

from compare_process import run_compare


def run(label: str, pool: str, cache: Path, out: Path, extra: list[str], assets: Path | None) -> dict:
    report, wall, peak = run_compare(label, ["--pool", pool, *extra], cache, out, assets)
    words = report.get("words") or {}
    rows = words.get("n_used", report.get("n_texts"))
    t = report["timings"]
    row = {"label": label, "pool": pool, "rows": rows, "dropped": words.get("dropped", 0), "wall_s": wall,
           "extract_s": t.get("extract", 0.0), "metrics_s": t.get("metrics", 0.0) + t.get("moments", 0.0),
           "peak_gib": peak}
    print(f"[{label}] rows {rows} (dropped {row['dropped']})  wall {wall:.1f}s  extract {row['extract_s']:.1f}s  "
          f"moments+metrics {row['metrics_s']:.1f}s  peak RSS {peak:.2f} GiB", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-samples", type=int, default=None)
    ap.add_argument("--assets", type=Path, default=None, help="REPSIM_ASSETS_CACHE with the unpacked default assets")
    ap.add_argument("--extra", nargs="*", default=[], help="further `repsim compare` arguments (e.g. models)")
    args = ap.parse_args()
    extra = list(args.extra) + (["--max-samples", str(args.max_samples)] if args.max_samples else [])
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = []
        for phase in ("cold", "warm"):
            for pool in ("mean", "words"):
                rows.append(run(f"{pool} {phase}", pool, tmp / f"cache-{pool}", tmp / f"out-{pool}-{phase}", extra,
                                args.assets))
    print("\n| run | rows compared | words dropped | wall s | extract s | moments + metrics s | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['rows']} | {r['dropped']} | {r['wall_s']:.1f} | {r['extract_s']:.1f} | "
              f"{r['metrics_s']:.2f} | {r['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
