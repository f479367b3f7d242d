"""Every teacher layer against every student layer at once.

Per-layer work is done once: centring, scaling to unit Frobenius norm (X̃ = X_c/‖X_c‖_F, float64), a *factor*
F with the same cross products as X̃ up to an orthogonal map, ‖X̃ᵀX̃‖²_F, squared row norms (for debiased
CKA) and, for student layers when the in-sample projection residual is asked, the factor rotated to its right
singular basis (F = X̃V = U diag(σ)), so that column k of a pair product is C_ts v_k.

- primal (n ≥ width): F = X̃ (n × width).
- dual (n < width): X̃ = U S Vᵀ, F = U S (n × n). Then F_tᵀF_s = V_tᵀ(X̃_tᵀỸ_s)V_s has the same singular values
  and Frobenius norm as X̃_tᵀỸ_s, so every linear metric is unchanged while the pair work drops from
  n·p·q to n³.

Pair work is batched: the factors of each side are stored side by side, (n, Σr), and a chunk of teacher layers ×
a chunk of student layers is one GEMM, C = F_chunkᵀ G_chunk, whose (t, s) blocks are the pair cross products.
From the blocks (all on ``device``):

- Procrustes ρ = ‖C_ts‖_* (σ = √eig of the small Gram CᵀC by batched ``eigvalsh`` where a rounding bound shows
  it exact to 1e-9, else ``torch.linalg.svdvals``),
- Gram-Frobenius² = ‖X̃ᵀX̃‖²_F + ‖ỸᵀỸ‖²_F − 2‖C_ts‖²_F, linear CKA = ‖C_ts‖²_F / (‖X̃ᵀX̃‖_F ‖ỸᵀỸ‖_F),
- debiased CKA from the same plus a_tᵀb_s (a = squared row norms; see :mod:`repsim.moments` for the formula),
- in-sample projection residual 1 − Σ_k ‖C_ts v_k‖²/σ_k² over the student's singular pairs (σ_k, v_k) above
  numpy's lstsq cutoff (with ridge λ: weights (σ_k² + 2λ)/(σ_k² + λ)²).

Memory: one float64 copy of the inputs plus about 3·(chunk pairs)·r_t·r_s·8 bytes; ``chunk_size`` (pairs per
chunk) is chosen from a budget (1 GiB on CPU, a quarter of free memory on CUDA) when not given. For 48 × 48 layers
of width 4096 (n ≥ 4096) one pair block is 128 MiB, so the CPU budget gives 2 pairs per chunk.

The k-fold held-out projection residual (``projection_residual[folds=K]``, the default) reuses one thin SVD per
student layer and fold for all teacher layers (see ``_held_out_residual``). RBF CKA, not a second-moment metric, is
computed by the registry function per pair on the original inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from repsim.arrays import as_matrix
from repsim.errors import UserError

CPU_CHUNK_BUDGET_BYTES = 1 << 30


@dataclass
class _Side:
    """Prepared layers of one side: factors side by side and per-layer scalars."""

    factors: torch.Tensor  # (n, Σ r_l)
    ranks: list[int]  # r_l: columns of each layer's factor
    widths: list[int]  # original widths
    gram_sq: torch.Tensor  # (L,) ‖X̃ᵀX̃‖²_F
    row_sq: torch.Tensor  # (L, n) squared row norms of X̃ (debiased CKA)
    singular: list[torch.Tensor] | None  # per layer σ when F = U diag(σ) (rotated to the right singular basis)

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


def _prepare_layer(x: torch.Tensor, name: str) -> torch.Tensor:
    xc = x - x.mean(dim=0, keepdim=True)
    norm = torch.linalg.matrix_norm(xc)
    if not bool(norm > 0):
        raise UserError(f"{name} has zero variance (all rows equal after centering); the metric is undefined")
    return xc / norm


def _prepare_side(layers: list[torch.Tensor], name: str, rotate: bool, dtype: torch.dtype,
                  device: torch.device) -> _Side:
    """Factors of one side. ``rotate``: express each factor in its right singular basis, F = X̃V = U diag(σ), so
    that the pair products F_tᵀF_s have columns C_ts v_k (what the projection residual weighs by 1/σ_k²)."""
    n = layers[0].shape[0]
    widths = [x.shape[1] for x in layers]
    ranks = [min(n, w) for w in widths]
    factors = torch.empty(n, sum(ranks), dtype=dtype, device=device)
    gram_sq = torch.empty(len(layers), dtype=dtype, device=device)
    row_sq = torch.empty(len(layers), n, dtype=dtype, device=device)
    singular: list[torch.Tensor] | None = [] if rotate else None
    col = 0
    for i, raw in enumerate(layers):
        x = _prepare_layer(raw.to(device=device, dtype=dtype), f"{name} layer {i}")
        row_sq[i] = (x * x).sum(dim=1)
        r = ranks[i]
        if x.shape[1] > n:  # dual: F = U S, n columns
            u, s, _ = torch.linalg.svd(x, full_matrices=False)
            factors[:, col:col + r] = u * s
            gram_sq[i] = (s ** 4).sum()
        elif rotate:
            s, v = _right_singular(x)
            factors[:, col:col + r] = x @ v
            gram_sq[i] = (s ** 4).sum()
        else:
            factors[:, col:col + r] = x
            gram_sq[i] = _gram_frobenius_sq(x)
        if singular is not None:
            singular.append(s)
        col += r
    return _Side(factors, ranks, widths, gram_sq, row_sq, singular)


def _gram_frobenius_sq(x: torch.Tensor, min_block: int = 192) -> torch.Tensor:
    """‖xᵀx‖²_F using symmetry: with x = [a, b], ‖xᵀx‖² = ‖aᵀa‖² + ‖bᵀb‖² + 2‖aᵀb‖², recursively, so about
    5/8 of the flops of the full Gram for widths ≥ 4·min_block."""
    w = x.shape[1]
    if w < 2 * min_block:
        return torch.linalg.matrix_norm(x.T @ x) ** 2
    a, b = x[:, : w // 2], x[:, w // 2:]
    return _gram_frobenius_sq(a, min_block) + _gram_frobenius_sq(b, min_block) + 2 * torch.linalg.matrix_norm(
        a.T @ b) ** 2


def _right_singular(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ, V) of x = U diag(σ) Vᵀ (n ≥ width), σ descending.

    From the eigendecomposition of the width × width Gram xᵀx (one GEMM) when it is well conditioned: every
    eigenvalue ≥ 1e-6·λ_max, so σ_k² carries a relative error ≤ ~1e-10 although the Gram squares the condition
    number. Otherwise from the SVD of the R factor of x = QR, accurate for any conditioning.
    """
    lam, v = torch.linalg.eigh(x.T @ x)
    if bool(lam[0] >= 1e-6 * lam[-1]):
        return torch.sqrt(lam).flip(0), v.flip(1)
    _, s, vh = torch.linalg.svd(torch.linalg.qr(x, mode="r").R, full_matrices=False)
    return s, vh.T


