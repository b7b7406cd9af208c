"""Where verified responses persist between refreshes and restarts.

A store only keeps bytes under a CertID key; it is never trusted. The handle re-validates
whatever a store returns exactly like a response from the network (signature, CertID, times,
rollback), so a corrupt file or a poisoned shared store can at worst cost a fetch.

The optional :meth:`Store.lock` lets a shared store (Redis) elect one server of a fleet to fetch
while the others adopt its result; local stores need no lock.

Revocations are kept apart from responses (:meth:`Store.put_revocation`): a response is useless
once expired, but a revocation is permanent (RFC 5280 §3.3), so its record is kept until the
certificate itself expires. A restarted server, or another server of the fleet, reads it back
and refuses a responder that says ``good`` again, exactly as a handle holding the revoked
response in memory does. The record is the revoked response itself, so it is re-validated too.

Certificate records (:meth:`Store.put_certificate`) let an operator see what a store holds
without the servers: each handle records its leaf and issuer under its key when it opens, and
``staple status`` lists the keys (:meth:`Store.keys`) and re-validates each response against
its certificate. They are optional: a store without them still stores and serves responses.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .atomic import TEMP_PREFIX, remove_durably, write_atomically
from .stats import FetchStats

__all__ = ["FileStore", "MemoryStore", "Store", "chain_pem", "read_quietly", "write_quietly"]

log = logging.getLogger("staple")


class Store(abc.ABC):
    """Async byte storage keyed by :attr:`staple.ocsp.CertId.key`."""

    @abc.abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The bytes last put under ``key``, or ``None``. May raise ``OSError``."""

    @abc.abstractmethod
    async def put(self, key: str, der: bytes, *, expires: datetime) -> None:
        """Keep ``der`` under ``key``; ``expires`` lets a store drop it once useless."""

    async def get_revocation(self, key: str) -> bytes | None:
        """The revoked response recorded by :meth:`put_revocation` under ``key``, or ``None``.
        May raise ``OSError``.

        The default keeps the record through :meth:`get` / :meth:`put` under
        ``REVOCATION_PREFIX + key``, so a custom store keeps revocations with no new code;
        the stores of this package override the three revocation methods."""
        return await self.get(REVOCATION_PREFIX + key) or None

    async def put_revocation(self, key: str, der: bytes, *, until: datetime) -> None:
        """Record that the certificate of ``key`` is revoked: ``der`` is the verified revoked
        response, kept at least until ``until`` (the certificate's notAfter), whatever the
        response's own expiry. May raise ``OSError``."""
        await self.put(REVOCATION_PREFIX + key, der, expires=until)

    async def clear_revocation(self, key: str) -> None:
        """Forget the revocation recorded under ``key`` (a certificateHold was lifted). The
        default stores empty bytes, which :meth:`get_revocation` reads as no record. May raise
        ``OSError``."""
        await self.put(REVOCATION_PREFIX + key, b"", expires=datetime.now(UTC))

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

    # -- certificate records and listing, for operators (``staple status``) ----------------

    async def put_certificate(  # noqa: B027 - optional hook, a store may keep no records
        self, key: str, chain: Sequence[x509.Certificate], *, until: datetime
    ) -> None:
        """Record the certificate of ``key`` and its issuer (``chain``: leaf, issuer), kept at
        least until ``until`` (the leaf's notAfter), so that what the store holds can be
        re-validated without the server. A handle calls it when it opens. The default keeps
        nothing (a custom store works without records; ``staple status`` then lists nothing).
        May raise ``OSError``."""

    async def get_certificate(self, key: str) -> bytes | None:
        """The PEM of the leaf and issuer recorded under ``key`` (never trusted: parse and
        check it), or ``None``. May raise ``OSError``."""
        return None

    async def keys(self) -> list[str]:
        """Every key under which the store holds something - a response, a revocation record
        or a certificate record - sorted. The default lists nothing. Raises ``OSError`` when
        the store cannot be read (unlike :meth:`get`, a listing never fails open: an empty
        answer would read as an empty store)."""
        return []


async def read_quietly(
    store: Store,
    what: str,
    subject: str,
    read: Awaitable[bytes | None],
    stats: FetchStats | None = None,
) -> bytes | None:
    """What ``read`` (a call on ``store``) returns, or ``None`` if it raised. An ``OSError``
    (the disk, the network) is logged as a warning, anything else (a bug in a custom store)
    with its traceback; either is counted in ``stats.store_errors``. Never raises but
    cancellation: a store is an optimisation."""
    try:
        return await read
    except OSError as exc:
        log.warning("%s: could not read %s from %r (%s)", subject, what, store, exc)
    except Exception:
        log.warning("%s: reading %s from %r failed", subject, what, store, exc_info=True)
    if stats is not None:
        stats.store_errors += 1
    return None


async def write_quietly(
    store: Store,
    what: str,
    subject: str,
    write: Awaitable[None],
    stats: FetchStats | None = None,
) -> None:
    """Await ``write`` (a call on ``store``; ``what`` reads like "persist the response to").
    Failures are logged and counted as :func:`read_quietly` does and swallowed: a full or
    read-only disk must not stop stapling from memory."""
    try:
        await write
        return
    except OSError as exc:
        log.warning("%s: could not %s %r (%s); serving from memory", subject, what, store, exc)
    except Exception:
        log.warning("%s: could not %s %r; serving from memory", subject, what, store, exc_info=True)
    if stats is not None:
        stats.store_errors += 1


