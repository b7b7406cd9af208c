"""8. End to end: nginx in front of the app against staple in the app's own process.

What a user would run instead of staple is nginx terminating TLS (and stapling) in front of the
app, proxying plain HTTP to it. nginx keeps its upstream connections open (``keepalive 32``),
so the app sees reused connections whatever the clients do: nginx amortises the app's
per-connection cost, while staple in process pays it on every new connection. This section
measures both, side by side in one run, as total server CPU per request — the sum over every
server process involved (nginx's master and worker, and the app; or the one staple process),
read from outside through each process's CPU clock (``bench._proc.cpu_seconds``).

Two apps, each the same code in every variant (``bench/_apps.py``: ``GET /`` answers an 18-byte
JSON body with a ``Content-Length``):

- **aiohttp** (asyncio's loop everywhere, as ``run_app`` uses): nginx (1 worker) + ``aiohttp
  run_app`` on plain HTTP; ``StaplingServer`` (its ``StaplingSite``) on the memory transport;
  the same on the socket transport; the app alone on plain HTTP (the floor).
- **ASGI** (a raw ASGI callable on uvicorn, ``--loop auto --http auto``: uvloop and httptools
  when installed): nginx + ``uvicorn`` on plain HTTP; ``staple.uvicorn.run`` on the memory
  transport; the same on the socket transport (the default); uvicorn alone on
  plain HTTP (the floor).

nginx is configured as it is recommended in front of an app (``upstream`` with ``keepalive 32``,
``proxy_http_version 1.1``, ``proxy_set_header Connection ""``), stapling from the bench's
pre-signed responder (``bench._responder``) with ``ssl_stapling_verify on``; it fetches its
staple lazily, so it is asked until it staples before anything is measured. The staple
servers read the same response from a pre-filled :class:`~staple.FileStore`, as after a
restart. Same ECDSA P-256 chain, TLS 1.3, 127.0.0.1.

Two loads, the same client programs for every variant (the floor runs them with ``-plain``):
keep-alive (``kaclient``, 4 connections, requests back to back) and a new connection per
request (``hsclient``, 3 processes, a full handshake asking for a staple + ``GET`` with
``Connection: close``). Variants alternate (A B C D, D C B A, ...), each warmed first; rows give
the median of per-round ratios nginx+app ÷ staple+app with min–max, absolute µs per request by
process, requests/s and the busy fraction (server CPU over wall time, in cores).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from . import _client, _env, _keepalive, _proc
from ._harness import Bench, Section, alternate
from ._pki import Material
from ._stats import Ratio, Row, median
from .nginx import Nginx, responder_for
from .servers import (
    HANDSHAKE_PROCS,
    KEEPALIVE_PROCS,
    TLS,
    Files,
    Server,
    Variant,
    fill_store,
)
from .servers import _apps as apps_argv

PATH = "/"
KEEPALIVE = "keep-alive"
NEW_CONNECTION = "new connection"
TARGETS = {KEEPALIVE: 1.25, NEW_CONNECTION: 1.0}

UPSTREAM = """\
    upstream app_upstream {{
        server 127.0.0.1:{port};
        keepalive 32;
    }}
"""
LOCATION = """\
location / {
            proxy_pass http://app_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }"""


@dataclass(frozen=True)
class App:
    """One app: the server that runs it on plain HTTP (behind nginx, and alone as the floor)
    and staple's servers for it."""

    name: str
    label: str
    plain: Variant
    staple: list[Variant]


def _uvicorn_plain(f: Files, port: int) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "bench._apps:asgi",
        "--host", "127.0.0.1", "--port", str(port), "--loop", "auto", "--http", "auto",
        "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip


def apps() -> list[App]:
    loop = "uvloop" if find_spec("uvloop") else "asyncio's loop"
    http = "httptools" if find_spec("httptools") else "h11"
    return [
        App(
            "aiohttp",
            "aiohttp app, asyncio's loop",
            Variant("aiohttp alone, plain HTTP", apps_argv("aiohttp-plain")),
            [
                Variant(
                    "staple + aiohttp (memory)",
                    apps_argv("staple-aiohttp-server", "memory"),
                    stapling=True,
                ),
                Variant(
                    "staple + aiohttp (socket)",
                    apps_argv("staple-aiohttp-server", "socket"),
                    stapling=True,
                ),
            ],
        ),
        App(
            "uvicorn",
            f"ASGI app on uvicorn, {loop}, {http}",
            Variant("uvicorn alone, plain HTTP", _uvicorn_plain),
            [
                Variant(
                    "staple.uvicorn.run (memory)",
                    apps_argv("staple-uvicorn", "auto", "memory"),
                    stapling=True,
                ),
                Variant(
                    "staple.uvicorn.run (socket)",
                    apps_argv("staple-uvicorn", "auto", "socket"),
                    stapling=True,
                ),
            ],
        ),
    ]


class PlainServer(Server):
    """A :class:`~bench.servers.Server` on plain HTTP: ready once a plain ``GET`` answers."""

    async def _ready(self) -> None:
        assert self.process is not None
        while self.process.returncode is None:
            with contextlib.suppress(RuntimeError):
                if (await _client.get(self.port, PATH, tls=TLS, plain=True)).get("http_ok"):
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"exited with status {self.process.returncode}")


