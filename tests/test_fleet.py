"""A fleet sharing responses through a real redis-server (``staple.redis_store.RedisStore``).

Each "server" is a handle with its own :class:`RedisStore` (its own connections, as separate
processes would have); one test runs real processes. A fake clock drives the refresh cycles
with jitter 0, so every server is due at the same instant: the worst case for single-flight.
Redis keeps real time, so lock expiry is waited for with Redis itself (PTTL), bounded.
Nothing sleeps to make an assertion true: waits are on events or bounded polls.

Skipped when ``redis-server`` is missing, unless ``CI=true`` (then it fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from cryptography import x509

import staple
from staple import EventKind, RefreshPolicy
from staple.redis_store import RedisStore
from staple.testing import FakeClock, Fault, OcspResponder, TestPKI

from .redis_server import RedisServer

pytestmark = pytest.mark.external

POLICY = RefreshPolicy(jitter=0.0, wait_timeout=5.0, fetch_timeout=5.0)
REPO = Path(__file__).resolve().parent.parent
WAIT = 15.0  # real seconds any bounded wait may take before the test fails
LOOK_AGAIN = 10.0  # a server denied the lock looks at the store again this much later


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain client for what a test does behind the stores' backs."""
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def leaf(pki: TestPKI, responder: OcspResponder) -> Any:
    return pki.issue_leaf("fleet.test", ocsp_url=responder.url)


@pytest.fixture
async def new_store(redis_server: RedisServer) -> AsyncIterator[Callable[..., RedisStore]]:
    """Make RedisStores on the test's Redis (one per simulated server); all closed after."""
    made: list[RedisStore] = []

    def make(**kw: Any) -> RedisStore:
        kw.setdefault("timeout", 1.0)
        store = RedisStore(redis_server.url, **kw)
        made.append(store)
        return store

    try:
        yield make
    finally:
        for store in made:
            await store.close()


class Fleet:
    """Handles for one certificate, one per server, and a signal for every event they emit."""

    def __init__(self) -> None:
        self.handles: list[staple.ServerOcspResponse] = []
        self.events: list[staple.Event] = []
        self.changed = asyncio.Event()

    def on_update(self, event: staple.Event) -> None:
        self.events.append(event)
        self.changed.set()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Until ``condition()``, woken by events; the clock doesn't move."""
        async with asyncio.timeout(WAIT):
            while not condition():
                self.changed.clear()
                await self.changed.wait()

    async def settle(self, clock: FakeClock, condition: Callable[[], bool]) -> None:
        """Until ``condition()``: every server adopts on the notice (or fetches), with no
        help from the clock."""
        async with asyncio.timeout(WAIT):
            while not condition():
                self.changed.clear()
                await self.changed.wait()

    def ders(self) -> set[bytes | None]:
        return {h.response.der if h.response else None for h in self.handles}

    def stapled(self) -> list[bytes | None]:
        out: list[bytes | None] = []
        for h in self.handles:
            ctx = h.get_context()
            out.append(ctx.encoded if ctx else None)
            if ctx is not None:
                ctx.free()
        return out

    async def close(self) -> None:
        await asyncio.gather(*(h.close() for h in self.handles))


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    f = Fleet()
    try:
        yield f
    finally:
        await f.close()


async def open_fleet(
    fleet: Fleet, leaf: Any, clock: FakeClock, stores: list[RedisStore], **kw: Any
) -> None:
    """Open one handle per store, all at once (a fleet restarted together)."""
    kw.setdefault("policy", POLICY)
    fleet.handles += await asyncio.gather(
        *(
            staple.open_server_ocsp_response(
                leaf.chain, store=s, clock=clock, on_update=fleet.on_update, **kw
            )
            for s in stores
        )
    )


async def next_cycle(fleet: Fleet, clock: FakeClock) -> None:
    """Move the fake clock to the fleet's next refresh and wait until every server holds a
    response newer than before; all asleep again afterwards."""
    async with asyncio.timeout(WAIT):
        await clock.wait_for_sleepers(len(fleet.handles))
    before = {h.response.this_update for h in fleet.handles if h.response}
    due = min(h.next_refresh.timestamp() for h in fleet.handles if h.next_refresh)
    clock.set(due + 1e-6)
    await fleet.settle(
        clock,
        lambda: all(h.response and h.response.this_update not in before for h in fleet.handles),
    )
    async with asyncio.timeout(WAIT):
        await clock.wait_for_sleepers(len(fleet.handles))