def _nuclear_norms(d: torch.Tensor, scale: torch.Tensor | float = 1.0, with_col_sq: bool = False):
    """‖D‖_* of a batch of matrices (..., r, q).

    Fast path: σ = √eig of the smaller Gram (DᵀD or DDᵀ, one batched GEMM and ``eigvalsh``), accepted when the
    bound on its rounding, Σ_k min(δ/(2σ_k), √(2δ)) with δ = 10·√max(r, q)·eps·σ_max² (backward-stable
    eigenvalues of a Gram formed in floating point), is below 1e-9·``scale`` (the normaliser of the value: 1 for
    unit-Frobenius inputs, √(AB) for raw co-moments); other
    matrices (small singular values, where the square root loses digits) get exact ``svdvals``.
    """
    r, q = d.shape[-2:]
    gram = d.transpose(-1, -2) @ d if r >= q else d @ d.transpose(-1, -2)
    if with_col_sq:  # squared column norms of d: the diagonal of DᵀD when that is the Gram formed
        col_sq = torch.diagonal(gram, dim1=-2, dim2=-1).clone() if r >= q else (d * d).sum(dim=-2)
    lam = torch.linalg.eigvalsh(gram).clamp_min(0)
    delta = 10 * math.sqrt(max(r, q)) * torch.finfo(d.dtype).eps * lam[..., -1:]
    sigma = torch.sqrt(lam)
    bound = torch.where(lam > 2 * delta, delta / (2 * sigma.clamp_min(torch.finfo(d.dtype).tiny)),
                        torch.sqrt(2 * delta)).sum(dim=-1)
    out = sigma.sum(dim=-1)
    redo = bound > 1e-9 * torch.as_tensor(scale, dtype=d.dtype, device=d.device)
    if bool(redo.any()):
        out[redo] = torch.linalg.svdvals(d[redo]).sum(dim=-1)
    return (out, col_sq) if with_col_sq else out


