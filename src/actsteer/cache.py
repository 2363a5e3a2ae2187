"""Where actsteer keeps what it makes once per machine: $ACTSTEER_CACHE or ~/.cache/actsteer."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder (dequantised offline models, the compiled kernel)."""
    return Path(os.environ.get("ACTSTEER_CACHE", Path.home() / ".cache" / "actsteer"))
