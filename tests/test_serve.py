"""``staple serve`` against real clients: openssl s_client, curl, gnutls-cli, and staple's own
probe, over real handshakes on 127.0.0.1.

The server runs in-process (the :func:`staple.cli.serve.serve` coroutine on the test's loop, the
OCSP responder from :mod:`staple.testing` beside it) and once as a real ``python -m staple
serve`` subprocess stopped by a signal. Tests needing an external program are marked
``external``: skipped when it is missing, except under ``CI=true``, where that fails.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from email.utils import formatdate
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509

import staple
from staple import RefreshPolicy, cli, static_files, tls_socket
from staple.aiohttp import MAX_HANDSHAKES
from staple.cli import demo
from staple.cli.serve import ServeConfig, Serving, describe_loop, loop_factory, serve
from staple.probe import probe
from staple.static_files import SMALL_FILE, SmallFiles
from staple.status_page import render_page, status_of
from staple.testing import Fault, Leaf, OcspResponder, TestPKI

from .external import require
from .test_aiohttp import Gate

pytestmark = pytest.mark.real_clock

HOST = "127.0.0.1"
CURL_BAD_STAPLE = 91  # CURLE_SSL_INVALIDCERTSTATUS (Debian curl 7.88)
QUICK = RefreshPolicy(wait_timeout=5.0, fetch_timeout=5.0, connect_timeout=2.0)


# -- fixtures and helpers ----------------------------------------------------------------------


def files(tmp_path: Path, leaf: Leaf, name: str) -> tuple[Path, Path]:
    chain, key = tmp_path / f"{name}.chain.pem", tmp_path / f"{name}.key.pem"
    leaf.write_chain(chain)
    leaf.write_key(key)
    return chain, key


@asynccontextmanager
async def running(config: ServeConfig, out: io.StringIO | None = None) -> AsyncIterator[Serving]:
    """``staple serve`` on this loop until the block ends; it must then exit 0."""
    out = out if out is not None else io.StringIO()
    ready: asyncio.Future[Serving] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, out=out, ready=ready, stop=stop))
    try:
        serving = await asyncio.wait_for(ready, 30)
        yield serving
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0


@asynccontextmanager
async def serve_process(*args: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """``python -m staple serve --port 0 ARGS`` as a user runs it: yields the process and its
    port once it says it listens; kills it if the block leaves it running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "staple", "serve", "--port", "0", *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), 30)
        match = re.fullmatch(rb"listening on https://127\.0\.0\.1:(\d+)\n", first)
        assert match, first
        yield proc, int(match.group(1))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()


