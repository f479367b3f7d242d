"""`repsim counterexample` and `repsim check`: the paper's constructions and the geometry check, printed."""

from __future__ import annotations

import argparse

from repsim.theory import check_models, run_counterexamples


def run_counterexample(args: argparse.Namespace) -> int:
    print(run_counterexamples(args.which, out=args.out, seeds=args.seeds, steps=args.steps, eps=args.eps))
    return 0


def run_check(args: argparse.Namespace) -> int:
    result = check_models(
        args.teacher, args.student, args.data, args.layer_map, max_samples=args.max_samples, pool=args.pool,
        batch_size=args.batch_size, max_length=args.max_length, device=args.device, seed=args.seed,
        cache=not args.no_cache, out=args.out, eps=args.eps, cka_threshold=args.cka_threshold,
        procrustes_threshold=args.procrustes_threshold, preservation_threshold=args.preservation_threshold,
        chance_permutations=args.chance_permutations)
    print(result.summary())
    if args.out:
        print(f"wrote {args.out}/check.csv, check.json and report.html")
    return 0