def _gains(s: torch.Tensor, ridge: float, rows: int, width: int) -> torch.Tensor:
    """Least-squares gains g_k = s_k/(s_k² + λ); for λ = 0, 1/s_k above numpy's lstsq cutoff
    eps·max(rows, width)·s_max and 0 below (the minimum-norm solution), as in repsim.metrics."""
    if ridge > 0:
        return s / (s * s + ridge)
    cutoff = torch.finfo(s.dtype).eps * max(rows, width) * s.max()
    keep = s > cutoff
    return torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))


def _in_sample_weights(s: torch.Tensor, ridge: float, rows: int, width: int) -> torch.Tensor:
    """Weight of ‖C v_k‖² in the explained part of the in-sample fit: 2·s·g − s²·g² divided by s² (see module)."""
    g = _gains(s, ridge, rows, width)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.where(s > 0, (2 * g / safe - g * g), torch.zeros_like(s))


def _choose_chunk(ranks_t: list[int], ranks_s: list[int], device: torch.device,
                  chunk_size: int | None) -> tuple[int, int]:
    """(teacher layers, student layers) per chunk: the largest chunk whose pair blocks fit the memory budget."""
    lt, ls = len(ranks_t), len(ranks_s)
    if chunk_size is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = free // 4
        else:
            budget = CPU_CHUNK_BUDGET_BYTES
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
) -> dict[str, np.ndarray]:
    """All teacher × student layer pairs: ``{canonical metric id: (Lt, Ls) float64 ndarray}``.

    Args:
        teacher_layers: sequence of (n, p_t) arrays/tensors or one (Lt, n, p) array; rows paired across all
            layers of both sides.
        student_layers: sequence of (n, q_s) arrays/tensors or one (Ls, n, q) array.
        metrics: metric ids (any spelling ``repsim.metrics.get_metric`` accepts); default
            ``repsim.metrics.DEFAULT_METRICS``.
        device: where to compute (e.g. "cuda"); default: the inputs' GPU, else CUDA when available, else CPU.
        chunk_size: layer pairs per batched GEMM; chosen from a memory budget when omitted.
        dtype: compute dtype (float64 by default).
    Returns:
        value[t, s] = metric(teacher_layers[t], student_layers[s]) exactly as the in-memory function defines it.
    """
    from repsim.metrics import DEFAULT_METRICS, get_metric

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
    t_in = [as_matrix(x, f"teacher layer {i}", dtype=None) for i, x in enumerate(t_raw)]
    s_in = [as_matrix(y, f"student layer {i}", dtype=None) for i, y in enumerate(s_raw)]
    rows = {x.shape[0] for x in t_in} | {y.shape[0] for y in s_in}
    if len(rows) != 1:
        raise UserError(f"all teacher and student layers must have the same number of rows (paired samples), "
                        f"got {sorted(rows)}")
    n = rows.pop()
    if n < 2:
        raise UserError(f"need at least 2 samples (rows), got {n}")

    linear = [s for s in specs if s.linear]
    other = [s for s in specs if not s.linear]
    out: dict[str, np.ndarray] = {}
    if linear:
        out.update(_linear_pairwise(t_in, s_in, linear, device, chunk_size, dtype))
    for spec in other:
        m = np.empty((len(t_in), len(s_in)))
        for i, x in enumerate(t_in):
            for j, y in enumerate(s_in):
                m[i, j] = float(spec(x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)))
        out[spec.id] = m
    return {s.id: out[s.id] for s in specs}


