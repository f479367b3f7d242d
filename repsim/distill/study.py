"""A distillation study over many seeds: reading its runs, effect sizes with two-way bootstrap intervals, tests over
texts, Holm's correction, whether a student's geometry predicts its accuracy, and the figures.

**Layout read** (:func:`read_study`): ``OUT/runs/<arm>/seed<k>/`` with ``predictions.csv`` (columns ``index,label,
prediction,correct``: one row per test text, ``index`` its position in the fixed test split), ``metrics.json``
(accuracy, MCC, F1, ...) and optionally ``geometry.csv`` (``teacher_layer,student_layer,trained,measure,value,
null_mean,null_sd,z``). A folder without ``predictions.csv`` (a run still training) is skipped. Arms: ``ce_only``
(labels only), ``none`` (CE + KD, no feature loss) and the feature losses.

**Correctness matrices.** Per arm a boolean matrix C (seeds × texts), C[i, j] = run i classified text j correctly;
rows in ascending seed order. Two arms are compared paired twice: by seed (row i of both is the same seed number:
same data order, same initialisation) and by text (column j is the same text).

**Effect and interval** (:func:`bootstrap_difference`). Effect = mean(A) − mean(B) (accuracy as a fraction; tables
show percentage points, pp). Interval: the two-way ("pigeonhole") bootstrap. Replicate r draws S seed rows and N
text columns with replacement, independently, the same draws for both arms; its value is the mean over the
resampled cells of D = A − B, i.e. w_seedᵀ D w_text / (S·N) with w the draw counts (:func:`two_way_replicates`);
the percentile interval of the replicates (α = 0.05 → 95 %). It carries both sources of variation: which seeds were
run and which texts were drawn. It is conservative when cell-level noise dominates (a run getting a text right
by luck, not a seed or text effect): for D_ij = μ + a_i + b_j + e_ij the bootstrap variance is about
σ_a²/S + σ_b²/N + 3σ_e²/(S·N) against the true σ_a²/S + σ_b²/N + σ_e²/(S·N) (Owen 2007, "The pigeonhole
bootstrap"), so the interval is then up to √3 too wide, never too narrow. :func:`two_way_variance` gives the
unbiased moment estimate beside it (tables: ``se_anova_pp`` next to the bootstrap's ``se_pp``).

**Tests over texts** (:func:`paired_text_test`). d_j = mean over seeds of A[:, j] − B[:, j]; a two-sided
one-sample t-test and a Wilcoxon signed-rank test of d (zeros dropped); an exact McNemar test on each arm's
majority vote over seeds. Holm's step-down correction (:func:`holm`) over a table's t-test p-values.

**Premise** (:func:`geometry_predicts_accuracy`): does a run's geometry distance to the teacher predict its
accuracy? Spearman ρ across all runs, and pooled within arms, each with a bootstrap interval over runs and a
permutation p-value.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from scipy import stats

from repsim.analysis.plot import read_csv_table
from repsim.analysis.stats import percentile_interval, resample_indices
from repsim.distill.evaluation import markdown, ordered
from repsim.system.errors import UserError
from repsim.system.files import atomic_file, write_text_atomic

#: arms in the order tables and figures show them; other arms follow, sorted
ARM_ORDER = ("ce_only", "none", "projection", "cka", "procrustes", "gram_frobenius")
#: arms without a feature loss
CONTROL_ARMS = ("ce_only", "none")
PREDICTION_COLUMNS = ("index", "label", "prediction", "correct")
GEOMETRY_COLUMNS = ("teacher_layer", "student_layer", "trained", "measure", "value", "z")
#: prefix of the loss rows of a geometry.csv (repsim.distill.geometry.loss_values)
LOSS_PREFIX = "loss:"
#: prefix of the per-run geometry summaries :func:`read_study` adds to the runs table
GEOMETRY_PREFIX = "geometry."
DEFAULT_REPLICATES = 10_000

_SEED_FOLDER = re.compile(r"seed(\d+)")


# ---------------------------------------------------------------------------------------------- reading


def _as_bool(column: pd.Series, path: Path) -> np.ndarray:
    text = column.astype(str).str.strip().str.lower()
    bad = ~text.isin(["true", "false", "1", "0", "1.0", "0.0"])
    if bad.any():
        raise UserError(f"{path}: column {column.name!r} holds {column[bad].iloc[0]!r}, not true/false")
    return text.isin(["true", "1", "1.0"]).to_numpy()


def _read_predictions(path: Path) -> pd.DataFrame:
    table = read_csv_table(path, PREDICTION_COLUMNS, "a predictions file")
    if table["index"].duplicated().any():
        raise UserError(f"{path}: text index {table['index'][table['index'].duplicated()].iloc[0]} appears twice")
    table = table.sort_values("index").reset_index(drop=True)
    table["correct"] = _as_bool(table["correct"], path)
    if not np.array_equal(table["correct"].to_numpy(), (table["label"] == table["prediction"]).to_numpy()):
        raise UserError(f"{path}: column 'correct' disagrees with label == prediction")
    return table


def _read_metrics(path: Path) -> dict[str, object]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path} holds no JSON object")
    return {k: v for k, v in data.items() if isinstance(v, (int, float, str, bool)) and k not in ("arm", "seed")}


def geometry_summary(table: pd.DataFrame, path: str | Path = "geometry.csv") -> dict[str, float]:
    """One run's geometry.csv as columns: per measure m the mean over its layer pairs of ``value`` and ``z``, on the
    trained pairs (``geometry.<m>.trained``, ``geometry.<m>.trained.z``) and on the untrained pairs that carry a
    null (``...untrained``; all untrained pairs when none does). Loss rows (``loss:...``) are left out: they are
    the before/after table's (:func:`before_after`)."""
    path = Path(path)
    for column in GEOMETRY_COLUMNS:
        if column not in table.columns:
            raise UserError(f"{path} lacks the column {column}")
    table = table[~table["measure"].astype(str).str.startswith(LOSS_PREFIX)].reset_index(drop=True)
    trained = _as_bool(table["trained"], path)
    out: dict[str, float] = {}
    for measure, rows in table.groupby("measure", sort=True):
        for flag, name in ((True, "trained"), (False, "untrained")):
            part = rows[trained[rows.index] == flag]
            if not flag and part["z"].notna().any():
                part = part[part["z"].notna()]
            if len(part):
                out[f"{GEOMETRY_PREFIX}{measure}.{name}"] = float(part["value"].astype(float).mean())
                out[f"{GEOMETRY_PREFIX}{measure}.{name}.z"] = float(part["z"].astype(float).mean())
    return out


