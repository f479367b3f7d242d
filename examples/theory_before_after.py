"""Geometry of the default student before and after distillation with each feature loss.

Fine-tunes the default teacher (all-mpnet-base-v2) on the SST-2 training split (offline: the SST-like sample),
distils the default student (all-MiniLM-L6-v2) with no feature term and with each feature loss, then runs the
geometry check (repsim.theory.check) at the aligned layer pairs on validation texts, before and after.

    python examples/theory_before_after.py --out theory-before-after [--max-train 512] [--epochs 1]

Writes OUT/geometry_before_after.csv, OUT/theory_before_after.png and prints the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from repsim.activations.assets import DEFAULT_STUDENT, DEFAULT_TEACHER  # noqa: E402
from repsim.theory import geometry_before_after  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="theory-before-after")
    ap.add_argument("--data", default="sst2")
    ap.add_argument("--max-train", type=int, default=512)
    ap.add_argument("--max-val", type=int, default=300)
    ap.add_argument("--check-samples", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--eps", type=float, default=0.1)
    args = ap.parse_args()
    table = geometry_before_after(
        DEFAULT_TEACHER, DEFAULT_STUDENT, args.data, losses=("none", "projection", "cka", "procrustes",
                                                              "gram_frobenius"),
        out=args.out, max_train=args.max_train, max_val=args.max_val, check_samples=args.check_samples,
        epochs=args.epochs, device=args.device, eps=args.eps)
    cols = ["student", "accuracy", "teacher_layer", "student_layer", "procrustes[distance]", "gram_frobenius",
            "cka[linear,biased]", "projection_residual[folds=5]", "preserved_fraction", "angle_distortion_deg_q50",
            "flagged"]
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    panels = [("procrustes[distance]", "Procrustes distance ↓"), ("cka[linear,biased]", "CKA ↑"),
              ("preserved_fraction", f"ε-orthogonal pairs kept (ε={args.eps:g}) ↑"),
              ("angle_distortion_deg_q50", "median angle change (deg) ↓")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (col, title) in zip(axes, panels, strict=True):
        for label, grp in table.groupby("student", sort=False):
            ax.plot(grp.student_layer, grp[col], "o-", label=label, lw=1.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("student layer (teacher layer by the trainer's map)", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(args.out) / "theory_before_after.png", dpi=120)


if __name__ == "__main__":
    main()
