"""A handle per certificate chain: the current verified response, kept fresh by a refresher.

Modelled on Windows' ``CertOpenServerOcspResponse`` family. The handle owns one asyncio task
that sleeps until the policy says to refresh, fetches with no lock held by the getter, validates,
persists, and swaps a new immutable :class:`OcspResponseContext` in. The getter,
:meth:`ServerOcspResponse.get_context`, is a few attribute reads and an integer increment: it
never awaits, never does I/O, and returns ``None`` (with :attr:`last_error` saying why) when no
time-valid response is held.

Lifecycle (one ``_set_state`` changes it; illegal moves raise)::

    OPENING --start--> RUNNING --close()--> CLOSING ---> CLOSED
       └------------------close()-------------┘
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from . import ocsp
from .chain import ChainInput, ca_issuers_urls, load_chain, must_staple, ocsp_urls
from .clock import Clock, SystemClock, to_datetime
from .errors import (
    BadResponseError,
    CertificateRevokedError,
    ChainError,
    ClosedError,
    ExpiredResponseError,
    FetchError,
    NoResponderError,
    OcspError,
    ResponseUnavailableError,
    UnknownStatusError,
    ValidationError,
)
from .fetch import fetch_issuer, fetch_response
from .policy import RefreshPolicy, http_fresh_until, next_refresh, retry_delay
from .response_context import OcspResponseContext
from .store import MemoryStore, Store

__all__ = [
    "Event",
    "EventKind",
    "HandleState",
    "ServerOcspResponse",
    "open_server_ocsp_response",
]

log = logging.getLogger("staple")

_JUMP = timedelta(seconds=1)  # a backwards clock step larger than this is a jump, not jitter


class HandleState(enum.Enum):
    OPENING = "opening"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


_TRANSITIONS: dict[HandleState, frozenset[HandleState]] = {
    HandleState.OPENING: frozenset({HandleState.RUNNING, HandleState.CLOSING}),
    HandleState.RUNNING: frozenset({HandleState.CLOSING}),
    HandleState.CLOSING: frozenset({HandleState.CLOSED}),
    HandleState.CLOSED: frozenset(),
}


class EventKind(enum.Enum):
    LOADED = "loaded"
    """A response from the store passed validation and is being stapled."""
    FETCHED = "fetched"
    """A fresh good response from the responder is being stapled."""
    REVOKED = "revoked"
    """The responder says the certificate is revoked (stapled unless the policy withholds)."""
    UNKNOWN = "unknown"
    """The responder does not know the certificate; nothing new is stapled."""
    FAILED = "failed"
    """A refresh failed (network, HTTP, invalid or older response); the last good one stays."""
    REJECTED = "rejected"
    """What the store held failed validation (corrupt, foreign, expired) and was ignored."""
    EXPIRED = "expired"
    """The held response reached its margin: nothing is stapled until a refresh succeeds."""
    CLOSED = "closed"


_LOG_LEVELS = {
    EventKind.LOADED: logging.INFO,
    EventKind.FETCHED: logging.INFO,
    EventKind.REVOKED: logging.ERROR,
    EventKind.UNKNOWN: logging.WARNING,
    EventKind.FAILED: logging.WARNING,
    EventKind.REJECTED: logging.WARNING,
    EventKind.EXPIRED: logging.ERROR,
    EventKind.CLOSED: logging.DEBUG,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """What happened to a handle; passed to ``on_update`` and logged on ``staple``."""

    kind: EventKind
    handle: ServerOcspResponse
    subject: str
    response: ocsp.VerifiedResponse | None = None
    error: OcspError | None = None
    source: str | None = None
    next_refresh: datetime | None = None

    def __str__(self) -> str:
        parts = [f"{self.kind.value}: {self.subject}"]
        if self.response is not None:
            r = self.response
            parts.append(
                f"status {r.cert_status.name.lower()}, thisUpdate {r.this_update.isoformat()}, "
                f"nextUpdate {r.next_update.isoformat()}"
            )
        if self.source:
            parts.append(f"from {self.source}")
        if self.error is not None:
            parts.append(f"reason: {self.error.reason}")
        if self.next_refresh is not None:
            parts.append(f"next attempt {self.next_refresh.isoformat()}")
        return "; ".join(parts)


OnUpdate = Callable[[Event], Awaitable[None] | None]
ResponderUrls = Sequence[str] | Mapping[str, str]


class ServerOcspResponse:
    """The handle for one certificate chain. Create with :func:`open_server_ocsp_response`."""

    # A server may hold 10,000 of these: slots keep each one small (past 30 attributes CPython
    # stops sharing instance-dict keys, and every handle would carry a private dict).
    __slots__ = (
        "__weakref__",
        "_clock",
        "_closed",
        "_current",
        "_expired_reported",
        "_fetch_slots",
        "_first_outcome",
        "_first_slot",
        "_fresh_until",
        "_inflight",
        "_live_contexts",
        "_on_update",
        "_owns_session",
        "_poked",
        "_rejected_der",
        "_request",
        "_response",
        "_scheduled_at",
        "_session",
        "_sleeping",
        "_state",
        "_store_changed",
        "_task",
        "_time",
        "_unwatch",
        "cert",
        "cert_id",
        "chain",
        "failures",
        "issuer",
        "last_error",
        "must_staple",
        "next_refresh",
        "policy",
        "store",
        "subject",
        "urls",
    )

    def __init__(
        self,
        chain: list[x509.Certificate],
        *,
        subject: str,
        must_staple: bool,
        urls: list[str],
        store: Store,
        session: aiohttp.ClientSession,
        owns_session: bool,
        clock: Clock,
        policy: RefreshPolicy,
        on_update: OnUpdate | None,
        fetch_slots: asyncio.Semaphore | None = None,
    ) -> None:
        self.chain = chain
        self.cert = chain[0]
        self.issuer = chain[1]
        self.subject = subject
        self.urls = urls
        self.store = store
        self.policy = policy
        self.must_staple = must_staple
        self.cert_id = ocsp.cert_id(self.cert, self.issuer, algorithm=policy.hash_algorithm)
        self._request = ocsp.build_request(self.cert, self.issuer, algorithm=policy.hash_algorithm)
        self._session = session
        self._fetch_slots = fetch_slots
        self._owns_session = owns_session
        self._clock = clock
        self._time = clock.time  # bound once: get_context() is the hot path
        self._on_update = on_update
        self._state = HandleState.OPENING

        self._current: OcspResponseContext | None = None  # what get_context() hands out
        self._response: ocsp.VerifiedResponse | None = None  # newest verified (rollback base)
        self._live_contexts: set[OcspResponseContext] = set()
        self.last_error: OcspError | None = ResponseUnavailableError(
            "no response fetched yet", subject=self.subject
        )
        self.failures = 0
        self.next_refresh: datetime | None = None
        self._scheduled_at: datetime | None = None  # the clock reading next_refresh came from
        self._fresh_until: datetime | None = None
        self._expired_reported = False
        self._rejected_der: bytes | None = None

        self._task: asyncio.Task[None] | None = None
        # Small per-handle state: 10,000 handles must stay cheap, so no lock/event objects.
        self._sleeping = False  # the refresher is in _sleep: a poke cancels that sleep
        self._poked = False  # a poke's cancellation is on its way to the refresher
        self._store_changed = False  # a shared store told us another server stored a response
        self._unwatch: Callable[[], None] | None = None
        self._inflight: asyncio.Task[OcspError | None] | None = None  # the running attempt
        self._closed: asyncio.Future[None] | None = None  # done once close() has finished
        loop = asyncio.get_running_loop()
        self._first_outcome: asyncio.Future[None] | None = loop.create_future()
        # Done once the first attempt holds a fetch slot (or ended without one): the opener's
        # wait_timeout runs from there, not while the fetch queues behind thousands of others.
        self._first_slot: asyncio.Future[None] | None = loop.create_future()

    # -- the getter: no I/O, no await, no lock ---------------------------------------------

    def get_context(self) -> OcspResponseContext | None:
        """A new reference to the current time-valid context, or ``None`` (see
        :attr:`last_error`). Synchronous and I/O-free; call ``free()`` on what it returns."""
        ctx = self._current
        if ctx is not None and self._time() < ctx._stop_at:
            ctx._refs += 1
            return ctx
        if ctx is not None and self._current is ctx:  # stale; the refresher hasn't noticed
            self._retire_current(
                ExpiredResponseError(
                    f"held response expires {ctx.expires.isoformat()}, within the margin",
                    subject=self.subject,
                )
            )
        return None

    @property
    def state(self) -> HandleState:
        return self._state

    @property
    def response(self) -> ocsp.VerifiedResponse | None:
        """The newest verified response, stapled or not (e.g. a withheld revocation)."""
        return self._response

    @property
    def live_references(self) -> int:
        """References handed out and not yet freed, over all of this handle's contexts."""
        # list(): a snapshot taken under the GIL, since free() may run on another thread
        # (weakref.finalize in a threaded TLS server) and shrink the set meanwhile.
        return sum(ctx._refs for ctx in list(self._live_contexts))

    @property
    def live_contexts(self) -> int:
        """Contexts alive: the current one plus replaced ones still referenced."""
        return len(self._live_contexts)

    # -- lifecycle -------------------------------------------------------------------------

    def _set_state(self, new: HandleState) -> None:
        if new not in _TRANSITIONS[self._state]:
            raise RuntimeError(f"illegal handle state change {self._state.name} -> {new.name}")
        self._state = new

    async def _start(self, *, wait: bool) -> None:
        await self._load_from_store()
        self._unwatch = self.store.watch(self.cert_id.key, self._on_store_changed)
        self._set_state(HandleState.RUNNING)
        self._task = asyncio.create_task(self._run(), name=f"staple refresher {self.subject}")
        first, slot = self._first_outcome, self._first_slot
        if wait and self._current is None and first is not None and slot is not None:
            await asyncio.wait({first, slot}, return_when=asyncio.FIRST_COMPLETED)
            try:
                async with asyncio.timeout(self.policy.wait_timeout):
                    await asyncio.shield(first)
            except TimeoutError:
                log.warning(
                    "%s: no response within %g s; serving unstapled while the refresher retries",
                    self.subject,
                    self.policy.wait_timeout,
                )
        self._first_outcome = self._first_slot = None  # only the opener waits for them
        if self.must_staple and self._current is None:
            log.warning(
                "%s: must-staple certificate has no valid OCSP response yet (%s)",
                self.subject,
                self.last_error,
            )

    async def refresh(self) -> None:
        """Fetch now. Raises the :class:`OcspError` if this attempt failed; the handle keeps
        stapling the previous response either way."""
        if self._state is not HandleState.RUNNING:
            raise ClosedError(f"handle is {self._state.value}", subject=self.subject)
        error = await self._refresh_once(force=True)
        self._poke()  # let the refresher reschedule around this attempt
        if error is not None:
            raise error

    def _poke(self) -> None:
        """Wake the refresher so it looks at its state again."""
        if self._sleeping and not self._poked and self._task is not None:
            self._poked = True
            self._task.cancel()  # taken back in _sleep: only the sleep ends

    def _on_store_changed(self) -> None:
        self._store_changed = True
        self._poke()

    async def close(self) -> None:
        """Stop the refresher. Contexts already handed out stay valid until freed.
        Idempotent; concurrent callers all return once it is closed."""
        if self._closed is not None:
            await asyncio.shield(self._closed)
            return
        self._closed = asyncio.get_running_loop().create_future()
        self._set_state(HandleState.CLOSING)
        if self._unwatch is not None:
            self._unwatch()
        tasks = [t for t in (self._task, self._inflight) if t is not None]
        self._task = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if self._owns_session:
            await self._session.close()
        self._retire_current(ClosedError("handle closed", subject=self.subject))
        self._set_state(HandleState.CLOSED)
        self._closed.set_result(None)
        await self._emit(Event(kind=EventKind.CLOSED, handle=self, subject=self.subject))

    async def __aenter__(self) -> ServerOcspResponse:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        status = self._current.cert_status.name.lower() if self._current else "none"
        return f"<ServerOcspResponse {self.subject} {self._state.value} stapling={status}>"

    # -- the refresher ---------------------------------------------------------------------

    def _now(self) -> datetime:
        return to_datetime(self._clock.time())

    async def _run(self) -> None:
        """Sleep until the next refresh (or the held response's stop moment), act, repeat."""
        if self.next_refresh is None or self.next_refresh <= self._now():
            await self._guarded_refresh()
        else:  # the store's response holds until a later refresh: no first attempt to wait for
            self._settle_first()
        while True:
            await self._sleep(self._next_wakeup())
            if self._store_changed:  # a fleet member fetched: adopt its response, no fetch
                self._store_changed = False
                try:
                    await self._load_from_store()
                except Exception:  # a bug must not stop the refresher
                    log.exception("%s: unexpected error adopting from the store", self.subject)
            await self._check_expiry()
            if self._clock_went_back():
                log.warning("%s: the wall clock went back; refreshing now", self.subject)
                self._schedule(self._now(), now=self._now())
            if self.next_refresh is not None and self._now() >= self.next_refresh:
                await self._guarded_refresh()

    async def _guarded_refresh(self) -> None:
        try:
            await self._refresh_once()
        except Exception as exc:  # a bug here must not kill stapling for good
            log.exception("%s: unexpected error in the refresher", self.subject)
            await self._failed([OcspError(f"internal error: {exc!r}", subject=self.subject)])

    def _schedule(self, when: datetime, *, now: datetime) -> None:
        self.next_refresh = when
        self._scheduled_at = now

    def _clock_went_back(self) -> bool:
        """Whether the wall clock is now earlier than when the schedule was made: that
        schedule (a deadline in a "future" that never came) means nothing any more."""
        return self._scheduled_at is not None and self._now() < self._scheduled_at - _JUMP

    def _next_wakeup(self) -> float:
        assert self.next_refresh is not None
        wake = self.next_refresh.timestamp()
        if self._current is not None:
            wake = min(wake, self._current._stop_at)
        return wake

    async def _sleep(self, deadline: float) -> None:
        """Sleep on the clock until ``deadline``, or until :meth:`_poke` wakes us.

        The sleep runs in the refresher's own task, and a poke cancels it, taken back here with
        ``uncancel()`` as :func:`asyncio.timeout` does: no second task and no wait set per
        sleep, which is most of what a sleeping handle weighs.
        """
        if self._store_changed:  # a notice came while we were busy: act on it first
            return
        self._sleeping = True
        try:
            await self._clock.sleep_until(deadline)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._poked or task is None or task.uncancel() > 0:
                raise  # close(), or a cancellation from outside on top of the poke
        finally:
            self._sleeping = False
            self._poked = False

    async def _check_expiry(self) -> None:
        """Retire the held response at its stop moment and say so, once per expiry."""
        ctx = self._current
        if ctx is not None and self._time() >= ctx._stop_at:
            self._retire_current(
                ExpiredResponseError(
                    f"held response expires {ctx.expires.isoformat()}, within the margin; "
                    "no fresher response could be fetched",
                    subject=self.subject,
                )
            )
        if isinstance(self.last_error, ExpiredResponseError) and not self._expired_reported:
            self._expired_reported = True
            await self._emit(
                Event(
                    kind=EventKind.EXPIRED,
                    handle=self,
                    subject=self.subject,
                    error=self.last_error,
                    next_refresh=self.next_refresh,
                )
            )

    def _retire_current(self, reason: OcspError) -> None:
        """Stop handing out the current context (expired, closed, withheld)."""
        ctx, self._current = self._current, None
        self.last_error = reason
        if ctx is None:
            return
        ctx._current = False
        if ctx._refs == 0:
            self._live_contexts.discard(ctx)

    async def _refresh_once(self, *, force: bool = False) -> OcspError | None:
        """One refresh attempt; concurrent callers share it. Returns the error, if any.

        The attempt runs in a task of its own, owned by the handle: a caller that is
        cancelled (``wait_for(handle.refresh(), 1)``) abandons its wait, not the attempt
        that the refresher may be sharing. Only :meth:`close` cancels it.
        """
        attempt = self._inflight
        if attempt is None:
            attempt = asyncio.get_running_loop().create_task(self._attempt(force=force))
            self._inflight = attempt
            attempt.add_done_callback(self._attempt_done)
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if (
                attempt.cancelled()
                and self._state is not HandleState.RUNNING
                and (current is None or current.cancelling() == 0)
            ):
                # close() ended the attempt we were sharing: that's a closed handle, not a
                # cancellation of this caller.
                return ClosedError("handle closed during refresh", subject=self.subject)
            raise

    def _settle_first(self) -> None:
        """Release an opener waiting for the first attempt (its slot, its outcome)."""
        for first in (self._first_outcome, self._first_slot):
            if first is not None and not first.done():
                first.set_result(None)

    def _attempt_done(self, attempt: asyncio.Task[OcspError | None]) -> None:
        if self._inflight is attempt:
            self._inflight = None
        self._settle_first()
        if not attempt.cancelled():
            # Mark a stray exception (a bug: _attempt handles every OcspError) as retrieved
            # even if every waiter went away; waiters still see it and _guarded_refresh logs it.
            attempt.exception()

    async def _attempt(self, *, force: bool) -> OcspError | None:
        ttl = self.policy.fetch_timeout * max(len(self.urls), 1) + 5
        async with self.store.lock(self.cert_id.key, ttl=ttl) as granted:
            # A fleet member may already have stored a newer response: adopt it, and skip the
            # fetch if that made the next refresh due later.
            adopted = await self._load_from_store()
            if adopted and not force and self._now() < self._due():
                return None
            if not granted:  # another server is fetching for us all: look again shortly
                now = self._now()
                self._schedule(now + timedelta(seconds=min(ttl, 10.0)), now=now)
                return None
            errors: list[OcspError] = []
            for url in self.urls:
                try:
                    # The timeout starts once a fetch slot is ours: queueing behind other
                    # handles (thousands refreshing at once) is not the responder's slowness.
                    async with self._fetch_slots or contextlib.nullcontext():
                        if self._first_slot is not None and not self._first_slot.done():
                            self._first_slot.set_result(None)
                        fetched = await fetch_response(
                            self._session,
                            url,
                            self._request,
                            timeout=self.policy.fetch_timeout,
                            connect_timeout=self.policy.connect_timeout,
                            max_size=self.policy.max_response_size,
                            subject=self.subject,
                        )
                    now = self._now()
                    verified = ocsp.validate(
                        fetched.der,
                        self.cert,
                        self.issuer,
                        now=now,
                        skew=self.policy.skew,
                        margin=self.policy.margin,
                        current=self._response,
                        expected=self.cert_id,
                        subject=self.subject,
                        issuer_checked=True,  # at open; the pair never changes
                    )
                except (FetchError, ValidationError) as exc:
                    errors.append(exc)
                    continue
                self._fresh_until = http_fresh_until(fetched.headers, now)
                self._install(verified, source=url)
                await self._persist(verified)
                await self._report_installed(verified, source=url, loaded=False)
                return None
        return await self._failed(errors)

    def _install(self, verified: ocsp.VerifiedResponse, *, source: str) -> None:
        """Swap the new response in (atomically, as far as the getter can tell)."""
        now = self._now()
        self._response = verified
        self.failures = 0
        self._expired_reported = False
        self._schedule(
            next_refresh(
                verified,
                now=now,
                policy=self.policy,
                fresh_until=self._fresh_until,
                rand=random.random(),
            ),
            now=now,
        )
        if verified.cert_status is ocsp.CertStatus.REVOKED and not self.policy.staple_revoked:
            self._retire_current(
                CertificateRevokedError(
                    "certificate is revoked; the policy withholds revoked responses",
                    subject=self.subject,
                )
            )
            return
        stop_at = (verified.expires - self.policy.margin).timestamp()
        new = OcspResponseContext(verified, self, stop_at)
        old, self._current = self._current, new
        self._live_contexts.add(new)
        self.last_error = None
        if old is not None:
            old._current = False
            if old._refs == 0:
                self._live_contexts.discard(old)

    async def _persist(self, verified: ocsp.VerifiedResponse) -> None:
        try:
            await self.store.put(self.cert_id.key, verified.der, expires=verified.expires)
        except Exception as exc:  # a full or read-only disk must not stop stapling
            log.warning(
                "%s: could not persist the response to %r (%s); serving from memory",
                self.subject,
                self.store,
                exc,
            )

    def _due(self) -> datetime:
        assert self.next_refresh is not None
        return self.next_refresh

    async def _load_from_store(self) -> bool:
        """Adopt what the store holds if it is valid and newer; never trust it blindly.
        Returns whether a response was adopted."""
        try:
            der = await self.store.get(self.cert_id.key)
        except Exception as exc:
            log.warning("%s: could not read %r (%s)", self.subject, self.store, exc)
            return False
        if der is None or der == self._rejected_der:
            return False  # nothing stored, or the same bad bytes we already reported
        if self._response is not None and der == self._response.der:
            return False
        try:
            verified = ocsp.validate(
                der,
                self.cert,
                self.issuer,
                now=self._now(),
                skew=self.policy.skew,
                margin=self.policy.margin,
                current=self._response,
                expected=self.cert_id,
                subject=self.subject,
                issuer_checked=True,
            )
        except Exception as exc:  # never trust the store: anything unreadable is rejected
            if not isinstance(exc, ValidationError):
                exc = BadResponseError(
                    f"unreadable stored response ({exc!r})", subject=self.subject
                )
            self._rejected_der = der
            await self._emit(
                Event(
                    kind=EventKind.REJECTED,
                    handle=self,
                    subject=self.subject,
                    error=exc,
                    source=repr(self.store),
                )
            )
            return False
        self._install(verified, source=repr(self.store))
        await self._report_installed(verified, source=repr(self.store), loaded=True)
        return True

    async def _report_installed(
        self, verified: ocsp.VerifiedResponse, *, source: str, loaded: bool
    ) -> None:
        if verified.cert_status is ocsp.CertStatus.REVOKED:
            kind = EventKind.REVOKED
        else:
            kind = EventKind.LOADED if loaded else EventKind.FETCHED
        await self._emit(
            Event(
                kind=kind,
                handle=self,
                subject=self.subject,
                response=verified,
                source=source,
                next_refresh=self.next_refresh,
            )
        )

    async def _failed(self, errors: list[OcspError]) -> OcspError:
        self.failures += 1
        now = self._now()
        held = self._current.response if self._current is not None else None
        delay = retry_delay(
            self.failures, now=now, policy=self.policy, held=held, rand=random.random()
        )
        self._schedule(now + delay, now=now)
        # With several responder URLs, the last one's reason is reported; each was logged.
        for e in errors[:-1]:
            log.debug("%s", e)
        error = errors[-1] if errors else NoResponderError("no responder URL", subject=self.subject)
        if self._current is None:
            self.last_error = error
        unknown = any(isinstance(e, UnknownStatusError) for e in errors)
        await self._emit(
            Event(
                kind=EventKind.UNKNOWN if unknown else EventKind.FAILED,
                handle=self,
                subject=self.subject,
                error=error,
                next_refresh=self.next_refresh,
            )
        )
        return error

    # -- events ----------------------------------------------------------------------------

    async def _emit(self, event: Event) -> None:
        log.log(_LOG_LEVELS[event.kind], "%s", event)
        if self._on_update is None:
            return
        try:
            result = self._on_update(event)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("%s: on_update callback raised for %s", self.subject, event.kind.value)