def _reported_rows(path: Path) -> pd.DataFrame:
    """A geometry.csv's rows on the reported pairs (those with a null, and every loss row)."""
    table = read_csv_table(path, GEOMETRY_COLUMNS, "a geometry table")
    keep = table["measure"].astype(str).str.startswith(LOSS_PREFIX) | table["z"].notna()
    table = table[keep].copy()
    table["trained"] = _as_bool(table["trained"], path)
    return table


def before_after(out: str | Path, *, replicates: int = DEFAULT_REPLICATES, seed: int = 0, alpha: float = 0.05
                 ) -> pd.DataFrame:
    """Per arm, measure and pair group (``trained``: the layer map's pairs; ``untrained``: the reported pairs no
    loss saw, :func:`repsim.distill.geometry.reported_pairs`): the untrained student's value (``out/before``), the
    mean over seeds of each run's mean over the group's pairs, its sd and a percentile bootstrap interval over
    seeds, and the mean z against the row-permutation null. Values in each measure's own units (loss rows: the
    loss's value on all test texts at once, ``@all``, or averaged over batches, ``@batchB``)."""
    out = Path(out)
    before_path = out / "before" / "geometry.csv"
    before = {}
    if before_path.is_file():
        table = _reported_rows(before_path)
        before = table.groupby(["measure", "trained"])["value"].mean().to_dict()
    runs = []
    for path in sorted((out / "runs").glob("*/seed*/geometry.csv")):
        table = _reported_rows(path)
        summary = table.groupby(["measure", "trained"]).agg(value=("value", "mean"), z=("z", "mean")).reset_index()
        summary["arm"], summary["seed"] = path.parent.parent.name, path.parent.name
        runs.append(summary)
    if not runs:
        raise UserError(f"no geometry.csv under {out / 'runs'}")
    runs = pd.concat(runs, ignore_index=True)
    rows = []
    for (arm, measure, trained), part in runs.groupby(["arm", "measure", "trained"], sort=False):
        values = part["value"].to_numpy(np.float64)
        draws = values[resample_indices(len(values), replicates, seed)].mean(axis=1)  # the same seed draws per group
        low, high = percentile_interval(draws[:, None], alpha)
        rows.append({"arm": arm, "measure": measure, "pairs": "trained" if trained else "untrained",
                     "before": before.get((measure, trained), math.nan), "after_mean": float(values.mean()),
                     "after_sd": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
                     "ci_low": float(low[0]), "ci_high": float(high[0]), "z_mean": float(part["z"].mean()),
                     "n_seeds": len(values)})
    table = pd.DataFrame(rows)
    table["arm_order"] = [ordered(list(table["arm"].unique()), ARM_ORDER).index(a) for a in table["arm"]]
    return table.sort_values(["measure", "pairs", "arm_order"]).drop(columns="arm_order").reset_index(drop=True)


