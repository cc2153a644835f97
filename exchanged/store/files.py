"""Durable files: write to a temporary name, fsync, rename, fsync the directory."""

from __future__ import annotations

import os
from pathlib import Path

from exchanged.errors import ExchangedError


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: afterwards the file is either the old one or the new one,
    never torn, and the change survives a crash."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ExchangedError(f"cannot write {path}: {e.strerror}; nothing was changed",
                             code="io") from None