async def open_server_ocsp_response(
    chain: ChainInput,
    *,
    wait: bool = True,
    store: Store | None = None,
    on_update: OnUpdate | None = None,
    responder_urls: ResponderUrls | None = None,
    session: aiohttp.ClientSession | None = None,
    clock: Clock | None = None,
    policy: RefreshPolicy | None = None,
    fetch_slots: asyncio.Semaphore | None = None,
) -> ServerOcspResponse:
    """Open a handle for ``chain`` (leaf first) and start its refresher.

    ``responder_urls`` either replaces the certificate's AIA OCSP URLs (a list) or rewrites
    them (a mapping from AIA URL to the URL to use). With ``wait=True`` it waits up to
    ``policy.wait_timeout`` seconds for a first response, and returns the handle even if that
    failed (check :meth:`ServerOcspResponse.get_context` / ``last_error``).

    ``fetch_slots`` bounds concurrent fetches across the handles that share it (a
    :class:`~staple.Stapler` shares one), so a mass refresh queues instead of timing out.

    Raises :class:`ChainError` for an unusable chain and :class:`NoResponderError` when there is
    no responder to ask.
    """
    certs = load_chain(chain)
    # What the handle needs of the leaf's names and extensions is read off a throw-away copy:
    # cryptography keeps every parsed name and extension (~8 KiB) on a certificate once read,
    # and the handle keeps its leaf for as long as it runs.
    leaf = x509.load_der_x509_certificate(certs[0].public_bytes(serialization.Encoding.DER))
    subject = ocsp.describe(leaf)
    policy = policy or RefreshPolicy()
    urls = _responder_urls(leaf, responder_urls)
    if not urls:
        raise NoResponderError(
            "the certificate names no OCSP responder (AIA) and no responder_urls were given",
            subject=subject,
        )
    owns_session = session is None
    if session is None:
        session = aiohttp.ClientSession()
    try:
        if len(certs) < 2:
            certs.append(await _fetch_issuer(session, leaf, subject, policy))
        ocsp.check_issued_by(leaf, certs[1])
        handle = ServerOcspResponse(
            certs,
            subject=subject,
            must_staple=must_staple(leaf),
            urls=urls,
            store=store if store is not None else MemoryStore(),
            session=session,
            owns_session=owns_session,
            clock=clock or SystemClock(),
            policy=policy,
            on_update=on_update,
            fetch_slots=fetch_slots,
        )
    except BaseException:
        if owns_session:
            await session.close()
        raise
    try:
        await handle._start(wait=wait)
    except BaseException:
        await handle.close()
        raise
    return handle


def _responder_urls(leaf: x509.Certificate, override: ResponderUrls | None) -> list[str]:
    if override is None:
        return ocsp_urls(leaf)
    if isinstance(override, Mapping):
        return [override.get(url, url) for url in ocsp_urls(leaf)]
    if isinstance(override, str):
        return [override]
    return list(override)


async def _fetch_issuer(
    session: aiohttp.ClientSession,
    leaf: x509.Certificate,
    subject: str,
    policy: RefreshPolicy,
) -> x509.Certificate:
    urls = ca_issuers_urls(leaf)
    if not urls:
        raise ChainError(
            "the chain holds only the leaf and it names no caIssuers URL: pass [leaf, issuer]",
            subject=subject,
        )
    errors = []
    for url in urls:
        try:
            return await fetch_issuer(
                session,
                url,
                timeout=policy.fetch_timeout,
                max_size=policy.max_response_size,
                subject=subject,
            )
        except ChainError as exc:
            errors.append(exc.reason)
    raise ChainError("could not fetch the issuer: " + "; ".join(errors), subject=subject)
