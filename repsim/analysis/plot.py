"""Figures of a comparison: one heatmap per metric and a best-match curve, drawn from the long results table.

Everything here reads only the long table (teacher_layer, student_layer, metric, value, ...) and the metric
registry (direction, label), so `repsim plot results.csv` redraws the figures from the file alone.
Figures are built on :class:`matplotlib.figure.Figure` objects (no pyplot state, no display needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from repsim.measures.functions import get_metric
from repsim.system.errors import UserError

HEATMAP_FIGSIZE = (7.0, 5.5)  # inches
DPI = 100  # → heatmap PNGs are 700 × 550 pixels
CURVE_FIGSIZE = (7.0, 4.5)  # the best-match figure grows taller with more than three metrics
MAX_TICK_LABELS = 16  # layer labels per heatmap axis; more layers are labelled every k-th
REQUIRED_COLUMNS = ("teacher_layer", "student_layer", "metric", "value")


def _spec(metric: str):
    return get_metric(metric)


def metric_label(metric: str) -> str:
    """Colour-bar label: the canonical id (the convention) and which direction means "similar"."""
    spec = _spec(metric)
    label = getattr(spec, "label", "") or spec.id
    if "similar" not in label:
        label = f"{label} ({spec.direction} = more similar)"
    return f"{spec.id}\n{label}"


def pivot(table: pd.DataFrame, metric: str, column: str = "value") -> pd.DataFrame:
    """The (teacher layer × student layer) matrix of one metric's ``column`` as a DataFrame."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise UserError(f"results table lacks column(s) {', '.join(missing)}")
    sub = table[table["metric"] == metric]
    if sub.empty:
        known = ", ".join(dict.fromkeys(table["metric"]))
        raise UserError(f"metric {metric!r} is not in the results (have: {known})")
    return sub.pivot(index="teacher_layer", columns="student_layer", values=column).sort_index().sort_index(axis=1)


def best_in_rows(matrix: np.ndarray, direction: str) -> np.ndarray:
    """Column index of each row's most similar entry (argmin for "lower", argmax for "higher")."""
    return np.argmin(matrix, axis=1) if direction == "lower" else np.argmax(matrix, axis=1)


def heatmap(table: pd.DataFrame, metric: str, *, teacher_name: str | None = None, student_name: str | None = None,
            n_texts: int | None = None, annotate: bool | None = None) -> Figure:
    """Heatmap of one metric: rows = teacher layers, columns = student layers, each row's best match boxed.

    The colour map runs so that "more similar" is always the bright end (viridis, reversed for metrics where
    lower is more similar); the colour bar names the metric's convention and direction. Cells carry their
    value (2 decimals) when there are at most 200 of them; missing values are left blank. With more than
    :data:`MAX_TICK_LABELS` layers on an axis only every k-th layer is labelled (:func:`tick_positions`).
    The title names the number of texts ``n_texts`` when it is known; the axes name the models when their names
    are known (None: just "teacher layer" / "student layer").
    Drawn with matplotlib's ``imshow`` directly (seaborn's heatmap adds nothing here but a 0.6 s import of
    scipy.stats to every run).
    """
    spec = _spec(metric)
    mat = pivot(table, spec.id)
    values = mat.to_numpy(dtype=float)
    if annotate is None:
        annotate = values.size <= 200
    fig = Figure(figsize=HEATMAP_FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    cmap = "viridis_r" if spec.direction == "lower" else "viridis"
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=metric_label(spec.id))
    rows, cols = values.shape
    xt, yt = tick_positions(cols), tick_positions(rows)
    ax.set_xticks(xt, [str(mat.columns[i]) for i in xt])
    ax.set_yticks(yt, [str(mat.index[i]) for i in yt])
    ax.set_xticks(np.arange(cols + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(rows + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=0.3)
    ax.tick_params(which="minor", length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    chance, spread = _chance_matrices(table, spec.id, mat)
    if annotate:
        lo, hi = np.nanmin(values), np.nanmax(values)
        for (row, col), v in np.ndenumerate(values):
            if np.isfinite(v):  # dark text on the bright end of viridis, light text on the dark end
                bright = (v - lo) / (hi - lo) if hi > lo else 0.5
                bright = 1 - bright if spec.direction == "lower" else bright
                text = f"{v:.2f}" if chance is None or not np.isfinite(chance[row, col]) else \
                    f"{v:.2f}\n({chance[row, col]:.2f})"
                ax.text(col, row, text, ha="center", va="center", fontsize=7 if chance is None else 6,
                        color="black" if bright > 0.6 else "white", linespacing=0.9)
    title = f"{spec.id}{texts_note(n_texts)}: red box = best student layer per teacher layer"
    if chance is not None:
        near = within_chance(values, chance, spread)
        for (row, col), flag in np.ndenumerate(near):
            if flag:
                ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, hatch="///", edgecolor="grey",
                                       linewidth=0))
        title += (f"\n(x) = chance level (shuffled texts); hatched = within {CHANCE_SPREADS:g} sd of chance"
                  if annotate else f"\nhatched = within {CHANCE_SPREADS:g} sd of the chance level (shuffled texts)")
    best = best_in_rows(values, spec.direction)
    for row, col in enumerate(best):
        ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.0))
    ax.set_xlabel(axis_label("student", student_name))
    ax.set_ylabel(axis_label("teacher", teacher_name))
    ax.set_title(title, fontsize=9)
    return fig


