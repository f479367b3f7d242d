"""Teacher × student comparison, layer by layer: data → activations → all-pairs metrics → results → files.

`compare(teacher, student, data)` extracts (or reads from the cache) one pooled hidden-state matrix per layer
for each model, computes every metric for every (teacher layer, student layer) pair with
:func:`repsim.measures.allpairs.pairwise`, optionally adds bootstrap intervals and permutation p-values
(:mod:`repsim.analysis.stats`), and returns a :class:`Comparison`. Layer k is the output of block k; layer 0 is the
embedding output (the convention of :mod:`repsim.activations.extract`).

A :class:`Comparison` holds one long table (columns ``teacher_layer, student_layer, metric, value, ci_low,
ci_high, p_value``; ``metric`` is the canonical id with its convention, e.g. ``procrustes[distance]``) and
provenance (``meta``). ``save(dir)`` writes results.csv, heatmaps, a best-match plot and report.json as one
set (:mod:`repsim.system.outputs`): a reader, or a run killed midway, sees the previous set or the new one, never a mix.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import repsim
from repsim.activations import assets
from repsim.activations.data import TextData, check_seed, load_texts, sample_rows
from repsim.activations.extract import (
    check_same_tokenizer,
    extract,
    extract_moments,
    prepare_model,
    transformers_version,
)
from repsim.activations.layers import num_layers_of_config, parse_layers, resolve_layer_ids
from repsim.activations.pooling import check_pool
from repsim.activations.saved import load_saved_layers
from repsim.activations.words import WORD_RULE, check_streamable, paired_moments
from repsim.analysis import report, stats
from repsim.analysis.curve import convergence, curve_figure
from repsim.analysis.plot import heatmap, pivot, read_results, save_figures
from repsim.measures.allpairs import pairwise
from repsim.measures.functions import DEFAULT_METRICS, get_metric
from repsim.moved import moved_name
from repsim.system.errors import UserError, naming_path
from repsim.system.outputs import is_figure_file, is_output_file, replace_folder

COLUMNS = ["teacher_layer", "student_layer", "metric", "value", "chance", "chance_sd", "ci_low", "ci_high", "p_value"]
#: the defaults under --pool words: streamed from second moments, so the held-out residual (which needs the rows)
#: gives way to the in-sample one; n is the number of words (thousands), far above the student's width
WORD_DEFAULT_METRICS = ("procrustes[distance]", "gram_frobenius", "cka[linear,biased]",
                        "projection_residual[in_sample]")
MIN_TEXTS = 2
#: row permutations of the student whose mean is each cell's chance level (the first ones of --permutations)
DEFAULT_CHANCE_PERMUTATIONS = 4

Echo = Callable[[str], None]


def _spec(metric: str):
    return get_metric(metric)


def resolve_metrics(metrics: Sequence[str] | str | None) -> list[str]:
    """User metric names/aliases → canonical ids (unique, in order); None → the default four."""
    if metrics is None:
        metrics = DEFAULT_METRICS
    if isinstance(metrics, str):
        metrics = [metrics]
    ids = [_spec(m).id for m in metrics]
    if not ids:
        raise UserError("no metrics given")
    return list(dict.fromkeys(ids))


def in_sample_projection_warning(metric_ids: Sequence[str], n: int, student_widths: Sequence[int]) -> str | None:
    """A warning when an in-sample projection residual is read at n ≤ q (centred student reaches rank n−1 ⇒ 0)."""
    q = max(student_widths)
    if n > q:
        return None
    for m in metric_ids:
        spec = _spec(m)
        if spec.fits_in_sample:
            return (f"{m}: n = {n} texts ≤ student width {q}; the in-sample projection residual is ~0 for any "
                    f"student of rank n−1 (a blind spot, not similarity); use projection_residual[folds=5]")
    return None


#: the small-sample rule: plug-in estimators are read as biased when n < SMALL_N_FACTOR × r, r the largest pair's
#: rank min(p, q). Two unrelated isotropic layers of width r then already score Procrustes ρ ≈ 0.85·√(r/n) ≥ 0.27
#: and linear CKA ≈ r/n ≥ 0.1 (the mean singular value of a Gaussian r × r cross product, quarter-circle law)
SMALL_N_FACTOR = 10


def sample_size_warnings(metric_ids: Sequence[str], n: int, teacher_widths: Sequence[int],
                         student_widths: Sequence[int], *, bootstrap: int = 0,
                         stats_metrics: Sequence[str] = ()) -> list[str]:
    """One line per condition under which the numbers need care at this n, each saying what to do:

    - n < SMALL_N_FACTOR·r (r = min(max p, max q)) for a plug-in estimator (Procrustes, Gram-Frobenius, biased CKA):
      their bias dominates (unrelated isotropic layers score ρ ≈ 0.85·√(r/n), CKA ≈ r/n);
    - a k-fold held-out residual without a ridge whose training rows per fold n_tr = n − ⌈n/k⌉ are fewer than
      2(q + 1): the expected held-out error of a least-squares fit grows like n_tr/(n_tr − q − 1) (Gaussian
      design), more than doubled below 2(q + 1) rows and unbounded at q + 1;
    - bootstrap intervals of plug-in estimators under the small-n rule: they describe the estimator's spread at this
      n, not where the value would be on more texts; and of a k-fold residual: duplicated texts fall on both
      sides of a fold.
    """
    out = []
    specs = [_spec(m) for m in metric_ids]
    r = min(max(teacher_widths), max(student_widths))
    q = max(student_widths)
    plugin = [sp.id for sp in specs if sp.plugin_biased]
    small = n < SMALL_N_FACTOR * r
    if plugin and small:
        rho = 0.85 * math.sqrt(min(1.0, r / n))
        out.append(f"n = {n} texts < {SMALL_N_FACTOR} × {r} (the narrower width): {', '.join(plugin)} are dominated "
                   f"by small-sample bias (two unrelated {r}-wide isotropic layers score Procrustes ρ ≈ {rho:.2f}); "
                   "read each value against its chance level, use procrustes[distance,mom] or cka[linear,debiased], "
                   f"or use ≥ {SMALL_N_FACTOR * r} texts")
    for sp in specs:
        folds = sp.unregularised_folds
        if folds and n >= folds:
            n_tr = n - math.ceil(n / folds)
            if n_tr < 2 * (q + 1):
                out.append(f"{sp.id}: {n_tr} training texts per fold < 2 × (student width {q} + 1): the held-out "
                           "least-squares error grows like n_tr/(n_tr − q − 1), so values near or above 1 are "
                           f"overfitting, not dissimilarity; use ≥ {math.ceil(2 * (q + 1) * folds / (folds - 1))} "
                           f"texts or a ridge penalty, e.g. projection_residual[folds={folds},ridge=auto]")
    if bootstrap:
        biased = [m for m in stats_metrics if _spec(m).plugin_biased]
        if biased and small:
            out.append(f"bootstrap intervals of {', '.join(biased)} at n = {n}: they show the estimator's spread over "
                       "resampled texts at this n (recentred on the estimate), not where the value would lie on more "
                       "texts (the estimator's bias moves it further than the interval's width); compare cells of one "
                       "run, and their chance levels, not runs of different n")
        leaky = [m for m in stats_metrics if _spec(m).held_out_folds]
        if leaky:
            out.append(f"bootstrap intervals of {', '.join(leaky)} are optimistic: duplicated texts fall on both "
                       "sides of a fold; drop it from `stats_metrics` for a valid interval")
    return out


# ------------------------------------------------------------------------------------------------ Comparison


@dataclass
class Comparison:
    """Results of a layer-by-layer comparison.

    ``table``: long DataFrame, one row per (teacher layer, student layer, metric) with ``value``, the
    percentile-bootstrap interval ``ci_low``/``ci_high`` and the permutation ``p_value`` (NaN when not
    computed). ``meta``: provenance (models, revisions, data, pooling, versions, seeds, timings, warnings).
    """

    table: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)
    #: the convergence curve (:func:`repsim.analysis.curve.convergence`) when asked for, else None
    curve: pd.DataFrame | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_layers(cls, teacher_layers, student_layers, metrics: Sequence[str] | str | None = None, *,
                    teacher_layer_ids: Sequence[int] | None = None, student_layer_ids: Sequence[int] | None = None,
                    bootstrap: int = 0, permutations: int = 0, seed: int = 0, alpha: float = 0.05,
                    stats_metrics: Sequence[str] | None = None, device: str | None = None,
                    chance_permutations: int = DEFAULT_CHANCE_PERMUTATIONS, curve: bool = False,
                    curve_sizes: Sequence[int] | None = None, curve_subsamples: int = 5,
                    meta: dict[str, Any] | None = None, progress: bool = False) -> Comparison:
        """Compare already-extracted layer stacks: sequences of (n, width) arrays (or (L, n, width) arrays).

        Rows must be paired (row i of every layer comes from text i). ``bootstrap`` = B resamples of the
        rows for percentile intervals, ``permutations`` = P shuffles of the student's rows for p-values, both
        for the metrics in ``stats_metrics`` (default: all; the others get NaN intervals and p-values).

        ``chance_permutations`` = K: each cell's chance level, the mean of the metric over K seeded row permutations
        of the student (unpaired texts, each side's geometry kept), and ``chance_sd`` their standard deviation,
        for the same metrics as the statistics. The permutations are the first K of the permutation test's (one
        pass serves both: P ≥ K shuffles give the p-values, their first K the chance level). 0 disables it.

        ``curve``: also compute :attr:`curve`, every metric of the best-matching pairs (:meth:`curve_pairs`) on
        ``curve_subsamples`` seeded subsamples at each of ``curve_sizes`` texts
        (:func:`repsim.analysis.curve.convergence`).
        """
        ids = resolve_metrics(metrics)
        teacher, student = [_writable(x) for x in teacher_layers], [_writable(y) for y in student_layers]
        if not teacher or not student:
            raise UserError("need at least one teacher layer and one student layer")
        rows = {int(x.shape[0]) for x in teacher} | {int(y.shape[0]) for y in student}
        if len(rows) != 1:
            raise UserError(f"teacher and student must have the same number of rows (texts); got {sorted(rows)}")
        n = rows.pop()
        if n < MIN_TEXTS:
            raise UserError(f"need at least {MIN_TEXTS} texts to compare, got {n}")
        for name, ids_, layers in (("teacher", teacher_layer_ids, teacher), ("student", student_layer_ids, student)):
            if ids_ is not None and len(ids_) != len(layers):
                raise UserError(f"{len(ids_)} {name} layer ids for {len(layers)} {name} layers")
        t_ids = list(teacher_layer_ids) if teacher_layer_ids is not None else list(range(len(teacher)))
        s_ids = list(student_layer_ids) if student_layer_ids is not None else list(range(len(student)))
        check_replicates(bootstrap, permutations, chance_permutations)
        stat_ids = check_stats_metrics(stats_metrics, ids)

        meta = dict(meta or {})
        timings = meta.setdefault("timings", {})
        t0 = time.perf_counter()
        values = pairwise(teacher, student, metrics=ids, device=device)
        timings["metrics"] = time.perf_counter() - t0
        values = {k: np.asarray(v.detach().cpu() if hasattr(v, "detach") else v, dtype=np.float64)
                  for k, v in values.items()}

        lows = highs = pvals = chance = chance_sd = None
        if bootstrap:
            t0 = time.perf_counter()
            with _bar(progress, bootstrap, "bootstrap") as tick:
                intervals = stats.bootstrap(teacher, student, stat_ids, bootstrap, seed=seed, alpha=alpha,
                                            observed=values, device=device, progress=tick)
            lows = {k: v.low for k, v in intervals.items()}
            highs = {k: v.high for k, v in intervals.items()}
            timings["bootstrap"] = time.perf_counter() - t0
        shuffles = max(permutations, chance_permutations)
        if shuffles:
            t0 = time.perf_counter()
            with _bar(progress, shuffles, "permutations" if permutations else "chance levels") as tick:
                null = stats.permutation_replicates(teacher, student, stat_ids, shuffles, seed=seed + 1,
                                                    device=device, progress=tick)
            if permutations:
                pvals = {k: stats.permutation_pvalue(values[k], v[:permutations], _spec(k).direction)
                         for k, v in null.items()}
            if chance_permutations:
                chance, chance_sd = stats.chance_level(null, chance_permutations)
            timings["permutations" if permutations else "chance"] = time.perf_counter() - t0

        table = _long_table(ids, t_ids, s_ids, values, lows, highs, pvals, chance, chance_sd)
        meta.setdefault("n_texts", n)
        meta.setdefault("teacher_width", int(teacher[0].shape[1]))
        meta.setdefault("student_width", int(student[0].shape[1]))
        meta["metrics"] = ids
        meta["seed"] = seed
        meta["stats_metrics"] = stat_ids if (bootstrap or shuffles) else []
        meta["bootstrap"] = {"replicates": bootstrap, "interval": f"{100 * (1 - alpha):g}% percentile interval of the "
                             "replicates recentred on the estimate, clipped to the metric's range",
                             "seed": seed} if bootstrap else None
        meta["permutations"] = {"replicates": permutations, "side_shuffled": "student",
                                "seed": seed + 1} if permutations else None
        meta["chance"] = {"permutations": chance_permutations, "side_shuffled": "student", "seed": seed + 1,
                          "metrics": stat_ids,
                          "definition": "chance = mean of the metric over the first K seeded row permutations of the "
                                        "student (texts unpaired, each side's geometry kept; the same shuffles as "
                                        "the permutation test's first K), chance_sd = their standard deviation",
                          } if chance_permutations else None
        warnings = meta.setdefault("warnings", [])
        widths_t, widths_s = [int(x.shape[1]) for x in teacher], [int(y.shape[1]) for y in student]
        for w in [in_sample_projection_warning(ids, n, widths_s)] + sample_size_warnings(
                ids, n, widths_t, widths_s, bootstrap=bootstrap, stats_metrics=stat_ids):
            if w and w not in warnings:
                warnings.append(w)
        comp = cls(table=table, meta=meta)
        if curve:
            t0 = time.perf_counter()
            comp.curve = convergence(teacher, student, ids, comp.curve_pairs(), teacher_layer_ids=t_ids,
                                     student_layer_ids=s_ids, sizes=curve_sizes, subsamples=curve_subsamples,
                                     seed=seed, device=device)
            timings["curve"] = time.perf_counter() - t0
            meta["curve"] = {"pairs": comp.curve_pairs(), "sizes": sorted(set(comp.curve["n"])),
                             "subsamples": curve_subsamples, "seed": seed}
        if chance_permutations:
            meta["chance"]["best_matches"] = {
                m: [{k: (int(r[k]) if k.endswith("layer") else float(r[k]))
                     for k in ("teacher_layer", "student_layer", "value", "chance", "chance_sd")}
                    for _, r in comp.best_matches(m).iterrows()] for m in stat_ids}
        return comp

    @classmethod
    def from_moments(cls, moments: Any, metrics: Sequence[str] | str | None = None, *,
                     teacher_layer_ids: Sequence[int] | None = None, student_layer_ids: Sequence[int] | None = None,
                     meta: dict[str, Any] | None = None) -> Comparison:
        """Compare from streamed :class:`repsim.measures.moments.LayerMoments` (every teacher × student layer pair).

        Only measures computable from second moments are available (no intervals or p-values: those resample
        rows). Used for word-level comparison, whose rows are never all in memory."""
        ids = resolve_metrics(metrics)
        check_streamable(ids)
        if moments.n < MIN_TEXTS:
            raise UserError(f"need at least {MIN_TEXTS} rows to compare, got {moments.n}")
        lt, ls = moments.n_teacher_layers, moments.n_student_layers
        t_ids = list(teacher_layer_ids) if teacher_layer_ids is not None else list(range(lt))
        s_ids = list(student_layer_ids) if student_layer_ids is not None else list(range(ls))
        if len(t_ids) != lt or len(s_ids) != ls:
            raise UserError(f"layer ids ({len(t_ids)}, {len(s_ids)}) do not match the moments' layers ({lt}, {ls})")
        meta = dict(meta or {})
        t0 = time.perf_counter()
        values = {m: moments.matrix(m) for m in ids}
        meta.setdefault("timings", {})["metrics"] = time.perf_counter() - t0
        meta.setdefault("n_texts", int(moments.n))
        meta["n_rows"] = int(moments.n)
        meta.setdefault("teacher_width", int(moments.teacher_widths[0]))
        meta.setdefault("student_width", int(moments.student_widths[0]))
        meta.update(metrics=ids, stats_metrics=[], bootstrap=None, permutations=None)
        meta.setdefault("seed", 0)
        warnings = meta.setdefault("warnings", [])
        w = in_sample_projection_warning(ids, int(moments.n), moments.student_widths)
        if w and w not in warnings:
            warnings.append(w)
        return cls(table=_long_table(ids, t_ids, s_ids, values), meta=meta)

    @classmethod
    def from_csv(cls, path: str | Path) -> Comparison:
        """A Comparison from a results.csv (and the report.json beside it, when present)."""
        table = read_results(path)
        for c in COLUMNS:
            if c not in table.columns:
                table[c] = np.nan
        report = Path(path).with_name("report.json")
        meta = json.loads(report.read_text()) if report.is_file() else {}
        return cls(table=table[COLUMNS], meta=meta)

    # ------------------------------------------------------------------ views

    @property
    def metrics(self) -> list[str]:
        return list(dict.fromkeys(self.table["metric"]))

    @property
    def teacher_layers(self) -> list[int]:
        return sorted(set(int(x) for x in self.table["teacher_layer"]))

    @property
    def student_layers(self) -> list[int]:
        return sorted(set(int(x) for x in self.table["student_layer"]))

    def _metric_id(self, metric: str) -> str:
        mid = _spec(metric).id
        if mid not in self.metrics:
            raise UserError(f"metric {mid!r} was not computed in this comparison (have: {', '.join(self.metrics)})")
        return mid

    def matrix(self, metric: str, column: str = "value") -> np.ndarray:
        """(L_t, L_s) array of one metric: rows = teacher layers, columns = student layers (sorted)."""
        return pivot(self.table, self._metric_id(metric), column).to_numpy(dtype=float)

    def best_matches(self, metric: str) -> pd.DataFrame:
        """For each teacher layer, the most similar student layer under ``metric`` and its row of the table."""
        mid = self._metric_id(metric)
        spec = _spec(mid)
        sub = self.table[self.table["metric"] == mid]
        key = sub.groupby("teacher_layer")["value"]
        pick = key.idxmin() if spec.direction == "lower" else key.idxmax()
        return sub.loc[pick.to_numpy()].reset_index(drop=True)

    def curve_pairs(self) -> list[tuple[int, int]]:
        """The layer pairs a convergence curve follows: the overall most similar pair under each metric, then the
        last teacher layer with the last student layer (duplicates dropped, in that order)."""
        pairs = []
        for m in self.metrics:
            b = self.best_matches(m)
            k = b["value"].idxmin() if _spec(m).direction == "lower" else b["value"].idxmax()
            pairs.append((int(b.loc[k, "teacher_layer"]), int(b.loc[k, "student_layer"])))
        pairs.append((self.teacher_layers[-1], self.student_layers[-1]))
        return list(dict.fromkeys(pairs))

    def suggest_map(self, metric: str) -> list[tuple[int, int]]:
        """The monotone teacher → student layer map maximising total similarity under ``metric``.

        Chooses one student layer s(t) per teacher layer t with s non-decreasing in t, maximising
        Σ_t sim(t, s(t)) where sim = value for "higher" metrics and −value for "lower" ones (dynamic
        programming, O(L_t · L_s)). Returns [(teacher_layer, student_layer), ...] in teacher order.
        """
        mid = self._metric_id(metric)
        spec = _spec(mid)
        sim = self.matrix(mid)
        if spec.direction == "lower":
            sim = -sim
        path = monotone_map(sim)
        t_ids, s_ids = self.teacher_layers, self.student_layers
        return [(t_ids[i], s_ids[j]) for i, j in enumerate(path)]

    # ------------------------------------------------------------------ output

    def plot(self, metric: str):
        """The heatmap of one metric as a matplotlib Figure (``fig.savefig(...)`` to write it)."""
        return heatmap(self.table, self._metric_id(metric), **self.figure_labels())

    def figure_labels(self) -> dict[str, Any]:
        """Model names (short form) and the number of texts for figure axes and titles; None where ``meta``
        does not know them (a results.csv without its report.json)."""
        names = {}
        for side in ("teacher", "student"):
            name = (self.meta.get(side) or {}).get("name")
            names[f"{side}_name"] = _short(name) if name else None
        n = (self.meta.get("data") or {}).get("n_texts", self.meta.get("n_texts"))
        return dict(names, n_texts=int(n) if n else None)

    def summary(self) -> str:
        """The terminal report: per teacher layer, the best student layer and value under each metric."""
        return format_summary(self)

    def save_curve(self, folder: str | Path) -> list[Path]:
        """Write curve.csv and curve.png/.svg of :attr:`curve` into ``folder``; return the paths."""

        folder = Path(folder)
        self.curve.to_csv(folder / "curve.csv", index=False, float_format="%.10g")
        fig = curve_figure(self.curve, title=_curve_title(self.meta))
        paths = [folder / "curve.csv"]
        with matplotlib.rc_context({"svg.fonttype": "none"}):
            for fmt in ("png", "svg"):
                fig.savefig(folder / f"curve.{fmt}", format=fmt)
                paths.append(folder / f"curve.{fmt}")
        return paths

    def save(self, out: str | Path) -> Path:
        """Write results.csv, heatmap_<metric>.png/.svg, best_match.png/.svg, report.json and report.html (one
        self-contained page, :mod:`repsim.analysis.report`) into ``out``.

        The set is replaced as a whole (:func:`repsim.system.outputs.replace_folder`): ``out`` shows either the previous
        run's set or this one, never a mix, also when the process is killed; a failure leaves it untouched.
        Other files in ``out`` are kept; files of a previous set that this one does not write (the heatmap of a
        metric not computed now) go.
        """
        out = check_out_dir(out)

        def fill(tmp: Path) -> None:
            t0 = time.perf_counter()
            self.table.to_csv(tmp / "results.csv", index=False, float_format="%.10g")
            save_figures(self.table, tmp, **self.figure_labels())
            if self.curve is not None:
                self.save_curve(tmp)
            self.meta.setdefault("timings", {})["plots"] = time.perf_counter() - t0
            (tmp / "report.json").write_text(json.dumps(_jsonable(self.meta), indent=2) + "\n")
            write_report(self, tmp / "report.html")

        with naming_path(out):
            return replace_folder(out, fill, is_output_file)


MAX_REPLICATES = 100_000


def min_rows(metric: str) -> int:
    """The fewest paired rows ``metric`` is defined on, its family's rule (repsim.measures.registry.Family.min_rows):
    k-fold residuals need every fold non-empty and at least 2 training rows (n ≥ k and n − ⌈n/k⌉ ≥ 2), debiased
    CKA needs 4 (Song et al.'s U-statistic), the rest 2."""
    sp = _spec(metric)
    return max(MIN_TEXTS, sp.family_object.min_rows(**sp.kwargs))


def check_rows(ids: Sequence[str], n: int, *, defaults: bool = False) -> None:
    """Refuse, before any model runs, metrics that ``n`` texts cannot support (one line naming the metric, the
    count it needs and the ways out)."""
    for metric in ids:
        need = min_rows(metric)
        if n < need:
            origin = " (a default metric)" if defaults else ""
            raise UserError(f"{metric}{origin} needs at least {need} texts, the data has {n}: give more texts, or "
                            f"choose other `metrics` (e.g. procrustes and cka)")


def check_replicates(bootstrap: int, permutations: int, chance_permutations: int = 0) -> None:
    for flag, val in (("`bootstrap`", bootstrap), ("`permutations`", permutations),
                      ("`chance_permutations`", chance_permutations)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or not 0 <= val <= MAX_REPLICATES:
            raise UserError(f"{flag} must be an integer in 0..{MAX_REPLICATES}, got {val}")


def _curve_title(meta: dict[str, Any]) -> str:
    names = [_short(meta.get(side, {}).get("name", side)) for side in ("teacher", "student")]
    return f"{names[0]} vs {names[1]}: each measure against the number of texts"


def _long_table(ids: Sequence[str], t_ids: Sequence[int], s_ids: Sequence[int], values: dict[str, np.ndarray],
                lows: dict | None = None, highs: dict | None = None, pvals: dict | None = None,
                chance: dict | None = None, chance_sd: dict | None = None) -> pd.DataFrame:
    """The long results table (``COLUMNS``) from (Lt, Ls) matrices per metric; NaN where not computed."""
    ti, si = np.meshgrid(np.arange(len(t_ids)), np.arange(len(s_ids)), indexing="ij")
    frames = []
    for m in ids:
        nan = np.full(ti.size, np.nan)
        frames.append(pd.DataFrame({
            "teacher_layer": np.asarray(t_ids)[ti.ravel()],
            "student_layer": np.asarray(s_ids)[si.ravel()],
            "metric": m,
            "value": np.asarray(values[m], dtype=np.float64).ravel(),
            "chance": chance[m].ravel() if chance and m in chance else nan,
            "chance_sd": chance_sd[m].ravel() if chance_sd and m in chance_sd else nan,
            "ci_low": lows[m].ravel() if lows and m in lows else nan,
            "ci_high": highs[m].ravel() if highs and m in highs else nan,
            "p_value": pvals[m].ravel() if pvals and m in pvals else nan,
        }))
    return pd.concat(frames, ignore_index=True)[COLUMNS]


def check_stats_metrics(stats_metrics: Sequence[str] | None, ids: Sequence[str]) -> list[str]:
    """Canonical ids of the metrics that get intervals/p-values; each must be among the computed ``ids``.

    Default (None): every compared metric except the k-fold held-out projection residual, unless it is the only
    one. A bootstrap replicate duplicates texts, and copies of one text land in both the fit and the held-out
    fold, so that residual's replicates are optimistic (the interval is not a valid one); it is also the
    costliest metric per replicate. Name it in ``stats_metrics`` to get its intervals and p-values anyway."""
    if stats_metrics is None:
        specs = [_spec(m) for m in ids]
        valid = [sp.id for sp in specs if sp.held_out_folds is None]
        return valid or list(ids)
    chosen = list(dict.fromkeys(_spec(m).id for m in stats_metrics))
    missing = [m for m in chosen if m not in ids]
    if missing:
        raise UserError(f"`stats_metrics` {', '.join(missing)}: not among the compared metrics ({', '.join(ids)})")
    return chosen


def monotone_map(sim: np.ndarray) -> list[int]:
    """argmax over non-decreasing column choices j_0 ≤ j_1 ≤ … of Σ_i sim[i, j_i] (ties → smaller j)."""
    sim = np.asarray(sim, dtype=float)
    if sim.ndim != 2 or sim.size == 0:
        raise UserError("need a non-empty (teacher × student) matrix")
    rows, cols = sim.shape
    best = np.empty_like(sim)  # best[i, j]: best total for rows 0..i with row i at column j
    arg = np.zeros((rows, cols), dtype=int)  # the column of row i−1 that achieves it
    best[0] = sim[0]
    for i in range(1, rows):
        run_arg = 0
        for j in range(cols):
            if best[i - 1, j] > best[i - 1, run_arg]:
                run_arg = j
            best[i, j] = sim[i, j] + best[i - 1, run_arg]
            arg[i, j] = run_arg
    path = [int(np.argmax(best[-1]))]
    for i in range(rows - 1, 0, -1):
        path.append(int(arg[i, path[-1]]))
    return path[::-1]


def check_out_dir(out: str | Path) -> Path:
    """An output folder path that is usable, checked before any work: not an existing file, and the folder (or
    its nearest existing parent) really takes a new file (a probe file is created and removed: permission bits
    alone say nothing on a read-only mount or to root)."""
    if not str(out).strip():
        raise UserError("empty output folder name")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output folder {out} exists and is not a folder")
    parent = out if out.exists() else out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot create output folder {out}: {parent} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".repsim-probe-"):
            pass
    except OSError as exc:
        raise UserError(f"cannot write output folder {out}: {exc.strerror or exc} in {parent}") from None
    return out


def _writable(x: Any) -> Any:
    """Memory-mapped (read-only) arrays from the store are copied once; torch cannot wrap read-only memory."""
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        return np.array(x)
    return x


def _short(name: str) -> str:
    return str(name).rstrip("/").split("/")[-1]


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


class _bar:
    """A tqdm progress bar as a context manager yielding ``tick(k)``; a no-op when disabled."""

    def __init__(self, enabled: bool, total: int, desc: str):
        self.enabled, self.total, self.desc, self.pbar = enabled, total, desc, None

    def __enter__(self):
        if not self.enabled:
            return None
        self.pbar = tqdm(total=self.total, desc=self.desc, file=sys.stderr, leave=False)
        return self.pbar.update

    def __exit__(self, *exc):
        if self.pbar is not None:
            self.pbar.close()
        return False


# ------------------------------------------------------------------------------------------------ terminal


def _fmt(v: float) -> str:
    return "nan" if not np.isfinite(v) else f"{v:.3f}"


def _chance_txt(row) -> str:
    c = row.get("chance", np.nan)
    return f", chance {_fmt(c)}" if np.isfinite(c) else ""


def format_summary(comp: Comparison, warnings: bool = True) -> str:
    """Per teacher layer: best student layer and value under each metric; then the overall best pair per metric."""
    metrics = comp.metrics
    best = {m: comp.best_matches(m).set_index("teacher_layer") for m in metrics}
    head = ["teacher"] + [f"{m} ({'↓' if _spec(m).direction == 'lower' else '↑'})" for m in metrics]
    rows = []
    for t in comp.teacher_layers:
        cells = [str(t)]
        for m in metrics:
            r = best[m].loc[t]
            cell = f"s{int(r['student_layer'])} {_fmt(r['value'])}"
            if np.isfinite(r.get("chance", np.nan)):
                cell += f" ({_fmt(r['chance'])})"
            if np.isfinite(r["ci_low"]):
                cell += f" [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"
            if np.isfinite(r["p_value"]):
                cell += f" p={r['p_value']:.3g}"
            cells.append(cell)
        rows.append(cells)
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]
    shuffles = (comp.meta.get("chance") or {}).get("permutations")
    chance_note = (f"; (x) = chance level, the mean over {shuffles} shuffled pairings of the texts" if shuffles and
                   "chance" in comp.table and comp.table["chance"].notna().any() else "")
    lines = [f"best student layer per teacher layer (↓ lower / ↑ higher = more similar{chance_note}):",
             "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.append("")
    lines.append("overall:")
    for m in metrics:
        b = best[m]
        spec = _spec(m)
        k = b["value"].idxmin() if spec.direction == "lower" else b["value"].idxmax()
        last_t, last_s = comp.teacher_layers[-1], comp.student_layers[-1]
        sub = comp.table[(comp.table["metric"] == m) & (comp.table["teacher_layer"] == last_t)
                         & (comp.table["student_layer"] == last_s)]
        lines.append(f"  {m}: most similar pair teacher {k} ↔ student {int(b.loc[k, 'student_layer'])} "
                     f"({_fmt(b.loc[k, 'value'])}{_chance_txt(b.loc[k])}); last ↔ last ({last_t} ↔ {last_s}) "
                     f"{_fmt(sub['value'].iloc[0])}{_chance_txt(sub.iloc[0])}")
    for w in comp.meta.get("warnings", []) if warnings else ():
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def metric_id(metric: str) -> str:
    """The canonical id of a metric name or alias (``procrustes`` -> ``procrustes[distance]``)."""
    return _spec(metric).id


def format_map(comp: Comparison, metric: str) -> str:
    mapping = comp.suggest_map(metric)
    pairs = ", ".join(f"{t}→{s}" for t, s in mapping)
    return f"suggested monotone layer map under {_spec(metric).id} (teacher→student): {pairs}"


# ------------------------------------------------------------------------------------------------ compare


def _model_shape(spec: str) -> dict[str, Any]:
    """Width and number of hidden-state layers (embeddings + blocks) from the model's config, when readable."""
    resolve = getattr(assets, "resolve_model", None)
    if resolve is not None:
        src = resolve(spec)
        info: dict[str, Any] = {"name": getattr(src, "name", spec), "revision": getattr(src, "revision", None),
                                "path": str(getattr(src, "path", ""))}
    else:
        if not Path(spec).is_dir():
            raise UserError(f"model {spec!r} is not a local folder")
        info = {"name": str(spec), "revision": None, "path": str(spec)}
    info["width"], info["n_layers"] = _config_shape(Path(info["path"]))
    return info


def _config_shape(path: Path) -> tuple[int | None, int | None]:
    """(hidden width, hidden-state layers = blocks + 1) from a model folder's config; the block count is the
    extraction's own (:func:`repsim.activations.layers.num_layers_of_config`).

    Read from config.json when it names them in the common spellings (a warm run then never imports
    transformers); otherwise through ``transformers.AutoConfig``, which knows every model's attribute names."""
    try:
        raw = json.loads((path / "config.json").read_text())
        raw = raw.get("text_config") or raw
        width = next((raw[k] for k in ("hidden_size", "n_embd", "d_model") if isinstance(raw.get(k), int)), None)
        blocks = num_layers_of_config(SimpleNamespace(**raw))
        if width and blocks is not None:
            return int(width), blocks + 1
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    try:
        from transformers import AutoConfig  # noqa: PLC0415 - transformers only when a model is loaded

        cfg = AutoConfig.from_pretrained(str(path))
        blocks = num_layers_of_config(cfg)
        cfg = getattr(cfg, "text_config", None) or cfg
        width = int(getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 0))) or None
        return width, blocks + 1 if blocks is not None else None
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def _compute_device(device: str) -> str:
    """The device the metrics run on: cpu or cuda (they compute in float64, which MPS lacks)."""
    from repsim.system.devices import resolve_device  # noqa: PLC0415 - torch loads only when something is computed

    return str(resolve_device(device, kinds=("cpu", "cuda")))


