"""CPU reproduction of the paper's classification experiment on SST-like data, every loss × several seeds.

Teacher: all-MiniLM-L6-v2 (6 blocks, width 384) with a classification head fine-tuned on the training split.
Student: derived from the fine-tuned teacher, by default ``drop:3`` (blocks 2, 4, 6 and the head kept).
Losses: CE + KD (T = 2) + β · feature loss on mean-pooled features of the uniformly mapped blocks
(teacher 2, 4, 6 ↔ student 1, 2, 3), for none / projection / cka / procrustes / gram_frobenius.
Data: ``sst2`` (GLUE SST-2 when reachable, else the fixed offline SST-like train / validation split).

Every run is one folder under ``OUT/runs/LOSS/seedK`` (finished runs are skipped, so the script resumes);
at the end ``OUT`` holds runs.csv, summary.csv/.md, paired_tests.csv and accuracy.png, and ``figures/`` a copy
of the figure. The fine-tuned teacher lives in ``--work`` (not committed: 90 MB).

    python examples/distill_sst.py                        # the committed configuration (see README)
    python examples/distill_sst.py --seeds 1 --losses none procrustes --max-train 200   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import time
from pathlib import Path

import torch

import repsim.distill as D
from repsim.activations.assets import cache_dir

ROOT = Path(__file__).resolve().parent.parent


def repo_relative(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (results files never hold a machine's paths)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="all-MiniLM-L6-v2")
    ap.add_argument("--student", default="drop:3")
    ap.add_argument("--losses", nargs="+", default=list(D.FEATURE_LOSSES))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--max-train", type=int, default=1000, help="student training texts (first N of the split)")
    ap.add_argument("--max-val", type=int, default=None, help="validation texts (default: all 872)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--teacher-train", type=int, default=2000, help="texts the teacher's head is fine-tuned on")
    ap.add_argument("--teacher-epochs", type=int, default=1)
    ap.add_argument("--teacher-lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=ROOT / "examples" / "results" / "distill_sst")
    ap.add_argument("--work", type=Path, default=None, help="where the fine-tuned teacher is kept "
                    "(default: REPSIM cache / distill-work / sst)")
    ap.add_argument("--figure", type=Path, default=ROOT / "figures" / "distill_sst_accuracy.png")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work or cache_dir() / "distill-work" / "sst"
    started = time.time()

    train_full, validation = D.load_train_validation("sst2", max_val=args.max_val)
    train = D.load_train_validation("sst2", max_train=args.max_train)[0]
    base = D.DistillConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, alpha=args.alpha,
                           beta=args.beta, temperature=args.temperature, max_length=args.max_length,
                           device=args.device, progress=not args.no_progress)

    teacher_dir = work / f"teacher-{args.teacher_train}-{args.teacher_epochs}-{args.teacher_lr:g}-{args.max_length}"
    if not (teacher_dir / "model" / "config.json").exists():
        tcfg = dataclasses.replace(base, epochs=args.teacher_epochs, lr=args.teacher_lr, seed=0)
        print(f"fine-tuning the teacher {args.teacher} on {args.teacher_train} texts ...", flush=True)
        tune = D.finetune(args.teacher, D.load_train_validation("sst2", max_train=args.teacher_train)[0],
                          validation, config=tcfg, out=teacher_dir)
        print(f"teacher: {tune.metrics}", flush=True)
    teacher = D.load(str(teacher_dir / "model"), "sequence-classification", 2)

    args.out.mkdir(parents=True, exist_ok=True)
    setting = {**{k: (repo_relative(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "data": train.source, "n_train": len(train.texts), "n_train_available": len(train_full.texts),
               "n_validation": len(validation.texts), "machine": platform.machine(),
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    (args.out / "setting.json").write_text(json.dumps(setting, indent=2))
    runs = D.run_grid(teacher, args.student, train, validation, losses=args.losses, seeds=args.seeds, config=base,
                      out=args.out, title=f"{args.teacher} (fine-tuned) → {args.student}, {len(train.texts)} "
                      f"SST-like texts × {args.epochs} epochs, {args.seeds} seeds")
    if (args.out / "accuracy.png").exists():
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.out / "accuracy.png", args.figure)
    print((args.out / "summary.md").read_text() if (args.out / "summary.md").exists() else runs)
    print(f"total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
