"""Python work per new TLS connection, counted: calls, allocations and where they happen.

``python -m bench.calls [--loop asyncio|uvloop] [--key ec|rsa] [--tls 1.3|1.2] [-n N]
[--app aiohttp|minimal] [--top K] [--json FILE]``; as a bench section, ``calls``.

In one process, a real server on loopback takes ``N`` connections from a client in another
process (pyOpenSSL, one connection at a time: full handshake asking for a staple, ``GET /``
with ``Connection: close``, read to the end, close_notify, close). The server is, in turn:

- ``socket``: :class:`staple.aiohttp.StaplingSite` ``transport="socket"`` (the default),
  stapling a small pre-signed response through a :class:`~staple.Stapler`;
- ``memory``: the same site on the memory-BIO transport;
- ``stdlib``: aiohttp's ``TCPSite`` with an ``ssl.SSLContext`` (asyncio's sslproto).

All three serve the same aiohttp app (``bench._server.app``, ``GET /`` answers ``ok``), or with
``--app minimal`` one small ``asyncio.Protocol`` that answers the first request and closes
(through ``staple.tls.create_server`` / ``loop.create_server(ssl=)``), which leaves the TLS
layer's own work with next to nothing on top, or with ``--app uvicorn`` the ASGI app of
``bench._apps`` on uvicorn (``http="auto"``): :class:`staple.uvicorn.Server` on either
transport, and ``uvicorn.Server`` with ``ssl_certfile``/``ssl_keyfile`` as the stdlib.

Only the server's event-loop thread is counted, only while the measured connections run:

- **calls**: :mod:`cProfile` on the loop thread (a profiler is per thread), every Python
  function call (a coroutine's or generator's resumption counts as a call) and every call of
  a C function from Python (``len``, ``list.append``, pyOpenSSL's cffi functions...);
  attributed by the file of the Python function, and C calls to the file of their caller;
- **allocations**: every block requested from Python's allocators (``PyMem_*`` and
  ``PyObject_*``: objects, buffers, frames beyond the free lists) on the loop thread, counted
  by a hook compiled on first use (``~/.cache/staple-bench/``; without a C compiler the column
  is left out); OpenSSL's own ``malloc``s are not Python's and are not counted;
- ``gc`` collections of the youngest generation per connection.

Counts hardly depend on timing (the client and the server ping-pong, one connection at a
time): runs of 300 connections repeat within 1 % on uvloop and 3 % on asyncio's loop, whose
timer heap (compared in Python) varies with what is scheduled. What remains timing-dependent:
whether the ClientHello has arrived when the connection is accepted (one ``do_handshake`` more
or less).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ._harness import KEY_NAMES, Bench, Section
from ._proc import ROOT
from ._stats import Row

VARIANTS = ("socket", "memory", "stdlib")  # staple socket BIO, staple memory BIO, stdlib
_REQUEST = b"GET / HTTP/1.1\r\nHost: bench.test\r\nConnection: close\r\n\r\n"
_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"

# -- allocation counting ------------------------------------------------------------------------

_ALLOC_SOURCE = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* Counts blocks requested from Python's allocators by the threads that turned counting on. */
static PyMemAllocatorEx orig[3];
static _Thread_local int counting;
static unsigned long long blocks[3];

#define HOOKS(i)                                                                            \
static void *m##i(void *ctx, size_t n) { if (counting) blocks[i]++;                        \
    return orig[i].malloc(orig[i].ctx, n); }                                                \
static void *c##i(void *ctx, size_t e, size_t n) { if (counting) blocks[i]++;              \
    return orig[i].calloc(orig[i].ctx, e, n); }                                             \
static void *r##i(void *ctx, void *p, size_t n) { if (counting && p == NULL) blocks[i]++;  \
    return orig[i].realloc(orig[i].ctx, p, n); }                                            \
static void f##i(void *ctx, void *p) { orig[i].free(orig[i].ctx, p); }
HOOKS(0) HOOKS(1) HOOKS(2)

static PyMemAllocatorEx hooks[3] = {
    {NULL, m0, c0, r0, f0}, {NULL, m1, c1, r1, f1}, {NULL, m2, c2, r2, f2}};
static const PyMemAllocatorDomain domains[3] = {
    PYMEM_DOMAIN_RAW, PYMEM_DOMAIN_MEM, PYMEM_DOMAIN_OBJ};
static int installed;

static PyObject *install(PyObject *self, PyObject *args) {
    if (!installed) {
        for (int i = 0; i < 3; i++) {
            PyMem_GetAllocator(domains[i], &orig[i]);
            PyMem_SetAllocator(domains[i], &hooks[i]);
        }
        installed = 1;
    }
    Py_RETURN_NONE;
}
static PyObject *start(PyObject *self, PyObject *args) { counting = 1; Py_RETURN_NONE; }
static PyObject *stop(PyObject *self, PyObject *args) { counting = 0; Py_RETURN_NONE; }
static PyObject *count(PyObject *self, PyObject *args) {
    return Py_BuildValue("(KKK)", blocks[0], blocks[1], blocks[2]);
}
static PyMethodDef methods[] = {
    {"install", install, METH_NOARGS, NULL}, {"start", start, METH_NOARGS, NULL},
    {"stop", stop, METH_NOARGS, NULL}, {"count", count, METH_NOARGS, NULL}, {NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_staple_alloccount", NULL, -1,
                                    methods};
PyMODINIT_FUNC PyInit__staple_alloccount(void) { return PyModule_Create(&module); }
"""