async def stopped_cleanly(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    """Send ``sig``; the process must exit 0 without a traceback."""
    proc.send_signal(sig)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    assert b"Traceback" not in err


def config_for(tmp_path: Path, *certs: tuple[Path, Path], **options) -> ServeConfig:
    options.setdefault("cache_dir", tmp_path / "cache")
    options.setdefault("policy", QUICK)
    return ServeConfig(certs=list(certs), host=HOST, port=0, **options)


async def run_tool(*argv: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.communicate()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def s_client(port: int, servername: str, *args: str) -> str:
    _, out, err = await run_tool(
        require("openssl"), "s_client", "-connect", f"{HOST}:{port}", "-servername", servername,
        *args,
    )  # fmt: skip
    return out + err


async def curl(port: int, name: str, ca: Path, *args: str, path: str = "/") -> tuple[int, str]:
    code, out, err = await run_tool(
        require("curl"), "-sS", "--cert-status", "--cacert", str(ca),
        "--resolve", f"{name}:{port}:{HOST}", *args, f"https://{name}:{port}{path}",
    )  # fmt: skip
    return code, out + err


async def gnutls_cli(gnutls: str, port: int, name: str, ca: Path) -> tuple[int, str, str]:
    return await run_tool(
        gnutls, "--ocsp", "--x509cafile", str(ca), "-p", str(port),
        "--sni-hostname", name, "--verify-hostname", name, HOST,
    )  # fmt: skip


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - polling the server's counters
            await asyncio.sleep(0.01)


def served_certificate(s_client_output: str) -> x509.Certificate:
    match = re.search(
        r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", s_client_output, re.S
    )
    assert match, s_client_output
    return x509.load_pem_x509_certificate(match.group(0).encode())


def staple_serial(s_client_output: str) -> int:
    match = re.search(r"Serial Number: ([0-9A-F]+)", s_client_output)
    assert match, s_client_output
    return int(match.group(1), 16)


def assert_stapled(output: str, leaf: Leaf, status: str = "good") -> None:
    assert "OCSP Response Status: successful" in output, output
    assert f"Cert Status: {status}" in output, output
    assert served_certificate(output) == leaf.cert
    assert staple_serial(output) == leaf.cert.serial_number


# -- openssl s_client, curl, gnutls-cli ------------------------------------------------------


@pytest.mark.external
@pytest.mark.parametrize("key_type", ["ec", "rsa"])
async def test_s_client_tls12_and_tls13(pki, responder, tmp_path, key_type) -> None:
    require("openssl")
    leaf = pki.issue_leaf("serve.test", key_type=key_type, ocsp_url=responder.url)
    async with running(config_for(tmp_path, files(tmp_path, leaf, "leaf"))) as serving:
        for flag, version in (("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")):
            output = await s_client(serving.port, "serve.test", "-status", flag)
            assert_stapled(output, leaf)
            assert f"Protocol  : {version}" in output or f"New, {version}" in output
        assert serving.stapler.stapled == 2
        assert responder.requests == 1  # fetched once at start, not per handshake
        # Each connection's reference to the stapled context is released when it closes.
        await wait_until(lambda: serving.stapler.live_references == 0)


@pytest.mark.external
@pytest.mark.parametrize("key_type", ["ec", "rsa"])
async def test_curl_verifies_the_staple_and_reads_the_page(
    pki, responder, tmp_path, ca_file, key_type
) -> None:
    require("curl")
    leaf = pki.issue_leaf("serve.test", key_type=key_type, ocsp_url=responder.url)
    async with running(config_for(tmp_path, files(tmp_path, leaf, "leaf"))) as serving:
        code, page = await curl(serving.port, "serve.test", ca_file)
        assert code == 0, page
        assert "<td>" in page and ">good</span>" in page and "CN=serve.test" in page
        code, text = await curl(serving.port, "serve.test", ca_file, path="/status.json")
        assert code == 0, text
        status = json.loads(text)
        assert status["certificates"][0]["status"] == "good"
        assert status["stapled"] == 2


@pytest.mark.external
async def test_gnutls_cli(pki, responder, tmp_path, ca_file) -> None:
    gnutls = require("gnutls-cli")
    leaf = pki.issue_leaf("serve.test", ocsp_url=responder.url, must_staple=True)
    async with running(config_for(tmp_path, files(tmp_path, leaf, "leaf"))) as serving:
        code, out, err = await gnutls_cli(gnutls, serving.port, "serve.test", ca_file)
    assert code == 0, out + err
    assert "The certificate is trusted" in out
    assert re.search(r"- Options: .*OCSP status request", out), out


@pytest.mark.external
async def test_gnutls_cli_refuses_must_staple_without_staple(
    pki, responder, tmp_path, ca_file
) -> None:
    """The broken pair: a must-staple leaf whose responder never answered is not trusted."""
    gnutls = require("gnutls-cli")
    leaf = pki.issue_leaf("localhost", ocsp_url=responder.url, must_staple=True)
    responder.fault = Fault.DOWN
    policy = RefreshPolicy(wait_timeout=0.5, fetch_timeout=1.0, connect_timeout=1.0)
    config = config_for(tmp_path, files(tmp_path, leaf, "leaf"), policy=policy)
    async with running(config) as serving:
        code, out, _ = await gnutls_cli(gnutls, serving.port, "localhost", ca_file)
    assert code != 0
    assert "The certificate is NOT trusted" in out
    assert "OCSP status request" not in out


# -- several certificates on one server --------------------------------------------------------


@pytest.mark.external
async def test_two_sni_names_each_get_their_own_staple(pki, responder, tmp_path, ca_file) -> None:
    a = pki.issue_leaf("a.serve.test", ocsp_url=responder.url)
    b = pki.issue_leaf("b.serve.test", key_type="rsa", ocsp_url=responder.url)
    config = config_for(tmp_path, files(tmp_path, a, "a"), files(tmp_path, b, "b"))
    async with running(config) as serving:
        for name, leaf in (("a.serve.test", a), ("b.serve.test", b)):
            assert_stapled(await s_client(serving.port, name, "-status"), leaf)
            code, page = await curl(serving.port, name, ca_file)
            assert code == 0, page
            assert f"SNI {name}" in page  # the page says which certificate this connection got
        assert {h.cert for h in serving.handles} == {a.cert, b.cert}


@pytest.mark.external
@pytest.mark.parametrize("flag", ["-tls1_2", "-tls1_3"])
async def test_rsa_and_ecdsa_on_one_name(pki, responder, tmp_path, flag) -> None:
    """OpenSSL picks the certificate by the client's signature algorithms; the staple must be
    the one for the certificate actually served."""
    rsa_leaf = pki.issue_leaf("dual.serve.test", key_type="rsa", ocsp_url=responder.url)
    ec_leaf = pki.issue_leaf("dual.serve.test", key_type="ec", ocsp_url=responder.url)
    config = config_for(tmp_path, files(tmp_path, rsa_leaf, "rsa"), files(tmp_path, ec_leaf, "ec"))
    async with running(config) as serving:
        for sigalgs, leaf in (("RSA-PSS+SHA256", rsa_leaf), ("ECDSA+SHA256", ec_leaf)):
            output = await s_client(
                serving.port, "dual.serve.test", "-status", flag, "-sigalgs", sigalgs
            )
            assert_stapled(output, leaf)


# -- revoked, cached, unasked ------------------------------------------------------------------


@pytest.mark.external
async def test_revoked_leaf(pki, responder, tmp_path, ca_file) -> None:
    leaf = pki.issue_leaf("revoked.serve.test", ocsp_url=responder.url)
    responder.revoke(leaf)
    out = io.StringIO()
    async with running(config_for(tmp_path, files(tmp_path, leaf, "leaf")), out) as serving:
        assert "stapling revoked" in out.getvalue()
        code, text = await curl(serving.port, "revoked.serve.test", ca_file)
        assert code == CURL_BAD_STAPLE, text
        output = await s_client(serving.port, "revoked.serve.test", "-status")
        assert_stapled(output, leaf, "revoked")
        result = await probe(HOST, serving.port, servername="revoked.serve.test")
        assert result.code == 1 and result.status == "revoked"


async def test_warm_cache_staples_first_handshake_while_responder_down(
    pki, responder, tmp_path
) -> None:
    leaf = pki.issue_leaf("cached.serve.test", ocsp_url=responder.url)
    config = config_for(tmp_path, files(tmp_path, leaf, "leaf"))
    async with running(config):
        pass  # fills the FileStore
    assert list((tmp_path / "cache").glob("*.ocsp"))
    responder.fault = Fault.DOWN
    before = responder.requests
    out = io.StringIO()
    async with running(config, out) as serving:
        result = await probe(HOST, serving.port, servername="cached.serve.test")
        assert result.code == 0, result.lines()
        assert serving.stapler.stapled == 1
    assert "stapling good" in out.getvalue()
    assert responder.requests == before  # not even asked: the cached response is fresh


async def test_cold_cache_responder_down_serves_unstapled(pki, responder, tmp_path) -> None:
    """The broken pair of the warm-cache test: nothing cached, nothing to staple."""
    leaf = pki.issue_leaf("cold.serve.test", ocsp_url=responder.url)
    responder.fault = Fault.DOWN
    policy = RefreshPolicy(wait_timeout=0.5, fetch_timeout=1.0, connect_timeout=1.0)
    config = config_for(tmp_path, files(tmp_path, leaf, "leaf"), policy=policy)
    out = io.StringIO()
    async with running(config, out) as serving:
        result = await probe(HOST, serving.port, servername="cold.serve.test")
        assert result.code == 3, result.lines()
    assert "NO STAPLE" in out.getvalue()


@pytest.mark.external
async def test_client_without_status_request(pki, responder, tmp_path) -> None:
    leaf = pki.issue_leaf("plain.serve.test", ocsp_url=responder.url)
    async with running(config_for(tmp_path, files(tmp_path, leaf, "leaf"))) as serving:
        output = await s_client(serving.port, "plain.serve.test")
        assert served_certificate(output) == leaf.cert
        assert "OCSP response" not in output and "Cert Status" not in output
        assert serving.stapler.stapled == 0
        assert serving.stapler.live_references == 0
        # The server is none the worse: the next client that asks gets its staple.
        assert_stapled(await s_client(serving.port, "plain.serve.test", "-status"), leaf)
        assert serving.stapler.stapled == 1


# -- files and the page --------------------------------------------------------------------


@pytest.fixture
def big_static(tmp_path: Path) -> tuple[Path, str]:
    """A directory with a 50 MiB random file, and the file's SHA-256."""
    static = tmp_path / "static"
    static.mkdir()
    digest = hashlib.sha256()
    with open(static / "big.bin", "wb") as f:
        for _ in range(50):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            f.write(chunk)
    return static, digest.hexdigest()


@pytest.mark.external
@pytest.mark.slow
async def test_static_file_50mb_byte_identical(
    pki, responder, tmp_path, ca_file, big_static
) -> None:
    require("curl")
    static, sha256 = big_static
    leaf = pki.issue_leaf("files.serve.test", ocsp_url=responder.url)
    config = config_for(tmp_path, files(tmp_path, leaf, "leaf"), static=static)
    async with running(config) as serving:
        target = tmp_path / "download.bin"
        code, text = await curl(
            serving.port, "files.serve.test", ca_file, "-o", str(target), path="/static/big.bin"
        )
        assert code == 0, text
    assert target.stat().st_size == 50 << 20
    assert hashlib.sha256(target.read_bytes()).hexdigest() == sha256


async def test_page_over_tls(pki, responder, tmp_path) -> None:
    """The page and its JSON twin, read by aiohttp's client (stdlib ssl) — no external tool."""
    leaf = pki.issue_leaf("page.serve.test", ocsp_url=responder.url)
    ctx = ssl.create_default_context()
    pki.configure_trust(ctx)
    config = config_for(tmp_path, files(tmp_path, leaf, "leaf"))
    async with (
        running(config) as serving,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, force_close=True)) as session,
    ):
        base = f"https://{HOST}:{serving.port}"
        async with session.get(base + "/", server_hostname="page.serve.test") as response:
            assert response.status == 200
            assert response.content_type == "text/html"
            page = await response.text()
        async with session.get(base + "/status.json", server_hostname="page.serve.test") as r:
            status = await r.json()
        async with session.get(base + "/static/x", server_hostname="page.serve.test") as r:
            assert r.status == 404  # no --static
    assert "CN=page.serve.test" in page and ">good</span>" in page
    (info,) = status["certificates"]
    assert info["stapling"] is True and info["status"] == "good"
    assert info["names"] == ["page.serve.test"]
    assert info["next_update"] > info["this_update"]