async def poll(condition: Callable[[], Awaitable[bool]], what: str, within: float = WAIT) -> None:
    """Wait for something only real time brings (Redis expiring a key, reconnecting)."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def state_logs(caplog: pytest.LogCaptureFixture) -> tuple[int, int]:
    """How many 'Redis unreachable' and 'reachable again' lines were logged."""
    msgs = [r.getMessage() for r in caplog.records if r.name == "staple.redis"]
    return (
        sum("Redis unreachable" in m for m in msgs),
        sum("Redis reachable again" in m for m in msgs),
    )


# -- single-flight --------------------------------------------------------------------------


async def test_three_servers_one_request_per_cycle(
    leaf, clock, responder, new_store, fleet, raw
) -> None:
    stores = [new_store() for _ in range(3)]
    await open_fleet(fleet, leaf, clock, stores)
    await fleet.settle(clock, lambda: None not in fleet.ders())
    assert responder.requests == 1  # cold start, all three together: one fetch
    assert len(fleet.ders()) == 1
    kinds = sorted(e.kind.value for e in fleet.events)
    assert kinds == ["fetched", "loaded", "loaded"]
    for cycle in range(1, 4):
        await next_cycle(fleet, clock)
        assert responder.requests == 1 + cycle
        assert len(fleet.ders()) == 1
        stapled = fleet.stapled()
        assert stapled[0] is not None and len(set(stapled)) == 1
    # Redis holds exactly that response, expiring a few minutes after it does
    handle = fleet.handles[0]
    assert handle.response is not None
    key = "staple:" + handle.cert_id.key
    assert await raw.get(key) == handle.response.der
    # Redis counts on the real clock: the fake one runs days ahead, the TTL follows it
    ttl = (handle.response.expires - datetime.now(UTC) + timedelta(minutes=5)).total_seconds()
    assert abs(await raw.pttl(key) - ttl * 1000) < 5000
    assert await raw.exists("staple:lock:" + handle.cert_id.key) == 0  # released


class DenialCounting(RedisStore):
    """A RedisStore that counts the times its lock was refused (another member held it)."""

    denied = 0

    def lock(self, key: str, *, ttl: float) -> AbstractAsyncContextManager[bool]:
        return self._counted(super().lock(key, ttl=ttl))

    @contextlib.asynccontextmanager
    async def _counted(self, inner: AbstractAsyncContextManager[bool]) -> AsyncIterator[bool]:
        async with inner as granted:
            if not granted:
                type(self).denied += 1
            yield granted


async def test_opening_while_a_member_fetches_waits_for_its_response(
    leaf, clock, responder, new_store, fleet, redis_server
) -> None:
    """Servers denied the lock at start wait (within wait_timeout) for the holder's response
    instead of starting unstapled: their first handshake is stapled too."""
    DenialCounting.denied = 0
    holder = new_store()
    members: list[RedisStore] = [DenialCounting(redis_server.url, timeout=1.0) for _ in range(2)]
    key = staple.ocsp.cert_id(leaf.cert, leaf.issuer.cert).key
    try:
        async with holder.lock(key, ttl=30) as granted:  # a member is fetching
            assert granted
            opening = asyncio.create_task(open_fleet(fleet, leaf, clock, members))
            # What the servers staple the moment open() returns to them.
            at_open: list[list[bytes | None]] = []
            opening.add_done_callback(lambda _: at_open.append(fleet.stapled()))
            async with asyncio.timeout(WAIT):  # both were refused the lock and sleep on it
                await clock.wait_for_sleepers(2)
            assert DenialCounting.denied == 2
            der = responder.response_for(leaf)
            await holder.put(key, der, expires=clock.now() + timedelta(hours=1))  # notifies
        async with asyncio.timeout(WAIT):
            await opening
        assert at_open == [[der, der]]  # from the first handshake: open() waited for it
        assert responder.requests == 0  # the holder's response, adopted: nobody else fetched
    finally:
        await fleet.close()
        for member in members:
            await member.close()


async def test_notice_makes_the_fleet_adopt_at_once(leaf, clock, responder, new_store, fleet):
    await open_fleet(fleet, leaf, clock, [new_store() for _ in range(3)])
    await fleet.settle(clock, lambda: None not in fleet.ders())
    async with asyncio.timeout(WAIT):
        await clock.wait_for_sleepers(3)
    clock.advance(60)  # a fresher response exists, but nobody is due
    await fleet.handles[0].refresh()
    await fleet.wait_for(lambda: len(fleet.ders()) == 1)  # the others took it from Redis
    assert responder.requests == 2  # the clock never moved: nobody else was due


class NoticeDuringRefresh(RedisStore):
    """Runs ``hook`` right after the read a refresh makes under the lock: the test uses it to
    land a fleet member's put (and its notice) while this server is inside a refresh, between
    taking the lock and going back to sleep - the moment a notice is easiest to lose."""

    hook: Callable[[], Awaitable[None]] | None = None
    _in_refresh = False

    def lock(self, key: str, *, ttl: float) -> AbstractAsyncContextManager[bool]:
        return self._marked(super().lock(key, ttl=ttl))

    @contextlib.asynccontextmanager
    async def _marked(self, inner: AbstractAsyncContextManager[bool]) -> AsyncIterator[bool]:
        async with inner as granted:
            self._in_refresh = True
            try:
                yield granted
            finally:
                self._in_refresh = False

    async def get(self, key: str) -> bytes | None:
        value = await super().get(key)
        if self._in_refresh and self.hook is not None:
            hook, self.hook = self.hook, None
            await hook()
        return value


async def test_notice_landing_during_a_denied_refresh_is_acted_on(
    leaf, clock, responder, redis_server, fleet, raw
) -> None:
    store = NoticeDuringRefresh(redis_server.url)
    try:
        await open_fleet(fleet, leaf, clock, [store])
        (handle,) = fleet.handles
        key = handle.cert_id.key
        async with asyncio.timeout(WAIT):
            await clock.wait_for_sleepers(1)
        assert handle.next_refresh is not None
        clock.set(handle.next_refresh.timestamp() - 60)
        newer = responder.response_for(leaf)  # what another server is about to store
        await raw.set("staple:lock:" + key, b"another server", px=30_000)  # it is fetching
        delivered = asyncio.Event()
        store.watch(key, delivered.set)

        async def another_server_puts() -> None:
            await raw.set("staple:" + key, newer)
            await raw.publish("staple:updates", key)
            async with asyncio.timeout(WAIT):
                await delivered.wait()  # the notice reached this server mid-refresh

        store.hook = another_server_puts
        clock.advance(61)  # due: lock denied, and the notice lands during that attempt
        async with asyncio.timeout(WAIT):
            await clock.wait_for_sleepers(1)
        assert responder.requests == 1
        async with asyncio.timeout(2):  # at once: the clock doesn't move, nobody polls
            await fleet.wait_for(
                lambda: handle.response is not None and handle.response.der == newer
            )
    finally:
        await fleet.close()
        await store.close()


@pytest.mark.slow  # a real process
async def test_real_processes_fetch_once_per_certificate(pki, responder, redis_server, tmp_path):
    responder.clock = staple.SystemClock()  # the processes run on the real clock
    paths = []
    for i in range(2):
        leaf = pki.issue_leaf(f"p{i}.fleet.test", ocsp_url=responder.url)
        path = tmp_path / f"chain{i}.pem"
        leaf.write_chain(path)
        paths.append(str(path))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            SERVER_SCRIPT,
            redis_server.url,
            *paths,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        for _ in range(3)
    ]
    try:
        async with asyncio.timeout(30):
            for p in procs:  # all imported and connected: start them together
                assert p.stdout is not None
                assert await p.stdout.readline() == b"ready\n"
            for p in procs:
                assert p.stdin is not None
                p.stdin.write(b"go\n")
                await p.stdin.drain()
            outputs = [(await p.communicate())[0] for p in procs]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    stapled = [out.decode().split() for out in outputs]
    assert all(len(s) == 2 for s in stapled)
    assert stapled[0] == stapled[1] == stapled[2]  # every process staples the same DER
    assert responder.requests == 2  # one per certificate, not one per process


SERVER_SCRIPT = """
import asyncio, hashlib, sys
import staple
from staple.redis_store import RedisStore