#: a cell is drawn as "within chance" when |value − chance| ≤ CHANCE_SPREADS × the chance level's standard deviation
CHANCE_SPREADS = 2.0


def within_chance(values: np.ndarray, chance: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """Cells whose value is indistinguishable from its chance level: |value − chance| ≤ CHANCE_SPREADS · sd (sd over
    the chance permutations). False where the chance level or its spread is unknown (NaN)."""
    with np.errstate(invalid="ignore"):
        return np.abs(values - chance) <= CHANCE_SPREADS * spread


def _chance_matrices(table: pd.DataFrame, metric: str, like: pd.DataFrame):
    """(chance, chance_sd) matrices of one metric aligned with ``like``, or (None, None) when not computed."""
    if "chance" not in table.columns or not table.loc[table["metric"] == metric, "chance"].notna().any():
        return None, None
    chance = pivot(table, metric, "chance").reindex_like(like).to_numpy(dtype=float)
    spread = (pivot(table, metric, "chance_sd").reindex_like(like).to_numpy(dtype=float)
              if "chance_sd" in table.columns else np.full_like(chance, np.nan))
    return chance, spread


def best_match_curve(table: pd.DataFrame, *, teacher_name: str | None = None, student_name: str | None = None,
                     n_texts: int | None = None) -> Figure:
    """For each metric, the best-matching student layer as a function of the teacher layer (left), and the
    value of that best match in the metric's own units (right, one panel per metric, its axis labelled with
    the convention and the direction that means "more similar")."""
    metrics = [_spec(m) for m in dict.fromkeys(table["metric"])]
    height = max(CURVE_FIGSIZE[1], 1.0 + 1.15 * len(metrics))
    fig = Figure(figsize=(CURVE_FIGSIZE[0], height), dpi=DPI, layout="constrained")
    grid = fig.add_gridspec(len(metrics), 2)
    ax_layer = fig.add_subplot(grid[:, 0])
    value_axes = [fig.add_subplot(grid[k, 1]) for k in range(len(metrics))]
    for k, (spec, ax_value) in enumerate(zip(metrics, value_axes, strict=True)):
        mat = pivot(table, spec.id)
        values = mat.to_numpy(dtype=float)
        best = best_in_rows(values, spec.direction)
        teacher_layers = mat.index.to_numpy()
        student_layers = mat.columns.to_numpy()
        colour = f"C{k % 10}"
        offset = (k - (len(metrics) - 1) / 2) * 0.08  # keep coinciding curves visible
        ax_layer.plot(teacher_layers, student_layers[best] + offset, marker="o", color=colour, label=spec.id)
        ax_value.plot(teacher_layers, values[np.arange(len(best)), best], marker="o", markersize=3, color=colour)
        arrow = "↓" if spec.direction == "lower" else "↑"
        heading = "value of that best match:\n" if k == 0 else ""
        ax_value.set_title(f"{heading}{spec.id}  ({arrow} {spec.direction} = more similar)", fontsize=7, loc="left")
        ax_value.tick_params(labelsize=7)
        ax_value.grid(alpha=0.3)
        if k < len(metrics) - 1:
            ax_value.tick_params(labelbottom=False)
        if len(metrics) > 1:
            ax_value.sharex(value_axes[0])
    ax_layer.set_xlabel(axis_label("teacher", teacher_name))
    ax_layer.set_ylabel(f"best {axis_label('student', student_name)}")
    ax_layer.set_title(f"best match per teacher layer{texts_note(n_texts)}", fontsize=9)
    value_axes[-1].set_xlabel(axis_label("teacher", teacher_name))
    ax_layer.legend(fontsize=7)
    return fig


def axis_label(side: str, name: str | None) -> str:
    """``"teacher layer (all-mpnet-base-v2)"``, or ``"teacher layer"`` when the model's name is not known."""
    return f"{side} layer ({name})" if name else f"{side} layer"


def texts_note(n_texts: int | None) -> str:
    """``", n = 872 texts"`` for titles; empty when the number of texts is not known."""
    return f", n = {int(n_texts)} texts" if n_texts else ""


def tick_positions(count: int, max_labels: int = MAX_TICK_LABELS) -> list[int]:
    """Positions 0..count−1 to label on a heatmap axis: all of them up to ``max_labels``, else every k-th with
    k = ⌈count / max_labels⌉, the last position always labelled (it replaces the one before when they would
    sit closer than k/2 apart)."""
    if count <= max_labels:
        return list(range(count))
    step = -(-count // max_labels)
    positions = list(range(0, count, step))
    if positions[-1] != count - 1:
        if count - 1 - positions[-1] < step / 2:
            positions[-1] = count - 1
        else:
            positions.append(count - 1)
    return positions


def file_stem(metric: str) -> str:
    """A file-name-safe form of a metric id: ``cka[linear,biased]`` → ``cka_linear_biased``."""
    out = "".join(c if c.isalnum() or c in "-." else "_" for c in metric)
    return "_".join(part for part in out.split("_") if part)


def save_figures(table: pd.DataFrame, out_dir: str | Path, *, teacher_name: str | None = None,
                 student_name: str | None = None, n_texts: int | None = None,
                 formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """Write heatmap_<metric>.<fmt> for every metric and best_match.<fmt> into ``out_dir``; return the paths."""
    out_dir = Path(out_dir)
    written = []
    names = dict(teacher_name=teacher_name, student_name=student_name, n_texts=n_texts)
    figures = [(f"heatmap_{file_stem(_spec(m).id)}", heatmap(table, m, **names))
               for m in dict.fromkeys(table["metric"])]
    figures.append(("best_match", best_match_curve(table, **names)))
    # SVG text stays text (editable in a paper, 1/3 smaller, faster to write than glyph outlines); the
    # constrained layout is solved on the first save and frozen for the other formats
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        for stem, fig in figures:
            for fmt in formats:
                path = out_dir / f"{stem}.{fmt}"
                fig.savefig(path, format=fmt, dpi=DPI)
                fig.set_layout_engine("none")
                written.append(path)
    return written


def read_results(path: str | Path) -> pd.DataFrame:
    """Read a results.csv written by `repsim compare`; UserError when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"results file not found: {path}")
    return read_csv_table(path, REQUIRED_COLUMNS, "a repsim results file")


def read_csv_table(path: str | Path, columns: Sequence[str], kind: str = "the expected table") -> pd.DataFrame:
    """Read a CSV file that must hold ``columns``; UserError (one line) when it is unreadable or lacks one."""
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not a readable CSV file: {str(exc).splitlines()[0]}") from exc
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise UserError(f"{path} is not {kind}: missing column(s) {', '.join(missing)}")
    return table
