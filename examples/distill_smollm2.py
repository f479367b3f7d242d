"""CPU demo: distil SmolLM2-135M-Instruct (30 blocks) into a layer-dropped copy, perplexity before and after.

Teacher: the embedded SmolLM2-135M-Instruct (4-bit GGUF, dequantised once and cached). Student: ``drop:N``
(default 10 of 30 blocks, every 3rd, embeddings and LM head copied). Data: SST-like movie-review texts
(a fixed random subset of the offline training split for training, of the validation split for perplexity).
Loss: next-token CE + α · T² · token-level KL to the teacher + β · feature loss on token-level hidden states of the
uniformly mapped blocks (identical tokenizers, so tokens line up). This is a short demonstration that the trainer
works for decoders, not a benchmark: a few dozen steps on ~100 texts.

    python examples/distill_smollm2.py [--losses none procrustes] [--keep 10] [--max-train 128] [--epochs 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

import repsim.distill as D
from repsim.activations.assets import DEFAULT_DECODER

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=DEFAULT_DECODER)
    ap.add_argument("--keep", type=int, default=10, help="blocks the student keeps (evenly spaced)")
    ap.add_argument("--losses", nargs="+", default=["none", "procrustes"])
    ap.add_argument("--max-train", type=int, default=128)
    ap.add_argument("--max-val", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "examples" / "results" / "distill_smollm2")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    train, validation = D.load_train_validation("sst2", max_train=args.max_train, max_val=args.max_val)
    teacher, tok = D.load(args.teacher, "causal-lm")
    valid = D.encode(tok, validation.texts, None, args.max_length)
    results = {"teacher": args.teacher, "student": f"drop:{args.keep}", "n_train": len(train.texts),
               "n_validation": len(validation.texts), "data": train.source, "settings": vars(args) | {"out": None},
               "teacher_perplexity": D.perplexity(teacher, tok, valid, batch_size=8)}
    student, s_tok = D.make_student(f"drop:{args.keep}", teacher, tok, "causal-lm", None, seed=0)
    results["student_perplexity_before"] = D.perplexity(student, s_tok, valid, batch_size=8)
    print(json.dumps(results, indent=2), flush=True)
    base = D.DistillConfig(task="causal-lm", features="tokens", epochs=args.epochs, batch_size=args.batch_size,
                           lr=args.lr, max_length=args.max_length, cache_teacher=False)
    for loss in args.losses:
        cfg = dataclasses.replace(base, loss=loss)
        student, s_tok = D.make_student(f"drop:{args.keep}", teacher, tok, "causal-lm", None, seed=0)
        t0 = time.time()
        res = D.distill((teacher, tok), (student, s_tok), train.texts, validation.texts, config=cfg,
                        out=args.out / "runs" / loss)
        results[f"student_perplexity_after[{loss}]"] = res.metrics["perplexity"]
        results[f"seconds[{loss}]"] = round(time.time() - t0, 1)
        for leftover in ("student", "checkpoint.pt"):  # weights are not committed
            path = args.out / "runs" / loss / leftover
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        print(loss, res.metrics, flush=True)
    results["total_seconds"] = round(time.time() - started, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
