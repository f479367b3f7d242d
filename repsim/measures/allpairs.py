"""Every teacher layer against every student layer at once.

Per-layer work is done once (layers in parallel, one thread each, on a CPU): centring, scaling to unit
Frobenius norm (X̃ = X_c/‖X_c‖_F, float64), a *factor* F with the same cross products as X̃ up to an orthogonal
map, ‖X̃ᵀX̃‖²_F, squared row norms (for debiased CKA) and, for student layers when the in-sample projection
residual is asked, the right singular basis V (kept aside, or the factor rotated to F = X̃V = U diag(σ)).

- primal (n ≥ width): F = X̃ (n × width).
- dual (n < width): F = X̃Q (n × n) with Q an orthonormal basis of X̃'s row space: F = Rᵀ from the QR
  factorisation X̃ᵀ = QR, or F = U S from X̃ = U S Vᵀ where the singular values are needed. Then F_tᵀF_s =
  Q_tᵀ(X̃_tᵀỸ_s)Q_s has the same singular values and Frobenius norm as X̃_tᵀỸ_s, so every linear metric is
  unchanged while the pair work drops from n·p·q to n³.
- kernel form: when the only pair statistic asked is ‖X̃_tᵀỸ_s‖²_F (linear CKA, Gram-Frobenius) and the n × n
  kernels K = X̃X̃ᵀ cost fewer multiply-adds than the factors' cross products and fit the memory budget (a few
  hundred to a few thousand rows on the usual widths; ``_kernel_form``), it is ⟨K_t, K_s⟩: one ``syrk`` per
  layer and one (L_t × n²)·(n² × L_s) GEMM for all pairs, with ‖X̃ᵀX̃‖²_F = ‖K‖²_F.

Pair work is batched: the factors of each side are stored side by side, (n, Σr), and a chunk of teacher layers ×
a chunk of student layers is one GEMM, C = F_chunkᵀ G_chunk, whose (t, s) blocks are the pair cross products
(used as strided views, not copied). From the blocks (all on ``device``) come the batched statistics the
requested families read (``Family.needs``), for all pairs at once:

- ``nuclear``: ‖C_ts‖_* (σ = √eig of the small Gram CᵀC by batched eigenvalues where a rounding bound shows it
  exact to ``tol`` = 1e-9, else singular values; see repsim.measures.linalg.nuclear_norms),
- ``cross_sq``: ‖C_ts‖²_F; ``self_sq``: ‖X̃ᵀX̃‖²_F per layer; ``debiasing``: Σ‖x̃_i‖⁴ and a_tᵀb_s (a = squared
  row norms),
- ``explained`` (in-sample projection residual): Σ_k w_k ‖C_ts v_k‖² over the student's singular pairs (σ_k, v_k),
  w_k = 1/σ_k² above numpy's lstsq cutoff (with ridge λ: (σ_k² + 2λ)/(σ_k² + λ)²), read off CᵀC as
  ⟨CᵀC, V diag(w) Vᵀ⟩,

and each metric is its family's ``finalize`` (repsim.measures.families) on them, with every layer's factor as
its rows, so nearly identical pairs are recomputed from the rows exactly as the in-memory function does.

Memory: one float64 copy of the inputs plus about 3·(chunk pairs)·r_t·r_s·8 bytes; ``chunk_size`` (pairs per
chunk) is chosen from a budget (1 GiB on CPU, a quarter of free memory on CUDA) when not given. For 48 × 48 layers
of width 4096 (n ≥ 4096) one pair block is 128 MiB, so the CPU budget gives 2 pairs per chunk.

The k-fold held-out projection residual (``projection_residual[folds=K]``, the default) is, where cheaper and
within the memory budget, one n × n matrix per layer and an n² inner product per pair (the leave-fold-out
identity, ``_held_out_residual_dual``); otherwise the rows are stored in fold order and every fold's training fit
is derived from full-data sums minus the fold's own, in the student's singular basis (``_held_out_residual``): all
folds cost one n × r_s × Σp product per student layer, and no training rows are copied. Memory, every path: the
float64 factors (one copy of the inputs) plus the chunk budget. Other metrics that need the rows (RBF CKA, the
moment estimator of ρ) go through their family's ``layer_state``/``pair_values`` on the original inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from repsim.measures.arrays import (
    as_matrix,
    check_spread,
    power_of_two_exponent,
    safe_squares,
    scale_by_power_of_two,
    zero_variance_error,
)
from repsim.measures.families.projection_residual import fold_assignment
from repsim.measures.linalg import eigh, layer_parallel, least_squares_gains, lstsq_cutoff, nuclear_norms
from repsim.measures.registry import DEFAULT_METRICS, PairMoments, get_metric
from repsim.system.errors import UserError
from repsim.system.threads import blas_threads

CPU_CHUNK_BUDGET_BYTES = 1 << 30


@dataclass
class _Side:
    """Prepared layers of one side: factors side by side and per-layer scalars."""

    factors: torch.Tensor  # (n, Σ r_l)
    ranks: list[int]  # r_l: columns of each layer's factor
    widths: list[int]  # original widths
    gram_sq: torch.Tensor  # (L,) ‖X̃ᵀX̃‖²_F (NaN where not computed)
    row_sq: torch.Tensor | None  # (L, n) squared row norms of X̃ (debiased CKA only)
    singular: list[torch.Tensor] | None  # per layer σ (in-sample projection residual only)
    bases: list[torch.Tensor | None] | None  # per layer V when the factor is X̃ itself, None when it is X̃V

    def layer_slice(self, lo: int, hi: int) -> tuple[int, int]:
        start = sum(self.ranks[:lo])
        return start, start + sum(self.ranks[lo:hi])

    def segments(self, lo: int, hi: int) -> torch.Tensor:
        """Layer index (lo … hi−1) of each factor column of layers lo … hi−1."""
        return torch.repeat_interleave(torch.arange(lo, hi, device=self.factors.device),
                                       torch.tensor(self.ranks[lo:hi], device=self.factors.device))


def _as_layers(layers: Any, name: str) -> list[Any]:
    if isinstance(layers, (np.ndarray, torch.Tensor)):
        if layers.ndim != 3:
            raise UserError(f"{name} must be a sequence of (n, width) arrays or one (layers, n, width) array, "
                            f"got an array of shape {tuple(layers.shape)}")
        return list(layers)
    try:
        out = list(layers)
    except TypeError as exc:
        raise UserError(f"{name} must be a sequence of (n, width) arrays, got {type(layers).__name__}") from exc
    if not out:
        raise UserError(f"{name} is empty: need at least one layer")
    return out


def _centre_rows(x: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None,
                 exponent: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(X·2^−exponent − 1μᵀ in ``dtype``, n‖μ‖²), μ accumulated in ``dtype``, written into ``out`` when given (no
    temporary). The power-of-two factor is exact (see repsim.measures.arrays)."""
    n = x.shape[0]
    if exponent:
        x = scale_by_power_of_two(x, -exponent, out=out if out is not None else
                                  torch.empty(x.shape, dtype=dtype, device=x.device))
        mean = x.mean(dim=0, keepdim=True)
        return x.sub_(mean), n * mean.square().sum()
    if x.dtype == dtype and n > 1:  # the column means as one matrix-vector product
        mean = (x.T @ torch.ones(n, dtype=dtype, device=x.device))[None, :] / n
    else:
        mean = x.mean(dim=0, keepdim=True, dtype=dtype)
    return torch.sub(x, mean, out=out), n * mean.square().sum()


