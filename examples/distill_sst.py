"""The distillation study on SST-like data: every arm × many seeds with the fair recipe, then the statistics.

Teacher: all-MiniLM-L6-v2 (6 blocks, width 384) with a classification head fine-tuned on the training split.
Student: derived from the fine-tuned teacher, by default ``drop:3`` (blocks 2, 4, 6 and the head kept).
Arms: ``ce_only`` (labels alone), ``none`` (CE + KD at T = 2: the KD-only control) and CE + KD + β · feature loss
on mean-pooled features of the uniformly mapped blocks (teacher 2, 4, 6 ↔ student 1, 2, 3) for projection / cka /
procrustes / gram_frobenius. The recipe (docs/distillation.md): feature weights calibrated so every loss starts by
pushing each mapped layer as hard as CE + KD does (β = 1), the projection maps start at their ridge fit and learn
at their own rate, gradient clipping at a norm the steps rarely reach. Data: ``sst2`` (GLUE SST-2 when reachable,
else the fixed offline SST-like split); the validation split is the test set, used for nothing but the final scores.

Every run is one folder under ``OUT/runs/ARM/seedK`` (metrics.json, predictions.csv, geometry.csv, train_log.csv;
finished runs are skipped, so the script resumes; ``--workers`` runs seeds in parallel processes). At the end
``OUT`` holds runs.csv, summary.md, study.md with the effect sizes and tests, and the figures, copied to
``figures/``. The fine-tuned teacher lives in ``--work`` (not committed: 90 MB).

    python examples/distill_sst.py --workers 2            # the committed study (see README)
    python examples/distill_sst.py --seeds 2 --max-train 200 --out /tmp/mini   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import repsim.distill as D
from repsim.activations.assets import cache_dir
from repsim.distill.study import write_study_report

ROOT = Path(__file__).resolve().parent.parent


def repo_relative(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (results files never hold a machine's paths)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


ARMS = ["ce_only", "none", "projection", "cka", "procrustes", "gram_frobenius"]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="all-MiniLM-L6-v2")
    ap.add_argument("--student", default="drop:3")
    ap.add_argument("--arms", nargs="+", default=ARMS)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--max-train", type=int, default=800, help="student training texts (a fixed random subset)")
    ap.add_argument("--max-val", type=int, default=None, help="test texts (default: all 872 of the validation split)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--feature-scale", default="gradient", choices=["gradient", "fixed"])
    ap.add_argument("--projection-init", default="ridge", choices=["ridge", "random"])
    ap.add_argument("--projection-lr", type=float, default=1e-3)
    ap.add_argument("--max-grad-norm", type=float, default=50.0)
    ap.add_argument("--permutations", type=int, default=20, help="row permutations for each geometry null")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--teacher-train", type=int, default=2000, help="texts the teacher's head is fine-tuned on")
    ap.add_argument("--teacher-epochs", type=int, default=1)
    ap.add_argument("--teacher-lr", type=float, default=1e-4)
    ap.add_argument("--workers", type=int, default=1, help="parallel processes (each one torch thread)")
    ap.add_argument("--only-seeds", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=ROOT / "examples" / "results" / "distill_sst")
    ap.add_argument("--work", type=Path, default=None, help="where the fine-tuned teacher is kept "
                    "(default: REPSIM cache / distill-work / sst)")
    ap.add_argument("--figures", type=Path, default=ROOT / "figures")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work or cache_dir() / "distill-work" / "sst"
    started = time.time()

    train_full, validation = D.load_train_validation("sst2", max_val=args.max_val)
    train = D.load_train_validation("sst2", max_train=args.max_train)[0]
    base = D.DistillConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, alpha=args.alpha,
                           beta=args.beta, temperature=args.temperature, max_length=args.max_length,
                           feature_scale=args.feature_scale, projection_init=args.projection_init,
                           projection_lr=args.projection_lr, max_grad_norm=args.max_grad_norm,
                           device=args.device, progress=not args.no_progress)

    teacher_dir = work / f"teacher-{args.teacher_train}-{args.teacher_epochs}-{args.teacher_lr:g}-{args.max_length}"
    if not (teacher_dir / "model" / "config.json").exists():
        tcfg = dataclasses.replace(D.DistillConfig(), epochs=args.teacher_epochs, lr=args.teacher_lr, seed=0,
                                   max_grad_norm=1.0, max_length=args.max_length, device=args.device,
                                   progress=not args.no_progress)
        print(f"fine-tuning the teacher {args.teacher} on {args.teacher_train} texts ...", flush=True)
        tune = D.finetune(args.teacher, D.load_train_validation("sst2", max_train=args.teacher_train)[0],
                          validation, config=tcfg, out=teacher_dir)
        print(f"teacher: {tune.metrics}", flush=True)
    seeds = list(range(args.seeds))
    if args.only_seeds is not None:
        seeds = [int(k) for k in args.only_seeds.split(",") if k]
    elif args.workers > 1:
        run_workers(args, seeds)
    teacher = D.load(str(teacher_dir / "model"), "sequence-classification", 2)

    args.out.mkdir(parents=True, exist_ok=True)
    title = (f"{args.teacher} (fine-tuned) → {args.student}, {len(train.texts)} SST-like texts × {args.epochs} "
             f"epoch(s), {args.seeds} seeds")
    runs = D.run_grid(teacher, args.student, train, validation, losses=args.arms, seeds=seeds, config=base,
                      out=args.out, title=title, geometry_permutations=args.permutations)
    if args.only_seeds is not None:
        return
    setting = {**{k: (repo_relative(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                  if k not in ("only_seeds", "work")},
               "data": train.source, "n_train": len(train.texts), "n_train_available": len(train_full.texts),
               "n_test": len(validation.texts), "machine": platform.machine(),
               "torch_threads": 1 if args.workers > 1 else torch.get_num_threads(), "torch": torch.__version__}
    (args.out / "setting.json").write_text(json.dumps(setting, indent=2))
    write_study_report(args.out)
    args.figures.mkdir(parents=True, exist_ok=True)
    for name in ("study_accuracy.png", "study_geometry_accuracy.png", "study_before_after.png"):
        if (args.out / name).exists():
            shutil.copyfile(args.out / name, args.figures / f"distill_sst_{name.removeprefix('study_')}")
    print((args.out / "summary.md").read_text() if (args.out / "summary.md").exists() else runs)
    print((args.out / "study.md").read_text())
    print(f"total {time.time() - started:.0f} s")


def run_workers(args: argparse.Namespace, seeds: list[int]) -> None:
    """Run the seeds in ``args.workers`` processes of one torch thread each (seed k goes to worker k mod W)."""
    argv = [a for a in sys.argv[1:]]
    procs = []
    for w in range(args.workers):
        mine = ",".join(str(k) for k in seeds[w::args.workers])
        if mine:
            cmd = [sys.executable, __file__, *argv, "--only-seeds", mine, "--threads", "1", "--no-progress"]
            procs.append(subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}))
    failed = [p.args for p in procs if p.wait() != 0]
    if failed:
        raise SystemExit(f"{len(failed)} worker(s) failed")


if __name__ == "__main__":
    main()
