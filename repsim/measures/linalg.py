"""Numerical helpers shared by every measure family and engine (written once here).

- rounding: :func:`clamp_rounding` (clamp into a range, warning when the excursion is more than rounding),
  :func:`refine_below` (when a difference of nearly equal terms has lost too many digits);
- shape: :func:`dual_is_cheaper` (n × n Gram work or p × q cross-products), :func:`narrow` (an n × min(n, width)
  factor with the same Gram);
- ranks: :func:`least_squares_gains` (numpy lstsq's singular-value cutoff, or ridge gains) and
  :func:`eigen_rank_cutoff` (the same rule for eigenvalues of a Gram formed in floating point);
- nuclear norms: batched and fast (:func:`nuclear_norms`, √eig of the small Gram where a rounding bound shows it
  exact, else singular values) and differentiable (:func:`nuclear_norm`, gradient the polar factor);
- CPU LAPACK helpers (:func:`eigvalsh`, :func:`svdvals`, :func:`eigh`) and :func:`layer_parallel`, a thread pool for
  independent per-layer work.
"""

from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from repsim.system.errors import UserError
from repsim.system.threads import blas_threads


def eps(t: torch.Tensor | torch.dtype) -> float:
    """Machine epsilon of a tensor's (or a dtype's) floating type."""
    return torch.finfo(t if isinstance(t, torch.dtype) else t.dtype).eps


def refine_below(t: torch.Tensor | torch.dtype) -> float:
    """Relative size below which a difference of nearly equal terms (2 − 2ρ, ‖K‖² + ‖L‖² − 2⟨K, L⟩) has lost
    more than half its digits to cancellation and is recomputed by a cancellation-free route: 100·√eps."""
    return 100.0 * math.sqrt(eps(t))


def clamp_rounding(value: torch.Tensor, lo: float, hi: float, tol: float, what: str,
                   resolution: float | None = None) -> torch.Tensor:
    """Clamp ``value`` (any shape) into [lo, hi], silently only where it is outside by at most ``tol`` (rounding).

    A larger excursion means the computation broke down; it is clamped with a RuntimeWarning naming ``what``.
    ``resolution``: for a difference of nearly equal terms that could not be recomputed without cancellation (an
    engine without the rows), the smallest excess over lo it can resolve: values below lo + resolution (those
    below lo by rounding included) become lo + max(|value − lo|, resolution), which stays within the engine's
    accuracy and does not claim an exact lo (the 0 of identical inputs) for inputs that may differ.
    """
    v = value.detach()
    if bool(((v < lo - tol) | (v > hi + tol)).any()):
        warnings.warn(f"{what} lies outside [{lo}, {hi}] by more than rounding ({tol:.1e}): {v.min().item()!r} … "
                      f"{v.max().item()!r}; clamped", RuntimeWarning, stacklevel=3)
    if resolution is not None:
        unresolved = (v < lo + resolution) & (v >= lo - tol)
        value = torch.where(unresolved, lo + (value - lo).abs().clamp(min=resolution), value)
    return value.clamp(lo, hi)


def dual_is_cheaper(n: int, p: int, q: int) -> bool:
    """Whether n × n Gram work, n²(p + q) flops, undercuts p × q cross-products, n(p² + q² + pq): the one rule for
    choosing the dual (Gram) or primal (covariance) form of a linear metric."""
    return n * (p + q) + 2 * n <= p * p + q * q + p * q


def narrow(A: torch.Tensor) -> torch.Tensor:
    """An n × min(n, width) matrix with the same Gram matrix AAᵀ and the same paired rows.

    A side wider than it is long is replaced by Rᵀ from the thin QR factorisation Aᵀ = QR (so A = RᵀQᵀ and
    AAᵀ = RᵀR); this is an orthogonal change of feature basis restricted to A's row space, which no linear metric
    can see, and it avoids squaring the condition number as forming AAᵀ would.
    """
    n, width = A.shape
    if width <= n:
        return A
    return torch.linalg.qr(A.T, mode="reduced").R.T


_LAYER_POOL: ThreadPoolExecutor | None = None


@contextmanager
def layer_parallel(device: torch.device, tasks: int):
    """A thread pool for independent per-layer work on the CPU, with torch and BLAS set to one thread each
    inside (restored on exit); None (run serially) on other devices or with one torch thread."""
    global _LAYER_POOL
    workers = min(torch.get_num_threads(), tasks) if device.type == "cpu" else 1
    if workers <= 1:
        yield None
        return
    if _LAYER_POOL is None or _LAYER_POOL._max_workers < workers:
        _LAYER_POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="repsim-layer")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with blas_threads(1):
            yield _LAYER_POOL
    finally:
        torch.set_num_threads(threads)