def compare(teacher: str | None = None, student: str | None = None, data: Any = "sst2", *,
            metrics: Sequence[str] | str | None = None, pool: str = "mean",
            layers: Sequence[str] | None = None, teacher_layers: Sequence[int] | None = None,
            student_layers: Sequence[int] | None = None, text_column: str | None = None,
            label_column: str | None = None, max_samples: int | None = None, batch_size: int = 32,
            max_length: int = 128, device: str = "auto", bootstrap: int = 0, permutations: int = 0,
            chance_permutations: int = DEFAULT_CHANCE_PERMUTATIONS, curve: bool = False,
            curve_sizes: Sequence[int] | None = None, curve_subsamples: int = 5,
            stats_metrics: Sequence[str] | None = None, seed: int = 0, cache: bool = True,
            out: str | Path | None = None, progress: bool = False, echo: Echo | None = None) -> Comparison:
    """Compare a teacher and a student layer by layer on ``data``; see the module docstring.

    ``teacher``/``student``: model specs for :func:`repsim.activations.assets.load_model` (None → the embedded default
    all-mpnet-base-v2 teacher and all-MiniLM-L6-v2 student). ``data``: ``"sst2"``, a local file, ``hf:NAME``
    or a :class:`repsim.activations.data.TextData`. ``layers``: CLI-style tokens (see :func:`parse_layers`);
    ``teacher_layers``/``student_layers`` override per side. ``echo``: a callable that receives the
    terminal header lines (the CLI passes ``print``). ``out``: when given, :meth:`Comparison.save` into it.
    """
    say: Echo = echo or (lambda _line: None)
    check_pool(pool)
    words = pool == "words"
    if words:  # streamed from moments: no rows in memory, so no resampling (chance levels are row permutations)
        chance_permutations = 0
    ids = _check_options(WORD_DEFAULT_METRICS if words and metrics is None else metrics, stats_metrics, max_samples,
                         bootstrap, permutations, out, chance_permutations, seed)
    _check_curve(curve_sizes, curve_subsamples)
    if words:
        check_streamable(ids)
        if bootstrap or permutations or curve:
            raise UserError("`pool='words'` computes its measures from streamed moments; `bootstrap`, "
                            "`permutations` and `curve` resample rows (and words of one text are not independent): "
                            "use them with a pooled `pool='mean'` run")
    if batch_size < 1 or max_length < 1:
        raise UserError("`batch_size` and `max_length` must be positive")
    device = _compute_device(device)
    teacher = teacher or assets.DEFAULT_TEACHER
    student = student or assets.DEFAULT_STUDENT
    t_req, s_req = parse_layers(layers)
    t_req = list(teacher_layers) if teacher_layers is not None else t_req
    s_req = list(student_layers) if student_layers is not None else s_req

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    texts = data if isinstance(data, TextData) else load_texts(
        data, text_column=text_column, label_column=label_column, max_samples=max_samples, seed=seed, labels=False)
    if len(texts.texts) < MIN_TEXTS:
        raise UserError(f"data {texts.name!r} has {len(texts.texts)} text(s); a comparison needs at least {MIN_TEXTS}")
    if pool != "tokens":  # one row per text (token rows are only known after tokenising)
        check_rows(ids, len(texts.texts), defaults=metrics is None)
    t_info, s_info = _model_shape(teacher), _model_shape(student)
    t_ids = resolve_layer_ids(t_req, t_info["n_layers"], "teacher") if t_info["n_layers"] else t_req
    s_ids = resolve_layer_ids(s_req, s_info["n_layers"], "student") if s_info["n_layers"] else s_req
    timings["load"] = time.perf_counter() - t0

    def _layers_txt(info, ids_):
        if ids_ is not None:
            return ",".join(map(str, ids_))
        return f"0..{info['n_layers'] - 1}" if info["n_layers"] else "all"

    fallback = " (offline SST-like fallback)" if getattr(texts, "offline_fallback", False) else ""
    say(f"teacher  {t_info['name']}  width {t_info['width']}  layers {_layers_txt(t_info, t_ids)}")
    say(f"student  {s_info['name']}  width {s_info['width']}  layers {_layers_txt(s_info, s_ids)}")
    say(f"data     {texts.name}: {len(texts.texts)} texts{fallback} — {texts.source}")
    say(f"pooling  {pool}   max length {max_length}   device {device}   metrics {', '.join(ids)}")

    if pool == "tokens":  # before any extraction: token rows pair only under one tokenizer
        check_same_tokenizer(prepare_model(teacher).tokenizer, prepare_model(student).tokenizer)
    t0 = time.perf_counter()
    opts = dict(pool=pool, batch_size=batch_size, max_length=max_length, device=device, cache=cache,
                progress=progress)
    if pool == "words" and not cache:
        return _compare_words_streaming(teacher, student, texts, data, ids, t_ids, s_ids, t_info, s_info,
                                        opts, timings, seed, out, say)
    t_act = extract(teacher, texts, layers=t_ids, **opts)
    s_act = extract(student, texts, layers=s_ids, **opts)
    timings["extract"] = time.perf_counter() - t0
    if t_act.n != s_act.n:
        raise UserError(f"teacher gives {t_act.n} rows and student {s_act.n} for the same data; with "
                        f"`pool='tokens'` both models need the same tokenizer (use `pool='words'`)")

    meta: dict[str, Any] = {
        "teacher": {**t_info, "width": t_act.width, "layers": list(t_act.layers),
                    "revision": t_act.meta.get("revision", t_info.get("revision")),
                    "built_with": t_act.meta.get("built_with"), "activations": t_act.meta},
        "student": {**s_info, "width": s_act.width, "layers": list(s_act.layers),
                    "revision": s_act.meta.get("revision", s_info.get("revision")),
                    "built_with": s_act.meta.get("built_with"), "activations": s_act.meta},
        "data": {"spec": str(data) if not isinstance(data, TextData) else texts.name, "name": texts.name,
                 "source": texts.source, "offline_fallback": bool(getattr(texts, "offline_fallback", False)),
                 "fingerprint": texts.fingerprint, "n_texts": len(texts.texts),
                 "n_dropped": getattr(texts, "n_dropped", 0), "max_samples": max_samples},
        "pooling": pool, "max_length": max_length, "batch_size": batch_size, "device": device,
        "cache": cache, "versions": _versions(), "timings": timings,
        "warnings": [w for w in (_built_otherwise("teacher", t_act.meta, batch_size, device),
                                 _built_otherwise("student", s_act.meta, batch_size, device)) if w],
    }
    if words:
        t0 = time.perf_counter()
        moments, counts = paired_moments(t_act, s_act, device=device)
        timings["moments"] = time.perf_counter() - t0
        meta["words"] = _word_meta(counts)
        say(_word_line(counts))
        comp = Comparison.from_moments(moments, ids, teacher_layer_ids=list(t_act.layers),
                                       student_layer_ids=list(s_act.layers),
                                       meta=dict(meta, seed=seed, n_texts=len(texts.texts)))
    else:
        comp = Comparison.from_layers([t_act[k] for k in t_act.layers], [s_act[k] for k in s_act.layers], ids,
                                      teacher_layer_ids=list(t_act.layers), student_layer_ids=list(s_act.layers),
                                      bootstrap=bootstrap, permutations=permutations, seed=seed,
                                      chance_permutations=chance_permutations, stats_metrics=stats_metrics,
                                      curve=curve, curve_sizes=curve_sizes, curve_subsamples=curve_subsamples,
                                      device=device, meta=meta, progress=progress)
    if out is not None:
        comp.save(out)
    return comp


