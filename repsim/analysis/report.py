"""``report.html``: one self-contained page of a comparison (or a geometry check), readable in any browser.

The page is rendered with Jinja2 (autoescaping on) from the package template ``templates/report.html.j2``.
Figures are inline SVG drawn by :mod:`repsim.analysis.plot`; the page loads nothing (a Content-Security-Policy of
``default-src 'none'`` forbids every request). Every measure id on the page links to its definition at the
bottom (formula, range, direction, invariances), taken from the measure registry.

For a comparison it shows: provenance (models with their weight fingerprints, data and its fingerprint,
pooling, rows, versions, seed), one heatmap per measure with its direction, the best student layer per teacher
layer with the suggested monotone layer map drawn on the heatmap and listed in the table, intervals and p-values
where they were computed, and chance levels when the results carry a ``chance`` column.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jinja2
import matplotlib
import numpy as np
import pandas as pd
from markupsafe import Markup
from matplotlib.figure import Figure

import repsim
from repsim.analysis.plot import best_match_curve, file_stem, heatmap
from repsim.measures.functions import get_metric
from repsim.system.errors import UserError

TEMPLATE = "report.html.j2"

#: the formula of each measure family, in the conventions of the metric registry
FORMULAS = {
    "procrustes": "ρ = ‖X̃ᵀỸ‖_* (nuclear norm); distance √max(0, 2 − 2ρ) = min over orthogonal Q of ‖X̃ − ỸQ‖_F "
                  "(zero-padded to a common width); angular arccos ρ; squared 2 − 2ρ",
    "gram_frobenius": "‖X̃X̃ᵀ − ỸỸᵀ‖_F, the Frobenius distance of the n × n Gram matrices (squared form: its square)",
    "cka": "HSIC(K, L) / √(HSIC(K, K) · HSIC(L, L)) with K = XXᵀ, L = YYᵀ (linear kernel) or RBF kernels "
           "exp(−d²/(2σ²m)), m the median squared distance; biased HSIC (Gretton) or the debiased U-statistic (Song)",
    "projection_residual": "min_W ‖X̃ − ỸW‖²_F = 1 − R², the fraction of the teacher not linearly predictable from "
                           "the student (least squares, optional ridge); folds=k: fitted on k − 1 folds and scored on "
                           "the held-out fold; in_sample: scored on the fitted rows. Asymmetric.",
    "shape": "arccos ‖ZₓX̃ᵀỸZ_y‖_* (angular) or √(2 − 2‖ZₓX̃ᵀỸZ_y‖_*) (euclidean), partial whitening "
             "Z ∝ αI + (1 − α)(X̃ᵀX̃)^{-1/2} with ‖X̃Z‖_F = 1 (Williams et al. 2021)",
    "cca": "mean of the canonical correlations ρᵢ (singular values of C_xx^{-1/2}C_xyC_yy^{-1/2}), or of ρᵢ²; "
           "ridge: C + λ·(tr C/p)·I",
    "svcca": "mean canonical correlation of the two sides reduced to their top principal directions "
             "(Raghu et al. 2017)",
    "pwcca": "Σαᵢρᵢ/Σαᵢ, αᵢ = Σⱼ|⟨hᵢ, x̃ⱼ⟩| the weight of the teacher's canonical variate hᵢ on its neurons "
             "(Morcos et al. 2018). Asymmetric.",
    "rsa": "correlation (spearman, pearson, Kendall τ_a or cosine) of the upper triangles of the two "
           "representational dissimilarity matrices (Kriegeskorte et al. 2008)",
    "mutual_knn": "mean over rows of |N_X(i) ∩ N_Y(i)|/k, N the k nearest rows by cosine similarity "
                  "(Huh et al. 2024)",
    "cknna": "HSIC_u of the cosine kernels masked to the shared k-nearest neighbours, over the masked self-HSICs "
             "(Huh et al. 2024). Asymmetric.",
}


def _spec(metric: str):
    return get_metric(metric)


def anchor(metric: str) -> str:
    """The page anchor of a measure's definition, e.g. ``def-cka_linear_biased``."""
    return "def-" + file_stem(metric)


def direction_text(direction: str) -> str:
    return "lower = more similar" if direction == "lower" else "higher = more similar"


def definition(metric: str) -> dict[str, Any]:
    """Formula, range, direction and invariances of one measure id, for the page's definitions section."""
    spec = _spec(metric)
    lo, hi = spec.range
    return {"id": spec.id, "anchor": anchor(spec.id), "label": spec.label,
            "formula": FORMULAS.get(spec.family, spec.label), "range": f"[{_num(lo)}, {_num(hi)}]",
            "direction_text": direction_text(spec.direction),
            "invariances": ", ".join(sorted(spec.invariances))}


