"""``staple serve``: an aiohttp HTTPS server that staples, for trying staple on real clients.

One :class:`~staple.Stapler` (responses persisted in a :class:`~staple.FileStore`, so a restart
staples its first handshake even while the responder is down, or shared through Redis with
``--store``), served by :class:`~staple.aiohttp.StaplingServer` (what
:func:`staple.aiohttp.run_app` runs too). Routes (:mod:`staple.status_page`):

- ``/``: an HTML page with each certificate's staple status;
- ``/status.json``: the same, as JSON;
- ``/static/...``: the files under ``--static``: regular files up to 64 KiB from memory
  (:class:`~staple.static_files.SmallFiles`), everything else by aiohttp's ``add_static``.

With ``--app MODULE:ATTR`` it serves your application instead of the status page: an
``aiohttp.web.Application`` (or a factory of one) on :class:`~staple.aiohttp.StaplingServer`, an
ASGI application on uvicorn's protocols (:mod:`staple.cli.serve_asgi`, the ``asgi`` extra);
:mod:`staple.app_loader` tells which. ``--workers N`` forks N processes accepting on one socket
bound by the parent (:mod:`staple.workers`, as ``staple.uvicorn.run(workers=N)``); with the
:class:`~staple.FileStore` they share, its lock lets one of them fetch each certificate's
response per refresh while the others adopt it.

``staple serve`` runs on uvloop when it is installed (``--loop auto``, see :func:`loop_factory`):
about 0.9× the CPU per handshake of asyncio's loop.

:func:`serve` is the whole command as a coroutine, so tests run it on their own loop::

    ready = loop.create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(ServeConfig(certs=[(chain, key)], port=0), ready=ready,
                                     stop=stop))
    serving = await ready          # a Serving: .port, .url, .stapler, .handles, .server
    ...
    stop.set()
    assert await task == 0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from aiohttp import web

from .. import tls
from ..aiohttp import StaplingServer, StartError, _stop_on_signals
from ..app_loader import AppError, AppKind, FoundApp, MadeApp, find_app, make_app
from ..handle import Event, ServerOcspResponse
from ..policy import RefreshPolicy
from ..proxy import ProxyOption
from ..server_context import TLSProfile
from ..stapler import Stapler
from ..static_files import SmallFiles
from ..status_page import status_app, status_line
from ..store import Store
from ..workers import run_workers
from .options import (
    add_proxy_argument,
    add_store_arguments,
    default_cache_dir,
    open_store,
    proxy_option,
    store_url_problem,
)

__all__ = [
    "LOOPS",
    "LoopUnavailable",
    "ServeConfig",
    "Serving",
    "add_arguments",
    "default_cache_dir",
    "describe_loop",
    "loop_factory",
    "run",
    "serve",
    "serve_workers",
]

EXIT_OK, EXIT_USAGE = 0, 2

HELP = "an HTTPS server that staples: a status page, or your aiohttp/ASGI app, until Ctrl-C"
DESCRIPTION = (
    "Serve HTTPS on HOST:PORT with an OCSP staple for every certificate: a status page, or the "
    "application --app names. Prints 'listening on https://HOST:PORT' and one status line per "
    "certificate, then one line per refresh event (with --workers, each worker's lines start "
    "with 'worker PID: ')."
)
EPILOG = """\
routes without --app:
  /              HTML page with each certificate's staple status
  /status.json   the same as JSON
  /static/...    files under --static (with an index); files up to 64 KiB from memory

--app MODULE:ATTR (MODULE imported from the current directory):
  an aiohttp.web.Application, or a factory of one (called with the argument list, or
  nothing; may be async), served by aiohttp; or an ASGI application (async, taking scope,
  receive, send; HTTP, WebSocket, lifespan), served by uvicorn: pip install 'ocsp-staple[asgi]'

--workers N forks N processes on one listening socket; one that dies is replaced. With the
cache directory (the default) they fetch each response once for all (a lock in the
directory); with --no-cache each fetches its own; with --store they share Redis.

