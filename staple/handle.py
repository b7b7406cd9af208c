"""A handle per certificate chain: the current verified response, kept fresh by a refresher.

Modelled on Windows' ``CertOpenServerOcspResponse`` family. The handle owns one asyncio task
that sleeps until the policy says to refresh, fetches with no lock held by the getter, validates,
persists, and swaps a new immutable :class:`OcspResponseContext` in. The getter,
:meth:`ServerOcspResponse.get_context`, is a few attribute reads and an integer increment: it
never awaits, never does I/O, and returns ``None`` (with :attr:`last_error` saying why) when no
time-valid response is held.

Where the rest lives: the contexts and their reference counts in
:mod:`staple.response_context` (:class:`ContextHolder`, the handle's base class), the events
in :mod:`staple.events`,
every timing and stapling rule in :mod:`staple.policy`, what makes a response acceptable in
:mod:`staple.ocsp`.

Lifecycle (one ``_set_state`` changes it; illegal moves raise)::

    OPENING --start--> RUNNING --close()--> CLOSING ---> CLOSED
       └------------------close()-------------┘

One refresh attempt (:meth:`ServerOcspResponse._attempt`), in this order:

1. adopt what the store holds if a fleet member stored something newer, and stop there if that
   moved the next refresh past now (no fetch slot, no lock);
2. take a local fetch slot (``fetch_slots``), queueing behind other handles;
3. only then take the store's fleet lock, so queueing never eats the lock's TTL; under it look
   at the store again, fetch, validate, install and persist;
4. release the lock, then report events: ``on_update`` is user code and never runs under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from types import TracebackType

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from . import ocsp, policy
from .chain import ChainInput, ResponderUrls, load_chain, must_staple
from .chain import responder_urls as urls_for
from .clock import Clock, SystemClock, to_datetime
from .errors import (
    BadResponseError,
    CertificateRevokedError,
    ClosedError,
    ExpiredResponseError,
    FetchError,
    NoResponderError,
    OcspError,
    ResponseUnavailableError,
    UnknownStatusError,
    ValidationError,
)
from .events import Event, EventKind, OnUpdate, emit
from .fetch import fetch_issuer_of, fetch_response
from .policy import RefreshPolicy
from .proxy import ProxyOption, ProxySettings
from .response_context import ContextHolder, OcspResponseContext
from .stats import FetchStats
from .store import MemoryStore, Store, read_quietly, write_quietly

__all__ = [
    "Event",
    "EventKind",
    "HandleState",
    "OnUpdate",
    "ResponderUrls",
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

_Events = list[Event]  # reported once the attempt's lock is released


class ServerOcspResponse(ContextHolder):
    """The handle for one certificate chain. Create with :func:`open_server_ocsp_response`.

    :meth:`get_context` (no I/O, no await, no lock), :attr:`live_contexts` and
    :attr:`live_references` come from :class:`~staple.response_context.ContextHolder`.
    """

    # A server may hold 10,000 of these: slots keep each one small (past 30 attributes CPython
    # stops sharing instance-dict keys, and every handle would carry a private dict).
    __slots__ = (  # noqa: RUF023 - grouped by concern, not sorted
        # what it serves: the chain, its CertID and request, where it asks and what it keeps
        "chain", "cert", "issuer", "cert_id", "subject", "must_staple", "urls", "store",
        "policy", "_request", "_session", "_owns_session", "_proxies", "_fetch_slots", "_clock",
        "_stats",
        "_on_update",
        # what it knows (the contexts it hands out are ContextHolder's)
        "_response", "_revoked", "_rejected_der", "last_error", "_expired_reported",
        # when it acts next
        "failures", "next_refresh", "_scheduled_at", "_fresh_until", "last_success",
        # its lifecycle, the refresher's sleep and wake-ups, the attempt in flight
        "_state", "_task", "_closed", "_sleeping", "_poked", "_store_changed", "_unwatch",
        "_inflight", "_first_outcome", "_first_slot", "_deferred", "__weakref__",
    )  # fmt: skip

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
        proxies: ProxySettings | None = None,
        stats: FetchStats | None = None,
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
        self._proxies = proxies or ProxySettings()
        self._stats = stats if stats is not None else FetchStats()
        self._clock = clock
        super().__init__(clock.time)  # bound once: get_context() is the hot path
        self._on_update = on_update
        self._state = HandleState.OPENING

        self._response: ocsp.VerifiedResponse | None = None  # newest verified (rollback base)
        self._revoked: ocsp.VerifiedResponse | None = None  # a recorded revocation (store)
        self.last_error: OcspError | None = ResponseUnavailableError(
            "no response fetched yet", subject=self.subject
        )
        self.failures = 0
        self.next_refresh: datetime | None = None
        self.last_success: datetime | None = None
        """When a responder last gave a valid response (the handle's clock)."""
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
        # The last attempt left the fetch to a fleet member holding the store's lock: an opener
        # waits on (bounded by wait_timeout) for the response that member stores, not unstapled.
        self._deferred = False

    # -- what it holds (the getter, get_context(), and the counts are ContextHolder's) -----

    @property
    def state(self) -> HandleState:
        return self._state

    @property
    def response(self) -> ocsp.VerifiedResponse | None:
        """The newest verified response, stapled or not (e.g. a withheld revocation)."""
        return self._response

    # -- lifecycle -------------------------------------------------------------------------

    def _set_state(self, new: HandleState) -> None:
        """The one place the state changes. Raises ``RuntimeError`` for an illegal move."""
        if new not in _TRANSITIONS[self._state]:
            raise RuntimeError(f"illegal handle state change {self._state.name} -> {new.name}")
        self._state = new

    async def _start(self, *, wait: bool) -> None:
        """Load the store, start the refresher (OPENING → RUNNING) and, with ``wait``, wait
        (bounded) for the first attempt. Raises only what the store's ``watch`` raises."""
        events: _Events = []
        # Record the chain, so what the store holds can be re-validated without us (staple status).
        until = self.cert.not_valid_after_utc
        record = self.store.put_certificate(self.cert_id.key, self.chain[:2], until=until)
        await write_quietly(self.store, "record the certificate in", self.subject, record)
        await self._load_revocation(events)
        await self._load_from_store(events)
        await self._emit_all(events)
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
        """Fetch now. Raises :class:`ClosedError` unless RUNNING, and the :class:`OcspError`
        if this attempt failed; the handle keeps stapling the previous response either way."""
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
        """Stop the refresher (→ CLOSING → CLOSED). Contexts already handed out stay valid
        until freed. Idempotent; concurrent callers all return once it is closed."""
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
        self._retire(ClosedError("handle closed", subject=self.subject))
        self._set_state(HandleState.CLOSED)
        self._closed.set_result(None)
        await self._emit(Event.about(self, EventKind.CLOSED))

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
        ctx = self._current
        status = ctx.cert_status.name.lower() if ctx else "none"
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
                await self._adopt_notified()
            await self._check_expiry()
            if self._clock_went_back():
                log.warning("%s: the wall clock went back; refreshing now", self.subject)
                self._schedule(self._now(), now=self._now())
            if self.next_refresh is not None and self._now() >= self.next_refresh:
                await self._guarded_refresh()

    async def _adopt_notified(self) -> None:
        """Adopt the response a fleet member just stored. Never raises (but cancellation)."""
        events: _Events = []
        try:
            await self._load_from_store(events)
        except Exception:  # a bug must not stop the refresher
            log.exception("%s: unexpected error adopting from the store", self.subject)
        if self._current is not None:
            self._settle_first()  # an opener waiting on a fleet member's response has it
        await self._emit_all(events)

    async def _guarded_refresh(self) -> None:
        """A scheduled attempt. Never raises (but cancellation): the refresher never dies."""
        try:
            await self._refresh_once()
        except Exception as exc:  # a bug here must not kill stapling for good
            log.exception("%s: unexpected error in the refresher", self.subject)
            events: _Events = []
            self._failed([OcspError(f"internal error: {exc!r}", subject=self.subject)], events)
            await self._emit_all(events)

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
        ctx = self._current
        if ctx is not None:
            wake = min(wake, ctx.stop_at)
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
        if ctx is not None and self._time() >= ctx.stop_at:
            self._stale(ctx, "; no fresher response could be fetched")
        if isinstance(self.last_error, ExpiredResponseError) and not self._expired_reported:
            self._expired_reported = True
            await self._emit(Event.about(self, EventKind.EXPIRED, error=self.last_error))

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

    def _slot_taken(self) -> None:
        """The first attempt holds a fetch slot: the opener's wait_timeout starts now."""
        if self._first_slot is not None and not self._first_slot.done():
            self._first_slot.set_result(None)

    def _settle_first(self) -> None:
        """Release an opener waiting for the first attempt (its slot, its outcome)."""
        for first in (self._first_outcome, self._first_slot):
            if first is not None and not first.done():
                first.set_result(None)

    def _attempt_done(self, attempt: asyncio.Task[OcspError | None]) -> None:
        if self._inflight is attempt:
            self._inflight = None
        if self._deferred and self._current is None:
            self._slot_taken()  # the opener's wait goes on until the member's response lands
        else:
            self._settle_first()
        if not attempt.cancelled():
            # Mark a stray exception (a bug: _attempt handles every OcspError) as retrieved
            # even if every waiter went away; waiters still see it and _guarded_refresh logs it.
            attempt.exception()

    async def _attempt(self, *, force: bool) -> OcspError | None:
        """One refresh attempt (see the module docstring for its order). Returns the error,
        if it failed; events are reported after the fleet lock is released."""
        events: _Events = []
        error = await self._attempt_quietly(force, events)
        await self._emit_all(events)
        return error

    async def _attempt_quietly(self, force: bool, events: _Events) -> OcspError | None:
        self._deferred = False
        if await self._adopted_instead(force, events):
            return None
        async with self._fetch_slots or contextlib.nullcontext():
            self._slot_taken()
            ttl = policy.fetch_lock_ttl(self.policy, len(self.urls))
            async with self.store.lock(self.cert_id.key, ttl=ttl) as granted:
                # While we queued, the lock's last holder may have stored a response for us.
                await self._load_revocation(events)
                if await self._adopted_instead(force, events):
                    self._stats.lock_adopted += 1
                    return None
                if not granted:  # another server is fetching for us all: look again shortly
                    self._deferred = True
                    self._stats.lock_unavailable += 1
                    now = self._now()
                    self._schedule(now + policy.look_again_after(ttl), now=now)
                    return None
                self._stats.lock_acquired += 1
                errors = await self._fetch_install_persist(events)
        return None if errors is None else self._failed(errors, events)

    async def _adopted_instead(self, force: bool, events: _Events) -> bool:
        """Adopt what the store holds; whether that makes a fetch needless now."""
        adopted = await self._load_from_store(events)
        return policy.skip_fetch_after_adopting(
            adopted=adopted, force=force, now=self._now(), due=self.next_refresh
        )

    async def _fetch_install_persist(self, events: _Events) -> list[OcspError] | None:
        """Ask each responder URL in order until one gives a valid response; install and
        persist it. Returns ``None`` on success, else each URL's error."""
        errors: list[OcspError] = []
        for url in self.urls:
            started = time.monotonic()
            try:
                fetched = await fetch_response(
                    self._session,
                    url,
                    self._request,
                    timeout=self.policy.fetch_timeout,
                    connect_timeout=self.policy.connect_timeout,
                    max_size=self.policy.max_response_size,
                    subject=self.subject,
                    proxy=self._proxies.for_url(url),
                )
                now = self._now()
                verified = self._validate(fetched.der, now=now)
            except (FetchError, ValidationError) as exc:
                result = "error" if isinstance(exc, FetchError) else "rejected"
                self._stats.fetched(result, time.monotonic() - started)
                errors.append(exc)
                continue
            self._stats.fetched("ok", time.monotonic() - started)
            self.last_success = now
            base = policy.rollback_base(self._response, self._revoked)
            self._fresh_until = policy.http_fresh_until(fetched.headers, now)
            self._install(verified)
            await self._persist(verified, lifts=base)
            events.append(Event.installed(self, verified, source=url, loaded=False))
            return None
        return errors

    def _validate(self, der: bytes, *, now: datetime) -> ocsp.VerifiedResponse:
        """:func:`staple.ocsp.validate` for this pair against what we hold (rollback, and
        revocation sticks). Raises its :class:`ValidationError`."""
        return ocsp.validate(
            der,
            self.cert,
            self.issuer,
            now=now,
            skew=self.policy.skew,
            margin=self.policy.margin,
            current=policy.rollback_base(self._response, self._revoked),
            expected=self.cert_id,
            subject=self.subject,
            issuer_checked=True,  # at open; the pair never changes
        )

    def _install(self, verified: ocsp.VerifiedResponse) -> None:
        """Swap the new response in (atomically, as far as the getter can tell) and schedule
        its successor; a response the policy withholds retires the current context instead."""
        now = self._now()
        self._response = verified
        if verified.cert_status is not ocsp.CertStatus.REVOKED:
            self._revoked = None  # validation let it past: a certificateHold was lifted
        self.failures = 0
        self._expired_reported = False
        self._schedule(
            policy.next_refresh(
                verified,
                now=now,
                policy=self.policy,
                fresh_until=self._fresh_until,
                rand=random.random(),
            ),
            now=now,
        )
        if policy.withholds(verified, self.policy):
            self._retire(
                CertificateRevokedError(
                    "certificate is revoked; the policy withholds revoked responses",
                    subject=self.subject,
                )
            )
            return
        stop_at = policy.stop_stapling_at(verified, self.policy).timestamp()
        self._install_context(verified, stop_at=stop_at)
        self.last_error = None

    def _retire(self, reason: OcspError) -> None:
        """Stop handing out the current context (expired, closed, withheld), saying why."""
        self._retire_context()
        self.last_error = reason

    def _stale(self, ctx: OcspResponseContext, why: str = "") -> None:
        """Retire the current context, past its stop moment: :class:`ExpiredResponseError`."""
        self._retire(
            ExpiredResponseError(
                f"held response expires {ctx.expires.isoformat()}, within the margin{why}",
                subject=self.subject,
            )
        )

    # -- the store: never trusted, never fatal ---------------------------------------------

    async def _persist(
        self, verified: ocsp.VerifiedResponse, *, lifts: ocsp.VerifiedResponse | None
    ) -> None:
        """Store the response; record a revocation until the certificate's notAfter, or
        clear the record when ``verified`` is good after a revoked ``lifts`` (a lifted
        certificateHold). A failing store is logged and costs only persistence: never raises
        (but cancellation)."""
        key, der, store, who = self.cert_id.key, verified.der, self.store, self.subject
        await write_quietly(
            store,
            "persist the response to",
            who,
            store.put(key, der, expires=verified.expires),
            stats=self._stats,
        )
        if verified.cert_status is ocsp.CertStatus.REVOKED:
            await self._record_revocation(verified)
        elif lifts is not None and lifts.cert_status is ocsp.CertStatus.REVOKED:
            await write_quietly(
                store,
                "clear the lifted revocation from",
                who,
                store.clear_revocation(key),
                stats=self._stats,
            )

    async def _record_revocation(self, verified: ocsp.VerifiedResponse) -> None:
        """Keep ``verified`` (revoked) as the rollback base and record it in the store until
        the certificate's notAfter, unless that very record is there. Never raises."""
        if self._revoked is not None and self._revoked.der == verified.der:
            return
        self._revoked = verified
        key, until = self.cert_id.key, self.cert.not_valid_after_utc
        record = self.store.put_revocation(key, verified.der, until=until)
        await write_quietly(
            self.store, "record the revocation in", self.subject, record, stats=self._stats
        )

    async def _load_from_store(self, events: _Events) -> bool:
        """Adopt what the store holds if it is valid and newer; never trust it blindly.
        Returns whether a response was adopted; what it refused is a REJECTED event."""
        store = self.store
        der = await read_quietly(
            store, "the response", self.subject, store.get(self.cert_id.key), stats=self._stats
        )
        if der is None or der == self._rejected_der:
            return False  # nothing stored, or the same bad bytes we already reported
        if self._response is not None and der == self._response.der:
            return False
        try:
            verified = self._validate(der, now=self._now())
        except Exception as exc:
            self._rejected_der = der
            events.append(
                Event.about(
                    self, EventKind.REJECTED, error=self._store_error(exc), source=repr(self.store)
                )
            )
            return False
        self._install(verified)
        if verified.cert_status is ocsp.CertStatus.REVOKED:  # stored, maybe never recorded
            await self._record_revocation(verified)
        events.append(Event.installed(self, verified, source=repr(self.store), loaded=True))
        return True

    async def _load_revocation(self, events: _Events) -> None:
        """Read the revocation the store recorded (by an earlier run, or another server) so
        that a responder saying 'good' again is refused; see :func:`policy.revocation_record`.
        A record that does not verify is a REJECTED event and ignored."""
        store, key = self.store, self.cert_id.key
        der = await read_quietly(
            store, "the revocation", self.subject, store.get_revocation(key), stats=self._stats
        )
        if der is None or (self._revoked is not None and der == self._revoked.der):
            return
        try:
            self._revoked = policy.revocation_record(
                der,
                self.cert,
                self.issuer,
                self.policy,
                expected=self.cert_id,
                subject=self.subject,
            )
        except Exception as exc:
            source = f"{self.store!r} (revocation record)"
            events.append(
                Event.about(self, EventKind.REJECTED, error=self._store_error(exc), source=source)
            )

    def _store_error(self, exc: Exception) -> OcspError:
        """What to report for stored bytes that could not be validated. A validation error
        or a parsing ``ValueError`` is the bytes' fault; anything else is a bug (in a custom
        store, or ours), logged with its traceback, and the bytes are refused all the same."""
        if isinstance(exc, OcspError):
            return exc
        if not isinstance(exc, ValueError):
            log.error("%s: unexpected error validating stored bytes", self.subject, exc_info=exc)
        return BadResponseError(f"unreadable stored response ({exc!r})", subject=self.subject)

    # -- events ----------------------------------------------------------------------------

    def _failed(self, errors: list[OcspError], events: _Events) -> OcspError:
        """Count a failed attempt, schedule the retry (backoff) and say why. Returns the
        error to report: the last URL's (each other one is logged at debug level)."""
        self.failures += 1
        now = self._now()
        ctx = self._current
        delay = policy.retry_delay(
            self.failures,
            now=now,
            policy=self.policy,
            held=ctx.response if ctx is not None else None,
            rand=random.random(),
        )
        self._schedule(now + delay, now=now)
        for e in errors[:-1]:
            log.debug("%s", e)
        error = errors[-1] if errors else NoResponderError("no responder URL", subject=self.subject)
        if ctx is None:
            self.last_error = error
        unknown = any(isinstance(e, UnknownStatusError) for e in errors)
        events.append(
            Event.about(self, EventKind.UNKNOWN if unknown else EventKind.FAILED, error=error)
        )
        return error

    async def _emit(self, event: Event) -> None:
        await emit(event, self._on_update)

    async def _emit_all(self, events: _Events) -> None:
        for event in events:
            await emit(event, self._on_update)


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
    proxy: ProxyOption | ProxySettings = None,
    stats: FetchStats | None = None,
) -> ServerOcspResponse:
    """Open a handle for ``chain`` (leaf first) and start its refresher.

    ``responder_urls`` either replaces the certificate's AIA OCSP URLs (a list) or rewrites
    them (a mapping from AIA URL to the URL to use). With ``wait=True`` it waits up to
    ``policy.wait_timeout`` seconds for a first response, and returns the handle even if that
    failed (check :meth:`ServerOcspResponse.get_context` / ``last_error``).

    ``fetch_slots`` bounds concurrent fetches across the handles that share it (a
    :class:`~staple.Stapler` shares one), so a mass refresh queues instead of timing out.

    ``stats`` counts fetches, store errors and fleet-lock outcomes (a Stapler shares one over
    its handles, for :mod:`staple.metrics`); a handle opened alone counts in its own.

    ``proxy`` is the HTTP proxy for responder (and caIssuers) requests: a URL, ``False`` for
    none, or ``None`` (the default) for the environment's ``http_proxy``/``https_proxy``/
    ``no_proxy``, as curl reads them (:mod:`staple.proxy`).

    Raises :class:`ChainError` for an unusable chain, :class:`NoResponderError` when there is
    no responder to ask, and ``ValueError`` for a proxy URL that is not ``http://``.
    """
    proxies = proxy if isinstance(proxy, ProxySettings) else ProxySettings.resolve(proxy)
    certs = load_chain(chain)
    # What the handle needs of the leaf's names and extensions is read off a throw-away copy:
    # cryptography keeps every parsed name and extension (~8 KiB) on a certificate once read,
    # and the handle keeps its leaf for as long as it runs.
    leaf = x509.load_der_x509_certificate(certs[0].public_bytes(serialization.Encoding.DER))
    subject = ocsp.describe(leaf)
    policy = policy or RefreshPolicy()
    urls = urls_for(leaf, responder_urls)
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
            issuer = await fetch_issuer_of(
                session,
                leaf,
                timeout=policy.fetch_timeout,
                max_size=policy.max_response_size,
                subject=subject,
                proxies=proxies,
            )
            certs.append(issuer)
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
            proxies=proxies,
            stats=stats,
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
