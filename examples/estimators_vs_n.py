"""Plug-in and sample-size-corrected estimators against the number of texts on the default pair.

Procrustes (plug-in ρ vs Pospisil et al.'s moment estimator, `procrustes[distance,mom]`) and linear CKA (biased vs
debiased) of the best-matching layer pairs of all-mpnet-base-v2 and all-MiniLM-L6-v2, recomputed on seeded random
subsets of the 872 SST-like validation texts (3 subsets per size; the full set once; by default the best CKA
pair and last <-> last), with the convergence code of
`repsim compare --curve`. Writes figures/estimators_vs_n.csv and figures/estimators_vs_n.png.

    python examples/estimators_vs_n.py [--out figures] [--sizes 100 200 400 872] [--subsamples 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from repsim.activations import assets
from repsim.activations.data import load_texts
from repsim.activations.extract import extract
from repsim.analysis.comparison import Comparison
from repsim.analysis.curve import convergence, curve_figure

METRICS = ["procrustes[distance]", "procrustes[distance,mom]", "cka[linear,biased]", "cka[linear,debiased]"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="figures")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 200, 400, 872])
    parser.add_argument("--subsamples", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=2,
                        help="follow the last N of the best-matching pairs (the best Procrustes pair, the best CKA "
                             "pair, last <-> last)")
    args = parser.parse_args()

    texts = load_texts("sst2")
    t_act = extract(assets.DEFAULT_TEACHER, texts, pool="mean", progress=False)
    s_act = extract(assets.DEFAULT_STUDENT, texts, pool="mean", progress=False)
    teacher = [t_act[k] for k in t_act.layers]
    student = [s_act[k] for k in s_act.layers]
    full = Comparison.from_layers(teacher, student, ["procrustes", "cka"], chance_permutations=0,
                                  teacher_layer_ids=list(t_act.layers), student_layer_ids=list(s_act.layers))
    pairs = full.curve_pairs()[-args.pairs:]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for size in sorted(args.sizes):  # one size at a time (the nested subsets do not depend on the sizes asked)
        t0 = time.perf_counter()
        parts.append(convergence(teacher, student, METRICS, pairs, teacher_layer_ids=list(t_act.layers),
                                 student_layer_ids=list(s_act.layers), sizes=[size], subsamples=args.subsamples,
                                 seed=args.seed, chance=False))
        curve = pd.concat(parts, ignore_index=True)
        curve.to_csv(out / "estimators_vs_n.csv", index=False, float_format="%.6g")
        print(f"n = {size}: {time.perf_counter() - t0:.0f} s", flush=True)
    fig = curve_figure(curve, title="all-mpnet-base-v2 vs all-MiniLM-L6-v2: plug-in (solid) and corrected (dashed) "
                                    "estimators against the number of texts")
    fig.savefig(out / "estimators_vs_n.png")
    print(f"pairs {pairs}; wrote {out / 'estimators_vs_n.csv'} and {out / 'estimators_vs_n.png'}")


if __name__ == "__main__":
    main()