def _alloc_counter() -> ModuleType | None:
    """The allocation-counting hook, built on first use (``None`` if it cannot be)."""
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    include = sysconfig.get_paths()["include"]
    if compiler is None or not Path(include, "Python.h").exists():
        return None
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    key = f"{_ALLOC_SOURCE}{sys.version}{include}".encode()
    digest = hashlib.sha256(key).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "staple-bench"
    binary = cache / f"alloccount-{digest}{suffix}"
    if not binary.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            source = Path(tmp) / "alloccount.c"
            source.write_text(_ALLOC_SOURCE)
            out = Path(tmp) / f"out{suffix}"
            result = subprocess.run(
                [compiler, "-O2", "-shared", "-fPIC", f"-I{include}", "-o", str(out), str(source)],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                print(f"(the allocation counter did not build: {result.stderr.strip()})")
                return None
            os.replace(out, binary)
    loader = importlib.machinery.ExtensionFileLoader("_staple_alloccount", str(binary))
    spec = importlib.util.spec_from_loader("_staple_alloccount", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    module.install()
    return module


# -- the client (another process) ----------------------------------------------------------------


def client_main(port: int, warm: int, count: int, tls: str) -> None:
    """``warm`` connections, ``warm`` on stdout, wait for a line on stdin, ``count`` more;
    then one JSON line: connections made, staples received."""
    from OpenSSL import SSL

    from .tlslayer import _client as client_context

    ctx, staples = client_context(tls)

    def one() -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = SSL.Connection(ctx, sock)
        conn.set_tlsext_host_name(b"bench.test")
        conn.request_ocsp()
        conn.set_connect_state()
        conn.do_handshake()
        conn.sendall(_REQUEST)
        answer = b""
        while True:
            try:
                answer += conn.recv(65536)
            except (SSL.ZeroReturnError, SSL.SysCallError):
                break
        if not answer.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected answer {answer[:60]!r}")
        with contextlib.suppress(SSL.Error):
            conn.shutdown()
        sock.close()

    for _ in range(warm):
        one()
    print("warm", flush=True)
    sys.stdin.readline()
    staples.clear()
    for _ in range(count):
        one()
    print(json.dumps({"ok": count, "stapled": sum(1 for n in staples if n)}), flush=True)


# -- the servers ---------------------------------------------------------------------------------


class _Minimal(asyncio.Protocol):
    """Answers the first request with a fixed response and closes."""

    transport: asyncio.Transport
    open = 0  # connections made and not yet lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.received = b""
        _Minimal.open += 1

    def connection_lost(self, exc: BaseException | None) -> None:
        _Minimal.open -= 1

    def data_received(self, data: bytes) -> None:
        self.received += data
        if b"\r\n\r\n" in self.received:
            self.transport.write(_ANSWER)
            self.transport.close()


@dataclass
class _Server:
    port: int
    stop: Callable[[], Awaitable[None]]
    active: Callable[[], int]  # connections the application has and has not lost yet
    stapled: Callable[[], int] = field(default=lambda: 0)


async def _start(variant: str, app: str, chain: str, key: str, der: bytes) -> _Server:
    from aiohttp import web

    from staple import tls as staple_tls
    from staple.aiohttp import StaplingSite
    from staple.server_context import build_server_context

    from . import _server

    loop = asyncio.get_running_loop()
    stapler = None
    if variant == "stdlib":
        stdlib_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        stdlib_ctx.load_cert_chain(chain, key)
    else:
        stapler = await _server.preloaded_stapler(chain, der)
        staple_ctx = build_server_context([(chain, key)], stapler)
    transport: Any = variant

    async def close_stapler() -> None:
        if stapler is not None:
            await stapler.close()

    def stapled() -> int:
        return stapler.stapled if stapler is not None else 0

    if app == "uvicorn":
        return await _start_uvicorn(variant, chain, key, der)

    if app == "minimal":
        if variant == "stdlib":
            server = await loop.create_server(_Minimal, "127.0.0.1", 0, ssl=stdlib_ctx)
        else:
            server = await staple_tls.create_server(
                _Minimal, "127.0.0.1", 0, ssl_context=staple_ctx, transport=transport
            )

        async def stop_minimal() -> None:
            server.close()
            await server.wait_closed()
            await close_stapler()

        port = server.sockets[0].getsockname()[1]
        return _Server(port, stop_minimal, lambda: _Minimal.open, stapled)

    runner = web.AppRunner(_server.app(), access_log=None)
    await runner.setup()
    site: web.BaseSite
    if variant == "stdlib":
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=stdlib_ctx)
    else:
        site = StaplingSite(runner, "127.0.0.1", 0, ssl_context=staple_ctx, transport=transport)
    await site.start()
    port = runner.addresses[0][1]
    web_server = runner.server
    assert web_server is not None

    async def stop_site() -> None:
        await runner.cleanup()
        await close_stapler()

    return _Server(port, stop_site, lambda: len(web_server.connections), stapled)


async def _start_uvicorn(variant: str, chain: str, key: str, der: bytes) -> _Server:
    import uvicorn

    from staple.uvicorn import Server as StaplingServer

    from . import _apps, _server

    options: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "log_config": None,
        "access_log": False,
        "lifespan": "off",
        "http": "auto",
    }
    server: uvicorn.Server
    if variant == "stdlib":
        config = uvicorn.Config(_apps.asgi, ssl_certfile=chain, ssl_keyfile=key, **options)
        server = uvicorn.Server(config)
    else:
        store = await _server.preloaded_store(chain, der)
        config = uvicorn.Config(_apps.asgi, **options)
        server = StaplingServer(config, certs=[(chain, key)], store=store, transport=variant)
    config.load()
    server.lifespan = config.lifespan_class(config)  # as uvicorn.Server._serve() sets it up
    await server.startup()
    if not server.started:
        raise RuntimeError(f"uvicorn ({variant}) did not start")
    state = server.server_state

    async def stop() -> None:
        await server.shutdown()

    def stapled() -> int:
        stapler = getattr(server, "stapler", None)
        return stapler.stapled if stapler is not None else 0

    port = server.servers[0].sockets[0].getsockname()[1]
    return _Server(port, stop, lambda: len(state.connections), stapled)


