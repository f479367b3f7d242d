"""Bootstrap confidence intervals and permutation p-values for every teacher × student layer pair.

Both procedures resample the *texts* (rows), which are shared by all layers, so one set of resampling
indices serves every cell and every metric of a comparison.

**Bootstrap** (``bootstrap``). Replicate b draws n row indices with replacement (``numpy.random.default_rng``
seeded with ``seed``) and recomputes every metric on those rows for every layer pair. The interval is a
*percentile interval*: the α/2 and 1−α/2 quantiles (``numpy.quantile``, linear interpolation) of the B
replicate values (α = 0.05 by default → a 95 % interval), by default recentred so the replicates' mean sits on
the estimate (duplicated texts in a replicate shift these metrics when n is not ≫ width; see ``bootstrap``)
and clipped to the metric's range. It describes the estimator's spread over texts, not a bias-corrected
population value (CKA, for one, is biased in small samples). Duplicated rows in a replicate can sit in both the
fit and the held-out fold of a k-fold projection residual, which makes its replicates optimistic.

**Permutation test** (``permutation_test``). Replicate b shuffles the student's rows (the same permutation
for every student layer), which breaks the pairing of texts while keeping each side's geometry; the
p-value of a cell is (1 + #{b: replicate at least as similar as observed}) / (P + 1) (Phipson & Smyth 2010),
"similar" read in the metric's direction. Small p: the pairing of texts matters, the two layers share
structure beyond chance.

**Reuse of per-layer work.** For the Gram-based metrics (``gram_frobenius`` in either form and linear biased
CKA) each layer's n×n Gram matrix K = XXᵀ of the mean-centred features is computed once. A bootstrap
replicate holding text i w_i times is then a gather of K on its distinct texts U (~63 % of n) and a
weighting by multiplicity (:func:`_weighted_gram_moments`: the inner products, norms and traces of the
n × n centred Gram of the resample, on |U| × |U|), and a permutation is a
gather of the student's centred Gram; every pair's statistic comes from one matrix product of the flattened
centred Grams: ⟨K_c, L_c⟩ = tr(K_c L_c), with

    CKA = ⟨K_c, L_c⟩ / (‖K_c‖_F ‖L_c‖_F),
    gram_frobenius² = ‖K_c‖²/tr(K_c)² + ‖L_c‖²/tr(L_c)² − 2⟨K_c, L_c⟩/(tr(K_c) tr(L_c))

(X̃X̃ᵀ = K_c / tr K_c because ‖X_c‖²_F = tr K_c). This is exact, costs O((L_t + L_s + L_t·L_s)·n²) per
replicate instead of O(L_t·L_s·p·q·n), and is used when that is cheaper (:func:`gram_is_cheaper`: wide layers,
n ≤ GRAM_MAX_N). Every other metric (Procrustes, projection residual, debiased or RBF CKA) is recomputed per
replicate by :func:`repsim.measures.allpairs.pairwise` on the resampled rows (on the comparison's device).
``method="fast"`` also offers an exact distinct-row Procrustes path (Z = √w ∘ (X − μ_w) gives ZᵀZ' = the
resample's centred cross product on ~0.63·n rows, then singular values); at the default's shapes on CPU it
is slower than ``pairwise`` (benchmarks/RESULTS.md), so "auto" does not use it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from repsim.measures.allpairs import pairwise
from repsim.measures.arrays import as_matrix, power_of_two_exponent, scale_by_power_of_two
from repsim.measures.linalg import nuclear_norms
from repsim.measures.registry import PairMoments, get_metric
from repsim.system.errors import UserError

GRAM_MAX_N = 4096  # above this, n×n Gram matrices per layer cost more memory than they save
DEFAULT_ALPHA = 0.05

Progress = Callable[[int], None] | None


@dataclass(frozen=True)
class Interval:
    """Percentile bootstrap interval per cell: ``low``/``high`` arrays (L_t, L_s) and the replicates (B, L_t, L_s)."""

    low: np.ndarray
    high: np.ndarray
    replicates: np.ndarray


# ---------------------------------------------------------------------------------------------- helpers


def _as_stack(layers, device: str | torch.device | None = None) -> list[torch.Tensor]:
    """A sequence of (n, width) arrays/tensors, or one (L, n, width) array, as float64 tensors on ``device``, each
    layer divided by the power of two of its largest entry (exact; every metric here is scale invariant, and the
    replicates' Grams and cross products then stay inside the float range whatever the data's scale)."""
    if isinstance(layers, (np.ndarray, torch.Tensor)) and layers.ndim == 3:
        layers = list(layers)
    out = []
    for i, x in enumerate(layers):
        t = as_matrix(x, f"layer {i}", device=device or "cpu").detach()
        exponent = power_of_two_exponent(t)
        out.append(t if not exponent else scale_by_power_of_two(t, -exponent))
    if not out:
        raise UserError("no layers given")
    return out


def _check_rows(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> int:
    ns = {t.shape[0] for t in teacher} | {s.shape[0] for s in student}
    if len(ns) != 1:
        raise UserError(f"teacher and student layers must have the same number of rows (texts), got {sorted(ns)}")
    return ns.pop()


def _specs(metrics: Sequence[str]):
    return [get_metric(m) for m in metrics]


#: the statistics each fast replicate path holds: a metric goes there when its family's finalize reads only these
GRAM_PATH_STATISTICS = frozenset({"cross_sq", "self_sq"})
PROCRUSTES_PATH_STATISTICS = frozenset({"nuclear"})


def _reads_only(spec, held: frozenset[str]) -> bool:
    """Whether a metric of second moments is computable from the statistics ``held`` (and the rows): its family's
    declared needs (repsim.measures.registry.Family.needs) are a non-empty subset of them."""
    if not spec.linear or not dict(spec.kwargs).get("center", True):
        return False
    needs = spec.family_object.needs(**spec.kwargs)
    return bool(needs) and needs <= held


def gram_fast_path(spec) -> bool:
    """Whether a metric is computable from centred linear Gram matrices by :func:`_gram_values`."""
    return _reads_only(spec, GRAM_PATH_STATISTICS)


def _centred_gram(X: torch.Tensor) -> torch.Tensor:
    Xc = X - X.mean(dim=0, keepdim=True)
    return Xc @ Xc.T


def _double_centre(K: torch.Tensor) -> torch.Tensor:
    """H K H for a batch (L, m, m) of Gram matrices, H = I − 11ᵀ/m."""
    row = K.mean(dim=-1, keepdim=True)
    col = K.mean(dim=-2, keepdim=True)
    return K - row - col + K.mean(dim=(-2, -1), keepdim=True)


def _weighted_gram_moments(T: torch.Tensor, S: torch.Tensor, rows: torch.Tensor, w: torch.Tensor, n: int):
    """⟨K̃_t, L̃_s⟩ (L_t, L_s), ‖K̃_t‖², tr K̃_t, ‖L̃_s‖², tr L̃_s of the centred n × n Grams of a resample that holds
    row i w_i times (Σ w = n), from the Grams T (L_t, n, n) and S (L_s, n, n) gathered on its distinct rows only.

    The resample's centred Gram is PᵀA P with P = I − w1ᵀ/n on the distinct rows, and its inner products weigh
    each entry by w_i w_j, so with M = PWPᵀ = W − wwᵀ/n (W = diag w) and a = Aw, b = Bw:
        ⟨Ã, B̃⟩ = tr(AMBM) = ⟨WAW, B⟩ − 2 aᵀWb/n + (wᵀa)(wᵀb)/n²,   tr Ã = Σ w_i A_ii − wᵀa/n:
    one weighting pass of the teacher Grams and one matrix product of the flattened Grams for all pairs, with the
    centring carried by the vectors a, b (no centred m × m copies).
    """
    def side(G: torch.Tensor):
        """(WAW flattened, A flattened, a = Aw, wᵀa, ‖Ã‖², tr Ã) of each gathered Gram A of one side."""
        K = G.index_select(1, rows).index_select(2, rows)
        flat = K.reshape(len(G), -1)
        weighted = (K * w[None, :, None] * w[None, None, :]).reshape(len(G), -1)
        a = K @ w  # (L, m)
        wa = a @ w
        sq = (weighted * flat).sum(dim=1) - 2 * ((a * a) @ w) / n + wa ** 2 / n ** 2
        return weighted, flat, a, wa, sq, torch.diagonal(K, dim1=-2, dim2=-1) @ w - wa / n

    weighted_t, _, a, wa, t_sq, t_tr = side(T)
    _, s_flat, b, wb, s_sq, s_tr = side(S)
    cross = weighted_t @ s_flat.T - 2 * (a * w) @ b.T / n + wa[:, None] * wb[None, :] / n ** 2
    return cross, t_sq, t_tr, s_sq, s_tr


def _gram_summaries(Kc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened centred Grams (L, m²), squared Frobenius norms (L,), traces (L,)."""
    flat = Kc.reshape(Kc.shape[0], -1)
    return flat, (flat * flat).sum(dim=1), Kc.diagonal(dim1=-2, dim2=-1).sum(dim=-1)


