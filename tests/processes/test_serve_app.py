"""``staple serve --app MODULE:ATTR [--workers N]`` as real processes, against curl.

The apps are in :mod:`tests.serve_apps`; the PKI and the OCSP responder run in the test's loop,
the server as ``python -m staple serve`` from the repository root. Every passing case has a
broken twin that must fail: a revoked certificate fails curl's ``--cert-status``, workers
without the shared directory's lock ask the responder once each.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import ssl
import sys
from pathlib import Path

import pytest
import websockets

import staple
import staple.cli
from staple import cli, tls_socket
from staple.cli.serve import ServeConfig, Serving, serve
from staple.probe import probe
from staple.testing import Fault

from ..server_process import CURL_BAD_STAPLE, HOST, ServerProcess, curl, files, server_process

pytestmark = [pytest.mark.slow, pytest.mark.real_clock]

LISTENING = r"^listening on https://127\.0\.0\.1:(\d+)$"
WORKER_GOOD = r"^worker (\d+): .*stapling good"


def staple_serve(chain: Path, key: Path, *options: str) -> tuple[str, ...]:
    return (
        sys.executable, "-m", "staple", "serve", "--cert", str(chain), "--key", str(key),
        "--host", HOST, "--port", "0", "--loop", "asyncio", *options,
    )  # fmt: skip


async def listening(server: ServerProcess) -> int:
    return int((await server.wait_for(LISTENING)).group(1))


async def stopped_cleanly(server: ServerProcess, sig: signal.Signals = signal.SIGTERM) -> None:
    assert await server.stop(sig) == 0, server.output
    assert "Traceback" not in server.output
    assert "Exception ignored" not in server.output  # e.g. an unclosed transport's warning


def worker_pids(server: ServerProcess) -> set[int]:
    return {int(m.group(1)) for m in server.matches(WORKER_GOOD)}


# -- one process: an aiohttp app, an ASGI app --------------------------------------------------


@pytest.mark.external
@pytest.mark.parametrize("attr", ["aiohttp_app", "make_aiohttp_app", "make_aiohttp_app_async"])
async def test_aiohttp_app(pki, responder, tmp_path, ca_file, attr) -> None:
    """An Application, a factory taking the argument list, an async factory taking nothing."""
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    chain, key = files(tmp_path, leaf)
    command = staple_serve(chain, key, "--app", f"tests.serve_apps:{attr}", "--no-cache")
    async with server_process(*command) as server:
        port = await listening(server)
        await server.wait_for(rf"^serving tests\.serve_apps:{attr} \(aiohttp ")
        await server.wait_for(r"\[localhost\]: stapling good")
        code, body = await curl(port, ca_file)
        assert code == 0, body
        assert body == f"aiohttp app, pid {server.proc.pid}, scheme https\n"
        await stopped_cleanly(server)


@pytest.mark.external
async def test_aiohttp_app_revoked_fails_curl(pki, responder, tmp_path, ca_file) -> None:
    """The broken twin: the same app stapling a revocation; curl must refuse it."""
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    responder.revoke(leaf)
    command = staple_serve(*files(tmp_path, leaf), "--app", "tests.serve_apps:aiohttp_app")
    async with server_process(*command, env={"STAPLE_CACHE_DIR": str(tmp_path / "c")}) as s:
        port = await listening(s)
        await s.wait_for(r"\[localhost\]: stapling revoked")
        code, out = await curl(port, ca_file)
        assert code == CURL_BAD_STAPLE, out
        code, body = await curl(port, ca_file, cert_status=False)  # the app itself answers
        assert code == 0 and body.startswith("aiohttp app"), body
        await stopped_cleanly(s, signal.SIGINT)


@pytest.mark.external
async def test_asgi_app_http_websocket_lifespan(pki, responder, tmp_path, ca_file) -> None:
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    chain, key = files(tmp_path, leaf)
    command = staple_serve(
        chain, key, "--app", "tests.serve_apps:asgi_app", "--cache-dir", str(tmp_path / "c")
    )
    async with server_process(*command) as server:
        port = await listening(server)
        await server.wait_for(r"^serving tests\.serve_apps:asgi_app \(ASGI, uvicorn ")
        await server.wait_for(r"\[localhost\]: stapling good")
        assert server.matches(r"^app: startup")  # lifespan ran before it listened
        code, body = await curl(port, ca_file)
        assert code == 0, body
        scope = json.loads(body)
        assert scope["scheme"] == "https"
        assert scope["server"] == [HOST, port]
        ctx = ssl.create_default_context(cafile=str(ca_file))
        uri = f"wss://localhost:{port}/echo"
        async with websockets.connect(uri, ssl=ctx, host=HOST, port=port) as ws:
            await ws.send("hello")
            assert await asyncio.wait_for(ws.recv(), 10) == "wss: hello"
        assert responder.requests == 1
        await stopped_cleanly(server)
    assert server.matches(r"^app: shutdown")


@pytest.mark.external
async def test_asgi_app_revoked_fails_curl(pki, responder, tmp_path, ca_file) -> None:
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    responder.revoke(leaf)
    command = staple_serve(*files(tmp_path, leaf), "--app", "tests.serve_apps:asgi_app")
    async with server_process(*command, env={"STAPLE_CACHE_DIR": str(tmp_path / "c")}) as s:
        port = await listening(s)
        await s.wait_for(r"\[localhost\]: stapling revoked")
        code, out = await curl(port, ca_file)
        assert code == CURL_BAD_STAPLE, out
        await stopped_cleanly(s)


# -- in-process: the serve() coroutine ------------------------------------------------------------


@pytest.mark.parametrize(
    ("attr", "kind", "transport"),
    [
        ("aiohttp_app", "aiohttp", None),
        ("make_aiohttp_app", "aiohttp", "memory"),  # a factory: an aiohttp app starts once
        ("asgi_app", "ASGI, uvicorn", None),
        ("asgi_app", "ASGI, uvicorn", "memory"),
    ],
)
async def test_serve_coroutine_with_an_app(pki, responder, tmp_path, attr, kind, transport):
    """``serve(ServeConfig(app=...))`` on the test's loop: ready, stapled (verified by staple's
    own probe), stopped with 0, and nothing left open (filterwarnings = error). Either app
    listens with staple's socket transport unless ``--transport memory`` (for an ASGI app,
    uvicorn's own listener then)."""
    leaf = pki.issue_leaf("app.serve.test", ocsp_url=responder.url)
    config = ServeConfig(
        certs=[files(tmp_path, leaf)],
        host=HOST,
        port=0,
        cache_dir=None,
        app=f"tests.serve_apps:{attr}",
        transport=transport,
    )
    out = io.StringIO()
    ready: asyncio.Future[Serving] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, out=out, ready=ready, stop=stop))
    serving = await asyncio.wait_for(ready, 30)
    expected = tls_socket.SocketTLSServer if transport is None else asyncio.Server
    assert [type(server) for server in serving.listeners] == [expected]
    result = await probe(HOST, serving.port, servername="app.serve.test")
    assert result.code == 0, result.lines()
    assert [h.cert for h in serving.handles] == [leaf.cert]
    stop.set()
    assert await asyncio.wait_for(task, 30) == 0
    lines = out.getvalue().splitlines()
    assert lines[0] == f"listening on https://{HOST}:{serving.port}"
    assert lines[2].startswith(f"serving tests.serve_apps:{attr} ({kind} ")
    assert "[app.serve.test]: stapling good" in lines[3]