def _linear_pairwise(t_in: list[torch.Tensor], s_in: list[torch.Tensor], specs: list, device: torch.device,
                     chunk_size: int | None, dtype: torch.dtype) -> dict[str, np.ndarray]:
    from repsim.moments import _clamp_rounding, _gram_output, _procrustes_output

    n = t_in[0].shape[0]
    families = {s.family for s in specs}
    proj = [s for s in specs if s.family == "projection_residual"]
    in_sample = [s for s in proj if dict(s.kwargs).get("folds") is None]
    held_out = [s for s in proj if dict(s.kwargs).get("folds") is not None]
    need_debiased = any(s.family == "cka" and dict(s.kwargs).get("estimator") == "debiased" for s in specs)
    if need_debiased and n < 4:
        raise UserError(f"debiased CKA needs at least 4 samples (rows), got {n}")
    teacher = _prepare_side(t_in, "teacher", False, dtype, device)
    student = _prepare_side(s_in, "student", bool(in_sample), dtype, device)
    lt, ls = len(t_in), len(s_in)
    cross_sq = torch.empty(lt, ls, dtype=dtype, device=device)
    nuclear = torch.empty(lt, ls, dtype=dtype, device=device) if "procrustes" in families else None
    weights = {spec.id: [_in_sample_weights(sv, float(dict(spec.kwargs).get("ridge") or 0.0), n, w)
                         for sv, w in zip(student.singular, student.widths, strict=True)]
               for spec in in_sample}
    explained = {sid: torch.empty(lt, ls, dtype=dtype, device=device) for sid in weights}
    need_pairs = bool(families - {"projection_residual"}) or bool(in_sample)
    ct, cs = _choose_chunk(teacher.ranks, student.ranks, device, chunk_size)
    for t0 in range(0, lt, ct) if need_pairs else ():
        t1 = min(lt, t0 + ct)
        a0, a1 = teacher.layer_slice(t0, t1)
        for s0 in range(0, ls, cs):
            s1 = min(ls, s0 + cs)
            b0, b1 = student.layer_slice(s0, s1)
            block = teacher.factors[:, a0:a1].T @ student.factors[:, b0:b1]  # one GEMM for the chunk
            _pair_work(block, teacher.ranks[t0:t1], student.ranks[s0:s1], (t0, s0), student, cross_sq, nuclear,
                       weights, explained)
            del block
    gx, gy = teacher.gram_sq, student.gram_sq
    out: dict[str, torch.Tensor] = {}
    for spec in specs:
        kw = dict(spec.kwargs)
        if spec.family == "procrustes":
            out[spec.id] = _procrustes_output(nuclear, kw.get("output", "distance"))
        elif spec.family == "gram_frobenius":
            out[spec.id] = _gram_output(gx[:, None] + gy[None, :] - 2 * cross_sq, bool(kw.get("squared", False)))
        elif spec.family == "cka" and kw.get("estimator", "biased") == "biased":
            out[spec.id] = cross_sq / torch.sqrt(gx[:, None] * gy[None, :])
        elif spec.family == "cka":
            c, f = 1.0 / ((n - 1) * (n - 2)), n / (n - 2)
            hxy = cross_sq + c - f * (teacher.row_sq @ student.row_sq.T)
            hxx = gx + c - f * (teacher.row_sq ** 2).sum(dim=1)
            hyy = gy + c - f * (student.row_sq ** 2).sum(dim=1)
            if bool((hxx <= 0).any()) or bool((hyy <= 0).any()):
                raise UserError(f"debiased HSIC of a layer with itself is not positive (n={n} is too small for the "
                                f"unbiased estimator); debiased CKA undefined")
            out[spec.id] = hxy / torch.sqrt(hxx[:, None] * hyy[None, :])
        elif spec.id in explained:
            out[spec.id] = _clamp_rounding(1.0 - explained[spec.id], 0.0, 1.0, "projection residual")
        elif spec in held_out:
            out[spec.id] = _held_out_residual(teacher, student, int(kw["folds"]), float(kw.get("ridge") or 0.0),
                                              device)
        else:
            raise UserError(f"metric {spec.id!r} has no batched linear form")
    return {k: v.detach().cpu().double().numpy() for k, v in out.items()}