def test_page_escapes_everything() -> None:
    evil = "<script>alert(1)</script>&"
    statuses = [
        {
            "certificate": f"serial 0x1 (CN={evil})",
            "names": [evil],
            "stapling": False,
            "status": None,
            "this_update": None,
            "next_update": None,
            "next_refresh": evil,
            "reason": evil,
        }
    ]
    page = render_page(statuses, stapled=3, connection=evil)
    assert "<script>" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;&amp;") == 5
    assert "3 handshake(s) stapled" in page


# -- static files from memory ------------------------------------------------------------------


STAMP = 1_700_000_000


@pytest.fixture
def static_tree(tmp_path: Path) -> Path:
    """``static/`` with files either side of SMALL_FILE, a subdirectory, symlinks inside and
    leading out, a precompressed sibling; and ``secret.txt`` beside it, never to be served."""
    (tmp_path / "secret.txt").write_bytes(b"SECRET")
    static = tmp_path / "static"
    (static / "sub").mkdir(parents=True)
    contents = {
        "small.bin": os.urandom(10_000),
        "edge.bin": os.urandom(SMALL_FILE),
        "over.bin": os.urandom(SMALL_FILE + 1),
        "big.bin": os.urandom(1 << 20),
        "hello.txt": b"hello\n",
        "empty.txt": b"",
        "archive.tar.gz": os.urandom(100),
        "app.js": b"console.log(1)\n",
        "app.js.gz": gzip.compress(b"console.log(1)\n"),
        "sub/inner.txt": b"inner\n",
    }
    for name, data in contents.items():
        (static / name).write_bytes(data)
    os.utime(static / "empty.txt", (STAMP, STAMP))  # a whole second: If-Modified-Since's edge
    (static / "link.txt").symlink_to("hello.txt")  # inside the root: served, as aiohttp does
    (static / "escape.txt").symlink_to(tmp_path / "secret.txt")
    (static / "outside").symlink_to(tmp_path)
    return static


