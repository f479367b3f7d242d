"""Training throughput of each feature loss relative to ``none`` in the CPU reproduction setting.

Setting (as examples/distill_sst.py): teacher all-MiniLM-L6-v2 with a classification head, student ``drop:3``,
batch 32, max length 64, SST-like texts, mean-pooled features on the uniform map (3 layer pairs), teacher
outputs cached (computed before timing). One optimizer step = student forward + feature losses + backward + AdamW.
Losses are timed interleaved (round robin over ``--repeats`` rounds of ``--steps`` steps) so machine load
affects them alike; we report the median examples/s per loss and its ratio to ``none`` (step-time ratio =
none's throughput / the loss's throughput; the target is ≤ 1.5 for the geometry-aware losses).

    python benchmarks/bench_distill.py [--steps 3] [--repeats 3] [--threads N] [--teacher PATH]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import repsim.distill as D


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="all-MiniLM-L6-v2", help="the head is random unless the folder has one; "
                    "throughput does not depend on it")
    ap.add_argument("--student", default="drop:3")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--features", default="mean", choices=["mean", "tokens"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, tok = D.load(args.teacher, "sequence-classification", 2)
    train, _ = D.load_train_validation("sst2", max_train=args.batch_size * args.steps, max_val=2)
    encoded = D.encode(tok, train.texts, train.labels, args.max_length)
    trainers = {}
    for loss in D.FEATURE_LOSSES:
        cfg = D.DistillConfig(loss=loss, batch_size=args.batch_size, max_length=args.max_length, progress=False,
                              features=args.features, device=args.device, cache_teacher=False)
        student, s_tok = D.make_student(args.student, teacher, tok, cfg.task, 2, seed=0)
        trainers[loss] = D.DistillTrainer(teacher, student, s_tok, encoded, cfg, teacher_tokenizer=tok,
                                          train_texts=train.texts)
        trainers[loss].train_step(list(range(args.batch_size)))  # warm-up
    batches = [list(range(i * args.batch_size, (i + 1) * args.batch_size)) for i in range(args.steps)]
    rates: dict[str, list[float]] = {loss: [] for loss in trainers}
    for _ in range(args.repeats):
        for loss, trainer in trainers.items():
            start = time.perf_counter()
            for index in batches:
                trainer.train_step(index)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            rates[loss].append(len(batches) * args.batch_size / (time.perf_counter() - start))
    device = trainers["none"].device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}"
    print(f"device: {name}, torch threads {torch.get_num_threads()}, batch {args.batch_size}, "
          f"max length {args.max_length}, features {args.features}, {args.steps} steps × {args.repeats} rounds")
    base = statistics.median(rates["none"])
    print(f"{'loss':<16}{'examples/s (median)':>22}{'min':>8}{'max':>8}{'step time / none':>18}")
    for loss, values in rates.items():
        med = statistics.median(values)
        print(f"{loss:<16}{med:>22.1f}{min(values):>8.1f}{max(values):>8.1f}{base / med:>18.2f}")


if __name__ == "__main__":
    main()
