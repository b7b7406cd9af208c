"""staple.twisted: stapling on Twisted's TLS, and the ``staple:`` endpoint for twistd and Daphne.

In process, Twisted's own ``TLSMemoryBIOProtocol`` runs over an in-memory pump (``iosim``)
with a pyOpenSSL client that asks for a staple: the staple, and the release of its reference
when Twisted processes ``connectionLost``. A reactor cannot run twice in one process, so the
real servers run as subprocesses: ``twistd -n web --listen staple:...`` on the default reactor
and on the asyncio reactor, and ``daphne -e staple:...`` serving a tiny ASGI app, checked with
``openssl s_client -status`` and ``curl --cert-status``. The OCSP responder runs in this
process, on the test's loop.
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import signal
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from OpenSSL import SSL
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.test import iosim
from zope.interface import implementer

import staple
import staple.ocsp
import staple.twisted
from staple.testing import Fault, Leaf, OcspResponder, TestPKI

from .external import require
from .test_serve import CURL_BAD_STAPLE, assert_stapled, curl, files, s_client

pytestmark = [pytest.mark.slow, pytest.mark.real_clock]

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent
QUICK: dict[str, Any] = {"wait_timeout": 5.0, "fetch_timeout": 5.0, "connect_timeout": 2.0}


# -- fixtures: a PKI on the real clock (the subprocesses read the real clock) ------------------


# -- in process: Twisted's TLS over an in-memory pump ------------------------------------------


class ThreadedMemoryReactor(MemoryReactorClock):
    """A fake reactor whose thread is the test loop's: ``callFromThread`` hands calls to it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._loop = loop

    def callFromThread(self, f: Callable[..., object], *args: object, **kw: object) -> None:
        self._loop.call_soon_threadsafe(lambda: f(*args, **kw))

    async def shut_down(self) -> None:
        """Run the "before shutdown" triggers and wait for the Deferreds they return."""
        for trigger, args, kw in self.triggers.get("before", {}).get("shutdown", []):
            result = trigger(*args, **kw)
            if isinstance(result, Deferred):
                await asyncio.wait_for(result.asFuture(self._loop), 30)


@implementer(IOpenSSLClientConnectionCreator)
class StatusRequestingClient:
    """A pyOpenSSL client that sends status_request and records what the server stapled."""

    def __init__(self, servername: bytes = b"localhost", *, tls12_ciphers: bytes | None = None):
        self.servername = servername
        self.stapled: list[bytes] = []
        self._ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        if tls12_ciphers is not None:  # pyOpenSSL can't set sigalgs; TLS 1.2 suites name the key
            self._ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
            self._ctx.set_cipher_list(tls12_ciphers)
        self._ctx.set_ocsp_client_callback(self._on_status)

    def _on_status(self, conn: SSL.Connection, der: bytes, data: object) -> bool:
        self.stapled.append(der)  # b"" when nothing was stapled
        return True

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        conn = SSL.Connection(self._ctx, None)
        conn.set_tlsext_host_name(self.servername)
        conn.request_ocsp()
        return conn


