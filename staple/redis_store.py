"""A store shared by a fleet through Redis: one fetch per certificate per refresh, not per server.

Theory of operation. Every server of the fleet runs a :class:`RedisStore` on the same Redis. For
each certificate (a CertID :attr:`~staple.ocsp.CertId.key`):

- the response lives under ``prefix + key`` as the raw DER, with a TTL a few minutes past its
  expiry, so Redis forgets what no server could staple any more;
- a refresh first takes a fleet-wide lock, ``prefix + "lock:" + key``: ``SET NX PX`` with a
  random token, released by a compare-and-delete script, so the one server that gets it
  fetches while the others wait. A holder that dies mid-fetch stalls nobody for longer than the
  lock's TTL: Redis expires it and the next server to look takes it;
- a revocation is recorded under ``prefix + "revoked:" + key`` (the revoked response's DER)
  until the certificate's notAfter, so it outlives the response and sticks for the whole fleet
  across restarts (:meth:`~staple.Store.put_revocation`);
- a handle records its certificate and issuer (PEM) under ``prefix + "cert:" + key`` when it
  opens, until the certificate's notAfter, so ``staple status`` can re-validate what the
  fleet holds; :meth:`~RedisStore.keys` finds the keys with ``SCAN`` over the prefix;
- the fetcher's :meth:`~RedisStore.put` publishes ``key`` on ``prefix + "updates"``. Each store
  holds one pub/sub connection (opened by :meth:`~RedisStore.connect` or the first
  :meth:`~RedisStore.watch`) and one listener task that calls the watchers of that key, so the
  other servers adopt the response at once. Pub/sub delivers at most once: after every
  (re)subscription all watchers are called to catch up, and a server that missed a notice
  adopts the response anyway when it reads the store before fetching.

Nothing read from Redis is trusted: the handle validates it like a network response
(signature, CertID, times, rollback), so a poisoned key can at worst cost a fetch.

Redis is an optimisation, never a dependency of stapling. Every call is bounded by ``timeout``;
when Redis is down, hung or refusing, the store *fails open*: :meth:`~RedisStore.get` returns
``None``, :meth:`~RedisStore.lock` grants the lock, :meth:`~RedisStore.put` drops the response,
so each server fetches for itself and keeps stapling. After a failure the store stops calling
Redis (failing open at once) until a retry moment that backs off exponentially; the pub/sub
listener reconnects on the same schedule, and whichever succeeds first brings the store back.
Each change of state (reachable → unreachable and back) is logged once, not once per call. A
command Redis refuses (a key of the wrong type, out of memory, ACL) fails open the same way
without changing the state. A lock acquisition that timed out may still run when a hung Redis
wakes up; the store releases it (compare-and-delete) as soon as Redis answers again.

Lifecycle: the store owns its listener task and, when built from a URL, its client; its
:meth:`~RedisStore.close` cancels and awaits the one and closes the other. It is idempotent,
and a closed store fails open like an unreachable one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import redis.asyncio as aioredis
from cryptography import x509
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from .store import Store, chain_pem

__all__ = ["RedisStore"]

log = logging.getLogger("staple.redis")

T = TypeVar("T")

_ERRORS = (RedisError, OSError, TimeoutError)
"""What a Redis call may raise when Redis is down, hung or refusing (TimeoutError: our own
deadline, or the socket's)."""

# Take the lock (SET NX PX). If someone else holds it, make sure it still expires: a lock key
# left without a TTL (a foreign writer, PERSIST, a bug) must not stall the fleet forever, and
# one with a far longer TTL than ours is capped to ours.
_ACQUIRE = """
if redis.call("SET", KEYS[1], ARGV[1], "NX", "PX", ARGV[2]) then return 1 end
local left = redis.call("PTTL", KEYS[1])
if left == -1 or left > tonumber(ARGV[2]) then redis.call("PEXPIRE", KEYS[1], ARGV[2]) end
return 0
"""

# Release only our own lock: after our TTL ran out, another server may hold it now.
_RELEASE = """
if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) end
return 0
"""


_MAX_ABANDONED = 10_000


class _Unavailable(Exception):
    """Redis could not serve this call (already logged by the state change); fail open."""


class RedisStore(Store):
    """Responses shared by every server of a fleet through one Redis (``redis.asyncio``).

    ``url_or_client`` is a ``redis://`` / ``rediss://`` / ``unix://`` URL, or a
    :class:`redis.asyncio.Redis` you configured yourself (the store then leaves it open on
    :meth:`close`; give it short socket timeouts). ``prefix`` namespaces the keys and the
    channel, so several fleets can share a Redis.

    ``timeout`` bounds every Redis call, queueing excluded (connect, command, reply): when
    Redis is slow or gone a refresh is delayed by about that much once, then the store fails
    open at once until Redis is back. At most ``max_connections`` calls run at a time (plus
    the pub/sub connection); the rest queue, so ten thousand handles starting together don't
    open ten thousand sockets.

    ``grace`` is how long a response outlives its expiry in Redis (never less than a second).
    """

    RETRY_MIN = 0.25
    """First delay (seconds) before Redis is tried again after a failure; doubles each time."""
    RETRY_MAX = 10.0
    """Longest delay between attempts to reach Redis again."""
    IDLE_PING = 30.0
    """After this long without a message the listener PINGs, to notice a dead connection."""

    def __init__(
        self,
        url_or_client: str | aioredis.Redis,
        *,
        prefix: str = "staple:",
        timeout: float = 1.0,
        max_connections: int = 16,
        grace: timedelta = timedelta(minutes=5),
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.prefix = prefix
        self.timeout = timeout
        self.grace = grace
        self.channel = prefix + "updates"
        if isinstance(url_or_client, str):
            # One retry, no backoff: enough to replace a pooled connection that a Redis
            # restart left dead, no more (redis-py's default, 10 retries with backoff, could
            # hold a refresh for a minute). No socket_timeout: _call bounds every call, and
            # redis-py applies socket_timeout to writes with asyncio.wait_for, which on Python
            # 3.11 can swallow a cancellation. The semaphore bounds the connections.
            self._client = _client_for(url_or_client, timeout, retries=1)
            # The listener's client never reconnects behind our back: after a gap in the
            # subscription the watchers must be told to catch up.
            self._pubsub_client = _client_for(url_or_client, timeout, retries=0)
            self._owns_client = True
        else:
            if url_or_client.connection_pool.connection_kwargs.get("decode_responses"):
                raise ValueError(
                    "RedisStore needs a client made with decode_responses=False: "
                    "OCSP responses are binary"
                )
            self._client = self._pubsub_client = url_or_client
            self._owns_client = False
        self._where = _describe(self._client)
        self._acquire = self._client.register_script(_ACQUIRE)
        self._release = self._client.register_script(_RELEASE)
        self._slots = asyncio.Semaphore(max_connections)

        self._available = True  # assume reachable until a call says otherwise
        self._retry_at = 0.0  # monotonic; while unavailable, fail open without trying before
        self._retry_delay = self.RETRY_MIN
        self._refusal_logged_at = -math.inf
        self._abandoned: dict[str, str] = {}  # lock -> token of acquisitions that failed
        self._watchers: dict[str, list[Callable[[], None]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._closed = False

    # -- the Store interface ---------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        """The DER stored under ``key``; ``None`` if there is none or Redis can't be reached."""
        try:
            value = await self._call(lambda: self._client.get(self.prefix + key))
        except _Unavailable:
            return None
        return value if isinstance(value, bytes) else None

    async def put(self, key: str, der: bytes, *, expires: datetime) -> None:
        """Store ``der`` until ``grace`` after ``expires`` and tell the fleet; dropped (the
        server keeps stapling from memory) when Redis can't be reached."""
        ttl_ms = self._ttl_ms(expires)

        async def store_and_publish() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.set(self.prefix + key, der, px=ttl_ms)
                pipe.publish(self.channel, key)
                await pipe.execute()

        with contextlib.suppress(_Unavailable):
            await self._call(store_and_publish)

    async def get_revocation(self, key: str) -> bytes | None:
        """The revoked response recorded for ``key``; ``None`` if there is none or Redis can't
        be reached (then a restarted server relies on the responder, as it did before)."""
        try:
            value = await self._call(lambda: self._client.get(self._revoked_key(key)))
        except _Unavailable:
            return None
        return value if isinstance(value, bytes) and value else None

    async def put_revocation(self, key: str, der: bytes, *, until: datetime) -> None:
        """Record the revocation until ``grace`` after ``until`` (the certificate's notAfter);
        dropped when Redis can't be reached (the server still holds it in memory)."""
        ttl_ms = self._ttl_ms(until)
        with contextlib.suppress(_Unavailable):
            await self._call(lambda: self._client.set(self._revoked_key(key), der, px=ttl_ms))

    async def clear_revocation(self, key: str) -> None:
        """Delete the record (a certificateHold was lifted); a no-op when Redis is away."""
        with contextlib.suppress(_Unavailable):
            await self._call(lambda: self._client.delete(self._revoked_key(key)))

    async def put_certificate(
        self, key: str, chain: Sequence[x509.Certificate], *, until: datetime
    ) -> None:
        """Record the chain until ``grace`` after ``until`` (the leaf's notAfter), unless a
        record is there already: a CertID names one certificate, so every server of the fleet
        would write the same bytes. Dropped when Redis can't be reached."""
        ttl_ms, pem = self._ttl_ms(until), chain_pem(chain)
        with contextlib.suppress(_Unavailable):
            await self._call(
                lambda: self._client.set(self._certificate_key(key), pem, px=ttl_ms, nx=True)
            )

    async def get_certificate(self, key: str) -> bytes | None:
        """The recorded chain's PEM; ``None`` if there is none or Redis can't be reached."""
        try:
            value = await self._call(lambda: self._client.get(self._certificate_key(key)))
        except _Unavailable:
            return None
        return value if isinstance(value, bytes) and value else None

    async def keys(self) -> list[str]:
        """The keys of every response, revocation and certificate record under the prefix,
        found with ``SCAN`` (a page per call, each bounded by ``timeout``). Raises
        ``ConnectionError`` when Redis can't be reached or refuses: a listing never fails
        open."""
        pattern = _glob_escape(self.prefix) + "*"
        found: set[str] = set()
        cursor = 0
        while True:
            page = functools.partial(self._client.scan, cursor, match=pattern, count=1000)
            try:
                cursor, names = await self._call(page, probe=True)
            except _Unavailable as exc:
                why = _reason(exc.__cause__) if exc.__cause__ is not None else "unreachable"
                raise ConnectionError(f"{self!r}: cannot list the keys ({why})") from None
            for name in names:
                key = self._store_key(name)
                if key is not None:
                    found.add(key)
            if cursor == 0:
                return sorted(found)

    def lock(self, key: str, *, ttl: float) -> AbstractAsyncContextManager[bool]:
        """The fleet-wide right to fetch ``key`` for at most ``ttl`` seconds. Yields ``False``
        while another server holds it, and ``True`` when Redis can't be reached (fail open:
        each server fetches for itself rather than none)."""
        return self._lock(key, ttl)

    def watch(self, key: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` whenever a server of the fleet stores a response for ``key``,
        and after every (re)connection of the listener, since notices sent while it was away
        are lost. The first call opens the store's pub/sub connection."""
        if self._closed:
            return _nothing
        self._watchers.setdefault(key, []).append(callback)
        self._start_listener()

        def unwatch() -> None:
            callbacks = self._watchers.get(key)
            if callbacks is not None and callback in callbacks:
                callbacks.remove(callback)
                if not callbacks:
                    del self._watchers[key]

        return unwatch

    async def connect(self) -> bool:
        """Subscribe to the fleet's notices now rather than at the first :meth:`watch`, and
        wait (at most ``timeout``) until subscribed; returns whether it is. Servers that
        start together then miss no notice. ``async with RedisStore(...)`` calls it."""
        if self._closed:
            return False
        self._start_listener()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.timeout):
                await self._subscribed.wait()
        return self._subscribed.is_set()

    async def close(self) -> None:
        """Stop the listener and, if the store made its client, close it. Idempotent."""
        if self._closed:
            if self._listener is not None and not self._listener.done():
                await asyncio.wait({self._listener})
            return
        self._closed = True
        self._watchers.clear()
        listener = self._listener
        if listener is not None:
            listener.cancel()
            await asyncio.wait({listener})
        if self._owns_client:
            for client in (self._client, self._pubsub_client):
                with contextlib.suppress(*_ERRORS):
                    async with asyncio.timeout(self.timeout):
                        await client.aclose()

    async def __aenter__(self) -> RedisStore:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- for operators and tests -----------------------------------------------------------

    @property
    def available(self) -> bool:
        """Whether the last attempt to use Redis worked (the store is sharing, not failing
        open)."""
        return self._available and not self._closed

    async def ping(self) -> bool:
        """Try Redis now, even while failing open; returns (and records) whether it answered."""
        try:
            await self._call(self._client.ping, probe=True)
        except _Unavailable:
            return False
        return True

    def __repr__(self) -> str:
        return f"RedisStore({self._where!r}, prefix={self.prefix!r})"

    # -- internals -------------------------------------------------------------------------

    def _revoked_key(self, key: str) -> str:
        return self.prefix + "revoked:" + key

    def _certificate_key(self, key: str) -> str:
        return self.prefix + "cert:" + key

    def _store_key(self, name: bytes | str) -> str | None:
        """The store key a Redis key belongs to (a response, a revocation or a certificate
        record), or ``None`` for anything else under the prefix (locks, other namespaces)."""
        text = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
        if not text.startswith(self.prefix):
            return None
        rest = text[len(self.prefix) :]
        for kind in ("revoked:", "cert:"):
            if rest.startswith(kind):
                rest = rest[len(kind) :]
                break
        return rest if rest and ":" not in rest else None  # CertID keys hold no colon

    def _ttl_ms(self, expires: datetime) -> int:
        # Redis counts TTLs on the real clock, whatever clock the handle runs on.
        left = expires - datetime.now(UTC) + self.grace
        return max(int(left.total_seconds() * 1000), 1000)

    async def _call(self, fn: Callable[[], Awaitable[T]], *, probe: bool = False) -> T:
        """Run one Redis call within ``timeout``; raise :class:`_Unavailable` if it failed or
        if Redis is known to be down and its retry moment hasn't come (fail fast)."""
        if self._closed or not self._may_try(probe):
            raise _Unavailable
        async with self._slots:
            if not self._may_try(probe):  # it went down while we queued
                raise _Unavailable
            if not self._available:  # we are the probe: the others keep failing fast
                self._retry_at = time.monotonic() + self.timeout
            task = asyncio.current_task()
            cancels = task.cancelling() if task is not None else 0
            try:
                async with asyncio.timeout(self.timeout):
                    result = await fn()
            except ResponseError as exc:  # reachable, but it refused (WRONGTYPE, OOM, ACL...)
                self._refused(exc)
                raise _Unavailable from exc
            except _ERRORS as exc:
                self._went_down(exc)
                raise _Unavailable from exc
            _reraise_swallowed_cancel(task, cancels)
        self._came_back()
        if self._abandoned:
            await self._release_abandoned()
        return result

    def _may_try(self, probe: bool) -> bool:
        return probe or self._available or time.monotonic() >= self._retry_at

    def _went_down(self, exc: BaseException) -> None:
        if self._closed:
            return
        if self._available:
            self._available = False
            self._retry_delay = self.RETRY_MIN
            log.warning(
                "%r: Redis unreachable (%s); each server fetches for itself until it is back",
                self,
                _reason(exc),
            )
        self._retry_at = time.monotonic() + self._next_delay()

    def _refused(self, exc: ResponseError) -> None:
        """A refused command fails open like an outage, but Redis is up: no state change, and
        a warning at most once a minute (a full Redis refuses every put)."""
        now = time.monotonic()
        if now >= self._refusal_logged_at + 60:
            self._refusal_logged_at = now
            log.warning("%r: Redis refused a command (%s); failing open", self, _reason(exc))

    def _came_back(self) -> None:
        if not self._available and not self._closed:
            self._available = True
            self._retry_delay = self.RETRY_MIN
            log.info("%r: Redis reachable again; sharing responses with the fleet", self)

    def _next_delay(self) -> float:
        """Exponential backoff with jitter (half fixed, half random), so a fleet that lost
        Redis together doesn't reconnect in lockstep."""
        delay = self._retry_delay
        self._retry_delay = min(delay * 2, self.RETRY_MAX)
        return delay * (0.5 + random.random() / 2)

    @contextlib.asynccontextmanager
    async def _lock(self, key: str, ttl: float) -> AsyncIterator[bool]:
        name = self.prefix + "lock:" + key
        token = secrets.token_hex(16)
        ttl_ms = max(int(ttl * 1000), 1)
        try:
            granted = bool(
                await self._call(lambda: self._acquire(keys=[name], args=[token, ttl_ms]))
            )
            held = granted
        except _Unavailable as exc:
            granted, held = True, False  # fail open: fetch for ourselves, there is no lock
            if exc.__cause__ is not None and len(self._abandoned) < _MAX_ABANDONED:
                # A hung Redis may still run the acquisition when it wakes up, leaving a
                # lock that nobody holds until its TTL: release it once Redis answers.
                self._abandoned[name] = token
        try:
            yield granted
        finally:
            if held:
                with contextlib.suppress(_Unavailable):  # PX expiry releases it anyway
                    await self._call(lambda: self._release(keys=[name], args=[token]))

    async def _release_abandoned(self) -> None:
        abandoned, self._abandoned = self._abandoned, {}

        async def release_all() -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                for name, token in abandoned.items():
                    pipe.eval(_RELEASE, 1, name, token)
                await pipe.execute()

        with contextlib.suppress(_Unavailable):  # they expire anyway
            await self._call(release_all)

    def _start_listener(self) -> None:
        if self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(
                self._listen(), name=f"staple redis listener {self._where}"
            )

    async def _listen(self) -> None:
        """Keep one subscription to the updates channel, reconnecting with backoff."""
        delay = self.RETRY_MIN
        task = asyncio.current_task()
        while True:
            _reraise_swallowed_cancel(task, 0)  # only close() cancels the listener
            pubsub: Any = self._pubsub_client.pubsub()  # redis-py leaves PubSub untyped
            try:
                async with asyncio.timeout(self.timeout):
                    await pubsub.subscribe(self.channel)
                    # The confirmation proves we are subscribed: notices published from now
                    # on reach us; those published before, the watchers catch up on below.
                    while True:
                        message = await pubsub.get_message(timeout=self.timeout)
                        if message is not None and message.get("type") == "subscribe":
                            break
                delay = self.RETRY_MIN
                self._subscribed.set()
                self._came_back()
                self._notify_all()
                await self._receive(pubsub)
            except _ERRORS as exc:
                self._went_down(exc)
            finally:
                self._subscribed.clear()
                with contextlib.suppress(*_ERRORS):
                    async with asyncio.timeout(self.timeout):
                        await pubsub.aclose()
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, self.RETRY_MAX)

    async def _receive(self, pubsub: Any) -> None:
        """Dispatch notices until the connection fails; PING it when idle to find out."""
        pinged = False
        while True:
            wait = self.timeout if pinged else self.IDLE_PING
            message = await pubsub.get_message(timeout=wait)
            if message is None:
                if pinged:
                    raise TimeoutError(f"no answer to PING within {self.timeout} s")
                await pubsub.ping()
                pinged = True
                continue
            pinged = False
            _reraise_swallowed_cancel(asyncio.current_task(), 0)
            if message.get("type") == "message":
                data = message.get("data")
                key = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
                self._notify(key)

    def _notify(self, key: str) -> None:
        for callback in list(self._watchers.get(key, ())):
            _call_watcher(callback)

    def _notify_all(self) -> None:
        for callbacks in list(self._watchers.values()):
            for callback in list(callbacks):
                _call_watcher(callback)


def _reraise_swallowed_cancel(task: asyncio.Task[Any] | None, before: int) -> None:
    """Raise the cancellation that a library swallowed (CPython 3.11's ``asyncio.wait_for``
    returns the result when the awaited call finishes as the caller is cancelled, and redis-py
    uses it): a cancelled refresher or listener must stop, or ``close()`` would wait forever."""
    if task is not None and task.cancelling() > before:
        raise asyncio.CancelledError


def _call_watcher(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:
        log.exception("a RedisStore watcher raised")


def _nothing() -> None:
    return None


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis glob pattern (``SCAN MATCH``)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _client_for(url: str, timeout: float, *, retries: int) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url,
        socket_timeout=None,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), retries),
    )


def _describe(client: aioredis.Redis) -> str:
    """Where the client points, without credentials (they would end up in logs)."""
    kwargs = client.connection_pool.connection_kwargs
    db = kwargs.get("db", 0)
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={db}"
    return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{db}"
