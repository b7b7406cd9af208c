"""A plain asyncio streams server (no web framework) with OCSP stapling.

    python examples/streams_echo.py           # echo lines on localhost:8444 until Ctrl-C
    python examples/streams_echo.py --check   # a pyOpenSSL client asks for a staple, echoes a
                                              # line, verifies the staple; exit 0 if all good

``staple.tls.start_server`` is ``asyncio.start_server(..., ssl=...)`` with TLS by pyOpenSSL,
which can staple (the stdlib ``ssl`` module cannot). The certificate and OCSP responder are a
throwaway ``staple.testing`` PKI; with real ones, pass their PEM files to
``build_server_context([("chain.pem", "key.pem")], stapler)``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
from datetime import UTC, datetime

from OpenSSL import SSL

import staple
import staple.ocsp
import staple.tls
from staple.server_context import build_server_context
from staple.testing import Leaf, OcspResponder, TestPKI


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Runs once the TLS handshake (and its staple) is done, like any streams handler."""
    try:
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
    finally:
        writer.close()  # sends close_notify
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def main(check: bool, port: int) -> int:
    pki = TestPKI()
    async with OcspResponder(pki) as responder, staple.Stapler() as stapler:
        leaf = pki.issue_leaf("localhost", "127.0.0.1", ocsp_url=responder.url)
        await stapler.add(leaf.chain)  # fetch the first response, then keep it fresh
        ctx = build_server_context([(leaf.chain_pem, leaf.key_pem)], stapler)
        server = await staple.tls.start_server(echo, "127.0.0.1", port, ssl_context=ctx)
        async with server:
            port = server.sockets[0].getsockname()[1]
            if not check:
                print(f"echoing on localhost:{port}; try: openssl s_client -status "
                      f"-connect 127.0.0.1:{port}")  # fmt: skip
                await server.serve_forever()  # until Ctrl-C
            # The client blocks, so it runs in a thread while the server runs on this loop.
            return 0 if await asyncio.to_thread(client, port, pki, leaf) else 1


def client(port: int, pki: TestPKI, leaf: Leaf) -> bool:
    """A pyOpenSSL client that asks for a staple (status_request) and checks it."""
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
        conn.sendall(b"hello, stapled world\n")
        line = b""
        while not line.endswith(b"\n"):
            line += conn.recv(1024)
        conn.shutdown()  # our close_notify; the server answers with its own
    print(f"echoed: {line.decode().strip()}")
    if not stapled or not stapled[0]:
        print("no staple in the handshake")
        return False
    try:  # the same checks staple made before stapling it, now on the client side
        verified = staple.ocsp.validate(stapled[0], leaf.cert, leaf.chain[1], now=datetime.now(UTC))
    except staple.ValidationError as exc:
        print(f"invalid staple: {exc}")
        return False
    print(f"staple: {verified.cert_status.name.lower()}, next update {verified.next_update}")
    return verified.cert_status is staple.CertStatus.GOOD and line == b"hello, stapled world\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="one checked echo, then exit")
    parser.add_argument("--port", type=int, default=8444, help="port to serve (default 8444)")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(main(args.check, 0 if args.check else args.port)))
