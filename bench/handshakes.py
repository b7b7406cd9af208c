"""1. Full handshakes: staple.tls + aiohttp (StaplingSite) vs asyncio's stdlib ssl + aiohttp.

Each server runs the same aiohttp app in its own process; the C client (``hsclient``) opens a
new connection per request from several processes, asks for a staple (``status_request``),
sends ``GET /`` with ``Connection: close``, reads the answer and closes. staple staples a small
(issuer-signed) response on every handshake; the stdlib cannot staple, so it does less work. A
third server, staple with stapling off, shows what the TLS transport alone costs.

Figures per round and variant: server CPU per handshake (the server process's own CPU clock,
read from outside) and handshakes per second. The ratios are medians of per-round ratios
staple/stdlib over rounds that alternate the variants.
"""

from __future__ import annotations

from typing import Any

from ._harness import KEY_NAMES, Bench, HandshakeRun, Section, alternate, handshake_run
from ._proc import servers
from ._stats import Ratio, Row, median

TARGET = {"asyncio": 0.95, "uvloop": 1.0}
SOCKET_TARGET = 0.85  # the socket-BIO transport's, on both loops
# staple as users run it (stapling a small response), the stdlib, staple with stapling
# off: the transport alone, to tell the TLS layer's cost from stapling's; and staple stapling
# on its socket-BIO transport (StaplingSite(transport="socket")).
VARIANTS = ("staple", "stdlib", "staple, stapling off", "staple, socket BIO")


async def run(bench: Bench) -> Section:
    section = Section()
    rounds, seconds = (2, 0.4) if bench.quick else (8, 1.2)
    procs = 3
    for key_type in ("ec", "rsa"):
        m = bench.material(key_type)
        for loop in ("asyncio", "uvloop"):
            base = {"chain": str(m.chain), "key": str(m.key), "loop": loop}
            configs: list[dict[str, Any]] = [
                {**base, "kind": "staple", "staple": str(m.response_path("small"))},
                {**base, "kind": "stdlib"},
                {**base, "kind": "staple", "staple": None},
                {
                    **base,
                    "kind": "staple",
                    "staple": str(m.response_path("small")),
                    "transport": "socket",
                },
            ]
            async with servers(*configs) as started:
                by_name = dict(zip(VARIANTS, started, strict=True))
                for tls in ("1.3", "1.2"):
                    for server in by_name.values():  # warm up: imports, caches, allocator
                        await handshake_run(server, seconds=0.3, procs=procs, tls=tls)

                    async def one(
                        name: str, tls: str = tls, by_name: dict[str, Any] = by_name
                    ) -> HandshakeRun:
                        return await handshake_run(
                            by_name[name], seconds=seconds, procs=procs, tls=tls
                        )

                    results = await alternate(VARIANTS, one, rounds)
                    _rows(section, key_type, tls, loop, results)
    return section


def _rows(
    section: Section, key_type: str, tls: str, loop: str, results: dict[str, list[HandshakeRun]]
) -> None:
    staple, stdlib = results["staple"], results["stdlib"]
    cpu = Ratio.of([r.cpu_us for r in staple], [r.cpu_us for r in stdlib])
    rate = Ratio.of([r.rate for r in staple], [r.rate for r in stdlib])
    label = f"{KEY_NAMES[key_type]}, TLS {tls}, {loop}"
    target = TARGET[loop]
    s_us, b_us = median([r.cpu_us for r in staple]), median([r.cpu_us for r in stdlib])
    s_rate, b_rate = median([r.rate for r in staple]), median([r.rate for r in stdlib])
    stapled = all(r.stapled == r.ok for r in staple)
    section.rows.append(
        Row(
            "handshakes",
            f"server CPU/handshake staple on memory BIOs÷stdlib — {label}",
            f"{cpu}  [{s_us:,.0f} vs {b_us:,.0f} µs]",
            f"≤ {target:.2f}×",
            round(cpu.median, 2) <= target,
            {"ratio": cpu.__dict__, "staple_us": s_us, "stdlib_us": b_us, "stapled_all": stapled},
        )
    )
    off = results["staple, stapling off"]
    off_cpu = Ratio.of([r.cpu_us for r in off], [r.cpu_us for r in stdlib])
    o_us = median([r.cpu_us for r in off])
    section.rows.append(
        Row(
            "handshakes",
            f"  the same with stapling off (transport alone) ÷ stdlib — {label}",
            f"{off_cpu}  [{o_us:,.0f} vs {b_us:,.0f} µs]",
            "",
            None,
            {"ratio": off_cpu.__dict__, "staple_off_us": o_us},
        )
    )
    sock = results["staple, socket BIO"]
    sock_cpu = Ratio.of([r.cpu_us for r in sock], [r.cpu_us for r in stdlib])
    sock_mem = Ratio.of([r.cpu_us for r in sock], [r.cpu_us for r in staple])
    k_us = median([r.cpu_us for r in sock])
    section.rows.append(
        Row(
            "handshakes",
            f"server CPU/handshake staple on a socket BIO÷stdlib — {label}",
            f"{sock_cpu}  [{k_us:,.0f} vs {b_us:,.0f} µs; ÷ memory BIO {sock_mem}]",
            f"≤ {SOCKET_TARGET:.2f}×",
            round(sock_cpu.median, 2) <= SOCKET_TARGET,
            {
                "ratio": sock_cpu.__dict__,
                "vs_memory": sock_mem.__dict__,
                "staple_socket_us": k_us,
                "stapled_all": all(r.stapled == r.ok for r in sock),
            },
        )
    )
    busy = median([r.busy for r in staple + stdlib])
    section.rows.append(
        Row(
            "handshakes",
            f"handshakes/s staple on memory BIOs÷stdlib — {label}",
            f"{rate}  [{s_rate:,.0f} vs {b_rate:,.0f}/s, server busy {busy:.2f} cores]",
            "",
            None,
            {"ratio": rate.__dict__, "staple_per_s": s_rate, "stdlib_per_s": b_rate},
        )
    )
    section.raw[label] = {name: [r.as_json() for r in runs] for name, runs in results.items()}