@contextmanager
def no_garbage_collection() -> Iterator[None]:
    """References must be released by reference counting, as the connection ends, not by a
    collection that might come much later."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def connect(
    options: staple.twisted.StaplingOptions, client: StatusRequestingClient
) -> tuple[TLSMemoryBIOProtocol, TLSMemoryBIOProtocol, iosim.IOPump]:
    """A TLS connection between Twisted's server protocol using ``options`` and ``client``,
    handshake done."""
    # Twisted annotates with zope interfaces, which mypy can't match to their implementers.
    clock: Any = task.Clock()
    address: Any = IPv4Address("TCP", HOST, 4433)
    app: Any = Factory.forProtocol(Protocol)
    server_factory = TLSMemoryBIOFactory(cast(Any, options), False, app, clock)
    client_factory = TLSMemoryBIOFactory(cast(Any, client), True, app, clock)
    server = server_factory.buildProtocol(address)
    client_protocol = client_factory.buildProtocol(address)
    assert server is not None and client_protocol is not None
    pump = iosim.connect(
        server,
        iosim.makeFakeServer(server),
        client_protocol,
        iosim.makeFakeClient(client_protocol),
        clock=clock,
    )
    return server, client_protocol, pump


def assert_good_staple(der: bytes, leaf: Leaf) -> None:
    verified = staple.ocsp.validate(der, leaf.cert, leaf.chain[1], now=datetime.now(UTC))
    assert verified.cert_status is staple.CertStatus.GOOD


@pytest.fixture
async def threaded_options(
    pki: TestPKI, responder: OcspResponder, tmp_path: Path
) -> AsyncIterator[tuple[staple.twisted.StaplingOptions, ThreadedMemoryReactor, Leaf]]:
    """Options made as under the default reactor: the Stapler on a thread of its own."""
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    reactor = ThreadedMemoryReactor(asyncio.get_running_loop())
    # server_options() waits for the first fetch (the reactor is not running), and the responder
    # answers on this loop: call it from another thread.
    options = await asyncio.to_thread(
        staple.twisted.server_options, [files(tmp_path, leaf, "leaf")], reactor=reactor, **QUICK
    )
    try:
        yield options, reactor, leaf
    finally:
        await reactor.shut_down()


async def test_threaded_refresher_staples_first_handshake(threaded_options) -> None:
    options, reactor, leaf = threaded_options
    assert staple.twisted.refresher_for(reactor).threaded
    client = StatusRequestingClient()
    connect(options, client)
    assert client.stapled and client.stapled[0], "the first handshake must be stapled"
    assert_good_staple(client.stapled[0], leaf)
    assert options.stapler.stapled == 1


async def test_sni_and_rsa_with_ecdsa(pki, responder, tmp_path) -> None:
    """build_server_context's SNI switch and key-type choice work on Twisted's connections:
    each client gets the staple for the certificate it was served."""
    a_ec = pki.issue_leaf("a.twisted.test", key_type="ec", ocsp_url=responder.url)
    a_rsa = pki.issue_leaf("a.twisted.test", key_type="rsa", ocsp_url=responder.url)
    b = pki.issue_leaf("b.twisted.test", ocsp_url=responder.url)
    certs = [
        files(tmp_path, a_ec, "a_ec"),
        files(tmp_path, a_rsa, "a_rsa"),
        files(tmp_path, b, "b"),
    ]
    reactor = ThreadedMemoryReactor(asyncio.get_running_loop())
    options = await asyncio.to_thread(
        staple.twisted.server_options, certs, reactor=reactor, **QUICK
    )
    try:
        for name, ciphers, leaf in (
            (b"a.twisted.test", b"ECDHE-ECDSA-AES128-GCM-SHA256", a_ec),
            (b"a.twisted.test", b"ECDHE-RSA-AES128-GCM-SHA256", a_rsa),
            (b"b.twisted.test", None, b),
        ):
            client = StatusRequestingClient(name, tls12_ciphers=ciphers)
            server, _, _ = connect(options, client)
            assert server.getHandle().get_certificate().to_cryptography() == leaf.cert
            assert_good_staple(client.stapled[0], leaf)
            # The broken pair: the staple is for this certificate only.
            other = a_rsa if leaf is a_ec else a_ec
            with pytest.raises(staple.ValidationError):
                assert_good_staple(client.stapled[0], other)
    finally:
        await reactor.shut_down()


async def test_reference_released_at_connection_lost(threaded_options) -> None:
    options, _, _ = threaded_options
    with no_garbage_collection():
        client = StatusRequestingClient()
        server, client_protocol, pump = connect(options, client)
        assert options.stapler.live_references == 1
        client_protocol.loseConnection()
        pump.flush()
        assert not server.connected  # connectionLost has run
        assert options.stapler.live_references == 0


async def test_reference_held_while_the_connection_object_is(threaded_options) -> None:
    """The broken pair: whoever keeps the SSL.Connection keeps the staple's reference."""
    options, _, _ = threaded_options
    with no_garbage_collection():
        client = StatusRequestingClient()
        server, client_protocol, pump = connect(options, client)
        kept = server.getHandle()
        client_protocol.loseConnection()
        pump.flush()
        assert options.stapler.live_references == 1
        del kept
        assert options.stapler.live_references == 0


