"""7. staple's server integrations against what users would run instead, on the same app.

Four pairs, each side by side in one run, same ECDSA P-256 certificate, same app, on 127.0.0.1:

- **uvicorn, 1 process**: ``staple.uvicorn.run(asgi, certs=..., workers=1)`` vs ``uvicorn
  bench._apps:asgi --ssl-certfile --ssl-keyfile`` (uvicorn's TLS: the stdlib ``ssl``, which
  cannot staple). Both on uvicorn's defaults (``loop="auto"``: uvloop; ``http="auto"``:
  httptools), no access log.
- **uvicorn --loop asyncio, 1 process**: the same two on asyncio's loop instead of uvloop,
  where the stdlib side's TLS is asyncio's ``sslproto`` (Python) rather than uvloop's (Cython);
  staple's TLS is the same Python on either loop.
- **gunicorn, 2 workers**: ``gunicorn -k staple.gunicorn.UvicornWorker -w 2 --certfile
  --keyfile`` vs ``-k uvicorn.workers.UvicornWorker`` (or ``uvicorn_worker.UvicornWorker`` when
  the ``uvicorn-worker`` package is installed) with the same options.
- **aiohttp run_app, 1 process**: ``staple.aiohttp.run_app(app, certs=...)`` vs
  ``aiohttp.web.run_app(app, ssl_context=<stdlib ssl.SSLContext>)``; asyncio's loop for both
  (what ``run_app`` uses), no access log.

The apps (``bench/_apps.py``) answer ``GET /`` with the same 18-byte JSON body. The staple
servers read a small (issuer-signed) pre-signed response from a :class:`~staple.FileStore`
filled beforehand, as after a restart, so they staple every handshake and need no responder.

Two loads, the same client programs for every server, each in processes of their own:

- **new connection per request**: ``hsclient`` (``bench/hsclient.c``), 3 processes, a full TLS
  1.3 handshake (asking for a staple) + ``GET /`` with ``Connection: close`` each;
- **keep-alive**: ``kaclient`` (``bench/kaclient.c``), 4 processes with one TLS 1.3 connection
  each, ``GET /`` requests back to back on it.

Per round and variant: requests per second, and server CPU per request — the CPU time of every
process of the server (gunicorn's arbiter and its workers), read from outside through
``bench._proc.cpu_seconds``. The variants of a pair alternate (A B, B A, ...); the rows show the
median of the per-round ratios staple÷stdlib with the smallest and largest round. A server that
does not start is reported in a row (with its log in the notes), not an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Self

from staple import FileStore, ocsp
from staple.chain import load_chain

from . import _client, _keepalive, _proc
from ._harness import Bench, HandshakeRun, Section, alternate, handshake_run
from ._pki import Material
from ._stats import Ratio, Row, median

HANDSHAKE_PROCS = 3
KEEPALIVE_PROCS = 4
TLS = "1.3"
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class Files:
    chain: Path
    key: Path
    store: Path  # a FileStore directory holding the response to staple


@dataclass(frozen=True)
class Variant:
    """One server as users start it: its command line for a port, and how many worker
    processes it forks (the measurement waits for them)."""

    name: str
    argv: Callable[[Files, int], list[str]]
    workers: int = 0
    stapling: bool = False


def _uvicorn_worker_class() -> str:
    """The uvicorn worker for gunicorn: the ``uvicorn-worker`` package's when installed, else
    uvicorn's own (deprecated since uvicorn 0.30: it warns, in the server's log)."""
    if find_spec("uvicorn_worker") is not None:
        return "uvicorn_worker.UvicornWorker"
    return "uvicorn.workers.UvicornWorker"


def _apps(kind: str, *extra: str) -> Callable[[Files, int], list[str]]:
    def argv(f: Files, port: int) -> list[str]:
        paths = [str(f.chain), str(f.key), str(port), str(f.store)]
        return [sys.executable, "-m", "bench._apps", kind, *paths, *extra]

    return argv


def _uvicorn(loop: str) -> Callable[[Files, int], list[str]]:
    def argv(f: Files, port: int) -> list[str]:
        return [
            sys.executable, "-m", "uvicorn", "bench._apps:asgi",
            "--host", "127.0.0.1", "--port", str(port),
            "--ssl-certfile", str(f.chain), "--ssl-keyfile", str(f.key),
            "--loop", loop, "--log-level", "warning", "--no-access-log",
        ]  # fmt: skip

    return argv


def _gunicorn(worker_class: str) -> Callable[[Files, int], list[str]]:
    def argv(f: Files, port: int) -> list[str]:
        return [
            sys.executable, "-m", "gunicorn", "bench._apps:asgi",
            "-k", worker_class, "-w", "2", "-b", f"127.0.0.1:{port}",
            "--certfile", str(f.chain), "--keyfile", str(f.key),
            "--log-level", "warning",
        ]  # fmt: skip

    return argv


def pairs() -> list[tuple[str, Variant, Variant]]:
    """(label, staple's variant, the stdlib one) for each integration."""
    worker = _uvicorn_worker_class()
    return [
        (
            "uvicorn, 1 process",
            Variant("staple.uvicorn.run", _apps("staple-uvicorn"), stapling=True),
            Variant("uvicorn --ssl-certfile", _uvicorn("auto")),
        ),
        (  # the same on asyncio's loop: uvloop's TLS is Cython, staple's stays Python
            "uvicorn --loop asyncio, 1 process",
            Variant(
                "staple.uvicorn.run(loop='asyncio')",
                _apps("staple-uvicorn", "asyncio"),
                stapling=True,
            ),
            Variant("uvicorn --ssl-certfile --loop asyncio", _uvicorn("asyncio")),
        ),
        (
            "gunicorn + UvicornWorker, 2 workers",
            Variant(
                "staple.gunicorn.UvicornWorker",
                _gunicorn("staple.gunicorn.UvicornWorker"),
                workers=2,
                stapling=True,
            ),
            Variant(worker, _gunicorn(worker), workers=2),
        ),
        (
            "aiohttp run_app, 1 process",
            Variant("staple.aiohttp.run_app", _apps("staple-aiohttp"), stapling=True),
            Variant("aiohttp.web.run_app(ssl_context=)", _apps("aiohttp")),
        ),
    ]


class Server:
    """A server variant in its own session (so its workers are stopped with it), output to a
    log file. ``cpu()`` sums the CPU time of the process and all its descendants."""

    def __init__(self, variant: Variant, files: Files, log: Path) -> None:
        self.variant = variant
        self.port = _free_port()
        self.argv = variant.argv(files, self.port)
        self.log = log
        self.env = {k: v for k, v in os.environ.items() if k != "STAPLE_STORE"}
        self.env["STAPLE_CACHE_DIR"] = str(files.store)
        self.process: asyncio.subprocess.Process | None = None
        self.first_staple = 0  # bytes stapled on the first handshake

    def pids(self) -> list[int]:
        assert self.process is not None
        found, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(_proc.children(pid))
        return found

    def cpu(self) -> float:
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError):  # a process that just exited
                total += _proc.cpu_seconds(pid)
        return total

    def log_tail(self, lines: int = 12) -> list[str]:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return []
        return text.rstrip().splitlines()[-lines:]

    async def __aenter__(self) -> Self:
        with self.log.open("wb") as out:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                cwd=_proc.ROOT,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            await asyncio.wait_for(self._ready(), START_TIMEOUT)
        except BaseException as exc:
            await self._stop()
            if isinstance(exc, TimeoutError):
                raise RuntimeError(f"not serving after {START_TIMEOUT:.0f} s") from None
            raise
        return self

    async def _ready(self) -> None:
        """Every worker forked, and a GET answered over TLS."""
        assert self.process is not None
        while True:
            if self.process.returncode is not None:
                raise RuntimeError(f"exited with status {self.process.returncode}")
            if len(self.pids()) > self.variant.workers:
                with contextlib.suppress(RuntimeError):
                    answer = await _client.get(self.port, "/", tls=TLS)
                    if answer.get("http_ok"):
                        self.first_staple = int(answer.get("staple_len", 0))
                        return
            await asyncio.sleep(0.1)

    async def _stop(self) -> None:
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 15)
        with contextlib.suppress(ProcessLookupError):  # workers left behind, or no exit
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class KeepAliveRun:
    ok: int
    errors: int
    connections: int
    elapsed: float
    cpu: float

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.ok * 1e6 if self.ok else float("nan")

    @property
    def busy(self) -> float:
        return self.cpu / self.elapsed if self.elapsed else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.ok,
            "errors": self.errors,
            "connections": self.connections,
            "seconds": round(self.elapsed, 4),
            "server_cpu_s": round(self.cpu, 6),
            "per_s": round(self.rate, 1),
            "server_cpu_us_per_request": round(self.cpu_us, 1),
            "server_busy_cores": round(self.busy, 3),
        }


