"""The shape of the package: no import circle, no oversized module, the architecture page in
step with the tree, and an estimator added as one file."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "actsteer"
ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """actsteer modules a module imports anywhere in it (top level or inside functions): for
    `from X import Y`, X.Y when it is a module, else X; a subpackage's __init__ comes with its
    modules when imported from outside that subpackage."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        for target in targets:
            while target.startswith("actsteer.") and target not in known:
                target = target.rpartition(".")[0]
            parts = target.split(".")
            # the subpackages entered on the way, except the root and the importer's own
            entered = {".".join(parts[:i]) for i in range(2, len(parts))}
            found |= {p for p in entered if not name.startswith(p + ".")} & known
            found |= {target} & known
            if target == "actsteer":
                found.add(target)
    return found - {name}


def test_no_import_circle_anywhere():
    known = set(modules())
    graph = {name: imported(path, name, known) for name, path in modules().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import circle: " + " → ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_cycle_check_sees_function_local_imports(tmp_path):
    """A mutation check of the test above: a function-local import back is found."""
    path = tmp_path / "x.py"
    path.write_text("def f():\n    from actsteer.steering import Steering\n")
    assert "actsteer.steering" in imported(path, "actsteer.x", set(modules()))


def test_no_source_file_is_over_600_lines():
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert {n: c for n, c in long.items() if c > MAX_LINES} == {}


def test_the_architecture_page_lists_every_module():
    """docs/architecture.md names each module of the tree (as `name.py` or `name/`), and
    names none that does not exist."""
    text = ARCHITECTURE.read_text()
    listed = set(re.findall(r"^\| `([\w/]+(?:\.py)?)`", text, flags=re.M))
    present = set()
    for path in SRC.rglob("*.py"):
        relative = path.relative_to(SRC)
        if len(relative.parts) == 1:
            present.add(relative.name)
        else:
            present.add(f"{relative.parts[0]}/")
    assert listed == present