@dataclass(frozen=True)
class Reply:
    status: int
    headers: tuple[tuple[str, str], ...]  # sorted, without Date
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


async def http(
    port: int, method: str, target: str, *headers: str, ctx: ssl.SSLContext | None = None
) -> Reply:
    """One HTTP/1.1 request written byte for byte (no client normalises ``target``)."""
    reader, writer = await asyncio.open_connection(
        HOST, port, ssl=ctx, server_hostname="files.serve.test" if ctx else None
    )
    request = [f"{method} {target} HTTP/1.1", "Host: files.serve.test", "Connection: close"]
    writer.write("\r\n".join([*request, *headers, "", ""]).encode("latin-1"))
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    fields = (tuple(line.split(": ", 1)) for line in lines)
    kept = tuple(sorted((k, v) for k, v in fields if k.lower() != "date"))
    return Reply(int(status_line.split()[1]), kept, body)


@asynccontextmanager
async def aiohttp_static(static: Path) -> AsyncIterator[int]:
    """aiohttp's own ``add_static`` (all ``staple serve`` had before), over plain HTTP."""
    app = web.Application()
    app.router.add_static("/static/", static, show_index=True)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, HOST, 0).start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@asynccontextmanager
async def serving_files(
    pki: TestPKI, responder: OcspResponder, tmp_path: Path, static: Path
) -> AsyncIterator[tuple[Serving, SmallFiles, ssl.SSLContext]]:
    leaf = pki.issue_leaf("files.serve.test", ocsp_url=responder.url)
    ctx = ssl.create_default_context()
    pki.configure_trust(ctx)
    async with running(config_for(tmp_path, files(tmp_path, leaf, "leaf"), static=static)) as s:
        assert s.files is not None
        yield s, s.files, ctx