def _check_options(metrics: Sequence[str] | str | None, stats_metrics: Sequence[str] | None,
                   max_samples: int | None, bootstrap: int, permutations: int, out: str | Path | None,
                   chance_permutations: int = 0, seed: int = 0) -> list[str]:
    """The options every comparison shares, checked before any work; returns the canonical metric ids."""
    ids = resolve_metrics(metrics)
    check_stats_metrics(stats_metrics, ids)
    if max_samples is not None and max_samples < MIN_TEXTS:
        raise UserError(f"`max_samples` must be at least {MIN_TEXTS} (a comparison needs several texts), "
                        f"got {max_samples}")
    check_replicates(bootstrap, permutations, chance_permutations)
    check_seed(seed)
    if out is not None:
        check_out_dir(out)
    return ids


def _check_curve(sizes: Sequence[int] | None, subsamples: int) -> None:
    """``curve_sizes`` and ``curve_subsamples``, checked before any work (sizes against n once it is known)."""
    if subsamples < 1:
        raise UserError(f"`curve_subsamples` must be ≥ 1, got {subsamples}")
    if sizes is not None and (not sizes or min(sizes) < 4):
        raise UserError(f"`curve_sizes` must be numbers of texts ≥ 4, got {list(sizes)}")


def compare_saved(teacher: str | Path, student: str | Path, *, metrics: Sequence[str] | str | None = None,
                  layers: Sequence[str] | None = None, max_samples: int | None = None, device: str = "auto",
                  bootstrap: int = 0, permutations: int = 0, stats_metrics: Sequence[str] | None = None,
                  seed: int = 0, out: str | Path | None = None, progress: bool = False,
                  echo: Echo | None = None, chance_permutations: int = DEFAULT_CHANCE_PERMUTATIONS,
                  curve: bool = False, curve_sizes: Sequence[int] | None = None,
                  curve_subsamples: int = 5) -> Comparison:
    """Compare activations saved as files (``.npy`` / ``.safetensors`` per layer, a folder of them, or a
    (layers, n, width) stack; see :mod:`repsim.activations.saved`): row i of every layer on both sides must come
    from text i.

    ``layers``: the same tokens as :func:`compare` (layer numbers as read from the file names; negatives count
    from the end). ``max_samples``: the same seeded subset of rows that ``compare --max-samples`` takes of the
    texts. ``meta`` records each array's file, tensor, shape, dtype and sha256.
    """
    say: Echo = echo or (lambda _line: None)
    ids = _check_options(metrics, stats_metrics, max_samples, bootstrap, permutations, out, chance_permutations,
                         seed)
    _check_curve(curve_sizes, curve_subsamples)
    device = _compute_device(device)
    t_req, s_req = parse_layers(layers)
    t0 = time.perf_counter()
    sides = {}
    for side, path, req in (("teacher", teacher, t_req), ("student", student, s_req)):
        sides[side] = load_saved_layers(path, side).select(req, side)
    t_acts, s_acts = sides["teacher"], sides["student"]
    if t_acts.n != s_acts.n:
        raise UserError(f"the teacher activations have {t_acts.n} rows and the student's {s_acts.n}; row i of both "
                        "must come from the same text i")
    n_all = t_acts.n
    if max_samples is not None and max_samples < n_all:
        rows = sample_rows(n_all, max_samples, seed)
        t_acts, s_acts = t_acts.take_rows(rows), s_acts.take_rows(rows)
    timings = {"load": time.perf_counter() - t0}
    for side, acts in sides.items():
        widths = sorted({int(a.shape[1]) for a in acts.arrays})
        say(f"{side:<8} {Path(str(acts.provenance['path']))}  width {','.join(map(str, widths))}  layers "
            f"{','.join(map(str, acts.ids))}")
    say(f"rows     {t_acts.n} of {n_all} (saved activations: row i = text i on both sides)   device {device}   "
        f"metrics {', '.join(ids)}")
    meta: dict[str, Any] = {
        side: {"name": Path(str(acts.provenance["path"])).name or str(acts.provenance["path"]),
               "layers": list(acts.ids), "layer_names": list(acts.names),
               "width": int(acts.arrays[0].shape[1]), "activations": acts.provenance}
        for side, acts in (("teacher", t_acts), ("student", s_acts))}
    meta.update({
        "data": {"spec": None, "source": "saved activations (rows as given)", "n_texts": t_acts.n,
                 "n_rows_saved": n_all, "max_samples": max_samples},
        "device": device, "versions": _versions(), "timings": timings, "warnings": []})
    comp = Comparison.from_layers(t_acts.arrays, s_acts.arrays, ids, teacher_layer_ids=t_acts.ids,
                                  student_layer_ids=s_acts.ids, bootstrap=bootstrap, permutations=permutations,
                                  chance_permutations=chance_permutations, seed=seed, stats_metrics=stats_metrics,
                                  curve=curve, curve_sizes=curve_sizes, curve_subsamples=curve_subsamples,
                                  device=device, meta=meta, progress=progress)
    if out is not None:
        with naming_path(out):
            comp.save(out)
    return comp


