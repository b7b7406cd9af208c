"""``staple serve`` against real clients: openssl s_client, curl, gnutls-cli, and staple's own
probe, over real handshakes on 127.0.0.1.

The server runs in-process (the :func:`staple._serve.serve` coroutine on the test's loop, the
OCSP responder from :mod:`staple.testing` beside it) and once as a real ``python -m staple
serve`` subprocess stopped by a signal. Tests needing an external program are marked
``external``: skipped when it is missing, except under ``CI=true``, where that fails.
"""

from __future__ import annotations

import asyncio
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
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

import staple
from staple import RefreshPolicy, _cli
from staple._probe import probe
from staple._serve import ServeConfig, Serving, render_page, serve
from staple.testing import Fault, Leaf, OcspResponder, TestPKI

from .external import require

HOST = "127.0.0.1"
CURL_BAD_STAPLE = 91  # CURLE_SSL_INVALIDCERTSTATUS (Debian curl 7.88)
QUICK = RefreshPolicy(wait_timeout=5.0, fetch_timeout=5.0, connect_timeout=2.0)


# -- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki() -> TestPKI:
    return TestPKI()


@pytest.fixture
async def responder(pki: TestPKI) -> AsyncIterator[OcspResponder]:
    async with OcspResponder(pki) as r:
        yield r


@pytest.fixture
def ca_file(pki: TestPKI, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    pki.write_ca_bundle(path)
    return path


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
    assert "[one.serve.test]: stapling good, nextUpdate " in lines[1]
    assert "next refresh" in lines[1]
    assert "[two.serve.test]: NO STAPLE: " in lines[2]
    assert "does not know the certificate" in lines[2]


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
    assert await _cli.run(argv, out=io.StringIO()) == 2


async def test_port_in_use_exits_2(pki, responder, tmp_path, capsys) -> None:
    leaf = pki.issue_leaf("busy.serve.test", ocsp_url=responder.url)
    config = config_for(tmp_path, files(tmp_path, leaf, "leaf"))
    async with running(config) as serving:
        busy = ServeConfig(
            certs=config.certs, host=HOST, port=serving.port, cache_dir=tmp_path / "cache"
        )
        assert await serve(busy, out=io.StringIO(), stop=asyncio.Event()) == 2
    assert "cannot listen on" in capsys.readouterr().err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_subprocess_until_signal(pki, responder, tmp_path, sig) -> None:
    """``python -m staple serve`` as a user runs it; ``--responder`` replaces the missing AIA."""
    leaf = pki.issue_leaf("proc.serve.test")  # no AIA: only --responder says where to ask
    chain, key = files(tmp_path, leaf, "leaf")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "staple", "serve", "--cert", str(chain), "--key", str(key),
        "--port", "0", "--cache-dir", str(tmp_path / "cache"), "--responder", responder.url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), 30)
        match = re.fullmatch(rb"listening on https://127\.0\.0\.1:(\d+)\n", first)
        assert match, first
        status = await asyncio.wait_for(proc.stdout.readline(), 5)
        assert b"[proc.serve.test]: stapling good" in status
        result = await probe(HOST, int(match.group(1)), servername="proc.serve.test")
        assert result.code == 0, result.lines()
        proc.send_signal(sig)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err
    assert responder.log == [("GET", "good")]


async def test_probe_json_through_cli(pki, responder, tmp_path, ca_file) -> None:
    leaf = pki.issue_leaf("json.serve.test", ocsp_url=responder.url)
    async with running(config_for(tmp_path, files(tmp_path, leaf, "leaf"))) as serving:
        out = io.StringIO()
        argv = [
            "probe", f"{HOST}:{serving.port}", "--servername", "json.serve.test",
            "--cafile", str(ca_file), "--json",
        ]  # fmt: skip
        assert await _cli.run(argv, out=out) == 0
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
    assert await _cli.run(["demo", "--check"], out=out) == 0
    text = out.getvalue()
    assert "check curl: skipped - curl not installed" in text
    assert "check probe: ok" in text
    assert "SKIPPED: curl (curl not installed), gnutls-cli (gnutls-cli not installed)" in text


async def test_demo_check_fails_when_a_check_fails(monkeypatch) -> None:
    """The broken pair: an "openssl" that shows no staple fails the demo."""
    commands = _cli._demo_commands

    def broken(port: int, ca: Path) -> dict[str, list[str]]:
        return {**commands(port, ca), "openssl": [sys.executable, "-c", "print('no staple')"]}

    monkeypatch.setattr(_cli, "_demo_commands", broken)
    out = io.StringIO()
    assert await _cli.run(["demo", "--check"], out=out) == 1
    text = out.getvalue()
    assert "check openssl: FAILED" in text
    assert "demo checks: FAILED (openssl)" in text


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