async def test_static_answers_as_aiohttp_does(pki, responder, tmp_path, static_tree) -> None:
    """Request for request: the status, headers (but Date) and bytes of aiohttp's own static
    route, small files answered from memory, everything else left to FileResponse."""
    hello = (static_tree / "hello.txt").stat()
    etag = f'"{hello.st_mtime_ns:x}-{hello.st_size:x}"'
    later = formatdate(hello.st_mtime + 3600, usegmt=True)
    earlier = formatdate(hello.st_mtime - 3600, usegmt=True)
    stamp, stamp_1 = formatdate(STAMP, usegmt=True), formatdate(STAMP - 1, usegmt=True)
    inm_wins = ('If-None-Match: "x"', f"If-Modified-Since: {later}")  # IMS then ignored
    # method, target, request headers, expected status, answered from memory
    cases: list[tuple[str, str, tuple[str, ...], int, bool]] = [
        ("GET", "/static/small.bin", (), 200, True),
        ("HEAD", "/static/small.bin", (), 200, True),
        ("GET", "/static/edge.bin", (), 200, True),  # exactly SMALL_FILE
        ("GET", "/static/over.bin", (), 200, False),
        ("GET", "/static/big.bin", (), 200, False),
        ("HEAD", "/static/big.bin", (), 200, False),
        ("GET", "/static/empty.txt", (), 200, True),
        ("GET", "/static/archive.tar.gz", (), 200, True),
        ("GET", "/static/sub/inner.txt", (), 200, True),
        ("GET", "/static/sub/../hello.txt", (), 200, True),
        ("GET", "/static/link.txt", (), 200, True),
        ("GET", "/static/outside/static/hello.txt", (), 200, True),  # out and back in
        ("GET", "/static/hello.txt", (f"If-None-Match: {etag}",), 304, True),
        ("HEAD", "/static/hello.txt", (f"If-None-Match: {etag}",), 304, True),
        ("GET", "/static/hello.txt", (f"If-None-Match: W/{etag}",), 304, True),
        ("GET", "/static/hello.txt", ('If-None-Match: "x", ' + etag,), 304, True),
        ("GET", "/static/hello.txt", ("If-None-Match: *",), 304, True),
        ("GET", "/static/hello.txt", ('If-None-Match: "x"',), 200, True),
        ("GET", "/static/hello.txt", inm_wins, 200, True),
        ("GET", "/static/hello.txt", (f"If-Modified-Since: {later}",), 304, True),
        ("GET", "/static/hello.txt", (f"If-Modified-Since: {earlier}",), 200, True),
        ("GET", "/static/hello.txt", ("If-Modified-Since: garbage",), 200, True),
        ("GET", "/static/empty.txt", (f"If-Modified-Since: {stamp}",), 304, True),
        ("GET", "/static/empty.txt", (f"If-Modified-Since: {stamp_1}",), 200, True),
        ("GET", "/static/hello.txt", ("Range: bytes=1-3",), 206, False),
        ("GET", "/static/hello.txt", ("Range: bytes=-2",), 206, False),
        ("GET", "/static/hello.txt", ("Range: bytes=100-",), 416, False),
        ("GET", "/static/hello.txt", ('If-Match: "x"',), 412, False),
        ("GET", "/static/hello.txt", (f"If-Unmodified-Since: {earlier}",), 412, False),
        ("GET", "/static/app.js", (), 200, True),
        ("GET", "/static/app.js", ("Accept-Encoding: gzip, br",), 200, False),  # app.js.gz
        ("GET", "/static/", (), 200, False),
        ("GET", "/static/sub/", (), 200, False),
        ("HEAD", "/static/sub", (), 200, False),
        ("GET", "/static/missing.txt", (), 404, False),
        ("POST", "/static/small.bin", (), 405, False),
    ]  # fmt: skip
    async with (
        serving_files(pki, responder, tmp_path, static_tree) as (serving, memory, ctx),
        aiohttp_static(static_tree) as plain,
    ):
        for method, target, headers, status, from_memory in cases:
            before = memory.served
            ours = await http(serving.port, method, target, *headers, ctx=ctx)
            theirs = await http(plain, method, target, *headers)
            assert ours == theirs, (method, target, headers)
            assert ours.status == status, (method, target, headers)
            assert memory.served - before == from_memory, (method, target, headers)
        # Spot checks that the comparison compares something.
        small = await http(serving.port, "GET", "/static/small.bin", ctx=ctx)
        assert small.body == (static_tree / "small.bin").read_bytes()
        assert small.header("Content-Length") == "10000"
        assert small.header("ETag") is not None and small.header("Last-Modified") is not None
        assert (await http(serving.port, "HEAD", "/static/small.bin", ctx=ctx)).body == b""
        index = await http(serving.port, "GET", "/static/", ctx=ctx)
        assert b'<a href="/static/sub">sub/</a>' in index.body
        gz = await http(serving.port, "GET", "/static/app.js", "Accept-Encoding: gzip", ctx=ctx)
        assert gz.header("Content-Encoding") == "gzip"


async def test_static_traversal_is_refused(pki, responder, tmp_path, static_tree) -> None:
    """``..`` plain or encoded, absolute paths, NUL, symlinks leading out: 404, as aiohttp's
    static route answers; the file beside the root is never sent, nor anything kept."""
    targets = [
        "/static/../secret.txt",
        "/static/%2e%2e/secret.txt",
        "/static/%2E%2E/secret.txt",
        "/static/..%2fsecret.txt",
        "/static/sub/..%2F..%2Fsecret.txt",
        "/static/sub/%2e%2e/%2e%2e/secret.txt",
        "/static/%2F..%2Fsecret.txt",
        "/static//etc/passwd",
        f"/static/{tmp_path / 'secret.txt'}",
        "/static/escape.txt",
        "/static/outside/secret.txt",
        "/static/hello.txt%00",
        "/static/hello.txt%00.png",
    ]
    async with (
        serving_files(pki, responder, tmp_path, static_tree) as (serving, memory, ctx),
        aiohttp_static(static_tree) as plain,
    ):
        for target in targets:
            for method in ("GET", "HEAD"):
                ours = await http(serving.port, method, target, ctx=ctx)
                assert ours.status in (403, 404), (method, target, ours)
                assert b"SECRET" not in ours.body
                assert ours == await http(plain, method, target), (method, target)
        assert memory.served == 0 and len(memory) == 0


async def test_an_edit_is_served_at_once(pki, responder, tmp_path, static_tree) -> None:
    """A file just written is served from memory but not kept (its timestamps may not have
    ticked yet), so even a same-size rewrite right after a request is seen."""
    path = static_tree / "hello.txt"
    async with serving_files(pki, responder, tmp_path, static_tree) as (serving, memory, ctx):
        for content in (b"first\n", b"again\n", b"AGAIN\n", b"longer now\n", b""):
            path.write_bytes(content)
            assert (await http(serving.port, "GET", "/static/hello.txt", ctx=ctx)).body == content
        assert memory.served == 5 and len(memory) == 0


