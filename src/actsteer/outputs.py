"""Writing outputs safely: an existing output is refused unless replacing it is asked for, a
file or folder is written beside its destination and renamed into place only when complete
(an interrupted or failed write leaves the old one untouched), with the permissions the user's
umask gives (safetensors and tempfile would leave 0600)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from actsteer.errors import ActSteerError


def check_output(path: str | Path, force: bool = False, option: str = "--output") -> None:
    """A clear error when `path` is an existing file or a non-empty folder, unless `force`."""
    path = Path(path)
    if force or not path.exists():
        return
    if path.is_dir():
        if not any(path.iterdir()):
            return
        raise ActSteerError(
            f"{option} {path} is a folder that is not empty; choose a new or empty folder, or "
            "pass --force (Python: force=True) to replace it, its whole contents"
        )
    raise ActSteerError(
        f"{option} {path} exists; choose another path, or pass --force (Python: force=True) "
        "to replace it"
    )


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _give_usual_permissions(path: Path) -> None:
    """Files 0666 and folders 0777, less the umask, as open() and mkdir() would give."""
    mask = _umask()
    if path.is_dir():
        for folder, _, files in os.walk(path):
            os.chmod(folder, 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(folder, name), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def _scratch_name(path: Path, kind: str) -> str:
    return f".{path.stem}.{os.getpid()}.{kind}{path.suffix}"


@contextmanager
def written_file(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix) to write to; when the block succeeds it is
    renamed over `path` in one step, when it fails it is removed and `path` stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(_scratch_name(path, "partial"))
    try:
        yield scratch
        _give_usual_permissions(scratch)
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)


@contextmanager
def written_folder(directory: str | Path) -> Iterator[Path]:
    """A new empty folder beside `directory` to write to; when the block succeeds it replaces
    `directory` (whose old contents are removed, never mixed in), when it fails it is removed
    and `directory` stays as it was."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield scratch
        _give_usual_permissions(scratch)
        if directory.is_dir() and not directory.is_symlink():
            old = directory.with_name(_scratch_name(directory, "old"))
            os.replace(directory, old)
            os.replace(scratch, directory)
            shutil.rmtree(old)
        else:
            if directory.exists() or directory.is_symlink():
                directory.unlink()
            os.replace(scratch, directory)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
