"""Rules of the test suite itself: tests do not import `benchmarks` (what both share lives in
tests/toy_t2i_world), and every test that loads the real SmolLM2 is marked `slow`."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def benchmark_imports(path: Path) -> list[str]:
    """`import benchmarks…` / `from benchmarks… import …` anywhere in a file, as 'line: module'."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        found += [f"{node.lineno}: {n}" for n in names if n.split(".")[0] == "benchmarks"]
    return found


def test_no_test_module_imports_benchmarks():
    files = sorted(TESTS.rglob("*.py"))
    assert TESTS / "test_toy_t2i.py" in files
    offenders = {str(p.relative_to(ROOT)): benchmark_imports(p) for p in files}
    assert {p: found for p, found in offenders.items() if found} == {}


def test_the_scan_sees_every_form_of_import(tmp_path):
    """A mutation check of the test above."""
    path = tmp_path / "x.py"
    path.write_text(
        "import benchmarks\nimport os, benchmarks.toy_t2i as b\n"
        "def f():\n    from benchmarks.toy_t2i.sample import load\n"
        "from . import benchmarks\nimport benchmarks_other\n"
    )
    assert benchmark_imports(path) == [
        "1: benchmarks",
        "2: benchmarks.toy_t2i",
        "4: benchmarks.toy_t2i.sample",
    ]


def test_smollm2_tests_are_marked_slow():
    """`-m "not slow"` drops a test that uses the `smol` fixture (marked by conftest's hook) and
    keeps one on a tiny config-built model, in the same module."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-m", "not slow", "tests/test_artifact.py", "tests/test_steering.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    collected = {line.strip() for line in result.stdout.splitlines() if "::" in line}
    tiny = "tests/test_artifact.py::test_round_trip_keeps_maps_info_and_outputs"
    smol = "tests/test_artifact.py::test_loading_onto_another_model_names_the_first_mismatch"
    assert tiny in collected and smol not in collected, collected
    assert not any(n.startswith("tests/test_steering.py::") for n in collected), collected
