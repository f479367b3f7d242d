"""pairwise() on layer stacks against a straightforward per-pair implementation and against the GEMM floor.

Default workload: 13 teacher layers of width 768 × 7 student layers of width 384, n = 5000,
the four linear metrics procrustes[distance], gram_frobenius, cka[linear,biased], projection_residual[in_sample].

Measured in one run, each timing the median of --repeats runs:
- pairwise: ``repsim.pairwise`` on the raw stacks (centring, scaling, per-layer work and all pair work included);
- floor: the time torch needs only for the p×q cross products X̃_tᵀỸ_s of all pairs, on already centred and
  scaled float64 inputs (the faster of one big GEMM and a loop of per-pair matmuls), timed in alternation with
  pairwise (floor, pairwise, floor, …); the ratio reported is the median of the per-round ratios;
- per-pair metric calls: the four ``repsim.measures.functions`` functions called pair by pair (each re-prepares its
inputs);
- slow formulas: per pair, explicit n×n Gram matrices (Gram-Frobenius, CKA), svdvals of X̃ᵀỸ, lstsq.
The two per-pair baselines are timed on the first --baseline-pairs pairs and scaled linearly to all pairs
(every pair costs the same: equal widths); the scaling is printed.

    python benchmarks/bench_pairwise.py                 # CPU
    python benchmarks/bench_pairwise.py --device cuda   # GPU
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from repsim.measures import functions as metrics
from repsim.measures.allpairs import pairwise

LINEAR4 = ("procrustes[distance]", "gram_frobenius", "cka[linear,biased]", "projection_residual[in_sample]")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def make_stacks(n: int, lt: int, p: int, ls: int, q: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    base = torch.randn(n, 64, generator=g, dtype=torch.float64)
    teacher = [(base @ torch.randn(64, p, generator=g, dtype=torch.float64)
                + torch.randn(n, p, generator=g, dtype=torch.float64) + 3.0).to(device) for _ in range(lt)]
    student = [(base @ torch.randn(64, q, generator=g, dtype=torch.float64)
                + torch.randn(n, q, generator=g, dtype=torch.float64) - 1.0).to(device) for _ in range(ls)]
    return teacher, student


def unit(x: torch.Tensor) -> torch.Tensor:
    xc = x - x.mean(dim=0)
    return xc / torch.linalg.matrix_norm(xc)


def slow_pair(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """The four metrics from their definitions, n×n Gram matrices formed explicitly."""
    a, b = unit(x), unit(y)
    rho = torch.linalg.svdvals(a.T @ b).sum()
    k, l_ = a @ a.T, b @ b.T  # centred data, so the Grams are already double-centred
    gram = torch.linalg.matrix_norm(k - l_)
    cka = (k * l_).sum() / (torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l_))
    w = torch.linalg.lstsq(b.cpu(), a.cpu()).solution.to(b.device) if b.device.type == "cuda" else \
        torch.linalg.lstsq(b, a, driver="gelsd").solution
    resid = ((a - b @ w) ** 2).sum()
    return {"procrustes[distance]": float(torch.sqrt(torch.clamp(2 - 2 * rho, min=0))), "gram_frobenius": float(gram),
            "cka[linear,biased]": float(cka), "projection_residual[in_sample]": float(resid)}


def metric_calls_pair(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return {mid: float(metrics.get_metric(mid)(x, y)) for mid in LINEAR4}


def gemm_floor(teacher, student, device, repeats):
    tu = [unit(x) for x in teacher]
    su = [unit(y) for y in student]
    tcat, scat = torch.cat(tu, dim=1), torch.cat(su, dim=1)

    def big():
        return tcat.T @ scat

    def loop():
        return [x.T @ y for x in tu for y in su]

    t_big, _ = timed(big, device, repeats)
    t_loop, _ = timed(loop, device, repeats)
    return (big if t_big <= t_loop else loop), min(t_big, t_loop), t_big, t_loop


def paired_rounds(fn_a, fn_b, device, rounds: int) -> tuple[list[float], list[float]]:
    """Alternate a and b ``rounds`` times (a, b, a, b, …) so drift in the machine's speed (a shared VM) hits both
    alike; per-round ratios b/a are then comparable."""
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(timed(fn_a, device, 1)[0])
        tb.append(timed(fn_b, device, 1)[0])
    return ta, tb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--teacher-layers", type=int, default=13)
    ap.add_argument("--teacher-width", type=int, default=768)
    ap.add_argument("--student-layers", type=int, default=7)
    ap.add_argument("--student-width", type=int, default=384)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline-pairs", type=int, default=3, help="pairs timed for each per-pair baseline")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (on an oversubscribed box 1 avoids OpenMP spin-waits in LAPACK)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU, " \
        f"{torch.get_num_threads()} torch threads"
    lt, ls = args.teacher_layers, args.student_layers
    pairs = lt * ls
    print(f"device: {name}; n={args.n}, {lt}×{args.teacher_width} teacher vs {ls}×{args.student_width} student "
          f"({pairs} pairs), metrics {', '.join(LINEAR4)}; median of {args.repeats} repeats")
    teacher, student = make_stacks(args.n, lt, args.teacher_width, ls, args.student_width, device)

    pairwise(teacher[:1], student[:1], metrics=LINEAR4, device=device)  # warm-up (imports, kernels)
    result = pairwise(teacher, student, metrics=LINEAR4, device=device)
    floor_fn, _, t_big, t_loop = gemm_floor(teacher, student, device, args.repeats)
    floors, all_pw = paired_rounds(floor_fn, lambda: pairwise(teacher, student, metrics=LINEAR4, device=device),
                                   device, args.repeats)
    t_pw, t_floor = statistics.median(all_pw), statistics.median(floors)
    ratios = [p / f for p, f in zip(all_pw, floors, strict=True)]

    k = min(args.baseline_pairs, pairs)
    idx = [(i // ls, i % ls) for i in range(k)]
    t_calls, _ = timed(lambda: [metric_calls_pair(teacher[i], student[j]) for i, j in idx], device, args.repeats)
    t_slow, _ = timed(lambda: [slow_pair(teacher[i], student[j]) for i, j in idx], device, max(1, args.repeats - 1))
    t_calls_all, t_slow_all = t_calls * pairs / k, t_slow * pairs / k

    worst = 0.0
    for i, j in idx:
        ref = slow_pair(teacher[i], student[j])
        worst = max(worst, max(abs(result[m][i, j] - ref[m]) for m in LINEAR4))

    print(f"pairwise (all {pairs} pairs, 4 metrics): {t_pw:8.3f} s   runs {[round(t, 3) for t in all_pw]}")
    print(f"GEMM floor (cross products only):      {t_floor:8.3f} s   runs {[round(t, 3) for t in floors]} "
          f"(faster of one GEMM {t_big:.3f} s and a per-pair loop {t_loop:.3f} s, timed alternately with pairwise)")
    scale = f"×{pairs}/{k}"
    print(f"per-pair metric function calls:        {t_calls_all:8.3f} s   ({k} pairs timed: {t_calls:.3f} s, {scale})")
    print(f"per-pair slow formulas (n×n Grams):    {t_slow_all:8.3f} s   ({k} pairs timed: {t_slow:.3f} s, {scale})")
    print(f"max |pairwise − slow formulas| on the timed pairs: {worst:.2e}")
    print(f"RATIO pairwise / GEMM floor:          {statistics.median(ratios):6.2f}×  (median of the per-round ratios "
          f"{[round(r, 3) for r in ratios]}; aim ≤ 1.5)")
    print(f"RATIO slow formulas / pairwise:       {t_slow_all / t_pw:6.1f}×  (aim ≥ 10)")
    print(f"RATIO per-pair metric calls / pairwise: {t_calls_all / t_pw:6.1f}×")


if __name__ == "__main__":
    main()
