"""Soak: a stapling server under continuous handshakes while its responder keeps misbehaving.

``python -m bench.soak --minutes 10`` (``tests/test_soak.py`` runs it for ~20 s).

Real clock throughout. Two certificates (ECDSA and RSA, one SNI name each) are stapled by a
:class:`staple.Stapler` with short-lived responses - valid for one minute, margin 10 s - so the
refresher works all the time. Every few seconds the local responder switches, at random, between
behaving and one of many faults (down, slow, HTTP errors, garbage, tryLater, expired, wrong
signer, revoked...). A pool of client threads does full pyOpenSSL handshakes (no resumption),
asks for OCSP, and checks every staple it receives with :func:`staple.ocsp.validate` at the
moment it arrives, with no margin: signature, CertID, time.

The report counts handshakes, stapled (good / revoked), unstapled, **invalid** and **expired**
(both must be 0), the references still held once every client is done (must be 0), what reached
the event loop's exception handler (must be nothing), the responder's requests and the RSS of
the process (start, end, peak; from ``/proc/self/status``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import random
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from OpenSSL import SSL

import staple
from staple import tls
from staple.server_context import build_server_context
from staple.stapler import Stapler
from staple.testing import Fault, Leaf, OcspResponder, TestPKI

HOST = "127.0.0.1"

# What the responder does in each period; None (healthy) is drawn as often as all faults.
FAULTS: list[Fault | None] = [
    Fault.DOWN,
    Fault.CONNECTION_RESET,
    Fault.SLOW,
    Fault.SLOW_BODY,
    Fault.HTTP_404,
    Fault.HTTP_500,
    Fault.HTTP_503,
    Fault.HTML_ERROR,
    Fault.WRONG_CONTENT_TYPE,
    Fault.GARBAGE,
    Fault.TRUNCATED,
    Fault.OVERSIZE,
    Fault.GZIP_BOMB,
    Fault.REDIRECT_LOOP,
    Fault.REDIRECT_FILE,
    Fault.TRY_LATER,
    Fault.UNAUTHORIZED,
    Fault.UNKNOWN,
    Fault.REVOKED,
    Fault.EXPIRED,
    Fault.FUTURE,
    Fault.NO_NEXT_UPDATE,
    Fault.WRONG_SIGNER,
    Fault.SIGNER_WITHOUT_EKU,
    Fault.WRONG_CERT,
]

POLICY = staple.RefreshPolicy(
    margin=timedelta(seconds=10),
    safety=timedelta(seconds=5),
    min_interval=timedelta(seconds=5),
    backoff_base=timedelta(seconds=1),
    backoff_max=timedelta(seconds=10),
    fetch_timeout=2.0,
    connect_timeout=1.0,
    wait_timeout=5.0,
)


@dataclass
class Report:
    seconds: float = 0.0
    clients: int = 0
    handshakes: int = 0
    stapled_good: int = 0
    stapled_revoked: int = 0
    unstapled: int = 0
    invalid: int = 0
    expired: int = 0
    client_errors: int = 0
    leaked_references: int = -1
    loop_errors: int = 0
    fault_switches: int = 0
    responder_requests: int = 0
    events: dict[str, int] = field(default_factory=dict)
    rss_start_mib: float = 0.0
    rss_end_mib: float = 0.0
    rss_peak_mib: float = 0.0
    invalid_reasons: list[str] = field(default_factory=list)
    client_error_samples: list[str] = field(default_factory=list)

    @property
    def handshakes_per_second(self) -> float:
        return self.handshakes / self.seconds if self.seconds else 0.0

    @property
    def stapled_fraction(self) -> float:
        stapled = self.stapled_good + self.stapled_revoked
        return stapled / self.handshakes if self.handshakes else 0.0

    def lines(self) -> list[str]:
        rows: list[tuple[str, Any]] = [
            ("duration (s)", f"{self.seconds:.0f}"),
            ("client threads", self.clients),
            ("handshakes", self.handshakes),
            ("handshakes/s", f"{self.handshakes_per_second:.0f}"),
            ("stapled good", self.stapled_good),
            ("stapled revoked", self.stapled_revoked),
            ("unstapled", self.unstapled),
            ("stapled fraction", f"{self.stapled_fraction:.1%}"),
            ("INVALID staples (must be 0)", self.invalid),
            ("EXPIRED staples (must be 0)", self.expired),
            ("client errors", self.client_errors),
            ("leaked references (must be 0)", self.leaked_references),
            ("loop exception handler calls", self.loop_errors),
            ("responder fault switches", self.fault_switches),
            ("responder requests", self.responder_requests),
            ("events", ", ".join(f"{k} {v}" for k, v in sorted(self.events.items()))),
            ("RSS start / end / peak (MiB)", self._rss()),
        ]
        width = max(len(name) for name, _ in rows)
        return [f"{name:<{width}}  {value}" for name, value in rows]

    def _rss(self) -> str:
        return f"{self.rss_start_mib:.1f} / {self.rss_end_mib:.1f} / {self.rss_peak_mib:.1f}"


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# -- the client pool -------------------------------------------------------------------------


class Tally:
    """Counts shared by the client threads (under a lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.invalid_reasons: list[str] = []
        self.errors: list[str] = []

    def add(self, what: str, detail: str | None = None) -> None:
        with self.lock:
            self.counts[what] += 1
            if detail and what in ("invalid", "expired") and len(self.invalid_reasons) < 20:
                self.invalid_reasons.append(detail)
            if detail is not None and what == "error" and len(self.errors) < 20:
                self.errors.append(detail)


def _blocking(sock: socket.socket, op: Callable[[], Any], deadline: float) -> Any:
    while True:
        try:
            return op()
        except (SSL.WantReadError, SSL.WantWriteError):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the server stopped answering") from None
            select.select([sock], [], [], remaining)


def one_handshake(port: int, name: str, leaf: Leaf, tally: Tally) -> None:
    """A full handshake asking for OCSP; the staple checked the moment it arrives."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    received: list[tuple[bytes, datetime]] = []

    def on_ocsp(conn: SSL.Connection, data: bytes, _: object) -> bool:
        received.append((data, datetime.now(UTC)))
        return True

    ctx.set_ocsp_client_callback(on_ocsp)
    deadline = time.monotonic() + 10
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.setblocking(False)
        conn = SSL.Connection(ctx, sock)
        conn.set_connect_state()
        conn.set_tlsext_host_name(name.encode())
        conn.request_ocsp()
        _blocking(sock, conn.do_handshake, deadline)
        served = conn.get_peer_certificate(as_cryptography=True)
        if served != leaf.cert:
            tally.add("error", f"served {served!r} for {name}")
            return
        _blocking(sock, lambda: conn.sendall(b"ping"), deadline)
        if _blocking(sock, lambda: conn.recv(4), deadline) != b"ping":
            tally.add("error", "no echo")
            return
        with contextlib.suppress(SSL.Error):
            conn.shutdown()
    tally.add("handshake")
    if len(received) != 1:
        tally.add("error", f"{len(received)} OCSP callbacks")
        return
    der, now = received[0]
    if not der:
        tally.add("unstapled")
        return
    try:
        verified = staple.ocsp.validate(der, leaf.cert, leaf.chain[1], now=now, margin=timedelta(0))
    except staple.ExpiredResponseError as exc:
        tally.add("expired", f"expired: {exc}")
        return
    except staple.OcspError as exc:
        tally.add("invalid", f"{type(exc).__name__}: {exc}")
        return
    if verified.cert_status is staple.CertStatus.REVOKED:
        tally.add("revoked")
    else:
        tally.add("good")


def client_loop(
    port: int, leaves: dict[str, Leaf], tally: Tally, stop: threading.Event, seed: int
) -> None:
    rng = random.Random(seed)
    names = sorted(leaves)
    while not stop.is_set():
        name = rng.choice(names)
        try:
            one_handshake(port, name, leaves[name], tally)
        except (OSError, SSL.Error, TimeoutError) as exc:
            tally.add("error", f"{type(exc).__name__}: {exc}")


# -- the server side -------------------------------------------------------------------------


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def run_soak(
    seconds: float,
    *,
    clients: int = 4,
    fault_period: tuple[float, float] = (2.0, 6.0),
    backdate: timedelta = timedelta(seconds=5),
    seed: int | None = None,
    progress: Callable[[str], None] | None = None,
    transport: tls.TransportKind = "memory",
) -> Report:
    """Run the soak for ``seconds`` and return its report (on the given TLS transport).

    ``backdate`` is how old responses are when the responder signs them (their validity is one
    minute): 5 s is the realistic default; the CI test uses 40 s, so every response has only
    20 s left when fetched and the refresher must refetch every ~5 s, failing half the time.
    """
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, Any]] = []
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: loop_errors.append(context))
    events: collections.Counter[str] = collections.Counter()
    report = Report(clients=clients)
    pki = TestPKI()
    try:
        async with (
            OcspResponder(
                pki,
                validity=timedelta(minutes=1),
                backdate=backdate,
                slow_seconds=5.0,
            ) as responder,
            Stapler(policy=POLICY, on_update=lambda e: events.update([e.kind.value])) as stapler,
        ):
            leaves = {
                "ec.soak.test": pki.issue_leaf("ec.soak.test", ocsp_url=responder.url),
                "rsa.soak.test": pki.issue_leaf(
                    "rsa.soak.test", key_type="rsa", ocsp_url=responder.url
                ),
            }
            for leaf in leaves.values():
                await stapler.add(leaf.chain)
            ctx = build_server_context(
                [(lf.chain_pem, lf.key_pem) for lf in leaves.values()], stapler
            )
            server = await tls.create_server(
                Echo, HOST, 0, ssl_context=ctx, handshake_timeout=10.0, transport=transport
            )
            port = server.sockets[0].getsockname()[1]
            tally = Tally()
            stop = threading.Event()
            gc.collect()
            report.rss_start_mib = report.rss_peak_mib = rss_mib()
            threads = [
                threading.Thread(
                    target=client_loop,
                    args=(port, leaves, tally, stop, rng.randrange(1 << 30)),
                    name=f"soak client {i}",
                    daemon=True,
                )
                for i in range(clients)
            ]
            started = loop.time()
            for thread in threads:
                thread.start()
            try:
                next_report = started + 60
                while (now := loop.time()) < started + seconds:
                    await asyncio.sleep(min(rng.uniform(*fault_period), started + seconds - now))
                    fault = rng.choice(FAULTS) if rng.random() < 0.5 else None
                    responder.fault = fault
                    report.fault_switches += 1
                    report.rss_peak_mib = max(report.rss_peak_mib, rss_mib())
                    if progress is not None and loop.time() >= next_report:
                        next_report += 60
                        with tally.lock:
                            counts = dict(tally.counts)
                        progress(f"{loop.time() - started:.0f} s: {counts}, {rss_mib():.1f} MiB")
            finally:
                stop.set()
                await asyncio.gather(*(asyncio.to_thread(t.join, 30) for t in threads))
                report.seconds = loop.time() - started
                responder.fault = None
                server.close()
                await server.wait_closed()
            deadline = loop.time() + 10
            while stapler.live_references and loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            report.leaked_references = stapler.live_references
            report.responder_requests = responder.requests
        gc.collect()
        report.rss_end_mib = rss_mib()
        report.rss_peak_mib = max(report.rss_peak_mib, report.rss_end_mib)
    finally:
        loop.set_exception_handler(previous_handler)
    counts = tally.counts
    report.handshakes = counts["handshake"]
    report.stapled_good = counts["good"]
    report.stapled_revoked = counts["revoked"]
    report.unstapled = counts["unstapled"]
    report.invalid = counts["invalid"]
    report.expired = counts["expired"]
    report.client_errors = counts["error"]
    report.invalid_reasons = tally.invalid_reasons
    report.client_error_samples = tally.errors
    report.loop_errors = len(loop_errors)
    report.events = dict(events)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=1.0, help="how long (1)")
    parser.add_argument("--clients", type=int, default=4, help="client threads (4)")
    parser.add_argument("--seed", type=int, default=None, help="for the fault schedule")
    parser.add_argument(
        "--backdate", type=float, default=5.0, help="age of responses when signed, s (5)"
    )
    parser.add_argument(
        "--transport", choices=tls.TRANSPORTS, default="memory", help="TLS transport (memory)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    args = parser.parse_args(argv)
    report = asyncio.run(
        run_soak(
            args.minutes * 60,
            clients=args.clients,
            backdate=timedelta(seconds=args.backdate),
            seed=args.seed,
            progress=lambda line: print(line, flush=True),
            transport=args.transport,
        )
    )
    for line in report.lines():
        print(line)
    for reason in report.invalid_reasons:
        print("invalid:", reason)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(report), f, indent=2)
    ok = report.invalid == report.expired == report.leaked_references == report.loop_errors == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
