"""staple.tls: real TLS handshakes over 127.0.0.1 against real clients, no mocks.

Clients: the stdlib ``ssl`` module through asyncio, a pyOpenSSL client on memory BIOs
(``BioClient``: full control of what goes on the wire, OCSP requests, renegotiation), and
``openssl s_client`` (marked ``external``). Most tests run on asyncio's default loop and on
uvloop. Nothing sleeps for timing: waits are on futures, and a handful of ``sleep(0)`` yields.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import gc
import hashlib
import importlib
import logging
import random
import socket
import ssl
import struct
import termios
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp as x509_ocsp
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from staple import tls, tls_socket
from staple.tls import AppState, TLSServerProtocol, TLSState, TLSTransport

from .external import require
from .record_client import reply_records

uvloop: Any = None
with contextlib.suppress(ImportError):  # optional: these tests also run on uvloop if present
    uvloop = importlib.import_module("uvloop")

T = TypeVar("T")
HOST = "127.0.0.1"
# The transport under test, set for each test by the autouse ``transport`` fixture.
TRANSPORT: tls.TransportKind = tls.DEFAULT_TRANSPORT


# The memory transport runs with the slow tests; `make quick` keeps to the default one.
@pytest.fixture(
    params=[
        pytest.param(t, marks=pytest.mark.slow) if t != tls.DEFAULT_TRANSPORT else t
        for t in tls.TRANSPORTS
    ],
    autouse=True,
)
def transport(request: pytest.FixtureRequest) -> Iterator[tls.TransportKind]:
    """Every test runs on both TLS transports: memory BIOs, and OpenSSL on the socket."""
    global TRANSPORT
    TRANSPORT = request.param
    try:
        yield request.param
    finally:
        TRANSPORT = tls.DEFAULT_TRANSPORT


def memory_only(transport: str) -> None:
    """Skip a test about the memory-BIO transport's own objects on the socket transport."""
    if transport != "memory":
        pytest.skip("about TLSServerProtocol/TLSTransport, the memory-BIO transport's objects")


