"""Finding evaluation data: local files (the default), or Hugging Face hub datasets ("hf:...").

Local files are looked up under a data root: $ACTSTEER_DATA if set, else the first
`shared/data` folder found next to the working directory or the source tree (the layout of
this project's checkouts). A task's `data` argument overrides its default file. A value
"hf:ID[:CONFIG[:SPLIT]]" loads a hub dataset with the optional `datasets` package instead.
A missing file is an ActSteerError naming it.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from actsteer.errors import ActSteerError

DATA_ENV = "ACTSTEER_DATA"
HUB_PREFIX = "hf:"
T = TypeVar("T")


def data_root() -> Path | None:
    """The folder default data files live in, or None when none can be found."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "data"
            if candidate.is_dir():
                return candidate
    return None


def is_hub(data: str | Path | None) -> bool:
    """Whether a data argument names a hub dataset ("hf:ID[:CONFIG[:SPLIT]]")."""
    return isinstance(data, str) and data.startswith(HUB_PREFIX)


def resolve_file(data: str | Path | None, default: str, what: str) -> Path:
    """The local file for a task: `data` if given, else `default` under the data root."""
    if data is not None:
        path = Path(data).expanduser()
    else:
        root = data_root()
        if root is None:
            raise ActSteerError(
                f"no data folder found for the {what} file {default!r}: pass the file with "
                f"--data PATH, or set {DATA_ENV} to the folder that holds {default}"
            )
        path = root / default
    if not path.is_file():
        hint = "" if data is not None else f" (under {DATA_ENV} or the shared/data folder)"
        raise ActSteerError(f"{what} file not found: {path}{hint}; pass the file with --data PATH")
    return path


def read_jsonl(path: Path, what: str) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a malformed line is an error naming file and line."""
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ActSteerError(f"{what} file {path}, line {number}: {err.msg}") from None
    if not rows:
        raise ActSteerError(f"{what} file {path} has no rows")
    return rows


def require_keys(row: dict[str, Any], keys: Sequence[str], where: str) -> None:
    """Raise a clear error when a data row lacks one of the fields a task reads."""
    missing = [k for k in keys if k not in row]
    if missing:
        raise ActSteerError(f"{where}: missing field(s) {', '.join(missing)}")


def load_hub(data: str, default_config: str | None, default_split: str) -> list[dict[str, Any]]:
    """Rows of a hub dataset named "hf:ID[:CONFIG[:SPLIT]]" (needs the `datasets` package)."""
    parts = data[len(HUB_PREFIX) :].split(":")
    if not parts[0] or len(parts) > 3:
        raise ActSteerError(f"hub data {data!r} must look like hf:ID[:CONFIG[:SPLIT]]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else default_config
    split = parts[2] if len(parts) > 2 and parts[2] else default_split
    try:
        import datasets
    except ImportError:
        raise ActSteerError(
            f"reading the hub dataset {name!r} needs the `datasets` package (pip install "
            "datasets) and hub access; or pass a local file with --data PATH"
        ) from None
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # network, unknown id, unknown split: all user-facing
        raise ActSteerError(
            f"could not load hub dataset {name!r} ({config}, {split}): {err}"
        ) from None
    return [dict(row) for row in dataset]


def fixed_subset(items: Sequence[T], n: int | None, seed: int) -> tuple[list[int], list[T]]:
    """A documented, reproducible subset: shuffle indices with `seed`, keep the first n.

    n=None keeps everything in the original order. Returns (indices, items).
    """
    indices = list(range(len(items)))
    if n is not None:
        if n < 1:
            raise ActSteerError(f"subset size must be at least 1, got {n}")
        random.Random(seed).shuffle(indices)
        indices = sorted(indices[:n])
    return indices, [items[i] for i in indices]