def _gram_values(spec, cross: torch.Tensor, t_sq, t_tr, s_sq, s_tr, n: int, rows_t=None, rows_s=None) -> np.ndarray:
    """Metric value per pair from ⟨K_c, L_c⟩ (L_t, L_s), ‖K_c‖², tr K_c, ‖L_c‖², tr L_c: the family's ``finalize``
    on the unit-Frobenius moments ‖X̃ᵀỸ‖²_F = ⟨K_c, L_c⟩/(tr K_c tr L_c), ‖X̃ᵀX̃‖²_F = ‖K_c‖²/(tr K_c)²
    (X̃X̃ᵀ = K_c / tr K_c), with the replicate's rows (``rows_t``/``rows_s``, for nearly identical pairs)."""
    m = PairMoments(n, cross_sq=cross / (t_tr[:, None] * s_tr[None, :]), self_sq_x=(t_sq / t_tr ** 2)[:, None],
                    self_sq_y=s_sq / s_tr ** 2, rows_x=rows_t, rows_y=rows_s)
    return spec.finalize(m).cpu().numpy()


def _generic_values(teacher, student, specs, tol: float = 1e-9) -> dict[str, np.ndarray]:
    ids = [s.id for s in specs]
    res = pairwise(teacher, student, metrics=ids, device=teacher[0].device, tol=tol)
    return {k: _numpy(res[k]) for k in ids}


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
    return np.asarray(x, dtype=np.float64)


