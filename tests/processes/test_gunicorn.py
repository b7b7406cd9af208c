"""gunicorn with staple's worker classes, as a real ``gunicorn`` process with two workers.

gunicorn takes the certificate from its own ``--certfile``/``--keyfile``; the workers do the TLS
with staple (a stdlib TLS socket could not staple, so a good ``curl --cert-status`` shows it is
staple's TLS that answered). Each passing case has a broken twin that must fail.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

from staple.testing import Fault, Leaf

from ..server_process import CURL_BAD_STAPLE, ServerProcess, curl, files, server_process

pytestmark = [pytest.mark.slow, pytest.mark.real_clock]

WORKERS = {
    "staple.gunicorn.AiohttpWorker": "tests.asgi_apps:aiohttp_app",
    "staple.gunicorn.UvicornWorker": "tests.asgi_apps:app",
}
LISTENING = r"Listening at: https://127\.0\.0\.1:(\d+) "


def gunicorn(worker: str, *args: str, workers: int = 2) -> tuple[str, ...]:
    return (
        sys.executable, "-m", "gunicorn", WORKERS[worker], "-k", worker, "-w", str(workers),
        "-b", "127.0.0.1:0", "--no-control-socket", "--graceful-timeout", "10", *args,
    )  # fmt: skip


def tls_args(tmp_path: Path, leaf: Leaf) -> tuple[str, ...]:
    chain, key = files(tmp_path, leaf)
    return ("--certfile", str(chain), "--keyfile", str(key))


async def booted(server: ServerProcess, status: str, workers: int = 2) -> int:
    """Wait until every worker says what it staples; the port."""
    port = int((await server.wait_for(LISTENING)).group(1))
    await server.wait_for(status, count=workers)
    return port


async def stopped_cleanly(server: ServerProcess) -> None:
    assert await server.stop(signal.SIGTERM) == 0, server.output
    assert "Traceback" not in server.output
    assert "Exception ignored" not in server.output


@pytest.mark.external
@pytest.mark.parametrize("worker", sorted(WORKERS))
async def test_two_workers_staple(pki, responder, tmp_path, ca_file, worker) -> None:
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    env = {"STAPLE_CACHE_DIR": str(tmp_path / "cache")}
    async with server_process(*gunicorn(worker, *tls_args(tmp_path, leaf)), env=env) as server:
        port = await booted(server, "stapling good")
        for _ in range(4):  # new connections, spread over the workers by the kernel
            code, body = await curl(port, ca_file)
            assert code == 0, body
            assert json.loads(body)["scheme"] == "https"
        await stopped_cleanly(server)
    assert list((tmp_path / "cache").glob("*.ocsp"))  # the store the workers share


@pytest.mark.external
@pytest.mark.parametrize("worker", sorted(WORKERS))
async def test_two_workers_revoked_fails_curl(pki, responder, tmp_path, ca_file, worker) -> None:
    """The broken twin: the workers staple a revocation; curl must refuse every connection."""
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    responder.revoke(leaf)
    env = {"STAPLE_CACHE_DIR": str(tmp_path / "cache")}
    async with server_process(*gunicorn(worker, *tls_args(tmp_path, leaf)), env=env) as server:
        port = await booted(server, "stapling revoked")
        for _ in range(2):
            code, out = await curl(port, ca_file)
            assert code == CURL_BAD_STAPLE, out
        await stopped_cleanly(server)


@pytest.mark.external
@pytest.mark.parametrize("worker", sorted(WORKERS))
async def test_responder_down_fails_curl(pki, responder, tmp_path, ca_file, worker) -> None:
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    responder.fault = Fault.DOWN
    env = {"STAPLE_CACHE_DIR": str(tmp_path / "cache")}
    async with server_process(*gunicorn(worker, *tls_args(tmp_path, leaf)), env=env) as server:
        port = await booted(server, "NO STAPLE")
        code, out = await curl(port, ca_file)
        assert code == CURL_BAD_STAPLE, out
        await stopped_cleanly(server)


@pytest.mark.external
async def test_example_config(pki, responder, tmp_path, ca_file) -> None:
    """``examples/gunicorn_conf.py`` serving ``examples/uvicorn_app.py``, as documented."""
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    chain, key = files(tmp_path, leaf)
    env = {
        "CERTFILE": str(chain),
        "KEYFILE": str(key),
        "BIND": "127.0.0.1:0",
        "STAPLE_CACHE_DIR": str(tmp_path / "cache"),
    }
    command: tuple[str, ...] = (sys.executable, "-m", "gunicorn", "-c", "examples/gunicorn_conf.py")
    command += ("--no-control-socket", "examples.uvicorn_app:app")
    async with server_process(*command, env=env) as server:
        port = await booted(server, "stapling good")
        code, body = await curl(port, ca_file)
        assert (code, body) == (0, "hello over https\n")
        await stopped_cleanly(server)
    # The broken twin: without the certificate the workers refuse to boot.
    env["CERTFILE"] = str(tmp_path / "missing.pem")
    async with server_process(*command, env=env) as server:
        assert await server.wait() != 0
    assert server.matches("missing.pem"), server.output


@pytest.mark.parametrize("worker", sorted(WORKERS))
async def test_without_certfile_the_workers_do_not_boot(tmp_path, worker) -> None:
    env = {"STAPLE_CACHE_DIR": str(tmp_path / "cache")}
    async with server_process(*gunicorn(worker, workers=1), env=env) as server:
        assert await server.wait() != 0
    assert server.matches("pass --certfile CHAIN.pem --keyfile KEY.pem"), server.output


@pytest.mark.external
@pytest.mark.parametrize("worker", sorted(WORKERS))
async def test_redis_store_one_fetch_for_all_workers(
    pki, responder, tmp_path, ca_file, redis_server, worker
) -> None:
    """STAPLE_STORE=redis://: the workers elect one fetcher; the others adopt its response."""
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url)
    env = {"STAPLE_STORE": redis_server.url, "STAPLE_CACHE_DIR": str(tmp_path / "unused")}
    command = gunicorn(worker, *tls_args(tmp_path, leaf), workers=3)
    async with server_process(*command, env=env) as server:
        port = await booted(server, "stapling good", workers=3)
        code, body = await curl(port, ca_file)
        assert code == 0, body
        await stopped_cleanly(server)
    assert responder.requests == 1
    assert not (tmp_path / "unused").exists()
