"""Hostile TLS clients against a stapling server: it keeps serving everyone else.

The server is ``staple.tls.create_server`` (a tiny HTTP-ish app) or an aiohttp app behind
``staple.aiohttp.StaplingSite``, both stapling through a :class:`staple.Stapler` fed by a local
responder. Each test sends something a broken or malicious client would - garbage, a ClientHello
one byte at a time, handshakes that never finish, resets, renegotiation, truncation, a client
that never reads - and then checks, with a well-behaved client, that the server still completes
stapled handshakes (the staple verified with :func:`staple.ocsp.validate`).

Every test also checks, on the way out, that nothing reached the event loop's exception handler
(a recording handler is installed), that every stapled context was released
(``stapler.live_references == 0``), and (``filterwarnings = error``) that no transport leaked.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from OpenSSL import SSL

import staple
from staple import tls, tls_socket
from staple.aiohttp import StaplingSite
from staple.stapler import Stapler
from staple.testing import Leaf, OcspResponder, TestPKI

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"
HANDSHAKE_TIMEOUT = 0.5
BIG = 32 << 20  # what /big answers: far more than any socket buffer holds
KINDS = ["create_server", "stapling_site"]


# -- the server ------------------------------------------------------------------------------


class TinyHttp(asyncio.Protocol):
    """Answers one request head: ``/big`` with BIG bytes under flow control, else ``ok``."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.buffer = b""
        self.answered = False
        self.paused = False
        self.remaining = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > 64 * 1024:  # a request head this long is an attack
            self.transport.close()
        elif b"\r\n\r\n" in self.buffer and not self.answered:
            self.answered = True
            path = self.buffer.split(b" ", 2)[1] if self.buffer.count(b" ") >= 2 else b"/"
            if path == b"/big":
                self.transport.write(_head(BIG))
                self.remaining = BIG
                self._pump()
            else:
                self.transport.write(_head(2) + b"ok")
                self.transport.close()

    def _pump(self) -> None:
        while self.remaining and not self.paused and not self.transport.is_closing():
            n = min(len(_CHUNK), self.remaining)
            self.transport.write(_CHUNK[:n])
            self.remaining -= n
        if not self.remaining:
            self.transport.close()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()


_CHUNK = bytes(64 * 1024)


def _head(length: int) -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n".encode()


async def _aiohttp_index(request: web.Request) -> web.StreamResponse:
    return web.Response(body=b"ok")


