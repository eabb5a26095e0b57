"""Crash-safe file writes: write a temporary file, fsync it, then ``os.replace`` it into place.

A reader therefore sees either the old file or the complete new one, never a torn write. Commit markers
(``DONE.json``) are written with these helpers last, so a directory with a marker is complete.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

COMMIT_MARKER = "DONE.json"
LOCK_FILE = ".lock"
#: errno values that mean "this file system will not take the write": disk full, quota, read-only, too big.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def is_no_space(exc: BaseException) -> bool:
    """True for an OSError that more attempts on the same file system cannot fix until someone frees space."""
    return isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS


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


def current_umask() -> int:
    """The process's umask, read without changing it (``/proc/self/status`` on Linux; else set and restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on clean exit fsync it and rename it over ``path``. The file gets
    the permissions any new file gets (0666 less the umask; a temporary file alone would be 0600, unreadable to
    the collaborators a project directory is shared with)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~current_umask())
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


@contextmanager
def file_lock(path: str | os.PathLike, what: str = "", say: Any = None, note: str = "") -> Iterator[str]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block.

    Waits for the holder when another process has it, after saying so once (``say``, default stderr). The
    kernel releases the lock when its holder exits, however it exits (SIGKILL included), so a dead holder
    never blocks anyone. Works across processes on one machine and, on Lustre, across nodes when the file
    system is mounted with ``-o flock`` (Polaris' ``/eagle`` and ``/grand`` are). The holder's pid and host
    (and ``note``) are written into the file to make the message useful, and the ``with`` block gets the
    previous holder's: a holder that finds its own there knows nobody held the lock since it did.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            message = f"waiting for {what or path}: locked by {holder}"
            (say or (lambda m: print(m, file=sys.stderr, flush=True)))(message)
            fcntl.flock(fd, fcntl.LOCK_EX)
        previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}{' ' + note if note else ''}\n".encode(), 0)
        except OSError:
            pass  # a full disk must not stop the lock from working; the note is informational only
        yield previous
    finally:
        os.close(fd)  # releases the lock
