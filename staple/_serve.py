"""``staple serve``: an aiohttp HTTPS server that staples, for trying staple on real clients.

One :class:`~staple.Stapler` (responses persisted in a :class:`~staple.FileStore`, so a restart
staples its first handshake even while the responder is down), one SNI-aware pyOpenSSL context
from :func:`~staple.server_context.build_server_context`, served by
:class:`~staple.aiohttp.StaplingSite`. Routes:

- ``/``: an HTML page with each certificate's staple status;
- ``/status.json``: the same, as JSON;
- ``/static/...``: the files under ``--static``: regular files up to 64 KiB from memory
  (:class:`SmallFiles`, revalidated by ``os.stat`` on every request), everything else
  (larger files, ``Range`` and ``If-Match`` requests, directory indexes, refusals) by aiohttp's
  ``add_static``, i.e. ``FileResponse`` and ``loop.sendfile`` over staple's TLS transport.

``staple serve`` runs on uvloop when it is installed (``--loop auto``, see :func:`loop_factory`):
about 0.9× the CPU per handshake of asyncio's loop.

:func:`serve` is the whole command as a coroutine, so tests run it on their own loop::

    ready = loop.create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(ServeConfig(certs=[(chain, key)], port=0), ready=ready,
                                     stop=stop))
    serving = await ready          # a Serving: .port, .url, .stapler, .handles
    ...
    stop.set()
    assert await task == 0
"""

from __future__ import annotations

import asyncio
import html
import importlib.util
import json
import mimetypes
import os
import signal
import stat
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware
from OpenSSL import SSL

from . import ocsp
from .aiohttp import StaplingSite
from .errors import ChainError, OcspError
from .handle import Event, ServerOcspResponse
from .policy import RefreshPolicy
from .server_context import build_server_context, host_names
from .stapler import Stapler
from .store import FileStore, MemoryStore, Store

__all__ = [
    "LOOPS",
    "LoopUnavailable",
    "ServeConfig",
    "Serving",
    "SmallFiles",
    "default_cache_dir",
    "describe_loop",
    "loop_factory",
    "serve",
    "status_of",
]

EXIT_OK, EXIT_USAGE = 0, 2


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/staple``, else ``~/.cache/staple``: per user, survives restarts."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "staple"


