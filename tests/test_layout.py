"""The package's layering: no module imports a private name (``_x``) from another module.

The layer order (cli > theory > distill > analysis > activations > measures > system) and the absence of import
cycles are checked by import-linter (``lint-imports``, contracts in pyproject.toml), which CI runs after the tests.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "repsim"


def private_imports(source: str, where: str) -> list[str]:
    """``where:line name`` for every ``from repsim... import _name`` (or a relative import) in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0 and not (node.module or "").startswith("repsim"):
            continue
        found += [f"{where}:{node.lineno} {a.name}" for a in node.names
                  if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_the_scanner_finds_private_imports_from_repsim_only():
    source = ("from repsim.measures.allpairs import public, _hidden\n"
              "def f():\n    from .sibling import _also\n    from numpy import _not_ours\n"
              "    from repsim import __version__\n")
    assert private_imports(source, "m.py") == ["m.py:1 _hidden", "m.py:3 _also"]


def test_no_module_imports_a_private_name_from_another():
    offenders = [hit for path in sorted(PACKAGE.rglob("*.py"))
                 for hit in private_imports(path.read_text(), str(path.relative_to(PACKAGE.parent)))]
    assert offenders == [], "private names imported across modules:\n" + "\n".join(offenders)