async def test_kept_files_are_checked_on_every_request(
    pki, responder, tmp_path, static_tree, monkeypatch
) -> None:
    """Once kept, a file is served only while ``os.stat`` says it is the same file: a new size,
    a new mtime, a new inode (rename over it) or its removal are seen by the next request; a
    path later turned into a symlink leading out is refused."""
    monkeypatch.setattr(static_files, "SETTLED_NS", 0)  # keep every file at once, however fresh
    path = static_tree / "hello.txt"

    async with serving_files(pki, responder, tmp_path, static_tree) as (serving, memory, ctx):

        async def get() -> Reply:
            return await http(serving.port, "GET", "/static/hello.txt", ctx=ctx)

        assert (await get()).body == b"hello\n"
        assert (await get()).body == b"hello\n"
        assert (len(memory), memory.size, memory.served) == (1, 6, 2)

        path.write_bytes(b"hello, world\n")  # a new size
        assert (await get()).body == b"hello, world\n"
        mtime = path.stat().st_mtime_ns
        path.write_bytes(b"HELLO, WORLD\n")  # same size; a tick may not have passed: set one
        os.utime(path, ns=(mtime + 1_000_000, mtime + 1_000_000))
        assert (await get()).body == b"HELLO, WORLD\n"
        st = path.stat()
        replacement = static_tree / "hello.new"
        replacement.write_bytes(b"howdy, world\n")  # same size and mtime, another inode
        os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(replacement, path)
        reply = await get()
        assert reply.body == b"howdy, world\n"
        assert reply.header("ETag") == f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
        assert (len(memory), memory.size) == (1, 13)

        path.unlink()
        assert (await get()).status == 404
        assert (len(memory), memory.size) == (0, 0)

        path.write_bytes(b"back\n")
        assert (await get()).body == b"back\n"
        assert len(memory) == 1
        path.unlink()
        path.symlink_to(tmp_path / "secret.txt")
        reply = await get()
        assert reply.status == 404 and b"SECRET" not in reply.body
        assert len(memory) == 0