def read_study(out: str | Path) -> tuple[pd.DataFrame, dict[str, np.ndarray], dict[str, list[int]]]:
    """Read every finished run under ``out/runs/<arm>/seed<k>/``.

    Returns ``(runs, correct, seeds)``: ``runs`` one row per run (``arm``, ``seed``, ``n_texts``, the scalar entries
    of metrics.json, ``accuracy`` from the predictions when metrics.json has none, and the :func:`geometry_summary`
    columns when geometry.csv exists); ``correct[arm]`` a bool array (seeds × texts), texts in index order;
    ``seeds[arm]`` the seed numbers of its rows, ascending. UserError when there is no finished run, when runs
    cover different text indices or give a text different labels, or when metrics.json's accuracy disagrees with
    predictions.csv.
    """
    root = Path(out) / "runs"
    if not root.is_dir():
        raise UserError(f"no study found: {root} is not a folder")
    rows: list[dict[str, object]] = []
    found: dict[str, dict[int, np.ndarray]] = {}
    reference: tuple[Path, np.ndarray, np.ndarray] | None = None
    for arm_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for run_dir in sorted(arm_dir.iterdir()):
            match = _SEED_FOLDER.fullmatch(run_dir.name)
            pred_path = run_dir / "predictions.csv"
            if not match or not pred_path.is_file():
                continue
            pred = _read_predictions(pred_path)
            index, labels = pred["index"].to_numpy(), pred["label"].to_numpy()
            if reference is None:
                reference = (pred_path, index, labels)
            elif not np.array_equal(index, reference[1]):
                raise UserError(f"{pred_path} covers other texts than {reference[0]} ({len(index)} vs "
                                f"{len(reference[1])} indices, {len(np.setxor1d(index, reference[1]))} not shared)")
            elif not np.array_equal(labels, reference[2]):
                raise UserError(f"{pred_path} gives {int((labels != reference[2]).sum())} text(s) other labels "
                                f"than {reference[0]} (first: index {index[labels != reference[2]][0]})")
            correct = pred["correct"].to_numpy(dtype=bool)
            row: dict[str, object] = {"arm": arm_dir.name, "seed": int(match.group(1)), "n_texts": len(pred)}
            row.update(_read_metrics(run_dir / "metrics.json"))
            if "accuracy" not in row:
                row["accuracy"] = float(correct.mean())
            elif abs(float(row["accuracy"]) - correct.mean()) > 0.5 / len(pred):  # type: ignore[arg-type]
                raise UserError(f"{run_dir / 'metrics.json'}: accuracy {row['accuracy']} disagrees with "
                                f"predictions.csv ({correct.mean():.6f})")
            if (run_dir / "geometry.csv").is_file():
                geometry_path = run_dir / "geometry.csv"
                row.update(geometry_summary(read_csv_table(geometry_path, GEOMETRY_COLUMNS, "a geometry file"),
                                             geometry_path))
            rows.append(row)
            found.setdefault(arm_dir.name, {})[int(match.group(1))] = correct
    if not rows:
        raise UserError(f"no finished run (a seed<k> folder with predictions.csv) under {root}")
    arms = ordered(list(found), ARM_ORDER)
    seeds = {arm: sorted(found[arm]) for arm in arms}
    correct = {arm: np.stack([found[arm][s] for s in seeds[arm]]) for arm in arms}
    runs = pd.DataFrame(rows)
    runs["_order"] = runs["arm"].map({arm: i for i, arm in enumerate(arms)})
    runs = runs.sort_values(["_order", "seed"]).drop(columns="_order").reset_index(drop=True)
    return runs, correct, seeds


# ---------------------------------------------------------------------------------------------- effect sizes


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.ndim != 2 or x.shape != y.shape or x.size == 0:
        raise UserError(f"two correctness matrices of one shape (seeds × texts) are needed, got {x.shape} and "
                        f"{y.shape}")
    return x, y


