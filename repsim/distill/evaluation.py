"""Scoring distilled students and comparing losses across seeds: predictions, perplexity, metrics, paired tests,
tables, a figure.

- :func:`classification_metrics`: accuracy, Matthews correlation (MCC) and F1 (binary: of class 1;
  more classes: macro average), all in [0, 1] except MCC in [−1, 1].
- :func:`paired_test`: paired t-test (``scipy.stats.ttest_rel``) and Wilcoxon signed-rank test
  (``scipy.stats.wilcoxon``, zero differences dropped, exact two-sided p for small n) of a − b across seeds.
  When every difference is exactly zero both tests are undefined in scipy (t = 0/0 → NaN; Wilcoxon has no
  non-zero pairs left); we report statistic 0 and p = 1.0: the data give no evidence of a difference. With 5
  seeds the smallest two-sided Wilcoxon p is 2/2⁵ = 0.0625, so Wilcoxon alone can never reach 0.05 at 5 seeds.
- :func:`summarize_grid`: per-run rows → results table (CSV + markdown), paired tests of every loss against
  ``none`` and against ``cka``, and a figure with mean ± standard deviation (and each seed) per loss.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from repsim.distill.data import Encoded, collate
from repsim.system.errors import UserError

LOSS_ORDER = ("ce_only", "none", "projection", "cka", "procrustes", "gram_frobenius")


def classification_metrics(labels: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    """accuracy = mean(pred = label); MCC (Matthews, multi-class Gorodkin form); F1 of class 1 (binary) or macro F1."""
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(predictions, dtype=np.int64)
    if y.shape != p.shape or y.size == 0:
        raise UserError(f"labels and predictions must be non-empty and the same length, got {y.size} and {p.size}")
    k = int(max(y.max(), p.max())) + 1
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (y, p), 1.0)
    n = confusion.sum()
    correct = np.trace(confusion)
    true_per_class = confusion.sum(1)
    pred_per_class = confusion.sum(0)
    denom = math.sqrt((n**2 - (pred_per_class**2).sum()) * (n**2 - (true_per_class**2).sum()))
    mcc = (correct * n - (pred_per_class * true_per_class).sum()) / denom if denom > 0 else 0.0

    def f1(c: int) -> float:
        tp = confusion[c, c]
        denom_c = true_per_class[c] + pred_per_class[c]
        return 2 * tp / denom_c if denom_c > 0 else 0.0

    f1_value = f1(1) if k <= 2 else float(np.mean([f1(c) for c in range(k)]))
    return {"accuracy": float(correct / n), "mcc": float(mcc), "f1": float(f1_value)}


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired comparison of a and b (same seeds, same order): mean and sd of a − b, t-test and Wilcoxon.

    Returns ``n``, ``mean_diff``, ``sd_diff``, ``t``, ``p_t`` (two-sided ``ttest_rel``), ``w``, ``p_wilcoxon``
    (two-sided ``wilcoxon``). All differences zero → t = w = 0 and both p = 1.0 (see the module docstring).
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise UserError(f"a paired test needs two equal-length series of ≥ 2 values, got {x.size} and {y.size}")
    d = x - y
    out = {"n": int(x.size), "mean_diff": float(d.mean()), "sd_diff": float(d.std(ddof=1))}
    if np.all(d == 0):
        out.update(t=0.0, p_t=1.0, w=0.0, p_wilcoxon=1.0)
        return out
    t_res = stats.ttest_rel(x, y)
    t_stat, p_t = float(t_res.statistic), float(t_res.pvalue)
    if not math.isfinite(t_stat):  # constant non-zero difference: sd = 0, the t statistic is ±inf
        p_t = 0.0
    w_res = stats.wilcoxon(x, y)
    out.update(t=t_stat, p_t=p_t, w=float(w_res.statistic), p_wilcoxon=float(w_res.pvalue))
    return out


def ordered(losses: Sequence[str], order: Sequence[str] = LOSS_ORDER) -> list[str]:
    """The distinct names of ``losses``: those in ``order`` first, in that order, then the rest sorted."""
    known = [name for name in order if name in losses]
    return known + sorted(set(losses) - set(known))


def summary_table(runs: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """Mean, sd, min, max and number of seeds of ``metric`` (and mean MCC/F1 when present) per loss."""
    groups = runs.groupby("loss")
    table = pd.DataFrame({
        "n_seeds": groups[metric].count(),
        f"{metric}_mean": groups[metric].mean(),
        f"{metric}_sd": groups[metric].std(ddof=1),
        f"{metric}_min": groups[metric].min(),
        f"{metric}_max": groups[metric].max(),
    })
    for extra in ("mcc", "f1"):
        if extra in runs and extra != metric:
            table[f"{extra}_mean"] = groups[extra].mean()
    return table.loc[ordered(list(table.index))].reset_index()


def paired_table(runs: pd.DataFrame, metric: str = "accuracy", baselines: Sequence[str] = ("none", "cka")
                 ) -> pd.DataFrame:
    """Every loss against each baseline, paired by seed (only seeds both have)."""
    rows = []
    wide = runs.pivot_table(index="seed", columns="loss", values=metric)
    for base in baselines:
        if base not in wide:
            continue
        for loss in ordered(list(wide.columns)):
            if loss == base:
                continue
            both = wide[[loss, base]].dropna()
            if len(both) < 2:
                continue
            rows.append({"loss": loss, "baseline": base, **paired_test(both[loss], both[base])})
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame, digits: int = 4) -> str:
    """A pipe table (no extra dependency)."""
    cols = list(table.columns)

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def plot_grid(runs: pd.DataFrame, path: str | Path, metric: str = "accuracy", title: str | None = None) -> Path:
    """Mean ± sd of ``metric`` per loss (error bars) with each seed as a dot; written to ``path`` (PNG)."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - pyplot after matplotlib.use('Agg')

    losses = ordered(list(runs["loss"].unique()))
    fig, ax = plt.subplots(figsize=(1.4 * len(losses) + 2, 3.6))
    for i, loss in enumerate(losses):
        vals = runs.loc[runs["loss"] == loss, metric].to_numpy()
        ax.errorbar(i, vals.mean(), yerr=vals.std(ddof=1) if len(vals) > 1 else 0, fmt="o", color="black",
                    capsize=6, markersize=7, zorder=3)
        jitter = np.linspace(-0.15, 0.15, len(vals)) if len(vals) > 1 else np.zeros(1)
        ax.scatter(i + 0.25 + jitter * 0.5, vals, s=14, alpha=0.6, color="tab:blue", zorder=2)
    counts = runs.groupby("loss")[metric].count()
    ax.set_xticks(range(len(losses)), [f"{loss}\n(n={counts[loss]})" for loss in losses])
    ax.set_ylabel(f"validation {metric} (mean ± sd over seeds)")
    ax.set_xlabel("feature loss (all with CE + KD)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def summarize_grid(runs: pd.DataFrame, out: str | Path, metric: str = "accuracy", title: str | None = None
                   ) -> dict[str, Path]:
    """Write ``runs.csv``, ``summary.csv``/``summary.md``, ``paired_tests.csv`` and ``accuracy.png`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"runs": out / "runs.csv", "summary": out / "summary.csv", "summary_md": out / "summary.md",
             "tests": out / "paired_tests.csv", "figure": out / f"{metric}.png"}
    runs.sort_values(["loss", "seed"]).to_csv(paths["runs"], index=False)
    summary = summary_table(runs, metric)
    tests = paired_table(runs, metric)
    summary.to_csv(paths["summary"], index=False)
    tests.to_csv(paths["tests"], index=False)
    text = [f"### {title or 'Distillation results'}\n", markdown(summary)]
    if len(tests):
        text += [f"\nPaired tests of {metric} across seeds (loss − baseline):\n",
                 markdown(tests[["loss", "baseline", "n", "mean_diff", "sd_diff", "t", "p_t", "w", "p_wilcoxon"]])]
    paths["summary_md"].write_text("".join(text))
    plot_grid(runs, paths["figure"], metric, title)
    return paths


def _rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenisation: lowercase, non-alphanumerics become spaces, split (no stemming)."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004): LCS = longest common token subsequence, P = LCS/|pred|, R = LCS/|ref|, F = 2PR/(P+R).

    Tokens as rouge-score's default tokenizer without stemming; 0.0 when either side has no tokens.
    """
    a, b = _rouge_tokens(prediction), _rouge_tokens(reference)
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def predict(model: nn.Module, tokenizer: Any, encoded: Encoded, batch_size: int = 128,
            device: torch.device | None = None) -> np.ndarray:
    """Class predictions (argmax of logits) for every example, in order."""
    device = device or next(model.parameters()).device
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    preds = []
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded, range(start, min(len(encoded), start + batch_size)), pad,
                        getattr(tokenizer, "padding_side", "right"))
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        preds.append(logits.argmax(-1).cpu().numpy())
    return np.concatenate(preds)


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Any, encoded: Encoded, batch_size: int = 16,
               device: torch.device | None = None) -> float:
    """exp(mean next-token negative log-likelihood over all predicted real tokens) (nats → perplexity)."""
    device = device or next(model.parameters()).device
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded, range(start, min(len(encoded), start + batch_size)), pad, "right")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        valid = (mask[:, 1:] * mask[:, :-1]).bool()
        total += float(F.cross_entropy(logits[valid], ids[:, 1:][valid], reduction="sum"))
        count += int(valid.sum())
    if count == 0:
        raise UserError("no tokens to score: every text is shorter than 2 tokens")
    return math.exp(total / count)


def evaluate(model: nn.Module, tokenizer: Any, encoded: Encoded, task: str, batch_size: int = 128) -> dict[str, float]:
    """Validation metrics: accuracy, MCC, F1 (classification) or perplexity (causal LM)."""

    if task == "causal-lm":
        return {"perplexity": perplexity(model, tokenizer, encoded, batch_size=max(1, batch_size // 8))}
    if encoded.labels is None:
        raise UserError("the validation data has no labels; classification needs a label column")
    return classification_metrics(np.asarray(encoded.labels), predict(model, tokenizer, encoded, batch_size))
