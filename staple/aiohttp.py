"""aiohttp integration: serve an aiohttp application over stapling TLS.

For the two-line case, :func:`run_app`, a drop-in for ``aiohttp.web.run_app``::

    app = web.Application()  # ... add your routes ...
    staple.aiohttp.run_app(app, certs=[("chain.pem", "key.pem")])

It runs a :class:`StaplingServer`, which is also what ``staple serve`` runs: the chains opened
at once, the pyOpenSSL context built, the :class:`~staple.Stapler` attached to the app
(:func:`setup`: ``app[STAPLER_KEY]``, closed on cleanup), a :class:`StaplingSite` with a cap on
handshakes in progress, and a clean shutdown on SIGINT/SIGTERM.

The parts, shaped like aiohttp's own ``TCPSite`` (runner, host, port, keyword-only options)::

    runner = web.AppRunner(app)
    await runner.setup()
    site = staple.aiohttp.StaplingSite(runner, "0.0.0.0", 8443, ssl_context=ctx)
    await site.start()
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import os
import signal
import socket
import weakref
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from pathlib import Path
from typing import Any

from aiohttp import web, web_protocol, web_runner, web_server
from aiohttp.abc import AbstractAccessLogger
from aiohttp.log import access_logger
from aiohttp.web_log import AccessLogger
from aiohttp.web_runner import GracefulExit
from OpenSSL import SSL
from yarl import URL

from . import tls, tls_socket
from .chain import ChainInput
from .errors import ChainError, OcspError
from .handle import OnUpdate, ResponderUrls, ServerOcspResponse
from .policy import RefreshPolicy
from .server_context import CertSpec, PathOrPem, TLSProfile, build_server_context
from .stapler import MustStaple, Stapler
from .store import Store

__all__ = [
    "MAX_HANDSHAKES",
    "SERVER_KEY",
    "STAPLER_KEY",
    "StaplingServer",
    "StaplingSite",
    "StartError",
    "run_app",
    "setup",
]

STAPLER_KEY: web.AppKey[Stapler] = web.AppKey("staple.stapler", Stapler)
"""Where :func:`setup` (and so :class:`StaplingServer`, :func:`run_app`) keep the app's
:class:`~staple.Stapler`."""


class StaplingSite(web.BaseSite):
    """An aiohttp site whose TLS is ``staple.tls`` on a pyOpenSSL context (which can staple).

    Connections still in the TLS handshake are invisible to aiohttp's shutdown; the site
    aborts them on :meth:`stop`. With ``sock``, it serves on that socket (bound
    already, as aiohttp's ``SockSite`` takes it) instead of ``host`` and ``port``.

    ``transport`` chooses the TLS transport (see :func:`staple.tls.create_server`): ``"socket"``
    (OpenSSL on the socket itself, the default) or ``"memory"`` (memory BIOs under asyncio's
    TCP transport).
    """

    __slots__ = (
        "_bound_port",
        "_handshake_timeout",
        "_host",
        "_max_handshakes",
        "_port",
        "_reuse_address",
        "_reuse_port",
        "_sock",
        "_stopping",
        "_tls_context",
        "_tls_shutdown_timeout",
        "_transport_kind",
        "_transports",
    )

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str | None = None,
        port: int | None = None,
        *,
        ssl_context: SSL.Context,
        sock: socket.socket | None = None,
        backlog: int = 128,
        reuse_address: bool | None = None,
        reuse_port: bool | None = None,
        handshake_timeout: float = tls.DEFAULT_HANDSHAKE_TIMEOUT,
        tls_shutdown_timeout: float = tls.DEFAULT_SHUTDOWN_TIMEOUT,
        max_handshakes: int | None = None,
        transport: tls.TransportKind = tls.DEFAULT_TRANSPORT,
    ) -> None:
        if not isinstance(ssl_context, SSL.Context):
            raise TypeError(
                "StaplingSite needs an OpenSSL.SSL.Context (the stdlib ssl module cannot "
                "staple); use aiohttp's TCPSite for an ssl.SSLContext"
            )
        super().__init__(runner, backlog=backlog)
        if sock is not None and (host is not None or port is not None):
            raise ValueError("StaplingSite serves on sock, or on host and port: not both")
        self._sock = sock
        self._host = host
        self._port = 8443 if port is None else port
        self._bound_port: int | None = None
        self._reuse_address = reuse_address
        self._reuse_port = reuse_port
        self._tls_context = ssl_context
        self._handshake_timeout = handshake_timeout
        self._tls_shutdown_timeout = tls_shutdown_timeout
        self._max_handshakes = max_handshakes
        self._transport_kind = tls._check_transport(transport)
        self._transports: weakref.WeakSet[Any] = weakref.WeakSet()
        self._stopping = False

    @property
    def port(self) -> int:
        """The bound port once started (useful with ``port=0``), else the requested one."""
        return self._bound_port if self._bound_port is not None else self._port

    @property
    def max_handshakes(self) -> int | None:
        """Connections allowed in the TLS handshake at once (``None``: no cap)."""
        return self._max_handshakes

    @property
    def server(self) -> asyncio.AbstractServer | None:
        """The listening server once started: a :class:`staple.tls_socket.SocketTLSServer`,
        or on the memory transport the loop's ``asyncio.Server``."""
        return self._server

    @property
    def name(self) -> str:
        host = self._host or "0.0.0.0"
        if self._sock is not None:
            host = str(self._sock.getsockname()[0])
        return str(URL.build(scheme="https", host=host, port=self.port))

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        if self._transport_kind == "socket":
            self._server = await tls.create_server(
                server,
                self._host,
                None if self._sock is not None else self._port,
                ssl_context=self._tls_context,
                handshake_timeout=self._handshake_timeout,
                shutdown_timeout=self._tls_shutdown_timeout,
                max_handshakes=self._max_handshakes,
                transport="socket",
                sock=self._sock,
                backlog=self._backlog,
                reuse_address=self._reuse_address,
                reuse_port=self._reuse_port,
            )
            if self._server.sockets:
                self._bound_port = self._server.sockets[0].getsockname()[1]
            return
        factory = tls.server_protocol_factory(
            server,
            self._tls_context,
            handshake_timeout=self._handshake_timeout,
            shutdown_timeout=self._tls_shutdown_timeout,
            on_connection=self._on_connection,
            max_handshakes=self._max_handshakes,
        )
        loop = asyncio.get_running_loop()
        if self._sock is not None:
            self._server = await loop.create_server(factory, sock=self._sock, backlog=self._backlog)
        else:
            self._server = await loop.create_server(
                factory,
                self._host,
                self._port,
                backlog=self._backlog,
                reuse_address=self._reuse_address,
                reuse_port=self._reuse_port,
            )
        if self._server.sockets:
            self._bound_port = self._server.sockets[0].getsockname()[1]

    def _on_connection(self, transport: Any) -> None:
        if self._stopping:  # accepted just before stop(), connected just after: refuse it
            transport.abort()
            return
        self._transports.add(transport)

    async def stop(self) -> None:
        # Handshakes in progress have no aiohttp handler yet, so no one else will end them.
        # On the memory transport, a connection the loop accepted but had not yet handed to
        # its protocol is caught by _on_connection.
        self._stopping = True
        for transport in self._handshaking():
            transport.abort()
        await super().stop()

    def _handshaking(self) -> list[Any]:
        """The connections still in the TLS handshake. The socket transport's server knows
        them (and accepts nothing once closed, which follows in the same step); the memory
        transport's connections are tracked one by one."""
        server = self._server
        if isinstance(server, tls_socket.SocketTLSServer):
            return server.handshaking()
        return [t for t in self._transports if t.tls_state is tls.TLSState.DO_HANDSHAKE]


def setup(app: web.Application, stapler: Stapler) -> None:
    """Attach ``stapler`` to ``app``: stored under :data:`STAPLER_KEY`, closed on cleanup."""

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        yield
        await stapler.close()

    app[STAPLER_KEY] = stapler
    app.cleanup_ctx.append(lifetime)


MAX_HANDSHAKES = 1024
"""Connections a :class:`StaplingServer` lets into the TLS handshake at once; more are refused
(a slowloris flood of silent connections must not pin memory or starve real clients)."""

_RUNNER_OPTIONS = frozenset(
    name
    for function in (
        web_runner.BaseRunner.__init__,
        web_runner.AppRunner.__init__,
        web_server.Server.__init__,
        web_protocol.RequestHandler.__init__,
    )
    for name, parameter in inspect.signature(function).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    and name not in ("handle_signals", "loop", "shutdown_timeout")
) | {"shutdown_timeout"}
"""What ``web.AppRunner(app, **options)`` passes on to aiohttp's request handler: the keywords
``aiohttp.web.run_app`` forwards too (``access_log``, ``keepalive_timeout``, ``max_line_size``,
``handler_cancellation``...), read from the installed aiohttp."""


class StartError(Exception):
    """A :class:`StaplingServer` could not start: a chain that cannot be opened (unreadable,
    no OCSP responder), a key that does not match its certificate, an address in use. The
    message says which, and for which chain."""


class StaplingServer:
    """One aiohttp application served over stapling TLS, from chains to a clean shutdown.

    What :func:`run_app` and ``staple serve`` both run::

        stapler = staple.Stapler(store=staple.FileStore("/var/cache/staple"))
        server = StaplingServer(app, certs=[("chain.pem", "key.pem")], stapler=stapler,
                                host="0.0.0.0", port=8443)
        await server.run()        # until SIGINT/SIGTERM (or ``stop``), then closed

    or, to do something between start and stop::

        async with server:        # start(): opened, listening; close() on the way out
            print(server.url)
            await stop.wait()

    :meth:`start` opens every chain of ``certs`` in ``stapler`` at once (each may wait, bounded,
    for its first response), builds the SNI-switched pyOpenSSL context
    (:func:`~staple.server_context.build_server_context`), attaches the stapler to ``app`` with
    :func:`setup` (``app[STAPLER_KEY]``, closed by the app's cleanup), sets the app up in a
    ``web.AppRunner`` and starts a :class:`StaplingSite` per host (and socket), each capped at
    ``max_handshakes`` connections in the handshake. Any failure raises :class:`StartError`
    and leaves nothing running. :meth:`close` is idempotent: the runner is cleaned up (aiohttp's
    graceful shutdown, ``shutdown_timeout``) and the stapler closed, once.

    ``app`` may be an awaitable returning the application, as ``aiohttp.web.run_app`` accepts.
    ``host`` is one address, several, or ``None`` for every interface; ``port`` ``None`` is
    8443, 0 a free port; ``sock``, one bound socket or several, is served too (alone, when
    neither ``host`` nor ``port`` is given), as ``aiohttp.web.run_app`` does.
    ``runner_options`` are ``web.AppRunner``'s (``access_log``, ``shutdown_timeout``,
    ``keepalive_timeout``, ``access_log_class``, ...); an unknown one is a :class:`TypeError`
    naming it. The server is also at ``app[SERVER_KEY]``.

    ``tls_profile`` is Mozilla's ``"intermediate"`` (the default: TLS 1.2 with ECDHE and AEAD
    suites, and 1.3) or ``"modern"`` (TLS 1.3 only); ``context_factory`` makes each pyOpenSSL
    context instead (see :func:`~staple.server_context.build_server_context`).
    """

    def __init__(
        self,
        app: web.Application | Awaitable[web.Application],
        *,
        certs: Sequence[CertSpec],
        stapler: Stapler,
        host: str | Iterable[str] | None = None,
        port: int | None = None,
        sock: socket.socket | Iterable[socket.socket] | None = None,
        responder_urls: ResponderUrls | None = None,
        backlog: int = 128,
        reuse_address: bool | None = None,
        reuse_port: bool | None = None,
        handshake_timeout: float = tls.DEFAULT_HANDSHAKE_TIMEOUT,
        tls_shutdown_timeout: float = tls.DEFAULT_SHUTDOWN_TIMEOUT,
        max_handshakes: int | None = MAX_HANDSHAKES,
        tls_profile: TLSProfile | str = TLSProfile.INTERMEDIATE,
        context_factory: Callable[[], SSL.Context] | None = None,
        transport: tls.TransportKind = tls.DEFAULT_TRANSPORT,
        **runner_options: Any,
    ) -> None:
        _refuse_unknown("StaplingServer()", runner_options, _RUNNER_OPTIONS)
        self._tls_profile = TLSProfile(tls_profile)
        self._context_factory = context_factory
        if not certs:
            raise ValueError("StaplingServer needs certs=[(chain, key), ...]: at least one pair")
        self._app = app
        self.certs = list(certs)
        self.stapler = stapler
        """Closed with the server (it owns it once constructed)."""
        # Where to listen, as aiohttp.web.run_app decides: each host (all interfaces for None)
        # unless only sockets are given, and each socket.
        self._hosts: list[str | None] = (
            [host] if isinstance(host, str) else list(host) if host is not None else [None]
        )
        self._socks = (
            [] if sock is None else [sock] if isinstance(sock, socket.socket) else list(sock)
        )
        if host is None and port is None and self._socks:
            self._hosts = []
        self._port = port
        self._responder_urls = responder_urls
        self._site_options: dict[str, Any] = {
            "backlog": backlog,
            "reuse_address": reuse_address,
            "reuse_port": reuse_port,
            "handshake_timeout": handshake_timeout,
            "tls_shutdown_timeout": tls_shutdown_timeout,
            "max_handshakes": max_handshakes,
            "transport": tls._check_transport(transport),
        }
        self._runner_options = runner_options
        self.runner: web.AppRunner | None = None
        self.handles: list[ServerOcspResponse] = []
        """One per chain of ``certs``, in that order, once started."""
        self.sites: list[StaplingSite] = []
        self._started = False
        self._closed = False

    @property
    def url(self) -> str:
        """The first site's ``https://HOST:PORT`` (the bound port, with ``port=0``)."""
        return self._first_site().name

    @property
    def port(self) -> int:
        """The first site's bound port."""
        return self._first_site().port

    def _first_site(self) -> StaplingSite:
        if not self.sites:
            raise RuntimeError("the server is not listening yet: await server.start() first")
        return self.sites[0]

    async def start(self) -> None:
        """Open the chains, set up the app and listen. Raises :class:`StartError` (nothing is
        left running then), or :class:`RuntimeError` when called twice or after close()."""
        if self._started or self._closed:
            raise RuntimeError("a StaplingServer starts once: make a new one")
        self._started = True
        try:
            app = await self._app if inspect.isawaitable(self._app) else self._app
            if not isinstance(app, web.Application):
                raise TypeError(f"app must be an aiohttp.web.Application, not {app!r}")
            if app.frozen:
                raise StartError(
                    "this aiohttp Application has been started before (aiohttp freezes an "
                    "app when it starts, and staple must add its cleanup): give a new one"
                )
            self.handles = await _open_chains(self.stapler, self.certs, self._responder_urls)
            try:
                ctx = build_server_context(
                    self.certs,
                    self.stapler,
                    profile=self._tls_profile,
                    context_factory=self._context_factory,
                )
            except ChainError as exc:  # e.g. a key that does not match its certificate
                raise StartError(str(exc)) from exc
            setup(app, self.stapler)
            app[SERVER_KEY] = self
            runner = web.AppRunner(app, handle_signals=False, **self._runner_options)
            await runner.setup()
            self.runner = runner
            sites = [
                StaplingSite(runner, host, self._port, ssl_context=ctx, **self._site_options)
                for host in self._hosts
            ]
            options = {k: v for k, v in self._site_options.items() if not k.startswith("reuse")}
            sites += [StaplingSite(runner, sock=s, ssl_context=ctx, **options) for s in self._socks]
            for site in sites:
                try:
                    await site.start()
                except OSError as exc:
                    where = site.name.removeprefix("https://")
                    raise StartError(f"cannot listen on {where}: {exc.strerror or exc}") from exc
                self.sites.append(site)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop listening, shut the app down gracefully and close the stapler. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if inspect.iscoroutine(self._app):  # never started: not awaited, and never will be
            self._app.close()
        try:
            if self.runner is not None:
                await self.runner.cleanup()  # the app's cleanup closes the stapler (setup())
        finally:
            await self.stapler.close()  # idempotent: for a start that failed before that

    async def __aenter__(self) -> StaplingServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def run(
        self,
        *,
        stop: asyncio.Event | None = None,
        handle_signals: bool = True,
        on_start: Callable[[StaplingServer], object] | None = None,
    ) -> None:
        """Start, call ``on_start(server)``, serve until ``stop`` is set (or, with
        ``handle_signals``, until SIGINT or SIGTERM), then close. The signal handlers are in
        place from the start, so a signal during start-up stops the server as soon as it is up;
        they are removed on the way out. Raises what :meth:`start` raises."""
        stop = asyncio.Event() if stop is None else stop
        with _stop_on_signals(stop) if handle_signals else contextlib.nullcontext():
            async with self:
                if on_start is not None:
                    on_start(self)
                await stop.wait()


SERVER_KEY: web.AppKey[StaplingServer] = web.AppKey("staple.server", StaplingServer)
"""Where a :class:`StaplingServer` (and so :func:`run_app`) keeps itself in the app it serves:
``request.app[SERVER_KEY].sites``, ``.handles``, ``.url``."""


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set ``stop`` while in the block (where the loop can take signals:
    the main thread of a Unix process)."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            continue
        installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def _open_chains(
    stapler: Stapler, certs: Sequence[CertSpec], responder_urls: ResponderUrls | None
) -> list[ServerOcspResponse]:
    """A handle per chain, opened concurrently (each may wait for its first response): start-up
    takes as long as the slowest chain, not the sum. Every chain that fails is named."""

    async def add(chain: PathOrPem) -> ServerOcspResponse | OcspError:
        try:
            return await stapler.add(_chain_input(chain), responder_urls=responder_urls)
        except OcspError as exc:  # ChainError, NoResponderError
            return exc

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(add(chain)) for chain, _ in certs]
    results = [task.result() for task in tasks]
    failures = [
        f"{_describe(chain, i)}: {result}"
        for i, ((chain, _), result) in enumerate(zip(certs, results, strict=True))
        if isinstance(result, OcspError)
    ]
    if failures:
        first = next(r for r in results if isinstance(r, OcspError))
        raise StartError("; ".join(failures)) from first
    return [r for r in results if not isinstance(r, OcspError)]