def _lapack_batched(fn, g: torch.Tensor) -> torch.Tensor:
    """``fn`` (a numpy LAPACK gufunc over the last two axes) on a CPU batch (..., a, b), the batch split over the
    ``layer_parallel`` threads with single-threaded BLAS: the LAPACK drivers used here (values-only ``syevd``,
    ``gesdd``) are level-2 bound and scale poorly with BLAS threads, while independent matrices scale with cores."""
    arr = g.detach().contiguous().numpy()
    batch = arr.reshape(-1, *arr.shape[-2:])
    workers = min(torch.get_num_threads(), batch.shape[0])  # read before the pool sets torch to one thread
    with layer_parallel(g.device, batch.shape[0]) as pool:
        if pool is None:
            with blas_threads(1):
                vals = fn(batch)
        else:
            bounds = np.linspace(0, batch.shape[0], workers + 1).astype(int)
            vals = np.concatenate(list(pool.map(lambda ab: fn(batch[ab[0]:ab[1]]),
                                                zip(bounds[:-1], bounds[1:], strict=True))))
    return torch.from_numpy(vals.reshape(*arr.shape[:-2], vals.shape[-1]))


def _on_cpu_lapack(g: torch.Tensor) -> bool:
    return g.device.type == "cpu" and g.dtype in (torch.float32, torch.float64) and min(g.shape[-2:]) >= 64