exit codes: 0 stopped by SIGINT/SIGTERM, 2 could not start (bad chain/key, no responder,
port in use, an --app that cannot be imported or served). Without --no-cache, a restart
staples its first handshake from the cache even while the responder is down.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cert",
        metavar="CHAIN.pem",
        action="append",
        required=True,
        help="leaf certificate then its issuer; repeat for several (SNI, RSA + ECDSA)",
    )
    parser.add_argument(
        "--key", metavar="KEY.pem", action="append", required=True, help="one per --cert"
    )
    parser.add_argument(
        "--app",
        metavar="MODULE:ATTR",
        help="serve this aiohttp Application (or factory of one) or ASGI app instead of the "
        "status page",
    )
    parser.add_argument(
        "--workers",
        metavar="N",
        type=int,
        default=1,
        help="worker processes sharing the port, restarted if they die (1)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8443, help="0 picks a free port (8443)")
    add_store_arguments(parser)
    add_proxy_argument(parser)
    parser.add_argument(
        "--responder", metavar="URL", help="ask this OCSP URL instead of each certificate's AIA one"
    )
    parser.add_argument("--static", metavar="DIR", type=Path, help="serve DIR under /static/")
    parser.add_argument(
        "--tls-profile",
        choices=[p.value for p in TLSProfile],
        default=TLSProfile.INTERMEDIATE.value,
        help="Mozilla's TLS configuration: intermediate (TLS 1.2 with ECDHE+AEAD, and 1.3) or "
        "modern (TLS 1.3 only) (%(default)s)",
    )
    parser.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics, a plain-HTTP listener of "
        "its own (needs ocsp-staple[metrics]; one process: not with --workers)",
    )
    parser.add_argument(
        "--transport",
        choices=tls.TRANSPORTS,
        default=None,
        help="TLS transport: OpenSSL on the socket itself (the default) or memory BIOs under "
        "asyncio's TCP transport",
    )
    parser.add_argument(
        "--loop",
        choices=LOOPS,
        default="auto",
        help="event loop: uvloop if installed, else asyncio's (auto); uvloop needs "
        "ocsp-staple[uvloop]",
    )


