"""CPU threads of one repsim process: torch's intra-op pool and the BLAS/OpenMP libraries, set together."""

from __future__ import annotations

import torch
from threadpoolctl import ThreadpoolController, threadpool_limits

from repsim.system.errors import UserError


def set_threads(n: int) -> None:
    """Use ``n`` CPU threads from now on: ``torch.set_num_threads(n)`` and, through threadpoolctl, every BLAS
    and OpenMP library loaded in the process (numpy's OpenBLAS, MKL, ...). Per-layer work in
    :mod:`repsim.measures.allpairs` sizes its thread pool from torch's thread count, so it follows.

    One thread is the faster choice when the cores are busy with other jobs (intra-op threads spin-wait for
    a core); ``benchmarks/RESULTS.md`` has the measurements."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"`threads` must be a positive integer, got {n!r}")
    torch.set_num_threads(n)
    threadpool_limits(limits=n)  # applies now, for the rest of the process (not used as a context manager)


_CONTROLLER = None


def blas_threads(n: int):
    """A context manager limiting the BLAS libraries loaded in the process (numpy's OpenBLAS, MKL, ...) to ``n``
    threads, restored on exit. The libraries are looked up once per process (threadpoolctl's ``threadpool_limits``
    searches the loaded libraries again on every call), so it is cheap enough to wrap single small products."""
    global _CONTROLLER
    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=n, user_api="blas")
