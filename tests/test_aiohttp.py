"""staple.aiohttp: real aiohttp apps behind ``StaplingSite``, real handshakes over 127.0.0.1.

Clients: aiohttp's own client on the stdlib ``ssl`` module (which cannot ask for a staple), a
blocking pyOpenSSL client that asks for one (run in threads with ``asyncio.to_thread``), raw
TCP sockets for misbehaving peers, and ``curl --cert-status`` (marked ``external``: skipped
when curl is missing, unless ``CI=true``). Nothing sleeps to make an assertion true: waits are
bounded loops on a condition, of event-loop yields (or 10 ms sleeps where the kernel must act).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import random
import signal
import socket
import ssl
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from OpenSSL import SSL

import staple
import staple.aiohttp
from staple import ocsp
from staple.aiohttp import MAX_HANDSHAKES, SERVER_KEY, STAPLER_KEY, StaplingServer, StaplingSite
from staple.handle import HandleState, ServerOcspResponse
from staple.probe import probe
from staple.server_context import build_server_context
from staple.stapler import Stapler
from staple.testing import Leaf, OcspResponder, TestPKI

from .external import require

HOST = "127.0.0.1"
# The TLS transport of the sites under test, set for each test by the ``transport`` fixture.
TRANSPORT: staple.tls.TransportKind = staple.tls.DEFAULT_TRANSPORT


# The memory transport runs with the slow tests; `make quick` keeps to the default one.
@pytest.fixture(
    params=[
        pytest.param(t, marks=pytest.mark.slow) if t != staple.tls.DEFAULT_TRANSPORT else t
        for t in staple.tls.TRANSPORTS
    ],
    autouse=True,
)
def transport(request: pytest.FixtureRequest) -> Iterator[staple.tls.TransportKind]:
    """Every site runs on both TLS transports: memory BIOs, and OpenSSL on the socket."""
    global TRANSPORT
    TRANSPORT = request.param
    try:
        yield request.param
    finally:
        TRANSPORT = staple.tls.DEFAULT_TRANSPORT


# test_many_handshakes: 10,000 takes about 10 s on two idle cores (up to ~25 s under load).
HANDSHAKES = int(os.environ.get("STAPLE_HANDSHAKES", "10000"))


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def pki() -> TestPKI:
    return TestPKI()


@pytest.fixture
async def responder(pki: TestPKI) -> AsyncIterator[OcspResponder]:
    async with OcspResponder(pki) as r:
        yield r


@pytest.fixture
def leaf(pki: TestPKI, responder: OcspResponder) -> Leaf:
    return pki.issue_leaf("localhost", HOST, ocsp_url=responder.url)


@pytest.fixture
async def stapler(leaf: Leaf) -> AsyncIterator[Stapler]:
    async with Stapler() as s:
        await s.add(leaf.chain)
        yield s


@pytest.fixture
def handle(stapler: Stapler) -> ServerOcspResponse:
    return stapler.handles[0]


@pytest.fixture
def server_ctx(leaf: Leaf, stapler: Stapler) -> SSL.Context:
    return build_server_context([(leaf.chain_pem, leaf.key_pem)], stapler)


@pytest.fixture
def client_ssl(pki: TestPKI) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=pki.ca_bundle_pem.decode("ascii"))


@contextlib.asynccontextmanager
async def serve(
    app: web.Application, ctx: SSL.Context, **site_options: Any
) -> AsyncIterator[StaplingSite]:
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site_options.setdefault("transport", TRANSPORT)
        site = StaplingSite(runner, HOST, 0, ssl_context=ctx, **site_options)
        await site.start()
        yield site
    finally:
        await runner.cleanup()


def url(site: StaplingSite, path: str = "/") -> str:
    return f"https://{HOST}:{site.port}{path}"


async def until(condition: Callable[[], bool], *, yields: int = 2000) -> None:
    """Yield to the event loop until ``condition()`` holds (bounded: fails, never hangs)."""
    for _ in range(yields):
        if condition():
            return
        await asyncio.sleep(0)
    assert condition(), "condition not reached"


async def poll(condition: Callable[[], bool], *, seconds: float = 10.0) -> None:
    """For conditions that need the kernel or another thread: check every 10 ms, bounded."""
    for _ in range(int(seconds * 100)):
        if condition():
            return
        await asyncio.sleep(0.01)
    assert condition(), "condition not reached"


# -- a blocking pyOpenSSL HTTPS client that asks for a staple --------------------------------


class StaplingClient:
    """One TLS connection from pyOpenSSL over a blocking socket, with ``status_request``.

    Every method blocks: call them through ``asyncio.to_thread``. ``staple`` is the DER the
    server stapled (``b""`` for none). ``get`` speaks just enough HTTP/1.1 keep-alive.
    """

    def __init__(
        self, port: int, pki: TestPKI | None = None, servername: bytes = b"localhost"
    ) -> None:
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        if pki is not None:
            pki.configure_trust(ctx)
            ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, err, depth, ok: bool(ok))
        self.staple: bytes | None = None
        ctx.set_ocsp_client_callback(self._on_status)
        self.sock = socket.create_connection((HOST, port))
        self.conn = SSL.Connection(ctx, self.sock)
        self.conn.set_connect_state()
        self.conn.set_tlsext_host_name(servername)
        self.conn.request_ocsp()
        self.conn.do_handshake()
        self._buffer = b""

    def _on_status(self, conn: SSL.Connection, data: bytes, _: object) -> bool:
        self.staple = data
        return True

    def get(self, path: str = "/") -> tuple[int, bytes]:
        self.conn.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        while b"\r\n\r\n" not in self._buffer:
            self._buffer += self.conn.recv(65536)
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        length = int(headers["content-length"])
        while len(self._buffer) < length:
            self._buffer += self.conn.recv(65536)
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        return status, body

    def close(self) -> None:
        with contextlib.suppress(SSL.Error, OSError):
            self.conn.shutdown()  # close_notify
        self.sock.close()


def handshake_many(port: int, count: int) -> list[int]:
    """``count`` full handshakes asking for a staple, each then closed; the staple sizes."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)  # no session reuse: every handshake is full
    sizes: list[int] = []

    def on_status(conn: SSL.Connection, data: bytes, _: object) -> bool:
        sizes.append(len(data))
        return True

    ctx.set_ocsp_client_callback(on_status)
    for _ in range(count):
        with socket.create_connection((HOST, port)) as sock:
            conn = SSL.Connection(ctx, sock)
            conn.set_connect_state()
            conn.set_tlsext_host_name(b"localhost")
            conn.request_ocsp()
            conn.do_handshake()
            conn.shutdown()
    return sizes


