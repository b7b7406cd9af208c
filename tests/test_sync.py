"""Staple files for nginx and HAProxy: written, replaced, removed at the stop moment, pushed to
HAProxy's admin socket, and read by the real nginx and HAProxy."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from staple import FileStore, cli, ocsp
from staple.sync import TRY_LATER, HaproxyError, StapleFiles, push_to_haproxy
from staple.testing import FakeClock, Fault, Leaf, OcspResponder, TestPKI

from .external import require
from .redis_server import _die_with_parent, free_port


@pytest.fixture
def leaf(pki: TestPKI, responder: OcspResponder) -> Leaf:
    return pki.issue_leaf("sync.test", ocsp_url=responder.url)


@pytest.fixture
async def files(clock: FakeClock) -> AsyncIterator[StapleFiles]:
    async with StapleFiles(clock=clock, jitter=0.0, batch_delay=3600) as f:
        yield f


def verified(path: Path, leaf: Leaf, clock: FakeClock) -> ocsp.VerifiedResponse:
    return ocsp.validate(path.read_bytes(), leaf.cert, leaf.chain[1], now=clock.now())


async def settle(clock: FakeClock) -> None:
    async with asyncio.timeout(10):
        await clock.wait_for_sleepers(1)


# -- the files ------------------------------------------------------------------------------


async def test_writes_what_the_handle_staples(files, leaf, clock, tmp_path) -> None:
    out = tmp_path / "site.ocsp"
    handle = await files.add(leaf.chain, out)
    assert verified(out, leaf, clock).cert_status is ocsp.CertStatus.GOOD
    with handle.get_context() as ctx:
        assert out.read_bytes() == ctx.encoded
    assert out.stat().st_mode & 0o777 == 0o644  # readable by nginx's and HAProxy's users
    assert [p.name for p in tmp_path.iterdir()] == ["site.ocsp"]  # no temp file left
    assert files.status() == 0


async def test_rewritten_only_when_the_response_changes(files, leaf, clock, tmp_path) -> None:
    out = tmp_path / "site.ocsp"
    handle = await files.add(leaf.chain, out)
    first = verified(out, leaf, clock)
    await files._sync(handle)  # an event with nothing new
    assert files.writes == 1
    clock.advance(120)
    await handle.refresh()
    assert files.writes == 2
    assert verified(out, leaf, clock).this_update > first.this_update


@pytest.mark.parametrize("on_expiry", ["remove", "empty"])
async def test_file_goes_at_the_stop_moment(
    clock, leaf, responder, tmp_path, on_expiry, caplog
) -> None:
    out = tmp_path / "site.ocsp"
    async with StapleFiles(clock=clock, jitter=0.0, on_expiry=on_expiry) as files:
        handle = await files.add(leaf.chain, out)
        held = handle.response
        assert held is not None and out.stat().st_size > 0
        responder.fault = Fault.HTTP_500  # every refresh from now on fails
        stop = (held.expires - handle.policy.margin).timestamp()
        while clock.time() < stop:
            await settle(clock)
            clock.advance(min(clock.next_deadline or stop, stop) - clock.time())
        await settle(clock)
        if on_expiry == "remove":
            assert not out.exists()
        else:
            assert out.read_bytes() == b""
        assert files.status() == 4
        assert f"{'removed' if on_expiry == 'remove' else 'emptied'} {out}" in caplog.text


async def test_withheld_revocation_leaves_no_file(clock, pki, responder, tmp_path) -> None:
    revoked = pki.issue_leaf("revoked.test", ocsp_url=responder.url)
    responder.revoke(revoked.cert)
    good = pki.issue_leaf("good.test", ocsp_url=responder.url)
    async with StapleFiles(clock=clock, staple_revoked=False) as files:
        await files.add(good.chain, tmp_path / "good.ocsp")
        await files.add(revoked.chain, tmp_path / "revoked.ocsp")
        assert (tmp_path / "good.ocsp").exists()
        assert not (tmp_path / "revoked.ocsp").exists()
        assert files.status() == 1


async def test_one_file_per_certificate(files, pki, responder, tmp_path) -> None:
    a = pki.issue_leaf("a.test", ocsp_url=responder.url)
    b = pki.issue_leaf("b.test", ocsp_url=responder.url)
    await files.add(a.chain, tmp_path / "a.ocsp")
    with pytest.raises(ValueError, match="already the staple file"):
        await files.add(b.chain, tmp_path / "a.ocsp")
    with pytest.raises(ValueError, match="is not a directory"):
        await files.add(b.chain, tmp_path / "missing" / "b.ocsp")


# -- the on-change command ------------------------------------------------------------------


async def test_command_runs_once_per_batch(clock, pki, responder, tmp_path) -> None:
    runs = tmp_path / "runs"
    async with StapleFiles(clock=clock, on_change=f"echo run >> {runs}", batch_delay=3600) as files:
        for name in ("a", "b", "c"):
            leaf = pki.issue_leaf(f"{name}.test", ocsp_url=responder.url)
            await files.add(leaf.chain, tmp_path / f"{name}.ocsp")
        assert not runs.exists()  # the batch is still open
        await files.flush()
        assert runs.read_text() == "run\n"
        await files.flush()  # nothing changed since
        assert runs.read_text() == "run\n"


async def test_failing_command_is_logged_not_fatal(clock, leaf, tmp_path, caplog) -> None:
    async with StapleFiles(clock=clock, on_change="echo nope >&2; exit 3") as files:
        await files.add(leaf.chain, tmp_path / "site.ocsp")
        await files.flush()
        assert files.command_failures == 1
        assert "exited with 3: nope" in caplog.text
        assert (tmp_path / "site.ocsp").exists()


async def test_hanging_command_is_killed(clock, leaf, tmp_path, caplog) -> None:
    async with StapleFiles(clock=clock, on_change="exec sleep 60", on_change_timeout=0.2) as files:
        await files.add(leaf.chain, tmp_path / "site.ocsp")
        await files.flush()
        assert files.command_failures == 1
        assert "did not finish within 0.2 s; killed" in caplog.text


# -- real nginx and HAProxy -----------------------------------------------------------------


def s_client_status(port: int) -> str:
    """What ``openssl s_client -status`` prints about the staple it got."""
    done = subprocess.run(
        [require("openssl"), "s_client", "-connect", f"127.0.0.1:{port}", "-status"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        check=False,
    )
    return done.stdout.decode(errors="replace")


def curl_cert_status(port: int, ca: Path) -> int:
    """curl's exit code with ``--cert-status``: 0 for a verified good staple, 91 otherwise."""
    url = f"https://sync.test:{port}/"
    argv = [require("curl"), "-sS", "--cert-status", "--cacert", str(ca), url]
    argv += ["--resolve", f"sync.test:{port}:127.0.0.1", "-o", os.devnull]
    return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode


