"""`repsim extract`: hidden states of one model into the activation cache, with a one-line summary."""

from __future__ import annotations

import argparse

from repsim.activations.data import load_texts
from repsim.activations.extract import extract
from repsim.system.errors import UserError


def run_extract(args: argparse.Namespace) -> int:
    """`repsim extract MODEL --data ...`: extract (or find in the cache) and print a summary."""
    layers = None
    if args.layers is not None:
        if any(not tok.strip(" ,") for tok in args.layers):
            raise UserError("empty layer spec: use integers, ranges like 2-4, or -1 for the last layer")
        layers = ",".join(args.layers)
    data = load_texts(args.data, text_column=args.text_column, label_column=args.label_column,
                      max_samples=args.max_samples, seed=args.seed, labels=False)
    if getattr(data, "offline_fallback", False):
        print(f"data: {getattr(data, 'source', '')}")
    acts = extract(args.model, data, layers=layers, pool=args.pool, batch_size=args.batch_size,
                   max_length=args.max_length, device=args.device, dtype=args.dtype, cache=not args.no_cache,
                   progress=not args.quiet)
    m = acts.meta
    print(f"{m['model']} ({m.get('revision', '')[:19]}) on {m['data']}: {m['n_texts']} texts, pool={m['pool']}, "
          f"{len(acts.layers)} layers x ({acts.n}, {acts.width}); truncated {m['n_truncated']}; "
          f"{'cache hit' if m.get('cache_hit') else 'extracted'} in {m['timings']['total_s']:.2f} s")
    if m.get("path"):
        print(f"stored in {m['path']}")
    return 0