def hello_app(record: list[web.BaseRequest] | None = None) -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        if record is not None:
            record.append(request)
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    return app


# -- the stdlib ssl client: what aiohttp handlers see ----------------------------------------


async def test_stdlib_client_sees_a_secure_request_with_extra_info(
    server_ctx: SSL.Context, client_ssl: ssl.SSLContext
) -> None:
    seen: list[dict[str, Any]] = []

    async def info(request: web.Request) -> web.Response:
        transport = request.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        seen.append(
            {
                "secure": request.secure,
                "scheme": request.scheme,
                "peercert": transport.get_extra_info("peercert", "missing"),
                "sslcontext": transport.get_extra_info("sslcontext"),
                "peername": transport.get_extra_info("peername"),
                "sockname": sock.getsockname(),
                "socket peer": sock.getpeername(),
                "cipher": transport.get_extra_info("cipher"),
            }
        )
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", info)
    async with (
        serve(app, server_ctx) as site,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl, limit=1)) as session,
    ):
        for _ in range(3):  # keep-alive: all three on one connection
            async with session.get(url(site)) as resp:
                assert resp.status == 200
                assert await resp.text() == "ok"

    assert len(seen) == 3
    first = seen[0]
    assert first["secure"] is True and first["scheme"] == "https"
    assert first["peercert"] is None  # no client certificate was asked for
    assert first["sslcontext"] is server_ctx
    assert first["peername"] == first["socket peer"]
    assert first["peername"][0] == HOST and first["peername"][1] != site.port
    assert first["sockname"] == (HOST, site.port)
    name, version, bits = first["cipher"]
    assert isinstance(name, str) and version.startswith("TLSv1.") and bits >= 128
    assert all(s["peername"] == first["peername"] for s in seen)  # one connection