def eigvalsh(g: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (ascending) of a batch of symmetric matrices (..., k, k), lower triangles read. On the CPU by
    numpy's LAPACK through ``_lapack_batched``, faster there than torch's MKL ``syevd`` (benchmarks/RESULTS.md)."""
    return _lapack_batched(np.linalg.eigvalsh, g) if _on_cpu_lapack(g) else torch.linalg.eigvalsh(g)


def svdvals(d: torch.Tensor) -> torch.Tensor:
    """Singular values (descending) of a batch (..., a, b); on the CPU through ``_lapack_batched``."""
    if not _on_cpu_lapack(d):
        return torch.linalg.svdvals(d)
    return _lapack_batched(lambda m: np.linalg.svd(m, compute_uv=False), d)


def eigh(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues ascending, eigenvectors) of one symmetric matrix; on the CPU by numpy's LAPACK with
    single-threaded BLAS (faster there than torch's MKL ``syevd``; benchmarks/RESULTS.md)."""
    if g.device.type != "cpu" or g.dtype not in (torch.float32, torch.float64):
        return torch.linalg.eigh(g)
    with blas_threads(1):
        lam, v = np.linalg.eigh(g.detach().numpy())
    return torch.from_numpy(lam), torch.from_numpy(v)


def _gram_of_columns(d: torch.Tensor) -> torch.Tensor:
    """dᵀd for a batch (..., r, q), from 3 of its 4 blocks when q is large (the fourth is the transpose)."""
    q = d.shape[-1]
    if q < 256:
        return d.transpose(-1, -2) @ d
    h = q // 2
    a, b = d[..., :h], d[..., h:]
    g = torch.empty(*d.shape[:-2], q, q, dtype=d.dtype, device=d.device)
    g[..., :h, :h] = a.transpose(-1, -2) @ a
    g[..., h:, h:] = b.transpose(-1, -2) @ b
    ba = b.transpose(-1, -2) @ a
    g[..., h:, :h] = ba
    g[..., :h, h:] = ba.transpose(-1, -2)
    return g


def nuclear_norms(d: torch.Tensor, scale: torch.Tensor | float = 1.0, with_gram: bool = False, probe: int = 0,
                   tol: float = 1e-9):
    """‖D‖_* of a batch of matrices (..., r, q); a 4-D batch (a, b, r, q) may be a strided view (the pair
    blocks of one cross-product GEMM), handled one leading index at a time without copying it.

    Fast path: σ = √eig of the smaller Gram (DᵀD when r ≥ q, else DDᵀ; batched GEMMs and ``eigvalsh``),
    accepted when the bound on its rounding, Σ_k min(δ/(2σ_k), √(2δ)) with δ = 10·√max(r, q)·eps·σ_max²
    (backward-stable eigenvalues of a Gram formed in floating point), is below ``tol``·``scale`` (the normaliser of
    the value: 1 for unit-Frobenius inputs, √(AB) for raw co-moments); other matrices (small singular values,
    where the square root loses digits) get exact ``svdvals``. ``with_gram`` also returns the Gram formed.

    ``probe`` > 0 (scalar ``scale``): the fast path is tried on a first slice (the first leading index of a 4-D
    batch, else the first ``probe`` matrices); when most of it needs ``svdvals`` anyway (real features with
    near-null directions, e.g. after LayerNorm), the rest goes to ``svdvals`` directly instead of forming and
    diagonalising Grams that would be discarded.
    """
    r, q = d.shape[-2:]
    lead = d.shape[:-2]

    def gram_of(m: torch.Tensor) -> torch.Tensor:
        return _gram_of_columns(m) if r >= q else _gram_of_columns(m.transpose(-1, -2))

    if d.ndim == 4:
        units = list(d.unbind(0))
    elif d.ndim == 3 and probe and d.shape[0] > 2 * probe:
        units = [d[:probe], d[probe:]]
    else:
        gram = gram_of(d)
        out, _ = _nuclear_from_gram(gram, scale, tol, lambda mask: d[mask])
        return (out, gram) if with_gram else out
    k = min(r, q)
    sizes = [u.shape[0] for u in units]
    starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    gram = torch.empty(starts[-1], k, k, dtype=d.dtype, device=d.device)

    def fill(lo: int) -> None:  # the Grams of units lo, lo+1, …
        for i in range(lo, len(units)):
            gram[starts[i]:starts[i + 1]] = gram_of(units[i])

    def pick(lo: int, hi: int):  # for svdvals: the matrices of units lo … hi−1 where mask (over their Grams) is set
        return lambda mask: torch.cat([units[i][mask[starts[i] - starts[lo]:starts[i + 1] - starts[lo]]]
                                       for i in range(lo, hi)])

    if probe and len(units) > 1 and not isinstance(scale, torch.Tensor):
        gram[:sizes[0]] = gram_of(units[0])
        head, redo = _nuclear_from_gram(gram[:sizes[0]], scale, tol, pick(0, 1))
        direct = float(redo.double().mean()) > 0.5  # most need svdvals: skip the rest's Grams and eigenvalues
        if with_gram or not direct:
            fill(1)
        tail = svdvals(torch.cat(units[1:])).sum(dim=-1) if direct else _nuclear_from_gram(
            gram[sizes[0]:], scale, tol, pick(1, len(units)))[0]
        out = torch.cat([head, tail])
    else:
        fill(0)
        out, _ = _nuclear_from_gram(gram, scale, tol, pick(0, len(units)))
    out = out.view(*lead)
    return (out, gram.view(*lead, k, k)) if with_gram else out


def _nuclear_from_gram(gram: torch.Tensor, scale: torch.Tensor | float, tol: float, pick):
    """(‖D‖_*, where svdvals was needed) from the Grams' eigenvalues; ``pick(mask)`` returns the matrices D of
    the masked batch entries for ``svdvals``; see ``nuclear_norms``."""
    k = gram.shape[-1]
    lam = eigvalsh(gram).clamp_min(0)
    delta = 10 * math.sqrt(k) * torch.finfo(gram.dtype).eps * lam[..., -1:]
    sigma = torch.sqrt(lam)
    bound = torch.where(lam > 2 * delta, delta / (2 * sigma.clamp_min(torch.finfo(gram.dtype).tiny)),
                        torch.sqrt(2 * delta)).sum(dim=-1)
    out = sigma.sum(dim=-1)
    redo = bound > tol * torch.as_tensor(scale, dtype=gram.dtype, device=gram.device)
    if bool(redo.any()):
        out[redo] = svdvals(pick(redo)).sum(dim=-1)
    return out, redo


def lstsq_cutoff(s_max: torch.Tensor | float, rows: int, width: int, dtype: torch.dtype) -> torch.Tensor | float:
    """numpy lstsq's rank cutoff, eps·max(rows, width)·σ_max: singular values of a rows × width matrix at or below it
    count as zero in a least-squares fit (the one rule of every fit from singular values)."""
    return eps(dtype) * max(rows, width) * s_max


def least_squares_gains(s: torch.Tensor, ridge: float, rows: int, width: int) -> torch.Tensor:
    """Least-squares gains g_k = s_k/(s_k² + λ); for λ = 0, 1/s_k above numpy's lstsq cutoff
    eps·max(rows, width)·s_max and 0 below (the minimum-norm solution) (the one rank cutoff of every least-squares fit
    from singular values)."""
    if ridge > 0:
        return s / (s * s + ridge)
    cutoff = lstsq_cutoff(s.max(), rows, width, s.dtype)
    keep = s > cutoff
    return torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))


