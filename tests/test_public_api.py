"""The public Python names (README.md) resolve, and each lazy name is the object its module defines."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

import repsim


@pytest.mark.parametrize("name", sorted(repsim._LAZY))
def test_lazy_name_is_the_module_object(name):
    assert getattr(repsim, name) is getattr(importlib.import_module(repsim._LAZY[name]), name)


@pytest.mark.parametrize("name", sorted(repsim._SUBMODULES))
def test_submodule_imports(name):
    assert getattr(repsim, name) is importlib.import_module(f"repsim.{name}")


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'procrustes_distance'"):
        repsim.procrustes_distance  # noqa: B018


def test_public_names_and_return_types():
    for module in repsim._SUBMODULES:  # importing submodules must not shadow the public functions
        importlib.import_module(f"repsim.{module}")
    rng = np.random.RandomState(0)
    X, Y = rng.randn(20, 5), rng.randn(20, 3)
    for fn in (repsim.procrustes, repsim.gram_frobenius, repsim.cka, repsim.projection_residual):
        assert isinstance(fn(X, Y), float)
        out = fn(torch.from_numpy(X), torch.from_numpy(Y))
        assert isinstance(out, torch.Tensor) and out.ndim == 0
        assert float(out) == pytest.approx(fn(X, Y), rel=1e-12, abs=1e-12)
    assert set(repsim.pairwise([X], [Y])) == set(repsim.DEFAULT_METRICS)
    assert callable(repsim.compare) and isinstance(repsim.Comparison, type)
    for loss in ("ProcrustesLoss", "GramFrobeniusLoss", "CKALoss", "ProjectionLoss"):
        assert issubclass(getattr(repsim.measures.losses, loss), torch.nn.Module)


def _subcommand_helps(command: str) -> dict[str, str]:
    from repsim.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return {a.dest: a.help or "" for a in sub._actions}


@pytest.mark.parametrize("command", ["compare", "extract", "check"])
def test_help_says_what_the_data_options_do(command):
    """--max-samples keeps a seeded random subset (repsim.activations.data.subsample), and --data takes every file
    format
    repsim.activations.data reads."""
    from repsim.activations.data import FILE_FORMATS

    helps = _subcommand_helps(command)
    assert "random" in helps["max_samples"] and "--seed" in helps["max_samples"]
    assert all(fmt in helps["data"] for fmt in FILE_FORMATS), helps["data"]


def test_ci_runs_the_readme_test_command_and_it_is_repeatable():
    """.ci/run runs the README's test line verbatim (no profile or flag of its own), and the suite's default
    hypothesis profile is derandomised: every run draws the same examples, no example database is involved."""
    import os
    import subprocess
    from pathlib import Path

    from hypothesis import settings

    root = Path(__file__).resolve().parents[1]
    lines = (root / "README.md").read_text().splitlines()
    readme_command = lines[lines.index("# 2. the tests (CI runs exactly this line, read from this file by .ci/run, "
                                       "then `ruff check .` and `lint-imports`)") + 1]
    printed = subprocess.run(["bash", str(root / ".ci" / "run"), "--print-command"], capture_output=True, text=True,
                             check=True).stdout.strip()
    assert printed == readme_command and readme_command.endswith("python -m pytest -q")
    assert "HYPOTHESIS_PROFILE" not in (root / ".ci" / "run").read_text()
    if "HYPOTHESIS_PROFILE" not in os.environ:
        assert settings.default.derandomize and settings.default.database is None


def test_the_command_line_offers_exactly_the_pooling_modes_extraction_knows():
    from repsim.activations.pooling import POOLS
    from repsim.cli import POOL_CHOICES

    assert POOL_CHOICES == tuple(POOLS)


def test_names_that_moved_to_the_plumbing_still_resolve_with_a_warning_naming_the_new_place():
    from repsim.moved import MOVED_NAMES

    for (module, name), (new_module, new_name) in MOVED_NAMES.items():
        with pytest.warns(DeprecationWarning, match=f"{new_module}.{new_name}"):
            obj = getattr(importlib.import_module(module), name)
        target = importlib.import_module(new_module)
        for part in new_name.split("."):
            target = getattr(target, part)
        assert obj is target, (module, name)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        importlib.import_module("repsim.activations.assets").no_such_name  # noqa: B018