async def test_client_certificate_reaches_the_handler(
    pki: TestPKI, leaf: Leaf, stapler: Stapler, tmp_path: Path
) -> None:
    ctx = build_server_context([(leaf.chain_pem, leaf.key_pem)], stapler)
    pki.configure_trust(ctx)
    ctx.set_verify(
        SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
        lambda conn, cert, err, depth, ok: bool(ok),
    )
    ctx.set_session_id(b"staple-tests")
    client = pki.issue_leaf("client.test")
    client.write_chain(tmp_path / "client.pem")
    client.write_key(tmp_path / "client.key")
    client_ssl = ssl.create_default_context(cadata=pki.ca_bundle_pem.decode("ascii"))
    client_ssl.load_cert_chain(tmp_path / "client.pem", tmp_path / "client.key")

    peercerts: list[Any] = []

    async def who(request: web.Request) -> web.Response:
        assert request.transport is not None
        cert = request.transport.get_extra_info("peercert")
        peercerts.append(cert)
        return web.Response(text=cert.subject.rfc4514_string())

    app = web.Application()
    app.router.add_get("/", who)
    async with (
        serve(app, ctx) as site,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl)) as session,
        session.get(url(site)) as resp,
    ):
        assert resp.status == 200
        assert "CN=client.test" in await resp.text()
    # staple's transport gives a cryptography certificate (the stdlib gives a dict).
    assert isinstance(peercerts[0], x509.Certificate)
    assert peercerts[0] == client.cert


@pytest.mark.slow
async def test_file_response_of_50_mb_is_byte_identical(
    server_ctx: SSL.Context, client_ssl: ssl.SSLContext, tmp_path: Path
) -> None:
    path = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(50):
            block = os.urandom(1 << 20)
            digest.update(block)
            f.write(block)

    async def download(request: web.Request) -> web.FileResponse:
        return web.FileResponse(path)  # loop.sendfile() over the TLS transport

    app = web.Application()
    app.router.add_get("/big", download)
    received = hashlib.sha256()
    size = 0
    async with (
        serve(app, server_ctx) as site,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl)) as session,
        session.get(url(site, "/big")) as resp,
    ):
        assert resp.status == 200
        assert resp.content_length == 50 << 20
        async for chunk in resp.content.iter_chunked(1 << 20):
            received.update(chunk)
            size += len(chunk)
    assert size == 50 << 20
    assert received.hexdigest() == digest.hexdigest()


# -- shutdown and misuse ---------------------------------------------------------------------


@pytest.mark.parametrize("how", ["runner.cleanup", "site.stop"])
async def test_shutdown_aborts_a_connection_stuck_in_the_handshake(
    server_ctx: SSL.Context, how: str
) -> None:
    runner = web.AppRunner(hello_app())
    await runner.setup()
    site = StaplingSite(runner, HOST, 0, ssl_context=server_ctx, transport=TRANSPORT)
    await site.start()
    reader, writer = await asyncio.open_connection(HOST, site.port)  # says nothing
    try:
        # The site has accepted it (it tracks handshakes that aiohttp cannot see).
        await until(lambda: len(site._handshaking()) == 1)
        (transport,) = site._handshaking()
        states = [transport.tls_state]
        async with asyncio.timeout(5):  # aiohttp's own shutdown_timeout is 60 s
            if how == "site.stop":
                await site.stop()
            await runner.cleanup()
        states.append(transport.tls_state)
        assert states == [staple.tls.TLSState.DO_HANDSHAKE, staple.tls.TLSState.CLOSED]
        assert transport.is_closing()
        async with asyncio.timeout(5):  # aborted: the client sees a reset or EOF
            try:
                data = await reader.read(1)
            except ConnectionResetError:
                data = b""
        assert data == b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    del transport
    gc.collect()  # an unclosed transport would warn now (and filterwarnings=error fails)


async def test_site_refuses_an_ssl_module_context() -> None:
    runner = web.AppRunner(hello_app())
    await runner.setup()
    try:
        stdlib_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        with pytest.raises(TypeError, match=r"OpenSSL\.SSL\.Context.*TCPSite"):
            StaplingSite(runner, HOST, 0, ssl_context=stdlib_ctx)  # type: ignore[arg-type]
    finally:
        await runner.cleanup()


async def test_site_needs_a_runner_that_was_set_up() -> None:
    runner = web.AppRunner(hello_app())
    with pytest.raises(RuntimeError, match=r"runner\.setup\(\)"):
        StaplingSite(runner, HOST, 0, ssl_context=SSL.Context(SSL.TLS_SERVER_METHOD))