class Server:
    """nginx or HAProxy in the foreground, its log in ``directory``; killed on exit."""

    def __init__(
        self, argv: list[str], port: int, directory: Path, also: Path | None = None
    ) -> None:
        self.log = directory / "server.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + 15
        while not (self._listening(port) and (also is None or also.exists())):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{argv[0]} did not start: {self.log.read_text()}")
            time.sleep(0.02)

    @staticmethod
    def _listening(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def site(pki: TestPKI, responder: OcspResponder, tmp_path: Path) -> Leaf:
    leaf = pki.issue_leaf("sync.test", ocsp_url=responder.url)
    leaf.write_chain(tmp_path / "chain.pem")
    leaf.write_key(tmp_path / "key.pem")
    pki.write_ca_bundle(tmp_path / "ca.pem")
    return leaf


NGINX_CONF = """
daemon off;
master_process off;
error_log {dir}/error.log info;
pid {dir}/nginx.pid;
{user}
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/t; proxy_temp_path {dir}/t; fastcgi_temp_path {dir}/t;
    uwsgi_temp_path {dir}/t; scgi_temp_path {dir}/t;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {dir}/chain.pem;
        ssl_certificate_key {dir}/key.pem;
        ssl_stapling on;
        ssl_stapling_file {dir}/site.ocsp;
        location / {{ return 200 "ok"; }}
    }}
}}
"""


@contextlib.contextmanager
def nginx(directory: Path) -> Iterator[int]:
    port = free_port()
    conf = directory / "nginx.conf"
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(NGINX_CONF.format(dir=directory, port=port, user=user))
    server = Server([require("nginx"), "-p", str(directory), "-c", str(conf)], port, directory)
    try:
        yield port
    finally:
        server.stop()


async def test_nginx_staples_the_file_from_its_first_handshake(
    clock, site, tmp_path, monkeypatch
) -> None:
    async with StapleFiles(clock=clock) as files:
        await files.add(site.chain, tmp_path / "site.ocsp")
    with nginx(tmp_path) as port:
        assert "OCSP Response Status: successful" in s_client_status(port)
        assert curl_cert_status(port, tmp_path / "ca.pem") == 0


async def test_nginx_with_a_try_later_file_staples_nothing_usable(clock, site, tmp_path) -> None:
    # nginx refuses to (re)load with a missing or empty ssl_stapling_file and then keeps
    # stapling what it loaded before: try-later is the file that makes it stop.
    out = tmp_path / "site.ocsp"
    async with StapleFiles(clock=clock, on_expiry="try-later") as files:
        handle = await files.add(site.chain, out)
        await handle.close()  # no valid response held any more: its event rewrites the file
    assert out.read_bytes() == TRY_LATER
    with nginx(tmp_path) as port:
        assert "OCSP Response Status: trylater" in s_client_status(port)
        assert curl_cert_status(port, tmp_path / "ca.pem") == 91


HAPROXY_CFG = """
global
    stats socket {dir}/admin.sock level admin
defaults
    mode http
    timeout connect 5s
    timeout client 5s
    timeout server 5s
frontend tls
    bind 127.0.0.1:{port} ssl crt {dir}/site.pem
    http-request return status 200 content-type text/plain string ok
"""


@contextlib.contextmanager
def haproxy(directory: Path) -> Iterator[int]:
    port = free_port()
    cfg = directory / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(dir=directory, port=port))
    argv = [require("haproxy"), "-f", str(cfg), "-db"]
    server = Server(argv, port, directory, also=directory / "admin.sock")
    try:
        yield port
    finally:
        server.stop()