def test_small_files_stay_within_budget(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(static_files, "SETTLED_NS", 0)
    for name in "abc":
        (tmp_path / name).write_bytes(name.encode() * 10)
    (tmp_path / "eleven").write_bytes(b"x" * 11)
    (tmp_path / "dir").mkdir()
    memory = SmallFiles(tmp_path, max_size=10, budget=25)
    a, b = memory.get("a"), memory.get("b")
    assert a is not None and b is not None and a.body == b"a" * 10
    assert (len(memory), memory.size) == (2, 20)
    assert memory.get("a") is a  # kept: not read again
    c = memory.get("c")  # over budget: b, the least recently served, goes
    assert (len(memory), memory.size) == (2, 20)
    assert memory.get("a") is a and memory.get("c") is c
    b_again = memory.get("b")  # read again; a goes now
    assert b_again is not None and b_again is not b and b_again.body == b"b" * 10
    assert memory.get("c") is c and memory.get("a") is not a
    for name in ("eleven", "dir", "missing", "", "../" + tmp_path.name + "/eleven"):
        assert memory.get(name) is None, name
    assert (len(memory), memory.size) == (2, 20)


# -- event loops -------------------------------------------------------------------------------


@pytest.mark.slow  # a real process
@pytest.mark.parametrize(
    ("loop", "expected"), [("asyncio", "asyncio"), ("uvloop", "uvloop"), ("auto", "uvloop")]
)
async def test_subprocess_on_each_loop(
    pki, responder, tmp_path, static_tree, loop, expected
) -> None:
    """``python -m staple serve --loop ...``: says which loop it runs on, staples, and serves
    small (from memory) and large (FileResponse; uvloop has no loop.sendfile) files whole."""
    if expected == "uvloop":
        pytest.importorskip("uvloop")
    leaf = pki.issue_leaf("files.serve.test", ocsp_url=responder.url)
    chain, key = files(tmp_path, leaf, "leaf")
    ctx = ssl.create_default_context()
    pki.configure_trust(ctx)
    async with serve_process(
        "--cert", str(chain), "--key", str(key), "--cache-dir", str(tmp_path / "cache"),
        "--static", str(static_tree), "--loop", loop,
    ) as (proc, port):  # fmt: skip
        assert proc.stdout is not None
        described = (await asyncio.wait_for(proc.stdout.readline(), 5)).decode()
        assert described.startswith(f"event loop: {expected}"), described
        status = await asyncio.wait_for(proc.stdout.readline(), 5)
        assert b"[files.serve.test]: stapling good" in status
        result = await probe(HOST, port, servername="files.serve.test")
        assert result.code == 0, result.lines()
        for name in ("small.bin", "edge.bin", "over.bin", "big.bin"):
            reply = await http(port, "GET", f"/static/{name}", ctx=ctx)
            assert reply.status == 200
            assert reply.body == (static_tree / name).read_bytes(), name
        await stopped_cleanly(proc, signal.SIGTERM)


async def test_loop_uvloop_when_it_cannot_be_imported(pki, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    assert loop_factory("asyncio") is None
    assert loop_factory("auto") is None  # auto: asyncio's loop, quietly
    assert describe_loop(asyncio.get_running_loop()) == "asyncio (uvloop is not installed)"
    chain, key = files(tmp_path, pki.issue_leaf("noloop.serve.test"), "leaf")
    argv = ["serve", "--loop", "uvloop", "--cert", str(chain), "--key", str(key), "--port", "0"]
    assert await cli.run(argv, out=io.StringIO()) == 2
    err = capsys.readouterr().err
    assert "staple serve: --loop uvloop: uvloop cannot be imported" in err
    assert "pip install 'ocsp-staple[uvloop]'" in err


def test_main_without_uvloop_exits_2(tmp_path, monkeypatch, capsys) -> None:
    """``main`` picks the loop before running; missing uvloop falls through to the message."""
    monkeypatch.setitem(sys.modules, "uvloop", None)
    argv = ["serve", "--loop", "uvloop", "--cert", "c.pem", "--key", "k.pem"]
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert "uvloop cannot be imported" in capsys.readouterr().err


def test_loop_factory_with_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")
    loop = uvloop.new_event_loop()
    try:
        assert loop_factory("uvloop") is uvloop.new_event_loop
        assert loop_factory("auto") is uvloop.new_event_loop
        assert describe_loop(loop) == f"uvloop {uvloop.__version__}"
    finally:
        loop.close()


# -- the command, in-process and as a subprocess -------------------------------------------


async def test_status_lines_and_port_zero(pki, responder, tmp_path) -> None:
    good = pki.issue_leaf("one.serve.test", ocsp_url=responder.url)
    unknown = pki.issue_leaf("two.serve.test", ocsp_url=responder.url)
    responder.set_status(unknown, "unknown")
    policy = RefreshPolicy(wait_timeout=2.0, fetch_timeout=2.0, connect_timeout=1.0)
    config = config_for(
        tmp_path, files(tmp_path, good, "one"), files(tmp_path, unknown, "two"), policy=policy
    )
    out = io.StringIO()
    async with running(config, out) as serving:
        assert serving.port != 0
        assert serving.url == f"https://{HOST}:{serving.port}"
        await serving.handles[0].refresh()  # after the start, every event gets a line
        assert " fetched: " in out.getvalue().splitlines()[-1]
    lines = out.getvalue().splitlines()
    assert lines[0] == f"listening on https://{HOST}:{serving.port}"
    assert lines[1] == "event loop: asyncio"  # the test's own loop
    assert "[one.serve.test]: stapling good, nextUpdate " in lines[2]
    assert "next refresh" in lines[2]
    assert "[two.serve.test]: NO STAPLE: " in lines[3]
    assert "does not know the certificate" in lines[3]


async def test_chains_open_at_once_and_handshakes_are_capped(pki, responder, tmp_path) -> None:
    """``staple serve`` starts through StaplingServer, as run_app does: every chain's first
    fetch in flight at once (the gate answers only then), each site capped."""
    async with Gate(responder, 2) as gate:
        leaves = [pki.issue_leaf(f"{n}.gate.serve.test", ocsp_url=gate.url) for n in ("a", "b")]
        config = config_for(
            tmp_path, *(files(tmp_path, leaf, str(i)) for i, leaf in enumerate(leaves))
        )
        async with running(config) as serving:
            assert gate.most == 2
            assert serving.server is not None
            assert [site.max_handshakes for site in serving.server.sites] == [MAX_HANDSHAKES]
            assert [h.cert for h in serving.handles] == [leaf.cert for leaf in leaves]
            assert [status_of(h)["status"] for h in serving.handles] == ["good", "good"]
            result = await probe(HOST, serving.port, servername="b.gate.serve.test")
            assert result.code == 0, result.lines()


@pytest.mark.parametrize("transport", [None, "socket", "memory"])
async def test_transport_option(pki, responder, tmp_path, transport) -> None:
    """``--transport``: OpenSSL on the socket unless told ``memory``; both staple."""
    leaf = pki.issue_leaf("transport.serve.test", ocsp_url=responder.url)
    config = config_for(tmp_path, files(tmp_path, leaf, "leaf"), transport=transport)
    async with running(config) as serving:
        expected = tls_socket.SocketTLSServer if transport != "memory" else asyncio.Server
        assert [type(server) for server in serving.listeners] == [expected]
        result = await probe(HOST, serving.port, servername="transport.serve.test")
        assert result.code == 0, result.lines()


async def test_start_failures_exit_2(pki, responder, tmp_path, capsys) -> None:
    leaf = pki.issue_leaf("fail.serve.test")  # no AIA: no responder
    chain, key = files(tmp_path, leaf, "leaf")
    other = pki.issue_leaf("other.serve.test", ocsp_url=responder.url)
    _, other_key = files(tmp_path, other, "other")
    cases = [
        ([(tmp_path / "missing.pem", key)], {}, "is not a readable file"),
        ([(chain, key)], {}, "no OCSP responder"),
        ([(chain, other_key)], {"responder": responder.url}, "cannot load certificate"),
        ([(chain, key)], {"static": tmp_path / "nope"}, "is not a directory"),
    ]
    for certs, options, reason in cases:
        config = ServeConfig(certs=certs, port=0, cache_dir=None, policy=QUICK, **options)
        ready: asyncio.Future[Serving] = asyncio.get_running_loop().create_future()
        assert await serve(config, out=io.StringIO(), ready=ready, stop=asyncio.Event()) == 2
        with pytest.raises(RuntimeError, match=reason):
            ready.result()
        assert reason in capsys.readouterr().err
    # Mismatched --cert/--key counts, through the CLI.
    argv = ["serve", "--cert", str(chain), "--cert", str(chain), "--key", str(key)]
    assert await cli.run(argv, out=io.StringIO()) == 2


async def test_port_in_use_exits_2(pki, responder, tmp_path, capsys) -> None:
    leaf = pki.issue_leaf("busy.serve.test", ocsp_url=responder.url)
    config = config_for(tmp_path, files(tmp_path, leaf, "leaf"))
    async with running(config) as serving:
        busy = ServeConfig(
            certs=config.certs, host=HOST, port=serving.port, cache_dir=tmp_path / "cache"
        )
        assert await serve(busy, out=io.StringIO(), stop=asyncio.Event()) == 2
    assert "cannot listen on" in capsys.readouterr().err


@pytest.mark.slow  # a real process
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_subprocess_until_signal(pki, responder, tmp_path, sig) -> None:
    """``python -m staple serve`` as a user runs it; ``--responder`` replaces the missing AIA."""
    leaf = pki.issue_leaf("proc.serve.test")  # no AIA: only --responder says where to ask
    chain, key = files(tmp_path, leaf, "leaf")
    async with serve_process(
        "--cert", str(chain), "--key", str(key), "--cache-dir", str(tmp_path / "cache"),
        "--responder", responder.url,
    ) as (proc, port):  # fmt: skip
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 5)).startswith(b"event loop: ")
        status = await asyncio.wait_for(proc.stdout.readline(), 5)
        assert b"[proc.serve.test]: stapling good" in status
        result = await probe(HOST, port, servername="proc.serve.test")
        assert result.code == 0, result.lines()
        await stopped_cleanly(proc, sig)
    assert responder.log == [("GET", "good")]