async def main(url, paths):
    store = RedisStore(url)
    changed = asyncio.Event()
    policy = staple.RefreshPolicy(wait_timeout=10.0, fetch_timeout=5.0)
    async with store, staple.Stapler(store=store, policy=policy,
                                     on_update=lambda e: changed.set()) as stapler:
        await store.ping()
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        handles = await asyncio.gather(*(stapler.add(p) for p in paths))
        async with asyncio.timeout(20):
            while any(h.response is None for h in handles):
                changed.clear()
                await changed.wait()
        print(" ".join(hashlib.sha256(h.response.der).hexdigest() for h in handles))

asyncio.run(main(sys.argv[1], sys.argv[2:]))
"""


# -- the lock -------------------------------------------------------------------------------


@pytest.mark.slow
async def test_dead_lock_holder_stalls_nobody_past_the_lock_ttl(
    leaf, clock, responder, new_store, fleet, raw, redis_server
) -> None:
    # A server takes the lock for the certificate, then dies mid-fetch (kill -9).
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLDER_SCRIPT,
        redis_server.url,
        "staple:",
        staple.ocsp.cert_id(leaf.cert, leaf.issuer.cert).key,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout is not None
        async with asyncio.timeout(WAIT):
            assert await holder.stdout.readline() == b"locked\n"
    finally:
        holder.send_signal(signal.SIGKILL)
        await holder.wait()
    lock_key = "staple:lock:" + staple.ocsp.cert_id(leaf.cert, leaf.issuer.cert).key
    assert await raw.pttl(lock_key) > 0
    # wait=False: an opener would wait (wait_timeout) for the holder's response, which never
    # comes; the servers start unstapled at once instead.
    await open_fleet(fleet, leaf, clock, [new_store(), new_store()], wait=False)
    assert await raw.exists(lock_key)  # still held by the dead server: nobody fetched
    assert responder.requests == 0
    assert fleet.stapled() == [None, None]
    # Redis expires the dead holder's lock (PX); the servers look again 10 s later.
    await poll(lambda: _gone(raw, lock_key), "the dead holder's lock to expire")
    async with asyncio.timeout(WAIT):
        await clock.wait_for_sleepers(2)
    assert responder.requests == 0
    clock.advance(10)
    await fleet.settle(clock, lambda: None not in fleet.ders())
    assert responder.requests == 1
    assert len(fleet.ders()) == 1 and None not in fleet.stapled()


async def _gone(raw: aioredis.Redis, key: str) -> bool:
    return not await raw.exists(key)


HOLDER_SCRIPT = """
import asyncio, sys
from staple.redis_store import RedisStore

