"""`--threads N` sets torch's and every BLAS library's thread count once, before the command runs."""

from __future__ import annotations

import importlib

import numpy as np  # noqa: F401  (loads numpy's BLAS, whose thread count the option must set too)
import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

from repsim.cli import app as cli
from repsim.system.errors import UserError
from repsim.system.threads import set_threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    with threadpool_limits(limits=None):  # restores every BLAS/OpenMP pool on exit
        yield
    torch.set_num_threads(before)


def _blas_threads() -> set[int]:
    """Thread counts of the BLAS and OpenMP libraries loaded in this process (numpy's OpenBLAS at least)."""
    return {int(p["num_threads"]) for p in threadpool_info() if p["user_api"] in ("blas", "openmp")}


@pytest.mark.parametrize("command", ["compare", "extract", "check", "distill", "finetune"])
def test_threads_option_applies_before_the_command_runs(command, monkeypatch, restore_threads):
    seen = {}

    def handler(args):
        seen["torch"], seen["blas"] = torch.get_num_threads(), _blas_threads()
        return 0

    module, function = cli.SUBCOMMAND_HANDLERS[command]
    monkeypatch.setattr(importlib.import_module(module), function, handler)
    torch.set_num_threads(2)
    threadpool_limits(limits=2)
    assert _blas_threads() == {2}
    positional = {"compare": [], "extract": ["m"], "check": ["t", "s"], "distill": ["t", "s"], "finetune": ["m"]}
    assert cli.main([command, *positional[command], "--threads", "1"]) == 0
    assert seen["torch"] == 1
    assert seen["blas"] == {1}


def test_set_threads_sets_torch_and_blas(restore_threads):
    set_threads(1)
    assert torch.get_num_threads() == 1 and _blas_threads() == {1}
    set_threads(2)
    assert torch.get_num_threads() == 2 and _blas_threads() == {2}


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_bad_thread_counts_are_user_errors(bad, restore_threads):
    with pytest.raises(UserError, match="`threads` must be a positive integer"):
        set_threads(bad)


def test_cli_refuses_zero_threads_in_one_line(capsys, restore_threads):
    assert cli.main(["compare", "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("repsim: error: argument --threads: must be an integer ≥ 1, got 0")


def test_blas_threads_limits_inside_and_restores_on_exit(restore_threads):
    """The cached-controller context used around single products sets BLAS to n threads and puts back the
    count it found, each time it is entered."""
    from repsim.system.threads import blas_threads

    threadpool_limits(limits=2, user_api="blas")
    blas = lambda: {int(p["num_threads"]) for p in threadpool_info() if p["user_api"] == "blas"}  # noqa: E731
    for _ in range(2):
        with blas_threads(1):
            assert blas() == {1}
        assert blas() == {2}