async def test_shutdown_closes_the_stapler_and_the_thread(threaded_options) -> None:
    options, reactor, _ = threaded_options
    refresher = staple.twisted.refresher_for(reactor)
    thread = refresher._thread
    assert thread is not None and thread.is_alive()
    await reactor.shut_down()
    assert not thread.is_alive()
    assert all(h.state is staple.HandleState.CLOSED for h in options.stapler.handles)
    await reactor.shut_down()  # idempotent


async def test_responder_down_first_handshake_unstapled(pki, responder, tmp_path) -> None:
    """The broken pair of the first-handshake test: nothing fetched, nothing stapled."""
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    responder.fault = Fault.DOWN
    reactor = ThreadedMemoryReactor(asyncio.get_running_loop())
    options = await asyncio.to_thread(
        staple.twisted.server_options,
        [files(tmp_path, leaf, "leaf")],
        reactor=reactor,
        wait_timeout=0.5,
        fetch_timeout=1.0,
        connect_timeout=1.0,
    )
    try:
        client = StatusRequestingClient()
        connect(options, client)
        assert client.stapled == [b""]
        assert options.stapler.unstapled == 1
    finally:
        await reactor.shut_down()


async def test_must_staple_strict_refuses_the_handshake_cleanly(pki, responder, tmp_path) -> None:
    """Under a strict policy and with nothing to staple the handshake fails as any TLS error
    does in Twisted (the connection is closed), not with an exception out of dataReceived."""
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    responder.fault = Fault.DOWN
    reactor = ThreadedMemoryReactor(asyncio.get_running_loop())
    options = await asyncio.to_thread(
        staple.twisted.server_options,
        [files(tmp_path, leaf, "leaf")],
        reactor=reactor,
        must_staple="strict",
        wait_timeout=0.5,
        fetch_timeout=1.0,
        connect_timeout=1.0,
    )
    try:
        client = StatusRequestingClient()
        server, client_protocol, _ = connect(options, client)
        assert options.stapler.refused == 1
        assert not server.connected and not client_protocol.connected
        assert client.stapled == []  # no ServerHello status, no handshake
    finally:
        await reactor.shut_down()


async def test_a_given_stapler_gets_the_chains_and_the_other_options_are_refused(
    pki, responder, tmp_path
) -> None:
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    reactor = ThreadedMemoryReactor(asyncio.get_running_loop())
    stapler = staple.Stapler()
    certs = [files(tmp_path, leaf, "leaf")]
    with pytest.raises(TypeError, match="either stapler= or"):
        staple.twisted.server_options(certs, stapler=stapler, margin=60, reactor=reactor)
    try:
        first = await asyncio.to_thread(
            staple.twisted.server_options, certs, stapler=stapler, reactor=reactor
        )
        second = await asyncio.to_thread(
            staple.twisted.server_options, certs, stapler=stapler, reactor=reactor
        )
        assert first.stapler is second.stapler is stapler
        assert len(stapler.handles) == 1  # the second port shares the first one's handle
    finally:
        await reactor.shut_down()
    assert stapler.handles[0].state is staple.HandleState.CLOSED


# -- the staple: endpoint string ---------------------------------------------------------------