MAX_HANDSHAKES = 1024
"""Connections allowed in the TLS handshake at once; more are refused (slowloris floods)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeConfig:
    """What ``staple serve`` was asked to do."""

    certs: Sequence[tuple[str | os.PathLike[str], str | os.PathLike[str]]]
    """``(chain.pem, key.pem)`` pairs; the chain is leaf first, then its issuer."""
    host: str = "127.0.0.1"
    port: int = 8443
    """0 picks a free port (printed, and in :attr:`Serving.port`)."""
    cache_dir: str | os.PathLike[str] | None = field(default_factory=default_cache_dir)
    """Where responses persist (a :class:`FileStore`); ``None`` keeps them in memory only."""
    store_url: str | None = None
    """A shared store for a fleet (``redis://HOST:PORT/DB``); overrides ``cache_dir``."""
    responder: str | None = None
    """Ask this OCSP URL for every certificate instead of the one in its AIA extension."""
    static: str | os.PathLike[str] | None = None
    """A directory served under ``/static/``."""
    policy: RefreshPolicy | None = None
    """Refresh and validation knobs (tests shorten timeouts); default production values."""


@dataclass(frozen=True, slots=True)
class Serving:
    """Handed to ``ready`` once the server accepts connections."""

    url: str
    host: str
    port: int
    stapler: Stapler
    handles: list[ServerOcspResponse]
    files: SmallFiles | None = None
    """What ``--static`` serves from memory (``None`` without ``--static``)."""


async def serve(
    config: ServeConfig,
    *,
    out: TextIO | None = None,
    ready: asyncio.Future[Serving] | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Run ``staple serve`` until ``stop`` is set (default: until SIGINT or SIGTERM).

    Prints ``listening on https://HOST:PORT``, ``event loop: ...`` (:func:`describe_loop`) and
    one status line per certificate to ``out`` (default stdout), then one line per refresher
    event; the first line stays exactly ``listening on URL``, as scripts match it whole.
    Returns the exit code: 0 after a clean shutdown, 2 when it could not start (unreadable
    chain or key, no responder, port in use); ``ready`` then gets a ``RuntimeError`` instead
    of a :class:`Serving`.
    """
    out = out or sys.stdout
    signals: list[signal.Signals] = []
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                continue
            signals.append(sig)
    started = False

    def on_update(event: Event) -> None:
        if started:  # before that, the status lines say it all
            _say(out, f"{_stamp()} {event}")

    store: Store
    redis_store = None
    if config.store_url is not None:
        if not config.store_url.startswith(("redis://", "rediss://", "unix://")):
            print(
                f"staple serve: --store {config.store_url!r}: expected redis://HOST:PORT/DB",
                file=sys.stderr,
                flush=True,
            )
            return EXIT_USAGE
        from .redis_store import RedisStore  # redis loads only for fleets

        store = redis_store = RedisStore(config.store_url)
    elif config.cache_dir is not None:
        store = FileStore(config.cache_dir)
    else:
        store = MemoryStore()
    stapler = Stapler(store=store, policy=config.policy, on_update=on_update)
    runner: web.AppRunner | None = None
    try:
        try:
            _check_paths(config)
            if redis_store is not None:
                # Subscribe before the first fetch so no fleet notice is missed; Redis being
                # down is not fatal (the store fails open and every server fetches itself).
                await redis_store.connect()
            handles = await _open_handles(stapler, config)
            ctx = _server_context(config, stapler)
            files = SmallFiles(Path(config.static)) if config.static is not None else None
            runner = web.AppRunner(_app(config, stapler, handles, files), access_log=None)
            await runner.setup()
            site = await _listen(runner, config, ctx)
        except _CannotStart as exc:
            print(f"staple serve: {exc}", file=sys.stderr, flush=True)
            if ready is not None and not ready.done():
                ready.set_exception(RuntimeError(str(exc)))
            return EXIT_USAGE
        _say(out, f"listening on {site.name}")
        _say(out, f"event loop: {describe_loop(loop)}")
        for handle in handles:
            _say(out, status_line(handle))
        started = True
        if ready is not None and not ready.done():
            ready.set_result(Serving(site.name, config.host, site.port, stapler, handles, files))
        await stop.wait()
        started = False  # shutting down: the handles' "closed" events are noise
        return EXIT_OK
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        if runner is not None:
            await runner.cleanup()
        await stapler.close()
        await store.close()


class _CannotStart(Exception):
    """Why ``staple serve`` cannot start: a usage problem, exit 2."""


def _say(out: TextIO, line: str) -> None:
    print(line, file=out, flush=True)


def _stamp() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _check_paths(config: ServeConfig) -> None:
    if not config.certs:
        raise _CannotStart("at least one --cert CHAIN.pem --key KEY.pem pair is needed")
    for chain, key in config.certs:
        for what, path in (("certificate chain", chain), ("key", key)):
            if not os.path.isfile(path):
                raise _CannotStart(f"{what} {os.fspath(path)!r} is not a readable file")
    if config.static is not None and not os.path.isdir(config.static):
        raise _CannotStart(f"--static {os.fspath(config.static)!r} is not a directory")


async def _open_handles(stapler: Stapler, config: ServeConfig) -> list[ServerOcspResponse]:
    """A handle per certificate, opened concurrently (each may wait for its first response)."""
    urls = [config.responder] if config.responder else None

    async def add(chain: str | os.PathLike[str]) -> ServerOcspResponse | OcspError:
        try:
            return await stapler.add(Path(chain), responder_urls=urls)
        except OcspError as exc:  # ChainError, NoResponderError
            return exc

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(add(chain)) for chain, _ in config.certs]
    handles: list[ServerOcspResponse] = []
    for (chain, _), task in zip(config.certs, tasks, strict=True):
        result = task.result()
        if isinstance(result, OcspError):
            raise _CannotStart(f"{os.fspath(chain)}: {result}")
        handles.append(result)
    return handles


def _server_context(config: ServeConfig, stapler: Stapler) -> SSL.Context:
    try:
        return build_server_context(
            [(os.fspath(chain), os.fspath(key)) for chain, key in config.certs], stapler
        )
    except ChainError as exc:  # e.g. a key that does not match its certificate
        raise _CannotStart(str(exc)) from None


async def _listen(runner: web.AppRunner, config: ServeConfig, ctx: SSL.Context) -> StaplingSite:
    site = StaplingSite(
        runner, config.host, config.port, ssl_context=ctx, max_handshakes=MAX_HANDSHAKES
    )
    try:
        await site.start()
    except OSError as exc:
        raise _CannotStart(
            f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
        ) from None
    return site


# -- event loop ------------------------------------------------------------------------------

LOOPS = ("auto", "asyncio", "uvloop")
"""``--loop`` choices. ``auto``: uvloop when it can be imported, else asyncio's loop (as
uvicorn's ``--loop auto``); uvloop measured 0.80–0.99× the CPU per handshake (bench/README.md)."""


class LoopUnavailable(Exception):
    """``--loop uvloop`` without uvloop: ``staple serve`` says so and exits 2."""


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory for ``asyncio.Runner`` that ``--loop NAME`` asks for; ``None`` is
    asyncio's default loop.

    The loop must exist before :func:`serve` runs, so the command line picks it up front
    (``staple._cli.main``); :func:`serve` itself runs on whatever loop it is given.
    """
    if name not in LOOPS:
        raise ValueError(f"--loop {name!r}: expected one of {', '.join(LOOPS)}")
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError as exc:
        if name == "auto":
            return None
        raise LoopUnavailable(
            f"--loop uvloop: uvloop cannot be imported ({exc}); "
            "pip install 'ocsp-staple[uvloop]', or use --loop asyncio"
        ) from None
    return uvloop.new_event_loop


def describe_loop(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop 0.23.0`` or ``asyncio``, for the startup lines: which loop actually runs."""
    package = type(loop).__module__.partition(".")[0]
    if package == "uvloop":
        return f"uvloop {getattr(sys.modules['uvloop'], '__version__', '')}".rstrip()
    if package == "asyncio":
        if importlib.util.find_spec("uvloop") is None:
            return "asyncio (uvloop is not installed)"
        return "asyncio"
    return f"{type(loop).__module__}.{type(loop).__qualname__}"


# -- status ----------------------------------------------------------------------------------


def status_of(handle: ServerOcspResponse) -> dict[str, Any]:
    """What a certificate's handle staples right now (or why nothing), as plain data."""
    info: dict[str, Any] = {
        "certificate": handle.subject,
        "names": sorted(host_names(handle.cert)),
        "responders": list(handle.urls),
        "stapling": False,
        "status": None,
        "this_update": None,
        "next_update": None,
        "next_refresh": _iso(handle.next_refresh),
        "reason": None,
    }
    ctx = handle.get_context()
    if ctx is None:
        info["reason"] = str(handle.last_error) if handle.last_error else "no response yet"
        held = handle.response  # e.g. a revocation the policy withholds
        if held is not None:
            info["status"] = held.cert_status.name.lower()
        return info
    with ctx:
        info.update(
            stapling=True,
            status=ctx.cert_status.name.lower(),
            this_update=_iso(ctx.this_update),
            next_update=_iso(ctx.next_update),
            size=len(ctx.encoded),
        )
        if ctx.revocation_time is not None:
            info["revocation_time"] = _iso(ctx.revocation_time)
    return info


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds") if moment is not None else None


def status_line(handle: ServerOcspResponse) -> str:
    """One line per certificate, as ``staple serve`` prints it at start."""
    info = status_of(handle)
    head = f"{info['certificate']} [{', '.join(info['names'])}]"
    if not info["stapling"]:
        return f"{head}: NO STAPLE: {info['reason']}; next attempt {info['next_refresh']}"
    line = f"{head}: stapling {info['status']}"
    if "revocation_time" in info:
        line += f" (revoked {info['revocation_time']})"
    return (
        f"{line}, nextUpdate {info['next_update']}, next refresh {info['next_refresh']}"
        if info["next_refresh"]
        else f"{line}, nextUpdate {info['next_update']}"
    )


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>staple serve</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: .3em .6em; text-align: left; vertical-align: top; }}
.good {{ color: #060; }} .revoked, .none {{ color: #a00; }}
</style></head>
<body>
<h1>staple serve</h1>
<p>{summary}</p>
<table>
<tr><th>certificate</th><th>names</th><th>staple</th><th>thisUpdate</th><th>nextUpdate</th>
<th>next refresh</th></tr>
{rows}
</table>
<p>This connection: {connection}. Same data as JSON: <a href="/status.json">/status.json</a>.
{static}</p>
</body></html>
"""


def render_page(
    statuses: Sequence[dict[str, Any]], *, stapled: int, connection: str, static: bool = False
) -> str:
    """The ``/`` page; every value from a certificate or an error is HTML-escaped."""
    rows = []
    for info in statuses:
        if info["stapling"]:
            staple = f'<span class="{info["status"]}">{html.escape(info["status"])}</span>'
        else:
            staple = f'<span class="none">none: {html.escape(str(info["reason"]))}</span>'
        cells = [
            html.escape(info["certificate"]),
            html.escape(", ".join(info["names"])),
            staple,
            html.escape(info["this_update"] or "-"),
            html.escape(info["next_update"] or "-"),
            html.escape(info["next_refresh"] or "-"),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return _PAGE.format(
        summary=f"{len(statuses)} certificate(s); {stapled} handshake(s) stapled so far.",
        rows="\n".join(rows),
        connection=html.escape(connection),
        static='Files: <a href="/static/">/static/</a>.' if static else "",
    )


def _app(
    config: ServeConfig,
    stapler: Stapler,
    handles: list[ServerOcspResponse],
    files: SmallFiles | None = None,
) -> web.Application:
    app = web.Application()

    async def index(request: web.Request) -> web.Response:
        page = render_page(
            [status_of(h) for h in handles],
            stapled=stapler.stapled,
            connection=_describe_connection(request),
            static=config.static is not None,
        )
        return web.Response(text=page, content_type="text/html")

    async def status(request: web.Request) -> web.Response:
        body = {
            "stapled": stapler.stapled,
            "unstapled": stapler.unstapled,
            "certificates": [status_of(h) for h in handles],
        }
        return web.Response(text=json.dumps(body, indent=2), content_type="application/json")

    app.router.add_get("/", index)
    app.router.add_get("/status.json", status)
    if config.static is not None:
        static = app.router.add_static("/static/", Path(config.static), show_index=True)
        if files is not None:
            app.middlewares.append(files.middleware(static))
    return app


def _describe_connection(request: web.Request) -> str:
    transport = request.transport
    conn = transport.get_extra_info("ssl_object") if transport is not None else None
    if conn is None:
        return "unknown"
    try:
        cert = conn.get_certificate(as_cryptography=True)
        served = ocsp.describe(cert) if cert is not None else "no certificate"
        name = conn.get_servername()
        sni = name.decode("ascii", "replace") if name else "none"
        return f"{conn.get_protocol_version_name()}, SNI {sni}, certificate {served}"
    except Exception:  # cosmetic: never fail the page over it
        return "unknown"


# -- static files ------------------------------------------------------------------------------

SMALL_FILE = 64 * 1024
"""Regular files up to this size are served from memory; larger ones by ``FileResponse``."""
MEMORY_BUDGET = 16 * 1024 * 1024
"""At most this many bytes of files are kept; the least recently served go first."""
SETTLED_NS = 2_000_000_000
"""A file changed (ctime) less than this long before it was read is not kept: see
:class:`SmallFiles`."""

_ENCODINGS = ((".br", "br"), (".gz", "gzip"))  # aiohttp's precompressed siblings, in its order
_CONTENT_TYPES = mimetypes.MimeTypes()  # set up as aiohttp's FileResponse does its own
_CONTENT_TYPES.encodings_map.clear()  # "x.tar.gz" is application/gzip, not a gzipped tar
for _type, _ext in (
    ("application/gzip", ".gz"),
    ("application/x-brotli", ".br"),
    ("application/x-bzip2", ".bz2"),
    ("application/x-compress", ".Z"),
    ("application/x-xz", ".xz"),
):
    _CONTENT_TYPES.add_type(_type, _ext)

_Identity = tuple[int, int, int, int, int]


def _identity(st: os.stat_result) -> _Identity:
    """What changes when a file is replaced (device, inode) or written (size, mtime, ctime)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _File:
    """A small file's bytes and the headers ``FileResponse`` would send with them."""

    __slots__ = ("body", "etag", "headers", "identity", "mtime", "not_modified", "real")

    def __init__(self, real: str, body: bytes, st: os.stat_result) -> None:
        self.real = real
        self.body = body
        self.identity = _identity(st)
        self.mtime = st.st_mtime
        self.etag = f"{st.st_mtime_ns:x}-{st.st_size:x}"  # FileResponse's, so both agree
        # Formatted by aiohttp's own setters, so the bytes on the wire match FileResponse's.
        like = web.StreamResponse()
        like.etag = self.etag
        like.last_modified = st.st_mtime
        self.not_modified = dict(like.headers)
        like.content_type = _CONTENT_TYPES.guess_type(real)[0] or "application/octet-stream"
        like.headers[hdrs.ACCEPT_RANGES] = "bytes"
        self.headers = dict(like.headers)


class SmallFiles:
    """Serve ``--static``'s small regular files from memory, in front of aiohttp's static route.

    Why: ``FileResponse`` hands ``stat``/``open``/``read``/``close`` to the default executor
    (thread hand-offs on every request) and streams through the sendfile fallback; profiled
    under ``bench nginx``, ``GET /static/hello.txt`` cost ~1,340 µs of server CPU against
    ~940 µs for ``/status.json``. From memory, a request costs one ``os.stat``.

    Every request is revalidated: ``os.stat`` of the requested path (following symlinks, as
    the first lookup did) must give the same device, inode, size, mtime and ctime as the bytes
    kept, so an edit, a replacement (rename over it) or a removal is seen by the very next
    request. A file whose ctime is less than :data:`SETTLED_NS` old when read is served but not
    kept: timestamps are coarse (a kernel tick, 1–10 ms; seconds on some filesystems), and a
    same-size rewrite within one tick would otherwise look unchanged (git's "racily clean").

    The ``stat`` (and, on a miss, ``realpath``, ``open`` and a read of at most 64 KiB) run
    synchronously on the event loop. That is deliberate: on a local filesystem they are
    microseconds from the dentry and page caches, far less than a thread hand-off, and it is
    what nginx does too (its ``open``/``fstat``/``read`` block its worker; ``open_file_cache``
    only skips them for a while). On a network filesystem a ``stat`` can stall the loop for a
    round trip: serve ``--static`` from local disk.

    Anything else is left to aiohttp's static route, unchanged: files over :data:`SMALL_FILE`,
    non-regular files, directories (the index), anything missing or refused (403/404), requests
    with ``Range``, ``If-Match`` or ``If-Unmodified-Since``, and files with a precompressed
    ``.br``/``.gz`` sibling the client accepts. ``If-None-Match`` and ``If-Modified-Since`` are
    answered here with ``FileResponse``'s rules (304, same ETag and Last-Modified).

    Path safety: a path is kept only after the checks aiohttp's static route makes (not
    absolute, no NUL, ``realpath`` inside the root, so no ``..`` and no symlink leads out);
    what it names is then identified by inode, so a kept path that is later swapped for a
    symlink pointing elsewhere no longer matches and is checked afresh.
    """

    def __init__(
        self, root: Path, *, max_size: int = SMALL_FILE, budget: int = MEMORY_BUDGET
    ) -> None:
        self.root = root.expanduser().resolve(strict=True)  # as add_static resolves it
        self.max_size = max_size
        self.budget = budget
        self.served = 0
        """Responses answered from memory (200 and 304)."""
        self.size = 0
        """Bytes kept."""
        self._base = os.path.join(self.root, "")  # "ROOT/"; joined by +, never os.path.join
        self._files: OrderedDict[str, _File] = OrderedDict()  # by requested path, LRU first

    def __len__(self) -> int:
        return len(self._files)

    def middleware(self, static: web.AbstractResource) -> Middleware:
        """A middleware answering requests routed to ``static`` when it can, else passing on."""

        @web.middleware
        async def small_files(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.match_info.route.resource is static:
                response = self.respond(request)
                if response is not None:
                    return response
            return await handler(request)

        return small_files

    def respond(self, request: web.Request) -> web.Response | None:
        """The response for a request to the static route, or ``None``: ask ``FileResponse``."""
        headers = request.headers
        if hdrs.RANGE in headers or hdrs.IF_MATCH in headers or hdrs.IF_UNMODIFIED_SINCE in headers:
            return None
        file = self.get(request.match_info["filename"])
        if file is None:
            return None
        accepted = headers.get(hdrs.ACCEPT_ENCODING)
        if accepted and _has_precompressed(file.real, accepted.lower()):
            return None
        self.served += 1
        etags = request.if_none_match
        if etags is not None:
            if (len(etags) == 1 and etags[0].value == "*") or any(
                etag.value == file.etag for etag in etags
            ):
                return web.Response(status=304, headers=file.not_modified)
        elif (since := request.if_modified_since) is not None and file.mtime <= since.timestamp():
            return web.Response(status=304, headers=file.not_modified)
        return web.Response(body=file.body, headers=file.headers)

    def get(self, filename: str) -> _File | None:
        """``filename`` (relative to the root, as routed) if it is a small regular file inside
        the root, as it is now; ``None`` for anything else."""
        path = self._base + filename
        file = self._files.get(filename)
        if file is not None:
            try:
                current = _identity(os.stat(path))
            except OSError:
                current = None
            if current == file.identity:
                self._files.move_to_end(filename)
                return file
            self._forget(filename)
        return self._load(filename, path)

    def _load(self, filename: str, path: str) -> _File | None:
        if "\x00" in filename or os.path.isabs(filename):  # aiohttp: 404
            return None
        try:
            real = Path(path).resolve()
            real.relative_to(self.root)  # ValueError: ".." or a symlink leads out
            st = os.stat(real)
        except (OSError, ValueError, RuntimeError):  # RuntimeError: a symlink loop
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size > self.max_size:
            return None
        try:
            # O_NONBLOCK: were it swapped for a FIFO since the stat, open must not wait.
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            body = b""
            while chunk := os.read(fd, self.max_size + 1 - len(body)):
                body += chunk
            read = os.fstat(fd)
        except OSError:
            return None
        finally:
            os.close(fd)
        if len(body) != read.st_size or _identity(read) != _identity(st):
            return None  # changed while read: FileResponse serves whatever it finds
        file = _File(str(real), body, read)
        if time.time_ns() - read.st_ctime_ns >= SETTLED_NS:
            self._keep(filename, file)
        return file

    def _keep(self, filename: str, file: _File) -> None:
        self._files[filename] = file
        self.size += len(file.body)
        while self.size > self.budget:
            _, evicted = self._files.popitem(last=False)
            self.size -= len(evicted.body)

    def _forget(self, filename: str) -> None:
        self.size -= len(self._files.pop(filename).body)


def _has_precompressed(real: str, accepted: str) -> bool:
    """Whether ``FileResponse`` would send a ``.br``/``.gz`` sibling instead (it ``lstat``s)."""
    for extension, encoding in _ENCODINGS:
        if encoding in accepted:
            try:
                if stat.S_ISREG(os.lstat(real + extension).st_mode):
                    return True
            except OSError:
                continue
    return False