async def test_haproxy_loads_the_file_and_takes_updates_on_its_socket(
    clock, site, responder, tmp_path
) -> None:
    (tmp_path / "site.pem").write_bytes(site.chain_pem + site.key_pem)  # HAProxy's crt file
    out = tmp_path / "site.pem.ocsp"  # read at start, beside the crt
    sock = str(tmp_path / "admin.sock")
    store = FileStore(tmp_path / "store")
    async with StapleFiles(clock=clock, jitter=0.0, store=store) as files:
        await files.add(site.chain, out)
    with haproxy(tmp_path) as port:
        first = s_client_status(port)
        assert "OCSP Response Status: successful" in first
        assert curl_cert_status(port, tmp_path / "ca.pem") == 0
        restarted = StapleFiles(clock=clock, jitter=0.0, store=store, haproxy_sockets=[sock])
        async with restarted as files:
            handle = await files.add(site.chain, out)
            assert files.writes == files.pushes == 0  # the store's response is on disk already
            clock.advance(120)
            await handle.refresh()
            assert files.pushes == 1 and files.push_failures == 0
        after = s_client_status(port)
        assert "OCSP Response Status: successful" in after
        assert this_update(after) != this_update(first)  # HAProxy staples the pushed one


async def test_haproxy_refuses_a_response_for_another_certificate(
    clock, site, pki, responder, tmp_path
) -> None:
    (tmp_path / "site.pem").write_bytes(site.chain_pem + site.key_pem)
    other = pki.issue_leaf("other.test", ocsp_url=responder.url)
    async with StapleFiles(clock=clock) as files:
        await files.add(other.chain, tmp_path / "other.ocsp")
        foreign = (tmp_path / "other.ocsp").read_bytes()
    with haproxy(tmp_path), pytest.raises(HaproxyError, match="refused the response"):
        await push_to_haproxy(str(tmp_path / "admin.sock"), foreign)
    with pytest.raises(HaproxyError, match=r"admin\.sock"):  # HAProxy gone: the socket is dead
        await push_to_haproxy(str(tmp_path / "admin.sock"), foreign)


def this_update(s_client_output: str) -> str:
    for line in s_client_output.splitlines():
        if "This Update:" in line:
            return line.strip()
    raise AssertionError(f"no This Update in {s_client_output!r}")