# -- certificates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PKI:
    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    leaf_cert: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey
    client_cert: x509.Certificate
    ocsp_der: bytes
    ca_path: Path
    client_cert_path: Path
    client_key_path: Path


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue("staple test CA", ca_key, None, ca_key, ca=True)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_cert = _issue("localhost", leaf_key, ca_cert, ca_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = _issue("client", client_key, ca_cert, ca_key)
    now = datetime.datetime.now(datetime.UTC)
    response = (
        x509_ocsp.OCSPResponseBuilder()
        .add_response(
            cert=leaf_cert,
            issuer=ca_cert,
            algorithm=hashes.SHA1(),
            cert_status=x509_ocsp.OCSPCertStatus.GOOD,
            this_update=now - datetime.timedelta(minutes=5),
            next_update=now + datetime.timedelta(days=1),
            revocation_time=None,
            revocation_reason=None,
        )
        .responder_id(x509_ocsp.OCSPResponderEncoding.HASH, ca_cert)
        .sign(ca_key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("pki")
    pem = serialization.Encoding.PEM
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(pem))
    client_cert_path = directory / "client.pem"
    client_cert_path.write_bytes(client_cert.public_bytes(pem))
    client_key_path = directory / "client.key"
    client_key_path.write_bytes(
        client_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return PKI(
        ca_cert=ca_cert,
        ca_key=ca_key,
        leaf_cert=leaf_cert,
        leaf_key=leaf_key,
        client_cert=client_cert,
        ocsp_der=response.public_bytes(serialization.Encoding.DER),
        ca_path=ca_path,
        client_cert_path=client_cert_path,
        client_key_path=client_key_path,
    )


def server_context(
    pki: PKI,
    *,
    max_version: int | None = None,
    alpn: bytes | None = None,
    ocsp_callback: Callable[[SSL.Connection, Any], bytes] | None = None,
    verify_client: bool = False,
) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate(pki.leaf_cert)
    ctx.use_privatekey(pki.leaf_key)
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
    if alpn is not None:

        def select(conn: SSL.Connection, offered: list[bytes]) -> bytes:
            return alpn if alpn in offered else SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]

        ctx.set_alpn_select_callback(select)
    if ocsp_callback is not None:
        ctx.set_ocsp_server_callback(ocsp_callback)
    if verify_client:
        ctx.load_verify_locations(str(pki.ca_path))
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    return ctx


def client_context(
    pki: PKI, *, max_version: ssl.TLSVersion | None = None, cert: bool = False
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_path))
    if max_version is not None:
        ctx.maximum_version = max_version
    if cert:
        ctx.load_cert_chain(pki.client_cert_path, pki.client_key_path)
    return ctx


VERSIONS = [
    pytest.param((SSL.TLS1_2_VERSION, ssl.TLSVersion.TLSv1_2, "TLSv1.2"), id="tls12"),
    pytest.param((SSL.TLS1_3_VERSION, ssl.TLSVersion.TLSv1_3, "TLSv1.3"), id="tls13"),
]


# -- event loops -----------------------------------------------------------------------------


class Run:
    """Runs a test coroutine on a fresh loop of one kind; records the loop's error reports."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.loop_errors: list[dict[str, Any]] = []

    def __call__(self, coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
        factory = uvloop.new_event_loop if self.kind == "uvloop" else asyncio.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.get_loop().set_exception_handler(
                lambda loop, context: self.loop_errors.append(context)
            )
            return runner.run(asyncio.wait_for(_aborting_on_failure(coro), timeout))


async def _aborting_on_failure(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return await coro
    except BaseException:
        # The traceback keeps the test's transports alive, and uvloop's loop.close() would wait
        # for their handles forever: abort them so that a failure reports instead of hanging.
        for obj in gc.get_objects():
            if isinstance(obj, asyncio.Transport):
                with contextlib.suppress(Exception):
                    obj.abort()
        raise


def _make_run(kind: str) -> Iterator[Run]:
    run = Run(kind)
    yield run
    gc.collect()  # unclosed transports warn now, inside this test
    assert not run.loop_errors, run.loop_errors


@pytest.fixture(
    params=[
        "asyncio",
        pytest.param(
            "uvloop", marks=pytest.mark.skipif(uvloop is None, reason="uvloop not installed")
        ),
    ]
)
def run(request: pytest.FixtureRequest) -> Iterator[Run]:
    yield from _make_run(request.param)


@pytest.fixture
def run_asyncio() -> Iterator[Run]:
    yield from _make_run("asyncio")


# -- application protocols and helpers -------------------------------------------------------


class App(asyncio.Protocol):
    """Records what the transport does to it; echoes unless told otherwise."""

    def __init__(self, *, echo: bool = True) -> None:
        loop = asyncio.get_running_loop()
        self.echo = echo
        self.made: asyncio.Future[TLSTransport] = loop.create_future()
        self.lost: asyncio.Future[BaseException | None] = loop.create_future()
        self.got_data: asyncio.Future[None] = loop.create_future()
        self.paused: asyncio.Future[None] = loop.create_future()
        self.events: list[str] = []
        self.data = bytearray()
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.events.append("made")
        self.transport = transport
        self.made.set_result(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.events.append("data")
        self.data += data
        if not self.got_data.done():
            self.got_data.set_result(None)
        if self.echo:
            self.transport.write(data)

    def eof_received(self) -> None:
        self.events.append("eof")

    def pause_writing(self) -> None:
        self.events.append("pause")
        if not self.paused.done():
            self.paused.set_result(None)
        if self.echo:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.events.append("resume")
        if self.echo:
            self.transport.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.events.append("lost")
        self.lost.set_result(exc)


def collecting(make: Callable[[], T]) -> tuple[list[T], Callable[[], T]]:
    made: list[T] = []

    def factory() -> T:
        app = make()
        made.append(app)
        return app

    return made, factory


@contextlib.asynccontextmanager
async def serving(
    factory: Callable[[], asyncio.BaseProtocol], ctx: SSL.Context, **kwargs: Any
) -> AsyncIterator[int]:
    server = await tls.create_server(
        factory, HOST, 0, ssl_context=ctx, transport=TRANSPORT, **kwargs
    )
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def stdlib_connect(
    port: int, ctx: ssl.SSLContext, **kwargs: Any
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(HOST, port, ssl=ctx, server_hostname="localhost", **kwargs)


async def stdlib_close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read()
    except ConnectionResetError:
        return b""


class BioClient:
    """A pyOpenSSL client on memory BIOs over a plain asyncio TCP stream.

    Every byte it sends is explicit, so tests can coalesce the client's Finished with
    application data, renegotiate, request OCSP, or never answer a close_notify.
    """

    def __init__(
        self, conn: SSL.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.conn = conn
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, ctx: SSL.Context, *, request_ocsp: bool = False) -> BioClient:
        reader, writer = await asyncio.open_connection(HOST, port)
        conn = SSL.Connection(ctx, None)
        conn.set_connect_state()
        conn.set_tlsext_host_name(b"localhost")
        if request_ocsp:
            conn.request_ocsp()
        return cls(conn, reader, writer)

    def flush(self) -> None:
        while True:
            try:
                data = self.conn.bio_read(65536)
            except SSL.WantReadError:
                return
            self.writer.write(data)

    async def feed(self) -> bool:
        data = await self.reader.read(65536)
        if data:
            self.conn.bio_write(data)
        return bool(data)

    async def handshake(self, *, flush: bool = True) -> None:
        while True:
            try:
                self.conn.do_handshake()
            except SSL.WantReadError:
                self.flush()
                if not await self.feed():
                    raise ConnectionError("EOF during the handshake") from None
            else:
                break
        if flush:
            self.flush()

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)
        self.flush()

    async def recv(self) -> bytes:
        """Application data; b"" at the peer's close_notify; ConnectionError at a bare EOF."""
        while True:
            try:
                return self.conn.recv(65536)
            except SSL.WantReadError:
                self.flush()
                if not await self.feed():
                    raise ConnectionError("EOF without close_notify") from None
            except SSL.ZeroReturnError:
                return b""

    async def recv_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = await self.recv()
            if not chunk:
                raise EOFError(data)
            data += chunk
        return data

    async def close(self) -> None:
        with contextlib.suppress(SSL.Error):
            self.conn.shutdown()
        self.flush()
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def bio_client_context(
    pki: PKI,
    *,
    max_version: int | None = None,
    ocsp_seen: list[bytes] | None = None,
) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.load_verify_locations(str(pki.ca_path))
    ctx.set_verify(SSL.VERIFY_PEER)
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
    if ocsp_seen is not None:

        def on_ocsp(conn: SSL.Connection, data: bytes, _: Any) -> bool:
            ocsp_seen.append(data)
            return True

        ctx.set_ocsp_client_callback(on_ocsp)
    return ctx


async def yield_until(predicate: Callable[[], bool]) -> None:
    """Let the loop run until ``predicate()`` holds (the test's timeout bounds it).

    For state nothing signals (a kernel buffer, a WeakSet), so no Event to wait on.
    """
    while not predicate():  # noqa: ASYNC110
        await asyncio.sleep(0)


def drop(objects: list[Any]) -> None:
    objects.clear()
    gc.collect()


def tls_state(transport: TLSTransport | tls_socket.SocketTLSTransport) -> TLSState:
    return transport.tls_state


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


# -- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_echo_round_trip(run: Run, pki: PKI, version: tuple[int, ssl.TLSVersion, str]) -> None:
    server_max, client_max, name = version

    async def main() -> None:
        apps, factory = collecting(App)
        async with serving(factory, server_context(pki, max_version=server_max)) as port:
            reader, writer = await stdlib_connect(port, client_context(pki, max_version=client_max))
            for message in (b"a", payload(100_000), b"bc" * 1000):
                writer.write(message)
                assert await reader.readexactly(len(message)) == message
            assert writer.get_extra_info("ssl_object").version() == name
            server_conn = apps[0].transport.get_extra_info("ssl_object")
            assert server_conn.get_protocol_version_name() == name
            await stdlib_close(writer)
            assert await apps[0].lost is None
        # The client's close_notify reaches the app as eof_received, then connection_lost.
        assert apps[0].events[0] == "made"
        assert apps[0].events[-2:] == ["eof", "lost"]

    run(main())


class TwoWrites(App):
    """Answers each message from a task, in two writes (as uvicorn writes a head, a body);
    counts the writes its TLS layer makes to the TCP transport."""

    def __init__(self, *, count_tcp_writes: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.count_tcp_writes = count_tcp_writes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.tcp_writes: list[int] = []
        self.tasks: set[asyncio.Task[None]] = set()
        if not self.count_tcp_writes:
            return
        tcp = self.transport._tls_protocol._transport
        write = tcp.write

        def counting(data: bytes) -> None:
            self.tcp_writes.append(len(data))
            write(data)

        tcp.write = counting

    def data_received(self, data: bytes) -> None:
        async def answer() -> None:
            self.tcp_writes.clear()  # not what the read wrote (TLS 1.3 session tickets)
            self.transport.write(b"head:")
            self.transport.write(data)

        task = asyncio.get_running_loop().create_task(answer())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def test_writes_in_one_step_leave_in_one_tcp_write(
    run_asyncio: Run, pki: PKI, transport: str
) -> None:
    memory_only(transport)

    async def main() -> None:
        apps, factory = collecting(lambda: TwoWrites(echo=False))
        async with serving(factory, server_context(pki)) as port:
            reader, writer = await stdlib_connect(port, client_context(pki))
            writer.write(b"body")
            assert await reader.readexactly(9) == b"head:body"
            assert apps[0].tcp_writes == [2 * 22 + 9]  # both records, one write
            writer.write(b"more")
            assert await reader.readexactly(9) == b"head:more"
            assert apps[0].tcp_writes == [2 * 22 + 9]
            await stdlib_close(writer)
            assert await apps[0].lost is None

    run_asyncio(main())


@pytest.mark.parametrize("coalesce", [True, False], ids=["coalesce_writes", "default"])
def test_writes_in_one_step_leave_in_one_record(
    run: Run, pki: PKI, transport: str, coalesce: bool
) -> None:
    """With ``coalesce_writes`` the socket transport sends a step's small writes (uvicorn's
    head, then its body) as one record and one send(); by default, a record a write. (The
    memory transport keeps a record a write, in one TCP write:
    test_writes_in_one_step_leave_in_one_tcp_write.)"""
    if transport != "socket":
        pytest.skip("coalesce_writes is the socket transport's")

    async def main() -> None:
        apps, factory = collecting(lambda: TwoWrites(echo=False, count_tcp_writes=False))
        async with serving(factory, server_context(pki), coalesce_writes=coalesce) as port:
            ctx = client_context(pki, max_version=ssl.TLSVersion.TLSv1_2)
            reply, records = await reply_records(port, ctx, b"body", lambda got: len(got) >= 9)
            assert reply == b"head:body"
            assert len(records) == (1 if coalesce else 2), records
            assert await apps[0].lost is None

    run(main())


def test_extra_info(run: Run, pki: PKI) -> None:
    async def main() -> None:
        apps, factory = collecting(App)
        ctx = server_context(pki)
        async with serving(factory, ctx) as port:
            _reader, writer = await stdlib_connect(port, client_context(pki))
            transport = await apps[0].made
            info = transport.get_extra_info
            assert info("sslcontext") is ctx
            assert isinstance(info("ssl_object"), SSL.Connection)
            assert info("peercert") is None  # no client certificate asked for
            name, protocol, bits = info("cipher")
            assert name == writer.get_extra_info("cipher")[0]
            assert protocol == "TLSv1.3"
            assert bits == writer.get_extra_info("cipher")[2]
            assert info("compression") is None
            assert info("peername") == writer.get_extra_info("sockname")
            assert info("sockname") == writer.get_extra_info("peername")
            assert info("socket") is not None
            assert info("no such thing", "dflt") == "dflt"
            assert transport.tls_state is TLSState.WRAPPED
            assert transport.app_state is AppState.CON_MADE
            assert transport.get_protocol() is apps[0]
            assert transport.can_write_eof() is False
            with pytest.raises(NotImplementedError):
                transport.write_eof()
            assert transport.is_reading()
            await stdlib_close(writer)
            await apps[0].lost
            assert transport.is_closing()
            assert tls_state(transport) is TLSState.CLOSED

    run(main())


def test_peercert_is_the_client_certificate(run: Run, pki: PKI) -> None:
    async def main() -> None:
        apps, factory = collecting(App)
        async with serving(factory, server_context(pki, verify_client=True)) as port:
            reader, writer = await stdlib_connect(port, client_context(pki, cert=True))
            transport = await apps[0].made
            assert transport.get_extra_info("peercert") == pki.client_cert
            await stdlib_close(writer)
            await apps[0].lost

            # Broken pair: without a client certificate the handshake fails.
            reader, writer = await stdlib_connect(port, client_context(pki))
            writer.write(b"x")
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await reader.read()
            await stdlib_close(writer)
        assert len(apps) == 2
        assert not apps[1].made.done()

    run(main())


@pytest.mark.parametrize(
    ("offered", "selected"),
    [(["h2", "http/1.1"], "h2"), (["http/1.1"], None)],
)
def test_alpn_passes_through(run: Run, pki: PKI, offered: list[str], selected: str | None) -> None:
    async def main() -> None:
        apps, factory = collecting(App)
        async with serving(factory, server_context(pki, alpn=b"h2")) as port:
            ctx = client_context(pki)
            ctx.set_alpn_protocols(offered)
            _reader, writer = await stdlib_connect(port, ctx)
            transport = await apps[0].made
            assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == selected
            server_conn = transport.get_extra_info("ssl_object")
            assert server_conn.get_alpn_proto_negotiated() == (selected or "").encode()
            await stdlib_close(writer)
            await apps[0].lost

    run(main())


def test_large_transfer_both_ways(run: Run, pki: PKI) -> None:
    size = 20 * 1024 * 1024
    data = payload(size, seed=1)

    async def main() -> None:
        apps, factory = collecting(App)  # echoes, with flow control both ways
        async with serving(factory, server_context(pki)) as port:
            reader, writer = await stdlib_connect(port, client_context(pki))

            async def send() -> None:
                view = memoryview(data)
                for start in range(0, size, 256 * 1024):
                    writer.write(view[start : start + 256 * 1024])
                    await writer.drain()

            async def receive() -> bytes:
                digest = hashlib.sha256()
                got = 0
                while got < size:
                    chunk = await reader.read(1 << 20)
                    assert chunk
                    digest.update(chunk)
                    got += len(chunk)
                return digest.digest()

            _, echoed = await asyncio.gather(send(), receive())
            assert echoed == hashlib.sha256(data).digest()
            assert hashlib.sha256(apps[0].data).digest() == echoed
            await stdlib_close(writer)
            await apps[0].lost

    run(main(), timeout=60)


def test_start_server_streams(run: Run, pki: PKI) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        handled: asyncio.Future[object] = loop.create_future()
        finished: asyncio.Future[None] = loop.create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            line = await reader.readline()
            writer.writelines([line[:5].upper(), line[5:].upper()])  # outside any event
            await writer.drain()
            handled.set_result(writer.get_extra_info("ssl_object"))
            assert await reader.read() == b""
            writer.close()
            await writer.wait_closed()
            finished.set_result(None)

        server = await tls.start_server(
            handle, HOST, 0, ssl_context=server_context(pki), transport=TRANSPORT
        )
        port = server.sockets[0].getsockname()[1]
        reader, writer = await stdlib_connect(port, client_context(pki))
        writer.write(b"hello streams\n")
        assert await reader.readline() == b"HELLO STREAMS\n"
        assert isinstance(await handled, SSL.Connection)
        await stdlib_close(writer)
        server.close()
        await server.wait_closed()
        await finished

    run(main())


# -- flow control ----------------------------------------------------------------------------


class Producer(App):
    """Writes ``total`` bytes as fast as flow control allows, then closes."""

    chunk = payload(64 * 1024, seed=2)

    def __init__(self, total: int) -> None:
        super().__init__(echo=False)
        self.total = total
        self.sent = 0
        self.max_buffered = 0
        self.writing_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        self.transport.set_write_buffer_limits(high=256 * 1024)
        assert self.transport.get_write_buffer_limits() == (64 * 1024, 256 * 1024)
        self.produce()

    def produce(self) -> None:
        while not self.writing_paused and self.sent < self.total:
            self.transport.write(self.chunk)
            self.sent += len(self.chunk)
            self.max_buffered = max(self.max_buffered, self.transport.get_write_buffer_size())
        if self.sent >= self.total:
            self.transport.close()

    def pause_writing(self) -> None:
        super().pause_writing()
        self.writing_paused = True

    def resume_writing(self) -> None:
        super().resume_writing()
        self.writing_paused = False
        self.produce()


def test_client_that_does_not_read_pauses_writing(run: Run, pki: PKI) -> None:
    total = 4 * 1024 * 1024

    async def main() -> None:
        apps, factory = collecting(lambda: Producer(total))
        async with serving(factory, server_context(pki)) as port:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
            reader, writer = await asyncio.open_connection(
                sock=sock, ssl=client_context(pki), server_hostname="localhost"
            )
            await apps[0].paused
            producer = apps[0]
            assert producer.sent < total
            # Memory stays bounded: the high-water mark plus one write's ciphertext.
            assert producer.max_buffered <= 256 * 1024 + 66 * 1024
            got = len(await reader.read())
            assert got == total
            assert "resume" in producer.events
            await stdlib_close(writer)
            assert await producer.lost is None

    run(main())


def _fionread(sock: Any) -> int:
    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    value: int = struct.unpack("i", raw)[0]
    return value


def test_pause_reading_stops_delivery(run: Run, pki: PKI) -> None:
    async def main() -> None:
        apps, factory = collecting(lambda: App(echo=False))
        async with serving(factory, server_context(pki)) as port:
            _reader, writer = await stdlib_connect(port, client_context(pki))
            writer.write(b"first")
            app = apps[0]
            await app.got_data
            app.transport.pause_reading()
            assert not app.transport.is_reading()
            writer.write(b"second")
            # The record reaches the server's socket buffer and stays there.
            sock = app.transport.get_extra_info("socket")
            await yield_until(lambda: _fionread(sock) > 0)
            for _ in range(20):
                await asyncio.sleep(0)
            assert bytes(app.data) == b"first"
            app.transport.resume_reading()
            assert app.transport.is_reading()
            await yield_until(lambda: bytes(app.data) == b"firstsecond")
            await stdlib_close(writer)
            await app.lost

    run(main())


def test_pause_reading_from_connection_made(run: Run, pki: PKI) -> None:
    class PausedAtStart(App):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self.transport.pause_reading()

    async def main() -> None:
        apps, factory = collecting(lambda: PausedAtStart(echo=True))
        async with serving(factory, server_context(pki)) as port:
            client = await BioClient.open(port, bio_client_context(pki))
            await client.handshake(flush=False)
            client.send(b"with the Finished")  # lands in the TLS layer while the app is paused
            app = apps[0]
            transport = await app.made
            for _ in range(20):
                await asyncio.sleep(0)
            assert app.events == ["made"]
            transport.resume_reading()
            assert await client.recv_exactly(17) == b"with the Finished"
            await client.close()
            await app.lost

    run(main())


class BufferedEcho(asyncio.BufferedProtocol):
    """A BufferedProtocol app with a small buffer that pauses reading now and then."""

    def __init__(self) -> None:
        self.buffer = bytearray(1000)
        self.received = bytearray()
        self.calls = 0
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.calls += 1
        data = bytes(self.buffer[:nbytes])
        self.received += data
        self.transport.write(data)
        if self.calls % 50 == 0:  # leave records in the BIO; resume from a later callback
            self.transport.pause_reading()
            asyncio.get_running_loop().call_soon(self.transport.resume_reading)

    def eof_received(self) -> None:
        pass

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.set_result(exc)


def test_buffered_protocol_app(run: Run, pki: PKI) -> None:
    data = payload(300_000, seed=3)

    async def main() -> None:
        apps, factory = collecting(BufferedEcho)
        async with serving(factory, server_context(pki)) as port:
            reader, writer = await stdlib_connect(port, client_context(pki))
            writer.write(data)
            assert await reader.readexactly(len(data)) == data
            assert bytes(apps[0].received) == data
            assert apps[0].calls >= 300
            await stdlib_close(writer)
            assert await apps[0].lost is None

    run(main())


def test_sendfile(run: Run, pki: PKI, tmp_path: Path) -> None:
    if run.kind == "uvloop":
        pytest.skip("uvloop has no loop.sendfile (aiohttp falls back to write())")
    path = tmp_path / "blob"
    path.write_bytes(payload(5 * 1024 * 1024, seed=4))

    class Sender(App):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self.task = asyncio.get_running_loop().create_task(self.send())

        async def send(self) -> int:
            with path.open("rb") as f:
                sent = await asyncio.get_running_loop().sendfile(self.transport, f)
            assert self.transport.get_protocol() is self
            self.transport.close()
            return sent

    async def main() -> None:
        apps, factory = collecting(lambda: Sender(echo=False))
        async with serving(factory, server_context(pki)) as port:
            reader, writer = await stdlib_connect(port, client_context(pki))
            received = await reader.read()
            assert await apps[0].task == path.stat().st_size
            assert hashlib.sha256(received).digest() == hashlib.sha256(path.read_bytes()).digest()
            await stdlib_close(writer)
            assert await apps[0].lost is None

    run(main())


# -- closing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", ["close_notify", "bare EOF"])
def test_close_sends_close_notify_and_is_idempotent(run: Run, pki: PKI, answer: str) -> None:
    class Closer(App):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self.transport.close()
            self.transport.close()
            assert self.transport.is_closing()
            self.transport.write(b"dropped")  # after close(): ignored

    async def main() -> None:
        apps, factory = collecting(lambda: Closer(echo=True))
        async with serving(factory, server_context(pki)) as port:
            client = await BioClient.open(port, bio_client_context(pki))
            await client.handshake()
            client.send(b"bye")
            assert await client.recv_exactly(3) == b"bye"
            assert await client.recv() == b""  # a close_notify, not a bare EOF
            assert not apps[0].lost.done()  # the server waits for our answer...
            if answer == "close_notify":
                await client.close()  # ...which completes the exchange
            else:
                client.writer.close()  # ...or for the TCP connection to end
            assert await apps[0].lost is None
            assert apps[0].events == ["made", "data", "lost"]

    run(main())


def test_shutdown_timeout_bounds_the_wait_for_close_notify(run: Run, pki: PKI) -> None:
    class CloseAtOnce(App):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self.transport.close()

    async def main() -> None:
        apps, factory = collecting(lambda: CloseAtOnce(echo=False))
        ctx = server_context(pki)
        async with serving(factory, ctx, shutdown_timeout=0.2) as port:
            client = await BioClient.open(port, bio_client_context(pki))
            await client.handshake()
            # Never answer the close_notify: the server gives up after shutdown_timeout.
            exc = await apps[0].lost
            assert isinstance(exc, TimeoutError)
            assert await read_to_eof(client.reader) != b"x"
            client.writer.close()

    run(main())


def test_abort(run: Run, pki: PKI) -> None:
    class Aborter(App):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self.transport.abort()
            self.transport.abort()
            assert self.transport.is_closing()
            self.transport.write(b"dropped")

    async def main() -> None:
        apps, factory = collecting(lambda: Aborter(echo=False))
        async with serving(factory, server_context(pki)) as port:
            reader, writer = await stdlib_connect(port, client_context(pki))
            writer.write(b"x")
            assert await read_to_eof(reader) == b""
            await stdlib_close(writer)
            assert await apps[0].lost is None
            assert apps[0].events == ["made", "data", "lost"]

    run(main())


def test_eof_without_close_notify(run: Run, pki: PKI) -> None:
    async def main() -> None:
        apps, factory = collecting(lambda: App(echo=False))
        async with serving(factory, server_context(pki)) as port:
            client = await BioClient.open(port, bio_client_context(pki))
            await client.handshake()
            client.send(b"last words")
            client.writer.write_eof()  # TCP FIN, no close_notify (a truncation)
            await read_to_eof(client.reader)
            client.writer.close()
            assert await apps[0].lost is None
            assert bytes(apps[0].data) == b"last words"
            assert apps[0].events[-2:] == ["eof", "lost"]

    run(main())


class AnswerAtEof(App):
    """Answers, at the peer's EOF, with more than a socket buffer holds."""

    ANSWER = payload(4 * 1024 * 1024, seed=7)

    def eof_received(self) -> None:
        super().eof_received()
        self.transport.write(self.ANSWER)


def test_half_closed_peer_still_gets_the_answer(run: Run, pki: PKI) -> None:
    async def main() -> None:
        apps, factory = collecting(lambda: AnswerAtEof(echo=False))
        async with serving(factory, server_context(pki)) as port:
            client = await BioClient.open(port, bio_client_context(pki))
            await client.handshake()
            client.send(b"question")
            client.writer.write_eof()  # TCP FIN, no close_notify: half-closed
            answer = await client.recv_exactly(len(AnswerAtEof.ANSWER))
            assert answer == AnswerAtEof.ANSWER
            client.writer.close()
            await apps[0].lost
            assert "eof" in apps[0].events and apps[0].events[-1] == "lost"

    run(main())


class TrickleReader(asyncio.BufferedProtocol):
    """Takes 10 bytes at a time, pausing reading after each and resuming from a callback."""

    def __init__(self) -> None:
        self.buffer = bytearray(10)
        self.received = bytearray()
        self.events: list[str] = []
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        assert "eof" not in self.events
        self.received += self.buffer[:nbytes]
        self.transport.pause_reading()
        asyncio.get_running_loop().call_soon(self.transport.resume_reading)

    def eof_received(self) -> None:
        self.events.append("eof")

    def connection_lost(self, exc: BaseException | None) -> None:
        self.events.append("lost")
        self.lost.set_result(exc)


def test_eof_waits_for_a_paused_reader(run: Run, pki: PKI) -> None:
    data = payload(5000, seed=5)

    async def main() -> None:
        apps, factory = collecting(TrickleReader)
        async with serving(factory, server_context(pki)) as port:
            client = await BioClient.open(port, bio_client_context(pki))
            await client.handshake()
            client.send(data)
            client.writer.write_eof()
            assert await apps[0].lost is None
            # Every byte still in the TLS layer at EOF reached the app before eof_received.
            assert bytes(apps[0].received) == data
            assert apps[0].events == ["eof", "lost"]
            client.writer.close()

    run(main())


BIG = payload(150_000, seed=6)


def test_writelines(run: Run, pki: PKI) -> None:
    class Lines(App):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self.transport.writelines([b"one ", bytearray(b"two "), memoryview(b"three"), b""])
            self.transport.writelines([b"+", BIG])  # more than one chunk after a small write

    async def main() -> None:
        apps, factory = collecting(lambda: Lines(echo=False))
        async with serving(factory, server_context(pki)) as port:
            reader, writer = await stdlib_connect(port, client_context(pki))
            writer.write(b"go")
            assert await reader.readexactly(13) == b"one two three"
            assert await reader.readexactly(1 + len(BIG)) == b"+" + BIG
            await stdlib_close(writer)
            await apps[0].lost

    run(main())


def test_peer_reset(run: Run, pki: PKI) -> None:
    async def main() -> None:
        apps, factory = collecting(App)
        async with serving(factory, server_context(pki)) as port:
            client = await BioClient.open(port, bio_client_context(pki))
            await client.handshake()
            client.send(b"x")
            assert await client.recv_exactly(1) == b"x"
            sock = client.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.writer.transport.abort()  # RST
            assert isinstance(await apps[0].lost, ConnectionResetError)
            assert apps[0].transport.is_closing()

    run(main())


# -- handshake failures ----------------------------------------------------------------------


def test_handshake_timeouts_of_many_connections(run: Run, pki: PKI) -> None:
    """Each silent connection ends at its own deadline, and one that completed its handshake
    is not touched (the socket transport times them all with one timer per server)."""

    async def main() -> None:
        apps, factory = collecting(App)
        async with serving(factory, server_context(pki), handshake_timeout=0.3) as port:
            silent = [await asyncio.open_connection(HOST, port)]
            reader, writer = await stdlib_connect(port, client_context(pki))
            served = await apps[1].made
            timeouts = getattr(served, "_timeouts", None)  # the socket transport's deadlines
            if timeouts is not None:
                assert served not in timeouts.handshake.pending  # left with its handshake
            await asyncio.sleep(0.1)
            silent.append(await asyncio.open_connection(HOST, port))
            await asyncio.sleep(0.1)
            silent.append(await asyncio.open_connection(HOST, port))
            for silent_reader, silent_writer in silent:
                assert await read_to_eof(silent_reader) == b""
                silent_writer.close()
            await asyncio.sleep(0.35)  # past the served connection's handshake deadline too
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            await stdlib_close(writer)
            await apps[1].lost
            assert [app.made.done() for app in apps] == [False, True, False, False]
            if timeouts is not None:  # they hold no one now
                assert not timeouts.handshake.pending
                assert not timeouts.shutdown.pending

    run(main())


def test_handshake_timeout(run: Run, pki: PKI) -> None:
    async def main() -> None:
        apps, factory = collecting(App)
        async with serving(factory, server_context(pki), handshake_timeout=0.2) as port:
            reader, writer = await asyncio.open_connection(HOST, port)  # says nothing
            assert await read_to_eof(reader) == b""
            writer.close()
            assert not apps[0].made.done()
            # Half a ClientHello, then EOF: that connection ends, quietly.
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            writer.write_eof()
            assert await read_to_eof(reader) == b""
            writer.close()
            assert not apps[1].made.done()
            # Broken pair: a client that does handshake is served normally.
            reader, writer = await stdlib_connect(port, client_context(pki))
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            await stdlib_close(writer)
            await apps[2].lost

    run(main())


def test_garbage_closes_only_that_connection(run: Run, pki: PKI) -> None:
    async def main() -> None:
        apps, factory = collecting(App)
        async with serving(factory, server_context(pki)) as port:
            reader, writer = await stdlib_connect(port, client_context(pki))
            garbage_reader, garbage_writer = await asyncio.open_connection(HOST, port)
            garbage_writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            await read_to_eof(garbage_reader)
            garbage_writer.close()
            assert not apps[1].made.done()
            # The connection made before still works, and so does a new one.
            writer.write(b"still here")
            assert await reader.readexactly(10) == b"still here"
            reader2, writer2 = await stdlib_connect(port, client_context(pki))
            writer2.write(b"new")
            assert await reader2.readexactly(3) == b"new"
            for w in (writer, writer2):
                await stdlib_close(w)
            await apps[0].lost
            await apps[2].lost

    run(main())


def test_handshake_failure_flushes_the_alert(run: Run, pki: PKI) -> None:
    async def main() -> None:
        apps, factory = collecting(App)
        ctx = server_context(pki, max_version=SSL.TLS1_2_VERSION)
        async with serving(factory, ctx) as port:
            client_ctx = client_context(pki)
            client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            # The client reports the server's protocol_version alert: it was sent before close.
            with pytest.raises(ssl.SSLError, match=r"PROTOCOL_VERSION|protocol version"):
                await stdlib_connect(port, client_ctx)
            assert not apps[0].made.done()

    run(main())


def test_application_data_with_the_clients_finished(run: Run, pki: PKI) -> None:
    async def main() -> None:
        apps, factory = collecting(App)
        async with serving(factory, server_context(pki)) as port:
            client = await BioClient.open(port, bio_client_context(pki))
            await client.handshake(flush=False)  # TLS 1.3: our Finished is still unsent
            client.send(b"ping")  # Finished and the request leave in one write
            assert await client.recv_exactly(4) == b"ping"
            await client.close()
            assert await apps[0].lost is None

    run(main())


@pytest.mark.parametrize("behind_data", [False, True], ids=["alone", "behind_data"])
def test_renegotiation_is_refused(run: Run, pki: PKI, behind_data: bool) -> None:
    async def main() -> None:
        apps, factory = collecting(App)
        async with serving(factory, server_context(pki)) as port:
            client = await BioClient.open(
                port, bio_client_context(pki, max_version=SSL.TLS1_2_VERSION)
            )
            await client.handshake()
            client.send(b"before")
            assert await client.recv_exactly(6) == b"before"  # TLS 1.2 traffic is fine
            if behind_data:  # echoed in the same event: the server's flush has both
                client.conn.sendall(b"ping")
            assert client.conn.renegotiate()
            with contextlib.suppress(SSL.WantReadError):
                client.conn.do_handshake()
            client.flush()  # a ClientHello after the handshake
            exc = await apps[0].lost
            assert isinstance(exc, SSL.Error)
            assert "renegotiation" in str(exc)
            assert bytes(apps[0].data) == (b"beforeping" if behind_data else b"before")
            with pytest.raises((SSL.Error, ConnectionError)):
                await client.recv()
            client.writer.close()

    run(main())


class Greeter(App):
    """Echoes, after a greeting written from connection_made (in TLS 1.2 it leaves in the same
    flush as the handshake's last flight)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport.write(b"hello\n")


@pytest.mark.parametrize("app", [Greeter, BufferedEcho])
def test_tls12_traffic_is_not_mistaken_for_renegotiation(
    run: Run, pki: PKI, app: Callable[[], Greeter | BufferedEcho]
) -> None:
    """The TLS 1.2 renegotiation guard takes an alert leading a flush for OpenSSL refusing a
    renegotiation. Nothing else may look like one: the handshake's last flight, echoes of every
    size (one record, many, more than a flush), writes outside any event, the close_notify
    exchange."""
    sizes = [1, 5, 16384, 16385, 65536, 65537, 300_000, 3 * 1024 * 1024]

    async def main() -> None:
        apps, factory = collecting(app)
        async with serving(factory, server_context(pki)) as port:
            reader, writer = await stdlib_connect(
                port, client_context(pki, max_version=ssl.TLSVersion.TLSv1_2)
            )
            assert writer.get_extra_info("ssl_object").version() == "TLSv1.2"
            if app is Greeter:
                assert await reader.readexactly(6) == b"hello\n"
            for seed, size in enumerate(sizes):
                message = payload(size, seed)
                writer.write(message)
                assert await reader.readexactly(size) == message
            transport = apps[0].transport
            transport.write(payload(200_000, seed=100))  # outside any event: flushed at once
            transport.writelines([b"a", payload(100_000, seed=101), b"b"])
            assert await reader.readexactly(200_000) == payload(200_000, seed=100)
            assert await reader.readexactly(100_002) == b"a" + payload(100_000, seed=101) + b"b"
            await stdlib_close(writer)  # close_notify, answered by the server's
            assert await apps[0].lost is None

    run(main(), timeout=60)


def test_application_errors_reach_the_exception_handler(run: Run, pki: PKI) -> None:
    class Broken(App):
        def data_received(self, data: bytes) -> None:
            raise ZeroDivisionError("app bug")

    async def main() -> None:
        apps, factory = collecting(Broken)
        async with serving(factory, server_context(pki)) as port:
            reader, writer = await stdlib_connect(port, client_context(pki))
            writer.write(b"x")
            assert await read_to_eof(reader) == b""
            await stdlib_close(writer)
            assert isinstance(await apps[0].lost, ZeroDivisionError)

    run(main())
    (error,) = run.loop_errors
    assert isinstance(error["exception"], ZeroDivisionError)
    assert "receive data" in error["message"]
    run.loop_errors.clear()


def test_a_raising_handshake_callback_fails_that_handshake(run: Run, pki: PKI) -> None:
    def on_ocsp(conn: SSL.Connection, data: Any) -> bytes:
        raise KeyError("stapler bug")

    async def main() -> None:
        apps, factory = collecting(App)
        async with serving(factory, server_context(pki, ocsp_callback=on_ocsp)) as port:
            client = await BioClient.open(port, bio_client_context(pki), request_ocsp=True)
            with pytest.raises(SSL.Error, match="internal error"):
                await client.handshake()
            client.writer.close()
            assert not apps[0].made.done()

    run(main())
    (error,) = run.loop_errors
    assert isinstance(error["exception"], KeyError)
    assert error["message"] == "TLS handshake failed"
    run.loop_errors.clear()


# -- lifecycle and hooks ---------------------------------------------------------------------


def test_illegal_state_transitions_raise(run: Run, pki: PKI, transport: str) -> None:
    memory_only(transport)

    async def main() -> None:
        protocol = TLSServerProtocol(App(), server_context(pki))
        assert protocol._state is TLSState.UNWRAPPED
        with pytest.raises(RuntimeError, match="cannot switch state"):
            protocol._set_state(TLSState.WRAPPED)  # no handshake yet
        with pytest.raises(RuntimeError, match="cannot switch state"):
            protocol._set_state(AppState.EOF)  # the app was never connected
        protocol._set_state(TLSState.DO_HANDSHAKE)
        with pytest.raises(RuntimeError, match="cannot switch state"):
            protocol._set_state(TLSState.SHUTDOWN)  # cannot shut down what never started
        protocol._set_state(TLSState.CLOSED)
        for state in TLSState:
            with pytest.raises(RuntimeError, match="cannot switch state"):
                protocol._set_state(state)  # CLOSED is terminal

    run(main())


def test_illegal_state_transitions_raise_on_a_socket(run: Run, pki: PKI, transport: str) -> None:
    if transport != "socket":
        pytest.skip("the socket transport's own object")

    async def main() -> None:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        seen: list[TLSState] = []
        made = tls_socket.SocketTLSTransport(
            asyncio.get_running_loop(),
            ours,
            server_context(pki),
            App(),
            on_connection=lambda t: seen.append(t.tls_state),
        )
        assert seen == [TLSState.UNWRAPPED]  # on_connection runs before the handshake
        assert made.tls_state is TLSState.DO_HANDSHAKE  # waiting for a ClientHello
        with pytest.raises(RuntimeError, match="cannot switch state"):
            made._set_state(TLSState.SHUTDOWN)  # cannot shut down what never started
        with pytest.raises(RuntimeError, match="cannot switch state"):
            made._set_state(AppState.EOF)  # the app was never connected
        made.abort()
        assert tls_state(made) is TLSState.CLOSED
        for state in TLSState:
            with pytest.raises(RuntimeError, match="cannot switch state"):
                made._set_state(state)  # CLOSED is terminal
        await yield_until(lambda: ours.fileno() == -1)  # closed by connection_lost's turn
        theirs.close()

    run(main())


def test_unclosed_transport_warns(run: Run, pki: PKI, transport: str) -> None:
    memory_only(transport)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        held = [TLSTransport(loop, TLSServerProtocol(App(), server_context(pki)))]
        with pytest.warns(ResourceWarning, match="unclosed transport"):
            drop(held)
        closed = TLSTransport(loop, TLSServerProtocol(App(), server_context(pki)))
        closed.close()
        del closed
        gc.collect()

    run(main())


class Abandoning(App):
    """Stops reading at once and keeps its transport only in ``held``."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        self.made.set_result(None)  # type: ignore[arg-type]
        self.held = [transport]


def test_unclosed_socket_transport_warns(run: Run, pki: PKI, transport: str) -> None:
    if transport != "socket":
        pytest.skip("the socket transport's own object")

    async def main() -> None:
        apps, factory = collecting(lambda: Abandoning(echo=False))
        async with serving(factory, server_context(pki)) as port:
            client = await BioClient.open(port, bio_client_context(pki))
            await client.handshake()
            await apps[0].made
            await asyncio.sleep(0)  # nothing of the loop's holds it any more
            with pytest.warns(ResourceWarning, match="unclosed transport"):
                drop(apps[0].held)  # its socket is closed with it
            apps.clear()
            await read_to_eof(client.reader)  # ends (after the session tickets): closed
            client.writer.close()

    run(main())


def test_on_connection_sees_handshaking_connections(run: Run, pki: PKI) -> None:
    async def main() -> None:
        transports: weakref.WeakSet[TLSTransport] = weakref.WeakSet()
        apps, app_factory = collecting(App)
        server = await tls.create_server(
            app_factory,
            HOST,
            0,
            ssl_context=server_context(pki),
            on_connection=transports.add,
            transport=TRANSPORT,
        )
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(HOST, port)  # no ClientHello
        await yield_until(lambda: len(transports) == 1)
        (transport,) = transports
        assert transport.tls_state is TLSState.DO_HANDSHAKE
        assert transport.app_state is AppState.INIT
        assert transport.get_extra_info("peername") == writer.get_extra_info("sockname")
        with pytest.raises(RuntimeError, match="handshake"):
            transport.write(b"too early")
        transport.abort()  # what a site does on stop
        assert await read_to_eof(reader) == b""
        writer.close()
        assert tls_state(transport) is TLSState.CLOSED
        assert not apps[0].made.done()
        server.close()
        await server.wait_closed()

    run(main())


def test_arguments_are_checked(run: Run, pki: PKI) -> None:
    async def main() -> None:
        with pytest.raises(TypeError, match=r"OpenSSL\.SSL\.Context"):
            await tls.create_server(App, HOST, 0, ssl_context=ssl.create_default_context())  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="handshake_timeout"):
            tls.server_protocol_factory(App, server_context(pki), handshake_timeout=0)
        with pytest.raises(TypeError, match="ssl_context"):
            await tls.create_server(App, HOST, 0, ssl_context=server_context(pki), ssl=True)

    run(main())


@pytest.mark.parametrize("version", VERSIONS)
def test_ocsp_staple_passes_through(
    run: Run, pki: PKI, version: tuple[int, ssl.TLSVersion, str]
) -> None:
    server_max = version[0]

    async def main() -> None:
        for staple in (pki.ocsp_der, b""):  # stapled, and the broken pair: nothing stapled
            calls: list[SSL.Connection] = []

            def on_ocsp(
                conn: SSL.Connection, data: Any, staple: bytes = staple, calls: list[Any] = calls
            ) -> bytes:
                calls.append(conn)
                return staple

            apps, factory = collecting(App)
            ctx = server_context(pki, ocsp_callback=on_ocsp)
            async with serving(factory, ctx) as port:
                seen: list[bytes] = []
                client = await BioClient.open(
                    port,
                    bio_client_context(pki, max_version=server_max, ocsp_seen=seen),
                    request_ocsp=True,
                )
                await client.handshake()
                transport = await apps[0].made
                assert seen == [staple]
                assert calls == [transport.get_extra_info("ssl_object")]
                assert client.conn.get_protocol_version() == server_max
                await client.close()
                await apps[0].lost

    run(main())


def test_call_when_closed(run: Run, pki: PKI, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        runs: list[str] = []
        registered: list[bool] = []

        def on_ocsp(conn: SSL.Connection, data: Any) -> bytes:
            registered.append(tls.call_when_closed(conn, lambda: runs.append("released")))
            registered.append(tls.call_when_closed(conn, failing))
            return pki.ocsp_der

        def failing() -> None:
            raise RuntimeError("boom")

        apps, factory = collecting(App)
        ctx = server_context(pki, ocsp_callback=on_ocsp)
        async with serving(factory, ctx) as port:
            for _ in range(2):  # closed by the client, then aborted by the server
                client = await BioClient.open(port, bio_client_context(pki), request_ocsp=True)
                await client.handshake()
                app = apps[-1]
                await app.made
                assert runs.count("released") == len(apps) - 1
                conn = app.transport.get_extra_info("ssl_object")
                if len(apps) == 1:
                    await client.close()
                else:
                    app.transport.abort()
                    client.writer.close()
                await app.lost
                assert runs.count("released") == len(apps)
                assert tls.call_when_closed(conn, lambda: None) is False  # no longer live
        assert registered == [True] * 4
        assert runs == ["released", "released"]  # exactly once per connection
        # Not one of ours: the caller falls back to weakref.finalize.
        assert tls.call_when_closed(SSL.Connection(ctx, None), lambda: None) is False

    with caplog.at_level(logging.ERROR, logger="staple.tls"):
        run(main())
    assert caplog.text.count("call_when_closed callback") == 2
    assert "boom" in caplog.text


def test_aiohttp_app_with_file_response(run: Run, pki: PKI, tmp_path: Path) -> None:
    """An unmodified aiohttp app, served the way a staple site does it (FileResponse too)."""
    from aiohttp import ClientSession, web

    path = tmp_path / "page.bin"
    path.write_bytes(payload(1_500_000, seed=7))

    async def hello(request: web.Request) -> web.Response:
        assert request.secure
        assert request.transport is not None
        return web.Response(text=f"hello {request.transport.get_extra_info('cipher')[1]}")

    async def file(request: web.Request) -> web.FileResponse:
        return web.FileResponse(path)

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/hello", hello)
        app.router.add_get("/file", file)
        runner = web.AppRunner(app)
        await runner.setup()
        assert runner.server is not None
        server = await tls.create_server(
            runner.server, HOST, 0, ssl_context=server_context(pki), transport=TRANSPORT
        )
        port = server.sockets[0].getsockname()[1]
        try:
            async with ClientSession() as session:
                url = f"https://localhost:{port}"
                ctx = client_context(pki)
                async with session.get(f"{url}/hello", ssl=ctx) as response:
                    assert await response.text() == "hello TLSv1.3"
                async with session.get(f"{url}/file", ssl=ctx) as response:
                    assert await response.read() == path.read_bytes()
        finally:
            server.close()
            await server.wait_closed()
            await runner.cleanup()

    run(main())


# -- openssl s_client ------------------------------------------------------------------------


def _openssl() -> str:
    return require("openssl")


class UpperAndClose(App):
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.transport.write(data.upper())
        self.transport.close()


async def s_client(port: int, pki: PKI, *args: str, stdin: bytes = b"hello\n") -> str:
    process = await asyncio.create_subprocess_exec(
        _openssl(),
        "s_client",
        "-connect",
        f"{HOST}:{port}",
        "-servername",
        "localhost",
        "-CAfile",
        str(pki.ca_path),
        "-verify_return_error",
        "-ign_eof",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate(stdin)
    return out.decode(errors="replace")


@pytest.mark.external
@pytest.mark.parametrize(("flag", "name"), [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")])
def test_s_client_echo(run_asyncio: Run, pki: PKI, flag: str, name: str) -> None:
    _openssl()

    async def main() -> None:
        apps, factory = collecting(lambda: UpperAndClose(echo=False))
        async with serving(factory, server_context(pki)) as port:
            out = await s_client(port, pki, flag)
            await apps[0].lost
        assert "HELLO" in out
        assert f"Protocol  : {name}" in out or f"New, {name}" in out
        assert "Verify return code: 0 (ok)" in out

    run_asyncio(main())


@pytest.mark.external
def test_s_client_alpn_and_staple(run_asyncio: Run, pki: PKI) -> None:
    _openssl()

    async def main() -> None:
        for staple in (pki.ocsp_der, b""):
            apps, factory = collecting(lambda: UpperAndClose(echo=False))

            def on_ocsp(conn: SSL.Connection, data: Any, staple: bytes = staple) -> bytes:
                return staple

            ctx = server_context(pki, alpn=b"h2", ocsp_callback=on_ocsp)
            async with serving(factory, ctx) as port:
                out = await s_client(port, pki, "-alpn", "h2,http/1.1", "-status")
                await apps[0].lost
            assert "HELLO" in out
            assert "ALPN protocol: h2" in out
            if staple:
                assert "OCSP Response Status: successful" in out
            else:  # the broken pair
                assert "OCSP response: no response sent" in out

    run_asyncio(main())


@pytest.mark.external
def test_tls13_key_update_is_not_renegotiation(run_asyncio: Run, pki: PKI) -> None:
    """A TLS 1.3 KeyUpdate asking for ours is no renegotiation attempt: the connection goes on,
    and our KeyUpdate leaves (OpenSSL 4 sends it with our next write; pyOpenSSL cannot send a
    KeyUpdate, ``openssl s_client`` does on a line ``K``, with its next line's data)."""
    openssl = _openssl()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        connected: asyncio.Future[App] = loop.create_future()

        def factory() -> App:
            app = App(echo=False)
            connected.set_result(app)
            return app

        async with serving(factory, server_context(pki)) as port:
            process = await asyncio.create_subprocess_exec(
                openssl,
                "s_client",
                "-connect",
                f"{HOST}:{port}",
                "-servername",
                "localhost",
                "-CAfile",
                str(pki.ca_path),
                "-verify_return_error",
                "-tls1_3",
                "-msg",  # shows the KeyUpdate messages
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            assert process.stdin is not None
            assert process.stdout is not None
            stdin, stdout = process.stdin, process.stdout
            seen = b""

            async def wait_for_line(predicate: Callable[[bytes], bool]) -> None:
                """Consume s_client's output up to and including a line that matches."""
                nonlocal seen
                while True:
                    while b"\n" in seen:
                        line, seen = seen.split(b"\n", 1)
                        if predicate(line):
                            return
                    data = await stdout.read(4096)
                    assert data, "s_client exited early"
                    seen += data

            try:
                app = await connected
                transport = await app.made
                transport.write(b"ready\n")
                await wait_for_line(lambda line: line == b"ready")  # s_client reads stdin now
                stdin.write(b"K\n")  # a KeyUpdate, update_requested
                await wait_for_line(lambda line: line == b"KEYUPDATE")
                stdin.write(b"with-the-key-update\n")  # the KeyUpdate leaves with this line
                await app.got_data
                transport.write(b"still-here\n")
                await wait_for_line(lambda line: line.startswith(b"<<<") and b"KeyUpdate" in line)
                await wait_for_line(lambda line: line == b"still-here")
                stdin.close()  # s_client sends close_notify and exits
                await process.communicate()
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            assert await app.lost is None
            assert bytes(app.data) == b"with-the-key-update\n"
            assert app.events[-2:] == ["eof", "lost"]

    run_asyncio(main())
