"""`repsim compare` in a fresh process, as the benchmarks time it: wall seconds, peak resident memory, report.json.

    report, wall_s, peak_gib = run_compare(label, args, cache, out, assets)

``cache`` becomes ``REPSIM_CACHE`` (an empty folder: a cold run), ``assets`` ``REPSIM_ASSETS_CACHE`` when given;
the peak is the child's ``ru_maxrss`` (GiB). A failing run ends the benchmark with its stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, resource, sys
from repsim.cli import main
rc = main(sys.argv[2:])
with open(sys.argv[1], "w") as fh:
    json.dump({"rc": rc, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, fh)
sys.exit(rc)
"""


def run_compare(label: str, args: list[str], cache: Path, out: Path, assets: Path | None = None
                ) -> tuple[dict, float, float]:
    stats = out.with_suffix(".stats.json")
    cmd = [sys.executable, "-c", CHILD, str(stats), "compare", "--out", str(out), *args]
    env = {**os.environ, "REPSIM_CACHE": str(cache), "PYTHONWARNINGS": "ignore"}
    if assets is not None:
        env["REPSIM_ASSETS_CACHE"] = str(assets)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{label} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    peak_gib = json.loads(stats.read_text())["maxrss_kib"] / 1024**2
    return report, wall, peak_gib