async def test_probe_json_through_cli(pki, responder, tmp_path, ca_file) -> None:
    leaf = pki.issue_leaf("json.serve.test", ocsp_url=responder.url)
    async with running(config_for(tmp_path, files(tmp_path, leaf, "leaf"))) as serving:
        out = io.StringIO()
        argv = [
            "probe", f"{HOST}:{serving.port}", "--servername", "json.serve.test",
            "--cafile", str(ca_file), "--json",
        ]  # fmt: skip
        assert await cli.run(argv, out=out) == 0
    info = json.loads(out.getvalue())
    assert info["status"] == "good" and info["chain_verified"] is True
    assert info["remaining_seconds"] > timedelta(hours=23).total_seconds()
    assert info["certificate"] == staple.ocsp.describe(leaf.cert)


# -- staple demo -------------------------------------------------------------------------------


async def test_demo_check_says_what_it_skipped(monkeypatch) -> None:
    real_which = shutil.which

    def which(name: str, *args, **kwargs) -> str | None:
        return None if name in ("curl", "gnutls-cli") else real_which(name, *args, **kwargs)

    monkeypatch.setattr(shutil, "which", which)
    out = io.StringIO()
    assert await cli.run(["demo", "--check"], out=out) == 0
    text = out.getvalue()
    assert "check curl: skipped - curl not installed" in text
    assert "check probe: ok" in text
    assert "SKIPPED: curl (curl not installed), gnutls-cli (gnutls-cli not installed)" in text


async def test_demo_check_fails_when_a_check_fails(monkeypatch) -> None:
    """The broken pair: an "openssl" that shows no staple fails the demo."""
    commands = demo.check_commands

    def broken(port: int, ca: Path) -> dict[str, list[str]]:
        return {**commands(port, ca), "openssl": [sys.executable, "-c", "print('no staple')"]}

    monkeypatch.setattr(demo, "check_commands", broken)
    out = io.StringIO()
    assert await cli.run(["demo", "--check"], out=out) == 1
    text = out.getvalue()
    assert "check openssl: FAILED" in text
    assert "demo checks: FAILED (openssl)" in text


@pytest.mark.slow  # a real process
async def test_demo_serves_until_interrupted() -> None:
    """``staple demo`` (what ``make demo`` runs) as a subprocess: serve, answer, Ctrl-C, exit 0."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "staple", "demo",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[bytes] = []
    try:
        while not lines or lines[-1] != b"Serving until Ctrl-C.\n":
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, b"".join(lines)
            lines.append(line)
        text = b"".join(lines).decode()
        match = re.search(r"listening on https://127\.0\.0\.1:(\d+)", text)
        assert match, text
        port = int(match[1])
        assert f"openssl s_client -connect 127.0.0.1:{port} -servername localhost -status" in text
        assert re.search(rf"curl --cert-status --cacert \S+ca\.pem https://localhost:{port}/", text)
        result = await probe(HOST, port, servername="localhost")
        assert result.code == 0, result.lines()
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err
