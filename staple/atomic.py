"""Durable file replacement: a reader sees the old file or the new one, never a torn one.

Write to a temporary file in the same directory, fsync it, rename it over the target, fsync the
directory (without that a power cut can forget the rename). Used by :class:`~staple.FileStore`
and by :mod:`staple.sync`'s staple files for nginx, HAProxy and Envoy.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["TEMP_PREFIX", "remove_durably", "write_atomically"]

TEMP_PREFIX = ".tmp-"
"""Temporary files start with this (and end with the target's suffix): never read as data."""


def write_atomically(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` atomically and durably. ``mode`` sets the permissions
    (``mkstemp`` makes 0600 files); the directory must exist. Raises OSError."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def remove_durably(path: Path) -> bool:
    """Remove ``path`` (and make that durable); returns whether it existed. Raises OSError."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    _fsync_directory(path.parent)
    return True


def _fsync_directory(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