async def _aiohttp_big(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Length": str(BIG)})
    await response.prepare(request)
    for _ in range(BIG // len(_CHUNK)):
        await response.write(_CHUNK)  # awaits drain: flow control
    return response


@dataclass
class World:
    kind: str
    pki: TestPKI
    leaf: Leaf
    responder: OcspResponder
    stapler: Stapler
    port: int = 0
    loop_errors: list[dict[str, Any]] = field(default_factory=list)
    apps: list[TinyHttp] = field(default_factory=list)
    site: StaplingSite | None = None

    def transports(self) -> list[Any]:
        """The TLS transports of connections whose handshake completed, still open."""
        if self.site is not None:
            server = self.site._runner.server  # aiohttp's: its handlers and their transports
            assert server is not None
            found: list[Any] = list(server._connections.values())
        else:
            found = [a.transport for a in self.apps if a.transport is not None]
        return [t for t in found if t.tls_state is not tls.TLSState.CLOSED]


# The TLS transport under test, set for each test by the autouse ``transport`` fixture.
TRANSPORT: tls.TransportKind = tls.DEFAULT_TRANSPORT


@pytest.fixture(params=tls.TRANSPORTS, autouse=True)
def transport(request: pytest.FixtureRequest) -> Iterator[tls.TransportKind]:
    """Every test runs on both TLS transports: memory BIOs, and OpenSSL on the socket."""
    global TRANSPORT
    TRANSPORT = request.param
    try:
        yield request.param
    finally:
        TRANSPORT = tls.DEFAULT_TRANSPORT


@pytest.fixture(scope="module")
def pki() -> TestPKI:
    return TestPKI()


def server_context(leaf: Leaf, stapler: Stapler) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    leaf.configure_pyopenssl(ctx)
    stapler.install(ctx)
    return ctx


@contextlib.asynccontextmanager
async def running(kind: str, pki: TestPKI, **options: Any) -> AsyncIterator[World]:
    """A stapling server of ``kind`` on 127.0.0.1; on exit, the checks every test shares."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    options.setdefault("handshake_timeout", HANDSHAKE_TIMEOUT)
    options.setdefault("transport", TRANSPORT)
    try:
        async with OcspResponder(pki) as responder, Stapler(fetch_timeout=5.0) as stapler:
            leaf = pki.issue_leaf("hostile.test", ocsp_url=responder.url)
            await stapler.add(leaf.chain)
            world = World(kind, pki, leaf, responder, stapler, loop_errors=errors)
            ctx = server_context(leaf, stapler)
            if kind == "create_server":

                def factory() -> TinyHttp:
                    tiny = TinyHttp()
                    world.apps.append(tiny)
                    return tiny

                server = await tls.create_server(factory, HOST, 0, ssl_context=ctx, **options)
                world.port = server.sockets[0].getsockname()[1]
                try:
                    yield world
                    await _all_released(stapler)
                finally:
                    server.close()
                    for tiny in world.apps:  # connections the test left open
                        if tiny.transport is not None:
                            tiny.transport.abort()
                    await server.wait_closed()
            else:
                web_app = web.Application()
                web_app.router.add_get("/", _aiohttp_index)
                web_app.router.add_get("/big", _aiohttp_big)
                runner = web.AppRunner(web_app, access_log=None, shutdown_timeout=1.0)
                await runner.setup()
                site = StaplingSite(runner, HOST, 0, ssl_context=ctx, **_site_options(options))
                await site.start()
                world.site, world.port = site, site.port
                try:
                    yield world
                    await _all_released(stapler)
                finally:
                    await runner.cleanup()
            await _until(lambda: stapler.live_references == 0, 5.0, "stapled contexts freed")
        for _ in range(3):
            await asyncio.sleep(0)
        gc.collect()
        assert not errors, errors
    finally:
        loop.set_exception_handler(previous)


async def _all_released(stapler: Stapler) -> None:
    """Once the clients are gone, the server still up: every stapled context was freed."""
    await _until(lambda: stapler.live_references == 0, 5.0, "stapled contexts released")


def _site_options(options: dict[str, Any]) -> dict[str, Any]:
    renamed = dict(options)
    if "shutdown_timeout" in renamed:
        renamed["tls_shutdown_timeout"] = renamed.pop("shutdown_timeout")
    return renamed


async def _until(predicate: Any, timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110 - no event says so
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for: {what}") from None


# -- clients ---------------------------------------------------------------------------------


class Client:
    """A pyOpenSSL client on memory BIOs over an asyncio TCP stream: every byte explicit."""

    def __init__(
        self,
        world: World,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        version: int | None = None,
    ) -> None:
        self.world = world
        self.reader, self.writer = reader, writer
        self.staples: list[bytes] = []
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        if version is not None:
            ctx.set_min_proto_version(version)
            ctx.set_max_proto_version(version)
        ctx.set_ocsp_client_callback(self._on_ocsp)
        self.conn = SSL.Connection(ctx, None)
        self.conn.set_connect_state()
        self.conn.set_tlsext_host_name(b"hostile.test")
        self.conn.request_ocsp()

    @classmethod
    async def open(cls, world: World, *, version: int | None = None) -> Client:
        reader, writer = await asyncio.open_connection(HOST, world.port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(world, reader, writer, version=version)

    def _on_ocsp(self, conn: SSL.Connection, data: bytes, _: object) -> bool:
        self.staples.append(data)
        return True

    def pending_output(self) -> bytes:
        out = b""
        while True:
            try:
                out += self.conn.bio_read(65536)
            except SSL.WantReadError:
                return out

    def flush(self) -> None:
        data = self.pending_output()
        if data:
            self.writer.write(data)

    async def feed(self) -> bool:
        data = await self.reader.read(65536)
        if data:
            self.conn.bio_write(data)
        return bool(data)

    def client_hello(self) -> bytes:
        """Start the handshake; the ClientHello OpenSSL wants to send (not sent yet)."""
        with contextlib.suppress(SSL.WantReadError):
            self.conn.do_handshake()
        return self.pending_output()

    async def handshake(self) -> None:
        while True:
            try:
                self.conn.do_handshake()
                break
            except SSL.WantReadError:
                self.flush()
                if not await self.feed():
                    raise ConnectionError("EOF during the handshake") from None
        self.flush()

    async def get(self, path: str = "/") -> bytes:
        """One request; the whole answer (the server closes after it)."""
        request = f"GET {path} HTTP/1.1\r\nHost: hostile.test\r\nConnection: close\r\n\r\n"
        self.conn.sendall(request.encode())
        self.flush()
        answer = b""
        while True:
            try:
                answer += self.conn.recv(65536)
            except SSL.WantReadError:
                self.flush()
                if not await self.feed():
                    return answer
            except SSL.ZeroReturnError:
                return answer

    def verify_staple(self) -> staple.ocsp.VerifiedResponse:
        assert len(self.staples) == 1 and self.staples[0], "no staple"
        leaf = self.world.leaf
        return staple.ocsp.validate(
            self.staples[0], leaf.cert, leaf.chain[1], now=datetime.now(UTC), margin=timedelta(0)
        )

    def reset(self) -> None:
        """Abort with a TCP RST."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def good_client(world: World, *, version: int | None = None) -> None:
    """A full stapled handshake and one request, all within a second or two."""
    async with asyncio.timeout(5):
        client = await Client.open(world, version=version)
        try:
            await client.handshake()
            assert client.verify_staple().cert_status is staple.CertStatus.GOOD
            answer = await client.get()
            assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"ok"), answer
        finally:
            await client.close()


async def raw(world: World) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(HOST, world.port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes (EOF or reset)."""
    data = b""
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


async def close_raw(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


# -- garbage and fragmentation ---------------------------------------------------------------

GARBAGE = {
    "http": b"GET / HTTP/1.1\r\nHost: hostile.test\r\n\r\n",
    "zeros": bytes(4096),
    "random": os.urandom(4096),
    "huge_record": b"\x16\x03\x01\xff\xff" + os.urandom(2048),
    "sslv2_hello": bytes.fromhex("802b0103010012000000100000050000040100800300800700c0"),
    "alert_first": b"\x15\x03\x03\x00\x02\x02\x28",
    "appdata_first": b"\x17\x03\x03\x00\x10" + os.urandom(16),
    "bad_handshake_type": b"\x16\x03\x01\x00\x04\xfe\x00\x00\x00",
}


@pytest.mark.parametrize("kind", KINDS)
async def test_garbage_instead_of_client_hello(pki: TestPKI, kind: str) -> None:
    async with running(kind, pki) as world:
        for name, garbage in GARBAGE.items():
            reader, writer = await raw(world)
            writer.write(garbage)
            answer = await read_until_closed(reader)
            assert not answer.startswith(b"HTTP"), name  # at most a TLS alert
            await close_raw(writer)
            await good_client(world)
        assert world.stapler.stapled == len(GARBAGE)


@pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION], ids=["12", "13"])
@pytest.mark.parametrize("kind", KINDS)
async def test_client_hello_one_byte_at_a_time(
    pki: TestPKI, kind: str, version: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[int] = []
    if TRANSPORT == "memory":
        buffer_updated = tls.TLSServerProtocol.buffer_updated

        def counting(self: tls.TLSServerProtocol, nbytes: int) -> None:
            reads.append(nbytes)
            buffer_updated(self, nbytes)

        monkeypatch.setattr(tls.TLSServerProtocol, "buffer_updated", counting)
    else:  # OpenSSL reads the socket itself: count the handshake steps, one per byte
        do_handshake = tls_socket.SocketTLSTransport._do_handshake

        def stepping(self: tls_socket.SocketTLSTransport) -> None:
            reads.append(1)
            do_handshake(self)

        monkeypatch.setattr(tls_socket.SocketTLSTransport, "_do_handshake", stepping)
    async with running(kind, pki, handshake_timeout=30.0) as world:
        client = await Client.open(world, version=version)
        hello = client.client_hello()
        assert hello[0] == 0x16 and len(hello) > 100
        for byte in hello:
            client.writer.write(bytes([byte]))
            await client.writer.drain()
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        assert reads.count(1) >= len(hello) * 0.9  # the server really saw single bytes
        await client.handshake()  # the rest at normal speed
        assert client.verify_staple().cert_status is staple.CertStatus.GOOD
        assert (await client.get()).endswith(b"ok")
        await client.close()


# -- handshakes that never finish ------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_slowloris_handshakes_time_out_and_others_are_served(pki: TestPKI, kind: str) -> None:
    """Half ClientHellos, some trickling a byte every 100 ms: the handshake timeout is a total,
    not an idle, timeout; meanwhile good clients get stapled handshakes at once."""
    async with running(kind, pki) as world:
        model = await Client.open(world)
        hello = model.client_hello()  # a real ClientHello to cut up
        await model.close()
        stalled = [await raw(world) for _ in range(60)]
        for _, writer in stalled:
            writer.write(hello[:10])

        async def trickle(writer: asyncio.StreamWriter) -> None:
            for byte in hello[10:]:
                await asyncio.sleep(0.1)
                if writer.is_closing():
                    return
                writer.write(bytes([byte]))

        trickling = [asyncio.create_task(trickle(w)) for _, w in stalled[::3]]
        await good_client(world)
        await good_client(world, version=SSL.TLS1_2_VERSION)
        # every stalled connection is closed by the server at the timeout
        await asyncio.gather(*(read_until_closed(r) for r, _ in stalled))
        for task in trickling:
            task.cancel()
        await asyncio.gather(*trickling, return_exceptions=True)
        for _, writer in stalled:
            await close_raw(writer)
        await good_client(world)


async def _stalled_handshakes(world: World, n: int) -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(n):
        _, writer = await raw(world)
        writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # half a ClientHello
        writers.append(writer)
    await asyncio.sleep(0.1)
    return writers


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_stalled_handshakes_cost_bounded_memory_each(pki: TestPKI) -> None:
    """1,000 handshakes that never finish (no cap): memory grows by a bounded amount per
    connection. Without ``max_handshakes`` the total still grows with the attacker's
    connection count: see the next test."""
    async with running("create_server", pki, handshake_timeout=3.0) as world:
        gc.collect()
        before = _rss()
        writers = await _stalled_handshakes(world, 1000)
        during = _rss()
        await good_client(world)
        per_connection = (during - before) / len(writers)
        # ~57 KB measured (both ends live in this process): bounded, but linear in the count
        assert per_connection < 128 * 1024, f"{per_connection:.0f} bytes per stalled handshake"
        for writer in writers:
            await close_raw(writer)


@pytest.mark.parametrize("kind", KINDS)
async def test_concurrent_handshakes_are_capped(pki: TestPKI, kind: str) -> None:
    """64 stalled handshakes against ``max_handshakes=16``: at least 48 are refused at once,
    long before the (30 s) handshake timeout, and a good client gets through once they go."""
    async with running(kind, pki, handshake_timeout=30.0, max_handshakes=16) as world:
        stalled = [await raw(world) for _ in range(64)]
        for _, writer in stalled:
            writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        refused = 0
        for reader, _ in stalled:
            with contextlib.suppress(TimeoutError):
                await read_until_closed(reader, timeout=0.05)
                refused += 1
        assert refused >= 64 - 16
        for _, writer in stalled:
            await close_raw(writer)
        await good_client(world)


# -- resets, renegotiation, truncation -------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_resets_mid_handshake_and_mid_transfer(pki: TestPKI, kind: str) -> None:
    async with running(kind, pki) as world:
        # After the ClientHello, before the client's Finished.
        for _ in range(10):
            client = await Client.open(world)
            client.writer.write(client.client_hello())
            await client.feed()  # ServerHello...: the server is mid-handshake
            client.reset()
        # During a large answer, the client resets.
        for _ in range(5):
            client = await Client.open(world)
            await client.handshake()
            client.conn.sendall(b"GET /big HTTP/1.1\r\nHost: hostile.test\r\n\r\n")
            client.flush()
            assert await client.feed()
            client.reset()
        await good_client(world)
        await _until(lambda: not world.transports(), 5.0, "reset connections closed")


@pytest.mark.parametrize("kind", KINDS)
async def test_renegotiation_is_refused(pki: TestPKI, kind: str) -> None:
    async with running(kind, pki) as world:
        client = await Client.open(world, version=SSL.TLS1_2_VERSION)
        await client.handshake()
        client.verify_staple()
        assert client.conn.renegotiate()
        with contextlib.suppress(SSL.WantReadError):
            client.conn.do_handshake()
        client.flush()  # a ClientHello inside the established session
        with pytest.raises((SSL.Error, ConnectionError)):
            await client.handshake()  # the server refuses it and closes the connection
        await client.close()
        await good_client(world)
        await good_client(world, version=SSL.TLS1_2_VERSION)


@pytest.mark.parametrize("kind", KINDS)
async def test_truncation_without_close_notify(pki: TestPKI, kind: str) -> None:
    async with running(kind, pki) as world:
        for _ in range(5):
            client = await Client.open(world)
            await client.handshake()
            client.conn.sendall(b"GET / HTTP/1.1\r\n")  # half a request head ...
            client.flush()
            client.writer.write_eof()  # ... then a bare TCP FIN, no close_notify
            await read_until_closed(client.reader)
            await client.close()
        await good_client(world)
        await _until(lambda: not world.transports(), 5.0, "truncated connections closed")


# -- clients that never read -----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_clients_that_never_read(pki: TestPKI, kind: str) -> None:
    """Ten clients ask for 32 MiB each and never read: flow control holds the server's buffers
    to a bound per connection, and everyone else is served."""
    async with running(kind, pki, shutdown_timeout=1.0) as world:
        sleepers = []
        for _ in range(10):
            client = await Client.open(world)
            await client.handshake()
            client.conn.sendall(b"GET /big HTTP/1.1\r\nHost: hostile.test\r\n\r\n")
            client.flush()
            sleepers.append(client)

        def buffered() -> list[int]:
            sizes = (t.get_write_buffer_size() for t in world.transports())
            return [size for size in sizes if size > 0]

        await _until(lambda: len(buffered()) == 10, 5.0, "the server blocked on every sleeper")
        for _ in range(3):
            await good_client(world)
        assert len(buffered()) == 10
        assert max(buffered()) <= 1 << 20, buffered()  # bounded: nowhere near 32 MiB
        for client in sleepers:
            client.reset()
        await _until(lambda: not world.transports(), 5.0, "sleepers closed")
        await good_client(world)
