"""Input validation, the numpy/torch boundary, and the one centring-and-scaling rule shared by every metric.

Every public metric accepts numpy arrays or torch tensors of shape (n, width) (also lists, pandas frames,
negative-stride and Fortran-order arrays, integer and boolean dtypes, sparse tensors, which are densified), rows
paired between the two sides. Inputs are converted once to torch tensors (float64 unless a dtype is given),
validated with explicit messages (complex input is refused), and results go back in the caller's type: a Python
float for numpy input, a 0-dim tensor for torch input (on the input's device).

Scale. Every metric is invariant to isotropic scaling, so each side may be multiplied by any power of two first;
that is exact in binary floating point. :func:`centred_unit` (and the engines that use its pieces) centres and
scales directly when the data's squares stay well inside the float range (``SAFE_SQUARES``), and otherwise first
divides the side by 2^e with 2^(e−1) ≤ max|X| < 2^e, so data anywhere in the float64 range, subnormal included,
give the same values as data near 1.

Zero variance. The centred side X_c = X − 1μᵀ is compared with the side's own size ‖X‖_F (computed exactly as
‖X‖²_F = ‖X_c‖²_F + n‖μ‖²_F, no extra pass): centring rounds every entry with an absolute error of a few
eps·|x_ij| (the subtraction and the column mean), so identical rows leave ‖X_c‖_F of order eps·‖X‖_F, never 0.
A side is refused as having zero variance when ‖X_c‖_F ≤ ZERO_VARIANCE_FACTOR·√n·eps·‖X‖_F (eps of the
compute dtype; the √n covers the rounding of the n-term column sums, whose error grows at most like √n for
random-walk accumulation). Above that bound the centred data are at least ~16 roundings away from noise; data
whose spread is that small against their offset cannot be centred meaningfully in that dtype anyway.

Debiased self-HSIC. n(n−3)·HSIC_u(K, K) = ‖U(K)‖²_F ≥ 0 (U the U-centring) is 0 exactly when K_ij = u_i + u_j
off the diagonal, i.e. (linear kernel) the rows are a common point plus mutually orthogonal offsets: all rows
equal but one, one-hot rows. It is computed as T₁ − n/(n−2)·T₂ + T₃/((n−1)(n−2)), T₁ = ‖K‖²_F, T₂ = ‖K̃1‖²
(K̃ = K with a zero diagonal; Σ‖x_i‖⁴ for centred rows), T₃ = (1ᵀK̃1)² ((Σ‖x_i‖²)² for centred rows), so an
exact 0 comes out as rounding noise of either sign. Each term is a sum of products of length-n (or p) dot
products, each with relative error ≤ γ_n ≈ n·eps/2 (Higham's bound for recursive summation), doubled by the
squaring (n·eps); the outer sums are pairwise (≤ 64·eps/2 ≤ 8·n·eps for n ≥ 4) and the three-term combination
adds 2·eps. So the computed value's error is below (1 + 8 + 1)·n·eps·M, M = T₁ + n/(n−2)·T₂ + T₃/((n−1)(n−2))
the sum of the absolute terms, and :func:`check_self_hsic` refuses a value ≤ HSIC_ROUNDING_FACTOR·n·eps·M with
HSIC_ROUNDING_FACTOR = 32: that bound with a margin of 3 for the roundings of the factorisations some engines
start from (measured: at most 10.1·n·eps·M on exactly-zero cases). The terms assume exactly centred columns,
so a common offset c times the spread adds about c·n·eps·M more: in the in-memory engines (not the streaming
moments) an exactly-zero side offset by more than ~10× its spread can still give a rounding-noise value.
Genuine data sit far above the bound: isotropic rows give HSIC/M ≈ n/(3p) when n ≪ p.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from repsim.system.errors import UserError

ArrayLike = Any  # np.ndarray | torch.Tensor

#: the factor c of the zero-variance rule ‖X_c‖_F ≤ c·√n·eps·‖X‖_F (module docstring)
ZERO_VARIANCE_FACTOR = 16.0
#: the factor c of the debiased self-HSIC rule n(n−3)·HSIC_u ≤ c·n·eps·M (module docstring)
HSIC_ROUNDING_FACTOR = 32.0
#: squared norms (per entry, and in total) inside this range need no power-of-two rescaling first
SAFE_SQUARES = (2.0**-900, 2.0**900)


def is_torch(x: ArrayLike) -> bool:
    return isinstance(x, torch.Tensor)


def as_matrix(
    x: ArrayLike,
    name: str = "X",
    *,
    dtype: torch.dtype | None = torch.float64,
    device: torch.device | str | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """Return ``x`` as a 2-D floating torch tensor (a view where possible), validated.

    Raises :class:`UserError` (a ``ValueError``) naming ``name`` for: non-2-D input, empty input,
    NaN or inf entries.
    """
    if isinstance(x, torch.Tensor):
        t = x.to_dense() if x.layout != torch.strided else x
    else:
        if hasattr(x, "toarray") and not isinstance(x, np.ndarray):  # a scipy sparse matrix
            x = x.toarray()
        try:
            arr = np.asarray(x)
            # torch wants its own copy of read-only (e.g. memory-mapped) and negative-stride arrays
            if not arr.flags.writeable or any(st < 0 for st in arr.strides):
                arr = np.array(arr, copy=True)
            t = torch.as_tensor(arr)
        except (TypeError, ValueError) as exc:
            raise UserError(f"{name} must be a numeric array, got {type(x).__name__} "
                            f"of {getattr(np.asarray(x, dtype=object), 'dtype', '?')}") from exc
    if t.is_complex():
        raise UserError(f"{name} is complex ({t.dtype}); the metrics are defined for real features: pass the real "
                        f"part, or stack real and imaginary parts as columns")
    if t.ndim != 2:
        raise UserError(f"{name} must be 2-D (n samples × width), got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise UserError(f"{name} is empty: shape {tuple(t.shape)}")
    source = t
    if dtype is not None:
        t = t.to(dtype=dtype)
    elif not t.is_floating_point():
        t = t.to(torch.float64)
    if device is not None:
        t = t.to(device)
    if check_finite and not bool(torch.isfinite(t).all()):
        if source.dtype != t.dtype and bool(torch.isfinite(source).all()):
            raise UserError(f"{name} holds values beyond the range of {t.dtype} (the compute dtype); "
                            f"compute in float64")
        raise UserError(f"{name} contains NaN or inf")
    return t


def as_pair(
    X: ArrayLike,
    Y: ArrayLike,
    *,
    min_rows: int = 2,
    dtype: torch.dtype | None = torch.float64,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a (teacher, student) pair: both 2-D, finite, same number of rows, at least ``min_rows``.

    Both tensors end on the teacher's device (or ``device`` when given).
    """
    Xt = as_matrix(X, "X (teacher)", dtype=dtype, device=device)
    Yt = as_matrix(Y, "Y (student)", dtype=dtype, device=device if device is not None else Xt.device)
    if Xt.shape[0] != Yt.shape[0]:
        raise UserError(
            f"X (teacher) and Y (student) must have the same number of rows (paired samples), "
            f"got {Xt.shape[0]} and {Yt.shape[0]}"
        )
    if Xt.shape[0] < min_rows:
        raise UserError(f"need at least {min_rows} samples (rows), got {Xt.shape[0]}")
    return Xt, Yt