# -- one measurement -----------------------------------------------------------------------------


@dataclass
class Counts:
    connections: int
    calls: int  # Python function calls + C function calls, on the loop thread
    python_calls: int
    c_calls: int
    blocks: int | None  # blocks from Python's allocators
    gc0: int  # youngest-generation collections
    stapled: int
    by_function: list[tuple[str, float]]  # per connection, most first
    by_area: dict[str, dict[str, float]]  # area -> {"python": n, "c": n} per connection

    def per(self, n: float) -> float:
        return n / self.connections

    def as_json(self) -> dict[str, Any]:
        n = self.connections
        return {
            "connections": n,
            "calls_per_connection": self.calls / n,
            "python_calls_per_connection": self.python_calls / n,
            "c_calls_per_connection": self.c_calls / n,
            "blocks_per_connection": None if self.blocks is None else self.blocks / n,
            "gc0_per_connection": self.gc0 / n,
            "stapled": self.stapled,
            "by_area": self.by_area,
            "top": self.by_function,
        }


def _area(filename: str) -> str:
    path = filename.replace(os.sep, "/")
    for marker, name in (
        ("/staple/", "staple"),
        ("/aiohttp/", "aiohttp"),
        ("/multidict/", "aiohttp"),
        ("/yarl/", "aiohttp"),
        ("/OpenSSL/", "pyOpenSSL"),
        ("/asyncio/", "asyncio"),
        ("/uvloop/", "uvloop"),
        ("/ssl.py", "stdlib ssl"),
        ("/bench/", "bench app"),
    ):
        if marker in path:
            return name
    if "/python3" in path and "site-packages" not in path:  # the standard library
        return f"stdlib {path.rsplit('/', 1)[-1]}"
    return "other Python"


