"""``staple.uvicorn.run`` as a real uvicorn server process, against curl and a WebSocket client.

The server serves ``tests.asgi_apps.app`` (a raw ASGI app) in a subprocess; the PKI and the OCSP
responder run in the test's loop. Every passing case has a broken twin that must fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import websockets

import staple.uvicorn
import tests.asgi_apps
from staple import MemoryStore, tls_socket
from staple.probe import probe
from staple.testing import Fault

from ..record_client import reply_records
from ..server_process import (
    CURL_BAD_STAPLE,
    HOST,
    ServerProcess,
    curl,
    files,
    python,
    python_file,
    server_process,
)

pytestmark = [pytest.mark.slow, pytest.mark.real_clock]

RUNNING = r"Uvicorn running on https://127\.0\.0\.1:(\d+), stapling"


def uvicorn_run(chain: Path, key: Path, **options: object) -> tuple[str, ...]:
    """The command: ``staple.uvicorn.run(tests.asgi_apps.app, ...)`` on a free port."""
    options = {"host": HOST, "port": 0, **options}
    keywords = "".join(f", {name}={value!r}" for name, value in options.items())
    return python(
        "import staple.uvicorn, tests.asgi_apps\n"
        f"staple.uvicorn.run(tests.asgi_apps.app, certs=[({str(chain)!r}, {str(key)!r})]"
        f"{keywords})"
    )


async def started(server: ServerProcess, status: str = "stapling good") -> int:
    """Wait until it listens and says what it staples; its port."""
    port = int((await server.wait_for(RUNNING)).group(1))
    await server.wait_for(status)
    return port


def cache_env(tmp_path: Path) -> dict[str, str]:
    return {"STAPLE_CACHE_DIR": str(tmp_path / "cache")}


async def stopped_cleanly(server: ServerProcess, sig: signal.Signals) -> None:
    assert await server.stop(sig) == 0, server.output
    assert "Traceback" not in server.output
    assert "Exception ignored" not in server.output  # e.g. an unclosed transport's warning


# -- HTTPS and curl --cert-status ------------------------------------------------------------


@pytest.mark.external
@pytest.mark.parametrize(("http", "loop"), [("h11", "asyncio"), ("httptools", "uvloop")])
async def test_curl_verifies_the_staple_and_the_app_sees_https(
    pki, responder, tmp_path, ca_file, http, loop
) -> None:
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    command = uvicorn_run(*files(tmp_path, leaf), http=http, loop=loop)
    async with server_process(*command, env=cache_env(tmp_path)) as server:
        port = await started(server)
        await server.wait_for(r"^app: startup")  # lifespan startup ran, before listening
        code, body = await curl(port, ca_file)
        assert code == 0, body
        scope = json.loads(body)
        assert scope["scheme"] == "https"
        assert scope["server"] == [HOST, port]
        assert scope["client"][0] == HOST and scope["client"][1] != port
        assert responder.requests == 1  # fetched before listening, not per handshake
        await stopped_cleanly(server, signal.SIGTERM)
    assert server.matches(r"^app: shutdown")  # lifespan shutdown ran too


@pytest.mark.external
async def test_revoked_staple_fails_curl(pki, responder, tmp_path, ca_file) -> None:
    """The broken twin: the same server stapling a revocation; curl must refuse it."""
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    responder.revoke(leaf)
    async with server_process(*uvicorn_run(*files(tmp_path, leaf)), env=cache_env(tmp_path)) as s:
        port = await started(s, "stapling revoked")
        code, out = await curl(port, ca_file)
        assert code == CURL_BAD_STAPLE, out
        await stopped_cleanly(s, signal.SIGINT)


@pytest.mark.external
async def test_responder_down_cold_cache_fails_curl(pki, responder, tmp_path, ca_file) -> None:
    """Nothing cached and the responder down: served, but without a staple; curl refuses."""
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    responder.fault = Fault.DOWN
    async with server_process(*uvicorn_run(*files(tmp_path, leaf)), env=cache_env(tmp_path)) as s:
        port = await started(s, "NO STAPLE")
        code, out = await curl(port, ca_file)
        assert code == CURL_BAD_STAPLE, out
        code, body = await curl(port, ca_file, cert_status=False)  # the app itself is fine
        assert code == 0 and json.loads(body)["scheme"] == "https", body
        await stopped_cleanly(s, signal.SIGTERM)


async def test_warm_cache_staples_while_responder_down(pki, responder, tmp_path) -> None:
    """The same cold start, but a previous run left its response in STAPLE_CACHE_DIR."""
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    command = uvicorn_run(*files(tmp_path, leaf))
    async with server_process(*command, env=cache_env(tmp_path)) as server:
        await started(server)
        await stopped_cleanly(server, signal.SIGTERM)
    responder.fault = Fault.DOWN
    before = responder.requests
    async with server_process(*command, env=cache_env(tmp_path)) as server:
        await started(server, "stapling good")
        await stopped_cleanly(server, signal.SIGTERM)
    assert responder.requests == before


@pytest.mark.external
async def test_two_worker_processes(pki, responder, tmp_path, ca_file) -> None:
    """workers=2: two forked processes on one socket, each stapling from the shared cache."""
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    command = uvicorn_run(*files(tmp_path, leaf), workers=2)
    async with server_process(*command, env=cache_env(tmp_path)) as server:
        match = await server.wait_for(r"running on https://127\.0\.0\.1:(\d+) with 2 worker")
        port = int(match.group(1))
        statuses = await server.wait_for(r"Process \[(\d+)\] .*stapling good", count=2)
        assert statuses
        pids = {m.group(1) for m in server.matches(r"Process \[(\d+)\] .*stapling good")}
        assert len(pids) == 2
        for _ in range(4):
            code, body = await curl(port, ca_file)
            assert code == 0, body
            assert json.loads(body)["scheme"] == "https"
        await stopped_cleanly(server, signal.SIGTERM)
    assert len(server.matches(r"^app: shutdown")) == 2  # each worker shut its app down


async def test_two_worker_processes_that_cannot_start_exit_3(pki, responder, tmp_path) -> None:
    """The broken twin: a key that does not match; the parent stops instead of respawning."""
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    other = pki.issue_leaf("localhost", ocsp_url=responder.url)
    chain, _ = files(tmp_path, leaf)
    _, other_key = files(tmp_path, other, "other")
    command = uvicorn_run(chain, other_key, workers=2)
    async with server_process(*command, env=cache_env(tmp_path)) as server:
        assert await server.wait() == uvicorn.config.STARTUP_FAILURE, server.output
    assert server.matches("could not start; stopping"), server.output


@pytest.mark.external
async def test_example_app(pki, responder, tmp_path, ca_file) -> None:
    """``examples/uvicorn_app.py`` as its docstring runs it (on a free port)."""
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    chain, key = files(tmp_path, leaf)
    command = python_file("examples/uvicorn_app.py", str(chain), str(key), "0")
    async with server_process(*command, env=cache_env(tmp_path)) as server:
        port = int((await server.wait_for(r"running on https://0\.0\.0\.0:(\d+)")).group(1))
        code, body = await curl(port, ca_file)
        assert (code, body) == (0, "hello over https\n")
        await stopped_cleanly(server, signal.SIGTERM)
    responder.revoke(leaf)  # the broken twin: a fresh start staples the revocation
    async with server_process(*command, env={"STAPLE_CACHE_DIR": str(tmp_path / "c2")}) as server:
        port = int((await server.wait_for(r"running on https://0\.0\.0\.0:(\d+)")).group(1))
        code, out = await curl(port, ca_file)
        assert code == CURL_BAD_STAPLE, out
        await stopped_cleanly(server, signal.SIGTERM)


# -- in process: the transports ----------------------------------------------------------------


class InProcess(staple.uvicorn.Server):
    """``staple.uvicorn.Server`` in the test's loop: ``up`` is set once it listens; no signal
    handling of its own (the test stops it with ``should_exit``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.up = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.up.set()


def in_process_server(chain: Path, key: Path, transport: str, **options: Any) -> InProcess:
    config = uvicorn.Config(tests.asgi_apps.app, log_config=None, lifespan="off", **options)
    return InProcess(config, certs=[(chain, key)], store=MemoryStore(), transport=transport)


async def exit_status(server: InProcess) -> object:
    """Serve until stopped; ``sys.exit``'s status, caught here (raised out of a task it would
    end the loop), else ``None``."""
    try:
        await server.serve()
    except SystemExit as exc:
        return exc.code
    return None


@contextlib.asynccontextmanager
async def in_process(
    chain: Path, key: Path, transport: str, **options: Any
) -> AsyncIterator[InProcess]:
    server = in_process_server(chain, key, transport, **options)
    task = asyncio.create_task(exit_status(server))
    try:
        up = asyncio.create_task(server.up.wait())
        await asyncio.wait([up, task], timeout=30, return_when=asyncio.FIRST_COMPLETED)
        up.cancel()
        assert server.up.is_set(), f"did not start: {task.result()}"
        yield server
    finally:
        server.should_exit = True
        assert await asyncio.wait_for(task, 30) is None


@pytest.mark.parametrize("transport", ["socket", "memory"])
async def test_each_transport_listens_and_staples(
    pki, responder, tmp_path, ca_file, transport
) -> None:
    """The socket transport: staple's own server on the socket uvicorn would have bound; the
    memory transport: uvicorn's listener, staple's TLS in its protocol. Both staple."""
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    async with in_process(*files(tmp_path, leaf), transport, host=HOST, port=0) as server:
        expected = tls_socket.SocketTLSServer if transport == "socket" else asyncio.Server
        assert [type(s) for s in server.servers] == [expected]
        port = server.servers[0].sockets[0].getsockname()[1]
        result = await probe(HOST, port, servername="localhost")
        assert result.code == 0, result.lines()
        # uvicorn writes a response's head and its body apart; they leave in one record on
        # the socket transport (coalesce_writes), in one a write on the memory one.
        ctx = ssl.create_default_context(cafile=str(ca_file))
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        request = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
        reply, records = await reply_records(
            port,
            ctx,
            request,
            lambda got: got.endswith(b"\r\n0\r\n\r\n"),  # the last chunk
        )
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and b'"scheme": "https"' in reply
        assert len(records) == (1 if transport == "socket" else 2), records


@pytest.mark.external
@pytest.mark.parametrize("transport", ["socket", "memory"])
async def test_unix_socket(pki, responder, tmp_path, ca_file, transport) -> None:
    """``uds=``: curl verifies the staple over the Unix socket; the file's permissions, set
    before (a stale socket file from a previous run), are kept."""
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    path = tmp_path / "app.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    path.chmod(0o600)
    async with in_process(*files(tmp_path, leaf), transport, uds=str(path)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        for cert_status, expected in ((True, 0), (False, 0)):
            args = ("--cert-status",) if cert_status else ()
            proc = await asyncio.create_subprocess_exec(
                "curl", "-sS", "--cacert", str(ca_file), "--unix-socket", str(path), *args,
                "https://localhost/", stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == expected, out
            assert json.loads(out)["scheme"] == "https"


@pytest.mark.parametrize("transport", ["socket", "memory"])
async def test_listening_fd(pki, responder, tmp_path, transport) -> None:
    """``fd=``: served and stapled on a copy of the descriptor, as uvicorn does, so the
    caller's socket stays open after the server has closed its own."""
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    with socket.create_server((HOST, 0)) as listening:
        port = listening.getsockname()[1]
        async with in_process(*files(tmp_path, leaf), transport, fd=listening.fileno()):
            result = await probe(HOST, port, servername="localhost")
            assert result.code == 0, result.lines()
        os.fstat(listening.fileno())  # still open: OSError (EBADF) if the server closed it


async def test_port_in_use_exits_3(pki, responder, tmp_path) -> None:
    """The socket transport binds where uvicorn would: a port in use is uvicorn's startup
    failure (logged, status 3), and the twin on a free port starts."""
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    with socket.create_server((HOST, 0)) as busy:
        port = busy.getsockname()[1]
        server = in_process_server(*files(tmp_path, leaf), "socket", host=HOST, port=port)
        status = await asyncio.wait_for(exit_status(server), 30)
        assert status == uvicorn.config.STARTUP_FAILURE
        assert not server.started and not server.up.is_set()
    async with in_process(*files(tmp_path, leaf), "socket", host=HOST, port=port) as server:
        assert server.servers[0].sockets[0].getsockname()[1] == port


def test_an_unknown_transport_is_refused() -> None:
    config = uvicorn.Config(asgi_app, log_config=None)
    with pytest.raises(ValueError, match="transport"):
        staple.uvicorn.Server(config, certs=CERTS, transport="pipes")  # type: ignore[arg-type]


# -- WebSocket -------------------------------------------------------------------------------


async def test_websocket_over_wss(pki, responder, tmp_path) -> None:
    """uvicorn's default WebSocket protocol (websockets' sans-I/O one) over staple's TLS."""
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    async with server_process(
        *uvicorn_run(*files(tmp_path, leaf)), env=cache_env(tmp_path)
    ) as server:
        port = await started(server)
        trusting = ssl.create_default_context()
        pki.configure_trust(trusting)
        async with websockets.connect(f"wss://localhost:{port}/", ssl=trusting) as ws_client:
            await ws_client.send("hello")
            assert await asyncio.wait_for(ws_client.recv(), 10) == "wss: hello"
            await ws_client.send("again")
            assert await asyncio.wait_for(ws_client.recv(), 10) == "wss: again"
        # The broken twin: a client that does not trust the test CA must not get through.
        with pytest.raises(ssl.SSLCertVerificationError):
            async with websockets.connect(
                f"wss://localhost:{port}/", ssl=ssl.create_default_context(), open_timeout=10
            ):
                pass
        await stopped_cleanly(server, signal.SIGTERM)


# -- shutdown and startup ---------------------------------------------------------------------


async def test_shutdown_aborts_connections_still_in_the_handshake(pki, responder, tmp_path) -> None:
    """A client that connects and never sends a ClientHello is invisible to uvicorn; SIGTERM
    must not wait for its 60-second handshake timeout, nor leave its transport unclosed."""
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    async with server_process(*uvicorn_run(*files(tmp_path, leaf)), env=cache_env(tmp_path)) as s:
        port = await started(s)
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            s.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(ConnectionResetError):  # aborted by the server: a reset
                assert await asyncio.wait_for(reader.read(), 10) == b""
            assert await s.wait(timeout=10) == 0, s.output
        finally:
            writer.close()
    assert "Traceback" not in s.output and "Exception ignored" not in s.output


async def test_key_that_does_not_match_exits_3(pki, responder, tmp_path) -> None:
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    other = pki.issue_leaf("localhost", ocsp_url=responder.url)
    chain, _ = files(tmp_path, leaf)
    _, other_key = files(tmp_path, other, "other")
    async with server_process(*uvicorn_run(chain, other_key), env=cache_env(tmp_path)) as s:
        assert await s.wait() == uvicorn.config.STARTUP_FAILURE
    assert s.matches("Cannot staple: .*cannot load certificate"), s.output
    assert not s.matches(r"^app: startup")  # refused before the app was started


async def test_lifespan_startup_failure_exits_3(pki, responder, tmp_path) -> None:
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    chain, key = files(tmp_path, leaf)
    code = (
        "import staple.uvicorn\n"
        "async def app(scope, receive, send):\n"
        "    await receive()\n"
        "    await send({'type': 'lifespan.startup.failed', 'message': 'no database'})\n"
        f"staple.uvicorn.run(app, certs=[({str(chain)!r}, {str(key)!r})], port=0,"
        " lifespan='on')\n"
    )
    async with server_process(*python(code), env=cache_env(tmp_path)) as s:
        assert await s.wait() == uvicorn.config.STARTUP_FAILURE
    assert s.matches("no database"), s.output
    assert "Exception ignored" not in s.output  # the stapler was closed on the way out


# -- options ----------------------------------------------------------------------------------


async def asgi_app(scope: object, receive: object, send: object) -> None:
    raise AssertionError("never served")


CERTS = [("chain.pem", "key.pem")]


@pytest.mark.parametrize(
    "option", ["ssl_certfile", "ssl_keyfile", "ssl_context_factory", "ssl_ciphers"]
)
def test_uvicorn_tls_options_are_refused(option) -> None:
    options: dict[str, Any] = {option: "x"}
    with pytest.raises(TypeError, match=rf"{option}.*certs=\[\(chain, key\)\]"):
        staple.uvicorn.run(asgi_app, certs=CERTS, **options)


def test_unknown_keyword_is_named() -> None:
    with pytest.raises(TypeError, match="unexpected keyword arguments: \\['prot'\\]"):
        staple.uvicorn.run(asgi_app, certs=CERTS, prot=8443)


def test_every_uvicorn_run_keyword_is_known() -> None:
    import inspect

    for name in inspect.signature(uvicorn.run).parameters:
        if name == "app" or name.startswith("ssl_"):
            continue
        staple.uvicorn._check_options({name: None})


def test_reload_and_http2_are_refused() -> None:
    with pytest.raises(ValueError, match="reload"):
        staple.uvicorn.run(asgi_app, certs=CERTS, reload=True)
    with pytest.raises(ValueError, match="HTTP/2"):
        staple.uvicorn.Server(uvicorn.Config(asgi_app, http2=True, log_config=None), certs=CERTS)


def test_a_store_url_must_be_redis() -> None:
    config = uvicorn.Config(asgi_app, log_config=None)
    with pytest.raises(ValueError, match="redis://"):
        staple.uvicorn.Server(config, certs=CERTS, store="memcached://127.0.0.1")


async def test_staple_store_that_is_not_redis_exits_3(pki, responder, tmp_path) -> None:
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    env = {"STAPLE_STORE": "memcached://127.0.0.1"}
    async with server_process(*uvicorn_run(*files(tmp_path, leaf)), env=env) as server:
        assert await server.wait() == uvicorn.config.STARTUP_FAILURE
    assert server.matches("Cannot staple: STAPLE_STORE: .*expected redis://"), server.output


def test_server_refuses_a_config_with_uvicorn_tls() -> None:
    config = uvicorn.Config(asgi_app, ssl_certfile="chain.pem", log_config=None)
    with pytest.raises(TypeError, match="cannot staple"):
        staple.uvicorn.Server(config, certs=CERTS)
    with pytest.raises(ValueError, match="at least one"):
        staple.uvicorn.Server(uvicorn.Config(asgi_app, log_config=None), certs=[])
