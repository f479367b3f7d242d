"""The documentation is the repository's own: nothing cites a file outside it, every test a page names exists,
and every relative link resolves."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))

# contract files that live outside the repository; spelt in pieces so this file does not cite them itself
CONTRACT, LIST, SHARED = "DESI" + "GN", "PIT" + "FALL", "/work/" + "shared"
OUTSIDE = re.compile(rf"\b(?:{CONTRACT}|{LIST}S?)\b|{SHARED}")


def tracked_files(*patterns: str) -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--", *patterns], cwd=ROOT, capture_output=True,
                                check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in listed.split("\0") if name]


def lines_matching(pattern: re.Pattern, files: list[Path]) -> list[str]:
    """``path:line: text`` of every line of the existing ``files`` that ``pattern`` finds something in."""
    found = []
    for path in files:
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:160]}")
    return found


def test_the_docs_exist():
    assert {p.name for p in DOCS} >= {"measures.md", "pitfalls.md", "activations.md"}


def test_no_tracked_file_cites_a_file_outside_the_repository():
    files = tracked_files("*.py", "*.md", "*.toml", "*.txt", "*.cfg", "*.json", ".ci/*")
    assert {ROOT / "README.md", ROOT / "repsim" / "measures" / "functions.py", ROOT / "pyproject.toml"} <= set(files)
    assert lines_matching(OUTSIDE, files) == []


def test_the_pattern_catches_the_forms_citations_take():
    for cited in (f"see {CONTRACT}.md §3", f"({CONTRACT} §6)", f"{LIST}S 10", f"{LIST} 8", f"{LIST}S.md",
                  f"({CONTRACT}/issue)", f"{SHARED}/x"):
        assert OUTSIDE.search(cited), cited
    for fine in ("docs/pitfalls.md, item 10", "a least-squares design matrix", "docs/measures.md §3"):
        assert not OUTSIDE.search(fine), fine


def _defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


CITATION = re.compile(r"(tests/[\w/]+\.py)?::(\w+)")


def cited_tests(text: str) -> list[tuple[str, str]]:
    """(file, test) for every `tests/FILE.py::name`; a bare `::name` refers to the file cited last before it."""
    found, current = [], None
    for match in CITATION.finditer(text):
        current = match.group(1) or current
        assert current is not None, f"::{match.group(2)} without a file before it"
        found.append((current, match.group(2)))
    return found


@pytest.mark.parametrize("page", DOCS + [ROOT / "README.md"], ids=lambda p: p.name)
def test_cited_tests_exist(page):
    missing = []
    for file, name in cited_tests(page.read_text(encoding="utf-8")):
        path = ROOT / file
        if not path.is_file() or name not in _defined_tests(path):
            missing.append(f"{file}::{name}")
    assert missing == []


def test_the_citation_parser_follows_bare_names_to_their_file():
    text = "`tests/a.py::x`, `::y` and `tests/b.py::z`, `::w`"
    assert cited_tests(text) == [("tests/a.py", "x"), ("tests/a.py", "y"), ("tests/b.py", "z"), ("tests/b.py", "w")]


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", DOCS + [ROOT / "README.md"], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = [target for target in LINK.findall(page.read_text(encoding="utf-8"))
              if "://" not in target and not (page.parent / target).exists()]
    assert broken == []


# a machine's absolute path: a POSIX home, temp or root folder, or a Windows drive
ABSOLUTE_PATH = re.compile(r"(?<![\w.])(?:/(?:home|root|tmp|work|Users|var/folders)/|[A-Z]:\\\\)")


def test_committed_results_hold_no_absolute_paths():
    """Results, figures' data and benchmark reports record paths relative to the repository."""
    files = tracked_files("figures/*", "examples/results/*", "benchmarks/*.md")
    assert any(p.suffix == ".csv" for p in files)
    assert lines_matching(ABSOLUTE_PATH, [p for p in files if p.suffix in {".csv", ".json", ".txt", ".md"}]) == []


def test_the_absolute_path_pattern_catches_machine_paths_only():
    for absolute in ('"out": "/work/main/examples"', "wrote to /tmp/x", "/home/me/data.csv", r"C:\\Users\\me"):
        assert ABSOLUTE_PATH.search(absolute), absolute
    for fine in ("examples/results/distill_sst", "figures/default_results.csv", "1/tmp", "a/tmp/b", "MB/s"):
        assert not ABSOLUTE_PATH.search(fine), fine