async def test_asgi_lifespan_failure_exits_2(pki, responder, tmp_path, capsys) -> None:
    leaf = pki.issue_leaf("app.serve.test", ocsp_url=responder.url)
    config = ServeConfig(
        certs=[files(tmp_path, leaf)], host=HOST, port=0, cache_dir=None,
        app="tests.serve_apps:failing_startup",
    )  # fmt: skip
    ready: asyncio.Future[Serving] = asyncio.get_running_loop().create_future()
    assert await serve(config, out=io.StringIO(), ready=ready, stop=asyncio.Event()) == 2
    with pytest.raises(RuntimeError, match="the ASGI app could not start"):
        ready.result()
    assert "staple serve: the ASGI app could not start" in capsys.readouterr().err


# -- what --app refuses --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests.serve_apps", "expected MODULE:ATTRIBUTE"),
        ("tests.no_such_module:app", "no module named 'tests.no_such_module'"),
        ("tests.serve_apps:missing", "tests.serve_apps has no attribute 'missing'"),
        ("tests.serve_apps:not_an_app", "is neither an aiohttp.web.Application, an ASGI app"),
        ("tests.serve_apps:make_nothing", "the factory returned int 42, not an aiohttp"),
        (
            "tests.serve_apps_broken:app",
            "importing tests.serve_apps_broken failed: RuntimeError: this module is broken",
        ),
    ],
)
async def test_bad_app_exits_2(pki, tmp_path, capsys, spec, message) -> None:
    chain, key = files(tmp_path, pki.issue_leaf("localhost"))
    argv = ["serve", "--app", spec, "--cert", str(chain), "--key", str(key), "--port", "0"]
    assert await cli.run([*argv, "--no-cache"], out=io.StringIO()) == 2
    err = capsys.readouterr().err
    assert f"staple serve: --app {spec}" in err
    assert message in err


