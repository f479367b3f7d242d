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
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from repsim.errors import UserError

ArrayLike = Any  # np.ndarray | torch.Tensor

#: the factor c of the zero-variance rule ‖X_c‖_F ≤ c·√n·eps·‖X‖_F (module docstring)
ZERO_VARIANCE_FACTOR = 16.0
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
