"""The documentation site's sources: every page of the navigation exists, and every public name
of `import actsteer` has a docstring and a place in the API reference. `make docs` builds the
site with mkdocs --strict (broken links and anchors fail it); CI runs it."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import yaml

import actsteer

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: Pages `make docs` generates before building (not in the repository).
GENERATED = {"cli.md"}


def nav_pages(entries) -> list[str]:
    pages = []
    for entry in entries:
        for value in entry.values():
            pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_page_of_the_navigation_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = nav_pages(config["nav"])
    missing = [p for p in pages if p not in GENERATED and not (DOCS / p).is_file()]
    assert missing == []
    for page in ("quickstart.md", "concepts.md", "cli.md", "serving.md", "vllm.md"):
        assert page in pages
    for page in ("llamacpp.md", "evaluation.md", "benchmarks.md", "architecture.md", "api.md"):
        assert page in pages


#: Modules the API reference renders that need an engine this environment lacks (mkdocstrings
#: reads them without importing them).
ENGINES = ("actsteer.integrations.vllm",)


def documented_objects() -> list[object]:
    """The objects the API reference renders (`::: dotted.name` lines), engines' aside."""
    found = []
    for dotted in re.findall(r"^::: ([\w.]+)$", (DOCS / "api.md").read_text(), flags=re.M):
        module, _, name = dotted.rpartition(".")
        if module not in ENGINES:
            found.append(getattr(importlib.import_module(module), name))
    return found


def test_every_public_name_has_a_docstring_and_an_api_entry():
    rendered = documented_objects()
    public = [name for name in actsteer.__all__ if name != "__version__"]
    for name in public:
        value = getattr(actsteer, name)
        assert (value.__doc__ or "").strip(), f"actsteer.{name} has no docstring"
        assert any(value is obj for obj in rendered), f"actsteer.{name} is not in docs/api.md"
    for obj in rendered:
        assert (obj.__doc__ or "").strip(), f"{obj!r} in docs/api.md has no docstring"