def two_way_indices(n_seeds: int, n_texts: int, replicates: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The two-way bootstrap's draws: seed rows (replicates × n_seeds) and text columns (replicates × n_texts),
    uniform with replacement and independent of each other, reproducible from ``seed``."""
    if replicates < 1:
        raise UserError(f"the bootstrap needs at least 1 replicate, got {replicates}")
    rng = np.random.default_rng(seed)
    seed_rows = rng.integers(0, n_seeds, size=(replicates, n_seeds), dtype=np.int32)
    text_columns = rng.integers(0, n_texts, size=(replicates, n_texts), dtype=np.int32)
    return seed_rows, text_columns


def draw_counts(indices: np.ndarray, n: int) -> np.ndarray:
    """(B, k) indices in range(n) → (B, n) float counts: entry [r, i] = how often replicate r drew i."""
    b = indices.shape[0]
    flat = (indices.astype(np.int64) + n * np.arange(b, dtype=np.int64)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def two_way_replicates(diff: np.ndarray, seed_rows: np.ndarray, text_columns: np.ndarray,
                       chunk: int = 1000) -> np.ndarray:
    """Replicate values w_seedᵀ D w_text / (S·N) of the mean of D (seeds × texts) over the resampled cells, with the
    draw counts w of :func:`two_way_indices`'s rows; computed ``chunk`` replicates at a time."""
    d = np.asarray(diff, dtype=np.float64)
    s, n = d.shape
    out = np.empty(seed_rows.shape[0])
    for start in range(0, len(out), chunk):
        stop = min(len(out), start + chunk)
        w_seed = draw_counts(seed_rows[start:stop], s)
        w_text = draw_counts(text_columns[start:stop], n)
        out[start:stop] = np.einsum("bn,bn->b", w_seed @ d, w_text) / (s * n)
    return out


def two_way_variance(diff) -> float:
    """Unbiased estimate of the variance of mean(D) for D (seeds × texts) under the two-way random-effects model
    D_ij = μ + a_i + b_j + e_ij: (MS_seeds + MS_texts − MS_residual)/(S·N) from the two-way ANOVA without
    replication (E: σ_a²/S + σ_b²/N + σ_e²/(S·N)); clipped at 0, NaN with fewer than 2 seeds or texts. A check on
    the bootstrap, which inflates the σ_e² term (module docstring)."""
    d = np.asarray(diff, dtype=np.float64)
    s, n = d.shape
    if s < 2 or n < 2:
        return math.nan
    grand, rows, cols = d.mean(), d.mean(1), d.mean(0)
    ms_seeds = n * ((rows - grand) ** 2).sum() / (s - 1)
    ms_texts = s * ((cols - grand) ** 2).sum() / (n - 1)
    ms_residual = ((d - rows[:, None] - cols[None, :] + grand) ** 2).sum() / ((s - 1) * (n - 1))
    return max(0.0, float(ms_seeds + ms_texts - ms_residual) / (s * n))


def bootstrap_difference(a, b, *, replicates: int = DEFAULT_REPLICATES, seed: int = 0, alpha: float = 0.05
                         ) -> dict[str, float]:
    """Effect mean(a) − mean(b) of two correctness matrices (seeds × texts, paired by row and by column) with its
    two-way bootstrap percentile interval (module docstring).

    Returns ``n_seeds``, ``n_texts``, ``diff`` (fraction; ×100 for pp), ``ci_low``, ``ci_high`` (the α/2 and
    1 − α/2 quantiles of the replicates), ``se`` (their standard deviation) and ``se_anova`` (√ of
    :func:`two_way_variance`). a == b gives 0, [0, 0].
    """
    x, y = _pair(a, b)
    d = x - y
    rows, columns = two_way_indices(d.shape[0], d.shape[1], replicates, seed)
    values = two_way_replicates(d, rows, columns)
    low, high = percentile_interval(values, alpha)
    return {"n_seeds": int(d.shape[0]), "n_texts": int(d.shape[1]), "diff": float(d.mean()), "ci_low": float(low),
            "ci_high": float(high), "se": float(values.std(ddof=1)) if replicates > 1 else 0.0,
            "se_anova": math.sqrt(two_way_variance(d))}


def paired_text_test(a, b) -> dict[str, float]:
    """Tests of a − b over texts, for correctness matrices (seeds × texts) paired by text.

    d_j = mean over seeds of a[:, j] − b[:, j]. ``t``/``p_t``: two-sided one-sample t-test of d against 0
    (``scipy.stats.ttest_1samp``); ``w``/``p_wilcoxon``: Wilcoxon signed-rank test of d (``scipy.stats.wilcoxon``,
    zero d_j dropped). When every d_j is 0 both are undefined in scipy (t = 0/0; no pair left for Wilcoxon): we
    report statistic 0 and p = 1.0, the data giving no evidence of a difference; a constant non-zero d gives
    t = ±∞, p_t = 0. Secondary: an exact McNemar test on the majority votes, text j counting as correct for an arm
    when more than half its seeds get it right; texts where either arm's vote is tied (even seed count) are left
    out (``n_tied``); ``a_only``/``b_only`` are the discordant counts and ``p_mcnemar`` = two-sided
    ``scipy.stats.binomtest(a_only, a_only + b_only, 0.5)`` (1.0 without discordant texts).
    """
    x, y = _pair(a, b)
    d = x.mean(0) - y.mean(0)
    if d.size < 2:
        raise UserError(f"a test over texts needs at least 2 texts, got {d.size}")
    out: dict[str, float] = {"n_texts": int(d.size), "diff": float(d.mean())}
    if np.all(d == 0):
        out.update(t=0.0, p_t=1.0, w=0.0, p_wilcoxon=1.0)
    else:
        if np.all(d == d[0]):  # constant non-zero difference: sd = 0
            out.update(t=math.copysign(math.inf, d[0]), p_t=0.0)
        else:
            t_res = stats.ttest_1samp(d, 0.0)
            out.update(t=float(t_res.statistic), p_t=float(t_res.pvalue))
        w_res = stats.wilcoxon(d)
        out.update(w=float(w_res.statistic), p_wilcoxon=float(w_res.pvalue))
    vote_a, vote_b = np.sign(x.mean(0) - 0.5), np.sign(y.mean(0) - 0.5)
    decided = (vote_a != 0) & (vote_b != 0)
    a_only = int(((vote_a > 0) & (vote_b < 0) & decided).sum())
    b_only = int(((vote_a < 0) & (vote_b > 0) & decided).sum())
    p_mcnemar = float(stats.binomtest(a_only, a_only + b_only, 0.5).pvalue) if a_only + b_only else 1.0
    out.update(n_tied=int((~decided).sum()), a_only=a_only, b_only=b_only, p_mcnemar=p_mcnemar)
    return out


def holm(pvalues) -> np.ndarray:
    """Holm–Bonferroni step-down adjusted p-values, same shape as ``pvalues``.

    With the m non-NaN p-values sorted, p_(1) ≤ … ≤ p_(m): adjusted p_(k) = min(1, max_{i ≤ k} (m − i + 1)·p_(i)),
    the smallest family-wise level at which Holm's procedure rejects that hypothesis. NaN stays NaN and is not
    counted in m. Ties get equal adjusted values.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    flat = p.ravel()
    ok = ~np.isnan(flat)
    if np.any((flat[ok] < 0) | (flat[ok] > 1)):
        raise UserError("p-values must lie in [0, 1]")
    q = flat[ok]
    m = q.size
    order = np.argsort(q, kind="stable")
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * q[order]))
    out = np.full(flat.shape, np.nan)
    out[ok] = adjusted
    return out.reshape(p.shape)


def default_pairs(arms: Sequence[str]) -> list[tuple[str, str]]:
    """(arm, baseline) pairs among ``arms``: every feature-loss arm against ``none``, ``none`` against ``ce_only``,
    and ``procrustes`` and ``gram_frobenius`` against ``cka`` and against ``projection``."""
    present = set(arms)
    features = [arm for arm in ordered(list(present), ARM_ORDER) if arm not in CONTROL_ARMS]
    pairs = [(arm, "none") for arm in features] + [("none", "ce_only")]
    pairs += [(arm, base) for base in ("cka", "projection") for arm in ("procrustes", "gram_frobenius")]
    return [p for p in dict.fromkeys(pairs) if p[0] in present and p[1] in present]


def _paired_rows(correct: dict[str, np.ndarray], seeds: dict[str, list[int]] | None, arm: str, base: str
                 ) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(correct[arm]), np.asarray(correct[base])
    if seeds is None:
        if a.shape[0] != b.shape[0]:
            raise UserError(f"{arm} has {a.shape[0]} seeds and {base} {b.shape[0]}: pass `seeds` to pair them")
        return a, b
    common = sorted(set(seeds[arm]) & set(seeds[base]))
    if not common:
        raise UserError(f"{arm} and {base} share no seed")
    return (a[[seeds[arm].index(s) for s in common]], b[[seeds[base].index(s) for s in common]])


def comparisons(correct: dict[str, np.ndarray], pairs: Sequence[tuple[str, str]] | None = None, *,
                seeds: dict[str, list[int]] | None = None, replicates: int = DEFAULT_REPLICATES, seed: int = 0,
                alpha: float = 0.05) -> pd.DataFrame:
    """One row per (arm, baseline) pair (default :func:`default_pairs`): ``n_seeds``, ``n_texts``, ``diff_pp`` =
    100·(mean(arm) − mean(baseline)) in percentage points, its two-way bootstrap interval ``ci_low_pp``,
    ``ci_high_pp`` (:func:`bootstrap_difference`), ``p_t``, ``p_wilcoxon``, ``p_mcnemar``
    (:func:`paired_text_test`), ``p_holm`` (Holm over the table's ``p_t``), and the standard errors ``se_pp``
    (bootstrap) and ``se_anova_pp`` (:func:`two_way_variance`) side by side.

    Rows are paired by seed number: with ``seeds`` (as :func:`read_study` returns) on the seeds both arms have,
    without it row by row (equal seed counts needed).
    """
    if pairs is None:
        pairs = default_pairs(list(correct))
    rows = []
    for arm, base in pairs:
        for name in (arm, base):
            if name not in correct:
                raise UserError(f"no runs of arm {name!r} (have: {', '.join(correct)})")
        a, b = _paired_rows(correct, seeds, arm, base)
        boot = bootstrap_difference(a, b, replicates=replicates, seed=seed, alpha=alpha)
        test = paired_text_test(a, b)
        rows.append({"arm": arm, "baseline": base, "n_seeds": boot["n_seeds"], "n_texts": boot["n_texts"],
                     "diff_pp": 100 * boot["diff"], "ci_low_pp": 100 * boot["ci_low"],
                     "ci_high_pp": 100 * boot["ci_high"], "p_t": test["p_t"], "p_wilcoxon": test["p_wilcoxon"],
                     "p_mcnemar": test["p_mcnemar"], "se_pp": 100 * boot["se"],
                     "se_anova_pp": 100 * boot["se_anova"]})
    columns = ["arm", "baseline", "n_seeds", "n_texts", "diff_pp", "ci_low_pp", "ci_high_pp", "p_t", "p_wilcoxon",
               "p_mcnemar", "se_pp", "se_anova_pp"]
    table = pd.DataFrame(rows, columns=columns)
    table.insert(10, "p_holm", holm(table["p_t"].to_numpy(dtype=np.float64)) if len(table) else [])
    return table


# ---------------------------------------------------------------------------------------------- premise


def _centred_ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis, minus their mean (ties share their mean rank)."""
    ranks = stats.rankdata(values, axis=-1)
    return ranks - ranks.mean(axis=-1, keepdims=True)


def _pooled_correlation(parts: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Σ_g Σ x·y / √(Σ_g Σ x² · Σ_g Σ y²) over groups g of centred arrays (…, n_g); NaN where a side is constant."""
    num = sum((x * y).sum(-1) for x, y in parts)
    den = np.sqrt(sum((x * x).sum(-1) for x, _ in parts) * sum((y * y).sum(-1) for _, y in parts))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _permuted_columns(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    return rng.permuted(np.tile(np.arange(n), (count, 1)), axis=1)


def _correlation_test(groups: list[tuple[np.ndarray, np.ndarray]], permutations: int, replicates: int, seed: int,
                      alpha: float) -> dict[str, float]:
    """ρ = pooled correlation of centred within-group ranks, its stratified bootstrap interval (runs resampled within
    their group) and stratified permutation p (distance permuted within its group), two-sided."""
    rng = np.random.default_rng(seed)
    rho = float(_pooled_correlation([(_centred_ranks(x), _centred_ranks(y)) for x, y in groups]))
    low = high = p = math.nan
    if replicates > 0:
        parts = []
        for x, y in groups:
            idx = rng.integers(0, len(x), size=(replicates, len(x)))
            parts.append((_centred_ranks(x[idx]), _centred_ranks(y[idx])))
        values = _pooled_correlation(parts)
        values = values[np.isfinite(values)]  # a resample constant on one side has no correlation
        if values.size:
            low, high = (float(v) for v in percentile_interval(values, alpha))
    if permutations > 0 and math.isfinite(rho):
        parts = []
        for x, y in groups:
            rx = _centred_ranks(x)
            parts.append((rx[_permuted_columns(rng, len(x), permutations)], _centred_ranks(y)[None, :]))
        null = _pooled_correlation(parts)
        p = float((1 + np.sum(np.abs(null) >= abs(rho) - 1e-12)) / (permutations + 1))
    return {"rho": rho, "ci_low": low, "ci_high": high, "p_permutation": p}


def geometry_predicts_accuracy(runs: pd.DataFrame, distance: str, accuracy: str = "accuracy", group: str = "arm",
                               permutations: int = DEFAULT_REPLICATES, seed: int = 0, *,
                               replicates: int = DEFAULT_REPLICATES, alpha: float = 0.05) -> pd.DataFrame:
    """Does a run's geometry column ``distance`` predict its ``accuracy``? Two rows (``scope``):

    - ``all runs``: Spearman ρ over every run with both values; interval: percentile bootstrap over runs
      (``replicates``); p: two-sided permutation test, distance shuffled over all runs, p = (1 + #{|ρ*| ≥ |ρ|}) /
      (P + 1).
    - ``within arms``: ρ_w = the correlation of within-arm ranks, each centred on its arm's mean rank, pooled over
      arms (Σ_g Σ r_x r_y / √(Σ_g Σ r_x² · Σ_g Σ r_y²)); without ties it is the mean of the per-arm Spearman ρ
      weighted by n_g(n_g² − 1), the plain mean for equal arm sizes. Differences between arm means do not enter:
      it asks whether, among runs of one recipe, the closer students are the more accurate. Interval: bootstrap
      resampling runs within their arm; p: the distance permuted within each arm (stratified permutation test).
      Arms with fewer than 2 runs are left out.

    Columns: scope, distance, accuracy, n_runs, n_groups, rho, ci_low, ci_high, p_permutation, permutations,
    replicates. ρ is NaN (and so are its interval and p) when a side is constant.
    """
    for column in (distance, accuracy, group):
        if column not in runs.columns:
            raise UserError(f"the runs table has no column {column!r}")
    data = runs[[group, distance, accuracy]].dropna()
    if len(data) < 3:
        raise UserError(f"a correlation needs at least 3 runs with {distance} and {accuracy}, got {len(data)}")
    x, y = data[distance].to_numpy(np.float64), data[accuracy].to_numpy(np.float64)
    scopes = [("all runs", [(x, y)])]
    within = [(part[distance].to_numpy(np.float64), part[accuracy].to_numpy(np.float64))
              for _, part in data.groupby(group, sort=True) if len(part) >= 2]
    if within:
        scopes.append(("within arms", within))
    rows = []
    for name, groups in scopes:
        result = _correlation_test(groups, permutations, replicates, seed, alpha)
        rows.append({"scope": name, "distance": distance, "accuracy": accuracy,
                     "n_runs": sum(len(gx) for gx, _ in groups), "n_groups": len(groups), **result,
                     "permutations": permutations, "replicates": replicates})
    return pd.DataFrame(rows)


def geometry_columns(runs: pd.DataFrame) -> list[str]:
    """The runs table's geometry summary columns (:func:`geometry_summary`)."""
    return [c for c in runs.columns if str(c).startswith(GEOMETRY_PREFIX)]


def default_distance(runs: pd.DataFrame) -> str | None:
    """The geometry column the report plots: the Procrustes value on the trained pairs when there is one, else the
    first geometry column, else None."""
    columns = geometry_columns(runs)
    preferred = [c for c in columns if c.startswith(f"{GEOMETRY_PREFIX}procrustes") and c.endswith(".trained")]
    return (preferred or columns or [None])[0]


# ---------------------------------------------------------------------------------------------- figures


def _pyplot():
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - pyplot after matplotlib.use('Agg')

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    _pyplot().close(fig)
    return path


def arm_intervals(correct: dict[str, np.ndarray], *, replicates: int = DEFAULT_REPLICATES, seed: int = 0,
                  alpha: float = 0.05) -> pd.DataFrame:
    """Per arm: n_seeds, n_texts, accuracy_pct = 100·mean(correct) and its two-way bootstrap interval
    (``ci_low_pct``, ``ci_high_pct``: :func:`bootstrap_difference` against an all-wrong matrix)."""
    rows = []
    for arm in ordered(list(correct), ARM_ORDER):
        c = np.asarray(correct[arm], dtype=np.float64)
        boot = bootstrap_difference(c, np.zeros_like(c), replicates=replicates, seed=seed, alpha=alpha)
        rows.append({"arm": arm, "n_seeds": boot["n_seeds"], "n_texts": boot["n_texts"],
                     "accuracy_pct": 100 * boot["diff"], "ci_low_pct": 100 * boot["ci_low"],
                     "ci_high_pct": 100 * boot["ci_high"]})
    return pd.DataFrame(rows)


def plot_study(runs: pd.DataFrame, correct: dict[str, np.ndarray], path: str | Path, *,
               replicates: int = DEFAULT_REPLICATES, seed: int = 0, intervals: pd.DataFrame | None = None) -> Path:
    """Test accuracy (%) per arm (:data:`ARM_ORDER`, then the others): each seed a dot, the mean over seeds and
    texts with its 95 % two-way bootstrap interval (:func:`arm_intervals`, or ``intervals`` if given). PNG, atomic."""
    plt = _pyplot()
    table = intervals if intervals is not None else arm_intervals(correct, replicates=replicates, seed=seed)
    fig, ax = plt.subplots(figsize=(1.3 * len(table) + 2, 3.8))
    for i, row in enumerate(table.itertuples(index=False)):
        vals = 100 * runs.loc[runs["arm"] == row.arm, "accuracy"].to_numpy(np.float64)
        jitter = np.linspace(-0.12, 0.12, len(vals)) if len(vals) > 1 else np.zeros(len(vals))
        ax.scatter(i + 0.22 + jitter, vals, s=12, alpha=0.6, color="tab:blue", zorder=2)
        ax.errorbar(i, row.accuracy_pct, yerr=[[row.accuracy_pct - row.ci_low_pct], [row.ci_high_pct -
                    row.accuracy_pct]], fmt="o", color="black", capsize=6, markersize=7, zorder=3)
    ax.set_xticks(range(len(table)), [f"{r.arm}\n(n={r.n_seeds})" for r in table.itertuples(index=False)])
    ax.set_ylabel("test accuracy, % (mean, 95 % interval)")
    ax.set_xlabel("arm (dots: seeds; interval: two-way bootstrap over seeds and texts)", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_geometry_accuracy(runs: pd.DataFrame, distance: str, path: str | Path, accuracy: str = "accuracy") -> Path:
    """Scatter of ``accuracy`` (%) against the geometry column ``distance``, one dot per run, coloured by arm; the
    all-runs Spearman ρ in the title. PNG, atomic."""
    for column in (distance, accuracy):
        if column not in runs.columns:
            raise UserError(f"the runs table has no column {column!r}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    colours = plt.get_cmap("tab10")
    for i, arm in enumerate(ordered(list(runs["arm"].unique()), ARM_ORDER)):
        part = runs[runs["arm"] == arm]
        ax.scatter(part[distance], 100 * part[accuracy], s=16, alpha=0.75, color=colours(i % 10), label=arm)
    data = runs[[distance, accuracy]].dropna()
    varies = len(data) >= 3 and data[distance].nunique() > 1 and data[accuracy].nunique() > 1
    rho = stats.spearmanr(data[distance], data[accuracy]).statistic if varies else math.nan  # else undefined
    ax.set_title(f"Spearman ρ over {len(data)} runs = {rho:.3f}", fontsize=9)
    ax.set_xlabel(distance.removeprefix(GEOMETRY_PREFIX))
    ax.set_ylabel(f"test {accuracy}, %")
    ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


#: the measures the before/after figure shows, one panel each
BEFORE_AFTER_MEASURES = ("procrustes", "cka", "gram_frobenius")


def before_after_measures(table: pd.DataFrame) -> list[str]:
    """The measure ids of ``table`` whose family is in :data:`BEFORE_AFTER_MEASURES`, in that order."""
    ids = sorted(set(table["measure"].astype(str)))
    return [m for family in BEFORE_AFTER_MEASURES for m in ids if m.split("[", 1)[0] == family]


def plot_before_after(table: pd.DataFrame, path: str | Path) -> Path:
    """One panel per measure of :data:`BEFORE_AFTER_MEASURES`: per arm the mean over seeds after training with its
    95 % interval over seeds, on the trained pairs (filled) and the untrained ones (hollow); dashed lines: the
    untrained student's values. PNG, atomic."""
    plt = _pyplot()
    measures = before_after_measures(table)
    if not measures:
        raise UserError("the before/after table has none of the measures " + ", ".join(BEFORE_AFTER_MEASURES))
    arms = ordered(list(table["arm"].unique()), ARM_ORDER)
    fig, axes = plt.subplots(1, len(measures), figsize=(4.2 * len(measures), 3.8), squeeze=False)
    for ax, measure in zip(axes[0], measures, strict=True):
        for offset, pairs, face in ((-0.12, "trained", "black"), (0.12, "untrained", "white")):
            part = table[(table["measure"] == measure) & (table["pairs"] == pairs)].set_index("arm")
            xs = [i + offset for i, a in enumerate(arms) if a in part.index]
            rows = part.loc[[a for a in arms if a in part.index]]
            ax.errorbar(xs, rows["after_mean"], yerr=[rows["after_mean"] - rows["ci_low"],
                        rows["ci_high"] - rows["after_mean"]], fmt="o", color="black", markerfacecolor=face,
                        capsize=4, label=f"{pairs} pairs")
            if len(rows) and np.isfinite(rows["before"].iloc[0]):
                ax.axhline(rows["before"].iloc[0], ls="--", lw=0.8, color="grey" if pairs == "untrained" else "black")
        ax.set_xticks(range(len(arms)), arms, rotation=30, fontsize=8)
        ax.set_title(f"{measure} (dashed: before training)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- report


def write_study_report(out: str | Path, *, replicates: int = DEFAULT_REPLICATES,
                       permutations: int = DEFAULT_REPLICATES, seed: int = 0, distance: str | None = None
                       ) -> dict[str, Path]:
    """Read ``out`` (:func:`read_study`) and write into it ``study_comparisons.csv`` (:func:`comparisons`),
    ``study_geometry_accuracy.csv`` (:func:`geometry_predicts_accuracy` for every geometry column),
    ``study.md`` (the tables), ``study_accuracy.png`` (:func:`plot_study`) and ``study_geometry_accuracy.png``
    (:func:`plot_geometry_accuracy` for ``distance``, default :func:`default_distance`). Without geometry columns
    the two geometry files are not written. Returns {name: path} of what was written."""
    out = Path(out)
    runs, correct, seeds = read_study(out)
    paths = {"comparisons": out / "study_comparisons.csv", "markdown": out / "study.md",
             "accuracy_figure": out / "study_accuracy.png"}
    intervals = arm_intervals(correct, replicates=replicates, seed=seed)
    table = comparisons(correct, seeds=seeds, replicates=replicates, seed=seed)
    write_text_atomic(paths["comparisons"], table.to_csv(index=False))
    text = ["### Distillation study: test accuracy per arm\n\n", markdown(intervals),
            "\nMean over seeds and texts; 95 % interval from the two-way bootstrap (seeds and texts resampled).\n"]
    if len(table):
        text += ["\n### Arm − baseline (percentage points), paired by seed and text\n\n", markdown(table),
                 "\np_t: t-test over texts of the seed-mean difference; p_wilcoxon: signed-rank test of the same; "
                 "p_mcnemar: exact McNemar on majority votes; p_holm: Holm over this table's p_t; se_pp: the "
                 "bootstrap's standard error, se_anova_pp: the two-way ANOVA moment estimate (the bootstrap "
                 "overstates cell-level noise up to 3× in variance).\n"]
    columns = geometry_columns(runs)
    distance = distance or default_distance(runs)
    if columns:
        geometry = pd.concat([geometry_predicts_accuracy(runs, c, permutations=permutations, seed=seed,
                                                         replicates=replicates) for c in columns],
                             ignore_index=True)
        geometry["p_holm"] = holm(geometry["p_permutation"].to_numpy(np.float64))  # over every column and scope
        paths["geometry"] = out / "study_geometry_accuracy.csv"
        write_text_atomic(paths["geometry"], geometry.to_csv(index=False))
        text += ["\n### Does geometry predict accuracy? Spearman ρ over runs\n\n",
                 markdown(geometry.drop(columns=["accuracy", "permutations", "replicates"])),
                 f"\n{permutations} permutations, {replicates} bootstrap replicates; within arms: ranks centred "
                 "per arm, distance permuted within arms; p_holm: Holm over every row of this table.\n"]
    else:
        text += ["\nNo run has a geometry.csv: the geometry–accuracy test was not run.\n"]
    if any((out / "runs").glob("*/seed*/geometry.csv")):
        table = before_after(out, replicates=replicates, seed=seed)
        paths["before_after"] = out / "study_before_after.csv"
        write_text_atomic(paths["before_after"], table.to_csv(index=False))
        text += ["\n### Geometry before and after training (test texts)\n\n",
                 markdown(table.drop(columns=["after_sd"])),
                 "\nbefore: the untrained student; after: mean over seeds of each run's mean over the pair group, "
                 "95 % interval over seeds; z: against the run's row-permutation null (negative = closer than chance "
                 "for distances, positive for CKA). loss:NAME@all is the loss on all test texts at once, @batchB the "
                 "mean over batches of B texts; projection_optimal refits the map on the test texts, "
                 "projection_trained uses the student's own maps.\n"]
        if before_after_measures(table):
            paths["before_after_figure"] = plot_before_after(table, out / "study_before_after.png")
    write_text_atomic(paths["markdown"], "".join(text))
    plot_study(runs, correct, paths["accuracy_figure"], intervals=intervals)
    if distance is not None:
        paths["geometry_figure"] = plot_geometry_accuracy(runs, distance, out / "study_geometry_accuracy.png")
    return paths