async def test_app_with_static_exits_2(pki, tmp_path, capsys) -> None:
    chain, key = files(tmp_path, pki.issue_leaf("localhost"))
    argv = ["serve", "--app", "tests.serve_apps:aiohttp_app", "--static", str(tmp_path)]
    assert await cli.run([*argv, "--cert", str(chain), "--key", str(key)]) == 2
    assert "with --app, serve them from your application" in capsys.readouterr().err


async def test_asgi_app_without_uvicorn_names_the_extra(pki, tmp_path, capsys, monkeypatch):
    for package, name in ((staple.cli, "serve_asgi"), (staple, "uvicorn")):
        monkeypatch.delitem(sys.modules, f"{package.__name__}.{name}", raising=False)
        monkeypatch.delattr(package, name, raising=False)  # `from . import` looks here first
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` raises ImportError
    chain, key = files(tmp_path, pki.issue_leaf("localhost"))
    argv = ["serve", "--app", "tests.serve_apps:asgi_app", "--no-cache", "--port", "0"]
    assert await cli.run([*argv, "--cert", str(chain), "--key", str(key)]) == 2
    err = capsys.readouterr().err
    assert "is an ASGI application, served with uvicorn" in err
    assert "pip install 'ocsp-staple[asgi]'" in err


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_bad_app_in_a_real_process_exits_2(pki, tmp_path, workers) -> None:
    """Through the console entry point; with workers, before forking any."""
    chain, key = files(tmp_path, pki.issue_leaf("localhost"))
    command = staple_serve(chain, key, "--app", "nowhere:app", "--workers", workers)
    async with server_process(*command) as server:
        assert await server.wait() == 2
    assert "staple serve: --app nowhere:app: no module named 'nowhere'" in server.output
    assert "worker" not in server.output


async def test_module_from_the_current_directory(pki, tmp_path, capsys) -> None:
    """As uvicorn and gunicorn do: ``--app`` imports from where the command runs."""
    (tmp_path / "here_app.py").write_text("raise RuntimeError('imported from the cwd')\n")
    chain, key = files(tmp_path, pki.issue_leaf("localhost"))
    argv = ["serve", "--app", "here_app:app", "--cert", str(chain), "--key", str(key)]
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        assert await cli.run([*argv, "--no-cache"], out=io.StringIO()) == 2
    finally:
        os.chdir(cwd)
        sys.modules.pop("here_app", None)
    assert "RuntimeError: imported from the cwd" in capsys.readouterr().err


# -- --workers N: one fetch for all, restarts, stop -----------------------------------------------


@pytest.mark.external
async def test_workers_fetch_once_and_a_killed_worker_is_replaced(
    pki, responder, tmp_path, ca_file
) -> None:
    """Two workers start together while the responder takes a second: one asks, the other
    waits on the cache directory's lock and adopts. SIGKILL one: the parent starts another,
    which staples from the cache without asking. SIGTERM stops them all, exit 0."""
    responder.fault = Fault.SLOW
    responder.slow_seconds = 1.0
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    chain, key = files(tmp_path, leaf)
    command = staple_serve(
        chain, key, "--app", "tests.serve_apps:aiohttp_app", "--workers", "2",
        "--cache-dir", str(tmp_path / "cache"),
    )  # fmt: skip
    async with server_process(*command) as server:
        port = await listening(server)
        await server.wait_for(WORKER_GOOD, count=2)
        first = worker_pids(server)
        assert len(first) == 2, server.output
        assert responder.requests == 1  # one request for both workers
        answered = set()
        for _ in range(6):
            code, body = await curl(port, ca_file)
            assert code == 0, body
            answered.add(int(body.split("pid ")[1].split(",")[0]))
        assert answered <= first
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        await server.wait_for(rf"^worker {victim} was killed by SIGKILL; starting another")
        await server.wait_for(WORKER_GOOD, count=3)
        replacement = worker_pids(server) - first
        assert len(replacement) == 1, server.output
        assert responder.requests == 1  # stapled from the cache
        code, body = await curl(port, ca_file)
        assert code == 0, body
        await stopped_cleanly(server)
    assert not server.matches(r"could not start")


@pytest.mark.external
async def test_workers_without_the_shared_lock_each_fetch(pki, responder, tmp_path, ca_file):
    """The broken twin: --no-cache gives each worker a memory store of its own, and no lock to
    share: both ask the responder."""
    responder.fault = Fault.SLOW
    responder.slow_seconds = 1.0
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    command = staple_serve(
        *files(tmp_path, leaf), "--app", "tests.serve_apps:aiohttp_app", "--workers", "2",
        "--no-cache",
    )  # fmt: skip
    async with server_process(*command) as server:
        port = await listening(server)
        await server.wait_for(WORKER_GOOD, count=2)
        assert len(worker_pids(server)) == 2
        assert responder.requests == 2
        code, body = await curl(port, ca_file)
        assert code == 0, body
        await stopped_cleanly(server)


@pytest.mark.external
async def test_asgi_workers_stop_on_sigint(pki, responder, tmp_path, ca_file) -> None:
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    command = staple_serve(
        *files(tmp_path, leaf), "--app", "tests.serve_apps:asgi_app", "--workers", "2",
        "--cache-dir", str(tmp_path / "cache"), "--loop", "auto",  # uvloop when installed
    )  # fmt: skip
    async with server_process(*command) as server:
        port = await listening(server)
        await server.wait_for(WORKER_GOOD, count=2)
        assert responder.requests == 1
        code, body = await curl(port, ca_file)
        assert code == 0 and json.loads(body)["scheme"] == "https", body
        await stopped_cleanly(server, signal.SIGINT)
    # Each worker's lifespan shut down. (Seen once with one line: what did the server say?)
    assert len(server.matches(r"^app: shutdown")) == 2, server.output


async def test_workers_that_cannot_start_exit_2(pki, responder, tmp_path) -> None:
    """A key that does not match its certificate: the parent stops instead of respawning."""
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    other = pki.issue_leaf("localhost", ocsp_url=responder.url)
    chain, _ = files(tmp_path, leaf)
    _, other_key = files(tmp_path, other, "other")
    command = staple_serve(chain, other_key, "--workers", "2", "--no-cache")
    async with server_process(*command) as server:
        assert await server.wait() == 2, server.output
    assert server.matches(r"could not start; stopping"), server.output
    assert not server.matches(r"starting another")


# -- the example -----------------------------------------------------------------------------


@pytest.mark.external
@pytest.mark.parametrize(
    ("attr", "expected"),
    [("app", "hello over https, 1 certificate(s) stapled\n"), ("asgi_app", "hello over https\n")],
)
async def test_example_as_its_docstring_runs_it(
    pki, responder, tmp_path, ca_file, attr, expected
) -> None:
    """``cd examples && staple serve --app serve_app:...``: the console script, importing the
    app from the current directory."""
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    chain, key = files(tmp_path, leaf)
    script = Path(sys.executable).parent / "staple"
    command = (
        "sh", "-c", 'cd examples && exec "$@"', "sh",
        str(script), "serve", "--app", f"serve_app:{attr}", "--cert", str(chain),
        "--key", str(key), "--host", HOST, "--port", "0", "--workers", "2",
        "--cache-dir", str(tmp_path / "cache"),
    )  # fmt: skip
    async with server_process(*command) as server:
        port = await listening(server)
        await server.wait_for(WORKER_GOOD, count=2)
        code, body = await curl(port, ca_file)
        assert (code, body) == (0, expected)
        await stopped_cleanly(server)