async def test_setup_attaches_the_stapler_and_cleanup_closes_it(
    leaf: Leaf, client_ssl: ssl.SSLContext
) -> None:
    stapler = Stapler()
    await stapler.add(leaf.chain)
    app = hello_app()
    staple.aiohttp.setup(app, stapler)
    assert app[STAPLER_KEY] is stapler
    ctx = build_server_context([(leaf.chain_pem, leaf.key_pem)], stapler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = StaplingSite(runner, HOST, 0, ssl_context=ctx, transport=TRANSPORT)
    await site.start()
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl)) as session,
        session.get(url(site)) as resp,
    ):
        assert await resp.text() == "hello"
    assert all(h.state is HandleState.RUNNING for h in stapler.handles)
    await runner.cleanup()
    assert [h.state for h in stapler.handles] == [HandleState.CLOSED]
    with pytest.raises(staple.ClosedError, match="closed"):
        await stapler.add(leaf.chain)


# -- stapling and references -----------------------------------------------------------------


async def test_refresh_during_a_keep_alive_connection(
    pki: TestPKI, leaf: Leaf, stapler: Stapler, handle: ServerOcspResponse, server_ctx: SSL.Context
) -> None:
    requests: list[web.BaseRequest] = []
    async with serve(hello_app(requests), server_ctx) as site:
        client = await asyncio.to_thread(StaplingClient, site.port, pki)
        try:
            assert await asyncio.to_thread(client.get) == (200, b"hello")
            assert client.staple
            first = ocsp.validate(client.staple, leaf.cert, leaf.chain[1], now=datetime.now(UTC))
            assert first.cert_status is staple.CertStatus.GOOD
            assert stapler.live_references == 1
            old = handle.get_context()  # the context the connection holds, +1 for us
            assert old is not None and old.refs == 2
            old.free()

            await handle.refresh()  # a new context; the connection keeps the old one
            assert stapler.live_references == 1 and old.refs == 1
            assert handle.live_contexts == 2
            new = handle.get_context()
            assert new is not None and new is not old
            new.free()

            for _ in range(3):  # the connection goes on working across the refresh
                assert await asyncio.to_thread(client.get) == (200, b"hello")
            peers = {r.transport.get_extra_info("peername") for r in requests if r.transport}
            assert len(requests) == 4 and len(peers) == 1  # one keep-alive connection
            assert stapler.live_references == 1
        finally:
            await asyncio.to_thread(client.close)
        await until(lambda: stapler.live_references == 0)
        assert old.refs == 0 and handle.live_contexts == 1


@pytest.mark.slow
async def test_many_handshakes_leave_no_live_references(
    leaf: Leaf, stapler: Stapler, handle: ServerOcspResponse, server_ctx: SSL.Context
) -> None:
    """10,000 full handshakes (env ``STAPLE_HANDSHAKES`` to change; a multiple of 10) from
    pyOpenSSL clients asking for a staple, in two client threads (the machine has two cores),
    with a refresh between five batches; every one is stapled and, once the server has seen
    the closes, no reference is left. About 10 s on two idle cores."""
    batches, threads = 5, 2
    per_thread = HANDSHAKES // batches // threads
    sizes: list[int] = []
    async with serve(hello_app(), server_ctx) as site:
        for batch in range(batches):
            if batch:
                await handle.refresh()
            results = await asyncio.gather(
                *(asyncio.to_thread(handshake_many, site.port, per_thread) for _ in range(threads))
            )
            sizes.extend(size for result in results for size in result)
        await until(lambda: stapler.live_references == 0)
        assert handle.live_contexts == 1  # only the current context is left
    assert len(sizes) == HANDSHAKES
    assert min(sizes) > 0  # every handshake was stapled
    assert stapler.stapled == HANDSHAKES and stapler.callback_errors == 0
    assert stapler.live_references == 0


