"""Input validation and the numpy/torch boundary shared by every metric.

Every public metric accepts numpy arrays or torch tensors of shape (n, width), rows paired between the
two sides. Inputs are converted once to torch tensors (float64 unless a dtype is given), validated with
explicit messages, and results go back in the caller's type: a Python float for numpy input, a 0-dim
tensor for torch input (on the input's device).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from repsim.errors import UserError

ArrayLike = Any  # np.ndarray | torch.Tensor


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
        t = x
    else:
        try:
            arr = np.asarray(x)
            if not arr.flags.writeable:  # e.g. a read-only memory-mapped activation: torch wants its own copy
                arr = arr.copy()
            t = torch.as_tensor(arr)
        except (TypeError, ValueError) as exc:
            raise UserError(f"{name} must be a numeric array, got {type(x).__name__}") from exc
    if t.ndim != 2:
        raise UserError(f"{name} must be 2-D (n samples × width), got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise UserError(f"{name} is empty: shape {tuple(t.shape)}")
    if dtype is not None:
        t = t.to(dtype=dtype)
    elif not t.is_floating_point():
        t = t.to(torch.float64)
    if device is not None:
        t = t.to(device)
    if check_finite and not bool(torch.isfinite(t).all()):
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


def unit_frobenius(X: torch.Tensor, name: str = "X") -> torch.Tensor:
    """X / ‖X‖_F. Raises UserError when ‖X‖_F is 0 (e.g. constant features after centering)."""
    norm = torch.linalg.matrix_norm(X)
    if not bool(norm > 0):
        raise UserError(f"{name} has zero variance (all rows equal after centering); the metric is undefined")
    return X / norm


def prepare(X: torch.Tensor, center_: bool = True, name: str = "X") -> torch.Tensor:
    """The convention of DESIGN.md §3: optionally center columns, then scale to unit Frobenius norm."""
    if center_:
        X = center(X)
    return unit_frobenius(X, name)


def to_output(value: torch.Tensor, like: ArrayLike) -> float | torch.Tensor:
    """A Python float for numpy (or list) input, the 0-dim tensor itself for torch input."""
    if is_torch(like):
        return value
    return float(value.detach().cpu())