@dataclass
class Stack:
    """A variant as running processes: where clients connect, and each process's CPU clock."""

    name: str
    port: int
    plain: bool
    processes: dict[str, Callable[[], float]]

    def cpu(self) -> dict[str, float]:
        return {role: read() for role, read in self.processes.items()}


@dataclass
class Run:
    ok: int
    errors: int
    stapled: int
    connections: int
    elapsed: float
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.cpu.values())

    @property
    def cpu_us(self) -> float:
        """Server CPU per request (every process), µs."""
        return self.total / self.ok * 1e6 if self.ok else float("nan")

    def us(self, role: str) -> float:
        return self.cpu[role] / self.ok * 1e6 if self.ok else float("nan")

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0

    @property
    def busy(self) -> float:
        return self.total / self.elapsed if self.elapsed else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.ok,
            "errors": self.errors,
            "stapled": self.stapled,
            "connections": self.connections,
            "seconds": round(self.elapsed, 4),
            "server_cpu_s": {role: round(s, 6) for role, s in self.cpu.items()},
            "per_s": round(self.rate, 1),
            "server_cpu_us_per_request": round(self.cpu_us, 1),
            "server_busy_cores": round(self.busy, 3),
        }


async def measure(stack: Stack, load: str, seconds: float) -> Run:
    before = stack.cpu()
    if load == KEEPALIVE:
        result = await _keepalive.requests(
            stack.port, seconds=seconds, procs=KEEPALIVE_PROCS, tls=TLS, plain=stack.plain
        )
    else:
        result = await _client.handshakes(
            stack.port, seconds=seconds, procs=HANDSHAKE_PROCS, tls=TLS, plain=stack.plain
        )
    after = stack.cpu()
    return Run(
        ok=result["ok"],
        errors=result["errors"],
        stapled=result.get("stapled", 0),
        connections=result.get("connections", result["ok"]),
        elapsed=result["elapsed"],
        cpu={role: after[role] - before[role] for role in after},
    )


async def _first_staple(nginx: Nginx) -> tuple[int, int]:
    """Handshakes until nginx staples (it fetches lazily, during the first handshake that
    asks): (the first handshake's staple length, how many handshakes it took)."""
    first = 0
    for attempt in range(1, 101):
        answer = await _client.get(nginx.port, PATH, tls=TLS)
        if not answer.get("http_ok"):
            raise RuntimeError(f"nginx did not proxy GET {PATH}: {answer}")
        if attempt == 1:
            first = int(answer.get("staple_len", 0))
        if answer.get("staple_len"):
            return first, attempt
        await asyncio.sleep(0.1)
    raise RuntimeError("nginx never stapled (100 handshakes)")


def _log(top: Path, name: str) -> Path:
    return top / f"{re.sub(r'[^A-Za-z0-9.-]+', '_', name)}.log"


async def run(bench: Bench) -> Section:
    section = Section()
    binary = _env.nginx_binary()
    if binary is None or _keepalive.command() is None or not _client.kind().startswith("C"):
        why = "nginx is not installed" if binary is None else "needs the C clients"
        section.rows.append(Row("e2e", "nginx + app vs staple + app", f"skipped: {why}"))
        section.notes.append(f"kaclient: {_keepalive.why_not() or 'built'}; {_client.kind()}")
        return section
    version = _env.nginx_version()
    section.raw["nginx"] = version
    section.notes.append(f"nginx -v: nginx version: {version}")
    rounds, seconds, warm = (3, 0.5, 0.3) if bench.quick else (10, 2.0, 0.5)
    m = bench.material("ec")
    top = bench.workdir / "e2e"
    top.mkdir(parents=True, exist_ok=True)
    files = Files(m.chain, m.key, await fill_store(m, top / "store"))
    async with responder_for(top, [m]) as url:
        for app in apps():
            where = top / app.name
            where.mkdir()
            try:
                await _app(section, app, m, files, where, (binary, url), (rounds, seconds, warm))
            except (RuntimeError, OSError) as exc:
                section.rows.append(Row("e2e", app.label, f"did not run: {exc}"))
                for log in sorted(where.glob("*.log")):
                    tail = log.read_text(errors="replace").splitlines()[-8:]
                    section.notes += [f"{log.name}: {line}" for line in tail]
    return section


