"""Stapling in a TLS stack we don't own: a threaded, blocking pyOpenSSL server.

    python examples/threaded_pyopenssl.py           # echo lines on localhost:8445 until Ctrl-C
    python examples/threaded_pyopenssl.py --check   # one checked echo; exit 0 if all good

The server here is ``socketserver.ThreadingTCPServer`` with ``SSL.Connection`` over each
socket: no asyncio. The :class:`staple.Stapler` still needs an event loop for its refresher,
so one runs in a background thread, and coroutines are handed to it with
``asyncio.run_coroutine_threadsafe``. All the TLS server has to do is ``stapler.install(ctx)``.

References. Each stapled handshake takes a reference to the response it stapled. On staple's
own asyncio transport it is released when the connection closes; on a connection staple did
not make (this one) the Stapler releases it with ``weakref.finalize`` when the
``SSL.Connection`` object is garbage. So drop connections when done (here: when ``handle()``
returns), and ``stapler.live_references`` goes back to 0.

Threads. The OCSP callback runs inside ``do_handshake()``, on the handler thread, and calls
``handle.get_context()``, which is meant for the loop thread. It is safe enough here, under
CPython's GIL, because the getter only reads two attributes, reads the clock and does
``ctx._refs += 1`` on an immutable context; ``free()`` (run by ``weakref.finalize`` on
whichever thread drops the connection) does ``-= 1`` and may discard the context from its
handle's set of live contexts. No lock is taken and nothing awaits. The caveats:

* ``+= 1`` / ``-= 1`` are read-modify-write. CPython with the GIL does not switch threads in
  between (no call and no backward jump there), so no count is lost; that is an
  implementation detail, and on a free-threaded (no-GIL) build counts could be lost.
* ``live_references`` sums over that set of contexts. Read while another thread's ``free()``
  discards from it, it can raise ``RuntimeError: Set changed size during iteration``, and a
  handshake that reads the current context just as a refresh replaces it can leave a count
  the sum misses until it is freed. Read it when handshakes are quiet, as below.
* If the held response has passed its stop time and the refresher has not noticed yet,
  ``get_context()`` retires it itself, from the handshake thread. Should a refresh install a
  new response at that very moment, the new one could be retired instead, and nothing be
  stapled until the next refresh. Rare, but possible only with threads.
* ``stapler.stapled`` and the other counters are plain ``+= 1``: statistics, not exact.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import queue
import socket
import socketserver
import sys
import threading
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

from OpenSSL import SSL

import staple
import staple.ocsp
from staple.testing import Leaf, OcspResponder, TestPKI

T = TypeVar("T")


class EventLoopThread:
    """An asyncio loop in a daemon thread, for the Stapler's refresher."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="staple", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result, from any other thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


def make_server(ctx: SSL.Context, port: int, done: queue.Queue[str]) -> socketserver.TCPServer:
    class EchoHandler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            conn = SSL.Connection(ctx, self.request)
            conn.set_accept_state()
            try:
                conn.do_handshake()  # the Stapler's OCSP callback runs in here
                line = b""
                while not line.endswith(b"\n"):
                    line += conn.recv(1024)
                conn.sendall(line)
                conn.shutdown()
            except SSL.Error:
                pass  # e.g. a client that went away
            # conn dies when handle() returns: weakref.finalize frees its staple reference.

        def finish(self) -> None:
            done.put(self.client_address[0])

    return socketserver.ThreadingTCPServer(("127.0.0.1", port), EchoHandler)


def client(port: int, pki: TestPKI, leaf: Leaf, references: Callable[[], int]) -> bool:
    """A pyOpenSSL client that asks for a staple (status_request), echoes a line, checks it."""
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
        print(f"live references during the connection: {references()}")  # the server's
        conn.sendall(b"hello from a thread\n")
        line = b""
        while not line.endswith(b"\n"):
            line += conn.recv(1024)
        with contextlib.suppress(SSL.Error):
            conn.shutdown()
    print(f"echoed: {line.decode().strip()}")
    if not stapled or not stapled[0]:
        print("no staple in the handshake")
        return False
    try:
        verified = staple.ocsp.validate(stapled[0], leaf.cert, leaf.chain[1], now=datetime.now(UTC))
    except staple.ValidationError as exc:
        print(f"invalid staple: {exc}")
        return False
    print(f"staple: {verified.cert_status.name.lower()}, next update {verified.next_update}")
    return verified.cert_status is staple.CertStatus.GOOD


def main(check: bool, port: int) -> int:
    background = EventLoopThread()
    pki = TestPKI()
    responder = OcspResponder(pki)  # the OCSP responder lives on the loop thread too
    background.run(responder.start())
    leaf = pki.issue_leaf("localhost", "127.0.0.1", ocsp_url=responder.url)

    async def open_stapler() -> staple.Stapler:
        stapler = staple.Stapler()  # made on the loop: its tasks and HTTP session live there
        await stapler.add(leaf.chain)
        return stapler

    async def live_references() -> int:
        return stapler.live_references  # read on the loop thread

    stapler = background.run(open_stapler())

    # The TLS stack we don't own: all it needs is the Stapler's callback on its context.
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    leaf.configure_pyopenssl(ctx)
    stapler.install(ctx)
    done: queue.Queue[str] = queue.Queue()
    server = make_server(ctx, port, done)
    serving = threading.Thread(target=server.serve_forever, name="tls server")
    serving.start()
    try:
        port = server.server_address[1]
        if not check:
            print(f"echoing on localhost:{port}; try: openssl s_client -status "
                  f"-connect 127.0.0.1:{port}")  # fmt: skip
            serving.join()  # until Ctrl-C
        ok = client(port, pki, leaf, lambda: background.run(live_references()))
        done.get(timeout=30)  # the handler has returned: its connection is garbage
        refs = background.run(live_references())
        print(f"stapled {stapler.stapled}; live references after the close: {refs}")
        return 0 if ok and refs == 0 else 1
    finally:
        server.shutdown()
        server.server_close()
        serving.join()
        background.run(stapler.close())
        background.run(responder.close())
        background.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="one checked echo, then exit")
    parser.add_argument("--port", type=int, default=8445, help="port to serve (default 8445)")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main(args.check, 0 if args.check else args.port))
