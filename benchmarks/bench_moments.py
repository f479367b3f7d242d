"""CrossMoments streaming: peak memory and throughput against the machine's measured GEMM rate.

Streams --rows rows (default 1,000,000) of a 768-wide teacher and a 384-wide student in batches of --batch
(default 4096) through ``CrossMoments.update``, then reads every linear metric. Batches come from a small pool
generated beforehand (float32, like stored activations), so data generation is not timed.

- peak memory: the process's peak resident set size (ru_maxrss) minus its resident size just before streaming,
  i.e. what streaming added on top of the pool and the imports (must stay < 1 GiB, independent of --rows).
- throughput: rows/s, and the useful flop rate 2·(p² + q² + pq) flop/row (the three co-moment GEMMs) as a fraction
  of the GEMM rate torch reaches on the same shapes in the same run (XᵀY with X (batch × p), Y (batch × (p + q))),
  sampled between batches throughout the run (the streaming time excludes those samples).

    python benchmarks/bench_moments.py [--rows 1000000] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

import torch

from repsim.measures.moments import CrossMoments


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def gemm_rate(x: torch.Tensor, xy: torch.Tensor, repeats: int = 3) -> float:
    """Median flop/s of the update's GEMM shape in float64: (batch × p)ᵀ (batch × (p + q))."""
    flops = 2 * x.shape[0] * x.shape[1] * xy.shape[1]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.T @ xy
        times.append(time.perf_counter() - t0)
    return flops / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--p", type=int, default=768)
    ap.add_argument("--q", type=int, default=384)
    ap.add_argument("--pool", type=int, default=4, help="distinct pre-generated batches cycled through")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rate-every", type=int, default=20, help="sample the GEMM rate every this many batches")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    p, q, b = args.p, args.q, args.batch
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(p, q, generator=g) / p ** 0.5
    pool = []
    for _ in range(args.pool):
        x = torch.randn(b, p, generator=g) + 5.0
        pool.append((x, x @ mix + torch.randn(b, q, generator=g)))
    CrossMoments(p, q).update(*pool[0])  # warm-up
    gx = torch.randn(b, p, dtype=torch.float64, generator=g)
    gxy = torch.randn(b, p + q, dtype=torch.float64, generator=g)
    rates = [gemm_rate(gx, gxy)]

    rss0 = rss_bytes()
    m = CrossMoments(p, q)
    t_stream = 0.0
    done = 0
    i = 0
    while done < args.rows:
        x, y = pool[i % len(pool)]
        take = min(b, args.rows - done)
        t0 = time.perf_counter()
        m.update(x[:take], y[:take])
        t_stream += time.perf_counter() - t0
        done += take
        i += 1
        if i % args.rate_every == 0:  # the machine is shared: sample the GEMM rate throughout the run
            rates.append(gemm_rate(gx, gxy, repeats=1))
    t1 = time.perf_counter()
    values = {mid: m.value(mid) for mid in ("procrustes[distance]", "gram_frobenius", "cka[linear,biased]",
                                            "cka[linear,debiased]", "projection_residual[in_sample]")}
    t_metrics = time.perf_counter() - t1
    peak_added = peak_rss_bytes() - rss0
    rates.append(gemm_rate(gx, gxy))
    rate = statistics.median(rates)

    flops = 2 * done * (p * p + q * q + p * q)
    state_bytes = sum(t.numel() * t.element_size() for t in m.state_dict().values())
    print(f"machine: {platform.machine()} CPU, {torch.get_num_threads()} torch threads")
    print(f"streamed {done} rows ({p} vs {q}) in batches of {b}: {t_stream:.2f} s, {done / t_stream:,.0f} rows/s; "
          f"metrics from moments {t_metrics * 1e3:.1f} ms")
    print("values: " + ", ".join(f"{k} {v:.6f}" for k, v in values.items()))
    print(f"peak RSS added while streaming: {peak_added / 2**20:.1f} MiB (limit 1024 MiB); accumulator state "
          f"{state_bytes / 2**20:.1f} MiB")
    print(f"useful flop rate {flops / t_stream / 1e9:.2f} GFLOP/s; GEMM rate on the same shapes "
          f"{rate / 1e9:.2f} GFLOP/s (median of {len(rates)} samples taken between batches, "
          f"{min(rates) / 1e9:.2f}–{max(rates) / 1e9:.2f})")
    print(f"RATIO throughput / GEMM rate: {flops / t_stream / rate:.2f}")


if __name__ == "__main__":
    main()
