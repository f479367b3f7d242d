"""CPU demo: distil SmolLM2-135M-Instruct (30 blocks) into a layer-dropped copy; does the feature term move?

Teacher: the embedded SmolLM2-135M-Instruct (4-bit GGUF, dequantised once and cached). Student: ``drop:N``
(default 10 of 30 blocks, every 3rd, embeddings and LM head copied). Data: SST-like movie-review texts
(a fixed random subset of the offline training split for training, of the validation split for perplexity).
Loss: next-token CE + α · T² · token-level KL to the teacher + β · feature loss on token-level hidden states of the
uniformly mapped blocks (identical tokenizers, so tokens line up).

SmolLM2 has massive activations (Sun et al. 2024): in blocks 12-28 the first token's hidden-state norm is 36-168×
the median token norm (``first_token_norm_ratio`` in the results). Arms (``--arms``, ``LOSS`` or
``LOSS:FIRST_TOKEN``): ``none`` (CE + KD only), ``procrustes:keep`` (every token in the feature loss) and
``procrustes:auto`` (the trainer detects the massive activations and leaves each text's first token out), each for
every seed in ``--seeds`` (the seed orders the data). Recorded per run: the feature term's first and last values
(means over the first and last ``--window`` steps of the training log; the sum over the mapped pairs and per pair),
perplexity after, seconds, and on the validation texts the per-pair Procrustes distance between teacher and student
with all tokens and with the first token left out (also for the student before training).
Runs already in OUT/results.json with the same settings are kept and not rerun (add seeds by rerunning with more).
This is a short demonstration, not a benchmark: 16 steps on 64 texts.

    python examples/distill_smollm2.py [--seeds 0 1 2] [--arms none procrustes:keep procrustes:auto] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import time
import warnings
from pathlib import Path

import pandas as pd
import scipy.stats
import torch

import repsim.distill as D
from repsim.activations.assets import DEFAULT_DECODER
from repsim.distill.data import collate
from repsim.measures.losses import ProcrustesLoss

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def validation_distances(teacher, student, tok, encoded, layer_map) -> dict[str, float]:
    """Mean over the mapped pairs of the Procrustes distance (teacher vs student hidden states, token level, all
    validation texts in one batch), with every real token and with each text's first token left out."""
    batch = collate(encoded, range(len(encoded)), tok.pad_token_id, "right")
    student.eval()
    t_out = teacher(**batch, output_hidden_states=True)
    s_out = student(**batch, output_hidden_states=True)
    loss, mask = ProcrustesLoss(), batch["attention_mask"]
    out = {}
    for name, m in (("all_tokens", mask), ("first_token_out", D.drop_first_token(mask))):
        values = [float(loss(t_out.hidden_states[t], s_out.hidden_states[s], attention_mask=m)) for t, s in layer_map]
        out[name] = statistics.fmean(values)
    return out


def trajectory(log: pd.DataFrame, column: str, window: int) -> tuple[float, float]:
    return float(log[column].head(window).mean()), float(log[column].tail(window).mean())