def _pair_work(block: torch.Tensor, ranks_t: list[int], ranks_s: list[int], origin: tuple[int, int],
               student: _Side, cross_sq: torch.Tensor, nuclear: torch.Tensor | None,
               weights: dict[str, list[torch.Tensor]], explained: dict[str, torch.Tensor]) -> None:
    """Per-pair reductions of one chunk's cross-product block (rows: teacher factors, columns: student factors).

    With a rotated student, column k of a pair block is C_ts v_k, so its squared norm is what the in-sample
    projection residual weighs by 1/σ_k²; ‖C_ts‖²_F is the sum of those column norms."""
    t0, s0 = origin
    if len(set(ranks_t)) == 1 and len(set(ranks_s)) == 1:
        ct, cs, r, q = len(ranks_t), len(ranks_s), ranks_t[0], ranks_s[0]
        pairs = block.view(ct, r, cs, q).permute(0, 2, 1, 3)  # (ct, cs, r, q) blocks C_ts
        if nuclear is not None:
            norms, col_sq = _nuclear_norms(pairs.reshape(ct * cs, r, q), with_col_sq=True)
            nuclear[t0:t0 + ct, s0:s0 + cs] = norms.view(ct, cs)
            col_sq = col_sq.view(ct, cs, q)
        else:
            col_sq = (pairs * pairs).sum(dim=2)  # (ct, cs, q)
        cross_sq[t0:t0 + ct, s0:s0 + cs] = col_sq.sum(dim=-1)
        for sid, w in weights.items():
            for j in range(cs):
                explained[sid][t0:t0 + ct, s0 + j] = col_sq[:, j] @ w[s0 + j]
        return
    for i, row in enumerate(block.split(ranks_t, dim=0)):
        for j, c in enumerate(row.split(ranks_s, dim=1)):
            col_sq = (c * c).sum(dim=0)
            cross_sq[t0 + i, s0 + j] = col_sq.sum()
            if nuclear is not None:
                nuclear[t0 + i, s0 + j] = _nuclear_norms(c[None])[0]  # type: ignore[index]
            for sid, w in weights.items():
                explained[sid][t0 + i, s0 + j] = col_sq @ w[s0 + j]


def _held_out_residual(teacher: _Side, student: _Side, folds: int, ridge: float,
                       device: torch.device) -> torch.Tensor:
    """k-fold held-out residual exactly as ``repsim.metrics.projection_residual(folds=k)``, all pairs.

    Per fold and student layer one thin SVD of the re-centred training rows (Ỹ_tr − μ_Y = U S Vᵀ); then for all
    teacher layers at once W·(teacher) is applied as Z·P with P = Uᵀ(X̃_tr − μ_X) and Z = (Ỹ_te − μ_Y) V diag(g),
    and the held-out error ‖X̃_te − μ_X − ZP‖²_F is summed per teacher layer. Working on the factors is exact: they
    differ from X̃, Ỹ by orthogonal maps on the row spaces, which leave predictions and residual norms unchanged.
    """
    from repsim.metrics import fold_assignment

    n = teacher.factors.shape[0]
    fold_of_row = torch.as_tensor(fold_assignment(n, folds, 0), device=device)
    lt, ls = len(teacher.ranks), len(student.ranks)
    seg_t = teacher.segments(0, lt)
    out = torch.zeros(lt, ls, dtype=teacher.factors.dtype, device=device)
    for fold in range(folds):
        test = fold_of_row == fold
        x_tr, x_te = teacher.factors[~test], teacher.factors[test]
        mu_x = x_tr.mean(dim=0)
        x_te_c = x_te - mu_x
        ones_tr = torch.ones(x_tr.shape[0], dtype=x_tr.dtype, device=device)
        for j in range(ls):
            b0, b1 = student.layer_slice(j, j + 1)
            y_tr, y_te = student.factors[~test, b0:b1], student.factors[test, b0:b1]
            mu_y = y_tr.mean(dim=0)
            u, sv, vh = torch.linalg.svd(y_tr - mu_y, full_matrices=False)
            g = _gains(sv, ridge, y_tr.shape[0], student.widths[j])
            z = ((y_te - mu_y) @ vh.T) * g  # (n_te, r)
            p = u.T @ x_tr - torch.outer(u.T @ ones_tr, mu_x)  # Uᵀ(X_tr − 1μ_Xᵀ), (r, Σr_t)
            err = x_te_c - z @ p
            out[:, j] += torch.zeros(lt, dtype=err.dtype, device=device).index_add_(0, seg_t, (err * err).sum(dim=0))
    return out


def pairwise_memory_bytes(n: int, teacher_widths: Sequence[int], student_widths: Sequence[int],
                          chunk_pairs: int) -> int:
    """Rough peak bytes of :func:`pairwise` in float64: the prepared factors plus ``chunk_pairs`` pair blocks."""
    rt = [min(n, p) for p in teacher_widths]
    rs = [min(n, q) for q in student_widths]
    return 8 * (n * (sum(rt) + sum(rs)) + 3 * chunk_pairs * max(rt) * max(rs)) + 8 * n * (len(rt) + len(rs))


__all__ = ["pairwise", "pairwise_memory_bytes"]