def _built_otherwise(side: str, act_meta: dict, batch_size: int, device: str) -> str | None:
    """A note when cached activations were built with another batch size or device than this run asks: values
    then match a fresh build only to float32 rounding, not bitwise (the cache key leaves both out)."""
    built = act_meta.get("built_with") or {}
    if not act_meta.get("cache_hit") or not built:
        return None
    asked = {"batch size": int(batch_size), "device": str(device)}
    had = {"batch size": built.get("batch_size"), "device": str(built.get("device", "")).split(":")[0]}
    differ = [k for k in asked if had[k] is not None and str(had[k]) != str(asked[k]).split(":")[0]]
    if not differ:
        return None
    return (f"{side} activations come from the cache, built with {', '.join(f'{k} {had[k]}' for k in differ)} "
            f"(this run: {', '.join(f'{k} {asked[k]}' for k in differ)}); they equal a fresh build to float32 "
            "rounding, not bitwise")


def _word_meta(counts: dict[str, int]) -> dict[str, Any]:
    return {"rule": WORD_RULE, **counts, "streamed": True}


def _word_line(counts: dict[str, int]) -> str:
    return (f"words    {counts['n_words']} words, {counts['n_used']} kept by both models; dropped "
            f"{counts['dropped']} (truncated or without a token: teacher {counts['dropped_teacher']}, "
            f"student {counts['dropped_student']})")