REVOCATION_PREFIX = "revoked-"
"""Where :class:`Store`'s default revocation methods keep records among the responses."""


def _nothing() -> None:
    return None


def chain_pem(chain: Sequence[x509.Certificate]) -> bytes:
    """The PEM that :meth:`Store.get_certificate` returns for ``chain`` (leaf and issuer)."""
    return b"".join(cert.public_bytes(Encoding.PEM) for cert in chain[:2])


@contextlib.asynccontextmanager
async def _granted() -> AsyncIterator[bool]:
    yield True


class MemoryStore(Store):
    """A dict: survives refreshes, not restarts. The default when no store is given."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self._revoked: dict[str, bytes] = {}
        # The handle's own certificate objects, not a PEM copy: a server with 10,000 chains
        # and no other store pays a small tuple per chain for the records.
        self._certificates: dict[str, tuple[x509.Certificate, ...]] = {}

    async def get(self, key: str) -> bytes | None:
        return self._data.get(key)

    async def put(self, key: str, der: bytes, *, expires: datetime) -> None:
        self._data[key] = der

    async def get_revocation(self, key: str) -> bytes | None:
        return self._revoked.get(key)

    async def put_revocation(self, key: str, der: bytes, *, until: datetime) -> None:
        self._revoked[key] = der

    async def clear_revocation(self, key: str) -> None:
        self._revoked.pop(key, None)

    async def put_certificate(
        self, key: str, chain: Sequence[x509.Certificate], *, until: datetime
    ) -> None:
        self._certificates[key] = tuple(chain[:2])

    async def get_certificate(self, key: str) -> bytes | None:
        chain = self._certificates.get(key)
        return chain_pem(chain) if chain is not None else None

    async def keys(self) -> list[str]:
        return sorted(self._data.keys() | self._revoked.keys() | self._certificates.keys())

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
    REVOKED_SUFFIX = ".revoked"
    """Revocation records: the revoked response, kept beside the responses until removed."""
    CHAIN_SUFFIX = ".chain.pem"
    """Certificate records: the leaf and its issuer (PEM) beside the response."""
    STALE_TEMP = 3600.0
    """Seconds after which a leftover temporary file is a crash's, and removed."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._swept = False

    def path_for(self, key: str, *, suffix: str = SUFFIX) -> Path:
        """The file that holds ``key``'s response (or, with ``REVOKED_SUFFIX``, its
        revocation record). Raises ``ValueError`` for a key that is no plain file name."""
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"invalid store key {key!r}")
        return self.directory / (key + suffix)

    async def get(self, key: str) -> bytes | None:
        return await asyncio.to_thread(self._read, self.path_for(key))

    async def put(self, key: str, der: bytes, *, expires: datetime) -> None:
        await asyncio.to_thread(self._write, self.path_for(key), der)

    async def get_revocation(self, key: str) -> bytes | None:
        """The record's file is kept until :meth:`clear_revocation`: a directory outlives no
        certificate by much, and a stale record costs one validation at start."""
        return await asyncio.to_thread(self._read, self._revoked_path(key))

    async def put_revocation(self, key: str, der: bytes, *, until: datetime) -> None:
        await asyncio.to_thread(self._write, self._revoked_path(key), der)

    async def clear_revocation(self, key: str) -> None:
        await asyncio.to_thread(self._remove, self._revoked_path(key))

    def _revoked_path(self, key: str) -> Path:
        return self.path_for(key, suffix=self.REVOKED_SUFFIX)

    async def put_certificate(
        self, key: str, chain: Sequence[x509.Certificate], *, until: datetime
    ) -> None:
        """Write ``<key>.chain.pem`` only when it is missing or different: every open of a
        handle records its chain, and a restart should not rewrite thousands of files. The file
        is kept until removed, like a revocation record."""
        await asyncio.to_thread(self._write_if_changed, self._chain_path(key), chain_pem(chain))

    async def get_certificate(self, key: str) -> bytes | None:
        return await asyncio.to_thread(self._read, self._chain_path(key))

    async def keys(self) -> list[str]:
        """The keys of the response, revocation and certificate files; none for a directory
        that does not exist (yet), like :meth:`get`."""
        return await asyncio.to_thread(self._keys)

    def _chain_path(self, key: str) -> Path:
        return self.path_for(key, suffix=self.CHAIN_SUFFIX)

    def _keys(self) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        suffixes = (self.SUFFIX, self.REVOKED_SUFFIX, self.CHAIN_SUFFIX)
        keys = set()
        for name in names:
            if name.startswith("."):  # temporary files; never a key (see path_for)
                continue
            for suffix in suffixes:
                if name.endswith(suffix) and len(name) > len(suffix):
                    keys.add(name[: -len(suffix)])
                    break
        return sorted(keys)

    def _write_if_changed(self, path: Path, data: bytes) -> None:
        if self._read(path) != data:
            self._write(path, data)

    @staticmethod
    def _remove(path: Path) -> None:
        remove_durably(path)

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
        write_atomically(path, data)

    def _sweep(self) -> None:
        """Remove temporary files left by writes a crash cut short."""
        stale = time.time() - self.STALE_TEMP
        for leftover in self.directory.glob(TEMP_PREFIX + "*"):
            with contextlib.suppress(OSError):  # gone already, or not ours to remove
                if leftover.stat().st_mtime < stale:
                    leftover.unlink()

    def __repr__(self) -> str:
        return f"FileStore({str(self.directory)!r})"