def _num(v: Any, digits: int = 4) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(f):
        return "—" if math.isnan(f) else str(f)
    if f == math.sqrt(2):
        return "√2"
    if f == math.pi / 2:
        return "π/2"
    return f"{f:.{digits}g}" if abs(f) >= 1e-3 or f == 0 else f"{f:.3e}"


def _cell(v: Any, num: bool = False, link: str | None = None) -> dict[str, Any]:
    return {"text": _num(v) if num else str(v), "num": num, "anchor": link}


def svg_of(fig: Any, salt: str) -> str:
    """A matplotlib Figure as an inline ``<svg>`` element (text kept as text, ids salted per figure)."""
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text[text.index("<svg"):], count=1, flags=re.S)
    return Markup(text)


def render(context: dict[str, Any]) -> str:
    """The HTML page for ``context`` (title, subtitle, provenance, warnings, sections, definitions)."""

    env = jinja2.Environment(loader=jinja2.PackageLoader("repsim.analysis", "templates"),
                             autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
                             trim_blocks=True, lstrip_blocks=True)
    ctx = {"warnings": [], "subtitle": "", "version": repsim.__version__, **context}
    return env.get_template(TEMPLATE).render(**ctx)


def write(path: str | Path, html: str) -> Path:
    """Write a page (the caller makes it atomic: comparisons write into their temporary output folder)."""
    path = Path(path)
    try:
        path.write_text(html, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write the report {path}: {exc.strerror or exc}") from exc
    return path


# ------------------------------------------------------------------------------------------------ comparison


def _model_row(meta: dict, side: str) -> str:
    info = meta.get(side) or {}
    acts = info.get("activations") or {}
    parts = [str(info.get("name", side))]
    rev = info.get("revision") or acts.get("revision")
    if rev:
        parts.append(f"weights {rev}")
    if info.get("width"):
        parts.append(f"width {info['width']}")
    if info.get("layers") is not None:
        layers = info["layers"]
        parts.append(f"layers {layers[0]}..{layers[-1]}" if layers else "layers —")
    if acts.get("tokenizer"):
        parts.append(f"tokenizer sha256 {str(acts['tokenizer'])[:16]}…")
    return "; ".join(parts)


def comparison_provenance(comp: Any) -> list[tuple[str, str]]:
    meta = comp.meta
    rows: list[tuple[str, str]] = []
    if meta.get("teacher") or meta.get("student"):
        rows += [("teacher", _model_row(meta, "teacher")), ("student", _model_row(meta, "student"))]
    data = meta.get("data") or {}
    if data:
        desc = f"{data.get('name', '')} ({data.get('spec', '')}): {data.get('n_texts', '?')} texts"
        if data.get("offline_fallback"):
            desc += ", offline SST-like fallback"
        rows.append(("data", desc))
        if data.get("source"):
            rows.append(("data source", str(data["source"])))
        if data.get("fingerprint"):
            rows.append(("data fingerprint", str(data["fingerprint"])))
    pooling = meta.get("pooling")
    if pooling:
        rows.append(("pooling", str(pooling)))
    words = meta.get("words")
    if words:
        rows.append(("word rule", str(words.get("rule", ""))))
        rows.append(("words", f"{words.get('n_words')} words, {words.get('n_used')} kept by both models, "
                              f"{words.get('dropped')} dropped (truncated or without a token)"))
    n_rows = meta.get("n_rows") or meta.get("n_texts")
    if n_rows is not None:
        rows.append(("n (rows compared)", str(n_rows)))
    for key in ("max_length", "batch_size", "device"):
        if meta.get(key) is not None:
            rows.append((key.replace("_", " "), str(meta[key])))
    if "seed" in meta:
        rows.append(("seed", str(meta["seed"])))
    if meta.get("bootstrap"):
        b = meta["bootstrap"]
        rows.append(("bootstrap", f"{b.get('replicates')} replicates over texts; {b.get('interval', '')}"))
    if meta.get("permutations"):
        p = meta["permutations"]
        rows.append(("permutations", f"{p.get('replicates')} shuffles of the {p.get('side_shuffled', 'student')}'s "
                                     f"rows (seed {p.get('seed')})"))
    versions = meta.get("versions") or {}
    if versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    timings = meta.get("timings") or {}
    nums = {k: v for k, v in timings.items() if isinstance(v, (int, float))}
    if nums:
        rows.append(("timings", ", ".join(f"{k} {v:.1f} s" for k, v in nums.items())))
    if not rows:
        rows.append(("provenance", "not recorded (results.csv without report.json)"))
    return rows


def map_figure(comp: Any, metric: str) -> Any:
    """The heatmap of ``metric`` with the suggested monotone teacher → student map drawn as a white path."""
    fig = heatmap(comp.table, metric, **comp.figure_labels())
    ax = fig.axes[0]
    mapping = comp.suggest_map(metric)
    t_pos = {t: i for i, t in enumerate(comp.teacher_layers)}
    s_pos = {s: j for j, s in enumerate(comp.student_layers)}
    xs = [s_pos[s] for _, s in mapping]
    ys = [t_pos[t] for t, _ in mapping]
    ax.plot(xs, ys, color="white", linewidth=2.2, marker="o", markersize=4, label="suggested monotone map")
    ax.plot(xs, ys, color="black", linewidth=0.8, linestyle="--")
    ax.legend(loc="lower right", fontsize=7, framealpha=0.8)
    return fig


def best_table(comp: Any, metric: str) -> dict[str, Any]:
    """Best student layer per teacher layer, its value (interval, p-value, chance where present) and the map."""
    spec = _spec(metric)
    best = comp.best_matches(metric)
    mapping = dict(comp.suggest_map(metric))
    sub = comp.table[comp.table["metric"] == spec.id].set_index(["teacher_layer", "student_layer"])
    has_ci = best["ci_low"].notna().any()
    has_p = best["p_value"].notna().any()
    has_chance = "chance" in comp.table.columns and comp.table["chance"].notna().any()
    cols = [{"name": "teacher layer"}, {"name": "best student layer"}, {"name": spec.id, "anchor": anchor(spec.id)}]
    if has_ci:
        cols.append({"name": "95% interval"})
    if has_p:
        cols.append({"name": "p-value"})
    if has_chance:
        cols.append({"name": "chance level"})
    cols += [{"name": "mapped student layer"}, {"name": f"{spec.id} at the mapped layer", "anchor": anchor(spec.id)}]
    rows = []
    for r in best.itertuples():
        t = int(r.teacher_layer)
        cells = [_cell(t), _cell(int(r.student_layer)), _cell(r.value, True)]
        if has_ci:
            cells.append(_cell(f"[{_num(r.ci_low)}, {_num(r.ci_high)}]"))
        if has_p:
            cells.append(_cell(r.p_value, True))
        if has_chance:
            cells.append(_cell(sub.loc[(t, int(r.student_layer)), "chance"], True))
        s_map = mapping[t]
        cells += [_cell(s_map), _cell(sub.loc[(t, s_map), "value"], True)]
        rows.append(cells)
    caption = "best student layer per teacher layer, and the suggested monotone map"
    return {"caption": caption, "columns": cols, "rows": rows}


def comparison_context(comp: Any) -> dict[str, Any]:
    meta = comp.meta
    t_name = _short((meta.get("teacher") or {}).get("name", "teacher"))
    s_name = _short((meta.get("student") or {}).get("name", "student"))
    n = meta.get("n_rows") or meta.get("n_texts")
    sections = []
    for m in comp.metrics:
        spec = _spec(m)
        stem = anchor(spec.id)[4:]
        text = ("Rows are teacher layers, columns student layers (0 = embeddings, k = block k); the red box marks each "
                "teacher layer's best student layer, the white path the suggested monotone layer map (one student "
                "layer per teacher layer, never going back, maximising the total similarity).")
        fig = map_figure(comp, spec.id)
        sections.append({"anchor": "measure-" + stem, "title": f"{spec.id}",
                         "metric": {"id": spec.id, "anchor": anchor(spec.id),
                                    "direction_text": direction_text(spec.direction)},
                         "text": text, "tables": [best_table(comp, spec.id)],
                         "figures": [{"svg": svg_of(fig, stem), "caption": f"{spec.id} for every layer pair"
                                      + (f" (n = {n})" if n else "")}]})
    curve = best_match_curve(comp.table, **comp.figure_labels())
    sections.append({"anchor": "best-match", "title": "Best match per teacher layer, every measure", "metric": None,
                     "text": "", "tables": [],
                     "figures": [{"svg": svg_of(curve, "best_match"),
                                  "caption": "the best student layer of each teacher layer under each measure"}]})
    pooling = meta.get("pooling")
    subtitle = f"{t_name} (teacher) vs {s_name} (student)" + (f", {pooling} pooling" if pooling else "") + (
        f", n = {n}" if n else "")
    return {"title": "repsim comparison", "subtitle": subtitle, "provenance": comparison_provenance(comp),
            "warnings": list(meta.get("warnings") or []), "sections": sections,
            "definitions": [definition(m) for m in comp.metrics]}


def comparison_html(comp: Any) -> str:
    """The report page of a :class:`repsim.analysis.comparison.Comparison`."""
    return render(comparison_context(comp))


def _short(name: Any) -> str:
    return str(name).rstrip("/").split("/")[-1]


# ------------------------------------------------------------------------------------------------ tables


def metric_columns(columns: Iterable[str]) -> dict[str, str]:
    """{column: canonical measure id} for the columns of a table that name a measure."""
    out = {}
    for c in columns:
        try:
            out[c] = _spec(c).id
        except (UserError, KeyError, ValueError, TypeError):
            continue
    return out


def table_section(title: str, table: pd.DataFrame, *, text: str = "", anchor_name: str = "table",
                  figures: Sequence[tuple[Any, str]] = ()) -> dict[str, Any]:
    """A page section holding ``table`` (measure columns link to their definitions) and optional figures."""
    ids = metric_columns(table.columns)
    cols = [{"name": c, "anchor": anchor(ids[c]) if c in ids else None} for c in table.columns]
    rows = []
    for rec in table.itertuples(index=False):
        cells = []
        for v in rec:
            is_num = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            cells.append(_cell(v, is_num))
        rows.append(cells)
    figs = [{"svg": svg_of(fig, f"{anchor_name}-{i}"), "caption": cap} for i, (fig, cap) in enumerate(figures)]
    return {"anchor": anchor_name, "title": title, "metric": None, "text": text,
            "tables": [{"caption": "", "columns": cols, "rows": rows}], "figures": figs}


def metrics_by_pair_figure(table: pd.DataFrame, label_column: str | None = None) -> Any:
    """One panel per measure column: its value at each mapped layer pair (one line per ``label_column`` value)."""
    ids = metric_columns(table.columns)
    cols = list(ids)
    fig = Figure(figsize=(3.2 * max(1, len(cols)), 3.0), dpi=100, layout="constrained")
    axes = fig.subplots(1, max(1, len(cols)), squeeze=False)[0]
    pair = table["teacher_layer"].astype(str) + "↔" + table["student_layer"].astype(str)
    groups = ([(None, table.index)] if label_column is None
              else list(table.groupby(label_column, sort=False).groups.items()))
    for ax, c in zip(axes, cols, strict=False):
        for label, idx in groups:
            ax.plot(list(pair.loc[idx]), table.loc[idx, c].to_numpy(dtype=float), marker="o",
                    label=None if label is None else str(label))
        ax.set_title(f"{ids[c]}\n({direction_text(_spec(ids[c]).direction)})", fontsize=8)
        ax.set_xlabel("teacher ↔ student layer", fontsize=8)
        ax.tick_params(labelsize=7)
    if label_column is not None:
        axes[0].legend(fontsize=7)
    return fig


def check_html(table: pd.DataFrame, meta: dict[str, Any], *, title: str = "repsim geometry check",
               label_column: str | None = None, verdicts: Sequence[str] = ()) -> str:
    """The report page of a geometry check (``repsim check``) or of a before/after table (``label_column`` =
    the student label): provenance, the measures at each mapped layer pair as a figure and a table, verdicts."""
    ids = metric_columns(table.columns)
    prov: list[tuple[str, str]] = []
    for side in ("teacher", "student"):
        m = meta.get(side)
        if isinstance(m, dict):
            prov.append((side, "; ".join(str(x) for x in (m.get("model", m.get("name", side)),
                                                           f"weights {m.get('revision')}" if m.get("revision") else "")
                                         if x)))
        elif m:
            prov.append((side, str(m)))
    t_meta = meta.get("teacher") if isinstance(meta.get("teacher"), dict) else {}
    if t_meta.get("data_fingerprint"):
        prov.append(("data", f"{t_meta.get('data', '')}: {t_meta.get('n_texts', '?')} texts"))
        prov.append(("data fingerprint", str(t_meta["data_fingerprint"])))
    for key in ("data", "data_source", "layer_map", "pool", "n", "seed", "check_options"):
        if key in meta and meta[key] not in (None, "", {}):
            prov.append((key.replace("_", " "), str(meta[key])))
    prov.append(("versions", f"repsim {repsim.__version__}"))
    fig = metrics_by_pair_figure(table, label_column) if ids else None
    text = "Each row is one mapped (teacher layer, student layer) pair." + (
        " Verdicts: " + " ".join(verdicts) if verdicts else "")
    section = table_section("Geometry at the mapped layer pairs", table, text=text, anchor_name="check",
                            figures=[(fig, "each measure at each mapped layer pair")] if fig is not None else [])
    return render({"title": title, "subtitle": f"{len(table)} rows", "provenance": prov, "sections": [section],
                   "definitions": [definition(m) for m in dict.fromkeys(ids.values())]})