# -- the command ----------------------------------------------------------------------------


@pytest.fixture
async def live() -> AsyncIterator[tuple[TestPKI, OcspResponder]]:
    """A PKI and responder on the real clock, as the command uses."""
    pki = TestPKI()
    async with OcspResponder(pki) as responder:
        yield pki, responder


async def sync_once(tmp_path: Path, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = await cli.run(["sync", "--once", "--cache-dir", str(tmp_path / "cache"), *argv], out=out)
    return code, out.getvalue()


async def test_once_writes_and_exits_with_the_worst_status(live, tmp_path) -> None:
    pki, responder = live
    good = pki.issue_leaf("good.test", ocsp_url=responder.url)
    revoked = pki.issue_leaf("revoked.test", ocsp_url=responder.url)
    responder.revoke(revoked.cert)
    for name, leaf in (("good", good), ("revoked", revoked)):
        leaf.write_chain(tmp_path / f"{name}.pem")
    code, text = await sync_once(
        tmp_path, "--cert", str(tmp_path / "good.pem"), "--out", str(tmp_path / "good.ocsp")
    )
    assert code == 0
    assert f"{tmp_path / 'good.ocsp'}: " in text and "stapling good" in text
    assert (
        ocsp.validate(
            (tmp_path / "good.ocsp").read_bytes(), good.cert, good.chain[1], now=datetime.now(UTC)
        ).cert_status
        is ocsp.CertStatus.GOOD
    )
    code, _ = await sync_once(
        tmp_path,
        *("--cert", str(tmp_path / "good.pem"), "--out", str(tmp_path / "good.ocsp")),
        *("--cert", str(tmp_path / "revoked.pem"), "--out", str(tmp_path / "revoked.ocsp")),
    )
    assert code == 1
    assert (tmp_path / "revoked.ocsp").exists()  # revoked responses are stapled by default


async def test_once_with_the_responder_down_exits_4_and_writes_nothing(live, tmp_path) -> None:
    pki, responder = live
    leaf = pki.issue_leaf("down.test", ocsp_url=responder.url)
    leaf.write_chain(tmp_path / "down.pem")
    responder.fault = Fault.HTTP_500
    code, text = await sync_once(
        tmp_path, "--cert", str(tmp_path / "down.pem"), "--out", str(tmp_path / "down.ocsp")
    )
    assert code == 4
    assert "NO STAPLE" in text
    assert not (tmp_path / "down.ocsp").exists()


async def test_usage_errors_exit_2(live, tmp_path, capsys) -> None:
    pki, responder = live
    leaf = pki.issue_leaf("a.test", ocsp_url=responder.url)
    leaf.write_chain(tmp_path / "a.pem")
    code, _ = await sync_once(
        tmp_path, "--cert", str(tmp_path / "a.pem"), "--out", "x.ocsp", "--out", "y.ocsp"
    )
    assert code == 2
    assert "1 --cert but 2 --out" in capsys.readouterr().err
    missing_dir = str(tmp_path / "nowhere" / "a.ocsp")
    code, _ = await sync_once(tmp_path, "--cert", str(tmp_path / "a.pem"), "--out", missing_dir)
    assert code == 2
    assert "is not a directory" in capsys.readouterr().err


async def test_service_runs_the_command_and_stops_on_sigterm(live, tmp_path) -> None:
    pki, responder = live
    leaf = pki.issue_leaf("svc.test", ocsp_url=responder.url)
    leaf.write_chain(tmp_path / "svc.pem")
    marker = tmp_path / "reloaded"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "staple",
        "sync",
        *("--cert", str(tmp_path / "svc.pem"), "--out", str(tmp_path / "svc.ocsp")),
        *("--on-change", f"echo reload >> {marker}", "--no-cache"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    async with asyncio.timeout(30):
        line = (await process.stdout.readline()).decode()
    assert "stapling good" in line
    assert (tmp_path / "svc.ocsp").exists()
    assert marker.read_text() == "reload\n"  # the start-up batch ran before the status lines
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(30):
        assert await process.wait() == 0
    assert (tmp_path / "svc.ocsp").exists()  # a stopped sync leaves the file for the server