def _label(code: Any) -> str:
    if isinstance(code, str):  # a C function: "<method 'append' of 'list' objects>"
        return code
    path = code.co_filename.replace(os.sep, "/")
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{short}:{getattr(code, 'co_qualname', code.co_name)}"


def _summarise(stats: list[Any], connections: int, top: int) -> tuple[int, int, list[Any], Any]:
    python_calls = c_calls = 0
    by_function: Counter[str] = Counter()
    by_area: dict[str, Counter[str]] = {}
    for entry in stats:
        code = entry.code
        by_function[_label(code)] += entry.callcount
        if isinstance(code, str):
            c_calls += entry.callcount
            continue
        python_calls += entry.callcount
        area = by_area.setdefault(_area(code.co_filename), Counter())
        area["python"] += entry.callcount
        for sub in entry.calls or ():
            if isinstance(sub.code, str):
                area["c"] += sub.callcount
    # C calls made from no profiled Python frame (from the loop itself, e.g. uvloop's C code):
    attributed = sum(area["c"] for area in by_area.values())
    if c_calls > attributed:
        by_area.setdefault("(no Python caller)", Counter())["c"] += c_calls - attributed
    top_functions = [(name, n / connections) for name, n in by_function.most_common(top)]
    areas = {
        name: {kind: n / connections for kind, n in sorted(counts.items())}
        for name, counts in sorted(by_area.items(), key=lambda kv: -sum(kv[1].values()))
    }
    return python_calls, c_calls, top_functions, areas


