"""Synthetic distillation (free student vectors trained under each loss), the tables and figures of the
constructions, and the runner behind ``repsim counterexample``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import torch

from repsim.activations.data import check_seed
from repsim.analysis.comparison import check_out_dir
from repsim.measures import functions as measures
from repsim.measures.losses import make_feature_loss
from repsim.system.errors import UserError
from repsim.system.files import atomic_file, write_text_atomic
from repsim.theory.checks import eps_orthogonal_preservation
from repsim.theory.constructions import (
    cosine_matrix,
    linear_map_counterexample,
    max_inner_product_error,
    near_orthogonal_sweep,
    projection_counterexample,
    teacher_side_collapse,
    theorem1,
    theorem1_sweep,
    three_metrics,
)

SYNTHETIC_LOSSES = ("cka", "projection", "procrustes", "gram_frobenius")


def synthetic_teacher(k: int, d_t: int, *, kind: str = "random", seed: int = 0) -> np.ndarray:
    """k unit vectors in d_t dims. ``kind="random"``: Gaussian directions (pairwise cos ≈ N(0, 1/d_t), so d_t sets
    how near-orthogonal they are); ``kind="orthonormal"``: exactly orthonormal rows (needs k ≤ d_t)."""
    if k < 4 or d_t < 2:
        raise UserError(f"synthetic teacher needs k ≥ 4 and d_t ≥ 2, got k={k}, d_t={d_t}")
    rng = np.random.default_rng(seed)
    if kind == "orthonormal":
        if k > d_t:
            raise UserError(f"orthonormal teacher needs k ≤ d_t, got k={k}, d_t={d_t}")
        Q, _ = np.linalg.qr(rng.standard_normal((d_t, k)))
        return Q.T.copy()
    if kind != "random":
        raise UserError(f"unknown teacher kind {kind!r}: use 'random' or 'orthonormal'")
    G = rng.standard_normal((k, d_t))
    return G / np.linalg.norm(G, axis=1, keepdims=True)


def synthetic_distill(teacher: np.ndarray, d_s: int, loss: str, *, steps: int = 300, lr: float = 0.01,
                      seed: int = 0, eps: float = 0.1, log_every: int = 1) -> pd.DataFrame:
    """Optimise k free student vectors in d_s dims (Gaussian init, std 1/√d_s) with Adam under one loss from
    :mod:`repsim.measures.losses` (any name ``make_feature_loss`` accepts, e.g. "procrustes[squared]"; the projection
    loss learns its map jointly). Logs at step 0 (init) and every
    ``log_every`` steps: the loss, Procrustes, Gram-Frobenius, CKA, in-sample projection residual, the number of
    teacher ε-orthogonal pairs (centred cosines) still ε-orthogonal in the student, and the max inner-product error.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster and makes runs bit-reproducible
    try:
        return _synthetic_distill(teacher, d_s, loss, steps=steps, lr=lr, seed=seed, eps=eps, log_every=log_every)
    finally:
        torch.set_num_threads(threads)


