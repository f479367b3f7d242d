"""Convergence with the number of texts: each measure of chosen layer pairs on nested seeded subsamples.

``convergence(teacher_layers, student_layers, metrics, pairs)`` recomputes every measure of every chosen
(teacher layer, student layer) pair on ``subsamples`` seeded random subsets of the rows at each size in ``sizes``
(rows of subsample s at size m: the first m of the seeded permutation s, so the sizes of one subsample are nested),
with the all-pairs code on the layers the pairs involve, and beside it the value on the same rows with the
student's rows shuffled once (one seeded permutation per subsample: the chance level's estimate at that size).
Where a measure still moves with n, or its chance level sits close to it, n is not enough to read the value as
the population's. ``curve_figure`` draws one panel per measure family (so a plug-in estimator and its corrected
form share axes): the mean over subsamples with a band from the smallest to the largest subsample, and the chance
level dotted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from repsim.measures.allpairs import pairwise
from repsim.measures.functions import get_metric
from repsim.system.errors import UserError

CURVE_COLUMNS = ["metric", "teacher_layer", "student_layer", "n", "subsample", "value", "chance"]
DEFAULT_SUBSAMPLES = 5


def default_sizes(n: int, steps: int = 5, smallest: int = 10) -> list[int]:
    """n / 2^(steps−1), …, n / 2, n rounded, those ≥ ``smallest`` (the full n always included)."""
    sizes = sorted({int(round(n / 2 ** k)) for k in range(steps)} | {n})
    return [m for m in sizes if m >= min(smallest, n)]


def _subsample_rows(n: int, size: int, subsample: int, seed: int) -> np.ndarray:
    """Rows of subsample ``subsample`` at ``size``: the first ``size`` of one seeded permutation (nested in size)."""
    return np.sort(np.random.default_rng([seed, subsample]).permutation(n)[:size])


def convergence(teacher_layers: Sequence, student_layers: Sequence, metrics: Sequence[str],
                pairs: Sequence[tuple[int, int]], *, teacher_layer_ids: Sequence[int] | None = None,
                student_layer_ids: Sequence[int] | None = None, sizes: Sequence[int] | None = None,
                subsamples: int = DEFAULT_SUBSAMPLES, seed: int = 0, device: str | None = None,
                chance: bool = True) -> pd.DataFrame:
    """Long table (CURVE_COLUMNS) of each metric of each pair at each size and subsample, with its chance value.

    ``pairs``: (teacher layer id, student layer id) in the ids given (default 0, 1, …). ``sizes``: numbers of rows
    (default :func:`default_sizes`); each must be in [4, n]. At the full n every subsample is the whole data, so
    it is computed once (subsample 0). ``chance``: the metric with the student's rows of that subsample shuffled
    by one seeded permutation (seed ``[seed, subsample, size]``); NaN with ``chance=False``."""
    ids = list(dict.fromkeys(get_metric(m).id for m in metrics))
    t_ids = list(teacher_layer_ids) if teacher_layer_ids is not None else list(range(len(teacher_layers)))
    s_ids = list(student_layer_ids) if student_layer_ids is not None else list(range(len(student_layers)))
    pairs = [(int(t), int(s)) for t, s in pairs]
    for t, s in pairs:
        if t not in t_ids or s not in s_ids:
            raise UserError(f"curve pair {t}:{s} is not among the compared layers (teacher {t_ids}, student {s_ids})")
    if not pairs:
        raise UserError("the curve needs at least one layer pair")
    n = int(np.asarray(teacher_layers[0]).shape[0])
    sizes = sorted(set(int(m) for m in (sizes or default_sizes(n))))
    bad = [m for m in sizes if not 4 <= m <= n]
    if bad:
        raise UserError(f"curve sizes must lie in [4, {n}] (the number of texts), got {bad}")
    if subsamples < 1:
        raise UserError(f"the curve needs at least 1 subsample, got {subsamples}")
    used_t = sorted({t for t, _ in pairs}, key=t_ids.index)
    used_s = sorted({s for _, s in pairs}, key=s_ids.index)
    T = [np.asarray(teacher_layers[t_ids.index(t)]) for t in used_t]
    S = [np.asarray(student_layers[s_ids.index(s)]) for s in used_s]
    rows = []
    for size in sizes:
        for sub in range(subsamples if size < n else 1):
            keep = _subsample_rows(n, size, sub, seed)
            shuffle = np.random.default_rng([seed, sub, size]).permutation(size)
            tk, sk = [x[keep] for x in T], [y[keep] for y in S]
            value = pairwise(tk, sk, ids, device=device)
            null = pairwise(tk, [y[shuffle] for y in sk], ids, device=device) if chance else None
            for m in ids:
                for t, s in pairs:
                    i, j = used_t.index(t), used_s.index(s)
                    rows.append((m, t, s, size, sub, float(value[m][i, j]),
                                 float(null[m][i, j]) if null else float("nan")))
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def curve_summary(curve: pd.DataFrame) -> pd.DataFrame:
    """Per metric, pair and size: mean, smallest and largest value over the subsamples, and the mean chance."""
    group = curve.groupby(["metric", "teacher_layer", "student_layer", "n"], sort=False)
    return group.agg(mean=("value", "mean"), low=("value", "min"), high=("value", "max"),
                     chance=("chance", "mean"), subsamples=("value", "size")).reset_index()


def curve_figure(curve: pd.DataFrame, *, title: str | None = None) -> Figure:
    """One panel per measure family, x = number of texts (log scale): the mean over subsamples of each (metric,
    pair), a band from its smallest to its largest subsample, and its chance level dotted. Colour = layer pair,
    line style = estimator (solid: the first id of the family, dashed: the next, e.g. a corrected estimator)."""
    summary = curve_summary(curve)
    metrics = list(dict.fromkeys(summary["metric"]))
    families = list(dict.fromkeys(get_metric(m).family for m in metrics))
    pairs = list(dict.fromkeys(zip(summary["teacher_layer"], summary["student_layer"], strict=True)))
    fig = Figure(figsize=(4.2 * len(families), 3.9), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(families), squeeze=False)[0]
    styles = ["-", "--", "-.", ":"]
    for ax, family in zip(axes, families, strict=True):
        ids = [m for m in metrics if get_metric(m).family == family]
        for k, m in enumerate(ids):
            for c, (t, s) in enumerate(pairs):
                sub = summary[(summary["metric"] == m) & (summary["teacher_layer"] == t)
                              & (summary["student_layer"] == s)].sort_values("n")
                colour = f"C{c % 10}"
                ax.plot(sub["n"], sub["mean"], styles[k % len(styles)], color=colour, marker="o", markersize=3,
                        label=f"{m}  t{t}↔s{s}")
                ax.fill_between(sub["n"], sub["low"], sub["high"], color=colour, alpha=0.15, linewidth=0)
                if sub["chance"].notna().any():
                    ax.plot(sub["n"], sub["chance"], ":", color=colour, linewidth=1.0, alpha=0.8)
        spec = get_metric(ids[0])
        ax.set_xscale("log")
        sizes = sorted(set(int(v) for v in summary["n"]))
        ax.set_xticks(sizes, [str(v) for v in sizes])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("number of texts (log scale)")
        ax.set_ylabel(f"{family} ({spec.direction} = more similar)")
        chance_drawn = summary.loc[summary["metric"].isin(ids), "chance"].notna().any()
        ax.set_title(f"{family}: dotted = chance (shuffled texts)" if chance_drawn else family, fontsize=9)
        ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def format_curve(curve: pd.DataFrame) -> str:
    """The terminal view: per metric and pair, mean [min, max] over subsamples at each size, and the chance."""
    summary = curve_summary(curve)
    lines = ["convergence with the number of texts (mean [min, max] over subsamples; chance = shuffled texts):"]
    for (m, t, s), sub in summary.groupby(["metric", "teacher_layer", "student_layer"], sort=False):
        cells = [f"n={int(r.n)} {r.mean:.3f} [{r.low:.3f}, {r.high:.3f}] ch {r.chance:.3f}"
                 for r in sub.sort_values("n").itertuples()]
        lines.append(f"  {m} t{t}↔s{s}: " + "; ".join(cells))
    return "\n".join(lines)