async def keepalive_run(server: Server, *, seconds: float) -> KeepAliveRun:
    cpu0 = server.cpu()
    result = await _keepalive.requests(server.port, seconds=seconds, procs=KEEPALIVE_PROCS, tls=TLS)
    return KeepAliveRun(
        ok=result["ok"],
        errors=result["errors"],
        connections=result["connections"],
        elapsed=result["elapsed"],
        cpu=server.cpu() - cpu0,
    )


def versions() -> dict[str, str]:
    found = {}
    for package in ("uvicorn", "uvicorn-worker", "httptools", "uvloop", "gunicorn", "aiohttp"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    return found


async def fill_store(m: Material, directory: Path) -> Path:
    """A FileStore directory holding ``m``'s small response for its leaf, as a server that
    fetched it before a restart would have left it."""
    certs = load_chain(m.chain)
    der = m.responses["small"]
    verified = ocsp.validate(der, certs[0], certs[1], now=datetime.now(UTC))
    await FileStore(directory).put(
        ocsp.cert_id(certs[0], certs[1]).key, der, expires=verified.expires
    )
    return directory


async def run(bench: Bench) -> Section:
    section = Section()
    found = versions()
    section.raw["versions"] = found
    section.rows.append(Row("servers", "versions", ", ".join(f"{k} {v}" for k, v in found.items())))
    rounds, seconds = (3, 0.5) if bench.quick else (6, 1.5)
    m = bench.material("ec")
    top = bench.workdir / "servers"
    top.mkdir(parents=True, exist_ok=True)
    files = Files(m.chain, m.key, await fill_store(m, top / "store"))
    if _keepalive.command() is None:
        section.notes.append(f"keep-alive rows skipped: {_keepalive.why_not()}")
    for label, ours, theirs in pairs():
        await _pair(section, label, (ours, theirs), files, top, rounds, seconds)
    return section


async def _pair(
    section: Section,
    label: str,
    variants: tuple[Variant, Variant],
    files: Files,
    top: Path,
    rounds: int,
    seconds: float,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        running: dict[str, Server] = {}
        for variant in variants:
            log = top / f"{re.sub(r'[^A-Za-z0-9.-]+', '_', variant.name)}.log"
            server = Server(variant, files, log)
            try:
                running[variant.name] = await stack.enter_async_context(server)
            except (RuntimeError, OSError) as exc:
                section.rows.append(
                    Row("servers", f"{variant.name} — {label}", f"did not run: {exc}")
                )
                section.notes.append(f"{variant.name}: {' '.join(server.argv)}")
                section.notes += [f"  {line}" for line in server.log_tail()]
        if not running:
            return
        names = list(running)
        section.rows.append(
            Row(
                "servers",
                f"first handshake stapled? — {label}",
                ", ".join(f"{n}: {'yes' if s.first_staple else 'no'}" for n, s in running.items()),
            )
        )
        for server in running.values():  # warm up: imports, caches, allocator; both loads
            await handshake_run(server, seconds=0.3, procs=HANDSHAKE_PROCS, tls=TLS)
            if _keepalive.command() is not None:
                await keepalive_run(server, seconds=0.3)

        async def handshake(name: str) -> HandshakeRun:
            return await handshake_run(
                running[name], seconds=seconds, procs=HANDSHAKE_PROCS, tls=TLS
            )

        results = await alternate(names, handshake, rounds)
        _rows(section, label, "new connection per request", variants, results)
        stapled = {
            n: sum(r.stapled for r in runs) / max(sum(r.ok for r in runs), 1)
            for n, runs in results.items()
        }
        for variant in variants:
            if variant.stapling and stapled.get(variant.name, 1.0) < 1.0:
                section.notes.append(f"{variant.name} ({label}) did not staple every handshake")
        section.rows.append(
            Row(
                "servers",
                f"  handshakes stapled — {label}",
                ", ".join(f"{n}: {fraction:.0%}" for n, fraction in stapled.items()),
                data={"stapled_fraction": stapled},
            )
        )
        if _keepalive.command() is None:
            return

        async def keepalive(name: str) -> KeepAliveRun:
            return await keepalive_run(running[name], seconds=seconds)

        kept = await alternate(names, keepalive, rounds)
        _rows(section, label, f"keep-alive, {KEEPALIVE_PROCS} connections", variants, kept)


def _rows(
    section: Section,
    label: str,
    load: str,
    variants: tuple[Variant, Variant],
    results: dict[str, list[HandshakeRun]] | dict[str, list[KeepAliveRun]],
) -> None:
    where = f"{label}, {load}"
    runs: dict[str, list[Any]] = dict(results)
    section.raw[where] = {n: [r.as_json() for r in rs] for n, rs in runs.items()}
    errors = {n: sum(r.errors for r in rs) for n, rs in runs.items()}
    if any(errors.values()):
        section.notes.append(f"{where}: client errors {errors}")
    ours, theirs = variants[0].name, variants[1].name
    if ours in runs and theirs in runs:
        a, b = runs[ours], runs[theirs]
        rate = Ratio.of([r.rate for r in a], [r.rate for r in b])
        cpu = Ratio.of([r.cpu_us for r in a], [r.cpu_us for r in b])
        a_rate, b_rate = median([r.rate for r in a]), median([r.rate for r in b])
        a_busy, b_busy = median([r.busy for r in a]), median([r.busy for r in b])
        a_us, b_us = median([r.cpu_us for r in a]), median([r.cpu_us for r in b])
        section.rows += [
            Row(
                "servers",
                f"requests/s staple÷stdlib — {where}",
                f"{rate}  [{a_rate:,.0f} vs {b_rate:,.0f}/s; busy {a_busy:.2f} vs "
                f"{b_busy:.2f} cores]",
                data={"ratio": rate.__dict__, "staple_per_s": a_rate, "stdlib_per_s": b_rate},
            ),
            Row(
                "servers",
                f"server CPU/request staple÷stdlib — {where}",
                f"{cpu}  [{a_us:,.0f} vs {b_us:,.0f} µs]",
                data={"ratio": cpu.__dict__, "staple_us": a_us, "stdlib_us": b_us},
            ),
        ]
        return
    for name, rs in runs.items():  # only one of the pair ran: its figures alone
        section.rows.append(
            Row(
                "servers",
                f"{name} alone — {where}",
                f"{median([r.rate for r in rs]):,.0f}/s, "
                f"{median([r.cpu_us for r in rs]):,.0f} µs server CPU/request",
            )
        )