async def _app(
    section: Section,
    app: App,
    m: Material,
    files: Files,
    top: Path,
    nginx_with: tuple[str, str],
    timing: tuple[int, float, float],
) -> None:
    binary, url = nginx_with
    rounds, seconds, warm = timing
    proxied = f"nginx + {app.name}"
    async with contextlib.AsyncExitStack() as stack:

        async def start(variant: Variant, plain: bool) -> Server:
            kind = PlainServer if plain else Server
            server = kind(variant, files, _log(top, variant.name))
            try:
                return await stack.enter_async_context(server)
            except (RuntimeError, OSError) as exc:
                raise RuntimeError(f"{variant.name}: {exc} ({' '.join(server.argv)})") from exc

        def alone(name: str, server: Server, plain: bool) -> Stack:
            return Stack(name, server.port, plain, {"process": server.cpu})

        behind = await start(app.plain, plain=True)
        nginx = await stack.enter_async_context(
            Nginx(
                binary,
                top / "nginx",
                m,
                top / "www",
                url,
                locations=LOCATION,
                http_extra=UPSTREAM.format(port=behind.port),
            )
        )
        assert nginx.process is not None
        master = nginx.process.pid
        if app.name == "aiohttp":
            section.raw["nginx_conf"] = nginx.conf.read_text()
            section.notes.append("nginx.conf (the ASGI app's differs only in paths and ports):")
            section.notes += [f"  {line}" for line in nginx.conf.read_text().splitlines()]
        first, tries = await _first_staple(nginx)
        stacks = [
            Stack(
                proxied,
                nginx.port,
                False,
                {
                    "nginx worker": nginx.cpu,
                    "nginx master": lambda: _proc.cpu_seconds(master),
                    "app": behind.cpu,
                },
            )
        ]
        first_staples = {}
        for variant in app.staple:
            server = await start(variant, plain=False)
            first_staples[variant.name] = server.first_staple
            stacks.append(alone(variant.name, server, False))
        floor = alone(app.plain.name, await start(app.plain, plain=True), True)
        stacks.append(floor)
        by_name = {s.name: s for s in stacks}
        section.rows.append(
            Row(
                "e2e",
                f"{app.label}: first handshake stapled?",
                f"{proxied}: {'yes' if first else 'no'} (stapled from handshake {tries}); "
                + ", ".join(f"{n}: {'yes' if st else 'no'}" for n, st in first_staples.items()),
            )
        )
        for load in (KEEPALIVE, NEW_CONNECTION):
            for s in stacks:  # warm up: imports, caches, the allocator, upstream connections
                await measure(s, load, warm)

            def one(name: str, load: str = load) -> Awaitable[Run]:
                return measure(by_name[name], load, seconds)

            results = await alternate(list(by_name), one, rounds)
            _rows(section, app, load, proxied, floor.name, results)


def _rows(
    section: Section,
    app: App,
    load: str,
    proxied: str,
    floor: str,
    results: dict[str, list[Run]],
) -> None:
    where = f"{app.label}, {load}"
    section.raw[where] = {n: [r.as_json() for r in runs] for n, runs in results.items()}
    errors = {n: sum(r.errors for r in runs) for n, runs in results.items()}
    if any(errors.values()):
        section.notes.append(f"{where}: client errors {errors}")
    target = TARGETS[load]
    theirs = results[proxied]
    for variant in app.staple:
        ours = results[variant.name]
        cpu = Ratio.of([r.cpu_us for r in theirs], [r.cpu_us for r in ours])
        t_us, o_us = median([r.cpu_us for r in theirs]), median([r.cpu_us for r in ours])
        section.rows.append(
            Row(
                "e2e",
                f"CPU/request {proxied} ÷ {variant.name} — {load}",
                f"{cpu}  [{t_us:,.0f} vs {o_us:,.0f} µs]",
                f"≥ {target:.2f}×",
                round(cpu.median, 2) >= target,
                {"ratio": cpu.__dict__, "nginx_us": t_us, "staple_us": o_us},
            )
        )
    floor_us = median([r.cpu_us for r in results[floor]])
    for name, runs in results.items():
        total = median([r.cpu_us for r in runs])
        parts = ""
        if name == proxied:
            role = {k: median([r.us(k) for r in runs]) for k in runs[0].cpu}
            parts = (
                f": nginx {role['nginx worker'] + role['nginx master']:,.0f} (worker "
                f"{role['nginx worker']:,.0f}, master {role['nginx master']:,.1f}) + app "
                f"{role['app']:,.0f}"
            )
        over = "" if name == floor else f"; floor + {total - floor_us:,.0f}"
        stapled = sum(r.stapled for r in runs) / max(sum(r.ok for r in runs), 1)
        staple = f"; stapled {stapled:.0%}" if load == NEW_CONNECTION and name != floor else ""
        section.rows.append(
            Row(
                "e2e",
                f"  {'floor: ' if name == floor else ''}{name} — {load}",
                f"{total:,.0f} µs/request{parts}{over}  [{median([r.rate for r in runs]):,.0f}/s;"
                f" busy {median([r.busy for r in runs]):.2f} cores{staple}]",
                data={"cpu_us": total, "stapled_fraction": stapled},
            )
        )
