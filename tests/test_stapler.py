"""The Stapler's OCSP callback in real handshakes (pyOpenSSL over memory BIOs).

Here the server connection is owned by no staple transport, as in a TLS stack we don't own:
references are released by ``weakref.finalize`` when the connection object goes away.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

import staple
from staple import ClosedError, HandleState, OcspError, ocsp
from staple.stapler import MustStaple, Stapler, StapleRefused
from staple.testing import FakeClock

from .test_tls import BioClient
from .tls_pair import client_context, handshake

VERSIONS = [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION]


@pytest.fixture
async def stapler(clock: FakeClock) -> AsyncIterator[Stapler]:
    async with Stapler(clock=clock, jitter=0.0) as s:
        yield s


def server_context(stapler: Stapler, *leaves: Any) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    for leaf in leaves:
        leaf.configure_pyopenssl(ctx)
    stapler.install(ctx)
    return ctx


def verify(staple_der: bytes, leaf: Any, clock: FakeClock) -> ocsp.VerifiedResponse:
    return ocsp.validate(staple_der, leaf.cert, leaf.chain[1], now=clock.now())


@pytest.mark.parametrize("version", VERSIONS, ids=["tls1.2", "tls1.3"])
async def test_staples_current_response(stapler, pki, responder, clock, version) -> None:
    leaf = pki.issue_leaf("a.test", ocsp_url=responder.url)
    handle = await stapler.add(leaf.chain)
    client, seen = client_context(version=version)
    server = handshake(server_context(stapler, leaf), client)
    assert server.get_protocol_version() == version
    assert len(seen) == 1
    assert verify(seen[0], leaf, clock).cert_status is staple.CertStatus.GOOD
    assert handle.live_references == 1  # held for the connection ...
    del server
    gc.collect()
    assert handle.live_references == 0  # ... and released with it
    assert stapler.stapled == 1


async def test_client_not_asking_gets_nothing(stapler, pki, responder) -> None:
    leaf = pki.issue_leaf("a.test", ocsp_url=responder.url)
    handle = await stapler.add(leaf.chain)
    client, seen = client_context(request_status=False)
    server = handshake(server_context(stapler, leaf), client, request_status=False)
    assert seen == []
    assert stapler.stapled == 0
    assert handle.live_references == 0
    del server


@pytest.mark.parametrize("version", VERSIONS, ids=["tls1.2", "tls1.3"])
async def test_rsa_and_ecdsa_on_one_context(stapler, pki, responder, clock, version) -> None:
    rsa_leaf = pki.issue_leaf("dual.test", key_type="rsa", ocsp_url=responder.url)
    ec_leaf = pki.issue_leaf("dual.test", key_type="ec", ocsp_url=responder.url)
    await stapler.add(rsa_leaf.chain)
    await stapler.add(ec_leaf.chain)
    server_ctx = server_context(stapler, rsa_leaf, ec_leaf)
    for sigalgs, leaf in (
        (b"RSA-PSS+SHA256:RSA+SHA256", rsa_leaf),
        (b"ECDSA+SHA256", ec_leaf),
    ):
        client, seen = client_context(version=version, sigalgs=sigalgs)
        server = handshake(server_ctx, client)
        assert server.get_certificate(as_cryptography=True) == leaf.cert
        assert verify(seen[0], leaf, clock).cert_id.serial_number == leaf.cert.serial_number
        del server
    gc.collect()
    assert stapler.live_references == 0


async def test_sni_contexts_each_staple_their_own(stapler, pki, responder, clock) -> None:
    a = pki.issue_leaf("a.test", ocsp_url=responder.url)
    b = pki.issue_leaf("b.test", ocsp_url=responder.url)
    await stapler.add(a.chain)
    await stapler.add(b.chain)
    contexts = {b"a.test": server_context(stapler, a), b"b.test": server_context(stapler, b)}
    default = contexts[b"a.test"]

    def pick(conn: SSL.Connection) -> None:
        name = conn.get_servername()
        if name in contexts:
            conn.set_context(contexts[name])

    default.set_tlsext_servername_callback(pick)
    for name, leaf in ((b"a.test", a), (b"b.test", b)):
        client, seen = client_context()
        server = handshake(default, client, servername=name)
        assert verify(seen[0], leaf, clock).cert_id.serial_number == leaf.cert.serial_number
        del server


async def test_refresh_while_connection_open(stapler, pki, responder, clock) -> None:
    leaf = pki.issue_leaf("a.test", ocsp_url=responder.url)
    handle = await stapler.add(leaf.chain)
    server_ctx = server_context(stapler, leaf)
    client, seen = client_context()
    long_lived = handshake(server_ctx, client)
    clock.advance(60)
    await handle.refresh()
    client, seen2 = client_context()
    fresh = handshake(server_ctx, client)
    assert seen[0] != seen2[0]
    assert handle.live_contexts == 2  # the old one lives on for the long-lived connection
    del long_lived
    gc.collect()
    assert handle.live_contexts == 1
    assert handle.live_references == 1
    del fresh
    gc.collect()
    assert handle.live_references == 0


async def test_many_handshakes_with_refreshes_leave_no_references(
    stapler, pki, responder, clock
) -> None:
    leaf = pki.issue_leaf("a.test", ocsp_url=responder.url)
    handle = await stapler.add(leaf.chain)
    server_ctx = server_context(stapler, leaf)
    client, seen = client_context(version=SSL.TLS1_3_VERSION)
    kept = []
    for i in range(1000):
        if i % 100 == 0:
            clock.advance(60)
            await handle.refresh()
        server = handshake(server_ctx, client)
        if i % 10 == 0:
            kept.append(server)  # some connections outlive several refreshes
    assert len(seen) == 1000
    assert handle.live_references == len(kept) + 1  # + the last `server`
    kept.clear()
    del server
    gc.collect()
    assert handle.live_references == 0
    assert handle.live_contexts == 1
    assert stapler.stapled == 1000


async def test_no_response_lenient_and_strict(pki, responder, clock) -> None:
    good = pki.issue_leaf("good.test", ocsp_url=responder.url)
    unknown = pki.issue_leaf("unknown.test", ocsp_url=responder.url)
    must = pki.issue_leaf("must.test", ocsp_url=responder.url, must_staple=True)
    responder.set_status(unknown, "unknown")
    responder.set_status(must, "unknown")
    for policy, refused in (
        (MustStaple.LENIENT, set()),
        (MustStaple.MUST_STAPLE, {"must.test"}),
        (MustStaple.STRICT, {"must.test", "unknown.test"}),
    ):
        async with Stapler(clock=clock, must_staple=policy) as stapler:
            for leaf in (good, unknown, must):
                await stapler.add(leaf.chain)
            for leaf, name in ((good, "good.test"), (unknown, "unknown.test"), (must, "must.test")):
                client, seen = client_context()
                if name in refused:
                    with pytest.raises(StapleRefused, match=name):
                        handshake(server_context(stapler, leaf), client)
                else:
                    handshake(server_context(stapler, leaf), client)
                    assert seen[0] if name == "good.test" else seen == [b""]
            assert stapler.refused == len(refused)


async def test_unmanaged_certificate_gets_no_staple(stapler, pki, responder, caplog) -> None:
    managed = pki.issue_leaf("managed.test", ocsp_url=responder.url)
    stranger = pki.issue_leaf("stranger.test", ocsp_url=responder.url)
    await stapler.add(managed.chain)
    client, seen = client_context()
    handshake(server_context(stapler, stranger), client)
    assert seen == [b""]
    assert stapler.callback_errors == 1
    assert "no handle for the served certificate" in caplog.text


async def test_install_refuses_stdlib_context(stapler) -> None:
    import ssl

    with pytest.raises(TypeError, match="stdlib ssl module cannot staple"):
        stapler.install(ssl.create_default_context())


async def test_chains_share_one_issuer_object(stapler, pki, responder) -> None:
    """Chains read from PEM each parse the intermediate; the Stapler keeps one copy of it."""
    handles = []
    for name in ("one.share.test", "two.share.test"):
        leaf = pki.issue_leaf(name, ocsp_url=responder.url)
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in leaf.chain)
        handles.append(await stapler.add(pem))
    one, two = handles
    assert one.issuer == two.issuer == pki.intermediate.cert
    assert one.issuer is two.issuer
    assert one.cert is not two.cert


async def test_adds_open_a_bounded_number_at_once(pki, responder, clock, monkeypatch) -> None:
    """Thousands of add()s gathered at start-up open max_concurrent_fetches at a time (the
    rest wait as bare coroutines), and every one of them staples."""
    opening = peak = 0
    real_open = staple.open_server_ocsp_response

    async def counting_open(*args: Any, **kwargs: Any) -> staple.ServerOcspResponse:
        nonlocal opening, peak
        opening += 1
        peak = max(peak, opening)
        try:
            return await real_open(*args, **kwargs)
        finally:
            opening -= 1

    monkeypatch.setattr(staple.stapler, "open_server_ocsp_response", counting_open)
    leaves = [pki.issue_leaf(f"gate{i}.test", ocsp_url=responder.url) for i in range(8)]
    async with Stapler(clock=clock, max_concurrent_fetches=2) as stapler:
        handles = await asyncio.gather(*(stapler.add(leaf.chain) for leaf in leaves))
        assert peak == 2
        for handle in handles:
            ctx = handle.get_context()
            assert ctx is not None
            ctx.free()


# -- closing, and add() racing close() ----------------------------------------------------------


async def test_add_racing_close_leaves_nothing_running(pki, responder, clock, monkeypatch, caplog):
    """An add() already past its closed-check when close() runs must not leave a handle behind
    (its refresher would retry forever on the closed session): it raises ClosedError."""
    real_open = staple.open_server_ocsp_response
    opening = asyncio.Event()
    may_open = asyncio.Event()
    opened: list[staple.ServerOcspResponse] = []

    async def open_when_allowed(*args: Any, **kwargs: Any) -> staple.ServerOcspResponse:
        opening.set()
        await may_open.wait()
        handle = await real_open(*args, **kwargs)
        opened.append(handle)
        return handle

    monkeypatch.setattr(staple.stapler, "open_server_ocsp_response", open_when_allowed)
    leaf = pki.issue_leaf("race.test", ocsp_url=responder.url)
    stapler = Stapler(clock=clock)
    adding = asyncio.create_task(stapler.add(leaf.chain))
    await opening.wait()  # the add is past its checks, opening the handle
    closing = asyncio.create_task(stapler.close())
    await asyncio.sleep(0)  # close() starts while the open is in progress ...
    may_open.set()  # ... which then goes on
    with pytest.raises(ClosedError, match="closed"):
        await adding
    await closing
    assert stapler.handles == []
    assert all(h.state is HandleState.CLOSED for h in opened)
    with pytest.raises(ClosedError):
        await stapler.add(leaf.chain)
    assert "unexpected error" not in caplog.text


async def test_concurrent_close_waits_for_the_first(pki, responder, clock) -> None:
    leaf = pki.issue_leaf("close.test", ocsp_url=responder.url)
    stapler = Stapler(clock=clock)
    handle = await stapler.add(leaf.chain)
    first = asyncio.create_task(stapler.close())
    await asyncio.sleep(0)  # the first close() is under way, waiting for its handle
    await stapler.close()  # the second returns only once everything is closed
    assert handle.state is HandleState.CLOSED
    assert first.done()
    await first
    await stapler.close()  # and again: idempotent


async def test_closed_stapler_raises_closed_error(clock) -> None:
    stapler = Stapler(clock=clock)
    await stapler.close()
    with pytest.raises(ClosedError, match="Stapler is closed") as caught:
        await stapler.add(b"unused")
    assert isinstance(caught.value, OcspError)


def test_staple_refused_is_an_ocsp_error() -> None:
    assert issubclass(StapleRefused, OcspError)
    assert staple.StapleRefused is StapleRefused is staple.errors.StapleRefused


# -- refusals over real TCP handshakes ---------------------------------------------------------


def _status_client(version: int) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)  # no verification: this is about the staple
    ctx.set_min_proto_version(version)
    ctx.set_max_proto_version(version)
    ctx.set_ocsp_client_callback(lambda conn, data, _: True)
    return ctx


@pytest.mark.parametrize("version", VERSIONS, ids=["tls1.2", "tls1.3"])
async def test_refusals_are_policy_not_errors(pki, responder, clock, caplog, version) -> None:
    """A refused handshake is counted, logged as one WARNING a minute per certificate, and
    closed with an alert; it never reaches the loop's exception handler."""
    must = pki.issue_leaf("must.test", ocsp_url=responder.url, must_staple=True)
    other = pki.issue_leaf("other.test", ocsp_url=responder.url, must_staple=True)
    for leaf in (must, other):
        responder.set_status(leaf, "unknown")  # never stapled
    loop = asyncio.get_running_loop()
    reports: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reports.append(context))
    caplog.set_level(logging.DEBUG)

    async def refused(port: int) -> None:
        client = await BioClient.open(port, _status_client(version), request_ocsp=True)
        with pytest.raises(SSL.Error, match="internal error"):
            await client.handshake()
        assert await client.reader.read() == b""  # the server closed the connection
        client.writer.close()
        await client.writer.wait_closed()

    try:
        async with Stapler(clock=clock, must_staple="must_staple") as stapler:
            for leaf in (must, other):
                await stapler.add(leaf.chain)
            servers = [
                await staple.tls.create_server(
                    asyncio.Protocol, "127.0.0.1", 0, ssl_context=server_context(stapler, leaf)
                )
                for leaf in (must, other)
            ]
            must_port, other_port = (s.sockets[0].getsockname()[1] for s in servers)
            for _ in range(3):
                await refused(must_port)
            await refused(other_port)  # another certificate: its own warning
            clock.advance(60)
            await refused(must_port)  # a minute later: warned again
            for server in servers:
                server.close()
                await server.wait_closed()
            assert stapler.refused == 5
    finally:
        loop.set_exception_handler(None)
    assert reports == []
    warned = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "handshake refused" in r.getMessage()
    ]
    assert len(warned) == 3, warned
    assert ["must.test" in w for w in warned] == [True, False, True]
    assert "other.test" in warned[1]
    assert "must_staple=must_staple" in warned[0]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


@pytest.mark.parametrize("transport", staple.tls.TRANSPORTS)
async def test_handshakes_that_did_not_ask_are_counted(pki, responder, clock, transport) -> None:
    """OpenSSL calls the OCSP callback only for clients that ask; staple's transports tell the
    Stapler about the others when their handshake completes (not_requested)."""
    leaf = pki.issue_leaf("count.test", ocsp_url=responder.url)
    async with Stapler(clock=clock) as stapler:
        await stapler.add(leaf.chain)
        server = await staple.tls.create_server(
            _Echo,
            "127.0.0.1",
            0,
            ssl_context=server_context(stapler, leaf),
            transport=transport,
        )
        port = server.sockets[0].getsockname()[1]
        try:
            for asked in (True, False, False, True, False):
                ctx = _status_client(SSL.TLS1_3_VERSION)
                client = await BioClient.open(port, ctx, request_ocsp=asked)
                await client.handshake()
                client.send(b"ping")  # answered: the server's handshake is complete
                assert await client.recv() == b"ping"
                client.writer.close()
                await client.writer.wait_closed()
        finally:
            server.close()
            await server.wait_closed()
    assert (stapler.stapled, stapler.unstapled, stapler.not_requested) == (2, 0, 3)
