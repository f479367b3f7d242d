"""`repsim compare` and `repsim plot`: arguments in, :mod:`repsim.analysis.comparison` called, tables printed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from repsim.analysis.comparison import (
    check_out_dir,
    compare,
    compare_saved,
    format_map,
    format_summary,
    format_timings,
    metric_id,
    redraw,
    resolve_metrics,
)
from repsim.analysis.curve import format_curve
from repsim.cli.flags import as_flags
from repsim.system.errors import UserError, naming_path


def run_compare(args: argparse.Namespace) -> int:
    """The `repsim compare` command: header, progress bars, tables; files under --out."""
    echo = print
    if args.out is not None:
        check_out_dir(args.out)
    if args.suggest_map and metric_id(args.suggest_map) not in resolve_metrics(args.metrics):
        raise UserError(f"--suggest-map {args.suggest_map}: that metric is not among --metrics")
    curve_options = dict(curve=args.curve, curve_sizes=args.curve_sizes, curve_subsamples=args.curve_subsamples)
    t_acts, s_acts = args.teacher_acts, args.student_acts
    if t_acts is not None or s_acts is not None:
        if t_acts is None or s_acts is None:
            raise UserError("give both --teacher-acts and --student-acts")
        if args.teacher is not None or args.student is not None:
            raise UserError("give either TEACHER STUDENT models or --teacher-acts/--student-acts, not both")
        given = [f for f, v in (("--data", args.data), ("--text-column", args.text_column),
                                ("--label-column", args.label_column)) if v is not None]
        if given:
            raise UserError(f"{', '.join(given)} does not apply to saved activations: their rows are the texts")
        comp = compare_saved(t_acts, s_acts, metrics=args.metrics, layers=args.layers, max_samples=args.max_samples,
                             device=args.device, bootstrap=args.bootstrap, permutations=args.permutations,
                             chance_permutations=args.chance_permutations, stats_metrics=args.stats_metrics,
                             seed=args.seed, out=None, progress=True, echo=echo, **curve_options)
    else:
        comp = compare(args.teacher, args.student, "sst2" if args.data is None else args.data, metrics=args.metrics,
                       pool=args.pool, layers=args.layers, text_column=args.text_column,
                       label_column=args.label_column, max_samples=args.max_samples, batch_size=args.batch_size,
                       max_length=args.max_length, device=args.device, bootstrap=args.bootstrap,
                       permutations=args.permutations, chance_permutations=args.chance_permutations,
                       stats_metrics=args.stats_metrics, seed=args.seed, cache=not args.no_cache, out=None,
                       progress=True, echo=echo, **curve_options)
    if args.out is not None:
        with naming_path(args.out):
            comp.save(args.out)
    echo("")
    echo(format_summary(comp, warnings=False))
    if comp.curve is not None:
        echo("")
        echo(format_curve(comp.curve))
    for w in comp.meta.get("warnings", []):
        print(f"repsim: warning: {as_flags(w, args.flags)}", file=sys.stderr)
    if args.suggest_map:
        echo("")
        echo(format_map(comp, args.suggest_map))
    if args.out is not None:
        echo("")
        echo(f"wrote {Path(args.out) / 'results.csv'}, heatmaps, report.json and report.html  "
             f"({format_timings(comp.meta['timings'])})")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    """The `repsim plot DIR|RESULTS.csv` command: redraw the figures and report.html from the file alone."""
    comp, out, files = redraw(args.results, args.out)
    if not comp.meta:
        csv = Path(args.results) / "results.csv" if Path(args.results).is_dir() else Path(args.results)
        print(f"repsim: no report.json beside {csv}: model names and the number of texts are unknown; axes say "
              "only 'teacher layer' / 'student layer'", file=sys.stderr)
    print(f"wrote {len(files)} figures and report.html to {out}")
    return 0