async def run(args: argparse.Namespace, out: TextIO) -> int:
    if len(args.cert) != len(args.key):
        print(
            f"staple serve: {len(args.cert)} --cert but {len(args.key)} --key: give one --key "
            "after each --cert",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        loop_factory(args.loop)  # main() has picked the loop; this says why it could not
    except LoopUnavailable as exc:
        print(f"staple serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        proxy = proxy_option(args.proxy)
    except ValueError as exc:
        print(f"staple serve: --proxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.workers < 1:
        print(f"staple serve: --workers {args.workers}: at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        metrics_at = None if args.metrics is None else _host_and_port(args.metrics)
    except ValueError as exc:
        print(f"staple serve: --metrics: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if metrics_at is not None and args.workers > 1:
        print(
            "staple serve: --metrics with --workers: each worker holds its own stapler, so "
            "their metrics would need a port each; run one process, or scrape the workers' "
            "store with `staple status`",
            file=sys.stderr,
        )
        return EXIT_USAGE
    config = ServeConfig(
        certs=list(zip(args.cert, args.key, strict=True)),
        host=args.host,
        port=args.port,
        cache_dir=None if args.no_cache else args.cache_dir,
        store_url=args.store,
        responder=args.responder,
        static=args.static,
        tls_profile=TLSProfile(args.tls_profile),
        proxy=proxy,
        app=args.app,
        metrics=metrics_at,
        transport=args.transport,
    )
    if args.workers > 1:
        # Blocks this loop until the workers have stopped: the parent only supervises.
        return serve_workers(config, workers=args.workers, loop=args.loop, out=out)
    return await serve(config, out=out)


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
    tls_profile: TLSProfile = TLSProfile.INTERMEDIATE
    """Mozilla's intermediate (TLS 1.2 and 1.3) or modern (TLS 1.3 only) settings."""
    proxy: ProxyOption = None
    """The responders' HTTP proxy (:mod:`staple.proxy`): a URL, ``False``, or the environment."""
    app: str | None = None
    """``MODULE:ATTR``: the aiohttp or ASGI application to serve (:mod:`staple.app_loader`);
    ``None`` serves the status page."""
    metrics: tuple[str, int] | None = None
    """``(host, port)`` of a plain-HTTP ``/metrics`` listener (:mod:`staple.metrics`)."""
    transport: tls.TransportKind | None = None
    """The TLS transport (see :mod:`staple.tls`); ``None``: ``tls.DEFAULT_TRANSPORT``."""


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
    server: StaplingServer | None = None
    """What serves it: its sites, their handshake cap (``None`` for an ASGI app, which
    :class:`staple.uvicorn.Server` serves)."""
    listeners: tuple[asyncio.AbstractServer, ...] = ()
    """The listening servers: :class:`staple.tls_socket.SocketTLSServer` on the socket
    transport, the loop's ``asyncio.Server`` on the memory transport."""


async def serve(
    config: ServeConfig,
    *,
    out: TextIO | None = None,
    ready: asyncio.Future[Serving] | None = None,
    stop: asyncio.Event | None = None,
    sock: socket.socket | None = None,
) -> int:
    """Run ``staple serve`` until ``stop`` is set (default: until SIGINT or SIGTERM).

    Prints ``listening on https://HOST:PORT``, ``event loop: ...`` (:func:`describe_loop`),
    with ``--app`` ``serving MODULE:ATTR (KIND)``, and one status line per certificate to
    ``out`` (default stdout), then one line per refresher event; the first line stays exactly
    ``listening on URL``, as scripts match it whole. Returns the exit code: 0 after a clean
    shutdown, 2 when it could not start (unreadable chain or key, no responder, port in use,
    an app that cannot be imported or served, its lifespan start-up failing); ``ready`` then
    gets a ``RuntimeError`` instead of a :class:`Serving`.

    With ``sock`` (a bound, listening socket: one worker of :func:`serve_workers`), it serves
    on that instead of ``config.host`` and ``config.port``, says nothing about listening (the
    parent did), and starts each line with ``worker PID: ``.
    """
    run = _Run(
        out=out or sys.stdout,
        ready=ready,
        stop=asyncio.Event() if stop is None else stop,
        handle_signals=stop is None,
        prefix="" if sock is None else f"worker {os.getpid()}: ",
    )
    bad_store = store_url_problem(config.store_url)
    if bad_store is not None:
        return run.cannot_start(bad_store)
    try:
        _check_paths(config)
    except StartError as exc:
        return run.cannot_start(str(exc))
    made: MadeApp | None = None
    if config.app is not None:
        try:
            made = await make_app(find_app(config.app))
        except AppError as exc:
            return run.cannot_start(str(exc), exc.__cause__)
        except Exception as exc:  # the factory's own failure
            return run.cannot_start(f"--app {config.app}: the factory raised {exc!r}", exc)
        if made.kind is AppKind.ASGI:
            problem = _asgi_problem(config.app)
            if problem is not None:
                return run.cannot_start(problem)
    if config.metrics is not None:
        problem = run.bind_metrics(*config.metrics)
        if problem is not None:
            return run.cannot_start(problem)
    store = await open_store(cache_dir=config.cache_dir, store_url=config.store_url)
    try:
        if made is not None and made.kind is AppKind.ASGI:
            return await _serve_asgi(run, config, made, store, sock)
        return await _serve_aiohttp(run, config, made, store, sock)
    finally:
        await run.close_metrics()
        await store.close()


class _Run:
    """One run of :func:`serve`: its output lines, its start, its stop."""

    def __init__(
        self,
        *,
        out: TextIO,
        ready: asyncio.Future[Serving] | None,
        stop: asyncio.Event,
        handle_signals: bool,
        prefix: str,
    ) -> None:
        self.out = out
        self.ready = ready
        self.stop = stop
        self.handle_signals = handle_signals
        self.prefix = prefix
        """``worker PID: `` in a worker process, else empty."""
        self.started = False
        self._metrics_sock: socket.socket | None = None
        self._metrics: asyncio.Task[web.AppRunner] | None = None

    def say(self, line: str) -> None:
        _say(self.out, self.prefix + line)

    def on_update(self, event: Event) -> None:
        # Before the start the status lines say it all; after the stop, "closed" is noise.
        if self.started and not self.stop.is_set():
            self.say(f"{_stamp()} {event}")

    def cannot_start(self, reason: str, cause: BaseException | None = None) -> int:
        if cause is not None:  # an exception in the user's code: where, not just what
            traceback.print_exception(cause, file=sys.stderr)
        print(f"staple serve: {self.prefix}{reason}", file=sys.stderr, flush=True)
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(RuntimeError(reason))
        return EXIT_USAGE

    def bind_metrics(self, host: str, port: int) -> str | None:
        """Bind ``--metrics`` before anything starts; why it cannot be, or ``None``."""
        if importlib.util.find_spec("prometheus_client") is None:
            return "--metrics needs prometheus-client: pip install 'ocsp-staple[metrics]'"
        try:
            self._metrics_sock = _bind(host, port)
        except OSError as exc:
            return f"--metrics: cannot listen on {_host_port(host, port)}: {exc.strerror or exc}"
        return None

    async def _serve_metrics(self, stapler: Stapler, sock: socket.socket) -> web.AppRunner:
        from prometheus_client import CollectorRegistry  # only with --metrics

        from .. import metrics

        registry = CollectorRegistry()
        metrics.register(stapler, registry=registry)
        return await metrics.start_server(registry=registry, sock=sock)

    async def close_metrics(self) -> None:
        """Stop the ``/metrics`` listener (if it started) and release its socket."""
        task, self._metrics = self._metrics, None
        if task is not None:
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                runner = await task
                await runner.cleanup()
        if self._metrics_sock is not None:
            self._metrics_sock.close()
            self._metrics_sock = None

    def signals(self) -> contextlib.AbstractContextManager[None]:
        """SIGINT and SIGTERM set ``stop`` in the block, unless the caller gave ``stop``."""
        return _stop_on_signals(self.stop) if self.handle_signals else contextlib.nullcontext()

    def on_start(self, serving: Serving, *, announce: bool, app: str | None) -> None:
        """The start-up lines (``listening on`` only when ``announce``), then ``ready``."""
        if announce:
            self.say(f"listening on {serving.url}")
        self.say(f"event loop: {describe_loop(asyncio.get_running_loop())}")
        if app is not None:
            self.say(f"serving {app}")
        for handle in serving.handles:
            self.say(status_line(handle))
        if self._metrics_sock is not None:  # listening already: scrapes queue until it serves
            self.say(f"metrics on {_url_of(self._metrics_sock, 'http')}/metrics")
            self._metrics = asyncio.get_running_loop().create_task(
                self._serve_metrics(serving.stapler, self._metrics_sock)
            )
        self.started = True
        if self.ready is not None and not self.ready.done():
            self.ready.set_result(serving)


async def _serve_aiohttp(
    run: _Run, config: ServeConfig, made: MadeApp | None, store: Store, sock: socket.socket | None
) -> int:
    """The status page (``made`` ``None``) or an aiohttp app, on :class:`StaplingServer`."""
    stapler = Stapler(
        store=store, policy=config.policy, on_update=run.on_update, proxy=config.proxy
    )
    static = Path(config.static) if config.static is not None else None
    files = SmallFiles(static) if static is not None else None
    app: web.Application = made.app if made is not None else status_app(static=static, files=files)
    where: dict[str, Any] = (
        {"host": config.host, "port": config.port} if sock is None else {"sock": sock}
    )
    server = StaplingServer(
        app,
        certs=[(Path(chain), Path(key)) for chain, key in config.certs],
        stapler=stapler,
        responder_urls=[config.responder] if config.responder else None,
        access_log=None,
        tls_profile=config.tls_profile,
        transport=config.transport or tls.DEFAULT_TRANSPORT,
        **where,
    )

    def on_start(server: StaplingServer) -> None:
        url = server.url if sock is None else _url_of(sock)
        listeners = tuple(site.server for site in server.sites if site.server is not None)
        serving = Serving(
            url, config.host, server.port, stapler, server.handles, files, server, listeners
        )
        described = None if made is None else f"{config.app} (aiohttp {_AIOHTTP_VERSION})"
        run.on_start(serving, announce=sock is None, app=described)

    try:
        await server.run(stop=run.stop, handle_signals=run.handle_signals, on_start=on_start)
    except StartError as exc:
        return run.cannot_start(str(exc))
    return EXIT_OK


async def _serve_asgi(
    run: _Run, config: ServeConfig, made: MadeApp, store: Store, sock: socket.socket | None
) -> int:
    """An ASGI app on :class:`staple.uvicorn.Server` (:mod:`.serve_asgi`), on ``sock`` or a
    socket bound here."""
    from . import serve_asgi  # importable: serve() checked

    listening = sock
    if listening is None:
        try:
            listening = _bind(config.host, config.port)
        except OSError as exc:
            where = _host_port(config.host, config.port)
            return run.cannot_start(f"cannot listen on {where}: {exc.strerror or exc}")
    url, port = _url_of(listening), listening.getsockname()[1]

    def on_start(server: serve_asgi.AppServer) -> None:
        assert server.stapler is not None
        handles = list(server.stapler.handles)
        listeners = tuple(server.servers)
        serving = Serving(url, config.host, port, server.stapler, handles, listeners=listeners)
        described = f"{config.app} (ASGI, uvicorn {serve_asgi.UVICORN_VERSION})"
        run.on_start(serving, announce=sock is None, app=described)

    try:
        with run.signals():
            started = await serve_asgi.serve_asgi(
                made.app,
                sock=listening,
                stop=run.stop,
                certs=[(Path(chain), Path(key)) for chain, key in config.certs],
                store=store,
                on_update=run.on_update,
                policy=config.policy,
                responder_urls=[config.responder] if config.responder else None,
                proxy=config.proxy,
                tls_profile=config.tls_profile,
                on_start=on_start,
                transport=config.transport or tls.DEFAULT_TRANSPORT,
            )
    finally:
        listening.close()  # uvicorn closed it already, unless it never started
    if not started:
        return run.cannot_start("the ASGI app could not start (see the errors above)")
    return EXIT_OK


def _say(out: TextIO, line: str) -> None:
    print(line, file=out, flush=True)


def _stamp() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _check_paths(config: ServeConfig) -> None:
    if not config.certs:
        raise StartError("at least one --cert CHAIN.pem --key KEY.pem pair is needed")
    for chain, key in config.certs:
        for what, path in (("certificate chain", chain), ("key", key)):
            if not os.path.isfile(path):
                raise StartError(f"{what} {os.fspath(path)!r} is not a readable file")
    if config.app is not None and config.static is not None:
        raise StartError(
            "--static serves files beside the status page; with --app, serve them "
            "from your application"
        )
    if config.static is not None and not os.path.isdir(config.static):
        raise StartError(f"--static {os.fspath(config.static)!r} is not a directory")


_AIOHTTP_VERSION = importlib.metadata.version("aiohttp")


def _asgi_problem(spec: str) -> str | None:
    """Why an ASGI app cannot be served here (uvicorn missing), or ``None``."""
    try:
        from . import serve_asgi  # noqa: F401 - imports uvicorn
    except ImportError as exc:
        return (
            f"--app {spec} is an ASGI application, served with uvicorn, which cannot be "
            f"imported ({exc}): pip install 'ocsp-staple[asgi]'"
        )
    return None


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: a free port). Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=128)


def _host_and_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` (port 0: a free one). Raises ValueError."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _url_of(sock: socket.socket, scheme: str = "https") -> str:
    host, port = sock.getsockname()[:2]
    return f"{scheme}://{_host_port(host, port)}"


# -- worker processes ------------------------------------------------------------------------


def serve_workers(config: ServeConfig, *, workers: int, loop: str, out: TextIO) -> int:
    """``staple serve --workers N``: bind once, fork ``workers`` processes each running
    :func:`serve` on the socket (on a loop of their own, ``loop`` as ``--loop``), until
    SIGINT or SIGTERM; the exit status (:func:`staple.workers.run_workers`).

    Everything that can be checked before forking is (the paths, the store URL, importing
    the app), so a mistake exits 2 once instead of in every worker. Prints ``listening on
    https://HOST:PORT`` and ``N worker processes``; each worker then prints its own lines,
    starting with ``worker PID: ``, and the parent one line whenever it replaces a worker.
    Must run with no other thread in the process (it forks).
    """

    def cannot_start(reason: str, cause: BaseException | None = None) -> int:
        if cause is not None:
            traceback.print_exception(cause, file=sys.stderr)
        print(f"staple serve: {reason}", file=sys.stderr, flush=True)
        return EXIT_USAGE

    bad_store = store_url_problem(config.store_url)
    if bad_store is not None:
        return cannot_start(bad_store)
    try:
        _check_paths(config)
    except StartError as exc:
        return cannot_start(str(exc))
    if config.app is not None:
        try:
            found: FoundApp = find_app(config.app)  # once here; each worker reuses the import
        except AppError as exc:
            return cannot_start(str(exc), exc.__cause__)
        problem = _asgi_problem(config.app) if found.kind is AppKind.ASGI else None
        if problem is not None:
            return cannot_start(problem)
    try:
        sock = _bind(config.host, config.port)
    except OSError as exc:
        where = _host_port(config.host, config.port)
        return cannot_start(f"cannot listen on {where}: {exc.strerror or exc}")
    _say(out, f"listening on {_url_of(sock)}")
    _say(out, f"{workers} worker processes")
    factory = loop_factory(loop)

    def work() -> int:
        # The parent forked inside its running loop: forget it (Python >= 3.12 does this
        # itself after a fork) and its signal wake-up descriptor, and run a loop of our own.
        asyncio.events._set_running_loop(None)
        signal.set_wakeup_fd(-1)
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(serve(config, out=out, sock=sock))

    def report(level: int, message: str) -> None:
        print(message, file=out if level < logging.WARNING else sys.stderr, flush=True)

    try:
        return run_workers(workers, work, report=report, startup_failure=EXIT_USAGE)
    finally:
        sock.close()


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
    (:func:`staple.cli.main`); :func:`serve` itself runs on whatever loop it is given.
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