def eigen_rank_cutoff(eigenvalues: torch.Tensor, size: int) -> torch.Tensor:
    """Eigenvalues of a size × size Gram or covariance matrix formed in floating point below this are rounding
    noise: 10·size·eps·λ_max. (Forming the Gram squares the singular values, so its eigenvalues resolve only
    ~size·eps·λ_max, not the eps·σ_max of :func:`least_squares_gains`' singular values.)"""
    return eigenvalues.max().clamp_min(0) * (10 * max(size, 1) * eps(eigenvalues))


NUCLEAR_METHODS = ("auto", "svd", "gram")


def _singular_values_and_polar(M: torch.Tensor, atol: float, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ of M, polar factor U_r V_rᵀ over σ > max(atol, max(shape)·eps·σ_max)), by the chosen method.

    ``svd``: one thin SVD (LAPACK gesdd on the CPU). ``gram``: eigenvectors V of the small Gram matrix AᵀA
    (A = M or Mᵀ, whichever is tall; eigh in float64), then B = AV and σ_i = ‖B e_i‖. Reading σ off B rather than
    off the eigenvalues keeps the rounding error at eps·σ_max (not √eps·σ_max) for small and zero σ; repeated σ
    need no care since any orthonormal basis of their eigenspace gives the same σ and polar factor.
    ``auto``: ``gram`` on CUDA (cuSOLVER's SVD of 768×384 takes ~5× longer than eigh of 384×384), else ``svd``.
    """
    if method == "auto":
        method = "gram" if M.is_cuda else "svd"
    eps = torch.finfo(M.dtype).eps
    if method == "svd":
        try:
            U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        except torch.linalg.LinAlgError:  # the SVD did not converge (rare, badly scaled M): the Gram route below
            pass
        else:
            keep = S > torch.clamp(S.max() * max(M.shape) * eps, min=atol)
            return S, (U * keep.to(M.dtype)) @ Vh
    transposed = M.shape[0] < M.shape[1]
    A = M.T if transposed else M
    _, V = torch.linalg.eigh((A.T @ A).to(torch.float64))
    V = V.to(A.dtype)
    B = A @ V
    S = torch.linalg.vector_norm(B, dim=0)
    keep = S > torch.clamp(S.max() * max(M.shape) * eps, min=atol)
    polar = (B * torch.where(keep, 1.0 / torch.where(keep, S, torch.ones_like(S)), torch.zeros_like(S))) @ V.T
    return S, (polar.T if transposed else polar)


class _NuclearNorm(torch.autograd.Function):
    """‖M‖_* = Σ σ_i(M) with gradient U_r V_rᵀ (the polar factor on the singular values above the tolerance).

    torch's SVD backward differentiates U and V and divides by σ_i² − σ_j², which is NaN/inf for repeated or zero
    singular values; the nuclear norm needs neither: its (minimum-norm sub)gradient is the polar factor.
    """

    @staticmethod
    def forward(ctx, M: torch.Tensor, atol: float, method: str) -> torch.Tensor:  # noqa: D102
        S, polar = _singular_values_and_polar(M, atol, method)
        ctx.save_for_backward(polar)
        return S.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: D102
        (polar,) = ctx.saved_tensors
        return grad * polar, None, None


def nuclear_norm(M: torch.Tensor, atol: float = 0.0, method: str = "auto") -> torch.Tensor:
    """‖M‖_* of a 2-D tensor, with gradient U_r V_rᵀ: finite for repeated and zero singular values.

    Singular values at or below max(``atol``, max(shape)·eps·σ_max) (``numpy.linalg.matrix_rank``'s relative
    tolerance) count as zero in the gradient; ``atol`` makes an M that is pure rounding noise count as zero
    rather than as full rank. ``method``: "svd", "gram" (eigh of the small Gram matrix, fast on GPUs) or "auto"
    (gram on CUDA, svd elsewhere).
    """
    if method not in NUCLEAR_METHODS:
        raise UserError(f"nuclear-norm method must be one of {', '.join(NUCLEAR_METHODS)}, got {method!r}")
    return _NuclearNorm.apply(M, float(atol), method)


def safe_sqrt(s: torch.Tensor) -> torch.Tensor:
    """√max(0, s) with gradient 1/(2√s) for s > 0 and 0 for s ≤ 0 (no inf·0 = NaN at the minimum)."""
    positive = s > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, s, torch.ones_like(s))), torch.zeros_like(s))


def safe_arccos(r: torch.Tensor) -> torch.Tensor:
    """arccos(clip(r, 0, 1)) with gradient −1/√(1 − r²) for 0 ≤ r < 1 and 0 for r ≥ 1 (the minimum)."""
    r = r.clamp(min=0.0)
    below = r < 1
    return torch.where(below, torch.arccos(torch.where(below, r, torch.zeros_like(r))), torch.zeros_like(r))
