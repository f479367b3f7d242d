"""`repsim counterexample` and `repsim check`: the paper's constructions and the geometry check, printed."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from repsim.theory import DEFAULT_SIZES, Counterexamples, check_models, counterexamples


def run_counterexample(args: argparse.Namespace) -> int:
    print(run_counterexamples(args.which, out=args.out, seeds=args.seeds, steps=args.steps, eps=args.eps))
    return 0


def run_check(args: argparse.Namespace) -> int:
    result = check_models(
        args.teacher, args.student, args.data, args.layer_map, max_samples=args.max_samples, pool=args.pool,
        batch_size=args.batch_size, max_length=args.max_length, device=args.device, seed=args.seed,
        cache=not args.no_cache, out=args.out, eps=args.eps, cka_threshold=args.cka_threshold,
        procrustes_threshold=args.procrustes_threshold, preservation_threshold=args.preservation_threshold,
        permutations=args.permutations)
    print(result.summary())
    if args.out:
        print(f"wrote {args.out}/check.csv, check.json and report.html")
    return 0


def _table(df: pd.DataFrame) -> str:
    return df.to_string(index=False, float_format=lambda v: f"{v:.6f}")


def format_counterexamples(result: Counterexamples) -> str:
    """The printed report of :func:`repsim.theory.counterexamples`."""
    parts: list[str] = []
    if result.theorem1 is not None:
        refs = result.theorem1["references"].T.reset_index().rename(columns={"index": "quantity"})
        parts += ["== Theorem 1: teacher (b) vs student (c), closed form and measured ==", _table(refs), "",
                  "== Sweep: n = m, eps^2 = n/m (CKA -> 1, Procrustes -> sqrt(2 - sqrt 2) = 0.765367, "
                  "Gram-Frobenius -> 0.5) ==", _table(result.theorem1["sweep"]), "",
                  "== Near-orthogonal variant: m = 4 rows with eps = 3, n growing ==",
                  _table(result.theorem1["near_orthogonal"]), ""]
    if result.projection is not None:
        pc, lm, tc = (result.projection[k] for k in ("projection", "linear_map", "teacher_side"))
        parts += ["== Projection counterexample: teacher e1,e2,e3; student (1,.99,0),(0,.1,0),(0,0,1) ==",
                  f"projection loss (least squares, learned map) = {pc.loss:.3e}",
                  f"cos(row1,row2): teacher {pc.teacher_cos_12:.6f}, student {pc.student_cos_12:.6f} "
                  f"(angle {math.degrees(math.acos(pc.student_cos_12)):.2f} deg instead of 90)",
                  "metrics: " + ", ".join(f"{k} {v:.6f}" for k, v in pc.metrics.items()), "",
                  f"== S = T.A, A invertible with condition number {lm.condition:g} (n=200, d=8) ==",
                  f"projection loss = {lm.projection_loss:.3e}; " + ", ".join(f"{k} {v:.6f}"
                                                                          for k, v in lm.metrics.items()),
                  f"largest change of a pairwise angle: {lm.max_angle_change_deg:.2f} deg", "",
                  "== Map on the teacher side: min_W |T.W - S| ==",
                  f"W = 0, S = 0: loss {tc.zero_loss:.1e} (the student carries nothing)",
                  f"rank-one student S = T.w.u^T: normalised residual {tc.rank_one_residual:.2e}, smallest |cos| "
                  f"between student rows {tc.rank_one_abs_cos_min:.6f}; vs teacher: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in tc.metrics_rank_one.items()), ""]
    if result.synthetic is not None:
        syn = result.synthetic
        parts += [f"== Synthetic distillation: Adam, {syn['steps']} steps, seeds {syn['seeds']}, mean over seeds; "
                  f"preserved_fraction = teacher eps-orthogonal pairs (eps={syn['eps']:g}) still eps-orthogonal ==",
                  _table(syn["final"]), ""]
    if result.out is not None:
        parts.append(f"wrote tables and figures to {result.out}")
    return "\n".join(parts)


def run_counterexamples(which: str = "all", out: str | Path | None = None, seeds: Sequence[int] = (0, 1, 2),
                        steps: int = 300, sizes: Sequence[tuple[int, int, int]] = DEFAULT_SIZES,
                        eps: float = 0.1) -> str:
    """The report `repsim counterexample` prints (as repsim 0.1's ``repsim.theory.run_counterexamples``)."""
    return format_counterexamples(counterexamples(which, out=out, seeds=seeds, steps=steps, sizes=sizes, eps=eps))