async def test_endpoint_string_through_twisted_plugins(pki, responder, tmp_path) -> None:
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    chain, key = files(tmp_path, leaf, "leaf")
    reactor = ThreadedMemoryReactor(asyncio.get_running_loop())
    description = (
        f"staple:8443:certKey={chain}:privateKey={key}:interface=127.0.0.1"
        f":cacheDir={tmp_path / 'cache'}"
    )
    try:
        endpoint = await asyncio.to_thread(serverFromString, reactor, description)
        assert isinstance(endpoint, staple.twisted.StaplingEndpoint)
        port = await endpoint.listen(Factory.forProtocol(Protocol)).asFuture(
            asyncio.get_running_loop()
        )
        assert port.getHost().port == 8443
        ((number, _, options, _, interface),) = reactor.sslServers
        assert (number, interface) == (8443, "127.0.0.1")
        assert options is endpoint.options
        client = StatusRequestingClient()
        connect(options, client)
        assert_good_staple(client.stapled[0], leaf)
        assert list((tmp_path / "cache").glob("*.ocsp"))  # the FileStore in cacheDir
    finally:
        await reactor.shut_down()


async def test_endpoint_string_with_the_issuer_in_extra_cert_chain(
    pki, responder, tmp_path
) -> None:
    """certKey holding the leaf alone and extraCertChain its issuer, as with Twisted's ssl:."""
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    _, key = files(tmp_path, leaf, "leaf")
    end = b"-----END CERTIFICATE-----\n"
    leaf_pem, issuers = leaf.chain_pem.split(end, 1)
    (tmp_path / "leaf.pem").write_bytes(leaf_pem + end)
    (tmp_path / "issuers.pem").write_bytes(issuers)
    reactor = ThreadedMemoryReactor(asyncio.get_running_loop())
    description = (
        f"staple:8443:certKey={tmp_path / 'leaf.pem'}:extraCertChain={tmp_path / 'issuers.pem'}"
        f":privateKey={key}:cacheDir={tmp_path / 'cache'}"
    )
    try:
        endpoint = await asyncio.to_thread(serverFromString, reactor, description)
        client = StatusRequestingClient()
        connect(endpoint.options, client)
        assert_good_staple(client.stapled[0], leaf)
    finally:
        await reactor.shut_down()


def test_endpoint_string_without_a_key_says_what_is_missing() -> None:
    with pytest.raises(ValueError, match=r"needs certKey=CHAIN\.pem and privateKey=KEY\.pem"):
        serverFromString(MemoryReactorClock(), "staple:8443:certKey=chain.pem")


async def test_endpoint_does_not_listen_when_a_chain_cannot_be_opened(tmp_path) -> None:
    """A certificate with no issuer in its file cannot be stapled: the endpoint says so at
    parse time instead of serving without staples."""
    pki = TestPKI()
    leaf = pki.issue_leaf("localhost", ocsp_url="http://127.0.0.1:9/")
    chain, key = tmp_path / "leaf.pem", tmp_path / "key.pem"
    chain.write_bytes(
        leaf.chain_pem.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n"
    )
    leaf.write_key(key)
    reactor = ThreadedMemoryReactor(asyncio.get_running_loop())
    try:
        with pytest.raises(staple.ChainError):
            await asyncio.to_thread(
                serverFromString, reactor, f"staple:8443:certKey={chain}:privateKey={key}"
            )
        assert reactor.sslServers == []
    finally:
        await reactor.shut_down()


# -- real servers: twistd and Daphne as subprocesses -------------------------------------------


async def read_until(stream: asyncio.StreamReader, pattern: str, seen: list[str]) -> re.Match[str]:
    """Read lines until one matches ``pattern`` (bounded by the caller's timeout)."""
    while True:
        line = (await stream.readline()).decode(errors="replace")
        if not line:
            raise AssertionError("the server exited; it said:\n" + "".join(seen))
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match


