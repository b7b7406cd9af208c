"""The handle and its refresher against a real responder over HTTP, driven by a fake clock.

Days of refresh schedule run in milliseconds: the refresher sleeps on the injected clock, the
test waits until it is asleep (``settle``), moves time, and counts what the responder saw.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

import staple
from staple import EventKind, RefreshPolicy
from staple.handle import HandleState
from staple.testing import FakeClock, Fault, OcspResponder, TestPKI

HOUR = 3600.0
POLICY = RefreshPolicy(jitter=0.0, wait_timeout=5.0, fetch_timeout=5.0)


@pytest.fixture
def leaf(pki: TestPKI, responder: OcspResponder) -> Any:
    return pki.issue_leaf("handle.test", ocsp_url=responder.url)


class Recorder:
    def __init__(self) -> None:
        self.events: list[staple.Event] = []

    def __call__(self, event: staple.Event) -> None:
        self.events.append(event)

    def kinds(self) -> list[EventKind]:
        return [e.kind for e in self.events]


async def open_handle(leaf: Any, clock: FakeClock, **kw: Any) -> staple.ServerOcspResponse:
    kw.setdefault("policy", POLICY)
    return await staple.open_server_ocsp_response(leaf.chain, clock=clock, **kw)


async def settle(clock: FakeClock) -> None:
    """Wait until the refresher is asleep on the fake clock again (bounded in real time)."""
    async with asyncio.timeout(10):
        await clock.wait_for_sleepers(1)


def due_in(handle: staple.ServerOcspResponse, clock: FakeClock) -> float:
    """Seconds until the handle's next refresh, rounded up past datetime's microseconds."""
    assert handle.next_refresh is not None
    return max(handle.next_refresh.timestamp() - clock.time(), 0.0) + 1e-6


async def step(clock: FakeClock, seconds: float) -> None:
    await settle(clock)
    clock.advance(seconds)
    await settle(clock)


# -- getting contexts -------------------------------------------------------------------------


async def test_first_response_and_refcounts(leaf, clock, responder) -> None:
    async with await open_handle(leaf, clock) as handle:
        assert handle.state is HandleState.RUNNING
        ctx = handle.get_context()
        assert ctx is not None
        assert ctx.cert_status is staple.CertStatus.GOOD
        assert ctx.next_update > clock.now()
        assert handle.last_error is None
        assert handle.live_references == 1 and handle.live_contexts == 1
        ctx.add_ref()
        assert handle.live_references == 2 and ctx.refs == 2
        ctx.free()
        with ctx:
            pass
        assert handle.live_references == 0
        with pytest.raises(RuntimeError, match="more often"):
            ctx.free()
        with pytest.raises(RuntimeError, match="add_ref"):
            ctx.add_ref()
        assert responder.requests == 1
        assert responder.log == [("GET", "good")]


async def test_refresh_at_halfway_and_old_context_survives(leaf, clock, responder) -> None:
    events = Recorder()
    async with await open_handle(leaf, clock, on_update=events) as handle:
        first = handle.get_context()
        assert first is not None
        # responder: thisUpdate = now - 1 min, validity 24 h: halfway is 11 h 59 min from now
        await step(clock, 11 * HOUR)
        assert responder.requests == 1
        await step(clock, 1 * HOUR)
        assert responder.requests == 2
        second = handle.get_context()
        assert second is not None and second is not first
        assert second.this_update > first.this_update
        # the old context stays valid for its holder and is counted until freed
        assert first.encoded and first.refs == 1
        assert handle.live_contexts == 2 and handle.live_references == 2
        first.free()
        second.free()
        assert handle.live_contexts == 1 and handle.live_references == 0
        assert events.kinds() == [EventKind.FETCHED, EventKind.FETCHED]


async def test_outage_keeps_last_good_until_margin_then_none(leaf, clock, responder) -> None:
    events = Recorder()
    async with await open_handle(leaf, clock, on_update=events) as handle:
        ctx = handle.get_context()
        assert ctx is not None
        expires = ctx.expires.timestamp()
        ctx.free()
        responder.fault = Fault.DOWN
        # walk the clock in 10-minute steps until just before the margin: still stapling
        stop = expires - POLICY.margin.total_seconds()
        while clock.time() + 600 < stop:
            await step(clock, 600)
            c = handle.get_context()
            assert c is not None, f"lost the staple {stop - clock.time()} s before the margin"
            c.free()
        failures_before = responder.requests
        assert failures_before > 2  # it kept trying
        await step(clock, stop - clock.time())
        assert handle.get_context() is None
        # expired, and the retry that followed says why nothing replaced it
        assert isinstance(handle.last_error, staple.ExpiredResponseError | staple.FetchError)
        assert EventKind.EXPIRED in events.kinds()
        assert events.kinds().count(EventKind.EXPIRED) == 1
        failed = [e for e in events.events if e.kind is EventKind.FAILED]
        assert failed and "handle.test" in str(failed[0])
        # recovery within one backoff step once the responder is healthy
        responder.fault = None
        await step(clock, due_in(handle, clock))
        c = handle.get_context()
        assert c is not None
        c.free()
        assert handle.failures == 0 and handle.last_error is None


async def test_backoff_is_exponential_and_bounded(leaf, clock, responder) -> None:
    responder.fault = Fault.HTTP_500
    policy = replace(POLICY, wait_timeout=5.0)
    async with await open_handle(leaf, clock, policy=policy) as handle:
        assert handle.get_context() is None
        assert isinstance(handle.last_error, staple.FetchError)
        assert "HTTP 500" in str(handle.last_error)
        delays = []
        for _ in range(8):
            delay = due_in(handle, clock)
            delays.append(delay)
            await step(clock, delay)
        # each delay is within [min, base * 2^(n-1)] and capped at backoff_max
        for n, d in enumerate(delays, start=1):
            ceiling = min(
                POLICY.backoff_max.total_seconds(),
                POLICY.backoff_base.total_seconds() * 2 ** (n - 1),
            )
            assert POLICY.backoff_min.total_seconds() <= d <= ceiling + 1e-3
        assert responder.requests == 1 + len(delays)
        assert handle.failures == 1 + len(delays)


async def test_manual_refresh(leaf, clock, responder) -> None:
    async with await open_handle(leaf, clock) as handle:
        await settle(clock)
        clock.advance(60)
        await handle.refresh()
        assert responder.requests == 2
        responder.fault = Fault.TRY_LATER
        with pytest.raises(staple.ResponderStatusError, match="try_later"):
            await handle.refresh()
        c = handle.get_context()
        assert c is not None  # the previous response is kept
        c.free()


# -- what the responder says ----------------------------------------------------------------


async def test_revoked_is_stapled_and_loud(leaf, clock, responder) -> None:
    responder.revoke(leaf)
    events = Recorder()
    async with await open_handle(leaf, clock, on_update=events) as handle:
        ctx = handle.get_context()
        assert ctx is not None and ctx.cert_status is staple.CertStatus.REVOKED
        assert ctx.revocation_time is not None
        ctx.free()
        assert events.kinds() == [EventKind.REVOKED]


async def test_revoked_can_be_withheld(leaf, clock, responder) -> None:
    responder.revoke(leaf)
    policy = replace(POLICY, staple_revoked=False)
    async with await open_handle(leaf, clock, policy=policy) as handle:
        assert handle.get_context() is None
        assert isinstance(handle.last_error, staple.CertificateRevokedError)
        assert handle.response is not None
        assert handle.response.cert_status is staple.CertStatus.REVOKED


async def test_revocation_replaces_good(leaf, clock, responder) -> None:
    async with await open_handle(leaf, clock) as handle:
        await settle(clock)
        responder.revoke(leaf)
        clock.advance(60)
        await handle.refresh()
        ctx = handle.get_context()
        assert ctx is not None and ctx.cert_status is staple.CertStatus.REVOKED
        ctx.free()


async def test_unknown_never_staples(leaf, clock, responder) -> None:
    responder.set_status(leaf, "unknown")
    events = Recorder()
    async with await open_handle(leaf, clock, on_update=events) as handle:
        assert handle.get_context() is None
        assert isinstance(handle.last_error, staple.UnknownStatusError)
        assert events.kinds() == [EventKind.UNKNOWN]


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (Fault.GARBAGE, staple.BadResponseError),
        (Fault.TRUNCATED, staple.BadResponseError),
        (Fault.OVERSIZE, staple.FetchError),
        (Fault.HTML_ERROR, staple.FetchError),
        (Fault.WRONG_CONTENT_TYPE, staple.FetchError),
        (Fault.UNAUTHORIZED, staple.ResponderStatusError),
        (Fault.EXPIRED, staple.ExpiredResponseError),
        (Fault.FUTURE, staple.NotYetValidError),
        (Fault.NO_NEXT_UPDATE, staple.ExpiredResponseError),
        (Fault.WRONG_SIGNER, staple.UnauthorizedSignerError),
        (Fault.SIGNER_WITHOUT_EKU, staple.UnauthorizedSignerError),
        (Fault.WRONG_CERT, staple.CertIdMismatchError),
        (Fault.DOWN, staple.FetchError),
    ],
)
async def test_bad_answers_never_replace_good(leaf, clock, responder, fault, error) -> None:
    events = Recorder()
    async with await open_handle(leaf, clock, on_update=events) as handle:
        good = handle.get_context()
        assert good is not None
        responder.fault = fault
        await settle(clock)
        clock.advance(60)
        with pytest.raises(error):
            await handle.refresh()
        now = handle.get_context()
        assert now is good  # the same context, not the bad one
        good.free()
        now.free()
        assert events.kinds()[-1] is EventKind.FAILED
        assert events.events[-1].error is not None
        assert "handle.test" in str(events.events[-1].error)


async def test_rollback_refused(leaf, clock, responder) -> None:
    async with await open_handle(leaf, clock) as handle:
        await settle(clock)
        held = handle.response
        assert held is not None
        clock.set(clock.time() - 2 * HOUR)  # the responder now signs an older response
        with pytest.raises(staple.RollbackError):
            await handle.refresh()
        assert handle.response is held


async def test_cache_control_max_age_delays_refresh(leaf, clock, responder) -> None:
    responder.max_age = int(20 * HOUR)
    async with await open_handle(leaf, clock) as handle:
        assert handle.next_refresh is not None
        wait = (handle.next_refresh - clock.now()).total_seconds()
        assert 19.9 * HOUR <= wait <= 20 * HOUR  # not at halfway (12 h) but at max-age
        await step(clock, 19 * HOUR)
        assert responder.requests == 1
        await step(clock, 1 * HOUR)
        assert responder.requests == 2


# -- opening ---------------------------------------------------------------------------------


async def test_wait_false_returns_at_once(leaf, clock, responder) -> None:
    responder.fault = Fault.SLOW
    responder.slow_seconds = 30
    handle = await open_handle(leaf, clock, wait=False)
    try:
        assert handle.get_context() is None
        assert isinstance(handle.last_error, staple.ResponseUnavailableError)
    finally:
        await handle.close()


async def test_wait_is_bounded(leaf, clock, responder) -> None:
    responder.fault = Fault.SLOW
    responder.slow_seconds = 30
    policy = replace(POLICY, wait_timeout=0.2)
    handle = await open_handle(leaf, clock, policy=policy)
    try:
        assert handle.get_context() is None
        assert handle.state is HandleState.RUNNING
    finally:
        await handle.close()


async def test_no_responder(pki, clock) -> None:
    bare = pki.issue_leaf("bare.test")
    with pytest.raises(staple.NoResponderError, match=r"bare\.test"):
        await staple.open_server_ocsp_response(bare.chain, clock=clock)


async def test_wrong_issuer_in_chain(pki, leaf, clock) -> None:
    with pytest.raises(staple.IssuerMismatchError):
        await staple.open_server_ocsp_response([leaf.cert, pki.root.cert], clock=clock)


async def test_unreadable_chain(tmp_path: Path) -> None:
    with pytest.raises(staple.ChainError, match="cannot read"):
        await staple.open_server_ocsp_response(tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_bytes(b"not a certificate")
    with pytest.raises(staple.ChainError, match="no PEM or DER"):
        await staple.open_server_ocsp_response(tmp_path / "junk.pem")


async def test_issuer_from_aia(pki, clock, responder) -> None:
    url = responder.serve_issuer(pki.intermediate)
    lone = pki.issue_leaf("lone.test", ocsp_url=responder.url, ca_issuers_url=url)
    async with await open_handle(lone, clock) as handle:
        assert handle.issuer == pki.intermediate.cert
        c = handle.get_context()
        assert c is not None
        c.free()


async def test_leaf_only_without_ca_issuers(pki, clock, responder) -> None:
    lone = pki.issue_leaf("lone.test", ocsp_url=responder.url)
    with pytest.raises(staple.ChainError, match="caIssuers"):
        await staple.open_server_ocsp_response([lone.cert], clock=clock)


async def test_pem_path_and_override_map(pki, clock, responder, tmp_path) -> None:
    leaf = pki.issue_leaf("mapped.test", ocsp_url="http://ocsp.invalid/")
    leaf.write_chain(tmp_path / "chain.pem")
    async with await staple.open_server_ocsp_response(
        tmp_path / "chain.pem",
        clock=clock,
        policy=POLICY,
        responder_urls={"http://ocsp.invalid/": responder.url},
    ) as handle:
        assert handle.urls == [responder.url]
        c = handle.get_context()
        assert c is not None
        c.free()


async def test_failover_to_second_url(pki, clock, responder) -> None:
    dead = OcspResponder(pki, clock=clock)
    await dead.start()
    dead.fault = Fault.HTTP_500
    leaf = pki.issue_leaf("failover.test", ocsp_url=[dead.url, responder.url])
    try:
        async with await open_handle(leaf, clock) as handle:
            c = handle.get_context()
            assert c is not None
            c.free()
            assert dead.requests == 1 and responder.requests == 1
    finally:
        await dead.close()


async def test_sha256_cert_id(leaf, clock, responder) -> None:
    policy = replace(POLICY, hash_algorithm="sha256")
    async with await open_handle(leaf, clock, policy=policy) as handle:
        assert handle.cert_id.hash_algorithm == "sha256"
        c = handle.get_context()
        assert c is not None and c.response.cert_id == handle.cert_id
        c.free()


# -- stores ----------------------------------------------------------------------------------


async def test_warm_file_store_staples_with_responder_down(leaf, clock, responder, tmp_path):
    store = staple.FileStore(tmp_path / "cache")
    async with await open_handle(leaf, clock, store=store) as handle:
        c = handle.get_context()
        assert c is not None
        first_der = c.encoded
        c.free()
    files = sorted((tmp_path / "cache").iterdir())
    key = handle.cert_id.key
    assert [f.name for f in files] == [key + ".chain.pem", key + ".ocsp"]  # the chain: for status
    assert files[1].read_bytes() == first_der

    responder.fault = Fault.DOWN
    events = Recorder()
    async with await open_handle(
        leaf, clock, store=staple.FileStore(tmp_path / "cache"), on_update=events
    ) as handle:
        c = handle.get_context()
        assert c is not None and c.encoded == first_der
        c.free()
        assert events.kinds()[0] is EventKind.LOADED
    assert responder.requests == 1  # the restarted handle did not need the responder


async def test_file_store_sweeps_what_crashed_writes_left(tmp_path) -> None:
    """A write killed mid-way leaves a ``.tmp-*`` file; the next process's first write removes
    those an hour old, and leaves a fresh one (maybe another process's write in progress)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    old, fresh = cache / ".tmp-old.ocsp", cache / ".tmp-fresh.ocsp"
    other = cache / "notes.txt"
    for path in (old, fresh, other):
        path.write_bytes(b"x")
    hours_ago = time.time() - 2 * HOUR
    os.utime(old, (hours_ago, hours_ago))
    os.utime(other, (hours_ago, hours_ago))
    store = staple.FileStore(cache)
    now = datetime.now(UTC)
    await store.put("k1", b"first", expires=now)
    assert sorted(p.name for p in cache.iterdir()) == [".tmp-fresh.ocsp", "k1.ocsp", "notes.txt"]
    os.utime(fresh, (hours_ago, hours_ago))
    await store.put("k2", b"second", expires=now)  # once per store: the next put doesn't sweep
    assert fresh.exists()
    assert await store.get("k1") == b"first"


async def test_file_store_sweep_removes_the_files_of_expired_certificates(tmp_path) -> None:
    """The first write's sweep removes a key's response, revocation and certificate record
    once its leaf is a day past notAfter; a leaf expired less than a day ago, a valid one and
    a key without a certificate record keep theirs."""
    pki = TestPKI()  # real time: the sweep reads the wall clock, as the store's mtimes do
    now = datetime.now(UTC)
    day, hour = timedelta(days=1), timedelta(hours=1)
    leaves = {
        "gone": pki.issue_leaf("gone.test", not_before=now - 10 * day, not_after=now - 2 * day),
        "grace": pki.issue_leaf("grace.test", not_before=now - 10 * day, not_after=now - hour),
        "valid": pki.issue_leaf("valid.test"),
    }
    cache = tmp_path / "cache"
    writer = staple.FileStore(cache)
    for key, leaf in leaves.items():
        await writer.put_certificate(key, leaf.chain[:2], until=leaf.cert.not_valid_after_utc)
        await writer.put(key, b"response", expires=now)
        await writer.put_revocation(key, b"revoked", until=now)
    await writer.put("norecord", b"response", expires=now)
    kept = ["grace", "norecord", "valid"]
    assert await writer.keys() == ["gone", *kept]  # that store swept at its first write
    await staple.FileStore(cache).put("valid", b"newer", expires=now)  # the next process
    assert await writer.keys() == kept
    assert not list(cache.glob("gone.*"))
    assert await writer.get("grace") == b"response" and await writer.get("valid") == b"newer"
    assert await writer.get_revocation("grace") == b"revoked"
    assert await writer.get_certificate("grace") is not None


@pytest.mark.parametrize("content", [b"", b"corrupt", b"\x30\x82\x01\x00" + b"\0" * 256])
async def test_corrupt_file_ignored_and_replaced(leaf, clock, responder, tmp_path, content):
    store = staple.FileStore(tmp_path)
    key = staple.ocsp.cert_id(leaf.cert, leaf.chain[1]).key
    store.path_for(key).write_bytes(content)
    events = Recorder()
    async with await open_handle(leaf, clock, store=store, on_update=events) as handle:
        assert events.kinds()[:2] == [EventKind.REJECTED, EventKind.FETCHED]
        c = handle.get_context()
        assert c is not None
        assert store.path_for(key).read_bytes() == c.encoded
        c.free()


async def test_foreign_file_ignored(pki, leaf, clock, responder, tmp_path) -> None:
    """A valid response for another certificate under our key must not be stapled."""
    other = pki.issue_leaf("other.test", ocsp_url=responder.url)
    store = staple.FileStore(tmp_path)
    key = staple.ocsp.cert_id(leaf.cert, leaf.chain[1]).key
    store.path_for(key).write_bytes(responder.response_for(other))
    events = Recorder()
    async with await open_handle(leaf, clock, store=store, on_update=events) as handle:
        rejected = events.events[0]
        assert rejected.kind is EventKind.REJECTED
        assert isinstance(rejected.error, staple.CertIdMismatchError)
        c = handle.get_context()
        assert c is not None
        c.free()


async def test_unwritable_store_keeps_serving(leaf, clock, responder, tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    store = staple.FileStore(blocker / "cache")  # a directory under a file: can't be made
    async with await open_handle(leaf, clock, store=store) as handle:
        c = handle.get_context()
        assert c is not None
        c.free()


# -- lifecycle -------------------------------------------------------------------------------


async def test_close_is_idempotent_and_contexts_outlive_it(leaf, clock, responder) -> None:
    events = Recorder()
    handle = await open_handle(leaf, clock, on_update=events)
    ctx = handle.get_context()
    assert ctx is not None
    await handle.close()
    await handle.close()
    assert handle.state is HandleState.CLOSED
    assert events.kinds()[-1] is EventKind.CLOSED
    assert events.kinds().count(EventKind.CLOSED) == 1
    assert handle.get_context() is None
    assert isinstance(handle.last_error, staple.ClosedError)
    assert ctx.encoded and handle.live_contexts == 1
    ctx.free()
    assert handle.live_contexts == 0 and handle.live_references == 0
    with pytest.raises(staple.ClosedError):
        await handle.refresh()


async def test_illegal_state_change_refused(leaf, clock, responder) -> None:
    async with await open_handle(leaf, clock) as handle:
        with pytest.raises(RuntimeError, match="RUNNING -> OPENING"):
            handle._set_state(HandleState.OPENING)
        with pytest.raises(RuntimeError, match="RUNNING -> CLOSED"):
            handle._set_state(HandleState.CLOSED)


async def test_clock_jump_forward_past_expiry(leaf, clock, responder) -> None:
    """A wall clock that jumps past expiry: the getter refuses at once, before any wake-up."""
    async with await open_handle(leaf, clock) as handle:
        await settle(clock)
        responder.fault = Fault.DOWN
        clock.set(clock.time() + 2 * 24 * HOUR)
        assert handle.get_context() is None
        assert isinstance(handle.last_error, staple.ExpiredResponseError)


async def test_callback_errors_are_contained(leaf, clock, responder, caplog) -> None:
    def broken(event: staple.Event) -> None:
        raise ValueError("user bug")

    async with await open_handle(leaf, clock, on_update=broken) as handle:
        c = handle.get_context()
        assert c is not None
        c.free()
    assert "on_update callback raised" in caplog.text


async def test_async_callback_awaited(leaf, clock, responder) -> None:
    seen: list[EventKind] = []

    async def on_update(event: staple.Event) -> None:
        await asyncio.sleep(0)
        seen.append(event.kind)

    async with await open_handle(leaf, clock, on_update=on_update):
        assert seen == [EventKind.FETCHED]


class SharedStore(staple.MemoryStore):
    """A store shared by several handles that tells watchers about puts (like Redis pub/sub)."""

    def __init__(self) -> None:
        super().__init__()
        self.watchers: dict[str, list[Any]] = {}

    async def put(self, key: str, der: bytes, *, expires: Any) -> None:
        await super().put(key, der, expires=expires)
        for callback in list(self.watchers.get(key, [])):
            callback()

    def watch(self, key: str, callback: Any) -> Any:
        self.watchers.setdefault(key, []).append(callback)
        return lambda: self.watchers[key].remove(callback)


async def test_shared_store_notice_adopts_without_fetching(leaf, clock, responder) -> None:
    store = SharedStore()
    adopted = asyncio.Event()
    a = await open_handle(leaf, clock, store=store)
    b = await open_handle(  # adopts a's response from the store
        leaf, clock, store=store, on_update=lambda e: adopted.set()
    )
    try:
        assert responder.requests == 1
        await settle(clock)
        clock.advance(60)
        adopted.clear()
        await a.refresh()  # a fetches; b must adopt on the notice, without a request
        async with asyncio.timeout(10):
            await adopted.wait()
        assert b.response == a.response
        assert responder.requests == 2
    finally:
        await a.close()
        await b.close()
    assert store.watchers[a.cert_id.key] == []  # close() stopped watching


async def test_cancelled_refresh_caller_does_not_stop_the_refresher(leaf, clock, responder):
    """The refresher joins an attempt a caller started; the caller is cancelled: the attempt,
    and the refresher sharing it, carry on."""
    events = Recorder()
    async with await open_handle(leaf, clock, on_update=events) as handle:
        await settle(clock)
        responder.fault = Fault.SLOW
        responder.slow_seconds = 0.3
        caller = asyncio.ensure_future(handle.refresh())
        async with asyncio.timeout(10):
            await responder.wait_for_requests(2)  # the caller's attempt is in flight
        clock.advance(due_in(handle, clock))  # the refresher wakes and joins that attempt
        for _ in range(5):
            await asyncio.sleep(0)
        caller.cancel()
        responder.fault = None
        await settle(clock)  # the shared attempt finished and the refresher slept again
        assert handle._task is not None
        assert not handle._task.done()
        assert events.kinds()[-1] is EventKind.FETCHED
        assert responder.requests == 2


async def test_close_while_refresh_in_flight(leaf, clock, responder) -> None:
    handle = await open_handle(leaf, clock)
    await settle(clock)
    responder.fault = Fault.SLOW
    responder.slow_seconds = 30
    refreshing = asyncio.ensure_future(handle.refresh())
    async with asyncio.timeout(10):
        await responder.wait_for_requests(2)
    await asyncio.gather(handle.close(), handle.close())  # concurrent closes both return
    with pytest.raises(staple.ClosedError):
        await refreshing
    assert handle.state is HandleState.CLOSED


async def test_wait_timeout_runs_once_a_fetch_slot_is_ours(leaf, clock, responder) -> None:
    """Queued behind other handles' fetches (all slots taken), the opener keeps waiting even
    with ``wait_timeout=0``: the timeout counts from when its fetch may start. (Had it started
    at the call, it would have expired on the loop's next turn.)"""
    slots = asyncio.Semaphore(1)
    await slots.acquire()  # another handle's fetch holds the only slot
    policy = replace(POLICY, wait_timeout=0.0)
    opening = asyncio.create_task(open_handle(leaf, clock, policy=policy, fetch_slots=slots))
    for _ in range(200):  # many turns of the loop, no real time
        await asyncio.sleep(0)
    assert not opening.done()
    assert responder.requests == 0
    slots.release()
    handle = await asyncio.wait_for(opening, 10)
    try:
        if handle._inflight is not None:  # the opener gave up at once; the fetch goes on
            await asyncio.wait_for(asyncio.shield(handle._inflight), 10)
        ctx = handle.get_context()
        assert ctx is not None
        ctx.free()
    finally:
        await handle.close()


async def test_handle_is_slotted(leaf, clock, responder) -> None:
    """10,000 handles must stay small: no per-instance dict."""
    handle = await open_handle(leaf, clock)
    try:
        assert not hasattr(handle, "__dict__")
        with pytest.raises(AttributeError):
            handle.no_such_attribute = 1  # type: ignore[attr-defined]
    finally:
        await handle.close()


async def test_a_poke_ends_only_the_sleep(leaf, clock, responder) -> None:
    """refresh() wakes the sleeping refresher by cancelling its sleep; the refresher takes
    that back and goes on: it sleeps again and refreshes on schedule."""
    handle = await open_handle(leaf, clock)
    try:
        task = handle._task
        for _ in range(3):
            await settle(clock)
            await handle.refresh()
        await settle(clock)
        assert handle._task is task and task is not None and not task.done()
        before = responder.requests
        clock.advance(due_in(handle, clock))
        await settle(clock)
        assert responder.requests == before + 1
    finally:
        await handle.close()


async def test_close_right_after_a_poke_still_closes(leaf, clock, responder) -> None:
    handle = await open_handle(leaf, clock)
    task = handle._task
    await settle(clock)
    handle._poke()  # the cancellation is on its way...
    await handle.close()  # ...and close()'s lands on top of it: not taken back
    assert task is not None and task.cancelled()
    assert handle.state is HandleState.CLOSED


@pytest.mark.parametrize(
    ("reason", "sticks"),
    [
        (x509.ReasonFlags.key_compromise, True),
        (None, True),  # no reason given: still permanent
        (x509.ReasonFlags.certificate_hold, False),  # the one revocation that may be lifted
    ],
)
async def test_revocation_sticks_unless_on_hold(leaf, clock, responder, reason, sticks) -> None:
    """A responder that says 'good' after 'revoked' is refused: the revoked response stays,
    and the refusal is an event naming why. A certificateHold may be lifted."""
    responder.revoke(leaf, reason=reason)
    events = Recorder()
    async with await open_handle(leaf, clock, on_update=events) as handle:
        await settle(clock)
        responder.set_status(leaf, "good")
        clock.advance(60)
        if sticks:
            with pytest.raises(staple.RevocationReversedError, match="revocation is permanent"):
                await handle.refresh()
            assert events.kinds()[-1] is EventKind.FAILED
        else:
            await handle.refresh()
        ctx = handle.get_context()
        assert ctx is not None
        expected = staple.CertStatus.REVOKED if sticks else staple.CertStatus.GOOD
        assert ctx.cert_status is expected
        ctx.free()


async def test_open_does_not_wait_for_an_attempt_that_is_not_due(leaf, clock, responder) -> None:
    """The store holds a revoked response the policy withholds: nothing staples, and no
    attempt is due until its refresh. open(wait=True) returns at once rather than wait for a
    first attempt that will not come (here wait_timeout is an hour)."""
    responder.revoke(leaf)
    store = staple.MemoryStore()
    policy = replace(POLICY, staple_revoked=False, wait_timeout=3600.0)
    first = await open_handle(leaf, clock, store=store, policy=policy)
    await first.close()
    requests = responder.requests
    handle = await asyncio.wait_for(open_handle(leaf, clock, store=store, policy=policy), 30)
    try:
        assert handle.get_context() is None
        assert isinstance(handle.last_error, staple.CertificateRevokedError)
        assert responder.requests == requests  # loaded from the store; no fetch was due
    finally:
        await handle.close()