def summarise(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Per arm: the number of seeds and the mean and sample sd over seeds (None for one seed) of each number."""
    keys = ("perplexity", "seconds", "ce_first", "ce_last", "feature_per_pair_first", "feature_per_pair_last")
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        rows = [r for r in runs if r["arm"] == arm]
        values = {k: [r[k] for r in rows] for k in keys if all(k in r for r in rows)}
        if "feature_per_pair_first" in values:
            values["feature_per_pair_change"] = [r["feature_per_pair_last"] - r["feature_per_pair_first"] for r in rows]
        for name in ("all_tokens", "first_token_out"):
            values[f"validation_procrustes_{name}"] = [r["validation_procrustes"][name] for r in rows]
        out[arm] = {"seeds": len(rows)}
        for k, v in values.items():
            out[arm][f"{k}_mean"] = statistics.fmean(v)
            out[arm][f"{k}_sd"] = statistics.stdev(v) if len(v) > 1 else None
    return out


def _value(run: dict, key: str) -> float:
    prefix = "validation_procrustes_"
    return run["validation_procrustes"][key[len(prefix):]] if key.startswith(prefix) else run[key]


PAIRED = ("perplexity", "validation_procrustes_all_tokens", "validation_procrustes_first_token_out")


def paired(runs: list[dict], reference: str = "none") -> dict[str, dict[str, dict[str, float]]]:
    """Per arm against ``reference`` on the same seeds (same data order), for each of :data:`PAIRED`: the difference
    arm − reference, its mean, sample sd, a 95 % t-interval over seeds, and on how many seeds the arm was lower."""
    by = {(r["arm"], r["seed"]): r for r in runs}
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        seeds = sorted(s for a, s in by if a == arm and (reference, s) in by)
        if arm == reference or len(seeds) < 2:
            continue
        out[f"{arm} - {reference}"] = {}
        for key in PAIRED:
            d = [_value(by[arm, s], key) - _value(by[reference, s], key) for s in seeds]
            mean, sd = statistics.fmean(d), statistics.stdev(d)
            half = scipy.stats.t.ppf(0.975, len(d) - 1) * sd / len(d) ** 0.5
            out[f"{arm} - {reference}"][key] = {"seeds": len(d), "mean": mean, "sd": sd,
                                                "ci95": [mean - float(half), mean + float(half)],
                                                "lower_on_seeds": sum(x < 0 for x in d)}
    return out


# settings that change a run's numbers; --seeds, --arms, --threads and --out only choose or place runs
SAME_RUNS = ("teacher", "keep", "max_train", "max_val", "epochs", "batch_size", "lr", "max_length", "window")


def previous_runs(args: argparse.Namespace) -> list[dict]:
    """The runs an earlier invocation recorded in OUT/results.json with the same settings (so a longer list of seeds
    adds to them); none when the file is absent or its settings differ."""
    path = args.out / "results.json"
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    if any(old.get("settings", {}).get(k) != getattr(args, k) for k in SAME_RUNS):
        return []
    return old.get("runs", [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=DEFAULT_DECODER)
    ap.add_argument("--keep", type=int, default=10, help="blocks the student keeps (evenly spaced)")
    ap.add_argument("--arms", nargs="+", default=["none", "procrustes:keep", "procrustes:auto"],
                    help="LOSS or LOSS:FIRST_TOKEN (auto, mask, keep)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-train", type=int, default=64)
    ap.add_argument("--max-val", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--window", type=int, default=4, help="steps averaged for the first and last feature value")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "examples" / "results" / "distill_smollm2")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train, validation = D.load_train_validation("sst2", max_train=args.max_train, max_val=args.max_val)
    teacher, tok = D.load(args.teacher, "causal-lm")
    valid = D.encode(tok, validation.texts, None, args.max_length)
    layer_map = D.parse_layer_map("uniform", D.num_layers(teacher), args.keep)
    ratios = D.first_token_norm_ratios(teacher, D.encode(tok, train.texts, None, args.max_length),
                                       range(D.num_layers(teacher) + 1), tok.pad_token_id)
    results = {"teacher": args.teacher, "student": f"drop:{args.keep}", "n_train": len(train.texts),
               "n_validation": len(validation.texts), "data": train.source,
               "settings": {k: v for k, v in vars(args).items() if k != "out"},
               "layer_map": layer_map, "massive_ratio_threshold": D.MASSIVE_RATIO,
               "first_token_norm_ratio": {str(k): round(v, 2) for k, v in ratios.items()},
               "teacher_perplexity": D.perplexity(teacher, tok, valid, batch_size=8)}
    student, s_tok = D.make_student(f"drop:{args.keep}", teacher, tok, "causal-lm", None, seed=0)
    results["student_perplexity_before"] = D.perplexity(student, s_tok, valid, batch_size=8)
    results["student_validation_procrustes_before"] = validation_distances(teacher, student, tok, valid, layer_map)
    results["runs"] = previous_runs(args)
    print(json.dumps(results, indent=2), flush=True)
    # the recipe of the first one-seed run of this demo: fixed β = 1 and clipping at 1 (not the calibrated default)
    base = D.DistillConfig(task="causal-lm", features="tokens", epochs=args.epochs, batch_size=args.batch_size,
                           lr=args.lr, max_length=args.max_length, cache_teacher=False, progress=False,
                           feature_scale="fixed", max_grad_norm=1.0)
    for seed in args.seeds:
        for arm in args.arms:
            if any(r["arm"] == arm and r["seed"] == seed for r in results["runs"]):
                continue  # recorded by an earlier invocation with the same settings
            loss, _, first_token = arm.partition(":")
            cfg = dataclasses.replace(base, loss=loss, seed=seed, first_token=first_token or "auto")
            student, s_tok = D.make_student(f"drop:{args.keep}", teacher, tok, "causal-lm", None, seed=0)
            run_dir = args.out / "runs" / arm.replace(":", "-") / f"seed{seed}"
            t0 = time.time()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = D.distill((teacher, tok), (student, s_tok), train.texts, validation.texts, config=cfg,
                                out=run_dir)
            row = {"arm": arm, "seed": seed, "perplexity": res.metrics["perplexity"],
                   "seconds": round(time.time() - t0, 1),
                   "massive_warning": [str(w.message) for w in caught if "massive" in str(w.message)]}
            for column in ("ce", "kd", "feature"):
                if column in res.history:
                    first, last = trajectory(res.history, column, args.window)
                    row[f"{column}_first"], row[f"{column}_last"] = first, last
            if "feature_first" in row:
                row["feature_per_pair_first"] = row["feature_first"] / len(layer_map)
                row["feature_per_pair_last"] = row["feature_last"] / len(layer_map)
            row["validation_procrustes"] = validation_distances(teacher, res.student, tok, valid, layer_map)
            for leftover in ("student", "checkpoint.pt"):  # weights are not committed
                path = run_dir / leftover
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            results["runs"].append(row)
            results["summary"] = summarise(results["runs"])
            results["paired"] = paired(results["runs"])
            (args.out / "results.json").write_text(json.dumps(results, indent=2))  # after every run
            print(json.dumps(row), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
