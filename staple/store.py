"""Where verified responses persist between refreshes and restarts.

A store only keeps bytes under a CertID key; it is never trusted. The handle re-validates
whatever a store returns exactly like a response from the network (signature, CertID, times,
rollback), so a corrupt file or a poisoned shared store can at worst cost a fetch.

The optional :meth:`Store.lock` lets a shared store elect one fetcher while the others adopt its
result: Redis for a fleet, :class:`FileStore` for the processes of one machine (``flock``);
the memory store needs no lock.

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
import fcntl
import logging
import math
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
        """Hold the right to fetch for ``key`` (yields whether we got it). A store of one
        process always grants it; a shared one (a directory, Redis) grants it to one holder at
        a time, for at most ``ttl`` s."""
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


_LOCK_POLL_MIN, _LOCK_POLL_MAX = 0.01, 0.1
"""Seconds between a contender's tries for a :class:`FileStore` lock: doubling, capped; a
fetch takes tens of milliseconds at best, seconds at worst."""

_LOCK_ATTEMPTS = 8
"""How often :meth:`FileStore.lock` retries after locking a file its holder had just removed
(each retry means another process took and released the lock meanwhile)."""


def _names_file(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


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
    nobody's write in progress, even with several processes sharing the directory. The same
    sweep removes the files of a certificate that has expired (a day after its notAfter, read
    from its certificate record: its response, revocation and certificate record), as
    :class:`~staple.RedisStore`'s keys expire, so that a directory does not grow with every
    certificate it ever served.

    Processes sharing the directory (``staple serve --workers``, gunicorn's or uvicorn's
    workers) fetch once per certificate per refresh: :meth:`lock` elects the fetcher with
    ``flock`` on a per-key lock file, which the kernel releases when its holder dies.
    """

    SUFFIX = ".ocsp"
    REVOKED_SUFFIX = ".revoked"
    """Revocation records: the revoked response, kept beside the responses until removed."""
    CHAIN_SUFFIX = ".chain.pem"
    """Certificate records: the leaf and its issuer (PEM) beside the response."""
    STALE_TEMP = 3600.0
    """Seconds after which a leftover temporary file is a crash's, and removed."""
    EXPIRED_GRACE = 86400.0
    """Seconds after its leaf's notAfter after which a key's files are removed (the sweep)."""
    LOCK_PREFIX = TEMP_PREFIX + "lock-"
    """Lock files (:meth:`lock`): ``.tmp-lock-KEY``, there only while held (or left by a
    holder that died, until the next holder of that key or the sweep removes it)."""

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
        """The record's file is kept until :meth:`clear_revocation`, or until the sweep finds
        the certificate expired; a stale record costs one validation at start."""
        return await asyncio.to_thread(self._read, self._revoked_path(key))

    async def put_revocation(self, key: str, der: bytes, *, until: datetime) -> None:
        await asyncio.to_thread(self._write, self._revoked_path(key), der)

    async def clear_revocation(self, key: str) -> None:
        await asyncio.to_thread(self._remove, self._revoked_path(key))

    def lock(self, key: str, *, ttl: float) -> AbstractAsyncContextManager[bool]:
        """The right to fetch ``key`` among the processes sharing this directory, one holder
        at a time. A contender waits for the holder to let go, then gets it (``True``): the
        handle then reads the store first, adopts the response the holder stored and fetches
        nothing, so the workers of a machine make one request per certificate per refresh and
        each staples its first handshake even after a cold start. (A Redis fleet gets the
        same from the notice the holder publishes; a directory has no notices, and a
        contender refused at once would staple nothing until it looked again.)

        Theory of operation: the holder has ``flock(LOCK_EX)`` on ``.tmp-lock-KEY`` in the
        directory. Contenders try ``LOCK_NB`` every few tens of milliseconds (a flock can't
        be awaited). The kernel drops the lock when its holder's process dies, however it
        dies (SIGKILL included), so a contender takes over at once. On release the holder
        removes the file, then unlocks; a contender that opened the file just before the
        removal may lock that orphan afterwards, so every taker checks that the path still
        names the file it locked, and else tries again with the new one. ``ttl`` bounds a
        holder that hangs while alive: once the lock was taken more than ``ttl`` seconds ago
        (the file's mtime, set by each taker) a contender stops waiting and is granted it
        without holding it, as a Redis lock expires. A directory where no lock file can be
        made (read-only, not creatable) grants every caller: each process fetches for
        itself, as :class:`~staple.RedisStore` fails open. ``flock`` needs a local file
        system.

        Each try is a few metadata system calls (no ``fsync``), made on the loop thread so
        that a cancellation can never leave a lock held.
        """
        return self._locked(self._lock_path(key), ttl)

    @contextlib.asynccontextmanager
    async def _locked(self, path: Path, ttl: float) -> AsyncIterator[bool]:
        delay = _LOCK_POLL_MIN
        granted, fd = self._take_lock(path, ttl)
        while not granted:  # held by another: wait for it to let go (or to outlive its ttl)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _LOCK_POLL_MAX)
            granted, fd = self._take_lock(path, ttl)
        try:
            yield True
        finally:
            if fd is not None:
                self._release_lock(path, fd)

    def _lock_path(self, key: str) -> Path:
        self.path_for(key)  # the same key rules as the data files
        return self.directory / (self.LOCK_PREFIX + key)

    def _take_lock(self, path: Path, ttl: float) -> tuple[bool, int | None]:
        """One try, never waiting: ``(True, fd)`` when taken (``fd`` holds it), ``(True,
        None)`` when granted without a lock to hold (a hung holder, an unusable directory),
        ``(False, None)`` while another holds it."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            for _ in range(_LOCK_ATTEMPTS):
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # held by another process, or another open() of ours
                    taken_at = os.fstat(fd).st_mtime
                    os.close(fd)
                    if time.time() - taken_at > ttl:
                        log.warning(
                            "%r: the lock %s has been held for more than %g s; fetching anyway",
                            self,
                            path.name,
                            ttl,
                        )
                        return True, None
                    return False, None
                except BaseException:
                    os.close(fd)
                    raise
                if _names_file(path, fd):
                    os.utime(fd)  # when it was taken, for the ttl of the next contender
                    return True, fd
                os.close(fd)  # an orphan its holder removed on release: take the new file
        except OSError as exc:
            log.debug("%r: cannot lock %s (%s); fetching without the lock", self, path.name, exc)
        return True, None  # fail open: each process fetches for itself

    @staticmethod
    def _release_lock(path: Path, fd: int) -> None:
        """Remove the lock file while holding it, then unlock (``LOCK_UN`` before ``close``:
        a descriptor a child process inherited would otherwise keep it locked)."""
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as exc:  # closing releases it anyway
            log.debug("unlocking %s: %s", path.name, exc)
        finally:
            os.close(fd)

    def _remove_free_lock(self, path: Path) -> None:
        """Remove a lock file a dead holder left, if nobody holds it now (the sweep)."""
        _, fd = self._take_lock(path, ttl=math.inf)
        if fd is not None:
            self._release_lock(path, fd)

    def _revoked_path(self, key: str) -> Path:
        return self.path_for(key, suffix=self.REVOKED_SUFFIX)

    async def put_certificate(
        self, key: str, chain: Sequence[x509.Certificate], *, until: datetime
    ) -> None:
        """Write ``<key>.chain.pem`` only when it is missing or different: every open of a
        handle records its chain, and a restart should not rewrite thousands of files. The file
        is kept until the sweep finds the certificate expired (see the class)."""
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
        """Remove temporary files left by writes a crash cut short, and the files of expired
        certificates."""
        now = time.time()
        stale = now - self.STALE_TEMP
        for leftover in self.directory.glob(TEMP_PREFIX + "*"):
            with contextlib.suppress(OSError):  # gone already, or not ours to remove
                if leftover.stat().st_mtime >= stale:
                    continue
                if leftover.name.startswith(self.LOCK_PREFIX):
                    self._remove_free_lock(leftover)  # unless someone holds it
                else:
                    leftover.unlink()
        expired = now - self.EXPIRED_GRACE
        for record in self.directory.glob("*" + self.CHAIN_SUFFIX):
            key = record.name[: -len(self.CHAIN_SUFFIX)]
            if not key or key.startswith("."):
                continue
            try:
                leaf = x509.load_pem_x509_certificate(record.read_bytes())
            except (OSError, ValueError):  # gone, or not a record of ours: leave it
                continue
            if leaf.not_valid_after_utc.timestamp() >= expired:
                continue
            log.info("%r: removing the files of %s, whose certificate expired", self, key)
            for suffix in (self.SUFFIX, self.REVOKED_SUFFIX, self.CHAIN_SUFFIX):
                with contextlib.suppress(OSError):  # not every key has every file
                    os.unlink(self.path_for(key, suffix=suffix))

    def __repr__(self) -> str:
        return f"FileStore({str(self.directory)!r})"