def center(X: torch.Tensor) -> torch.Tensor:
    """Subtract column means: X − 1·meanᵀ."""
    return X - X.mean(dim=0, keepdim=True)


def power_of_two_exponent(x: torch.Tensor) -> int | None:
    """e with 2^(e−1) ≤ max|x| < 2^e (subnormals included), or None when x is all zeros."""
    amax = float(x.detach().abs().max()) if x.numel() else 0.0
    if amax == 0.0:
        return None
    return math.frexp(amax)[1]


def scale_by_power_of_two(x: torch.Tensor, exponent: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """x·2^exponent, exact (two steps when 2^exponent alone would leave the float range); into ``out`` when given
    (which may have another floating dtype: the scaling happens before the cast)."""
    if -1074 <= exponent <= 1023:  # 2^exponent is itself a float64 (subnormal below 2^-1022): one product
        return torch.mul(x, math.ldexp(1.0, exponent), out=out)
    half = exponent // 2  # only when scaling subnormal data up: the first step cannot overflow
    return torch.mul(torch.mul(x, math.ldexp(1.0, half)), math.ldexp(1.0, exponent - half), out=out)


def variance_tolerance(n: int, dtype: torch.dtype) -> float:
    """τ of the zero-variance rule ‖X_c‖_F ≤ τ·‖X‖_F: ZERO_VARIANCE_FACTOR·√n·eps (module docstring)."""
    return ZERO_VARIANCE_FACTOR * math.sqrt(max(n, 1)) * torch.finfo(dtype).eps


def zero_variance_error(name: str, n: int, dtype: torch.dtype, what: str = "the metric") -> UserError:
    return UserError(f"{name} has zero variance: all {n} rows are equal up to rounding (‖X − mean‖_F ≤ "
                     f"{variance_tolerance(n, dtype):.1e}·‖X‖_F in {str(dtype).replace('torch.', '')}); "
                     f"{what} is undefined")


def safe_squares(centred_sq: float, offset_sq: float, entries: int) -> bool:
    """Whether squares computed without rescaling can be trusted: ‖X‖²_F = ``centred_sq`` + ``offset_sq``
    (‖X_c‖²_F and n‖μ‖²) finite and inside SAFE_SQUARES, scaled by the number of entries at the low end (so the
    largest entry's square is a normal number and nothing that matters was lost to the subnormal range)."""
    total = centred_sq + offset_sq
    lo, hi = SAFE_SQUARES
    return math.isfinite(total) and lo * max(entries, 1) <= total <= hi


def check_spread(centred_sq: float, offset_sq: float, n: int, dtype: torch.dtype, name: str,
                 what: str = "the metric") -> None:
    """Raise :func:`zero_variance_error` when ‖X_c‖²_F ≤ τ²·‖X‖²_F (τ = :func:`variance_tolerance`)."""
    tau = variance_tolerance(n, dtype)
    if not centred_sq > tau * tau * (centred_sq + offset_sq):
        raise zero_variance_error(name, n, dtype, what)


def self_hsic_magnitude(gram_sq: Any, diag_sq: Any, total_sq: Any, n: int) -> Any:
    """M = T₁ + n/(n−2)·T₂ + T₃/((n−1)(n−2)): the absolute terms of n(n−3)·HSIC_u(K, K) (module docstring)."""
    return gram_sq + n / (n - 2) * diag_sq + total_sq / ((n - 1) * (n - 2))


def debiased_hsic(gram_dot: Any, diag_dot: Any, total_prod: Any, n: int) -> Any:
    """n(n−3)·HSIC_u(K, L) (Song et al.'s unbiased HSIC) of linear kernels of centred rows, elementwise:
    ⟨K, L⟩ − n/(n−2)·Σᵢ KᵢᵢLᵢᵢ + (tr K)(tr L)/((n−1)(n−2)), i.e. ``gram_dot`` = ‖XᵀY‖²_F, ``diag_dot`` =
    Σᵢ‖xᵢ‖²‖yᵢ‖², ``total_prod`` = ‖X‖²_F‖Y‖²_F (for centred rows K̃1 = −diag K and 1ᵀK̃1 = −tr K)."""
    return gram_dot - n / (n - 2) * diag_dot + total_prod / ((n - 1) * (n - 2))


def debiased_self_hsic(gram_sq: Any, diag_sq: Any, total_sq: Any, n: int) -> tuple[Any, Any]:
    """(n(n−3)·HSIC_u(K, K), M) from T₁ = ‖K‖²_F, T₂ = ‖K̃1‖², T₃ = (1ᵀK̃1)² (module docstring), elementwise."""
    return debiased_hsic(gram_sq, diag_sq, total_sq, n), self_hsic_magnitude(gram_sq, diag_sq, total_sq, n)


def check_self_hsic(value: Any, magnitude: Any, n: int, dtype: torch.dtype, name: str) -> None:
    """Raise UserError unless every debiased self-HSIC ``value`` (n(n−3)·HSIC_u, any scale) exceeds
    HSIC_ROUNDING_FACTOR·n·eps·``magnitude`` (M of the module docstring); ``value`` may be a tensor of layers."""
    v = torch.as_tensor(value).detach().reshape(-1).double()
    m = torch.as_tensor(magnitude).detach().reshape(-1).double()
    bad = torch.nonzero(~(v > HSIC_ROUNDING_FACTOR * n * torch.finfo(dtype).eps * m)).flatten().tolist()
    if bad:
        which = f" (layer(s) {bad})" if v.numel() > 1 else ""
        raise UserError(f"the debiased HSIC of {name}{which} with itself is not positive beyond rounding (n={n}): "
                        "0 exactly when the rows are a common point plus mutually orthogonal offsets (e.g. all rows "
                        "equal but one); debiased CKA is undefined")


def centred_unit(X: torch.Tensor, name: str = "X", center: bool = True, what: str = "the metric") -> torch.Tensor:
    """X̃ = X_c/‖X_c‖_F (X_c = X − 1μᵀ, or X itself with ``center=False``), in X's dtype, for data anywhere in the
    float range, refusing zero variance by the relative rule of the module docstring and NaN/inf entries.
    Differentiable (no in-place work on X), so the losses use it too."""
    n = X.shape[0]
    for attempt in (0, 1):
        if attempt:  # outside the safe range: divide by a power of two first (exact) and redo
            exponent = power_of_two_exponent(X)
            if exponent is None:  # all zeros
                raise zero_variance_error(name, n, X.dtype, what)
            X = scale_by_power_of_two(X, -exponent)
        if center:
            mean = X.mean(dim=0, keepdim=True)
            Xc = X - mean
            offset = n * mean.detach().square().sum()
        else:
            Xc, offset = X, X.new_zeros(())
        sq = Xc.square().sum()  # ‖X_c‖²_F, differentiable (the losses' gradients flow through the scaling)
        sums = torch.stack([sq.detach(), offset])
        centred_sq, offset_sq = sums.tolist()  # one device sync per side
        if not math.isfinite(centred_sq + offset_sq) and not bool(torch.isfinite(X.detach()).all()):
            raise UserError(f"{name} contains NaN or inf")
        if attempt or safe_squares(centred_sq, offset_sq, X.numel()):
            check_spread(centred_sq, offset_sq, n, X.dtype, name, what)
            return Xc / sq.sqrt()
    raise AssertionError("unreachable")


def unit_frobenius(X: torch.Tensor, name: str = "X") -> torch.Tensor:
    """X / ‖X‖_F for data anywhere in the float range; UserError when X is 0."""
    return centred_unit(X, name, center=False)


def prepare(X: torch.Tensor, center_: bool = True, name: str = "X") -> torch.Tensor:
    """The convention of docs/measures.md §2: optionally center columns, then scale to unit Frobenius norm
    (:func:`centred_unit`: any scale, zero variance judged relative to the data's size)."""
    return centred_unit(X, name, center=center_)


def to_output(value: torch.Tensor, like: ArrayLike) -> float | torch.Tensor:
    """A Python float for numpy (or list) input, the 0-dim tensor itself for torch input."""
    if is_torch(like):
        return value
    return float(value.detach().cpu())