def gram_is_cheaper(n: int, teacher_widths: Sequence[int], student_widths: Sequence[int]) -> bool:
    """Whether per-replicate Gram work, ~(L_t + 2·L_t·L_s)·n² flops, undercuts the feature-space work
    Σ_pairs 2·n·p·q of recomputing ⟨X_c, Y_c⟩ cross products (and n ≤ GRAM_MAX_N)."""
    if n > GRAM_MAX_N:
        return False
    lt, ls = len(teacher_widths), len(student_widths)
    gram = (lt + ls + 2 * lt * ls) * n * n
    features = 2 * n * sum(teacher_widths) * sum(student_widths)
    return gram < features


def procrustes_fast_path(spec) -> bool:
    """Whether a metric is computable from the replicate's nuclear norms by :func:`_procrustes_values`."""
    return _reads_only(spec, PROCRUSTES_PATH_STATISTICS)


def _split(specs, n: int, method: str, teacher, student):
    """(Gram-path specs, Procrustes-path specs, generic specs) for a method "auto" | "fast" | "generic"."""
    if method not in ("auto", "fast", "generic"):
        raise ValueError(f"method must be 'auto', 'fast' or 'generic', got {method!r}")
    use_gram = method == "fast" or (method == "auto" and gram_is_cheaper(
        n, [x.shape[1] for x in teacher], [y.shape[1] for y in student]))
    fast = [s for s in specs if use_gram and gram_fast_path(s)]
    # Procrustes on each replicate's distinct rows (~63 % of n) to REPLICATE_TOL; "generic" recomputes it exactly
    proc = [s for s in specs if method in ("auto", "fast") and procrustes_fast_path(s)]
    slow = [s for s in specs if s not in fast and s not in proc]
    return fast, proc, slow


