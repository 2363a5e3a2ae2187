"""Texts as people have them.

`read_texts` reads one list of texts from
- a `.txt` file: one text per line (blank lines skipped);
- a `.jsonl` file: one JSON object per line, the text under `field` (default "text"), or one
  JSON string per line;
- a `.csv` file: the text in column `field` (default "text"), the first row naming columns;
- `hf:ID[:CONFIG[:SPLIT]]`: a hub dataset (split "train" by default), the text under `field`.

`package_texts` reads the sentence sets that ship with actsteer (neutral, football).

Above the evaluation package, whose hub reader it uses; the chat template is `actsteer.chat`.
"""

from __future__ import annotations

import csv
import importlib.resources
import json
from pathlib import Path
from typing import Any

from actsteer.errors import ActSteerError

HUB_PREFIX = "hf:"


def _field_of(row: Any, field: str | None, where: str) -> str:
    if isinstance(row, str):
        return row
    name = field or "text"
    if not isinstance(row, dict) or name not in row:
        keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
        raise ActSteerError(
            f"{where} has no field {name!r} (it has: {keys}); choose one with --field"
        )
    return str(row[name])


def _read_jsonl(path: Path, field: str | None, what: str) -> list[str]:
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ActSteerError(f"{what} file {path} line {number} is not JSON: {err}") from None
        texts.append(_field_of(row, field, f"{what} file {path} line {number}"))
    return texts


def _read_csv(path: Path, field: str | None, what: str) -> list[str]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        name = field or "text"
        if reader.fieldnames is None or name not in reader.fieldnames:
            columns = ", ".join(reader.fieldnames or [])
            raise ActSteerError(
                f"{what} file {path} has no column {name!r} (it has: {columns or 'none'}); "
                "choose one with --field"
            )
        return [row[name] or "" for row in reader]


def _read_hub(spec: str, field: str | None, what: str) -> list[str]:
    from actsteer.evaluation.data import load_hub

    instead = f"give the {what} as a local .txt, .jsonl or .csv file instead"
    rows = load_hub(spec, local=instead)
    return [_field_of(row, field, f"{what} dataset {spec}") for row in rows]


def read_texts(source: str | Path, what: str = "texts", field: str | None = None) -> list[str]:
    """The non-empty texts of a .txt, .jsonl or .csv file or an hf: dataset (see the module
    docstring); anything missing or malformed is a clear error saying what to change."""
    if isinstance(source, str) and source.startswith(HUB_PREFIX):
        texts = _read_hub(source, field, what)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            raise ActSteerError(f"{what} {path} is a folder, not a text file (one text per line)")
        if not path.is_file():
            raise ActSteerError(f"{what} file not found: {path}")
        suffix = path.suffix.lower()
        if field is not None and suffix not in (".jsonl", ".csv"):
            raise ActSteerError(f"--field is for .jsonl, .csv and hf: data, not {path.name}")
        try:
            if suffix == ".jsonl":
                texts = _read_jsonl(path, field, what)
            elif suffix == ".csv":
                texts = _read_csv(path, field, what)
            else:
                texts = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise ActSteerError(f"{what} file {path} is not UTF-8 text: {err}") from None
    texts = [text.strip() for text in texts if text and text.strip()]
    if not texts:
        raise ActSteerError(f"{what} {source} has no text (one text per line expected)")
    return texts


def package_texts(name: str) -> list[str]:
    """The sentences of one of the package's own sets: "neutral" or "football" (120 each,
    src/actsteer/data/NAME.txt; the demo's and the examples' texts)."""
    text = importlib.resources.files("actsteer").joinpath("data", f"{name}.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]