def _synthetic_distill(teacher: np.ndarray, d_s: int, loss: str, *, steps: int, lr: float, seed: int, eps: float,
                       log_every: int) -> pd.DataFrame:

    k, d_t = teacher.shape
    T = torch.as_tensor(teacher, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    S = torch.nn.Parameter(torch.randn(k, d_s, generator=g, dtype=torch.float64) / math.sqrt(d_s))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        loss_fn = make_feature_loss(loss, d_t, d_s).to(torch.float64)
    opt = torch.optim.Adam([S, *loss_fn.parameters()], lr=lr)
    cos_t = cosine_matrix(teacher, center=True)
    rows = []

    def log(step: int, value: float) -> None:
        Sn = S.detach().numpy().copy()
        n_orth, n_kept = eps_orthogonal_preservation(cos_t, cosine_matrix(Sn, center=True), eps)
        rows.append({"step": step, "loss": value, **three_metrics(teacher, Sn),
                     "projection_residual[in_sample]": float(measures.projection_residual(teacher, Sn)),
                     "teacher_eps_orthogonal_pairs": n_orth, "preserved_pairs": n_kept,
                     "preserved_fraction": n_kept / n_orth if n_orth else float("nan"),
                     "max_inner_product_error": max_inner_product_error(teacher, Sn)})

    for step in range(steps + 1):
        opt.zero_grad()
        value = loss_fn(T, S)
        if step % log_every == 0 or step == steps:
            log(step, float(value.detach()))
        if step == steps:
            break
        value.backward()
        opt.step()
    return pd.DataFrame(rows)


DEFAULT_SIZES: tuple[tuple[int, int, int], ...] = ((100, 16, 16), (100, 64, 16), (200, 128, 32))


def projection_table(pc: Any, lm: Any, tc: Any) -> pd.DataFrame:
    """The projection-loss constructions as one long table (construction, quantity, value)."""
    rows = [("projection_counterexample", "projection_loss", pc.loss),
            ("projection_counterexample", "teacher_cos_12", pc.teacher_cos_12),
            ("projection_counterexample", "student_cos_12", pc.student_cos_12),
            *(("projection_counterexample", k, v) for k, v in pc.metrics.items()),
            ("linear_map", "condition_number", lm.condition), ("linear_map", "projection_loss", lm.projection_loss),
            ("linear_map", "max_angle_change_deg", lm.max_angle_change_deg),
            *(("linear_map", k, v) for k, v in lm.metrics.items()),
            ("teacher_side_collapse", "zero_map_loss", tc.zero_loss),
            ("teacher_side_collapse", "rank_one_residual", tc.rank_one_residual),
            ("teacher_side_collapse", "rank_one_abs_cos_min", tc.rank_one_abs_cos_min),
            *(("teacher_side_collapse", k, v) for k, v in tc.metrics_rank_one.items())]
    return pd.DataFrame(rows, columns=["construction", "quantity", "value"])


def _check_synthetic_options(seeds: Sequence[int], steps: int, eps: float) -> None:
    if not (isinstance(eps, (int, float)) and 0 <= eps < 1):
        raise UserError(f"eps must be in [0, 1) (|cos| <= eps counts as eps-orthogonal), got {eps}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"steps must be an integer ≥ 1, got {steps!r}")
    if not len(seeds):
        raise UserError("give at least one seed")
    for seed in seeds:
        check_seed(seed)


def synthetic_experiment(sizes: Sequence[tuple[int, int, int]] = DEFAULT_SIZES, seeds: Sequence[int] = (0, 1, 2),
                         losses: Sequence[str] = SYNTHETIC_LOSSES, steps: int = 300, lr: float = 0.01,
                         eps: float = 0.1, teacher_kind: str = "random", log_every: int = 1) -> pd.DataFrame:
    """All (size, seed, loss) runs; sizes are (k, d_t, d_s). The teacher depends on (size, seed), the student init
    on the seed. Returns the long history with columns k, d_t, d_s, seed, loss_name plus the logged values."""
    _check_synthetic_options(seeds, steps, eps)
    frames = []
    for k, d_t, d_s in sizes:
        for seed in seeds:
            teacher = synthetic_teacher(k, d_t, kind=teacher_kind, seed=seed)
            for name in losses:
                h = synthetic_distill(teacher, d_s, name, steps=steps, lr=lr, seed=seed, eps=eps, log_every=log_every)
                h.insert(0, "loss_name", name)
                h.insert(0, "seed", seed)
                h.insert(0, "d_s", d_s)
                h.insert(0, "d_t", d_t)
                h.insert(0, "k", k)
                frames.append(h)
    return pd.concat(frames, ignore_index=True)


def synthetic_final_table(history: pd.DataFrame) -> pd.DataFrame:
    """Final-step values, mean (and std) over seeds, per size and loss, with the initial loss for reference."""
    keys = ["k", "d_t", "d_s", "loss_name"]
    first = history[history.step == 0].groupby(keys + ["seed"])["loss"].first().rename("initial_loss")
    last = history.loc[history.groupby(keys + ["seed"])["step"].idxmax()].set_index(keys + ["seed"])
    last = last.join(first)
    cols = ["initial_loss", "loss", "procrustes[distance]", "gram_frobenius", "cka[linear,biased]",
            "projection_residual[in_sample]", "preserved_fraction", "max_inner_product_error"]
    mean = last.groupby(keys)[cols].mean()
    std = last.groupby(keys)[["preserved_fraction", "procrustes[distance]"]].std().add_suffix(" std")
    return mean.join(std).reset_index()


def save_figure(fig: Any, path: Path) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")


def plot_theorem1(sweep: pd.DataFrame, near: pd.DataFrame, path: Path) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - pyplot after matplotlib.use('Agg')

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ax.plot(sweep.m, sweep["cka[linear,biased]"], "o-", label="CKA (higher = more similar)")
    ax.plot(sweep.m, sweep["procrustes[distance]"], "s-", label="Procrustes distance (lower = more similar)")
    ax.plot(sweep.m, sweep["gram_frobenius"], "^-", label="Gram-Frobenius (lower = more similar)")
    ax.axhline(math.sqrt(2 - math.sqrt(2)), color="grey", ls=":", lw=1)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("m perturbed rows (n = m, ε² = n/m)")
    ax.set_title("Theorem 1: CKA → 1, geometry stays distorted")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.loglog(near.n, near["1 - cka"], "o:", color="grey", label="1 − CKA (a similarity gap, not a distance)")
    ax.loglog(near.n, near["cka_distance"], "o-", label="√(2 − 2·CKA)")
    ax.loglog(near.n, near["procrustes[distance]"], "s-", label="Procrustes distance")
    ax.loglog(near.n, near["gram_frobenius"], "^-", label="Gram-Frobenius")
    ax.set_xlabel(f"n rows (m = {int(near.m.iloc[0])} near-orthogonal rows, ε = {near.eps.iloc[0]:g})")
    ax.set_title("Large ε: √(2 − 2·CKA) and Gram-Frobenius ∝ 1/n, Procrustes ∝ 1/√n", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_synthetic(history: pd.DataFrame, path: Path) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - pyplot after matplotlib.use('Agg')

    sizes = history[["k", "d_t", "d_s"]].drop_duplicates().itertuples(index=False)
    sizes = list(sizes)
    panels = [("loss", "own loss"), ("procrustes[distance]", "Procrustes distance ↓"),
              ("gram_frobenius", "Gram-Frobenius ↓"), ("cka[linear,biased]", "CKA ↑"),
              ("preserved_fraction", "ε-orthogonal pairs kept ↑")]
    fig, axes = plt.subplots(len(sizes), len(panels), figsize=(3.2 * len(panels), 2.6 * len(sizes)), squeeze=False)
    for r, (k, d_t, d_s) in enumerate(sizes):
        sub = history[(history.k == k) & (history.d_t == d_t) & (history.d_s == d_s)]
        for c, (col, title) in enumerate(panels):
            ax = axes[r][c]
            for name, grp in sub.groupby("loss_name"):
                stats = grp.groupby("step")[col].agg(["mean", "min", "max"])
                line, = ax.plot(stats.index, stats["mean"], label=name, lw=1.2)
                ax.fill_between(stats.index, stats["min"], stats["max"], color=line.get_color(), alpha=0.2)
            if col == "loss":
                ax.set_yscale("log")
            ax.set_title(f"{title}\nk={k}, d_t={d_t}, d_s={d_s}", fontsize=8)
            ax.tick_params(labelsize=7)
            if r == len(sizes) - 1:
                ax.set_xlabel("Adam step", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


@dataclass
class Counterexamples:
    """What :func:`counterexamples` built: each part is None when it was not asked for.

    ``theorem1``: the two reference constructions (closed form and measured, one row each), the sweep n = m,
    ε² = n/m, and the near-orthogonal variant; ``projection``: the projection, linear-map and teacher-side
    counterexamples; ``synthetic``: the synthetic distillation's history and its final table, with the settings
    (steps, seeds, eps). ``out``: the folder the CSVs and figures were written to, if any."""

    theorem1: dict[str, pd.DataFrame] | None = None
    projection: dict[str, Any] | None = None
    synthetic: dict[str, Any] | None = None
    out: Path | None = None


def counterexamples(which: str = "all", out: str | Path | None = None, seeds: Sequence[int] = (0, 1, 2),
                    steps: int = 300, sizes: Sequence[tuple[int, int, int]] = DEFAULT_SIZES,
                    eps: float = 0.1) -> Counterexamples:
    """Build the chosen counterexamples (``theorem1``, ``projection``, ``synthetic`` or ``all``); with ``out``,
    also write CSVs and figures (theory_*.csv, theory_*.png) there."""
    if which not in ("theorem1", "projection", "synthetic", "all"):
        raise UserError(f"unknown counterexample {which!r}: choose theorem1, projection, synthetic or all")
    if which in ("synthetic", "all"):
        _check_synthetic_options(seeds, steps, eps)
    outdir = check_out_dir(out) if out is not None else None
    if outdir is not None:
        outdir.mkdir(parents=True, exist_ok=True)
    result = Counterexamples(out=outdir)
    if which in ("theorem1", "all"):
        refs = []
        for n, mm, e, d_t, d_s in [(8, 4, math.sqrt(2), 3, 1), (20, 4, 3.0, 3, 2)]:
            th = theorem1(n, mm, e, d_t=d_t, d_s=d_s)
            meas = th.measured()
            refs.append({"n": n, "m": mm, "eps": e, "d_t": d_t, "d_s": d_s,
                         **{f"{k} (closed form)": v for k, v in th.closed_form.items() if k != "procrustes_rho"},
                         **{f"{k} (measured)": v for k, v in meas.items() if k != "procrustes_rho"}})
        sweep, near = theorem1_sweep(), near_orthogonal_sweep()
        result.theorem1 = {"references": pd.DataFrame(refs), "sweep": sweep, "near_orthogonal": near}
        if outdir is not None:
            write_text_atomic(outdir / "theory_theorem1_sweep.csv", sweep.to_csv(index=False))
            write_text_atomic(outdir / "theory_near_orthogonal.csv", near.to_csv(index=False))
            plot_theorem1(sweep, near, outdir / "theory_theorem1.png")
    if which in ("projection", "all"):
        pc, lm, tc = projection_counterexample(), linear_map_counterexample(), teacher_side_collapse()
        result.projection = {"projection": pc, "linear_map": lm, "teacher_side": tc}
        if outdir is not None:
            write_text_atomic(outdir / "theory_projection.csv", projection_table(pc, lm, tc).to_csv(index=False))
    if which in ("synthetic", "all"):
        history = synthetic_experiment(sizes=sizes, seeds=seeds, steps=steps, eps=eps)
        final = synthetic_final_table(history)
        result.synthetic = {"history": history, "final": final, "steps": steps, "seeds": list(seeds), "eps": eps}
        if outdir is not None:
            write_text_atomic(outdir / "theory_synthetic_final.csv", final.to_csv(index=False))
            plot_synthetic(history, outdir / "theory_synthetic.png")
    return result
