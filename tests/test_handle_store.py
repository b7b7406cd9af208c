"""How a handle uses its store: the fleet lock's scope, store failures that are bugs, and
revocations that outlive the revoked response (restarts, a fleet).

Real responder over HTTP, real stores, a fake clock; the stores below are real stores with a
log of what was asked of them, not mocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

import staple
from staple import EventKind, RefreshPolicy
from staple.testing import FakeClock, Fault, OcspResponder, TestPKI

POLICY = RefreshPolicy(jitter=0.0, wait_timeout=5.0, fetch_timeout=5.0)
DAY = 86400.0


@pytest.fixture
def leaf(pki: TestPKI, responder: OcspResponder) -> Any:
    return pki.issue_leaf("store.test", ocsp_url=responder.url)


async def open_handle(leaf: Any, clock: FakeClock, **kw: Any) -> staple.ServerOcspResponse:
    kw.setdefault("policy", POLICY)
    return await staple.open_server_ocsp_response(leaf.chain, clock=clock, **kw)


async def turn_loop(times: int = 50) -> None:
    """Let every ready task run (no real time passes)."""
    for _ in range(times):
        await asyncio.sleep(0)


# -- the fleet lock: taken after the fetch slot, released before the events -------------------


class LockLogStore(staple.MemoryStore):
    """A MemoryStore whose lock (always granted, as a local store's) logs when it is held."""

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log
        self.got = asyncio.Event()

    async def get(self, key: str) -> bytes | None:
        self.got.set()
        return await super().get(key)

    async def put(self, key: str, der: bytes, *, expires: datetime) -> None:
        self.log.append("put")
        await super().put(key, der, expires=expires)

    def lock(self, key: str, *, ttl: float) -> AbstractAsyncContextManager[bool]:
        return self._lock()

    @contextlib.asynccontextmanager
    async def _lock(self) -> AsyncIterator[bool]:
        self.log.append("lock")
        try:
            yield True
        finally:
            self.log.append("unlock")


async def test_fleet_lock_waits_for_the_fetch_slot_and_not_for_on_update(
    leaf, clock, responder
) -> None:
    """With thousands of handles queued for fetch slots, a lock taken before the slot would
    expire before the fetch starts; and on_update is user code that must not run under it."""
    log: list[str] = []
    store = LockLogStore(log)
    fetched = asyncio.Event()

    def on_update(event: staple.Event) -> None:
        log.append(event.kind.value)
        if event.kind is EventKind.FETCHED:
            fetched.set()

    slots = asyncio.Semaphore(1)
    await slots.acquire()  # every slot is taken: the handle's first attempt queues
    handle = await open_handle(
        leaf, clock, store=store, wait=False, fetch_slots=slots, on_update=on_update
    )
    try:
        async with asyncio.timeout(10):
            await store.got.wait()
        await turn_loop()
        assert responder.requests == 0
        assert "lock" not in log, "the fleet lock was taken while queueing for a fetch slot"
        slots.release()
        async with asyncio.timeout(10):
            await fetched.wait()
        assert log == ["lock", "put", "unlock", "fetched"]
    finally:
        await handle.close()


# -- store failures that are bugs are logged with their traceback -----------------------------


class BrokenGetStore(staple.MemoryStore):
    """A custom store with a bug: its get raises what no store should."""

    async def get(self, key: str) -> bytes | None:
        raise KeyError("a bug in a custom store")


class WrongTypeStore(staple.MemoryStore):
    """A custom store with a bug: its get returns text, not bytes."""

    async def get(self, key: str) -> bytes | None:
        return "not bytes"  # type: ignore[return-value]


@pytest.mark.parametrize("store_type", [BrokenGetStore, WrongTypeStore])
async def test_a_store_bug_is_logged_with_its_traceback_and_stapling_goes_on(
    leaf, clock, responder, caplog, store_type
) -> None:
    caplog.set_level(logging.WARNING, logger="staple")
    async with await open_handle(leaf, clock, store=store_type()) as handle:
        ctx = handle.get_context()
        assert ctx is not None and ctx.cert_status is staple.CertStatus.GOOD
        ctx.free()
        await handle.refresh()  # and again: the refresher is alive
        assert handle.get_context() is not None
        handle.get_context().free()  # type: ignore[union-attr]
    with_trace = [r for r in caplog.records if r.name == "staple" and r.exc_info]
    assert with_trace, [r.getMessage() for r in caplog.records]
    assert "store.test" in with_trace[0].getMessage()


async def test_an_unwritable_store_is_a_warning_without_traceback(
    leaf, clock, responder, caplog, tmp_path: Path
) -> None:
    """An OSError is the disk's, not a bug: one line, no traceback."""
    (tmp_path / "file").write_bytes(b"")
    store = staple.FileStore(tmp_path / "file" / "cache")  # under a file: every write fails
    caplog.set_level(logging.WARNING, logger="staple")
    async with await open_handle(leaf, clock, store=store) as handle:
        assert handle.get_context() is not None
        handle.get_context().free()  # type: ignore[union-attr]
        handle.get_context().free()  # type: ignore[union-attr]
    persisted = [r for r in caplog.records if "could not persist" in r.getMessage()]
    assert persisted and not any(r.exc_info for r in persisted)


# -- a revocation outlives the revoked response ---------------------------------------------


async def restart_after_expiry(
    leaf: Any,
    clock: FakeClock,
    responder: OcspResponder,
    store: staple.Store,
    reason: x509.ReasonFlags | None,
) -> staple.ServerOcspResponse:
    """Open with a revoked certificate, close, let the revoked response expire, make the
    responder say good, and open again on the same store (the caller closes it)."""
    responder.revoke(leaf, reason=reason)
    first = await open_handle(leaf, clock, store=store)
    ctx = first.get_context()
    assert ctx is not None and ctx.cert_status is staple.CertStatus.REVOKED
    expires = ctx.expires
    ctx.free()
    await first.close()
    clock.set(expires + POLICY.margin)  # the stored revoked response is useless now
    responder.set_status(leaf, "good")
    return await open_handle(leaf, clock, store=store)


@pytest.mark.parametrize("kind", ["memory", "file"])
async def test_revocation_survives_a_restart_after_the_response_expired(
    leaf, clock, responder, tmp_path: Path, kind: str
) -> None:
    store: staple.Store = (
        staple.MemoryStore() if kind == "memory" else staple.FileStore(tmp_path / "cache")
    )
    reason = x509.ReasonFlags.key_compromise
    handle = await restart_after_expiry(leaf, clock, responder, store, reason)
    try:
        assert handle.get_context() is None
        assert isinstance(handle.last_error, staple.RevocationReversedError)
        with pytest.raises(staple.RevocationReversedError):
            await handle.refresh()
    finally:
        await handle.close()
    if kind == "file":  # and again, from a fresh store object on the same directory
        again = await open_handle(leaf, clock, store=staple.FileStore(tmp_path / "cache"))
        try:
            assert again.get_context() is None
            assert isinstance(again.last_error, staple.RevocationReversedError)
        finally:
            await again.close()


@pytest.mark.parametrize("kind", ["memory", "file"])
async def test_a_lifted_certificate_hold_is_accepted_after_a_restart(
    leaf, clock, responder, tmp_path: Path, kind: str
) -> None:
    store: staple.Store = (
        staple.MemoryStore() if kind == "memory" else staple.FileStore(tmp_path / "cache")
    )
    reason = x509.ReasonFlags.certificate_hold
    handle = await restart_after_expiry(leaf, clock, responder, store, reason)
    try:
        ctx = handle.get_context()
        assert ctx is not None and ctx.cert_status is staple.CertStatus.GOOD
        ctx.free()
        assert await store.get_revocation(handle.cert_id.key) is None  # the record is cleared
    finally:
        await handle.close()


async def test_a_forged_revocation_record_is_rejected(leaf, clock, responder, pki: TestPKI) -> None:
    """The record is validated like a response: one signed by another CA's responder (or
    about another certificate) cannot make a good certificate look revoked."""
    other = pki.issue_leaf("other.store.test", ocsp_url=responder.url)
    responder.revoke(other)
    store = staple.MemoryStore()
    handle = await open_handle(leaf, clock, store=store)
    key = handle.cert_id.key
    await handle.close()
    await store.put_revocation(key, responder.response_for(other), until=clock.now())
    events: list[staple.Event] = []
    async with await open_handle(leaf, clock, store=store, on_update=events.append) as again:
        ctx = again.get_context()
        assert ctx is not None and ctx.cert_status is staple.CertStatus.GOOD
        ctx.free()
    rejected = [e for e in events if e.kind is EventKind.REJECTED]
    assert rejected and "revocation record" in str(rejected[0])


async def test_a_withheld_revocation_is_recorded_too(leaf, clock, responder) -> None:
    store = staple.MemoryStore()
    policy = replace(POLICY, staple_revoked=False)
    responder.revoke(leaf)
    async with await open_handle(leaf, clock, store=store, policy=policy) as handle:
        assert handle.get_context() is None
        assert await store.get_revocation(handle.cert_id.key) is not None


# -- the Store revocation API ------------------------------------------------------------


class DictStore(staple.Store):
    """A custom store written before revocation records existed: only get and put."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    async def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    async def put(self, key: str, der: bytes, *, expires: datetime) -> None:
        self.data[key] = der


@pytest.mark.parametrize("kind", ["custom", "memory", "file"])
async def test_store_revocation_api(kind: str, tmp_path: Path, clock: FakeClock) -> None:
    stores: dict[str, staple.Store] = {
        "custom": DictStore(),
        "memory": staple.MemoryStore(),
        "file": staple.FileStore(tmp_path),
    }
    store = stores[kind]
    until = clock.now()
    assert await store.get_revocation("k") is None
    await store.put_revocation("k", b"revoked-der", until=until)
    assert await store.get_revocation("k") == b"revoked-der"
    assert await store.get("k") is None  # apart from the responses
    await store.put("k", b"response-der", expires=until)
    assert await store.get_revocation("k") == b"revoked-der"
    await store.clear_revocation("k")
    await store.clear_revocation("k")  # idempotent
    assert await store.get_revocation("k") is None
    assert await store.get("k") == b"response-der"
    if kind == "file":
        names = await asyncio.to_thread(lambda: sorted(p.name for p in tmp_path.iterdir()))
        assert names == ["k.ocsp"]


async def test_a_custom_store_keeps_revocations_across_a_restart(leaf, clock, responder) -> None:
    store = DictStore()
    handle = await restart_after_expiry(
        leaf, clock, responder, store, x509.ReasonFlags.key_compromise
    )
    try:
        assert handle.get_context() is None
        assert isinstance(handle.last_error, staple.RevocationReversedError)
    finally:
        await handle.close()


async def test_a_stored_revoked_response_without_a_record_gets_one(leaf, clock, responder) -> None:
    """A store filled before revocations were recorded: loading its revoked response records
    it, so it outlives the response from then on."""
    responder.revoke(leaf)
    store = staple.MemoryStore()
    first = await open_handle(leaf, clock, store=store)
    key = first.cert_id.key
    await first.close()
    bare = staple.MemoryStore()
    stored = await store.get(key)
    assert stored is not None
    await bare.put(key, stored, expires=clock.now())
    responder.fault = Fault.DOWN  # only the store can tell
    async with await open_handle(leaf, clock, store=bare) as handle:
        assert handle.response is not None and handle.response.der == stored
        assert await bare.get_revocation(key) == stored
