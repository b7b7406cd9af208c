"""Quick side-by-side benchmark: staple.tls (pyOpenSSL memory BIOs) vs asyncio's stdlib TLS.

Run as ``.venv/bin/python bench/tls_quick.py`` (``--help`` for options). Both servers run in
this process on the same event loop, with the same ECDSA P-256 certificate and the same
application protocols; the clients are ``openssl`` processes, so the client is C, not Python.
Variants alternate (A B A B ...) so that machine noise hits both alike, and the summary is the
median of the per-round ratios staple/stdlib.

1. Full handshakes: ``openssl s_time -new`` for a few seconds against each server. Reported:
   handshakes/s completed by the server and server CPU per handshake (this process's CPU time,
   which is the server's: the clients are other processes).
2. Bulk download: one connection, the server writes 100 MB (64 KiB writes, honouring
   pause_writing) to ``openssl s_client`` writing to /dev/null. Reported: MB/s and server
   CPU ms/MB.

Targets (from the spec): handshake CPU no worse than stdlib, bulk throughput >= 0.9x.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from staple import tls

HOST = "127.0.0.1"
CHUNK = os.urandom(64 * 1024)


def make_certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class Counter(asyncio.Protocol):
    """Handshake bench app: counts connections that completed the handshake."""

    made = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Counter.made += 1

    def data_received(self, data: bytes) -> None:
        pass


class Blaster(asyncio.Protocol):
    """Bulk bench app: writes ``total`` bytes as fast as flow control allows, then closes."""

    total = 100 * 1024 * 1024
    done: asyncio.Future[tuple[float, float]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.sent = 0
        self.paused = False
        self.start = (time.perf_counter(), time.process_time())
        self.produce()

    def produce(self) -> None:
        write = self.transport.write
        while not self.paused and self.sent < self.total:
            write(CHUNK)
            self.sent += len(CHUNK)
        if self.sent >= self.total and not self.transport.is_closing():
            self.transport.close()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.produce()

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: BaseException | None) -> None:
        wall = time.perf_counter() - self.start[0]
        cpu = time.process_time() - self.start[1]
        if Blaster.done is not None and not Blaster.done.done():
            Blaster.done.set_result((wall, cpu))


@dataclass
class Variant:
    name: str
    start: Callable[[Callable[[], asyncio.BaseProtocol]], Any]


async def run_handshakes(
    openssl: str, port: int, seconds: int, extra: list[str]
) -> tuple[float, float]:
    Counter.made = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        openssl,
        "s_time",
        "-connect",
        f"{HOST}:{port}",
        "-new",
        "-time",
        str(seconds),
        *extra,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await process.wait()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    count = max(Counter.made, 1)
    return count / wall, cpu / count * 1e6  # handshakes/s, server CPU µs per handshake


async def run_bulk(openssl: str, port: int, extra: list[str]) -> tuple[float, float]:
    Blaster.done = asyncio.get_running_loop().create_future()
    process = await asyncio.create_subprocess_exec(
        openssl,
        "s_client",
        "-connect",
        f"{HOST}:{port}",
        "-quiet",
        "-ign_eof",
        *extra,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    wall, cpu = await Blaster.done
    await process.wait()
    megabytes = Blaster.total / 1e6
    return megabytes / wall, cpu / megabytes * 1e3  # MB/s, server CPU ms per MB


async def main(args: argparse.Namespace) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise SystemExit("openssl is needed (the benchmark's client)")
    directory = Path(tempfile.mkdtemp(prefix="staple-bench-"))
    cert_path, key_path = make_certificate(directory)
    extra = ["-tls1_2"] if args.tls12 else ["-tls1_3"]

    def staple_context() -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.use_certificate_chain_file(str(cert_path))
        ctx.use_privatekey_file(str(key_path))
        return ctx

    stdlib_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    stdlib_context.load_cert_chain(cert_path, key_path)
    loop = asyncio.get_running_loop()

    async def start_staple(factory: Callable[[], asyncio.BaseProtocol]) -> Any:
        return await tls.create_server(factory, HOST, 0, ssl_context=staple_context())

    async def start_stdlib(factory: Callable[[], asyncio.BaseProtocol]) -> Any:
        return await loop.create_server(factory, HOST, 0, ssl=stdlib_context)

    variants = [Variant("staple", start_staple), Variant("stdlib", start_stdlib)]
    servers: dict[tuple[str, str], Any] = {}
    for variant in variants:
        servers[variant.name, "hs"] = await variant.start(Counter)
        servers[variant.name, "bulk"] = await variant.start(Blaster)

    def port(name: str, kind: str) -> int:
        result: int = servers[name, kind].sockets[0].getsockname()[1]
        return result

    print(
        f"loop={type(loop).__module__}.{type(loop).__name__} TLS={extra[0]} "
        f"rounds={args.rounds} handshake run={args.seconds}s bulk=100 MB\n"
        f"pyOpenSSL's OpenSSL: {SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}; "
        f"stdlib's: {ssl.OPENSSL_VERSION}"
    )
    results: dict[str, dict[str, list[float]]] = {
        v.name: {"hs/s": [], "cpu_us/hs": [], "MB/s": [], "cpu_ms/MB": []} for v in variants
    }
    for round_ in range(args.rounds):
        order = variants if round_ % 2 == 0 else variants[::-1]
        for variant in order:
            rate, cpu = await run_handshakes(openssl, port(variant.name, "hs"), args.seconds, extra)
            results[variant.name]["hs/s"].append(rate)
            results[variant.name]["cpu_us/hs"].append(cpu)
        for variant in order:
            mbps, cpu_per_mb = await run_bulk(openssl, port(variant.name, "bulk"), extra)
            results[variant.name]["MB/s"].append(mbps)
            results[variant.name]["cpu_ms/MB"].append(cpu_per_mb)
        line = "  ".join(
            f"{v.name}: {results[v.name]['hs/s'][-1]:6.0f} hs/s "
            f"{results[v.name]['cpu_us/hs'][-1]:5.0f} µs/hs "
            f"{results[v.name]['MB/s'][-1]:6.0f} MB/s "
            f"{results[v.name]['cpu_ms/MB'][-1]:5.2f} ms/MB"
            for v in variants
        )
        print(f"round {round_ + 1}: {line}", flush=True)

    print("\nmedian of per-round ratios staple/stdlib:")
    for metric, better in (
        ("hs/s", "higher"),
        ("cpu_us/hs", "lower"),
        ("MB/s", "higher"),
        ("cpu_ms/MB", "lower"),
    ):
        ratios = [
            a / b for a, b in zip(results["staple"][metric], results["stdlib"][metric], strict=True)
        ]
        print(
            f"  {metric:10} {statistics.median(ratios):5.2f}  ({better} is better; "
            f"staple median {statistics.median(results['staple'][metric]):.3g}, "
            f"stdlib median {statistics.median(results['stdlib'][metric]):.3g})"
        )
    for server in servers.values():
        server.close()
        await server.wait_closed()
    shutil.rmtree(directory)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=2, help="length of each handshake run")
    parser.add_argument("--tls12", action="store_true", help="TLS 1.2 instead of TLS 1.3")
    parser.add_argument("--uvloop", action="store_true", help="run the servers on uvloop")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.uvloop:
        import uvloop

        uvloop.run(main(arguments))
    else:
        asyncio.run(main(arguments))
