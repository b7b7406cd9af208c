"""Where verified responses persist between refreshes and restarts.

A store only keeps bytes under a CertID key; it is never trusted. The handle re-validates
whatever a store returns exactly like a response from the network (signature, CertID, times,
rollback), so a corrupt file or a poisoned shared store can at worst cost a fetch.

The optional :meth:`Store.lock` lets a shared store (Redis) elect one server of a fleet to fetch
while the others adopt its result; local stores need no lock.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from pathlib import Path

__all__ = ["FileStore", "MemoryStore", "Store"]

log = logging.getLogger("staple")


class Store(abc.ABC):
    """Async byte storage keyed by :attr:`staple.ocsp.CertId.key`."""

    @abc.abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The bytes last put under ``key``, or ``None``. May raise ``OSError``."""

    @abc.abstractmethod
    async def put(self, key: str, der: bytes, *, expires: datetime) -> None:
        """Keep ``der`` under ``key``; ``expires`` lets a store drop it once useless."""

    def lock(self, key: str, *, ttl: float) -> AbstractAsyncContextManager[bool]:
        """Hold the right to fetch for ``key`` (yields whether we got it). Local stores always
        grant it; a shared store grants it to one holder at a time, for at most ``ttl`` s."""
        return _granted()

    def watch(self, key: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` (on the loop thread) whenever another process put a new
        response under ``key``; returns a function that stops watching. A shared store uses
        this to let fleet members adopt a response at once; local stores never notify."""
        return _nothing

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections; the default store holds none."""


def _nothing() -> None:
    return None


@contextlib.asynccontextmanager
async def _granted() -> AsyncIterator[bool]:
    yield True


class MemoryStore(Store):
    """A dict: survives refreshes, not restarts. The default when no store is given."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}

    async def get(self, key: str) -> bytes | None:
        return self._data.get(key)

    async def put(self, key: str, der: bytes, *, expires: datetime) -> None:
        self._data[key] = der

    def __len__(self) -> int:
        return len(self._data)


class FileStore(Store):
    """One file per CertID in a directory, written atomically (temp file, fsync, rename).

    A crash mid-write leaves the old file or the new one, never a torn one. With a warm
    directory, a restarted server staples its first handshake even while the responder is down.
    What such a crash leaves besides (a ``.tmp-*`` file, never read as data) is removed by the
    next process's first write, once it is an hour old: no writer takes that long, so it is
    nobody's write in progress, even with several processes sharing the directory.
    """

    SUFFIX = ".ocsp"
    STALE_TEMP = 3600.0
    """Seconds after which a leftover temporary file is a crash's, and removed."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._swept = False

    def path_for(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"invalid store key {key!r}")
        return self.directory / (key + self.SUFFIX)

    async def get(self, key: str) -> bytes | None:
        return await asyncio.to_thread(self._read, self.path_for(key))

    async def put(self, key: str, der: bytes, *, expires: datetime) -> None:
        await asyncio.to_thread(self._write, self.path_for(key), der)

    @staticmethod
    def _read(path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def _write(self, path: Path, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self._swept:
            self._swept = True
            self._sweep()
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=self.SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        # Make the rename itself durable: without this a power cut can forget it.
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _sweep(self) -> None:
        """Remove temporary files left by writes a crash cut short."""
        stale = time.time() - self.STALE_TEMP
        for leftover in self.directory.glob(".tmp-*" + self.SUFFIX):
            with contextlib.suppress(OSError):  # gone already, or not ours to remove
                if leftover.stat().st_mtime < stale:
                    leftover.unlink()

    def __repr__(self) -> str:
        return f"FileStore({str(self.directory)!r})"