@asynccontextmanager
async def server_process(
    argv: list[str], listening: str, *, cwd: Path, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int, list[str]]]:
    """Run ``argv`` with stderr merged into stdout; yield the process, the port it says it
    listens on (``listening``'s group 1) and its output so far. Stops it with SIGINT (Ctrl-C)
    and checks that it shut down without a traceback."""
    env = {
        **os.environ,
        "XDG_CACHE_HOME": str(cwd / "xdg-cache"),
        "PYTHONPATH": str(cwd),
        **(env or {}),
    }
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        match = await asyncio.wait_for(read_until(proc.stdout, listening, seen), 60)
        yield proc, int(match.group(1)), seen
        proc.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(proc.communicate(), 30)
        seen.append(rest.decode(errors="replace"))
        # twistd stops cleanly, then re-raises the signal that stopped it, as its exit status.
        assert proc.returncode in (0, -signal.SIGINT), "".join(seen)
        assert "Traceback" not in "".join(seen), "".join(seen)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()


def staple_listen(chain: Path, key: Path, cache: Path) -> str:
    return f"staple:0:certKey={chain}:privateKey={key}:interface={HOST}:cacheDir={cache}"


def twistd(listen: str, tmp_path: Path, *, reactor: str | None = None) -> list[str]:
    (tmp_path / "www").mkdir(exist_ok=True)
    (tmp_path / "www" / "index.html").write_text("hello from twistd\n")
    argv = [str(BIN / "twistd"), "-n", "--pidfile="]
    if reactor is not None:
        argv.append(f"--reactor={reactor}")
    return [*argv, "web", "--listen", listen, "--path", str(tmp_path / "www")]


TWISTD_LISTENING = r"Site \(TLS\) starting on (\d+)"


@pytest.mark.external
@pytest.mark.parametrize("reactor", [None, "asyncio"], ids=["default-reactor", "asyncio-reactor"])
async def test_twistd_web_staples(pki, responder, tmp_path, ca_file, reactor) -> None:
    require("openssl")
    require("curl")
    leaf = pki.issue_leaf("twisted.test", ocsp_url=responder.url)
    chain, key = files(tmp_path, leaf, "leaf")
    listen = staple_listen(chain, key, tmp_path / "cache")
    argv = twistd(listen, tmp_path, reactor=reactor)
    async with server_process(argv, TWISTD_LISTENING, cwd=tmp_path) as (_, port, seen):
        where = "a thread of its own" if reactor is None else "the reactor's asyncio loop"
        assert f"refreshed on {where}" in "".join(seen)
        for flag, version in (("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")):
            output = await s_client(port, "twisted.test", "-status", flag)
            assert_stapled(output, leaf)
            assert f"Protocol  : {version}" in output or f"New, {version}" in output
        code, page = await curl(port, "twisted.test", ca_file)
        assert code == 0, page
        assert "hello from twistd" in page
        assert responder.requests == 1  # fetched once, before listening; not per handshake
    assert "staple: stopped refreshing 1 certificate(s)" in "".join(seen)


@pytest.mark.external
@pytest.mark.parametrize("reactor", [None, "asyncio"], ids=["default-reactor", "asyncio-reactor"])
async def test_twistd_web_revoked_fails_curl(pki, responder, tmp_path, ca_file, reactor) -> None:
    """The broken pair: a revoked certificate's staple makes curl refuse the server."""
    require("curl")
    leaf = pki.issue_leaf("twisted.test", ocsp_url=responder.url)
    responder.revoke(leaf)
    chain, key = files(tmp_path, leaf, "leaf")
    argv = twistd(staple_listen(chain, key, tmp_path / "cache"), tmp_path, reactor=reactor)
    async with server_process(argv, TWISTD_LISTENING, cwd=tmp_path) as (_, port, _):
        code, text = await curl(port, "twisted.test", ca_file)
        assert code == CURL_BAD_STAPLE, text
        assert "hello from twistd" not in text


ASGI_APP = textwrap.dedent(
    """
    async def application(scope, receive, send):
        assert scope["type"] == "http"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"hello from daphne\\n"})
    """
)

DAPHNE_LISTENING = r"Listening on TCP address 127\.0\.0\.1:(\d+)"


def daphne(listen: str, tmp_path: Path) -> list[str]:
    (tmp_path / "hello_asgi.py").write_text(ASGI_APP)
    return [str(BIN / "daphne"), "-e", listen, "hello_asgi:application"]


