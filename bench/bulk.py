"""3. Bulk transfer over one connection through aiohttp: 200 MB down, 200 MB up.

The same servers as the handshake section (staple.tls + StaplingSite vs stdlib ssl + TCPSite,
one process each, default loop and uvloop), TLS 1.3 (AES-256-GCM, what every peer here
negotiates). Download: ``GET /download?bytes=N``, the handler writes 64 KiB chunks with
``await response.write()`` (aiohttp's flow control). Upload: ``POST /upload``, the handler reads
``request.content.iter_any()``. The C client does the other end in its own process.
Reported: MB/s (client-measured, request to last byte) and server CPU ms per MB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import _client
from ._harness import Bench, Section, alternate
from ._proc import ServerProcess, servers
from ._stats import Ratio, Row, median

TARGETS = {"download": 0.95, "upload": 1.0}


@dataclass
class Transfer:
    megabytes: float
    elapsed: float
    cpu: float

    @property
    def rate(self) -> float:
        return self.megabytes / self.elapsed

    @property
    def cpu_ms_per_mb(self) -> float:
        return self.cpu * 1000 / self.megabytes

    def as_json(self) -> dict[str, Any]:
        return {
            "MB": self.megabytes,
            "seconds": round(self.elapsed, 4),
            "MB_per_s": round(self.rate, 1),
            "server_cpu_ms_per_MB": round(self.cpu_ms_per_mb, 3),
        }


async def transfer(server: ServerProcess, direction: str, nbytes: int) -> Transfer:
    cpu0 = server.cpu()
    if direction == "download":
        result = await _client.download(server.port, nbytes, tls="1.3")
    else:
        result = await _client.upload(server.port, nbytes, tls="1.3")
    cpu = server.cpu() - cpu0
    if not result.get("http_ok") or result.get("bytes", 0) < nbytes:
        raise RuntimeError(f"{direction} failed: {result}")
    return Transfer(nbytes / 1e6, result["elapsed"], cpu)


async def run(bench: Bench) -> Section:
    section = Section()
    nbytes = (50 if bench.quick else 200) * 1_000_000
    rounds = 3 if bench.quick else 9
    m = bench.material("ec")
    for loop in ("asyncio", "uvloop"):
        base = {"chain": str(m.chain), "key": str(m.key), "loop": loop}
        configs: list[dict[str, Any]] = [
            {**base, "kind": "staple", "staple": None},
            {**base, "kind": "stdlib"},
            {**base, "kind": "staple", "staple": None, "transport": "socket"},
        ]
        async with servers(*configs) as (staple_server, stdlib_server, socket_server):
            by_name = {
                "staple": staple_server,
                "stdlib": stdlib_server,
                "staple, socket BIO": socket_server,
            }
            for direction in ("download", "upload"):
                for server in by_name.values():
                    await transfer(server, direction, nbytes // 10)  # warm up

                async def one(
                    name: str, direction: str = direction, by_name: dict[str, Any] = by_name
                ) -> Transfer:
                    return await transfer(by_name[name], direction, nbytes)

                results = await alternate(list(by_name), one, rounds)
                stdlib = results["stdlib"]
                for variant in ("staple", "staple, socket BIO"):
                    _rows(section, variant, results[variant], stdlib, direction, nbytes, loop)
                label = f"{direction} {nbytes // 1_000_000} MB, {loop}"
                section.raw[label] = {
                    name: [t.as_json() for t in runs] for name, runs in results.items()
                }
    return section


def _rows(
    section: Section,
    variant: str,
    staple: list[Transfer],
    stdlib: list[Transfer],
    direction: str,
    nbytes: int,
    loop: str,
) -> None:
    rate = Ratio.of([t.rate for t in staple], [t.rate for t in stdlib])
    cpu = Ratio.of([t.cpu_ms_per_mb for t in staple], [t.cpu_ms_per_mb for t in stdlib])
    label = f"{direction} {nbytes // 1_000_000} MB, {loop}"
    name = "staple on memory BIOs" if variant == "staple" else "staple on a socket BIO"
    target = TARGETS[direction]
    section.rows.append(
        Row(
            "bulk",
            f"MB/s {name}÷stdlib — {label}",
            f"{rate}  [{median([t.rate for t in staple]):,.0f} vs "
            f"{median([t.rate for t in stdlib]):,.0f} MB/s]",
            f"≥ {target:.2f}×",
            round(rate.median, 2) >= target,
            {"ratio": rate.__dict__},
        )
    )
    section.rows.append(
        Row(
            "bulk",
            f"server CPU ms/MB {name}÷stdlib — {label}",
            f"{cpu}  [{median([t.cpu_ms_per_mb for t in staple]):.2f} vs "
            f"{median([t.cpu_ms_per_mb for t in stdlib]):.2f} ms/MB]",
            "",
            None,
            {"ratio": cpu.__dict__},
        )
    )