async def main(url, prefix, key):
    store = RedisStore(url, prefix=prefix)
    async with store.lock(key, ttl=2.0) as granted:
        assert granted
        print("locked", flush=True)
        await asyncio.sleep(60)  # "fetching" until killed

asyncio.run(main(*sys.argv[1:]))
"""


async def test_lock_is_single_holder_and_released_only_by_its_owner(new_store, raw) -> None:
    a, b = new_store(), new_store()
    async with a.lock("k", ttl=0.3) as got_a:
        assert got_a is True
        async with b.lock("k", ttl=5) as got_b:
            assert got_b is False
        assert await raw.exists("staple:lock:k")  # b's exit did not release a's lock
        # a outlives its TTL: Redis expires the lock and b takes it
        await poll(lambda: _gone(raw, "staple:lock:k"), "the lock to expire")
        async with b.lock("k", ttl=5) as got_b:
            assert got_b is True
            token = await raw.get("staple:lock:k")
        assert not await raw.exists("staple:lock:k")
        await raw.set("staple:lock:k", b"someone-else", px=5000)
    # a's release (compare-and-delete) must not delete a lock that is no longer a's
    assert await raw.get("staple:lock:k") == b"someone-else"
    assert token and token != b"someone-else"


async def test_lock_without_ttl_is_given_one(new_store, raw) -> None:
    store = new_store()
    await raw.set("staple:lock:k", b"left by a buggy writer")  # no expiry: would block forever
    async with store.lock("k", ttl=0.3) as got:
        assert got is False
    assert 0 < await raw.pttl("staple:lock:k") <= 300
    await poll(lambda: _gone(raw, "staple:lock:k"), "the capped lock to expire")
    async with store.lock("k", ttl=0.3) as got:
        assert got is True


# -- Redis down, hung, back ----------------------------------------------------------------


async def test_redis_killed_then_back(
    leaf, clock, responder, new_store, fleet, redis_server, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="staple.redis")
    stores = [new_store(timeout=0.5) for _ in range(3)]
    for s in stores:
        s.RETRY_MAX = 0.5  # reconnect quickly once Redis is back
    await open_fleet(fleet, leaf, clock, stores)
    await fleet.settle(clock, lambda: None not in fleet.ders())
    assert responder.requests == 1
    assert state_logs(caplog) == (0, 0)

    redis_server.kill()
    await poll(lambda: _true(not any(s.available for s in stores)), "the listeners to notice")
    await next_cycle(fleet, clock)
    await next_cycle(fleet, clock)
    assert responder.requests == 1 + 3 + 3  # each server fetched for itself, twice
    assert None not in fleet.stapled()  # and kept stapling
    assert state_logs(caplog) == (3, 0)  # one line per store, not one per call

    redis_server.start()  # same port
    await poll(lambda: _true(all(s.available for s in stores)), "the stores to reconnect")
    assert state_logs(caplog) == (3, 3)
    await next_cycle(fleet, clock)
    assert responder.requests == 7 + 1  # single-flight again
    assert len(fleet.ders()) == 1
    assert state_logs(caplog) == (3, 3)


async def _true(value: bool) -> bool:
    return value


async def test_hung_redis_delays_a_refresh_by_one_timeout(
    leaf, clock, responder, new_store, fleet, redis_server, raw, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="staple.redis")
    store = new_store(timeout=0.3)
    await open_fleet(fleet, leaf, clock, [store])
    (handle,) = fleet.handles
    assert responder.requests == 1
    redis_server.pause()
    try:
        clock.advance(60)
        started = time.monotonic()
        await handle.refresh()  # lock times out, then the store fails open at once
        elapsed = time.monotonic() - started
        assert responder.requests == 2
        assert not store.available
        assert elapsed < 2.0, elapsed
        assert None not in fleet.stapled()
        assert state_logs(caplog) == (1, 0)
    finally:
        redis_server.resume()
    await poll(store.ping, "Redis to answer again")
    assert state_logs(caplog) == (1, 1)
    clock.advance(60)
    await handle.refresh()
    assert handle.response is not None
    assert await raw.get("staple:" + handle.cert_id.key) == handle.response.der


async def test_idle_listener_pings_and_notices_a_hung_redis(
    new_store, raw, redis_server, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="staple.redis")
    store = new_store(timeout=0.3)
    store.IDLE_PING = 0.05
    store.RETRY_MAX = 0.3
    assert await store.connect()
    # pongs come back while idle: the connection is kept, nothing logged
    await poll(lambda: _pings(raw, 3), "the idle listener to PING", within=5)
    assert store.available and state_logs(caplog) == (0, 0)
    redis_server.pause()  # the connection stays open, nothing is answered
    try:
        await poll(lambda: _true(not store.available), "the listener to give up", within=5)
    finally:
        redis_server.resume()
    await poll(lambda: _true(store.available), "the listener to resubscribe", within=5)
    assert state_logs(caplog) == (1, 1)


async def _pings(raw: aioredis.Redis, n: int) -> bool:
    stats = await raw.info("commandstats")
    return bool(stats.get("cmdstat_ping", {}).get("calls", 0) >= n)


async def test_key_of_the_wrong_type_fails_open_and_is_overwritten(
    leaf, clock, responder, new_store, fleet, raw, caplog
) -> None:
    key = "staple:" + staple.ocsp.cert_id(leaf.cert, leaf.issuer.cert).key
    await raw.hset(key, "not", "a response")  # GET answers WRONGTYPE
    store = new_store()
    await open_fleet(fleet, leaf, clock, [store])
    assert None not in fleet.stapled()
    assert responder.requests == 1
    assert store.available  # Redis is up: a refusal is not an outage
    assert "Redis refused a command" in caplog.text
    assert fleet.handles[0].response is not None
    assert await raw.get(key) == fleet.handles[0].response.der  # SET replaced the hash


async def test_unreachable_redis_fails_open(leaf, clock, responder, fleet, caplog) -> None:
    caplog.set_level(logging.INFO, logger="staple.redis")
    store = RedisStore(f"redis://127.0.0.1:{_closed_port()}/0", timeout=0.5)
    try:
        assert await store.get("k") is None
        async with store.lock("k", ttl=5) as granted:
            assert granted is True
        await store.put("k", b"x", expires=clock.now())
        await open_fleet(fleet, leaf, clock, [store])
        assert None not in fleet.stapled()
        assert responder.requests == 1
        assert state_logs(caplog) == (1, 0)
        assert not store.available
    finally:
        await fleet.close()
        await store.close()


def _closed_port() -> int:
    from .redis_server import free_port

    return free_port()  # bound and released: nothing listens there


# -- poisoned keys --------------------------------------------------------------------------


async def test_poisoned_key_is_never_stapled(
    leaf, pki, clock, responder, new_store, fleet, raw
) -> None:
    key = "staple:" + staple.ocsp.cert_id(leaf.cert, leaf.issuer.cert).key
    other = pki.issue_leaf("other.fleet.test", ocsp_url=responder.url)
    older = responder.response_for(leaf)  # valid for us, but older than what we will hold
    responder.fault = Fault.WRONG_SIGNER
    forged = responder.response_for(leaf)
    responder.fault = None
    clock.advance(120)

    # Cold start on a poisoned key: rejected, fetched, and the key is healed.
    await raw.set(key, responder.response_for(other))
    await open_fleet(fleet, leaf, clock, [new_store(), new_store()])
    await fleet.settle(clock, lambda: None not in fleet.ders())
    assert responder.requests == 1
    good = fleet.handles[0].response
    assert good is not None and fleet.ders() == {good.der}
    assert EventKind.REJECTED in [e.kind for e in fleet.events]
    assert await raw.get(key) == good.der

    # While running: each poison is written and announced; nobody staples it.
    for poison in (b"\x30\x03garbage", forged, older, responder.response_for(other)):
        rejected = sum(e.kind is EventKind.REJECTED for e in fleet.events)
        await raw.set(key, poison)
        await raw.publish("staple:updates", key.removeprefix("staple:"))
        await fleet.wait_for(
            lambda n=rejected: sum(e.kind is EventKind.REJECTED for e in fleet.events) >= n + 2
        )
        assert fleet.ders() == {good.der}
        assert set(fleet.stapled()) == {good.der}
    assert responder.requests == 1
    assert all(e.error is not None for e in fleet.events if e.kind is EventKind.REJECTED)


# -- the store itself ------------------------------------------------------------------------


async def test_put_ttl_follows_expiry_and_is_never_non_positive(new_store, raw) -> None:
    store = new_store(prefix="t:", grace=timedelta(minutes=5))
    now = datetime.now(UTC)
    await store.put("a", b"der-a", expires=now + timedelta(hours=1))
    assert 3_899_000 < await raw.pttl("t:a") <= 3_900_000
    await store.put("b", b"der-b", expires=now - timedelta(days=1))  # already useless
    assert 0 < await raw.pttl("t:b") <= 1000
    assert await store.get("a") == b"der-a"
    assert await store.get("missing") is None


async def test_one_listener_per_store_closed_with_it(new_store, raw) -> None:
    store = new_store()
    seen: list[str] = []
    stop_a = store.watch("a", lambda: seen.append("a"))
    store.watch("b", lambda: seen.append("b"))
    store.watch("a", lambda: seen.append("a2"))
    # one subscriber on the channel, however many keys are watched
    await poll(lambda: _numsub(raw, "staple:updates", 1), "the listener to subscribe", within=5)
    # right after subscribing, every watcher is called once: notices sent before are lost
    await poll(lambda: _true(len(seen) == 3), "the catch-up notification", within=5)
    assert sorted(seen) == ["a", "a2", "b"]
    seen.clear()
    stop_a()
    await raw.publish("staple:updates", "a")
    await raw.publish("staple:updates", "b")
    await poll(lambda: _true(len(seen) == 2), "the notices", within=5)
    assert seen == ["a2", "b"]
    listener = store._listener
    assert listener is not None
    await store.close()
    await store.close()  # idempotent
    assert listener.done()
    await poll(lambda: _numsub(raw, "staple:updates", 0), "the unsubscribe", within=5)
    # a closed store fails open
    assert await store.get("a") is None
    async with store.lock("a", ttl=1) as granted:
        assert granted is True


async def _numsub(raw: aioredis.Redis, channel: str, n: int) -> bool:
    counts = dict(await raw.pubsub_numsub(channel))
    return bool(counts.get(channel.encode(), 0) == n)


async def test_connect_subscribes_before_any_watch(new_store, raw) -> None:
    async with new_store() as store:
        assert store.available
        assert await _numsub(raw, "staple:updates", 1)  # no wait: entering subscribed
    assert not store.available  # closed
    await poll(lambda: _numsub(raw, "staple:updates", 0), "the unsubscribe", within=5)


def test_repr_hides_credentials() -> None:
    store = RedisStore("redis://user:secret@example.invalid:6380/2")
    assert "secret" not in repr(store)
    assert repr(store) == "RedisStore('redis://example.invalid:6380/2', prefix='staple:')"


def test_decode_responses_client_is_refused() -> None:
    client = aioredis.Redis(decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        RedisStore(client)


async def test_staple_serve_fleet_shares_one_fetch(redis_server, tmp_path) -> None:
    """Two `staple serve` instances with --store redis://: the responder sees one request,
    and both staple the same response."""
    from staple.cli.serve import ServeConfig, Serving, serve

    pki = TestPKI()
    async with OcspResponder(pki) as responder:
        leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
        leaf.write_chain(tmp_path / "chain.pem")
        leaf.write_key(tmp_path / "key.pem")
        config = ServeConfig(
            certs=[(tmp_path / "chain.pem", tmp_path / "key.pem")],
            port=0,
            store_url=redis_server.url,
            policy=RefreshPolicy(wait_timeout=5, fetch_timeout=5),
        )
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        servers, ready = [], []
        for _ in range(2):
            r: asyncio.Future[Serving] = loop.create_future()
            ready.append(r)
            servers.append(
                asyncio.create_task(serve(config, out=io.StringIO(), ready=r, stop=stop))
            )
            async with asyncio.timeout(WAIT):
                await r  # one after the other: the second adopts what the first stored
        try:
            stapled = []
            for r in ready:
                (handle,) = r.result().handles
                ctx = handle.get_context()
                assert ctx is not None
                stapled.append(ctx.encoded)
                ctx.free()
            assert stapled[0] == stapled[1]
            assert responder.requests == 1
        finally:
            stop.set()
            assert await asyncio.gather(*servers) == [0, 0]


@pytest.mark.parametrize(
    ("reason", "sticks"),
    [(x509.ReasonFlags.key_compromise, True), (x509.ReasonFlags.certificate_hold, False)],
)
async def test_revocation_sticks_across_the_fleet_after_the_response_expired(
    leaf, clock, responder, new_store, raw, reason, sticks
) -> None:
    """Server A fetches a revocation; once that response has expired, server B starts on the
    same Redis and the responder says good: B refuses it (the record outlives the response,
    until the certificate's notAfter), unless the revocation was a lifted certificateHold."""
    responder.revoke(leaf, reason=reason)
    first = await staple.open_server_ocsp_response(
        leaf.chain, store=new_store(), clock=clock, policy=POLICY
    )
    key = first.cert_id.key
    revoked = first.response
    assert revoked is not None and revoked.cert_status is staple.CertStatus.REVOKED
    await first.close()
    record_ttl = await raw.pttl("staple:revoked:" + key)
    assert record_ttl > await raw.pttl("staple:" + key)  # kept past the response's expiry
    clock.set(revoked.expires + POLICY.margin)
    responder.set_status(leaf, "good")
    second = await staple.open_server_ocsp_response(
        leaf.chain, store=new_store(), clock=clock, policy=POLICY
    )
    try:
        ctx = second.get_context()
        if sticks:
            assert ctx is None
            assert isinstance(second.last_error, staple.RevocationReversedError)
            assert await raw.exists("staple:revoked:" + key) == 1
        else:
            assert ctx is not None and ctx.cert_status is staple.CertStatus.GOOD
            ctx.free()
            assert await raw.exists("staple:revoked:" + key) == 0
    finally:
        await second.close()