@pytest.mark.external
async def test_daphne_staples(pki, responder, tmp_path, ca_file) -> None:
    require("curl")
    leaf = pki.issue_leaf("daphne.test", ocsp_url=responder.url)
    chain, key = files(tmp_path, leaf, "leaf")
    argv = daphne(staple_listen(chain, key, tmp_path / "cache"), tmp_path)
    async with server_process(argv, DAPHNE_LISTENING, cwd=tmp_path) as (_, port, _):
        code, body = await curl(port, "daphne.test", ca_file)
        assert code == 0, body
        assert body == "hello from daphne\n"
        output = await s_client(port, "daphne.test", "-status", "-tls1_3")
        assert_stapled(output, leaf)


@pytest.mark.external
async def test_daphne_revoked_fails_curl(pki, responder, tmp_path, ca_file) -> None:
    """The broken pair of the Daphne test."""
    require("curl")
    leaf = pki.issue_leaf("daphne.test", ocsp_url=responder.url)
    responder.revoke(leaf)
    chain, key = files(tmp_path, leaf, "leaf")
    argv = daphne(staple_listen(chain, key, tmp_path / "cache"), tmp_path)
    async with server_process(argv, DAPHNE_LISTENING, cwd=tmp_path) as (_, port, _):
        code, body = await curl(port, "daphne.test", ca_file)
        assert code == CURL_BAD_STAPLE, body
        assert "hello from daphne" not in body


# -- the examples ------------------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.external
@pytest.mark.parametrize("revoked", [False, True], ids=["good", "revoked"])
async def test_twisted_web_example(pki, responder, tmp_path, ca_file, revoked) -> None:
    require("curl")
    leaf = pki.issue_leaf("example.test", ocsp_url=responder.url)
    if revoked:
        responder.revoke(leaf)
    chain, key = files(tmp_path, leaf, "leaf")
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "hello.txt").write_text("hello from the example\n")
    argv = [sys.executable, str(EXAMPLES / "twisted_web.py"), str(chain), str(key), "www", "0"]
    listening = r"on https://localhost:(\d+)/"
    async with server_process(argv, listening, cwd=tmp_path) as (_, port, _):
        code, body = await curl(port, "example.test", ca_file, path="/hello.txt")
    if revoked:
        assert code == CURL_BAD_STAPLE, body
    else:
        assert code == 0, body
        assert body == "hello from the example\n"
    assert list((tmp_path / ".cache").glob("*.ocsp"))  # the example's FileStore


@pytest.mark.external
@pytest.mark.parametrize("revoked", [False, True], ids=["good", "revoked"])
async def test_daphne_example_script(pki, responder, tmp_path, ca_file, revoked) -> None:
    """examples/daphne.sh as written, but on a free port."""
    require("curl")
    leaf = pki.issue_leaf("daphne.test", ocsp_url=responder.url)
    if revoked:
        responder.revoke(leaf)
    chain, key = files(tmp_path, leaf, "leaf")
    script = (EXAMPLES / "daphne.sh").read_text()
    assert 'exec daphne -e "staple:8443:' in script
    (tmp_path / "daphne.sh").write_text(
        script.replace("staple:8443:", f"staple:0:interface={HOST}:")
    )
    daphne("unused", tmp_path)  # writes the app
    argv = ["sh", str(tmp_path / "daphne.sh"), str(chain), str(key), "hello_asgi:application"]
    env = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    async with server_process(argv, DAPHNE_LISTENING, cwd=tmp_path, env=env) as (_, port, _):
        code, body = await curl(port, "daphne.test", ca_file)
    if revoked:
        assert code == CURL_BAD_STAPLE, body
    else:
        assert code == 0, body
        assert body == "hello from daphne\n"
    assert list((tmp_path / "xdg-cache" / "staple").glob("*.ocsp"))  # staple serve's cache dir