def _compare_words_streaming(teacher, student, texts, data, ids, t_ids, s_ids, t_info, s_info, opts, timings,
                             seed, out, say) -> Comparison:
    """``pool="words"`` without the cache: both models run batch by batch and only the moments are kept."""
    t0 = time.perf_counter()
    moments = extract_moments(teacher, student, texts, layers=t_ids if t_ids is not None else "all",
                              student_layers=s_ids if s_ids is not None else "all", pool="words",
                              batch_size=opts["batch_size"], max_length=opts["max_length"], device=opts["device"],
                              progress=opts["progress"])
    timings["extract"] = time.perf_counter() - t0
    mm = moments.meta
    counts = {"n_words": mm["n_words_this_rank"], "n_used": mm["n_words_used_this_rank"],
              "dropped": mm["n_words_this_rank"] - mm["n_words_used_this_rank"]}
    say(f"words    {counts['n_words']} words, {counts['n_used']} kept by both models; dropped {counts['dropped']}")
    meta: dict[str, Any] = {
        "teacher": {**t_info, "layers": mm["teacher_layers"], "revision": mm.get("teacher_revision")},
        "student": {**s_info, "layers": mm["student_layers"], "revision": mm.get("student_revision")},
        "data": {"spec": str(data) if not isinstance(data, TextData) else texts.name, "name": texts.name,
                 "source": texts.source, "offline_fallback": bool(getattr(texts, "offline_fallback", False)),
                 "fingerprint": texts.fingerprint, "n_texts": len(texts.texts)},
        "pooling": "words", "words": _word_meta(counts), "max_length": opts["max_length"],
        "batch_size": opts["batch_size"], "device": opts["device"], "cache": False, "versions": _versions(),
        "timings": timings, "warnings": [], "seed": seed, "n_texts": len(texts.texts),
    }
    comp = Comparison.from_moments(moments, ids, teacher_layer_ids=mm["teacher_layers"],
                                   student_layer_ids=mm["student_layers"], meta=meta)
    if out is not None:
        with naming_path(out):
            comp.save(out)
    return comp


