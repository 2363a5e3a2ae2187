"""Finding evaluation data: a given file or hub dataset, a local data folder, or the hub.

Each task reads, in this order:

1. its `data` argument (CLI: --data) when given: a local file, or "hf:ID[:CONFIG[:SPLIT]]"
   for a Hugging Face hub dataset (CONFIG and SPLIT default to the task's own);
2. else its default file under the folder named by $ACTSTEER_DATA, when that is set (this
   project's tests, CI and benchmarks set it to the checkout's ../shared/data);
3. else its conventional hub dataset (RealToxicityPrompts, TruthfulQA, MMLU, WikiText-2), read
   with the `datasets` package of the `eval` extra (pip install 'actsteer[eval]'). The concept
   task has no hub dataset: it needs $ACTSTEER_DATA or `data`.

Nothing is searched for up the directory tree. `resolve_data` returns the source actually
used (a file's Path, or a complete "hf:ID:CONFIG:SPLIT"), which tasks record as
`settings["data"]`. A missing file, a missing `datasets` package and an unreachable hub are
each an ActSteerError of one line that says what to do.
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
EVAL_EXTRA = "pip install 'actsteer[eval]'"
T = TypeVar("T")

#: A task's hub default: (dataset id, config or None, split).
HubDefault = tuple[str, str | None, str]


def data_root() -> Path | None:
    """The local data folder: $ACTSTEER_DATA when set (it must be a directory), else None."""
    value = os.environ.get(DATA_ENV)
    if not value:
        return None
    root = Path(value).expanduser()
    if not root.is_dir():
        raise ActSteerError(
            f"{DATA_ENV}={value} is not a directory: point it at the folder that holds the "
            f"evaluation data, or unset it to read the tasks' hub datasets"
        )
    return root


def is_hub(data: str | Path | None) -> bool:
    """Whether a data argument names a hub dataset ("hf:ID[:CONFIG[:SPLIT]]")."""
    return isinstance(data, str) and data.startswith(HUB_PREFIX)


def parse_hub(
    data: str, default_config: str | None = None, default_split: str = "train"
) -> tuple[str, str | None, str]:
    """(id, config, split) of "hf:ID[:CONFIG[:SPLIT]]"; empty or absent parts take defaults."""
    parts = data[len(HUB_PREFIX) :].split(":")
    if not parts[0] or len(parts) > 3:
        raise ActSteerError(f"hub data {data!r} must look like hf:ID[:CONFIG[:SPLIT]]")
    config = parts[1] if len(parts) > 1 and parts[1] else default_config
    split = parts[2] if len(parts) > 2 and parts[2] else default_split
    return parts[0], config, split


def hub_spec(name: str, config: str | None, split: str) -> str:
    """The complete "hf:ID:CONFIG:SPLIT" of a hub dataset (CONFIG empty when it has none)."""
    return f"{HUB_PREFIX}{name}:{config or ''}:{split}"


def resolve_file(data: str | Path | None, default: str, what: str) -> Path:
    """The local file for a task: `data` if given, else `default` under $ACTSTEER_DATA."""
    if data is not None:
        path = Path(data).expanduser()
        if not path.is_file():
            raise ActSteerError(f"{what} file not found: {path}; pass the file with --data PATH")
        return path
    root = data_root()
    if root is None:
        raise ActSteerError(
            f"no local {what} file: set {DATA_ENV} to the folder that holds {default}, "
            f"or pass the file with --data PATH"
        )
    path = root / default
    if not path.is_file():
        raise ActSteerError(
            f"{what} file not found: {path} (the default {default} under "
            f"{DATA_ENV}={os.environ[DATA_ENV]}); pass the file with --data PATH"
        )
    return path


def resolve_data(
    data: str | Path | None, default: str, hub: HubDefault | None, what: str
) -> Path | str:
    """The data a task reads: a local file's Path, or a complete "hf:ID:CONFIG:SPLIT".

    `data` when given (a hub name's missing CONFIG/SPLIT are the task's); else `default` under
    $ACTSTEER_DATA when that is set; else the task's hub dataset `hub` (None: the task has no
    hub default, and this is an error saying to set $ACTSTEER_DATA or pass --data).
    """
    if is_hub(data):
        config, split = (hub[1], hub[2]) if hub is not None else (None, "train")
        return hub_spec(*parse_hub(str(data), config, split))
    if data is not None or data_root() is not None:
        return resolve_file(data, default, what)
    if hub is None:
        raise ActSteerError(
            f"the {what} data has no hub default: set {DATA_ENV} to the folder that holds "
            f"{default}, or pass the file with --data PATH"
        )
    return hub_spec(*hub)


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


def load_hub(
    data: str,
    default_config: str | None = None,
    default_split: str = "train",
    local: str = f"set {DATA_ENV} to a local data folder or pass a local file with --data PATH",
) -> list[dict[str, Any]]:
    """Rows of a hub dataset named "hf:ID[:CONFIG[:SPLIT]]" (needs the `datasets` package);
    `local` says, when the hub fails, what to give instead."""
    name, config, split = parse_hub(data, default_config, default_split)
    try:
        import datasets
    except ImportError:
        raise ActSteerError(
            f"reading the hub dataset {name!r} needs the `datasets` package: "
            f"{EVAL_EXTRA}; or {local}"
        ) from None
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # offline, unknown id, unknown split: all user-facing
        lines = str(err).strip().splitlines()
        reason = lines[0][:200] if lines else type(err).__name__
        raise ActSteerError(
            f"could not load the hub dataset {hub_spec(name, config, split)} ({reason}); {local}"
        ) from None
    return [dict(row) for row in dataset]


def read_rows(source: Path | str, what: str) -> list[dict[str, Any]]:
    """Rows of a resolved source (see `resolve_data`): a hub dataset's, or a JSON-lines file's."""
    return load_hub(source) if isinstance(source, str) else read_jsonl(source, what)


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
