"""Optional dependencies: importing one that is missing is an error naming the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from actsteer.errors import ActSteerError


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """Import `module`, or raise a clear error naming the extra that brings it, installed the
    way that works today (actsteer is not on PyPI yet: from its source tree or its wheel)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ActSteerError(
            f"{needed_for} needs the package {err.name or module!r}, which is not installed; "
            f'install actsteer\'s {extra!r} extra: pip install ".[{extra}]" in its source '
            f'tree, or pip install "dist/actsteer-*.whl[{extra}]" from a built wheel (pip '
            f"install 'actsteer[{extra}]' once actsteer is on PyPI)"
        ) from None