def _versions() -> dict[str, str]:

    return {"repsim": repsim.__version__, "torch": torch.__version__, "transformers": transformers_version(),
            "numpy": np.__version__, "pandas": pd.__version__, "python": platform.python_version()}


# ------------------------------------------------------------------------------------------------ CLI glue


def write_report(comp: Comparison, path: str | Path) -> Path:
    """Write ``comp``'s report.html (:mod:`repsim.analysis.report`) to ``path``."""
    return report.write(path, report.comparison_html(comp))


TIMING_STAGES = ("load", "extract", "metrics", "bootstrap", "permutations", "plots")


def format_timings(timings: dict[str, float]) -> str:
    """Every timed stage of a run, in run order (``load 1.2s, extract 3.4s, ...``): the known stages first, then
    any other timed stage; a stage that did not run (no bootstrap asked) is left out."""
    order = [k for k in TIMING_STAGES if k in timings] + sorted(k for k in timings if k not in TIMING_STAGES)
    return ", ".join(f"{k} {float(timings[k]):.1f}s" for k in order
                     if isinstance(timings[k], (int, float)) and not isinstance(timings[k], bool))


def redraw(results: str | Path, out: str | Path | None = None) -> tuple[Comparison, Path, list[Path]]:
    """Redraw the heatmaps, the best-match plot and report.html from a results.csv (or the folder holding it, and
    the report.json beside it, when present) into ``out`` (default: beside the CSV), replacing the earlier figures
    as one set; other files stay. Returns (comparison, folder, figure files); ``comparison.meta`` is empty when
    there was no report.json."""
    results = Path(results)
    if results.is_dir():
        results = results / "results.csv"
    comp = Comparison.from_csv(results)
    folder = check_out_dir(out or results.parent)
    files: list[Path] = []

    def fill(tmp: Path) -> None:
        files.extend(save_figures(comp.table, tmp, **comp.figure_labels()))
        write_report(comp, tmp / "report.html")

    with naming_path(folder):  # the figures and the page as one set; results.csv and other files stay
        replace_folder(folder, fill, lambda name: is_figure_file(name) or name == "report.html")
    return comp, folder, files


def __getattr__(name: str):  # noqa: ANN202
    """Names that moved to the plumbing's one home still resolve, with a DeprecationWarning (repsim/moved.py)."""
    return moved_name(__name__, name)
