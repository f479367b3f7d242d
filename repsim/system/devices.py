"""Devices and dtypes: the one place that turns a user's ``"auto"``, ``"cpu"``, ``"cuda[:i]"``, ``"mps"`` or
``"float32"`` into a :class:`torch.device` / :class:`torch.dtype`.

``"auto"`` picks the first available of CUDA, then MPS (when the caller accepts MPS), then the CPU. A device that
is named but not available, or a name torch does not know, is a :class:`~repsim.system.errors.UserError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from repsim.system.errors import UserError

#: device kinds repsim runs on
DEVICE_KINDS = ("cpu", "cuda", "mps")

#: dtype names (and their usual short spellings) -> torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "float64": torch.float64,
}
#: the compute dtypes a model may be run in (extraction, ``repsim extract --dtype``)
MODEL_DTYPES = ("float32", "bfloat16", "float16")


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def _available(kind: str) -> bool:
    return kind == "cpu" or (kind == "cuda" and torch.cuda.is_available()) or (kind == "mps" and mps_available())


def resolve_device(device: str | torch.device | None = "auto", *, kinds: Sequence[str] = DEVICE_KINDS,
                   auto: Sequence[str] = ("cuda", "mps")) -> torch.device:
    """``device`` -> :class:`torch.device`; ``None`` and ``"auto"`` pick the first available of ``auto`` (cuda, then
    mps), else the cpu.

    ``kinds`` names the device kinds the caller supports (e.g. ``("cpu", "cuda")`` where float64 is needed, which
    MPS lacks); ``auto`` the accelerators ``"auto"`` may choose (only those in ``kinds``). Raises UserError for a
    name that is not one of ``kinds`` and for a device that is not available.
    """
    if device is None or str(device).strip().lower() == "auto":
        for kind in auto:
            if kind in kinds and _available(kind):
                return torch.device(kind)
        return torch.device("cpu")
    allowed = ", ".join(["auto", *(f"{k}, {k}:N" if k == "cuda" else k for k in kinds)])
    try:
        dev = torch.device(str(device).strip().lower()) if not isinstance(device, torch.device) else device
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"unknown device {device!r}; use {allowed}") from exc
    if dev.type not in kinds:
        raise UserError(f"unknown device {device!r}; use {allowed}")
    if not _available(dev.type):
        raise UserError(f"device {device!r} requested but {dev.type.upper()} is not available; use "
                        "`device='cpu'` or `device='auto'`")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {device!r} requested but there are {torch.cuda.device_count()} CUDA devices")
    return dev


def dist_info() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside ``torch.distributed``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_dtype(dtype: Any, *, allowed: Sequence[str] | None = None) -> torch.dtype:
    """A dtype name (``"float32"``, ``"bf16"``, ...) or a :class:`torch.dtype` -> the torch dtype.

    ``allowed``: the canonical names the caller accepts (default: every entry of :data:`DTYPES`). Raises UserError
    for anything else."""
    names = list(dict.fromkeys(allowed if allowed is not None else (dtype_name(d) for d in DTYPES.values())))
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        resolved = DTYPES.get(str(dtype).strip().lower())
        if resolved is None:
            raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    if dtype_name(resolved) not in names:
        raise UserError(f"unsupported dtype {dtype_name(resolved)}; use one of {', '.join(names)}")
    return resolved


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).replace("torch.", "")


__all__ = ["DEVICE_KINDS", "DTYPES", "MODEL_DTYPES", "dist_info", "dtype_name", "mps_available", "resolve_device",
           "resolve_dtype"]
