"""Does the geometry check separate? The default student's last layer against itself, a row-shuffled copy of
itself, its previous layer, its embedding layer, and the default teacher's last layer, each diagnostic with its
chance level, z-score and permutation p-value (repsim.theory.check).

    python examples/check_null.py --max-samples 500 --permutations 200 --out check-null

Writes OUT/check_null.csv (one row per case and diagnostic) and prints the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from repsim.activations.assets import DEFAULT_STUDENT, DEFAULT_TEACHER
from repsim.activations.data import load_texts
from repsim.activations.extract import extract
from repsim.theory import check

SHOWN = ("procrustes[distance]", "cka[linear,biased]", "eps_orthogonal_jaccard", "preserved_fraction",
         "cosine_correlation", "angle_distortion_deg_q50", "angle_distortion_deg_q90", "angle_distortion_deg_q99")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="sst2")
    ap.add_argument("--max-samples", type=int, default=500)
    ap.add_argument("--permutations", type=int, default=200)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="check-null")
    args = ap.parse_args()
    texts = load_texts(args.data, max_samples=args.max_samples, seed=args.seed, labels=False)
    kw = dict(pool="mean", device=args.device, progress=False)
    student = extract(DEFAULT_STUDENT, texts, **kw)
    teacher = extract(DEFAULT_TEACHER, texts, **kw)
    last = max(student.layers)
    ref = np.asarray(student[last], dtype=np.float64)
    shuffled = ref[np.random.default_rng(args.seed + 1000).permutation(len(ref))]
    cases = {f"student {last} vs itself": ref, f"student {last} vs a row-shuffled copy": shuffled,
             f"student {last} vs student {last - 1}": np.asarray(student[last - 1], dtype=np.float64),
             f"student {last} vs student 0 (embeddings)": np.asarray(student[0], dtype=np.float64),
             f"student {last} vs teacher {max(teacher.layers)}":
                 np.asarray(teacher[max(teacher.layers)], dtype=np.float64)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{len(texts)} texts of {getattr(texts, 'name', args.data)}, {args.permutations} shuffles, eps {args.eps:g}")
    rows = []
    for name, other in cases.items():
        res = check(ref, other, eps=args.eps, permutations=args.permutations, seed=args.seed)
        table = res.against_chance()
        table.insert(0, "case", name)
        rows.append(table)
        pd.concat(rows, ignore_index=True).to_csv(out / "check_null.csv", index=False)
        print(f"\n{name}")
        shown = table[table.diagnostic.isin(SHOWN)].drop(columns="case")
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)


if __name__ == "__main__":
    main()
