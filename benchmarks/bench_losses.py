"""Forward + backward time of the distillation losses on one batch of tokens, side by side.

Teacher features (batch, tokens, 768), student features (batch, tokens, 384), 4096 real tokens by default, the
attention mask passed (all ones) so the mask path is timed too. Each loss is timed as `loss(t, s, mask).backward()`
(median of repeats after warm-up; the losses take turns within each repeat) and reported as a ratio to CKALoss,
the baseline in the same run; the target is ProcrustesLoss within 3x of CKALoss.

    python benchmarks/bench_losses.py                      # CPU, float64 compute (the default)
    python benchmarks/bench_losses.py --device cuda --compute-dtype float64 float32
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from repsim.measures.losses import CKALoss, GramFrobeniusLoss, ProcrustesLoss, ProjectionLoss

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return (f"CPU: {platform.machine()}, {torch.get_num_threads()} torch threads "
            f"({platform.processor() or 'unknown processor'}), torch {torch.__version__}")


def time_losses(losses: dict[str, torch.nn.Module], teacher: torch.Tensor, student: torch.Tensor,
                mask: torch.Tensor, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of one forward + backward per loss and repeat; the losses take turns within each repeat (in a
    rotating order), so that load from other processes on a shared machine hits all of them alike."""
    device = student.device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(loss: torch.nn.Module) -> float:
        student.grad = None
        for p in loss.parameters():
            p.grad = None
        sync()
        start = time.perf_counter()
        loss(teacher, student, attention_mask=mask).backward()
        sync()
        return time.perf_counter() - start

    names = list(losses)
    for _ in range(warmup):
        for name in names:
            step(losses[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(step(losses[name]))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="real tokens in the batch (default 4096)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (batch = tokens / seq-len)")
    parser.add_argument("--teacher-dim", type=int, default=768)
    parser.add_argument("--student-dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:k]")
    parser.add_argument("--compute-dtype", nargs="+", default=["float64"], choices=sorted(DTYPES),
                        help="internal precision of the geometry losses (inputs are float32 either way)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    batch = max(1, args.tokens // args.seq_len)
    seq = args.tokens // batch
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(batch, seq, args.teacher_dim, generator=gen).to(device)
    student = torch.randn(batch, seq, args.student_dim, generator=gen).to(device)
    student = (student + 0.3 * teacher[..., : args.student_dim]).requires_grad_(True)
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)

    print(f"# {machine(device)}")
    print(f"# {batch * seq} tokens as ({batch}, {seq}, width); teacher width {args.teacher_dim}, student width "
          f"{args.student_dim}; float32 inputs; forward+backward; median of {args.repeats} after {args.warmup} "
          "warm-up")
    print("| loss | compute dtype | median ms | min ms | ratio to CKALoss |")
    print("|---|---|---|---|---|")
    for name in args.compute_dtype:
        dtype = DTYPES[name]
        losses = {
            "CKALoss (baseline)": CKALoss(compute_dtype=dtype),
            "ProcrustesLoss (distance)": ProcrustesLoss(compute_dtype=dtype),
            "ProcrustesLoss (squared)": ProcrustesLoss("squared", compute_dtype=dtype),
            "GramFrobeniusLoss": GramFrobeniusLoss(compute_dtype=dtype),
            "ProjectionLoss (float32 Linear)": ProjectionLoss(args.teacher_dim, args.student_dim).to(device),
        }
        if device.type == "cuda":  # the default there is the eigh-of-Gram nuclear norm; show the SVD beside it
            losses["ProcrustesLoss (distance, method=svd)"] = ProcrustesLoss(compute_dtype=dtype, method="svd")
        times = time_losses(losses, teacher, student, mask, args.repeats, args.warmup)
        base = statistics.median(times["CKALoss (baseline)"])
        for label, seconds in times.items():
            median = statistics.median(seconds)
            shown = "float32" if label.startswith("ProjectionLoss") else name
            print(f"| {label} | {shown} | {1e3 * median:.1f} | {1e3 * min(seconds):.1f} | {median / base:.2f} |")

if __name__ == "__main__":
    main()