def _unit_scale(xc: torch.Tensor, centred_sq: torch.Tensor, offset_sq: torch.Tensor, x: torch.Tensor, name: str,
                rescaled: bool) -> bool:
    """Divide the centred ``xc`` by ‖X_c‖_F (``centred_sq`` = ‖X_c‖²_F) in place and return True; or return False
    when its squares were computed outside the safe range (``rescaled`` False): the caller then redoes the layer
    divided by a power of two. Raises for NaN or inf in ``x`` and for zero variance (relative rule of
    repsim.measures.arrays)."""
    c, o = float(centred_sq), float(offset_sq)
    if not math.isfinite(c + o) and not bool(torch.isfinite(x).all()):
        raise UserError(f"{name} contains NaN or inf")
    if not rescaled and not safe_squares(c, o, xc.numel()):
        return False
    check_spread(c, o, x.shape[0], xc.dtype, name)
    xc.div_(math.sqrt(c))
    return True


def _prepare_layer(x: torch.Tensor, name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """X̃ = X_c/‖X_c‖_F (centred, unit Frobenius norm) in ``dtype``, for data anywhere in the float range."""
    xc, offset = _centre_rows(x, dtype)
    if _unit_scale(xc, torch.linalg.vector_norm(xc) ** 2, offset, x, name, rescaled=False):
        return xc
    xc, offset = _centre_rows(x, dtype, exponent=_exponent(x, name))
    _unit_scale(xc, torch.linalg.vector_norm(xc) ** 2, offset, x, name, rescaled=True)
    return xc


def _gather_rows(x: torch.Tensor, rows: torch.Tensor, out: torch.Tensor, exponent: int = 0) -> None:
    """out = x[rows]·2^−exponent (in out's dtype), a block of rows at a time: no full-size temporary."""
    step = max(1, (1 << 22) // max(1, x.shape[1]))
    for lo in range(0, rows.shape[0], step):
        block = x.index_select(0, rows[lo:lo + step])
        if exponent:
            scale_by_power_of_two(block, -exponent, out=out[lo:lo + step])
        else:
            out[lo:lo + step].copy_(block)


def _exponent(x: torch.Tensor, name: str) -> int:
    """The power-of-two exponent of max|x| (repsim.measures.arrays.power_of_two_exponent); all zeros is zero
    variance."""
    exponent = power_of_two_exponent(x)
    if exponent is None:
        raise zero_variance_error(name, x.shape[0], torch.float64)
    return exponent


def _prepare_side(layers: list[torch.Tensor], name: str, dtype: torch.dtype, device: torch.device, *,
                  singular: str = "none", gram: bool = True, row_sq: bool = False,
                  rows: torch.Tensor | None = None, dual: bool = True) -> _Side:
    """Factors of one side, each layer centred and scaled in place in its slice of one (n, Σ r) buffer.

    ``singular`` (what the in-sample projection residual needs of the student): "none"; "rotate": express each
    factor in its right singular basis, F = X̃V = U diag(σ), so that the pair products F_tᵀF_s have columns
    C_ts v_k; "basis": keep F = X̃ and record V (the residual is then read off the pair's CᵀC, see
    ``_uniform_pairs``), except for layers whose Gram is too ill-conditioned for its eigenvectors (rotated from an
    SVD instead). ``gram``: compute ‖X̃ᵀX̃‖²_F (else NaN); ``row_sq``: squared row norms (debiased CKA).
    ``rows``: store the rows in this order (the held-out residual's folds as contiguous blocks; every other linear
    metric is unchanged by a common row permutation), gathered block by block into the buffer (no layer copy).
    Where the width × width Gram G = X_cᵀX_c is formed, ‖X_c‖²_F is read off as tr G (no extra pass).
    ``dual``: a layer wider than n gets an n-column factor (see the module docstring): F = U diag(σ) when
    ``singular`` asks for σ, else F = Rᵀ from the QR factorisation X̃ᵀ = QR (F = X̃Q, Q an orthonormal basis of
    X̃'s row space: the same cross products up to an orthogonal map, for a fraction of an SVD's cost). With
    ``dual`` False every factor is X̃ itself (for the n × n kernel form, which never multiplies factors).
    On a CPU with several torch threads the layers are prepared concurrently, one thread each
    (``layer_parallel``): centring is memory bound and ``syrk``/``syevd`` scale poorly with BLAS threads.
    """
    n = layers[0].shape[0]
    widths = [x.shape[1] for x in layers]
    ranks = [min(n, w) if dual else w for w in widths]
    factors = torch.empty(n, sum(ranks), dtype=dtype, device=device)
    starts = np.concatenate([[0], np.cumsum(ranks)]).tolist()

    def one(i: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        x = layers[i].to(device=device)  # converted to ``dtype`` by the centring, which writes into the buffer
        label = f"{name} layer {i}"
        out = factors[:, starts[i]:starts[i + 1]]
        s = v = None

        def centred(src: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None, exponent: int = 0):
            if rows is None or out is None:
                return _centre_rows(src, dtype, out=out, exponent=exponent)
            _gather_rows(src, rows, out, exponent)  # out = X[rows]·2^−exponent in ``dtype``
            return _centre_rows(out, dtype, out=out)

        wide = dual and x.shape[1] > n
        if rows is not None and wide:  # few rows: a copy in the new order is small
            x = x.index_select(0, rows)
        if wide and singular != "none":  # F = U S, n columns (already the rotated form)
            xp = _prepare_layer(x, label, dtype=dtype)
            u, s, _ = torch.linalg.svd(xp, full_matrices=False)
            out.copy_(u * s)
            g_sq = (s ** 4).sum()
        elif wide:  # F = Rᵀ, X̃ᵀ = QR
            xp = _prepare_layer(x, label, dtype=dtype)
            out.copy_(torch.linalg.qr(xp.T, mode="r").R.T)
            g_sq = torch.linalg.matrix_norm(_column_gram(out)) ** 2 if gram else torch.tensor(float("nan"),
                                                                                               dtype=dtype)
        elif singular != "none" or gram:
            xp, offset = centred(x, dtype, out=out)
            g = _column_gram(xp)
            total = torch.diagonal(g).sum()
            if not _unit_scale(xp, total, offset, x, label, rescaled=False):  # outside the safe range: redo
                xp, offset = centred(x, dtype, out=out, exponent=_exponent(x, label))
                g = _column_gram(xp)
                total = torch.diagonal(g).sum()
                _unit_scale(xp, total, offset, x, label, rescaled=True)
            g /= total
            if singular != "none":
                s, v, from_gram = _right_singular(xp, g)
                if singular == "rotate" or not from_gram:
                    out.copy_(xp @ v)
                    v = None
            g_sq = torch.linalg.matrix_norm(g) ** 2
        else:
            xp, offset = centred(x, dtype, out=out)
            if not _unit_scale(xp, torch.linalg.vector_norm(xp) ** 2, offset, x, label, rescaled=False):
                xp, offset = centred(x, dtype, out=out, exponent=_exponent(x, label))
                _unit_scale(xp, torch.linalg.vector_norm(xp) ** 2, offset, x, label, rescaled=True)
            g_sq = torch.tensor(float("nan"), dtype=dtype)
        return g_sq, (xp * xp).sum(dim=1) if row_sq else None, s, v

    with layer_parallel(device, len(layers)) as pool:
        done = list(pool.map(one, range(len(layers)))) if pool is not None else [one(i) for i in range(len(layers))]
    gram_sq = torch.stack([d[0].to(device) for d in done])
    rows = torch.stack([d[1] for d in done]) if row_sq else None
    sing = [d[2] for d in done] if singular != "none" else None
    bases = [d[3] for d in done] if singular != "none" else None
    return _Side(factors, ranks, widths, gram_sq, rows, sing, bases)


def _column_gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀx (width × width). On the CPU by numpy's matmul, which computes xᵀx with BLAS ``syrk`` (half the
    flops of a GEMM, faster than torch's GEMM; benchmarks/RESULTS.md times the all-pairs path), with
    as many BLAS threads as torch uses."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        a = x.detach().numpy()
        # data outside the safe range may overflow here: the caller sees it in the trace and rescales
        with blas_threads(torch.get_num_threads()), np.errstate(over="ignore", invalid="ignore"):
            return torch.from_numpy(a.T @ a)
    return x.T @ x


def _right_singular(x: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(σ, V, from_gram) of x = U diag(σ) Vᵀ (n ≥ width), σ descending, given its Gram xᵀx.

    From the eigendecomposition of the Gram (``from_gram`` True) when it is well conditioned: every
    eigenvalue ≥ 1e-6·λ_max, so σ_k² carries a relative error ≤ ~1e-10 although the Gram squares the condition
    number. Otherwise from the SVD of the R factor of x = QR, accurate for any conditioning.
    """
    lam, v = eigh(gram)
    if bool(lam[0] >= 1e-6 * lam[-1]):
        return torch.sqrt(lam).flip(0), v.flip(1), True
    _, s, vh = torch.linalg.svd(torch.linalg.qr(x, mode="r").R, full_matrices=False)
    return s, vh.T, False


def _in_sample_weights(s: torch.Tensor, ridge: float, rows: int, width: int) -> torch.Tensor:
    """Weight of ‖C v_k‖² in the explained part of the in-sample fit: 2·s·g − s²·g² divided by s² (see module)."""
    g = least_squares_gains(s, ridge, rows, width)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.where(s > 0, (2 * g / safe - g * g), torch.zeros_like(s))


def _choose_chunk(ranks_t: list[int], ranks_s: list[int], device: torch.device,
                  chunk_size: int | None) -> tuple[int, int]:
    """(teacher layers, student layers) per chunk: the largest chunk whose pair blocks fit the memory budget."""
    lt, ls = len(ranks_t), len(ranks_s)
    if chunk_size is None:
        budget = _memory_budget(device)
        pair_bytes = 3 * 8 * max(ranks_t) * max(ranks_s)
        chunk_size = max(1, budget // pair_bytes)
    if chunk_size < 1:
        raise UserError(f"chunk_size must be ≥ 1 (layer pairs per chunk), got {chunk_size}")
    cs = min(ls, chunk_size)
    ct = min(lt, max(1, chunk_size // cs))
    return ct, cs


def pairwise(
    teacher_layers: Any,
    student_layers: Any,
    metrics: Sequence[str] | str | None = None,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
    dtype: torch.dtype = torch.float64,
    tol: float = 1e-9,
) -> dict[str, np.ndarray]:
    """All teacher × student layer pairs: ``{canonical metric id: (Lt, Ls) float64 ndarray}``.

    Args:
        teacher_layers: sequence of (n, p_t) arrays/tensors or one (Lt, n, p) array; rows paired across all
            layers of both sides.
        student_layers: sequence of (n, q_s) arrays/tensors or one (Ls, n, q) array.
        metrics: metric ids (any spelling ``repsim.measures.functions.get_metric`` accepts); default
            ``repsim.measures.registry.DEFAULT_METRICS``.
        device: where to compute (e.g. "cuda"); default: the inputs' GPU, else CUDA when available, else CPU.
        chunk_size: layer pairs per batched GEMM; chosen from a memory budget when omitted.
        dtype: compute dtype (float64 by default).
        tol: accuracy asked of every value, relative to its scale (1e-9: the exact values the tests check).
            Larger values let cheaper forms through: the nuclear norm's Gram fast path when its rounding bound is
            below ``tol``, and the leave-fold-out held-out residual whenever every training fit provably keeps
            the same directions (margin 1 instead of 10³ over numpy's lstsq cutoff). The bootstrap passes 1e-6.
    Returns:
        value[t, s] = metric(teacher_layers[t], student_layers[s]) exactly as the in-memory function defines it.
    """
    if metrics is None:
        metrics = DEFAULT_METRICS
    if isinstance(metrics, str):
        metrics = [metrics]
    specs = []
    for m in metrics:
        spec = get_metric(m)
        if spec.id not in {s.id for s in specs}:
            specs.append(spec)
    if not specs:
        raise UserError("no metrics requested")

    t_raw, s_raw = _as_layers(teacher_layers, "teacher_layers"), _as_layers(student_layers, "student_layers")
    if device is None:  # the inputs' GPU, else a GPU when one is present, else the CPU
        first = t_raw[0]
        if isinstance(first, torch.Tensor) and first.device.type != "cpu":
            device = first.device
        else:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was requested but CUDA is not available")
    # finiteness is checked where the layers are centred (one pass fewer over the data); pairwise is not
    # differentiable, so tensors that require grad are read through detached views (repsim.measures.losses has
    # gradients)
    t_in = [as_matrix(x, f"teacher layer {i}", dtype=None, check_finite=False).detach() for i, x in enumerate(t_raw)]
    s_in = [as_matrix(y, f"student layer {i}", dtype=None, check_finite=False).detach() for i, y in enumerate(s_raw)]
    rows = {x.shape[0] for x in t_in} | {y.shape[0] for y in s_in}
    if len(rows) != 1:
        raise UserError(f"all teacher and student layers must have the same number of rows (paired samples), "
                        f"got {sorted(rows)}")
    n = rows.pop()
    if n < 2:
        raise UserError(f"need at least 2 samples (rows), got {n}")

    # moments metrics, and the held-out residual (its own batched form), in one batched pass; other rows metrics
    # through their family's per-layer hooks
    linear = [s for s in specs if s.linear or (s.family == "projection_residual" and s.kwargs.get("folds")
                                               and s.kwargs.get("ridge") != "auto" and not s.kwargs.get("reverse"))]
    other = [s for s in specs if s not in linear]
    out: dict[str, np.ndarray] = {}
    if linear:
        out.update(_linear_pairwise(t_in, s_in, linear, device, chunk_size, dtype, tol))
    for spec in other:  # metrics that need the rows: their family's per-layer state and batched pair values
        fam, kw = spec.family_object, dict(spec.kwargs)
        states_t = [fam.layer_state(x.to(device=device, dtype=dtype), **kw) for x in t_in]
        states_s = [fam.layer_state(y.to(device=device, dtype=dtype), **kw) for y in s_in]
        out[spec.id] = fam.pair_values(states_t, states_s, **kw).detach().cpu().double().numpy()
    return {s.id: out[s.id] for s in specs}


def _memory_budget(device: torch.device) -> int:
    """Bytes pairwise may hold in working buffers: 1 GiB on the CPU, a quarter of free memory on CUDA."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    return CPU_CHUNK_BUDGET_BYTES


def _linear_pairwise(t_in: list[torch.Tensor], s_in: list[torch.Tensor], specs: list, device: torch.device,
                     chunk_size: int | None, dtype: torch.dtype, tol: float = 1e-9) -> dict[str, np.ndarray]:
    n = t_in[0].shape[0]
    for spec in specs:
        need = spec.family_object.min_rows(**spec.kwargs)
        if n < need:
            raise UserError(f"{spec.id} needs at least {need} samples (rows), got {n}")
    held_out = [s for s in specs if not s.linear]  # the held-out residual: its own batched form below
    needs = {s.id: s.family_object.needs(**s.kwargs) for s in specs if s.linear}
    uses = frozenset().union(*needs.values())
    in_sample = [s for s in specs if s.linear and "explained" in needs[s.id]]
    need_debiased = "debiasing" in uses
    need_gram = "self_sq" in uses
    need_nuclear = "nuclear" in uses
    ranks_t, ranks_s = [min(n, x.shape[1]) for x in t_in], [min(n, y.shape[1]) for y in s_in]
    uniform_pairs = len(set(ranks_t)) == 1 and len(set(ranks_s)) == 1  # every pair block has one shape
    # in-sample residual: read off each pair's CᵀC when the nuclear-norm pass forms it (uniform, r ≥ q), else rotate
    gram_formed = uniform_pairs and ranks_t[0] >= ranks_s[0] and need_nuclear
    singular = "none" if not in_sample else ("basis" if gram_formed else "rotate")
    fold_counts = [int(dict(s.kwargs)["folds"]) for s in held_out]
    dual = bool(held_out) and _dual_held_out_fits(n, ranks_t, ranks_s, fold_counts, device)
    rows = order = None
    if held_out and not dual:  # the primal form: student factors in their singular basis, rows in fold order
        singular = "rotate"
        order = np.argsort(fold_assignment(n, fold_counts[0], 0), kind="stable")
        rows = torch.as_tensor(order, device=device)
    # CKA and Gram-Frobenius alone (no nuclear norm, no in-sample residual) need of each pair only ‖X̃_tᵀỸ_s‖²_F
    kernel_form = ("cross_sq" in uses and uses <= {"cross_sq", "self_sq", "debiasing"}
                   and _kernel_form(n, [x.shape[1] for x in t_in], [y.shape[1] for y in s_in], device, dual))
    teacher = _prepare_side(t_in, "teacher", dtype, device, gram=need_gram and not dual and not kernel_form,
                            row_sq=need_debiased, rows=rows, dual=not kernel_form)
    student = _prepare_side(s_in, "student", dtype, device, singular=singular, gram=need_gram and not kernel_form,
                            row_sq=need_debiased, rows=rows, dual=not kernel_form or singular != "none")
    lt, ls = len(t_in), len(s_in)
    held: dict[str, torch.Tensor] = {}
    cross_sq = torch.empty(lt, ls, dtype=dtype, device=device)
    kernels = None
    if dual:
        kernels = _layer_kernels(teacher, 0, lt)
        teacher.gram_sq = kernels.flatten(1).square().sum(dim=1)  # ‖X̃ᵀX̃‖²_F = ‖X̃X̃ᵀ‖²_F
    if kernel_form:  # ‖X̃_tᵀỸ_s‖²_F = ⟨X̃_tX̃_tᵀ, Ỹ_sỸ_sᵀ⟩: one GEMM over the n² entries (teacher kernels in chunks)
        k_s = _layer_kernels(student, 0, ls).flatten(1)
        student.gram_sq = k_s.square().sum(dim=1)
        step = lt if kernels is not None else max(1, _memory_budget(device) // (8 * n * n) - ls)
        for t0 in range(0, lt, step):
            t1 = min(lt, t0 + step)
            k_t = (kernels if kernels is not None else _layer_kernels(teacher, t0, t1)).flatten(1)
            cross_sq[t0:t1] = k_t @ k_s.T
            if kernels is None:
                teacher.gram_sq[t0:t1] = k_t.square().sum(dim=1)
        del k_s, k_t
    if dual:
        for spec in held_out:
            kw = dict(spec.kwargs)
            held[spec.id] = _held_out_residual_dual(kernels, teacher, student, int(kw["folds"]),
                                                    float(kw.get("ridge") or 0.0), device,
                                                    margin=1e3 if tol <= 1e-9 else 1.0)
        del kernels
    nuclear = torch.empty(lt, ls, dtype=dtype, device=device) if need_nuclear else None
    weights = {spec.id: [_in_sample_weights(sv, float(dict(spec.kwargs).get("ridge") or 0.0), n, w)
                         for sv, w in zip(student.singular, student.widths, strict=True)]
               for spec in in_sample}
    if singular == "basis":  # M = V diag(w) Vᵀ (diag(w) for layers whose factor was rotated)
        weights = {sid: torch.stack([torch.diag(w) if v is None else (v * w) @ v.T
                                     for w, v in zip(ws, student.bases, strict=True)])
                   for sid, ws in weights.items()}
    explained = {sid: torch.empty(lt, ls, dtype=dtype, device=device) for sid in weights}
    need_pairs = not kernel_form and (bool(uses - {"explained"}) or bool(in_sample))
    ct, cs = _choose_chunk(teacher.ranks, student.ranks, device, chunk_size) if need_pairs else (lt, ls)
    for t0 in range(0, lt, ct) if need_pairs else ():
        t1 = min(lt, t0 + ct)
        a0, a1 = teacher.layer_slice(t0, t1)
        for s0 in range(0, ls, cs):
            s1 = min(ls, s0 + cs)
            b0, b1 = student.layer_slice(s0, s1)
            block = teacher.factors[:, a0:a1].T @ student.factors[:, b0:b1]  # one GEMM for the chunk
            if uniform_pairs:  # pair (t, s) is the strided block view C_ts
                _uniform_pairs(block.view(t1 - t0, ranks_t[0], s1 - s0, ranks_s[0]).transpose(1, 2), (t0, s0),
                               cross_sq, nuclear, weights, explained, tol)
            else:
                _mixed_pairs(block, teacher.ranks[t0:t1], student.ranks[s0:s1], (t0, s0), cross_sq, nuclear,
                             weights, explained, tol)
    rows_t = [teacher.factors[:, slice(*teacher.layer_slice(t, t + 1))] for t in range(lt)]
    rows_s = [student.factors[:, slice(*student.layer_slice(j, j + 1))] for j in range(ls)]
    debias = {}
    if need_debiased:
        debias = {"quart_x": (teacher.row_sq ** 2).sum(dim=1)[:, None], "quart_y": (student.row_sq ** 2).sum(dim=1),
                  "s_ab": teacher.row_sq @ student.row_sq.T}
    out: dict[str, torch.Tensor] = {}
    for spec in specs:
        kw = dict(spec.kwargs)
        if spec in held_out:  # the n × n form computed above, else the primal form on fold-ordered rows
            if spec.id not in held:
                held[spec.id] = _held_out_residual(
                    teacher, student, _Folds(fold_assignment(n, int(kw["folds"]), 0)[order], device),
                    float(kw.get("ridge") or 0.0), device, margin=1e3 if tol <= 1e-9 else 1.0)
            out[spec.id] = held[spec.id]
            continue
        m = PairMoments(n, nuclear=nuclear, cross_sq=cross_sq,
                        self_sq_x=teacher.gram_sq[:, None] if need_gram else None,
                        self_sq_y=student.gram_sq if need_gram else None,
                        rows_x=rows_t, rows_y=rows_s, explained=explained.get(spec.id), **debias)
        out[spec.id] = spec.family_object.finalize(m, **kw)
    return {k: v.detach().cpu().double().numpy() for k, v in out.items()}


def _uniform_pairs(c: torch.Tensor, origin: tuple[int, int], cross_sq: torch.Tensor, nuclear: torch.Tensor | None,
                   weights: dict[str, Any], explained: dict[str, torch.Tensor], tol: float = 1e-9) -> None:
    """Per-pair reductions of a chunk of equal-shape pairs: ``c`` (ct, cs, r, q), a strided view of the chunk's
    cross-product block, c[t, s] = C_ts.

    In-sample projection residual: the explained part is Σ_k w_k ‖C v_k‖² over the student's right singular
    pairs. ``weights[sid]`` is either a list of vectors w (student factors rotated, F = X̃V: C v_k is column k
    of C, so the sum weighs its squared column norms) or a stack of matrices M = V diag(w) Vᵀ (factors not
    rotated: the sum is ⟨CᵀC, M⟩, with CᵀC the Gram the nuclear norm forms (set up only when q ≤ r)."""
    t0, s0 = origin
    ct, cs, r, q = c.shape
    gram = None
    if nuclear is not None:
        need_gram = any(isinstance(w, torch.Tensor) for w in weights.values())
        probe = 2 * torch.get_num_threads() if c.device.type == "cpu" else 0
        res = nuclear_norms(c, with_gram=need_gram, probe=probe, tol=tol)
        norms, gram = res if need_gram else (res, None)
        nuclear[t0:t0 + ct, s0:s0 + cs] = norms
    if gram is not None and q <= r:  # CᵀC: its diagonal holds the squared column norms of C
        col_sq = torch.diagonal(gram, dim1=-2, dim2=-1)
    else:
        col_sq = torch.stack([torch.linalg.vector_norm(c[i], dim=-2) for i in range(ct)]).square()
    cross_sq[t0:t0 + ct, s0:s0 + cs] = col_sq.sum(dim=-1)
    for sid, w in weights.items():
        if isinstance(w, torch.Tensor):  # matrices M (only set up when CᵀC is formed: Procrustes, q ≤ r)
            g = gram.reshape(ct, cs, q * q)
            for j in range(cs):  # ⟨CᵀC, M⟩ for one student layer and all teacher layers: one GEMV
                explained[sid][t0:t0 + ct, s0 + j] = g[:, j] @ w[s0 + j].reshape(-1)
        else:
            for j in range(cs):
                explained[sid][t0:t0 + ct, s0 + j] = col_sq[:, j] @ w[s0 + j]


def _mixed_pairs(block: torch.Tensor, ranks_t: list[int], ranks_s: list[int], origin: tuple[int, int],
                 cross_sq: torch.Tensor, nuclear: torch.Tensor | None, weights: dict[str, Any],
                 explained: dict[str, torch.Tensor], tol: float = 1e-9) -> None:
    """Per-pair reductions of one chunk's cross-product block C (rows: teacher factors, columns: student
    factors) when layer widths differ; the student factors are rotated (weights are vectors, see
    ``_uniform_pairs``)."""
    t0, s0 = origin
    for i, row in enumerate(block.split(ranks_t, dim=0)):
        for j, c in enumerate(row.split(ranks_s, dim=1)):
            col_sq = (c * c).sum(dim=0)
            cross_sq[t0 + i, s0 + j] = col_sq.sum()
            if nuclear is not None:
                nuclear[t0 + i, s0 + j] = nuclear_norms(c[None], tol=tol)[0]  # type: ignore[index]
            for sid, w in weights.items():
                explained[sid][t0 + i, s0 + j] = col_sq @ w[s0 + j]


class _Folds:
    """The held-out residual's folds on the stored rows: fold k's test rows are the block ``bounds[k]:bounds[k+1]``
    when the rows are stored in fold order (``contiguous``), else the index list ``members[k]``."""

    def __init__(self, fold_of_row: np.ndarray, device: torch.device):
        self.k = int(fold_of_row.max()) + 1
        self.n = fold_of_row.shape[0]
        self.sizes = np.bincount(fold_of_row, minlength=self.k).tolist()
        self.contiguous = bool(np.all(np.diff(fold_of_row) >= 0))
        self.bounds = np.concatenate([[0], np.cumsum(self.sizes)]).tolist()
        self.members = None if self.contiguous else [
            torch.as_tensor(np.flatnonzero(fold_of_row == f), device=device) for f in range(self.k)]

    def test(self, m: torch.Tensor, fold: int) -> torch.Tensor:
        """Fold ``fold``'s rows of ``m``: a view for contiguous folds, else a gathered copy."""
        if self.contiguous:
            return m[self.bounds[fold]:self.bounds[fold + 1]]
        return m.index_select(0, self.members[fold])

    def train(self, m: torch.Tensor, fold: int) -> torch.Tensor:
        """The other folds' rows of ``m`` (a copy: used only for one student layer's fold-by-fold fallback)."""
        keep = torch.ones(self.n, dtype=torch.bool, device=m.device)
        if self.contiguous:
            keep[self.bounds[fold]:self.bounds[fold + 1]] = False
        else:
            keep[self.members[fold]] = False
        return m[keep]


def _held_out_residual(teacher: _Side, student: _Side, folds: _Folds, ridge: float, device: torch.device,
                       margin: float = 1e3) -> torch.Tensor:
    """k-fold held-out residual of all pairs, exactly as ``repsim.measures.functions.projection_residual(folds=k)``,
    from
    per-fold sums of the full-data factors (no training-row copies). Returns (Lt, Ls).

    Student layer j's factor is G = U diag(s) (rotated, see ``_prepare_side``), so U = G diag(1/s) column by
    column, exactly. In U's coordinates the training fit of fold k, with an intercept (train rows re-centred by
    their means; the full data are centred, so a training mean is −(test sum)/n_tr), needs only
        M_k = I − U_TᵀU_T − s_U s_Uᵀ/n_tr   (the centred training Gram of U; + λ diag(1/s²) with a ridge λ),
        D_k = (UᵀF − U_TᵀF_T) − s_U s_Fᵀ/n_tr   (the centred training cross-product with the teacher factors F),
    with s_U, s_F the test-row sums: W = M_k⁻¹D_k is the fit in U's coordinates (the ridge penalty λ‖·‖² on the
    unit-norm data becomes λ diag(1/s²) there). U_TᵀF_T is one GEMM over the fold's test rows, and UᵀF = Σ_k of
    them, so all folds together cost one n × r × Σp product per student layer, the size of the linear metrics'
    cross products. The test error per teacher column is ‖A − BW‖² with A = F_T + 1s_Fᵀ/n_tr, B = U_T + 1s_Uᵀ/n_tr,
    expanded as ‖A‖² − 2⟨BᵀA, W⟩ + ⟨W, BᵀBW⟩; a teacher layer whose error is below 1e-2·‖A‖² (digits lost to
    cancellation) is recomputed from the rows, E = A − BW.

    Working in U's coordinates is what the fold-by-fold SVDs compute, provided every training fit keeps the same
    directions: λ = 0 keeps U's columns with s above 10⁻³ × numpy's lstsq cutoff (eps·max(n − min fold, q)·s_max)
    and requires, as the n × n form does, s_min²·λ_min(M_k) > (margin·cutoff_k)² and λ_min(M_k) ≥
    MIN_LEAVE_OUT_EIGENVALUE (so M_k is well conditioned). A student layer failing that is fitted fold by fold
    from the SVD of its training rows (one layer's rows at a time; the teacher enters only through UᵀF sums).
    """
    n = teacher.factors.shape[0]
    dtype = teacher.factors.dtype
    lt, ls, k = len(teacher.ranks), len(student.ranks), folds.k
    seg_t = teacher.segments(0, lt)
    F = teacher.factors
    # per-fold teacher sums and squared column norms over the test rows (k × Σp each), a column block at a time
    f_sum = torch.empty(k, F.shape[1], dtype=dtype, device=device)
    f_sq = torch.empty_like(f_sum)
    for f in range(k):
        for lo in range(0, F.shape[1], 1024):
            block = folds.test(F[:, lo:lo + 1024], f)
            f_sum[f, lo:lo + 1024] = block.sum(dim=0)
            f_sq[f, lo:lo + 1024] = block.square().sum(dim=0)
    out = torch.zeros(lt, ls, dtype=dtype, device=device)
    workers = min(torch.get_num_threads(), ls) if device.type == "cpu" else 1
    budget = _memory_budget(device) // max(1, workers)

    def chunks(r: int) -> list[tuple[int, int]]:
        """Teacher layer ranges whose working matrices (k + 7 of r × width) fit one worker's budget, less the
        student layer's test rows in its singular basis (n × r, kept across chunks)."""
        room = max(budget - 8 * n * r, budget // 4)
        per_col = 8 * r * (k + 7) + 8 * max(folds.sizes) * (0 if folds.contiguous else 1)
        out_ranges, lo = [], 0
        while lo < lt:
            hi = lo + 1
            while hi < lt and per_col * (teacher.layer_slice(lo, hi + 1)[1] - teacher.layer_slice(lo, hi + 1)[0]) \
                    <= room:
                hi += 1
            out_ranges.append((lo, hi))
            lo = hi
        return out_ranges

    def certified(j: int):
        """(kept columns, s, [per fold: (U_T, s_U, M_k factor)]) or None where the certificate fails."""
        b0, b1 = student.layer_slice(j, j + 1)
        s = student.singular[j].to(device)
        q = student.widths[j]
        cutoff = lstsq_cutoff(float(s.max()), n - min(folds.sizes), q, dtype)
        kept = s > 1e-3 * cutoff  # below: rounding noise of the factor (a ridge gives them weight ≤ s²/λ ≈ 0)
        if not bool(kept.any()):
            return None
        idx = torch.nonzero(kept).flatten()
        sk = s[idx]
        per_fold = []
        for f in range(k):
            n_k = folds.sizes[f]
            n_tr = n - n_k
            u_t = folds.test(student.factors[:, b0:b1], f).index_select(1, idx) / sk
            s_u = u_t.sum(dim=0)
            m = torch.eye(len(idx), dtype=dtype, device=device) - u_t.T @ u_t - torch.outer(s_u, s_u) / n_tr
            mu = torch.linalg.eigvalsh(m)
            if float(mu[0]) < MIN_LEAVE_OUT_EIGENVALUE:
                return None
            if ridge == 0:
                cutoff_k = lstsq_cutoff(float(s.max()), n_tr, q, dtype)
                if not float(sk.min()) ** 2 * float(mu[0]) > (margin * cutoff_k) ** 2:
                    return None
            else:
                m.diagonal().add_(ridge / (sk * sk))
            lam = None if ridge == 0 else ridge / (sk * sk)  # λ diag(1/s²): the ridge in U's coordinates
            per_fold.append((u_t, s_u, lam, torch.cholesky_inverse(torch.linalg.cholesky(m))))
        return idx, sk, per_fold

    def primal(j: int, idx: torch.Tensor, sk: torch.Tensor, per_fold) -> torch.Tensor:
        b0, b1 = student.layer_slice(j, j + 1)
        g = student.factors[:, b0:b1].index_select(1, idx) if len(idx) < b1 - b0 else student.factors[:, b0:b1]
        col = torch.zeros(lt, dtype=dtype, device=device)
        for t0, t1 in chunks(b1 - b0):
            a0, a1 = teacher.layer_slice(t0, t1)
            seg = seg_t[a0:a1] - t0
            c = [folds.test(g, f).T @ folds.test(F[:, a0:a1], f) for f in range(k)]  # G_TᵀF_T per fold
            u_f_all = c[0].clone()
            for part in c[1:]:
                u_f_all += part
            u_f_all.div_(sk[:, None])  # UᵀF = Σ_k U_TᵀF_T
            ones = torch.ones(len(idx), dtype=dtype, device=device)
            prods = torch.empty(3, len(idx), a1 - a0, dtype=dtype, device=device)
            for f, (u_t, s_u, lam, m_inv) in enumerate(per_fold):
                n_k = folds.sizes[f]
                n_tr = n - n_k
                s_f = f_sum[f, a0:a1]
                ut_f = c[f].div_(sk[:, None])  # U_TᵀF_T, in place
                d = torch.sub(u_f_all, ut_f).addr_(s_u, s_f, alpha=-1.0 / n_tr)
                w = m_inv @ d  # M_k is well conditioned (certificate): its inverse times D, one GEMM
                cc = 2.0 / n_tr + n_k / n_tr ** 2
                su_w = s_u @ w
                # ‖A − BW‖² = ‖A‖² − 2⟨BᵀA, W⟩ + ⟨W, BᵀBW⟩ per teacher column, with BᵀA = U_TᵀF_T + cc·s_U s_Fᵀ and
                # BᵀB = U_TᵀU_T + cc·s_U s_Uᵀ = I − (M_k − Λ) + (cc − 1/n_tr)·s_U s_Uᵀ, (M_k)W = D: no r × r product
                a_sq = f_sq[f, a0:a1] + cc * s_f * s_f
                torch.mul(ut_f, w, out=prods[0])
                torch.mul(w, d, out=prods[1])
                torch.mul(w, w, out=prods[2])
                if lam is not None:
                    prods[2].mul_((1 + lam)[:, None])
                sums = ones @ prods  # the three column sums, (3, width): one batched GEMV
                err = a_sq - 2 * (sums[0] + cc * su_w * s_f) - sums[1] + sums[2] + (cc - 1.0 / n_tr) * su_w ** 2
                a_layer = torch.zeros(t1 - t0, dtype=dtype, device=device).index_add_(0, seg, a_sq)
                e_layer = torch.zeros(t1 - t0, dtype=dtype, device=device).index_add_(0, seg, err)
                for t in torch.nonzero(e_layer < 1e-2 * a_layer).flatten().tolist():  # cancellation: from rows
                    c0, c1 = (v - a0 for v in teacher.layer_slice(t0 + t, t0 + t + 1))
                    rows_a = folds.test(F[:, a0 + c0:a0 + c1], f) + s_f[c0:c1] / n_tr
                    e = rows_a - (u_t + s_u / n_tr) @ w[:, c0:c1]
                    e_layer[t] = e.square().sum()
                col[t0:t1] += e_layer
        return col

    def fold_by_fold(j: int) -> torch.Tensor:
        """The training fits themselves (thin SVD of one student layer's training rows per fold)."""
        b0, b1 = student.layer_slice(j, j + 1)
        g = student.factors[:, b0:b1]
        col = torch.zeros(lt, dtype=dtype, device=device)
        for f in range(k):
            n_k = folds.sizes[f]
            n_tr = n - n_k
            y_tr, y_te = folds.train(g, f), folds.test(g, f)
            mu_y = y_tr.mean(dim=0)
            u, sv, vh = torch.linalg.svd(y_tr - mu_y, full_matrices=False)
            z = ((y_te - mu_y) @ vh.T) * least_squares_gains(sv, ridge, n_tr, student.widths[j])  # (n_k, r)
            # Uᵀ(F_tr − 1μ_Fᵀ) with μ_F = −s_F/n_tr: the training rows of U padded with zeros on the test rows
            u_pad = torch.zeros(n, u.shape[1], dtype=dtype, device=device)
            keep = torch.ones(n, dtype=torch.bool, device=device)
            if folds.contiguous:
                keep[folds.bounds[f]:folds.bounds[f + 1]] = False
            else:
                keep[folds.members[f]] = False
            u_pad[keep] = u
            for t0, t1 in chunks(b1 - b0):
                a0, a1 = teacher.layer_slice(t0, t1)
                s_f = f_sum[f, a0:a1]
                p = u_pad.T @ F[:, a0:a1] + torch.outer(u.sum(dim=0), s_f) / n_tr
                e = folds.test(F[:, a0:a1], f) + s_f / n_tr - z @ p
                col[t0:t1] += torch.zeros(t1 - t0, dtype=dtype, device=device).index_add_(
                    0, seg_t[a0:a1] - t0, e.square().sum(dim=0))
        return col

    def one(j: int) -> None:
        cert = certified(j)
        out[:, j] = primal(j, *cert) if cert is not None else fold_by_fold(j)

    with layer_parallel(device, ls) as pool:  # student layers are independent: one thread each on a CPU
        list(pool.map(one, range(ls))) if pool is not None else [one(j) for j in range(ls)]
    return out


def _dual_held_out_fits(n: int, ranks_t: list[int], ranks_s: list[int], folds: list[int],
                        device: torch.device) -> bool:
    """Whether the n × n leave-fold-out form of the held-out residual is cheaper than the fold-by-fold fits and
    its Gram matrices (L_t + L_s + 2 of n × n, float64) fit the memory budget."""
    if 8 * (len(ranks_t) + len(ranks_s) + 2) * n * n > _memory_budget(device):
        return False
    per_spec = sum(4 * n * r * (n + r) for r in ranks_s) + 2 * n * n * len(ranks_t) * len(ranks_s)
    dual = 2 * n * n * sum(ranks_t) + len(folds) * per_spec
    # the primal form (``_held_out_residual``): per-fold products over the test rows (n·Σr_s·Σr_t in all), and per
    # student layer and fold an r × r factorisation and r × r by r × Σr_t products
    primal = sum(2 * n * sum(ranks_s) * sum(ranks_t) + k * sum(12 * r ** 3 + 8 * r * r * sum(ranks_t)
                                                               for r in ranks_s) for k in folds)
    return dual < primal


def _layer_kernels(side: _Side, lo: int, hi: int) -> torch.Tensor:
    """(hi − lo, n, n) Gram matrices K_l = X̃_l X̃_lᵀ (= F_l F_lᵀ for any factor) of the prepared layers lo … hi − 1,
    each by ``syrk`` (``_column_gram``), layers in parallel on a CPU (``layer_parallel``)."""
    f = side.factors
    n = f.shape[0]
    out = torch.empty(hi - lo, n, n, dtype=f.dtype, device=f.device)

    def one(i: int) -> None:
        a, b = side.layer_slice(i, i + 1)
        out[i - lo] = _column_gram(f[:, a:b].T)

    with layer_parallel(f.device, hi - lo) as pool:
        list(pool.map(one, range(lo, hi))) if pool is not None else [one(i) for i in range(lo, hi)]
    return out


def _kernel_form(n: int, widths_t: list[int], widths_s: list[int], device: torch.device,
                 teacher_kernels: bool) -> bool:
    """Whether the pairs' ‖X̃_tᵀỸ_s‖²_F (all that linear CKA and Gram-Frobenius need of a pair) cost fewer
    multiply-adds as ⟨K_t, K_s⟩ from the n × n kernels (n²·width/2 per layer, n² per pair) than from the factors
    (n·r_t·r_s per pair, n·r²/2 per layer for ‖X̃ᵀX̃‖_F, and the QR factorisation of layers wider than n), with
    every student kernel and one teacher kernel within the memory budget. ``teacher_kernels``: the teacher's are
    formed anyway (the n × n held-out residual), so neither form pays for them."""
    if 8 * (len(widths_s) + 1) * n * n > _memory_budget(device):
        return False
    teacher = [] if teacher_kernels else widths_t
    kernel = n * n * (sum(widths_s) + sum(teacher)) / 2 + len(widths_t) * len(widths_s) * n * n
    r_t, r_s = [min(n, w) for w in widths_t], [min(n, w) for w in widths_s]
    factor = (n * sum(r_t) * sum(r_s) + n * sum(r * r for r in r_s + [min(n, w) for w in teacher]) / 2
              + sum(n * n * (w - n / 3) for w in widths_t + widths_s if w > n))
    return kernel < factor


#: the leave-fold-out identity is used only where I − H_kk is this well conditioned (else fold-by-fold fits)
MIN_LEAVE_OUT_EIGENVALUE = 1e-3


def _held_out_residual_dual(kernels: torch.Tensor, teacher: _Side, student: _Side, folds: int, ridge: float,
                            device: torch.device, margin: float = 1e3) -> torch.Tensor:
    """k-fold held-out residual of all pairs from one n × n matrix per layer.

    The fit with an intercept on the training rows is penalised least squares on Z = [1, Ỹ] (Ỹ centred on all
    rows, so 1 ⟂ Ỹ) with penalty diag(0, λI). Its hat matrix on all rows is H = 11ᵀ/n + Ỹ(ỸᵀỸ + λI)⁻¹Ỹᵀ =
    W Wᵀ with W = [1/√n, U diag(√h)], Ỹ = U S Vᵀ, h = s²/(s² + λ). Removing the rows of fold k from the fit gives
    held-out residuals r_k = (I − H_kk)⁻¹ ((I − H)X̃)_k (the block leave-out identity, Sherman–Morrison–Woodbury),
    so Σ_k ‖r_k‖² = ⟨X̃X̃ᵀ, N⟩ with N = (I − H) D (I − H), D = blockdiag_k (I − H_kk)⁻². N costs one
    n × 2(r+1) by 2(r+1) × n product per student layer (N = D − FWᵀ − WFᵀ, F = DW − ½W(WᵀDW)), and every pair
    one n² inner product with the teacher's K_t = X̃X̃ᵀ.

    Exactly the fold-by-fold value when every training fit is this one. Ridge λ > 0: always. λ = 0 (numpy's
    lstsq, minimum norm, singular values below eps·max(n_tr, q)·s_max dropped): Ỹ's singular values must split
    into r kept ones, certified above the cutoff of every training fit by σ_r²(Ỹ_tr − μ_Y) ≥ min(n, s_r²)·
    λ_min(I − H_kk) > (margin·cutoff)² (Z restricted to the kept directions; margin 10³, or 1 when the caller
    asks a looser ``tol``), and null ones ≤ 10⁻³·cutoff, which stay below it in every training fit
    (σ_{r+1}(Ỹ_tr − μ_Y) ≤ s_{r+1}: centring and dropping rows only shrink); the
    fits then all have rank r and W uses the r kept directions (e.g. the exact linear relation LayerNorm puts
    among a layer's features). A student layer failing that, or with λ_min(I − H_kk) <
    MIN_LEAVE_OUT_EIGENVALUE, gets its N from its k training SVDs instead (``fold_form``: the fits themselves,
    still one n × n matrix and n² per pair).
    """
    n = teacher.factors.shape[0]
    dtype = teacher.factors.dtype
    fold_of_row = fold_assignment(n, folds, 0)
    order = np.argsort(fold_of_row, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(fold_of_row, minlength=folds))]).tolist()
    perm = torch.as_tensor(order, device=device)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(n, device=device)
    lt, ls = len(teacher.ranks), len(student.ranks)
    mats = torch.zeros(ls, n, n, dtype=dtype, device=device)

    def hat_form(y: torch.Tensor, q: int) -> torch.Tensor | None:
        """N from the leave-fold-out identity, or None where its certificate fails."""
        u, sv, _ = torch.linalg.svd(y, full_matrices=False)
        if ridge > 0:
            h = sv * sv / (sv * sv + ridge)
        else:
            cutoff = lstsq_cutoff(float(sv.max()), n - min(bounds[k + 1] - bounds[k] for k in range(folds)), q,
                                  dtype)
            kept = sv > 1e-3 * cutoff
            if not bool(kept.any()):
                return None
            u, sv = u[:, kept], sv[kept]
            h = torch.ones_like(sv)
        w = torch.cat([torch.full((n, 1), 1 / math.sqrt(n), dtype=dtype, device=device), u * torch.sqrt(h)], 1)
        e = torch.empty_like(w)
        blocks = []
        for k in range(folds):
            lo, hi = bounds[k], bounds[k + 1]
            wk = w[lo:hi]
            mu, vecs = torch.linalg.eigh(torch.eye(hi - lo, dtype=dtype, device=device) - wk @ wk.T)
            mu_min = float(mu[0])
            if mu_min < MIN_LEAVE_OUT_EIGENVALUE:
                return None
            if ridge == 0:
                cutoff_k = lstsq_cutoff(float(sv.max()), n - (hi - lo), q, dtype)
                if not min(n, float(sv.min()) ** 2) * mu_min > (margin * cutoff_k) ** 2:
                    return None
            dk = (vecs / (mu * mu)) @ vecs.T  # (I − H_kk)⁻²
            e[lo:hi] = dk @ wk
            blocks.append(dk)
        f = e - 0.5 * w @ (w.T @ e)
        m = torch.cat([f, w], 1) @ torch.cat([w, f], 1).T
        m.neg_()
        for k, dk in enumerate(blocks):
            m[bounds[k]:bounds[k + 1], bounds[k]:bounds[k + 1]] += dk
        return m

    def fold_form(y: torch.Tensor, q: int) -> torch.Tensor:
        """N = Σ_k L_kᵀL_k from the k training SVDs themselves (any rank): the held-out residual of fold k is
        L_k X̃ with L_k = [I | −(A + (1 − A1)1ᵀ/n_tr)] on (test | train) rows, A = (Ỹ_te − μ_Y)V diag(g) Uᵀ the
        map the fit applies to the centred training teacher rows (μ_X = X̃_trᵀ1/n_tr folded into the last term)."""
        m = torch.zeros(n, n, dtype=dtype, device=device)
        for k in range(folds):
            lo, hi = bounds[k], bounds[k + 1]
            train = torch.cat([torch.arange(0, lo, device=device), torch.arange(hi, n, device=device)])
            y_tr, y_te = y[train], y[lo:hi]
            mu_y = y_tr.mean(dim=0)
            u, sv, vh = torch.linalg.svd(y_tr - mu_y, full_matrices=False)
            a = (((y_te - mu_y) @ vh.T) * least_squares_gains(sv, ridge, y_tr.shape[0], q)) @ u.T  # (n_te, n_tr)
            lk = torch.zeros(hi - lo, n, dtype=dtype, device=device)
            lk[:, lo:hi] = torch.eye(hi - lo, dtype=dtype, device=device)
            lk[:, train] = -(a + (1 - a.sum(dim=1, keepdim=True)) / y_tr.shape[0])
            m += lk.T @ lk
        return m

    def one(j: int) -> bool:
        b0, b1 = student.layer_slice(j, j + 1)
        y = student.factors[perm, b0:b1]  # rows in fold order
        m = hat_form(y, student.widths[j])
        via_hat = m is not None
        if m is None:
            m = fold_form(y, student.widths[j])
        mats[j] = m.index_select(0, inverse).index_select(1, inverse)  # back to the original row order
        return via_hat

    with layer_parallel(device, ls) as pool:
        list(pool.map(one, range(ls))) if pool is not None else [one(j) for j in range(ls)]
    return kernels.reshape(lt, n * n) @ mats.reshape(ls, n * n).T


def pairwise_memory_bytes(n: int, teacher_widths: Sequence[int], student_widths: Sequence[int],
                          chunk_pairs: int) -> int:
    """Rough peak bytes of :func:`pairwise` in float64: the prepared factors plus ``chunk_pairs`` pair blocks."""
    rt = [min(n, p) for p in teacher_widths]
    rs = [min(n, q) for q in student_widths]
    return 8 * (n * (sum(rt) + sum(rs)) + 3 * chunk_pairs * max(rt) * max(rs)) + 8 * n * (len(rt) + len(rs))


__all__ = ["pairwise", "pairwise_memory_bytes"]