async def measure(
    variant: str,
    *,
    app: str,
    chain: str,
    key: str,
    der: bytes,
    tls: str,
    connections: int,
    warm: int = 20,
    top: int = 15,
    allocs: ModuleType | None = None,
    dump: str | None = None,
) -> Counts:
    """Serve ``warm`` + ``connections`` connections; count the last ``connections``."""
    loop = asyncio.get_running_loop()
    served = await _start(variant, app, chain, key, der)
    warmed = asyncio.Event()
    go = threading.Event()
    finished: asyncio.Future[dict[str, Any]] = loop.create_future()

    def drive() -> None:  # on a thread of its own, which is not counted
        try:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.calls",
                    "--client",
                    str(served.port),
                    str(warm),
                    str(connections),
                    tls,
                ],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert process.stdin is not None
            assert process.stdout is not None
            if process.stdout.readline().strip() != "warm":
                raise RuntimeError("the client failed while warming up")
            loop.call_soon_threadsafe(warmed.set)
            go.wait()
            process.stdin.write("go\n")
            process.stdin.flush()
            line = process.stdout.readline()
            process.wait()
            result = json.loads(line)
        except BaseException as exc:
            loop.call_soon_threadsafe(_fail, finished, exc)
        else:
            loop.call_soon_threadsafe(_succeed, finished, result)

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    try:
        await asyncio.wait_for(warmed.wait(), 120)
        while served.active():  # noqa: ASYNC110 - the warm-up's last close
            await asyncio.sleep(0.01)
        stapled0 = served.stapled()
        gc.collect()
        gc0 = gc.get_stats()[0]["collections"]
        profiler = cProfile.Profile()
        blocks0 = allocs.count() if allocs is not None else None
        profiler.enable()
        if allocs is not None:
            allocs.start()
        go.set()
        result = await asyncio.wait_for(finished, 300)
        while served.active():  # noqa: ASYNC110 - the last connection's close
            await asyncio.sleep(0)
        if allocs is not None:
            allocs.stop()
        profiler.disable()
        blocks = None if blocks0 is None or allocs is None else sum(allocs.count()) - sum(blocks0)
        gc1 = gc.get_stats()[0]["collections"]
    finally:
        thread.join(60)
        await served.stop()
    if result["ok"] != connections:
        raise RuntimeError(f"{variant}: {result['ok']} of {connections} connections made")
    if dump is not None:
        profiler.dump_stats(dump)  # for pstats: print_callers(), print_callees()
    stats = profiler.getstats()
    python_calls, c_calls, top_functions, areas = _summarise(stats, connections, top)
    return Counts(
        connections=connections,
        calls=python_calls + c_calls,
        python_calls=python_calls,
        c_calls=c_calls,
        blocks=blocks,
        gc0=gc1 - gc0,
        stapled=served.stapled() - stapled0,
        by_function=top_functions,
        by_area=areas,
    )


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _succeed(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


async def measure_all(
    *,
    app: str,
    chain: str,
    key: str,
    der: bytes,
    tls: str,
    connections: int,
    top: int,
    variants: tuple[str, ...] = VARIANTS,
    dump: str | None = None,
) -> dict[str, Counts]:
    allocs = _alloc_counter()
    return {
        variant: await measure(
            variant,
            app=app,
            chain=chain,
            key=key,
            der=der,
            tls=tls,
            connections=connections,
            top=top,
            allocs=allocs,
            dump=None if dump is None else f"{dump}.{variant}",
        )
        for variant in variants
    }


def report(results: dict[str, Counts], label: str) -> str:
    lines = [f"per connection (handshake + GET + close) — {label}"]
    lines.append(f"  {'server':<20} {'calls':>8} {'python':>8} {'C':>8} {'blocks':>8} {'gc0':>6}")
    for variant, c in results.items():
        blocks = "n/a" if c.blocks is None else f"{c.per(c.blocks):,.0f}"
        lines.append(
            f"  {variant:<20} {c.per(c.calls):>8,.0f} {c.per(c.python_calls):>8,.0f} "
            f"{c.per(c.c_calls):>8,.0f} {blocks:>8} {c.per(c.gc0):>6.2f}"
        )
    for variant, c in results.items():
        lines.append(f"\n{variant}: calls per connection by area (Python functions + C calls)")
        for area, kinds in c.by_area.items():
            python, cc = kinds.get("python", 0.0), kinds.get("c", 0.0)
            lines.append(f"  {area:<22} {python + cc:>7,.1f}  ({python:,.1f} + {cc:,.1f})")
        lines.append(f"{variant}: top functions, calls per connection")
        for name, n in c.by_function:
            lines.append(f"  {n:>7.2f}  {name}")
    return "\n".join(lines)


# -- the bench section ----------------------------------------------------------------------------


async def run(bench: Bench) -> Section:
    """Calls and allocations per connection, each loop in a process of its own."""
    section = Section()
    m = bench.material("ec")
    connections = 100 if bench.quick else 400
    loops = ("asyncio",) if bench.quick else ("asyncio", "uvloop")
    runs = [("aiohttp", "1.3")] if bench.quick else [("aiohttp", "1.3"), ("aiohttp", "1.2")]
    runs.append(("uvicorn", "1.3"))
    for loop_name in loops:
        for app, tls in runs:
            out = bench.workdir / f"calls-{loop_name}-{app}-{tls}.json"
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.calls",
                "--loop",
                loop_name,
                "--tls",
                tls,
                "--app",
                app,
                "-n",
                str(connections),
                "--chain",
                str(m.chain),
                "--key-file",
                str(m.key),
                "--response",
                str(m.response_path("small")),
                "--json",
                str(out),
                cwd=ROOT,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            _, err = await process.communicate()
            if process.returncode != 0:
                section.notes.append(
                    f"calls ({loop_name}, {app}, TLS {tls}) failed: {err.decode()[-500:]}"
                )
                continue
            data = json.loads(out.read_text())
            label = f"{KEY_NAMES['ec']}, TLS {tls}, {loop_name}, {app} app"
            stdlib = data["stdlib"]
            for variant in VARIANTS:
                d = data[variant]
                blocks = d["blocks_per_connection"]
                shown = f"{d['calls_per_connection']:,.0f} calls"
                if blocks is not None:
                    shown += f", {blocks:,.0f} blocks"
                if variant != "stdlib":
                    ratio = d["calls_per_connection"] / stdlib["calls_per_connection"]
                    shown += f"  [÷ stdlib {ratio:.2f}×"
                    if blocks is not None and stdlib["blocks_per_connection"]:
                        shown += f", {blocks / stdlib['blocks_per_connection']:.2f}×"
                    shown += "]"
                section.rows.append(
                    Row("calls", f"Python per connection, {variant} — {label}", shown, "", None, d)
                )
            section.raw[f"{loop_name}-{app}-{tls}"] = data
    return section


# -- command line ---------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        port, warm, count, tls = sys.argv[2:6]
        client_main(int(port), int(warm), int(count), tls)
        return
    parser = argparse.ArgumentParser(
        prog="python -m bench.calls", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--key", choices=("ec", "rsa"), default="ec")
    parser.add_argument("--tls", choices=("1.3", "1.2"), default="1.3")
    parser.add_argument("-n", "--connections", type=int, default=300)
    parser.add_argument("--app", choices=("aiohttp", "minimal", "uvicorn"), default="aiohttp")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, of: {', '.join(VARIANTS)}",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the counts as JSON")
    parser.add_argument(
        "--dump",
        metavar="PREFIX",
        help="also write each variant's cProfile stats to PREFIX.VARIANT (for pstats)",
    )
    parser.add_argument("--chain", help=argparse.SUPPRESS)  # material made by the bench
    parser.add_argument("--key-file", help=argparse.SUPPRESS)
    parser.add_argument("--response", help=argparse.SUPPRESS)
    args = parser.parse_args()
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(unknown)}")

    with tempfile.TemporaryDirectory(prefix="staple-calls-") as tmp:
        if args.chain:
            chain, key, der = args.chain, args.key_file, Path(args.response).read_bytes()
        else:
            from . import _pki

            m = _pki.make(args.key, Path(tmp))
            chain, key, der = str(m.chain), str(m.key), m.responses["small"]

        async def go() -> dict[str, Counts]:
            return await measure_all(
                app=args.app,
                chain=chain,
                key=key,
                der=der,
                tls=args.tls,
                connections=args.connections,
                top=args.top,
                variants=variants,
                dump=args.dump,
            )

        if args.loop == "uvloop":
            import uvloop

            results = uvloop.run(go())
        else:
            results = asyncio.run(go())
    label = f"{KEY_NAMES[args.key]}, TLS {args.tls}, {args.loop}, {args.app} app"
    print(report(results, label))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v.as_json() for k, v in results.items()}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
