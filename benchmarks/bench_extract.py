"""Extraction benchmarks on the real all-MiniLM-L6-v2 and the 872-text SST-like set, each against a baseline
measured in the same run (medians of interleaved repeats).

1. overhead: ``repsim.activations.extract`` (cache off) vs a hand-written transformers loop doing the same work (same
batch
   size, same length-sorted batches, masked mean of every hidden state); also vs the naive hand loop
   (batches in input order). Target: overhead <= 10 %.
2. batching: length-sorted vs input-order batches (dynamic padding) through repsim. Target: >= 1.3x.
3. cache: first run (resolve + load + forward + write) vs a cache hit (tokenizer + checksums + memory map),
   both through ``extract("all-MiniLM-L6-v2", ...)``. Target: >= 20x.
4. streaming: ``extract_moments`` (token level, MiniLM vs itself, all 7x7 layer pairs) over >= 200,000 tokens of
   the SST-like train split; resident memory sampled after every batch. Target: flat as tokens grow.

Run: ``python benchmarks/bench_extract.py [--repeats 3] [--stream-tokens 200000]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def hand_loop(model, tok, texts, batch_size: int, max_length: int, sort: bool) -> np.ndarray:
    """The loop people write by hand: tokenize a batch, forward with hidden states, masked mean, numpy."""
    order = sorted(range(len(texts)), key=lambda i: -len(tok(texts[i])["input_ids"])) if sort else range(len(texts))
    order = list(order)
    out = None
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            hs = model(**enc, output_hidden_states=True).hidden_states
            m = enc["attention_mask"].unsqueeze(-1).float()
            pooled = torch.stack([(h * m).sum(1) / m.sum(1) for h in hs])  # (L, b, w)
            if out is None:
                out = np.empty((pooled.shape[0], len(texts), pooled.shape[2]), dtype=np.float32)
            out[:, idx] = pooled.numpy()
    return out


def timed(fn):
    t = time.perf_counter()
    res = fn()
    return time.perf_counter() - t, res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--stream-tokens", type=int, default=200_000)
    ap.add_argument("--skip-stream", action="store_true")
    ap.add_argument("--only-stream", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared, oversubscribed CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from repsim.activations import store
    from repsim.activations.data import load_texts
    from repsim.activations.extract import extract
    from repsim.activations.models import load_model

    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}")
    data = load_texts("sst2")
    texts = data.texts
    model, tok, _ = load_model("all-MiniLM-L6-v2")
    pair = (model, tok)
    bs, ml = args.batch_size, args.max_length
    print(f"data: {len(texts)} texts ({data.source[:60]}...), batch {bs}, max_length {ml}")

    if args.only_stream:
        return stream(args, pair, tok)
    # warm-up (allocator, kernels)
    extract(pair, texts[:64], batch_size=bs, max_length=ml, cache=False, progress=False)
    hand_loop(model, tok, texts[:64], bs, ml, True)

    # 1 + 2: interleaved repeats
    t = {"hand_sorted": [], "hand_input_order": [], "repsim_sorted": [], "repsim_input_order": []}
    ref = None
    for _ in range(args.repeats):
        dt, ref = timed(lambda: hand_loop(model, tok, texts, bs, ml, True))
        t["hand_sorted"].append(dt)
        dt, _ = timed(lambda: hand_loop(model, tok, texts, bs, ml, False))
        t["hand_input_order"].append(dt)
        dt, acts = timed(lambda: extract(pair, texts, batch_size=bs, max_length=ml, cache=False, progress=False))
        t["repsim_sorted"].append(dt)
        dt, _ = timed(lambda: extract(pair, texts, batch_size=bs, max_length=ml, cache=False, progress=False,
                                      sort_by_length=False))
        t["repsim_input_order"].append(dt)
    err = float(np.abs(acts.stack() - ref).max())
    med = {k: statistics.median(v) for k, v in t.items()}
    for k, v in t.items():
        print(f"  {k:<20} median {med[k]:6.2f} s  ({', '.join(f'{x:.2f}' for x in v)})  "
              f"{len(texts) / med[k]:6.0f} texts/s")
    print(f"[overhead] repsim vs hand loop, same sorted batches: {med['repsim_sorted'] / med['hand_sorted']:.3f}x "
          f"({100 * (med['repsim_sorted'] / med['hand_sorted'] - 1):+.1f} %); max |diff| {err:.2e}")
    print(f"[overhead] repsim vs naive hand loop (input order): "
          f"{med['repsim_sorted'] / med['hand_input_order']:.3f}x")
    print(f"[batching] length-sorted vs input order (repsim): "
          f"{med['repsim_input_order'] / med['repsim_sorted']:.2f}x faster")

    # 3: cache
    firsts, hits = [], []
    for _ in range(max(2, args.repeats - 1)):
        probe = extract("all-MiniLM-L6-v2", data, batch_size=bs, max_length=ml, progress=False)
        store.Store().rm(Path(probe.meta["path"]).name)  # start from no entry
        del probe
        dt, first = timed(lambda: extract("all-MiniLM-L6-v2", data, batch_size=bs, max_length=ml, progress=False))
        assert not first.meta["cache_hit"]
        firsts.append(dt)
        for _ in range(3):
            store._VERIFIED.clear()  # as in a new process: checksums verified again
            dt, hit = timed(lambda: extract("all-MiniLM-L6-v2", data, batch_size=bs, max_length=ml,
                                            progress=False))
            assert hit.meta["cache_hit"]
            hits.append(dt)
    f, h = statistics.median(firsts), statistics.median(hits)
    print(f"[cache] first run median {f:.2f} s ({', '.join(f'{x:.2f}' for x in firsts)}); hit median {h:.3f} s "
          f"({', '.join(f'{x:.3f}' for x in hits)}); {f / h:.0f}x faster")

    if not args.skip_stream:
        stream(args, pair, tok)


def stream(args, pair, tok) -> None:
    """4: streaming moments memory."""
    from repsim.activations.data import load_texts
    from repsim.activations.extract import extract_moments

    bs, ml = args.batch_size, args.max_length
    train = load_texts("sst2", split="train")
    lengths = np.array([len(x) for x in tok(train.texts, truncation=True, max_length=ml)["input_ids"]])
    n_texts = int(np.searchsorted(np.cumsum(lengths), args.stream_tokens)) + 1
    stream_texts = train.texts[:n_texts]
    total = int(lengths[:n_texts].sum())
    samples: list[tuple[int, float]] = []
    base = rss_mb()
    t0 = time.perf_counter()
    moments = extract_moments(pair, pair, stream_texts, pool="tokens", batch_size=bs, max_length=ml, progress=False,
                              on_batch=lambda rows: samples.append((rows, rss_mb())))
    dt = time.perf_counter() - t0
    rows = np.array([r for r, _ in samples])
    rss = np.array([m for _, m in samples])
    print(f"[stream] {moments.n} tokens ({n_texts} texts; expected {total}) in {dt:.1f} s, "
          f"{moments.n / dt:.0f} tokens/s; RSS before {base:.0f} MB")
    for frac in (0.1, 0.25, 0.5, 0.75, 1.0):
        i = int(np.searchsorted(rows, frac * rows[-1]))
        i = min(i, len(rows) - 1)
        print(f"  after {rows[i]:>7} tokens: RSS {rss[i]:7.1f} MB, peak so far {rss[:i + 1].max():7.1f} MB")
    q = len(rows) // 4
    stored_gib = 2 * moments.n * 7 * 384 * 4 / 2**30
    print(f"[stream] peak RSS first quarter {rss[:q].max():.1f} MB vs whole run {rss.max():.1f} MB "
          f"(+{rss.max() - rss[:q].max():.1f} MB while tokens grew {rows[-1] / rows[q]:.1f}x); storing the token "
          f"features instead would take 2 x {moments.n} x 7 x 384 x 4 B = {stored_gib:.2f} GiB")
    cka = moments.matrix("cka[linear,biased]")
    print(f"[stream] sanity: token-level CKA of MiniLM with itself, diagonal min {np.diag(cka).min():.6f}")


if __name__ == "__main__":
    main()
