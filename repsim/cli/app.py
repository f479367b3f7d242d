"""The `repsim` command line: it parses arguments and calls the library, nothing else.

Errors a user can cause (`repsim.system.errors.UserError`, missing files, ...) print one line on stderr and exit
with status 2; anything else is a bug and keeps its traceback (exit 1).

Each subcommand is one `_add_<name>(subparsers)` function that registers its parser, listed in :data:`SUBCOMMANDS`;
its handler is a function in a module of this package (:data:`SUBCOMMAND_HANDLERS`: ``repsim.cli.compare``,
``.extract``, ``.cache``, ``.theory``, ``.distill``), imported when the subcommand runs so `repsim --help` stays
fast. ``choices=`` come from the registries (the pooling modes of :mod:`repsim.activations.pooling`).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import math
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from repsim import __version__
from repsim.activations.pooling import POOL_NAMES, TEXT_POOLS
from repsim.cli.flags import as_flags
from repsim.system.errors import UserError

# ------------------------------------------------------------------------------------ argument types


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error form: one ``repsim: error: ...`` line and exit status 2 (argparse's own
    form prints the whole usage first). Subcommand parsers inherit the class. Each parser records the flag of every
    parameter it adds (``flags``: dest -> option string), so library messages can be shown in flags."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self.flags: dict[str, str] = {}
        self.subcommands: list[argparse.Action] = []
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:  # noqa: ANN002, ANN003
        action = super().add_argument(*args, **kwargs)
        long = [o for o in action.option_strings if o.startswith("--")]
        if long:
            self.flags[action.dest] = long[0]
        return action

    def add_subparsers(self, **kwargs) -> argparse.Action:  # noqa: ANN003
        action = super().add_subparsers(**kwargs)
        self.subcommands.append(action)
        return action

    def all_flags(self) -> dict[str, str]:
        """The flags of this parser and of its subcommands' parsers."""
        merged = dict(self.flags)
        for action in self.subcommands:
            for child in action.choices.values():
                merged.update(child.all_flags())
        return merged

    def error(self, message: str):
        self.exit(2, f"repsim: error: {message} (see `{self.prog} --help`)\n")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _at_least(low: int):
    def parse(text: str) -> int:
        value = _integer(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer ≥ {low}, got {text}")
        return value
    return parse


def _finite(low: float | None = None, high: float | None = None, *, open_low: bool = False,
            open_high: bool = False):
    """A finite float in [low, high] (either end open when asked)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        bad = not math.isfinite(value)
        bad |= low is not None and (value <= low if open_low else value < low)
        bad |= high is not None and (value >= high if open_high else value > high)
        if bad:
            lo = "(-inf" if low is None else f"{'(' if open_low else '['}{low:g}"
            hi = "inf)" if high is None else f"{high:g}{')' if open_high else ']'}"
            raise argparse.ArgumentTypeError(f"must be a finite number in {lo}, {hi}, got {text}")
        return value
    return parse


_POSITIVE = _at_least(1)
_COUNT = _at_least(0)
_EPS = _finite(0.0, 1.0, open_high=True)
_FRACTION = _finite(0.0, 1.0)
_NONNEGATIVE = _finite(0.0)
_POSITIVE_REAL = _finite(0.0, open_low=True)


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_POSITIVE, default=None, metavar="N",
                   help="CPU threads for torch and BLAS (default: torch's choice); on a CPU shared with other jobs "
                   "1 is often fastest")


#: the --pool choices: the pooling registry's modes (repsim.activations.pooling imports no torch)
POOL_CHOICES = POOL_NAMES


def _add_pool(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool", default="mean", choices=POOL_CHOICES,
                   help="rows: one per text (mean, cls, last), per token (tokens: same tokenizer on both sides) or "
                   "per word (words: sub-tokens averaged into words, any two tokenizers)")


_MAX_SAMPLES_HELP = "use a seeded random N of the texts (--seed), kept in their original order"

# ------------------------------------------------------------------------------------ compare


def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare", help="compare a teacher and a student layer by layer (Procrustes, Gram-Frobenius, CKA, ...)",
        description="Compare a teacher and a student layer by layer. With no models named, runs the embedded "
        "default: all-mpnet-base-v2 (teacher) vs all-MiniLM-L6-v2 (student) on sst2.")
    p.add_argument("teacher", nargs="?", default=None, help="teacher model: HF id, short name or local folder")
    p.add_argument("student", nargs="?", default=None, help="student model: HF id, short name or local folder")
    p.add_argument("--data", default=None,
                   help="sst2 (default) | PATH (.txt/.csv/.tsv/.jsonl/.parquet) | hf:NAME[:CONFIG][@SPLIT]")
    p.add_argument("--text-column", default=None, help="column holding the texts (files / hf data sets)")
    p.add_argument("--label-column", default=None, help="column holding the labels (optional)")
    p.add_argument("--teacher-acts", default=None, metavar="PATH",
                   help="compare saved activations instead of models: a .npy/.safetensors file (one layer, or a "
                   "(layers, texts, width) stack, or one tensor per layer) or a folder with one file per layer; "
                   "needs --student-acts; rows = texts, in the same order on both sides")
    p.add_argument("--student-acts", default=None, metavar="PATH", help="the student's saved activations (as "
                   "--teacher-acts)")
    p.add_argument("--metrics", nargs="+", default=None, metavar="METRIC",
                   help="metric ids, e.g. procrustes gram_frobenius cka 'projection_residual[folds=5]' "
                   "(default: the four default metrics)")
    _add_pool(p)
    p.add_argument("--layers", nargs="+", default=None, metavar="SPEC",
                   help="layer indices for both models (0 = embeddings, -1 = last, ranges 0-6); "
                   "prefix t: or s: for one side, e.g. t:0-12 s:0-6")
    p.add_argument("--max-samples", type=_POSITIVE, default=None, metavar="N", help=_MAX_SAMPLES_HELP)
    p.add_argument("--batch-size", type=_POSITIVE, default=32, metavar="B")
    p.add_argument("--max-length", type=_POSITIVE, default=128, metavar="T", help="truncate texts to T tokens")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--bootstrap", type=_COUNT, default=0, metavar="B",
                   help="bootstrap replicates over texts for 95%% percentile intervals (e.g. 200)")
    p.add_argument("--permutations", type=_COUNT, default=0, metavar="P",
                   help="student-row permutations for p-values (e.g. 200)")
    p.add_argument("--curve", action="store_true",
                   help="also recompute every metric of the best-matching pairs on seeded subsamples of growing size "
                        "(convergence with n; curve.csv and curve.png/.svg under --out)")
    p.add_argument("--curve-sizes", type=_POSITIVE, nargs="+", default=None, metavar="N",
                   help="numbers of texts for --curve (default: n/16, n/8, n/4, n/2, n)")
    p.add_argument("--curve-subsamples", type=_POSITIVE, default=5, metavar="S",
                   help="seeded subsamples per size for --curve (default 5)")
    p.add_argument("--chance-permutations", type=_COUNT, default=4, metavar="K",
                   help="chance level of every cell: the mean over K seeded student-row permutations (the first K of "
                        "--permutations); 0 disables it (default 4)")
    p.add_argument("--stats-metrics", nargs="+", default=None, metavar="METRIC",
                   help="metrics that get bootstrap intervals / p-values / chance levels (default: all compared "
                        "metrics but the k-fold projection residual, whose bootstrap replicates leak duplicated texts "
                        "across folds and whose permutations cost a full held-out fit each)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write results.csv, heatmap_<metric>.png/.svg, best_match.png/.svg, report.json and "
                   "report.html (one self-contained page)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the activation cache")
    p.add_argument("--seed", type=_COUNT, default=0, help="seed for data sampling, bootstrap and permutations")
    p.add_argument("--suggest-map", default=None, metavar="METRIC",
                   help="print the monotone teacher->student layer map maximising total similarity under METRIC")
    _add_threads(p)


# ------------------------------------------------------------------------------------ plot


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="redraw heatmaps, the best-match plot and report.html from a results.csv",
                       description="Redraw heatmap_<metric>.png/.svg, best_match.png/.svg and report.html from a "
                       "results.csv written by `repsim compare --out` (and the report.json beside it, when present).")
    p.add_argument("results", metavar="DIR|RESULTS.csv", help="an output folder of `repsim compare` or its results.csv")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: beside RESULTS.csv)")


# ------------------------------------------------------------------------------------ extract


def _add_extract(sub) -> None:
    p = sub.add_parser("extract", help="extract hidden states of a model into the activation cache",
                       description="Extract the hidden states of MODEL on a data set (pooled per text, or per "
                       "token) into the activation cache; a second run reads the cache. Layer 0 = embeddings, "
                       "k = output of block k.")
    p.add_argument("model", help="HF id, short name (all-MiniLM-L6-v2) or local folder")
    p.add_argument("--data", default="sst2",
                   help="sst2 | PATH (.txt/.csv/.tsv/.jsonl/.parquet) | hf:NAME[:CONFIG][@SPLIT]")
    p.add_argument("--text-column", default=None, help="column holding the texts (files / hf data sets)")
    p.add_argument("--label-column", default=None, help="column holding the labels (optional)")
    p.add_argument("--max-samples", type=_POSITIVE, default=None, metavar="N", help=_MAX_SAMPLES_HELP)
    p.add_argument("--seed", type=_COUNT, default=0, help="seed for --max-samples sampling")
    _add_pool(p)
    p.add_argument("--layers", nargs="+", default=None, metavar="SPEC",
                   help="layer indices (0 = embeddings, -1 = last, ranges 2-4; default all)")
    p.add_argument("--batch-size", type=_POSITIVE, default=32, metavar="B")
    p.add_argument("--max-length", type=_POSITIVE, default=128, metavar="T", help="truncate texts to T tokens")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype of the model (features are stored as float32)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the activation cache")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_threads(p)


# ------------------------------------------------------------------------------------ cache


def _add_cache(sub) -> None:
    p = sub.add_parser("cache", help="list, inspect, verify, remove or prune cached activations",
                       description="Manage the activation cache ($REPSIM_CACHE, else $XDG_CACHE_HOME/repsim, else "
                       "~/.cache/repsim).")
    actions = p.add_subparsers(dest="cache_action", metavar="ACTION")
    listing = actions.add_parser("list", aliases=["ls"],
                                 help="one line per entry (key, model, pooling, texts, layers, size, last use)")
    listing.set_defaults(cache_action="list")
    info = actions.add_parser("info", aliases=["show"], help="manifest and provenance of one entry")
    info.set_defaults(cache_action="info")
    info.add_argument("key", help="entry key or unique prefix (from `repsim cache list`)")
    info.add_argument("--verify", action="store_true", help="check every array against its sha256 (exit 1 if damaged)")
    info.add_argument("--json", action="store_true", help="print the full manifest as JSON")
    rm = actions.add_parser("rm", aliases=["remove", "delete"], help="remove entries")
    rm.set_defaults(cache_action="rm")
    rm.add_argument("keys", nargs="*", help="entry keys or unique prefixes")
    rm.add_argument("--all", action="store_true", help="remove every entry")
    prune = actions.add_parser("prune", help="remove entries by age and/or total size (least recently used first)")
    prune.add_argument("--older-than", type=_NONNEGATIVE, default=None, metavar="DAYS", help="not used for DAYS days")
    prune.add_argument("--max-size", default=None, metavar="SIZE", help="keep the cache under SIZE (e.g. 5GB)")
    prune.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p.set_defaults(cache_action=None)


# ------------------------------------------------------------------------------------ counterexample


def _add_counterexample(sub) -> None:
    p = sub.add_parser(
        "counterexample", help="build the paper's counterexamples (Theorem 1, projection, synthetic distillation)",
        description="Print the closed forms and measured metrics of the constructions where CKA (in the limit) and "
        "the projection loss (exactly) miss geometry that Procrustes and Gram-Frobenius see; with --out, also "
        "write theory_*.csv and theory_*.png.")
    p.add_argument("which", nargs="?", default="all", choices=["theorem1", "projection", "synthetic", "all"])
    p.add_argument("--out", default=None, metavar="DIR", help="write tables (CSV) and figures (PNG) here")
    p.add_argument("--seeds", nargs="+", type=_COUNT, default=[0, 1, 2], metavar="S", help="synthetic: seeds")
    p.add_argument("--steps", type=_POSITIVE, default=300, metavar="N", help="synthetic: Adam steps per run")
    p.add_argument("--eps", type=_EPS, default=0.1, help="synthetic: |cos| <= eps counts as eps-orthogonal")


# ------------------------------------------------------------------------------------ check


def _add_check(sub) -> None:
    p = sub.add_parser(
        "check", help="geometry check of a teacher/student pair at mapped layers (angles, not only scores)",
        description="At each mapped layer pair: Procrustes, Gram-Frobenius, CKA, projection residual, the overlap "
        "of the teacher's and the student's eps-orthogonal pairs, the correlation of their pairwise cosines, angle "
        "distortion quantiles, the largest inner-product error, each with its chance level, permutation p-value "
        "and z-score from shuffles of the student's rows, and a verdict that flags 'CKA says similar, geometry "
        "differs'.")
    p.add_argument("teacher", help="teacher model: HF id, short name or local folder")
    p.add_argument("student", help="student model: HF id, short name or local folder (e.g. a distilled student)")
    p.add_argument("--data", default="sst2",
                   help="sst2 | PATH (.txt/.csv/.tsv/.jsonl/.parquet) | hf:NAME[:CONFIG][@SPLIT]")
    p.add_argument("--map", dest="layer_map", default="uniform", metavar="MAP",
                   help="teacher:student layer pairs, e.g. '12:6,6:3', or 'uniform' (student block j <-> teacher "
                   "block round(j*Lt/Ls)), or a file as for distill --layer-map (CSV with teacher_layer and "
                   "student_layer, JSON pairs, or the line compare --suggest-map prints); 0 = embeddings")
    p.add_argument("--eps", type=_EPS, default=0.1, help="|cos| <= eps counts as eps-orthogonal (centred rows)")
    p.add_argument("--max-samples", type=_POSITIVE, default=None, metavar="N",
                   help=_MAX_SAMPLES_HELP + " (default: all, the texts compare uses); pairwise angles cost O(N^2) "
                        "memory")
    p.add_argument("--pool", default="mean", choices=TEXT_POOLS, help="pooling per text")
    p.add_argument("--batch-size", type=_POSITIVE, default=32, metavar="B")
    p.add_argument("--max-length", type=_POSITIVE, default=128, metavar="T", help="truncate texts to T tokens")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--cka-threshold", type=_FRACTION, default=0.9,
                   help="CKA at least this fraction of the way from its chance level to 1 counts as 'similar'")
    p.add_argument("--procrustes-threshold", type=_NONNEGATIVE, default=0.5,
                   help="Procrustes distance more than this fraction of the way from 0 to its chance level counts "
                        "as 'geometry differs'")
    p.add_argument("--permutations", type=_COUNT, default=200, metavar="P",
                   help="seeded shuffles of the student's rows that give every diagnostic its chance level, "
                        "permutation p-value and z-score (default 200; 0: no null, the ends of the ranges stand in "
                        "for the chance levels)")
    p.add_argument("--chance-permutations", dest="permutations", type=_COUNT, help=argparse.SUPPRESS)
    p.add_argument("--preservation-threshold", type=_FRACTION, default=0.5,
                   help="overlap (Jaccard) of the teacher's and the student's eps-orthogonal pairs less than this "
                        "fraction of the way from its chance level to 1 counts as 'geometry differs'")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the activation cache")
    p.add_argument("--seed", type=_COUNT, default=0, help="seed for data sampling and the shuffles of --permutations")
    p.add_argument("--out", default=None, metavar="DIR", help="write check.csv and check.json here")
    _add_threads(p)


# ------------------------------------------------------------------------------------ distill


def _add_training_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="sst2", help="training data: sst2 (train split), a local file, or hf:NAME")
    p.add_argument("--val-data", default=None,
                   help="validation data (default: sst2's validation split, else a fixed random 10%% of --data)")
    p.add_argument("--max-train", type=_POSITIVE, default=None, metavar="N",
                   help="use a fixed random N of the training texts (seed 0, the same for every --seed; "
                   "in their original order)")
    p.add_argument("--max-val", type=_POSITIVE, default=None, metavar="N",
                   help="use a fixed random N of the validation texts (seed 0)")
    p.add_argument("--task", choices=["sequence-classification", "causal-lm"], default="sequence-classification")
    p.add_argument("--epochs", type=_POSITIVE, default=3)
    p.add_argument("--batch-size", type=_POSITIVE, default=32)
    p.add_argument("--lr", type=_POSITIVE_REAL, default=1e-4,
                   help="peak learning rate (AdamW, linear warm-up and decay)")
    p.add_argument("--max-length", type=_at_least(2), default=64, help="truncate texts to this many tokens")
    p.add_argument("--seed", type=_COUNT, default=0)
    p.add_argument("--checkpoint-every", type=_COUNT, default=0, help="optimizer steps between checkpoints "
                   "(0: end of each epoch); an interrupted run resumes from --out")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_threads(p)


def _add_distill(sub) -> None:
    p = sub.add_parser("distill", help="distil a teacher into a student with a feature loss; several losses and "
                       "seeds give a table, paired tests and a figure",
                       description="Total loss = CE + alpha * T^2 KL(teacher || student at temperature T) + "
                       "beta * sum over mapped layers of the feature loss. Runs every --loss for every seed.")
    p.add_argument("teacher", help="hub id, short name or local folder (a classifier; see --finetune-teacher)")
    p.add_argument("student", help="hub id or folder, drop:N / drop:i,j,k (teacher blocks kept, 1-based), or "
                   "narrow:HIDDEN:LAYERS (random init from the teacher's config)")
    p.add_argument("--loss", nargs="+", default=["none"],
                   help="arms: feature loss(es) none (CE + KD) projection cka procrustes gram_frobenius, the control "
                   "ce_only (CE alone), or all (every one of them)")
    p.add_argument("--seeds", type=_POSITIVE, default=1, help="run seeds seed..seed+N-1 for every loss")
    p.add_argument("--alpha", type=_NONNEGATIVE, default=1.0, help="weight of the KD term")
    p.add_argument("--beta", type=_NONNEGATIVE, default=1.0, help="weight of the summed feature loss")
    p.add_argument("--temperature", type=_POSITIVE_REAL, default=2.0)
    p.add_argument("--layer-map", default="uniform",
                   help="uniform, teacher:student pairs like 2:1,4:2,6:3, or a file: CSV with teacher_layer and "
                   "student_layer, JSON pairs, or the line compare --suggest-map prints")
    p.add_argument("--features", choices=["mean", "tokens"], default="mean",
                   help="feature loss on mean-pooled texts or on tokens (tokens need identical tokenizers)")
    p.add_argument("--first-token", choices=["auto", "mask", "keep"], default="auto",
                   help="with --features tokens: leave each text's first token out of the feature loss (mask), keep "
                   "it (keep), or mask it when the teacher has massive activations there (auto: its norm > 20x the "
                   "median token norm at a mapped layer, with a warning)")
    p.add_argument("--feature-scale", choices=["gradient", "fixed"], default="gradient",
                   help="gradient: weight each mapped pair so that at initialisation it pushes the student's weights "
                   "with 1/K of the task's gradient norm (K pairs), then times --beta; fixed: --beta alone")
    p.add_argument("--calibration-batches", type=_POSITIVE, default=2,
                   help="training batches (the first ones, in data order) that measure those gradient norms")
    p.add_argument("--projection-init", choices=["ridge", "random"], default="ridge",
                   help="start the projection maps at their ridge fit (GCV) to the teacher, or at random")
    p.add_argument("--projection-lr", type=_POSITIVE_REAL, default=1e-3,
                   help="peak learning rate of the projection maps (same schedule as --lr)")
    p.add_argument("--max-grad-norm", type=_NONNEGATIVE, default=50.0,
                   help="clip the student's gradient norm at this value (0: no clipping); metrics.json reports "
                   "the fraction of clipped steps")
    p.add_argument("--finetune-teacher", action="store_true",
                   help="fine-tune the teacher's head on --data first when it has none")
    p.add_argument("--teacher-epochs", type=_POSITIVE, default=None,
                   help="epochs for --finetune-teacher (default 3; the teacher's own, not --epochs)")
    p.add_argument("--teacher-lr", type=_POSITIVE_REAL, default=None,
                   help="peak learning rate for --finetune-teacher (default 1e-4; the teacher's own, not --lr)")
    p.add_argument("--teacher-batch-size", type=_POSITIVE, default=None,
                   help="batch size for --finetune-teacher (default 32; the teacher's own, not --batch-size); "
                   "the teacher is fine-tuned with seed 0 whatever --seed says")
    p.add_argument("--out", default="distill-out", help="output folder (runs, summary.md, paired_tests.csv, figure)")
    p.add_argument("--geometry", type=_COUNT, default=0, metavar="P",
                   help="after each run, its geometry against the teacher on the validation texts (every layer "
                   "pair; chance levels from P row permutations on the trained and neighbouring pairs): "
                   "geometry.csv per run, a before/after table and the geometry-accuracy test (0: off)")
    p.add_argument("--keep-students", action="store_true",
                   help="keep each trained student (OUT/runs/LOSS/seedK/student) instead of deleting its weights")
    _add_training_options(p)


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a classifier (or causal LM) on labelled data; saves OUT/model",
                       description="Plain fine-tuning (cross-entropy), e.g. to give a teacher a trained head.")
    p.add_argument("model", help="hub id, short name or local folder")
    p.add_argument("--out", default="finetune-out", help="output folder (model/, metrics.json, train_log.csv)")
    _add_training_options(p)



# ------------------------------------------------------------------------------------ main

#: the subcommands, in the order `repsim --help` lists them: name -> the function that adds its parser
SUBCOMMANDS = {"compare": _add_compare, "plot": _add_plot, "extract": _add_extract, "cache": _add_cache,
               "counterexample": _add_counterexample, "check": _add_check, "distill": _add_distill,
               "finetune": _add_finetune}
#: name -> (module, function) of its handler, imported when the subcommand runs (so `repsim --help` and
#: `repsim cache` load no model code)
SUBCOMMAND_HANDLERS = {"compare": ("repsim.cli.compare", "run_compare"), "plot": ("repsim.cli.compare", "run_plot"),
                       "extract": ("repsim.cli.extract", "run_extract"), "cache": ("repsim.cli.cache", "run_cache"),
                       "counterexample": ("repsim.cli.theory", "run_counterexample"),
                       "check": ("repsim.cli.theory", "run_check"), "distill": ("repsim.cli.distill", "run_distill"),
                       "finetune": ("repsim.cli.distill", "run_finetune")}


def _handler(module: str, function: str):  # noqa: ANN202
    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), function)(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="repsim",
        description="Representational similarity for language models (Procrustes, Gram-Frobenius, CKA, "
        "projection residual), layer by layer, and geometry-aware distillation.",
    )
    parser.add_argument("--version", action="version", version=f"repsim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, add in SUBCOMMANDS.items():
        add(sub)
        command = sub.choices[name]  # library messages name parameters; each command shows them as its flags
        command.set_defaults(func=_handler(*SUBCOMMAND_HANDLERS[name]), flags=command.all_flags())
    return parser



# Operating-system errors a user causes (and fixes) with a folder, a disk, a limit or a path: one line, exit 2.
USER_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                         errno.EFBIG, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.EEXIST,
                         errno.ENOTEMPTY, errno.EMFILE, errno.ENFILE, errno.EXDEV})
_HINTS = {errno.ENOSPC: "free some space or choose another folder",
          errno.EDQUOT: "free some space or choose another folder",
          errno.EFBIG: "the file size limit (ulimit -f) is below this file's size: raise it or choose another folder",
          errno.EROFS: "choose a writable folder", errno.EACCES: "choose a folder you may write to",
          errno.EPERM: "choose a folder you may write to"}


def _clip(path: str, keep: int = 80) -> str:
    """A path short enough for one line: its first and last ``keep`` characters around an ellipsis."""
    return path if len(path) <= 2 * keep + 1 else f"{path[:keep]}…{path[-keep:]}"


def os_error_line(exc: OSError) -> str:
    """One line for an operating-system error: the path(s), the cause, and what to do about it.

    Paths inside repsim's cache add that ``$REPSIM_CACHE`` moves it (and ``--no-cache`` avoids it)."""
    where = " -> ".join(_clip(str(f)) for f in (exc.filename, exc.filename2) if f is not None)
    cause = exc.strerror or str(exc)
    line = f"{where}: {cause}" if where else cause
    if exc.errno == errno.ENOENT:
        return f"file not found: {where}" if where else line
    hint = _HINTS.get(exc.errno)
    if exc.filename is not None and exc.errno in _HINTS:
        from repsim.activations.assets import cache_dir  # noqa: PLC0415 - only on this error path

        root = str(cache_dir())
        if str(exc.filename) == root or str(exc.filename).startswith(root.rstrip("/") + "/"):
            hint = f"{hint}; this is the repsim cache {root}: REPSIM_CACHE moves it, --no-cache bypasses it"
    return f"{line} ({hint})" if hint else line


_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def _warning_printer(fallback, flags: dict[str, str]):  # noqa: ANN001, ANN202
    """A ``warnings.showwarning``: warnings raised by repsim itself print as one ``repsim: warning: ...`` line on
    stderr, parameters shown as the command's ``flags``; others go to ``fallback`` (Python's usual format)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        try:
            ours = Path(filename).resolve().is_relative_to(_PACKAGE_DIR)
        except (OSError, ValueError):
            ours = False
        if ours:
            print(f"repsim: warning: {as_flags(str(message), flags)}", file=sys.stderr if file is None else file)
        else:
            fallback(message, category, filename, lineno, file, line)

    return show


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a one-line argument error (2): a status, not an exit
        return int(exc.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer(warnings.showwarning, args.flags)
            if getattr(args, "threads", None) is not None:
                from repsim.system.threads import set_threads  # noqa: PLC0415 - torch only after argument parsing

                set_threads(args.threads)
            result = args.func(args)
    except UserError as exc:
        print(f"repsim: error: {as_flags(str(exc), args.flags)}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in USER_ERRNOS:
            raise  # anything else is a bug: keep the traceback
        print(f"repsim: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except MemoryError as exc:
        detail = f" ({exc})" if str(exc) else ""
        print(f"repsim: error: out of memory{detail}; use fewer texts (--max-samples), layers or replicates",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("repsim: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # inside the try: a reader that went away shows up here at the latest
    except BrokenPipeError:
        # The reader of our output went away (`repsim cache info KEY --json | head`): stop quietly, like other
        # command-line tools killed by SIGPIPE. stdout goes to /dev/null so the interpreter's final flush is silent.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