def _chain_input(chain: PathOrPem) -> ChainInput:
    return chain if isinstance(chain, bytes) else Path(chain)


def _describe(chain: PathOrPem, index: int) -> str:
    return f"certs[{index}] (PEM)" if isinstance(chain, bytes) else os.fspath(chain)


def _refuse_unknown(caller: str, options: Mapping[str, Any], known: Collection[str]) -> None:
    for name in options:
        if name not in known:
            raise TypeError(f"{caller} got an unexpected keyword argument {name!r}")


_POLICY_FIELDS = frozenset(f.name for f in dataclasses.fields(RefreshPolicy))
_STAPLER_OPTIONS = (
    frozenset({"session", "clock", "max_concurrent_fetches", "proxy"}) | _POLICY_FIELDS
)
""":class:`~staple.Stapler`'s keywords that :func:`run_app` passes through ``**options``,
with every :class:`~staple.RefreshPolicy` field (``wait_timeout=...``), as ``Stapler`` takes."""


def run_app(
    app: web.Application | Awaitable[web.Application],
    *,
    certs: Sequence[CertSpec],
    host: str | Iterable[str] | None = None,
    port: int | None = None,
    path: Any = None,
    sock: socket.socket | Iterable[socket.socket] | None = None,
    shutdown_timeout: float = 60.0,
    keepalive_timeout: float = 75.0,
    ssl_context: Any = None,
    print: Callable[..., None] | None = print,
    backlog: int = 128,
    access_log_class: type[AbstractAccessLogger] = AccessLogger,
    access_log_format: str = AccessLogger.LOG_FORMAT,
    access_log: logging.Logger | None = access_logger,
    handle_signals: bool = True,
    reuse_address: bool | None = None,
    reuse_port: bool | None = None,
    handler_cancellation: bool = False,
    loop: asyncio.AbstractEventLoop | None = None,
    store: Store | None = None,
    on_update: OnUpdate | None = None,
    must_staple: MustStaple | str = MustStaple.LENIENT,
    policy: RefreshPolicy | None = None,
    responder_urls: ResponderUrls | None = None,
    handshake_timeout: float = tls.DEFAULT_HANDSHAKE_TIMEOUT,
    max_handshakes: int | None = MAX_HANDSHAKES,
    tls_profile: TLSProfile | str = TLSProfile.INTERMEDIATE,
    **options: Any,
) -> None:
    """``aiohttp.web.run_app`` over stapling TLS: serve ``app`` until SIGINT or SIGTERM.

    A drop-in: every keyword of ``aiohttp.web.run_app`` means what it means there (``host``,
    ``port`` (default 8443), ``shutdown_timeout``, ``keepalive_timeout``, ``access_log``,
    ``access_log_class``, ``access_log_format``, ``print``, ``handle_signals``, ``backlog``,
    ``reuse_address``, ``reuse_port``, ``handler_cancellation``, ``loop`` (run on it, then
    closed) and aiohttp's request-handler options such as ``max_line_size``), and ``app`` may
    be a coroutine returning the application; ``sock`` serves on bound sockets. Two cannot
    staple and are refused: ``path`` (a Unix socket) and ``ssl_context`` (the TLS context is
    built from ``certs``).

    staple's own: ``certs`` is ``[(chain, key), ...]`` (PEM paths or bytes; several for SNI or
    RSA + ECDSA); ``store``, ``on_update``, ``must_staple``, ``policy`` and ``**options``
    (``session``, ``clock``, ``max_concurrent_fetches``, or any :class:`~staple.RefreshPolicy`
    field) make the :class:`~staple.Stapler`, reachable as ``app[STAPLER_KEY]``;
    ``responder_urls``, ``handshake_timeout``, ``max_handshakes`` and ``tls_profile``
    (``"intermediate"`` or ``"modern"``) are :class:`StaplingServer`'s. An unknown keyword is
    a :class:`TypeError` naming it.
    """
    try:
        stapler_options = {k: v for k, v in options.items() if k in _STAPLER_OPTIONS}
        runner_options = {k: v for k, v in options.items() if k not in _STAPLER_OPTIONS}
        _refuse_unknown("run_app()", runner_options, _RUNNER_OPTIONS)
        if path is not None:
            raise TypeError(
                "run_app(path=...): staple serves TLS over TCP and a Unix socket cannot staple "
                "here; give host= and port= instead"
            )
        if ssl_context is not None:
            raise TypeError(
                "run_app(ssl_context=...): staple builds the TLS context from certs= (the "
                "stdlib ssl module cannot staple); pass certs=[(chain, key), ...] instead"
            )
        if policy is not None and any(k in stapler_options for k in _POLICY_FIELDS):
            raise TypeError("run_app(): pass either policy= or policy options, not both")
    except TypeError:
        if inspect.iscoroutine(app):
            app.close()  # never to be awaited: no "was never awaited" warning
        raise

    async def serve() -> None:
        stapler = Stapler(
            store=store,
            on_update=on_update,
            must_staple=must_staple,
            policy=policy,
            **stapler_options,
        )
        server = StaplingServer(
            app,
            certs=certs,
            stapler=stapler,
            host=host,
            port=port,
            sock=sock,
            responder_urls=responder_urls,
            backlog=backlog,
            reuse_address=reuse_address,
            reuse_port=reuse_port,
            handshake_timeout=handshake_timeout,
            max_handshakes=max_handshakes,
            tls_profile=tls_profile,
            shutdown_timeout=shutdown_timeout,
            keepalive_timeout=keepalive_timeout,
            access_log_class=access_log_class,
            access_log_format=access_log_format,
            access_log=access_log,
            handler_cancellation=handler_cancellation,
            **runner_options,
        )

        def started(server: StaplingServer) -> None:
            if print is not None:  # aiohttp's words, so its users' scripts still match
                names = ", ".join(sorted(site.name for site in server.sites))
                print(f"======== Running on {names} ========\n(Press CTRL+C to quit)")

        await server.run(handle_signals=handle_signals, on_start=started)

    if loop is None:
        loop = asyncio.new_event_loop()
    # As aiohttp: in debug mode, the default access logger logs to stderr.
    if loop.get_debug() and access_log is not None and access_log.name == "aiohttp.access":
        if access_log.level == logging.NOTSET:
            access_log.setLevel(logging.DEBUG)
        if not access_log.hasHandlers():
            access_log.addHandler(logging.StreamHandler())
    main = loop.create_task(serve())
    try:
        loop.run_until_complete(main)
    except (GracefulExit, KeyboardInterrupt):  # Ctrl-C with handle_signals=False
        pass
    finally:
        try:
            if not main.done():
                main.cancel()  # runs the server's close()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            _cancel_all(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel and await what the app left running (as ``asyncio.run`` does on the way out)."""
    tasks = asyncio.all_tasks(loop)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler(
                {
                    "message": "unhandled exception during run_app() shutdown",
                    "exception": task.exception(),
                    "task": task,
                }
            )
