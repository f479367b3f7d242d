from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import make_tiny_model  # noqa: E402

# The test command (README and .ci/run alike) draws the same examples on every run: derandomised, so no example
# database is read or written and a result depends on the code only. No deadline: a loaded machine is no bug.
# HYPOTHESIS_PROFILE=explore searches new random examples and keeps failures in .hypothesis/ (for hunting bugs;
# what it finds becomes an explicit test). "ci" is kept as a name for the default.
settings.register_profile("repeatable", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("ci", parent=settings.get_profile("repeatable"))
settings.register_profile("explore", derandomize=False, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: tiny_model("bert" | "opt" | "gpt2" | "llama", seed=0, padding_side="right") -> folder path."""
    made: dict[tuple, Path] = {}

    def make(kind: str, seed: int = 0, padding_side: str = "right", **kw) -> Path:
        key = (kind, seed, padding_side, tuple(sorted(kw.items())))
        if key not in made:
            made[key] = make_tiny_model(kind, tmp_path_factory.mktemp(f"{kind}{seed}{padding_side}"), seed=seed,
                                        padding_side=padding_side, **kw)
        return made[key]

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one torch thread: on a loaded machine extra threads only spin-wait and
    contend (40× slower seen). Test modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The unpacked model/data assets (sha256-pinned and verified) of the tests' own: $REPSIM_TEST_ASSETS, else
# .pytest-assets/ in the repository (ignored by git), shared by every test session of this checkout so real-model
# tests fetch and unpack them once, and never the user's own assets cache.
TEST_ASSETS = Path(os.environ.get("REPSIM_TEST_ASSETS") or Path(__file__).resolve().parents[1] / ".pytest-assets")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own activation cache; the assets live in TEST_ASSETS."""
    monkeypatch.setenv("REPSIM_ASSETS_CACHE", str(TEST_ASSETS.expanduser()))
    monkeypatch.setenv("REPSIM_CACHE", str(tmp_path / "repsim-cache"))