class _LazyUnits(Sequence):
    """The replicate's weighted unit rows of each layer (:func:`_weighted_unit`), formed on first use only (the
    families read them for nearly identical pairs)."""

    def __init__(self, layers: list[torch.Tensor], rows: torch.Tensor, weights: torch.Tensor, n: int) -> None:
        self.layers, self.rows, self.weights, self.n = layers, rows, weights, n
        self.done: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i):
        if i not in self.done:
            self.done[i] = _weighted_unit(self.layers[i], self.rows, self.weights, self.n)
        return self.done[i]


def _weighted_unit(X: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
    """Z = √w ∘ (X[rows] − μ_w) / ‖·‖_F with μ_w = Σ w_i x_i / n: ZᵀZ' equals the centred cross product of the
    resample that holds row i w_i times, computed on the distinct rows only (~63 % of n)."""
    Xr = X.index_select(0, rows)
    mu = (weights[:, None] * Xr).sum(dim=0, keepdim=True) / n
    Z = weights.sqrt()[:, None] * (Xr - mu)
    return Z / torch.linalg.matrix_norm(Z)


#: accuracy asked of each replicate's Procrustes ρ: the nuclear norm's Gram fast path is accepted when its rounding
#: bound is below this (point estimates use 1e-9). A percentile interval from B = 200 replicates carries a Monte-Carlo
#: error of a few percent of its width, so 1e-6 on ρ leaves every reported digit unchanged while sparing the exact
#: SVD that real features (near-null directions) need for 1e-9 (its cost per replicate: benchmarks/RESULTS.md).
REPLICATE_TOL = 1e-6


def _procrustes_values(specs, teacher_units: list[torch.Tensor], student_units: list[torch.Tensor],
                       tol: float = REPLICATE_TOL):
    """ρ = ‖X̃ᵀỸ‖_* for every pair from unit-norm centred (weighted) features, then each metric's ``finalize``.

    Per teacher layer one matrix product against all student layers side by side (Ỹ_allᵀX̃_t: each pair's
    block contiguous), then the batched nuclear norms of :func:`repsim.measures.linalg.nuclear_norms` to ``tol``.
    """
    S_all = torch.cat(student_units, dim=1)
    widths = [y.shape[1] for y in student_units]
    lt, ls = len(teacher_units), len(student_units)
    rho = torch.empty(lt, ls, dtype=S_all.dtype, device=S_all.device)
    if len(set(widths)) == 1 and len({x.shape[1] for x in teacher_units}) == 1:  # all pairs in one batch
        crosses = torch.empty(lt, S_all.shape[1], teacher_units[0].shape[1], dtype=S_all.dtype, device=S_all.device)
        for i, Zt in enumerate(teacher_units):
            torch.matmul(S_all.T, Zt, out=crosses[i])  # (Σq, p): rows of student layer j are C_ijᵀ
        probe = 2 * torch.get_num_threads() if S_all.device.type == "cpu" else 0
        rho[:] = nuclear_norms(crosses.view(lt * ls, widths[0], -1), tol=tol, probe=probe).view(lt, ls)
    else:
        for i, Zt in enumerate(teacher_units):
            for j, A in enumerate(torch.split(S_all.T @ Zt, widths, dim=0)):
                rho[i, j] = nuclear_norms(A[None], tol=tol)[0]
    m = PairMoments(teacher_units[0].shape[0], nuclear=rho, rows_x=teacher_units, rows_y=student_units)
    return {s.id: s.finalize(m).cpu().numpy() for s in specs}


def resample_indices(n: int, replicates: int, seed: int = 0) -> np.ndarray:
    """(B, n) row indices drawn with replacement: the bootstrap's resamples, reproducible from ``seed``."""
    return np.random.default_rng(seed).integers(0, n, size=(replicates, n))


def permutation_indices(n: int, replicates: int, seed: int = 0) -> np.ndarray:
    """(P, n) independent random permutations of range(n), reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n) for _ in range(replicates)]) if replicates else np.zeros((0, n), int)


def _prepare(teacher_layers, student_layers, metrics: Sequence[str], method: str, device: str | None):
    """The per-comparison work shared by bootstrap and permutation: layer stacks on the device, the row count
    (checked equal on both sides), the metric specs, and their split into Gram-path, Procrustes and generic."""
    teacher, student = _as_stack(teacher_layers, device), _as_stack(student_layers, device)
    n = _check_rows(teacher, student)
    specs = _specs(metrics)
    return teacher, student, n, specs, _split(specs, n, method, teacher, student)


# ---------------------------------------------------------------------------------------------- bootstrap


def bootstrap_replicates(teacher_layers, student_layers, metrics: Sequence[str], replicates: int, *, seed: int = 0,
                         method: str = "auto", device: str | None = None,
                         progress: Progress = None) -> dict[str, np.ndarray]:
    """Metric values on B bootstrap resamples of the rows: {metric id: array (B, L_t, L_s)}.

    ``method``: "fast" (Gram-matrix gathers for Gram-Frobenius and linear CKA, weighted distinct rows for
    Procrustes), "generic" (:func:`repsim.measures.allpairs.pairwise` on the resampled rows for every metric), or
    "auto" (the Gram path when :func:`gram_is_cheaper`, the distinct-row path for Procrustes, pairwise for the
    rest). All methods use the same indices for the same seed and agree to REPLICATE_TOL (Procrustes, and the
    k-fold residual's leave-fold-out form, are computed to that accuracy per replicate, not to 1e-9).
    """
    if replicates < 1:
        raise UserError(f"`bootstrap` needs at least 1 replicate, got {replicates}")
    teacher, student, n, specs, (fast, proc, slow) = _prepare(teacher_layers, student_layers, metrics, method, device)
    idx_all = torch.as_tensor(resample_indices(n, replicates, seed), device=teacher[0].device)
    out = {s.id: np.empty((replicates, len(teacher), len(student))) for s in specs}
    if fast:
        T = torch.stack([_centred_gram(x) for x in teacher])
        S = torch.stack([_centred_gram(y) for y in student])
    for b in range(replicates):
        idx = idx_all[b]
        counts = torch.bincount(idx, minlength=n)
        rows = torch.nonzero(counts).squeeze(1)  # the distinct texts of this replicate (~63 % of n)
        w = counts.index_select(0, rows).to(torch.float64)
        if fast:
            cross, t_sq, t_tr, s_sq, s_tr = _weighted_gram_moments(T, S, rows, w, n)
            units_t, units_s = _LazyUnits(teacher, rows, w, n), _LazyUnits(student, rows, w, n)
            for s in fast:
                out[s.id][b] = _gram_values(s, cross, t_sq, t_tr, s_sq, s_tr, n, units_t, units_s)
        if proc:
            res = _procrustes_values(proc, [_weighted_unit(x, rows, w, n) for x in teacher],
                                     [_weighted_unit(y, rows, w, n) for y in student], REPLICATE_TOL)
            for s in proc:
                out[s.id][b] = res[s.id]
        if slow:
            res = _generic_values([x[idx] for x in teacher], [y[idx] for y in student], slow, REPLICATE_TOL)
            for s in slow:
                out[s.id][b] = res[s.id]
        if progress is not None:
            progress(1)
    return out


def percentile_interval(replicates: np.ndarray, alpha: float = DEFAULT_ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """The α/2 and 1−α/2 quantiles over axis 0 (percentile bootstrap interval)."""
    if not 0 < alpha < 1:
        raise UserError(f"alpha must be in (0, 1), got {alpha}")
    low, high = np.quantile(replicates, [alpha / 2, 1 - alpha / 2], axis=0)
    return low, high


def recentred_interval(replicates: np.ndarray, estimate: np.ndarray, alpha: float = DEFAULT_ALPHA,
                       value_range: tuple[float, float] = (-np.inf, np.inf)) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of the replicates shifted so that their mean sits on the estimate, clipped to the
    metric's range: [q_{α/2} − b, q_{1−α/2} − b] with b = mean(θ*) − θ̂ (the bootstrap's bias estimate)."""
    shift = replicates.mean(axis=0) - estimate
    low, high = percentile_interval(replicates, alpha)
    return np.clip(low - shift, *value_range), np.clip(high - shift, *value_range)


def bootstrap(teacher_layers, student_layers, metrics: Sequence[str], replicates: int, *, seed: int = 0,
              alpha: float = DEFAULT_ALPHA, correction: str = "recentre", observed: dict[str, np.ndarray] | None = None,
              method: str = "auto", device: str | None = None, progress: Progress = None) -> dict[str, Interval]:
    """Bootstrap intervals over texts for every metric and layer pair: {metric id: Interval}.

    ``correction="recentre"`` (default): the percentile interval of the replicates recentred on the estimate
    (:func:`recentred_interval`). Resampling with replacement duplicates texts (a replicate holds ~63 % distinct
    texts), and duplicated rows shift these high-dimensional metrics (when n is not ≫ width, e.g. 40 texts of
    width 32, the raw replicates of the Procrustes distance sit well below the estimate); the shift removes that
    artefact and keeps the bootstrap's spread. ``correction="none"``: the plain percentile interval.
    ``observed``: the point estimates when already computed (else computed here).
    """
    if correction not in ("recentre", "none"):
        raise UserError(f"unknown bootstrap correction {correction!r}: use 'recentre' or 'none'")
    reps = bootstrap_replicates(teacher_layers, student_layers, metrics, replicates, seed=seed, method=method,
                                device=device, progress=progress)
    if correction == "none":
        return {k: Interval(*percentile_interval(v, alpha), v) for k, v in reps.items()}
    specs = _specs(metrics)
    if observed is None:
        observed = _generic_values(_as_stack(teacher_layers, device), _as_stack(student_layers, device), specs)
    return {s.id: Interval(*recentred_interval(reps[s.id], np.asarray(observed[s.id]), alpha, tuple(s.range)),
                           reps[s.id]) for s in specs}


# ---------------------------------------------------------------------------------------------- permutation


def permutation_replicates(teacher_layers, student_layers, metrics: Sequence[str], replicates: int, *,
                           seed: int = 0, method: str = "auto", device: str | None = None,
                           progress: Progress = None) -> dict[str, np.ndarray]:
    """Metric values with the student's rows shuffled: {metric id: array (P, L_t, L_s)} (the null distribution)."""
    if replicates < 1:
        raise UserError(f"`permutations` needs at least 1 permutation, got {replicates}")
    teacher, student, n, specs, (fast, proc, slow) = _prepare(teacher_layers, student_layers, metrics, method, device)
    perms = torch.as_tensor(permutation_indices(n, replicates, seed), device=teacher[0].device)
    all_rows = torch.arange(n, device=teacher[0].device)
    ones = torch.ones(n, dtype=torch.float64, device=teacher[0].device)
    t_lazy = _LazyUnits(teacher, all_rows, ones, n)
    if proc:
        t_units = [_weighted_unit(x, all_rows, ones, n) for x in teacher]
        s_units = [_weighted_unit(y, all_rows, ones, n) for y in student]
    out = {s.id: np.empty((replicates, len(teacher), len(student))) for s in specs}
    if fast:
        # centring commutes with a permutation of rows, and norms/traces are permutation invariant:
        # only ⟨K_c, P L_c Pᵀ⟩ changes, one gather of the student's centred Grams per permutation.
        t_flat, t_sq, t_tr = _gram_summaries(torch.stack([_centred_gram(x) for x in teacher]))
        Sc = torch.stack([_centred_gram(y) for y in student])
        _, s_sq, s_tr = _gram_summaries(Sc)
    for b in range(replicates):
        perm = perms[b]
        if fast:
            s_flat = Sc.index_select(1, perm).index_select(2, perm).reshape(len(student), -1)
            cross = t_flat @ s_flat.T
            for s in fast:
                out[s.id][b] = _gram_values(s, cross, t_sq, t_tr, s_sq, s_tr, n, t_lazy,
                                            _LazyUnits(student, perm, ones, n))
        if proc:
            res = _procrustes_values(proc, t_units, [z.index_select(0, perm) for z in s_units], REPLICATE_TOL)
            for s in proc:
                out[s.id][b] = res[s.id]
        if slow:
            res = _generic_values(teacher, [y[perm] for y in student], slow, REPLICATE_TOL)
            for s in slow:
                out[s.id][b] = res[s.id]
        if progress is not None:
            progress(1)
    return out


def chance_level(null: dict[str, np.ndarray], count: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each cell's chance level from permutation replicates {metric id: (P, L_t, L_s)}: the mean and the standard
    deviation (ddof = 1; NaN for one permutation) of the first ``count`` replicates, {metric id: (L_t, L_s)} each.

    Permutation b of the student's rows pairs every text with another text's student features, so the mean is the
    metric's expected value for two unrelated representations with these very geometries and this n: the value a
    cell must beat to say anything about the pairing (for biased estimators at small n it is far from the
    "unrelated" end of the metric's range)."""
    if count < 1:
        raise UserError(f"chance levels need at least 1 permutation, got {count}")
    head = {k: v[:count] for k, v in null.items()}
    if any(v.shape[0] < count for v in head.values()):
        raise UserError(f"chance levels from {count} permutations, but only {min(v.shape[0] for v in null.values())} "
                        "were computed")
    mean = {k: v.mean(axis=0) for k, v in head.items()}
    sd = {k: v.std(axis=0, ddof=1) if count > 1 else np.full(v.shape[1:], np.nan) for k, v in head.items()}
    return mean, sd


def permutation_pvalue(observed: np.ndarray, null: np.ndarray, direction: str) -> np.ndarray:
    """(1 + #{null at least as similar as observed}) / (P + 1); ``direction`` "lower"/"higher" is more similar."""
    if direction not in ("lower", "higher"):
        raise ValueError(f"direction must be 'lower' or 'higher', got {direction!r}")
    # a tolerance so that exact ties (e.g. a permutation equal to the identity) count as "at least as similar"
    tol = 1e-12 * np.maximum(1.0, np.abs(observed))
    hits = null <= observed + tol if direction == "lower" else null >= observed - tol
    return (1.0 + hits.sum(axis=0)) / (null.shape[0] + 1.0)


def permutation_test(teacher_layers, student_layers, metrics: Sequence[str], replicates: int, *, seed: int = 0,
                     observed: dict[str, np.ndarray] | None = None, method: str = "auto",
                     device: str | None = None, progress: Progress = None) -> dict[str, np.ndarray]:
    """Permutation p-values (student rows shuffled) for every metric and layer pair: {metric id: (L_t, L_s)}."""
    specs = _specs(metrics)
    if observed is None:
        observed = _generic_values(_as_stack(teacher_layers, device), _as_stack(student_layers, device), specs)
    null = permutation_replicates(teacher_layers, student_layers, metrics, replicates, seed=seed, method=method,
                                  device=device, progress=progress)
    return {s.id: permutation_pvalue(np.asarray(observed[s.id]), null[s.id], s.direction) for s in specs}
