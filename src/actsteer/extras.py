"""Optional dependencies: importing one that is missing is an error naming the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from actsteer.errors import ActSteerError


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """Import `module`, or raise a clear error: `needed_for` needs `pip install actsteer[extra]`."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ActSteerError(
            f"{needed_for} needs the package {err.name or module!r}, which is not installed; "
            f"install it with: pip install 'actsteer[{extra}]'"
        ) from None
