"""Old spellings kept for one release: each still works, with a DeprecationWarning that names
its new spelling."""

from __future__ import annotations

import warnings


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that `old` is now spelled `new` (stacklevel 3: the caller of the function that
    received the old spelling)."""
    warnings.warn(
        f"{old} is now {new}; the old spelling goes away in the next release",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