@pytest.mark.external
async def test_curl_verifies_the_staple(
    pki: TestPKI, server_ctx: SSL.Context, stapler: Stapler, tmp_path: Path
) -> None:
    curl = require("curl")
    pki.write_ca_bundle(tmp_path / "ca.pem")
    async with serve(hello_app(), server_ctx) as site:
        proc = await asyncio.create_subprocess_exec(
            curl,
            "-sS",
            "--cert-status",
            "--cacert",
            str(tmp_path / "ca.pem"),
            "--resolve",
            f"localhost:{site.port}:{HOST}",
            f"https://localhost:{site.port}/",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        assert out == b"hello"
        await until(lambda: stapler.live_references == 0)
    assert stapler.stapled == 1


# -- misbehaving peers -----------------------------------------------------------------------


@dataclass
class Writer:
    """What the slow-reader handler saw."""

    transport: asyncio.Transport | None = None
    protocol: Any = None
    written: int = 0
    error: BaseException | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


async def test_a_slow_reader_does_not_grow_the_write_buffer(
    server_ctx: SSL.Context, client_ssl: ssl.SSLContext
) -> None:
    total, chunk = 256 << 20, bytes(256 << 10)
    state = Writer()

    async def big(request: web.Request) -> web.StreamResponse:
        state.transport, state.protocol = request.transport, request.protocol
        resp = web.StreamResponse()
        resp.content_length = total
        await resp.prepare(request)
        try:
            while state.written < total:
                await resp.write(chunk)  # drains: waits while the transport is paused
                state.written += len(chunk)
        except (ConnectionError, asyncio.CancelledError) as exc:
            state.error = exc
            raise
        finally:
            state.done.set()
        return resp

    app = web.Application()
    app.router.add_get("/big", big)

    def connect(port: int) -> ssl.SSLSocket:
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 10)
        raw.connect((HOST, port))
        sock = client_ssl.wrap_socket(raw, server_hostname=HOST)
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n")
        return sock  # and never read

    async with serve(app, server_ctx) as site:
        sock = await asyncio.to_thread(connect, site.port)
        try:
            # The kernel's buffers fill, then the transport pauses aiohttp's writer.
            await poll(lambda: state.protocol is not None and state.protocol.writing_paused)
            transport = state.transport
            assert transport is not None
            high = transport.get_write_buffer_limits()[1]
            assert transport.get_write_buffer_size() <= high + 2 * len(chunk)
            assert not state.done.is_set() and state.written < total // 4
            written = state.written
            for _ in range(100):  # stuck: the handler writes no more while paused
                await asyncio.sleep(0)
            assert state.written == written
            assert transport.get_write_buffer_size() <= high + 2 * len(chunk)
        finally:
            sock.close()  # unread data: the kernel resets the connection
        async with asyncio.timeout(10):
            await state.done.wait()
    assert state.written < total


async def test_garbage_instead_of_a_client_hello_closes_only_that_connection(
    server_ctx: SSL.Context, client_ssl: ssl.SSLContext
) -> None:
    garbage = b"\x00" + random.Random(7).randbytes(1023)  # not a TLS record type
    async with (
        serve(hello_app(), server_ctx) as site,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl)) as session,
    ):
        async with session.get(url(site)) as resp:  # a connection that stays open meanwhile
            assert await resp.text() == "hello"
        reader, writer = await asyncio.open_connection(HOST, site.port)
        try:
            writer.write(garbage)
            async with asyncio.timeout(10):
                try:
                    answer = await reader.read()  # at most an alert, then the close
                except ConnectionResetError:
                    answer = b""
            assert len(answer) < 64
            assert answer == b"" or answer[0] == 0x15  # a TLS alert record
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        for _ in range(2):  # the reused connection and a new one both still work
            async with session.get(url(site)) as resp:
                assert await resp.text() == "hello"
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl)) as fresh,
            fresh.get(url(site)) as resp,
        ):
            assert await resp.text() == "hello"


# -- StaplingServer and run_app --------------------------------------------------------------


class Gate:
    """An HTTP front for the OCSP responder that answers only once ``n`` requests wait at once.

    Chains opened concurrently all fetch at once and pass; chains opened one after another
    never get there (each fetch gives up at its timeout, and the gate, run with
    ``handler_cancellation``, forgets it). ``most`` is the most requests seen waiting at once.
    """

    def __init__(self, responder: OcspResponder, n: int) -> None:
        self.responder = responder
        self.n = n
        self.waiting = 0
        self.most = 0
        self.open = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        self._session: aiohttp.ClientSession | None = None
        self.url = ""

    async def __aenter__(self) -> Gate:
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, 0)
        await site.start()
        self.url = f"http://{HOST}:{self._runner.addresses[0][1]}/ocsp"
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.waiting += 1
        self.most = max(self.most, self.waiting)
        try:
            if self.waiting >= self.n:
                self.open.set()
            await self.open.wait()  # cancelled when the client gives up
        finally:
            self.waiting -= 1
        assert self._session is not None
        async with self._session.request(
            request.method,
            self.responder.base_url + request.raw_path,
            data=body if body else None,
            headers={"Content-Type": request.headers.get("Content-Type", "")} if body else None,
        ) as answer:
            return web.Response(
                body=await answer.read(), status=answer.status, content_type=answer.content_type
            )


