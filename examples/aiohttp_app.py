"""An aiohttp app served with OCSP stapling.

    python examples/aiohttp_app.py           # serve https://localhost:8443/ until Ctrl-C
    python examples/aiohttp_app.py --check   # one request with ``curl --cert-status``;
                                             # exit 0 if the staple was there and good

With real certificates (whose AIA names a real OCSP responder), all of this is two lines::

    app = web.Application()  # ... add your routes ...
    staple.aiohttp.run_app(app, certs=[("chain.pem", "key.pem")])

``run_app`` takes ``aiohttp.web.run_app``'s keywords and runs a
:class:`staple.aiohttp.StaplingServer`: it opens a :class:`staple.Stapler`'s chains at once,
builds the pyOpenSSL context, keeps the Stapler under ``app[STAPLER_KEY]`` (closed on cleanup)
and serves with :class:`staple.aiohttp.StaplingSite`. This example runs that same server inside
its own coroutine, because it makes a throwaway PKI and a local OCSP responder first
(``staple.testing``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from aiohttp import web
from OpenSSL import SSL

import staple
import staple.aiohttp
import staple.ocsp
from staple.testing import Leaf, OcspResponder, TestPKI


async def status(request: web.Request) -> web.Response:
    """Show what the server staples: the app keeps its Stapler under STAPLER_KEY."""
    stapler = request.app[staple.aiohttp.STAPLER_KEY]
    lines = [f"stapled {stapler.stapled} handshakes, {stapler.unstapled} without a staple"]
    for handle in stapler.handles:
        r = handle.response
        held = f"{r.cert_status.name.lower()} until {r.next_update:%Y-%m-%d %H:%M}" if r else "none"
        lines.append(f"{handle.subject}: {held}; next refresh {handle.next_refresh}")
    return web.Response(text="\n".join(lines) + "\n")


async def main(check: bool, port: int) -> int:
    pki = TestPKI()  # stands in for a real CA...
    async with OcspResponder(pki) as responder:  # ...and its OCSP responder
        leaf = pki.issue_leaf("localhost", "127.0.0.1", ocsp_url=responder.url)

        # A Stapler fetches and refreshes one OCSP response per certificate chain; the server
        # owns it: it opens the chains (waiting, bounded, for their first responses), stores
        # it under STAPLER_KEY, serves over a stapling pyOpenSSL context, and closes it.
        app = web.Application()
        app.router.add_get("/", status)
        server = staple.aiohttp.StaplingServer(
            app,
            certs=[(leaf.chain_pem, leaf.key_pem)],
            stapler=staple.Stapler(),
            host="127.0.0.1",
            port=port,
        )
        async with server:
            with tempfile.TemporaryDirectory() as tmp:
                ca = Path(tmp) / "ca.pem"  # clients must trust the throwaway root
                pki.write_ca_bundle(ca)
                if not check:
                    print(f"serving https://localhost:{server.port}/ - try:")
                    print(f"  curl --cert-status --cacert {ca} https://localhost:{server.port}/")
                    await asyncio.Event().wait()  # until Ctrl-C
                if shutil.which("curl"):
                    ok = await check_with_curl(server.port, ca)
                else:
                    ok = await asyncio.to_thread(check_with_pyopenssl, server.port, pki, leaf)
        return 0 if ok else 1


async def check_with_curl(port: int, ca: Path) -> bool:
    """curl --cert-status fails (exit 91) unless a valid, good staple came with the handshake."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--cert-status", "--cacert", str(ca),
        "--resolve", f"localhost:{port}:127.0.0.1", f"https://localhost:{port}/",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    body, _ = await proc.communicate()
    print(body.decode(), end="")
    verdict = "stapled, good" if proc.returncode == 0 else "no valid staple"
    print(f"curl --cert-status exit {proc.returncode}: {verdict}")
    return proc.returncode == 0


def check_with_pyopenssl(port: int, pki: TestPKI, leaf: Leaf) -> bool:
    """Without curl: a pyOpenSSL client that asks for a staple, and staple's own validator."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    pki.configure_trust(ctx)
    ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, err, depth, ok: bool(ok))
    stapled: list[bytes] = []

    def on_status(conn: SSL.Connection, der: bytes, data: object) -> bool:
        stapled.append(der)  # b"" if the server sent no staple
        return True  # judge it below, after the handshake

    ctx.set_ocsp_client_callback(on_status)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        conn = SSL.Connection(ctx, sock)
        conn.set_connect_state()
        conn.set_tlsext_host_name(b"localhost")
        conn.request_ocsp()
        conn.do_handshake()
        conn.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        response = b""
        try:
            while chunk := conn.recv(65536):
                response += chunk
        except SSL.ZeroReturnError:
            pass
    print(response.split(b"\r\n\r\n", 1)[-1].decode(), end="")
    if not stapled or not stapled[0]:
        print("pyOpenSSL client: no staple")
        return False
    try:
        verified = staple.ocsp.validate(stapled[0], leaf.cert, leaf.chain[1], now=datetime.now(UTC))
    except staple.ValidationError as exc:
        print(f"pyOpenSSL client: invalid staple: {exc}")
        return False
    print(f"pyOpenSSL client: stapled, {verified.cert_status.name.lower()}")
    return verified.cert_status is staple.CertStatus.GOOD


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="one checked request, then exit")
    parser.add_argument("--port", type=int, default=8443, help="port to serve (default 8443)")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(main(args.check, 0 if args.check else args.port)))
