"""1c. The TLS layer alone, in one process: staple.tls ÷ asyncio's sslproto, server side.

Both layers get the same inputs without sockets, a loop run or a client on the same CPUs: a
pyOpenSSL client on memory BIOs makes a full handshake, a tiny ``GET`` and a close_notify; each
flight is handed to the server protocol through ``get_buffer``/``buffer_updated`` and what the
server writes is collected by a stand-in TCP transport. Only the server protocol's calls are
timed (and the callbacks they schedule with ``call_soon``, run at once), variants interleaved
handshake by handshake (A B C, C B A, ...), median per round, median and range of the per-round
ratios. This isolates what a user chooses between - the TLS layer, stapling included - from
the kernel, the event loop and the HTTP server that both share, which dominate the CPU-time
rows of ``handshakes`` and their noise.

The stdlib protocol is ``asyncio.sslproto.SSLProtocol`` (what ``loop.create_server(ssl=...)``
uses) on the stdlib ``ssl`` module and its OpenSSL; staple's is ``TLSServerProtocol`` on
pyOpenSSL and cryptography's OpenSSL, stapling a small response through a constant callback
(``Stapler._callback`` itself is measured in ``getter``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ssl
import statistics
import time
from asyncio import sslproto
from collections.abc import Callable
from typing import Any

from OpenSSL import SSL

from staple.tls import TLSServerProtocol

from . import _server
from ._harness import KEY_NAMES, Bench, Section
from ._pki import Material
from ._stats import Ratio, Row

VARIANTS = ("staple", "stdlib", "staple, stapling off")
_REQUEST = b"GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n"
_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


async def run(bench: Bench) -> Section:
    section = Section()
    rounds, per_round = (3, 60) if bench.quick else (7, 200)
    loop = asyncio.get_running_loop()
    for key_type in ("ec", "rsa"):
        makers = _makers(bench.material(key_type), loop)
        for tls in ("1.3", "1.2"):
            client, stapled = _client(tls)
            medians = _interleaved(makers, client, loop, rounds, per_round)
            if not any(stapled):
                raise RuntimeError("the staple variant stapled nothing: the client did not ask")
            label = f"{KEY_NAMES[key_type]}, TLS {tls}"
            _rows(section, label, medians)
    return section


def _client(tls: str) -> tuple[SSL.Context, list[int]]:
    """A client context for one TLS version, and the sizes of the staples it receives."""
    client = SSL.Context(SSL.TLS_CLIENT_METHOD)
    version = SSL.TLS1_3_VERSION if tls == "1.3" else SSL.TLS1_2_VERSION
    client.set_min_proto_version(version)
    client.set_max_proto_version(version)
    stapled: list[int] = []

    def received(conn: SSL.Connection, der: bytes, data: object) -> bool:
        stapled.append(len(der))
        return True

    client.set_ocsp_client_callback(received)
    return client, stapled


def _makers(
    m: Material, loop: asyncio.AbstractEventLoop
) -> dict[str, Callable[[], asyncio.BufferedProtocol]]:
    """A new server protocol per connection, for each variant."""
    small = m.responses["small"]
    stapling = _server.plain_context(str(m.chain), str(m.key))
    stapling.set_ocsp_server_callback(lambda conn, data: small)
    plain = _server.plain_context(str(m.chain), str(m.key))
    stdlib = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    stdlib.load_cert_chain(str(m.chain), str(m.key))

    def stdlib_protocol() -> asyncio.BufferedProtocol:
        # As loop.create_server(ssl=...) makes it, waiter included.
        waiter = loop.create_future()
        return sslproto.SSLProtocol(loop, _Http(), stdlib, waiter, server_side=True)

    return {
        "staple": lambda: TLSServerProtocol(_Http(), stapling),
        "stdlib": stdlib_protocol,
        "staple, stapling off": lambda: TLSServerProtocol(_Http(), plain),
    }


def _rows(section: Section, label: str, medians: dict[str, list[float]]) -> None:
    stdlib = medians["stdlib"]
    base_us = statistics.median(stdlib) / 1000
    for name, what in (
        ("staple", "server side of a handshake in process, staple.tls ÷ sslproto"),
        ("staple, stapling off", "  the same with stapling off"),
    ):
        ratio = Ratio.of(medians[name], stdlib)
        us = statistics.median(medians[name]) / 1000
        section.rows.append(
            Row(
                "tlslayer",
                f"{what} — {label}",
                f"{ratio}  [{us:,.0f} vs {base_us:,.0f} µs]",
                "",
                None,
                {"ratio": ratio.__dict__, "us": us, "stdlib_us": base_us},
            )
        )
    section.raw[label] = medians


def _interleaved(
    makers: dict[str, Callable[[], asyncio.BufferedProtocol]],
    client: SSL.Context,
    loop: asyncio.AbstractEventLoop,
    rounds: int,
    per_round: int,
) -> dict[str, list[float]]:
    """Median ns per round and variant, variants alternating handshake by handshake."""
    names = list(makers)
    for _ in range(20):  # warm up
        for name in names:
            _one(makers[name], client, loop)
    medians: dict[str, list[float]] = {name: [] for name in names}
    gc.disable()  # a collection would land on whichever variant runs then
    try:
        for _ in range(rounds):
            times: dict[str, list[int]] = {name: [] for name in names}
            for i in range(per_round):
                for name in names if i % 2 == 0 else reversed(names):
                    times[name].append(_one(makers[name], client, loop))
                if i % 20 == 19:
                    gc.collect()
            for name in names:
                medians[name].append(statistics.median(times[name]))
    finally:
        gc.enable()
    return medians


def _one(
    make: Callable[[], asyncio.BufferedProtocol],
    client_ctx: SSL.Context,
    loop: asyncio.AbstractEventLoop,
) -> int:
    """ns the server protocol spends on one connection."""
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    client.request_ocsp()  # status_request, as browsers and the bench's C client send it
    tcp = _Tcp()
    clock = time.perf_counter_ns
    start = clock()
    server = make()
    server.connection_made(tcp)
    spent = clock() - start

    def to_server(data: bytes) -> bytes:
        nonlocal spent
        start = clock()
        buffer = memoryview(server.get_buffer(len(data))).cast("B")
        buffer[: len(data)] = data
        server.buffer_updated(len(data))
        _run_ready(loop)
        spent += clock() - start
        out = b"".join(tcp.out)
        tcp.out.clear()
        return out

    done = False
    for _ in range(10):
        try:
            client.do_handshake()
            done = True
        except SSL.WantReadError:
            pass
        flight = _drain(client)
        if flight:
            client.bio_write(to_server(flight) or b"")
        if done and not flight:
            break
    client.sendall(_REQUEST)
    client.bio_write(to_server(_drain(client)))
    answer = b""
    try:
        while True:
            answer += client.recv(65536)
    except (SSL.ZeroReturnError, SSL.WantReadError):
        pass
    if not answer.endswith(b"ok"):
        raise RuntimeError(f"unexpected answer {answer[:80]!r}")
    with contextlib.suppress(SSL.Error):
        client.shutdown()
    last = _drain(client)
    if last:
        to_server(last)
    start = clock()
    server.connection_lost(None)
    _run_ready(loop)
    return spent + clock() - start


def _drain(conn: SSL.Connection) -> bytes:
    out = b""
    while True:
        try:
            out += conn.bio_read(65536)
        except SSL.WantReadError:
            return out


def _run_ready(loop: Any) -> None:
    """Run what the protocol scheduled with ``call_soon`` (sslproto defers some calls)."""
    ready = loop._ready
    while ready:
        handle = ready.popleft()
        if not handle._cancelled:
            handle._run()


class _Tcp(asyncio.Transport):
    """The TCP side: collects what the server writes."""

    def __init__(self) -> None:
        super().__init__()
        self.out: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class _Http(asyncio.Protocol):
    """The smallest HTTP server: one answer, then close."""

    transport: asyncio.BaseTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert isinstance(self.transport, asyncio.WriteTransport)
        self.transport.write(_ANSWER)
        self.transport.close()