def assert_staple_good(der: bytes | None, leaf: Leaf) -> None:
    assert der, "no staple"
    verified = ocsp.validate(der, leaf.cert, leaf.chain[1], now=datetime.now(UTC))
    assert verified.cert_status is staple.CertStatus.GOOD


def interrupt() -> None:
    """What Ctrl-C does to a loop without signal handlers (``handle_signals=False``)."""
    raise KeyboardInterrupt


async def test_run_app_with_aiohttp_keywords_serves_a_staple(
    pki: TestPKI, responder: OcspResponder
) -> None:
    """``run_app`` as aiohttp's, in a thread on its own loop: aiohttp's keywords, an app made
    by a coroutine, two chains opened at once, the handshake cap, Ctrl-C, a clean close."""
    async with Gate(responder, 2) as gate:
        names = ["one.run-app.test", "two.run-app.test"]
        leaves = [pki.issue_leaf(name, ocsp_url=gate.url) for name in names]
        apps: list[web.Application] = []

        async def make_app() -> web.Application:
            app = hello_app()
            apps.append(app)
            return app

        loop = asyncio.new_event_loop()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                staple.aiohttp.run_app(
                    make_app(),
                    certs=[(leaf.chain_pem, leaf.key_pem) for leaf in leaves],
                    host=HOST,
                    port=0,
                    access_log=None,
                    print=None,
                    shutdown_timeout=5.0,
                    keepalive_timeout=30.0,
                    handle_signals=False,
                    loop=loop,
                    wait_timeout=5.0,  # a RefreshPolicy field, for the Stapler
                    fetch_timeout=5.0,
                )
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        try:
            await poll(
                lambda: (
                    bool(apps and SERVER_KEY in apps[0] and apps[0][SERVER_KEY].sites)
                    or not thread.is_alive()
                ),
                seconds=30,
            )
            assert not errors
            server = apps[0][SERVER_KEY]
            assert [site.max_handshakes for site in server.sites] == [MAX_HANDSHAKES]
            assert gate.most == 2  # both chains' first fetches were waiting at once
            for name, leaf in zip(names, leaves, strict=True):
                client = await asyncio.to_thread(StaplingClient, server.port, pki, name.encode())
                try:
                    assert_staple_good(client.staple, leaf)
                    assert await asyncio.to_thread(client.get, "/") == (200, b"hello")
                finally:
                    client.close()
        finally:
            if thread.is_alive():
                loop.call_soon_threadsafe(interrupt)
            await asyncio.to_thread(thread.join, 30)
    assert not thread.is_alive()
    assert not errors
    assert loop.is_closed()  # run_app closes the loop it ran on, as aiohttp's does
    stapler = apps[0][STAPLER_KEY]
    assert [h.state for h in stapler.handles] == [HandleState.CLOSED] * 2


@pytest.mark.slow  # a real process
async def test_run_app_until_sigint_in_a_process(
    pki: TestPKI, responder: OcspResponder, tmp_path: Path
) -> None:
    """As a user runs it: aiohttp's start-up line, a verified staple, SIGINT, exit 0."""
    leaf = pki.issue_leaf("proc.run-app.test", ocsp_url=responder.url)
    leaf.write_chain(tmp_path / "chain.pem")
    leaf.write_key(tmp_path / "key.pem")
    script = (
        "import sys\n"
        "from aiohttp import web\n"
        "import staple.aiohttp\n"
        "staple.aiohttp.run_app(web.Application(), certs=[(sys.argv[1], sys.argv[2])],\n"
        "                       host='127.0.0.1', port=0, access_log=None)\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-u", "-c", script, str(tmp_path / "chain.pem"), str(tmp_path / "key.pem"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), 30)
        prefix = f"======== Running on https://{HOST}:".encode()
        assert first.startswith(prefix) and first.endswith(b" ========\n"), first
        port = int(first.removeprefix(prefix).split()[0])
        assert await asyncio.wait_for(proc.stdout.readline(), 5) == b"(Press CTRL+C to quit)\n"
        result = await probe(HOST, port, servername="proc.run-app.test")
        assert result.code == 0, result.lines()
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err


