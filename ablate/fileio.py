"""Atomic file writes: readers (other workers, a resumed run) never see half a file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that replaces ``path`` only when the block ends without error (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically."""
    with atomic_open(path) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


def writable_problem(path: str | Path, folder: bool = False) -> str | None:
    """Why ``path`` (a file, or a folder with ``folder``) cannot be created or written, or None; creates nothing.

    Callers check their outputs with it before they write anything, so that a bad path leaves no half state.
    """
    path = Path(path).expanduser()
    try:
        return _writable_problem(path, folder)
    except OSError as e:  # e.g. a parent folder that may not be listed
        return f"{path} is not accessible ({e.strerror or e})"


def _writable_problem(path: Path, folder: bool) -> str | None:
    if path.exists():
        if folder != path.is_dir():
            return f"{path} is {'a file' if folder else 'a folder'}"
        here = path if folder else path.parent
        if not os.access(path, os.W_OK) or not os.access(here, os.W_OK | os.X_OK):
            return f"{path} is not writable"
        return None
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable"
    return None
