"""Crash-safe file writes: write a temporary file, fsync it, then ``os.replace`` it into place.

A reader therefore sees either the old file or the complete new one, never a torn write. Commit markers
(``DONE.json``) are written with these helpers last, so a directory with a marker is complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

COMMIT_MARKER = "DONE.json"


def fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename inside it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on clean exit fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_commit_marker(directory: str | os.PathLike, info: dict[str, Any]) -> None:
    """Mark ``directory`` complete. Call only after everything else in it is written."""
    atomic_write_json(Path(directory) / COMMIT_MARKER, info)


def is_committed(directory: str | os.PathLike) -> bool:
    return (Path(directory) / COMMIT_MARKER).is_file()