def test_run_app_refuses_what_it_cannot_do(leaf: Leaf) -> None:
    certs = [(leaf.chain_pem, leaf.key_pem)]

    async def make_app() -> web.Application:
        return hello_app()

    with pytest.raises(
        TypeError, match=r"^run_app\(\) got an unexpected keyword argument 'acces_log'$"
    ):
        staple.aiohttp.run_app(make_app(), certs=certs, acces_log=None)
    gc.collect()  # the coroutine was closed: no "never awaited" warning (an error here)
    with pytest.raises(TypeError, match=r"path=.*Unix socket cannot staple"):
        staple.aiohttp.run_app(hello_app(), certs=certs, path="/tmp/staple.sock")
    with pytest.raises(TypeError, match=r"ssl_context=.*certs="):
        staple.aiohttp.run_app(hello_app(), certs=certs, ssl_context=ssl.create_default_context())
    with pytest.raises(TypeError, match=r"either policy= or policy options"):
        staple.aiohttp.run_app(
            hello_app(), certs=certs, policy=staple.RefreshPolicy(), wait_timeout=1.0
        )


async def test_server_names_each_chain_it_cannot_open(
    pki: TestPKI, leaf: Leaf, tmp_path: Path
) -> None:
    """A failed start says which chain and why, listens nowhere, and closes the stapler."""
    orphan = pki.issue_leaf("orphan.test")  # no AIA: no responder to ask
    orphan.write_chain(tmp_path / "orphan.pem")
    stapler = Stapler()
    server = StaplingServer(
        hello_app(),
        certs=[(leaf.chain_pem, leaf.key_pem), (tmp_path / "orphan.pem", orphan.key_pem)],
        stapler=stapler,
        host=HOST,
        port=0,
    )
    with pytest.raises(staple.aiohttp.StartError, match=r"orphan\.pem: .*no OCSP responder"):
        await server.start()
    assert server.sites == [] and server.runner is None
    assert [h.state for h in stapler.handles] == [HandleState.CLOSED]
    with pytest.raises(RuntimeError, match="starts once"):
        await server.start()
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'acces_log'"):
        StaplingServer(hello_app(), certs=[], stapler=stapler, acces_log=None)


async def test_an_app_started_before_is_refused_by_name(leaf: Leaf) -> None:
    """aiohttp freezes an Application when it starts; a second start would fail deep inside
    with "Cannot modify frozen list". A fresh app (every other test) starts."""
    app = hello_app()
    app.freeze()
    stapler = Stapler()
    server = StaplingServer(
        app, certs=[(leaf.chain_pem, leaf.key_pem)], stapler=stapler, host=HOST, port=0
    )
    with pytest.raises(staple.aiohttp.StartError, match="has been started before"):
        await server.start()
    assert server.sites == [] and server.runner is None and stapler.handles == []
    await stapler.close()


async def test_server_on_a_bound_socket(pki: TestPKI, leaf: Leaf) -> None:
    """``sock=`` (as ``aiohttp.web.run_app(sock=...)``): served alone, stapled, capped."""
    with socket.create_server((HOST, 0)) as sock:
        port = sock.getsockname()[1]
        stapler = Stapler()
        async with StaplingServer(
            hello_app(),
            certs=[(leaf.chain_pem, leaf.key_pem)],
            stapler=stapler,
            sock=sock,
            transport=TRANSPORT,
        ) as server:
            assert [site.name for site in server.sites] == [f"https://{HOST}:{port}"]
            assert server.sites[0].max_handshakes == MAX_HANDSHAKES
            client = await asyncio.to_thread(StaplingClient, port, pki)
            try:
                assert_staple_good(client.staple, leaf)
                assert await asyncio.to_thread(client.get, "/") == (200, b"hello")
            finally:
                client.close()
        assert [h.state for h in stapler.handles] == [HandleState.CLOSED]
