"""uvicorn with OCSP stapling: ``staple.uvicorn.run(app, certs=[(chain, key)], **uvicorn_options)``.

uvicorn's own TLS (``ssl_certfile=``, ``ssl_keyfile=``...) is the stdlib :mod:`ssl` module, which
cannot staple. Here uvicorn runs as it is (its ``Config``, lifespan, HTTP and WebSocket
protocols, limits, graceful shutdown, signal handling), but every connection it accepts goes
through staple's TLS (:mod:`staple.tls`, pyOpenSSL) first, and a :class:`~staple.Stapler`
staples each handshake::

    staple.uvicorn.run(app, certs=[("chain.pem", "key.pem")], host="0.0.0.0", port=8443)

For code that drives uvicorn itself (a gunicorn worker, ``await server.serve()``), use
:class:`Server` in place of ``uvicorn.Server``.

How it hooks into uvicorn
-------------------------
No part of uvicorn's startup is copied. uvicorn makes each connection's protocol as
``config.http_protocol_class(config=, server_state=, app_state=, _loop=)`` (set by
``Config.load()`` from ``http=``). On the default socket transport (:mod:`staple.tls_socket`:
OpenSSL reads and writes the accepted socket itself), :class:`Server` runs uvicorn's startup
with ``sockets=[]``, so uvicorn runs the lifespan but listens on nothing, then listens itself
on what uvicorn would have (host/port, ``uds``, ``fd``, or the ``sockets`` a gunicorn worker
passes) with :func:`staple.tls_socket.create_server`, making uvicorn's protocol the same way,
and puts those servers in ``Server.servers``, which uvicorn's shutdown closes and waits for.
With ``transport="memory"`` uvicorn listens itself, and :class:`Server` replaces
``config.http_protocol_class``, after ``load()`` and before uvicorn's startup, with a
:class:`~staple.tls.TLSServerProtocol` subclass taking the same arguments: it makes uvicorn's
protocol and hands it the :class:`~staple.tls.TLSTransport` once the handshake has completed.
The uvicorn internals this relies on:

- that constructor call, ``Config.http_protocol_class``, ``Server.server_state`` and
  ``Server.lifespan.state``;
- ``Server.startup(sockets)`` / ``Server.shutdown(sockets)``, extended through ``super()``;
  ``startup(sockets=[])`` creates no server, and ``shutdown`` closes ``Server.servers``;
- ``Server._log_started_message`` (private), overridden to say ``https://``;
- uvicorn's protocols call a connection TLS when ``transport.get_extra_info("sslcontext")`` is
  truthy (``uvicorn.protocols.utils.is_ssl``): ``scope["scheme"]`` is ``https``/``wss``, and
  ``client``/``server`` come from the TCP socket, as without TLS.

Connections still in the TLS handshake have no uvicorn protocol yet (uvicorn counts a
connection from ``connection_made``), so uvicorn's graceful shutdown cannot see them:
:class:`Server` aborts them when it shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import socket
import stat
import sys
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, cast

import uvicorn
from OpenSSL import SSL
from uvicorn.config import STARTUP_FAILURE

from . import tls, tls_socket
from .aiohttp import MAX_HANDSHAKES
from .errors import OcspError
from .handle import OnUpdate
from .policy import RefreshPolicy
from .server_context import CertSpec, build_server_context
from .stapler import MustStaple, Stapler
from .status_page import status_line
from .store import Store
from .store_choice import STORE_SCHEMES, store_from_environment, store_from_url
from .workers import run_workers

__all__ = ["Server", "run"]

logger = logging.getLogger("uvicorn.error")

# uvicorn.run's keywords that are not uvicorn.Config's.
_RUN_ONLY = frozenset({"app_dir"})


class Server(uvicorn.Server):
    """A ``uvicorn.Server`` whose connections are TLS by :mod:`staple.tls`, stapled.

    ``config`` must not ask for uvicorn's own TLS (``ssl_certfile``...: :exc:`TypeError`).
    ``certs`` is ``[(chain, key), ...]`` (PEM paths or bytes; several for SNI, or RSA and
    ECDSA for one name). ``store`` is a :class:`~staple.Store`, a ``redis://`` URL, or
    ``None`` for ``staple serve``'s (``STAPLE_STORE``, else ``STAPLE_CACHE_DIR``, else the
    per-user cache directory). ``on_update``, ``must_staple`` and ``policy`` go to the
    :class:`~staple.Stapler`.

    On startup, before uvicorn's lifespan and listeners, the stapler opens every chain
    (concurrently, each waiting a bounded time for its first response), so the first
    handshake is stapled; a chain or key that cannot be used logs an error and exits with
    uvicorn's ``STARTUP_FAILURE`` (3). On shutdown the stapler and the store are closed after
    uvicorn's graceful shutdown. :attr:`stapler` is the running stapler.

    ``transport`` is staple's TLS transport (see :func:`staple.tls.create_server`):
    ``"socket"``, the default, runs OpenSSL on each accepted socket, and staple listens;
    ``"memory"`` runs it on memory BIOs under the transport of uvicorn's own listener.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        certs: Sequence[CertSpec],
        store: Store | str | None = None,
        on_update: OnUpdate | None = None,
        must_staple: MustStaple | str = MustStaple.LENIENT,
        policy: RefreshPolicy | None = None,
        handshake_timeout: float = tls.DEFAULT_HANDSHAKE_TIMEOUT,
        max_handshakes: int | None = MAX_HANDSHAKES,
        transport: tls.TransportKind = tls.DEFAULT_TRANSPORT,
    ) -> None:
        if config.is_ssl:
            raise TypeError(
                "uvicorn's ssl_* options make a stdlib ssl context, which cannot staple; "
                "give staple the certificate with certs=[(chain, key)] instead"
            )
        if config.http2:
            raise ValueError("HTTP/2 (http2=True) is not supported over staple's TLS")
        if not certs:
            raise ValueError("certs= needs at least one (chain, key) pair")
        if isinstance(store, str) and not store.startswith(STORE_SCHEMES):
            raise ValueError(f"store={store!r}: expected a Store or redis://HOST:PORT/DB")
        super().__init__(config)
        self.certs = [(chain, key) for chain, key in certs]
        self.stapler: Stapler | None = None
        self._store_option = store
        self._store: Store | None = None
        self._stapler_options: dict[str, Any] = {
            "on_update": on_update,
            "must_staple": MustStaple(must_staple),
            "policy": policy,
        }
        self._handshake_timeout = handshake_timeout
        self._max_handshakes = max_handshakes
        self._transport_kind = tls._check_transport(transport)
        self._transports: weakref.WeakSet[tls.TLSTransport] = weakref.WeakSet()
        self._stopping = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().serve(sockets=sockets)
        finally:
            await self._close_stapler()  # when startup failed or was interrupted

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        config = self.config
        if not config.loaded:
            config.load()
        context = await self._open_stapler()
        if self._transport_kind == "memory":
            config.http_protocol_class = self._protocol_class(config.http_protocol_class, context)
            await super().startup(sockets=sockets)
        else:
            # uvicorn's lifespan, and no listener of uvicorn's: staple's servers follow.
            await super().startup(sockets=[])
            await self._listen(sockets, context)
        if self.started and self.stapler is not None:
            for handle in self.stapler.handles:
                logger.info("Process [%d] %s", os.getpid(), status_line(handle))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Handshakes in progress have no uvicorn protocol yet: uvicorn cannot end them.
        self._stopping = True
        for transport in self._handshaking():
            transport.abort()
        try:
            await super().shutdown(sockets=sockets)
        finally:
            await self._close_stapler()

    def _handshaking(self) -> list[Any]:
        """The connections still in the TLS handshake: the socket transport's servers know
        them (and accept nothing once closed, which uvicorn's shutdown does in the same step);
        the memory transport's connections are tracked one by one."""
        if self._transport_kind == "socket":
            return [
                transport
                for server in getattr(self, "servers", ())
                if isinstance(server, tls_socket.SocketTLSServer)
                for transport in server.handshaking()
            ]
        return [t for t in self._transports if t.tls_state is tls.TLSState.DO_HANDSHAKE]

    def _log_started_message(self, listeners: Sequence[socket.SocketType]) -> None:
        config = self.config
        if config.fd is not None or config.uds is not None:
            super()._log_started_message(listeners)
            return
        host = "0.0.0.0" if config.host is None else config.host
        port = config.port or listeners[0].getsockname()[1]
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        logger.info("Uvicorn running on https://%s, stapling (Press CTRL+C to quit)", where)

    # -- the stapler -------------------------------------------------------------------------

    async def _open_stapler(self) -> SSL.Context:
        option = self._store_option
        try:
            if option is None:
                store = store_from_environment()
            elif isinstance(option, str):
                store = store_from_url(option)
            else:
                store = option
        except ValueError as exc:  # a store URL that is not redis://
            logger.error("Cannot staple: %s", exc)
            sys.exit(STARTUP_FAILURE)
        self._store = store
        redis_store = sys.modules.get("staple.redis_store")  # not loaded: not a RedisStore
        if redis_store is not None and isinstance(store, redis_store.RedisStore):
            # Subscribe before the first fetch so no fleet notice is missed (as staple serve).
            await store.connect()
        stapler = self.stapler = Stapler(store=store, **self._stapler_options)
        problems = [p for p in await asyncio.gather(*map(self._add, self.certs)) if p]
        if not problems:
            try:
                return build_server_context(self.certs, stapler)
            except OcspError as exc:  # ChainError: a key that does not match its certificate
                problems.append(str(exc))
        for problem in problems:
            logger.error("Cannot staple: %s", problem)
        await self._close_stapler()
        sys.exit(STARTUP_FAILURE)

    async def _add(self, spec: CertSpec) -> str | None:
        chain = spec[0]
        assert self.stapler is not None
        try:
            await self.stapler.add(chain if isinstance(chain, bytes) else Path(chain))
        except OcspError as exc:  # ChainError, NoResponderError
            where = "PEM data" if isinstance(chain, bytes) else os.fspath(chain)
            return f"{where}: {exc}"
        return None

    async def _close_stapler(self) -> None:
        stapler, self.stapler = self.stapler, None
        store, self._store = self._store, None
        if stapler is not None:
            await stapler.close()
        if store is not None:
            await store.close()

    # -- the connections -----------------------------------------------------------------------

    async def _listen(self, sockets: list[socket.socket] | None, context: SSL.Context) -> None:
        """Listen where uvicorn's startup would have (the socket transport); as uvicorn, log
        a failure to bind, shut the lifespan down and exit with ``STARTUP_FAILURE``."""
        config = self.config
        http: Any = config.http_protocol_class
        http = getattr(http, "_staple_wraps", http)  # a memory-transport start before
        server_state, app_state = self.server_state, self.lifespan.state

        def make_protocol() -> asyncio.BaseProtocol:
            return cast(
                asyncio.BaseProtocol,
                http(config=config, server_state=server_state, app_state=app_state),
            )

        async def serve(
            sock: socket.socket | None = None, **where: Any
        ) -> tls_socket.SocketTLSServer:
            return await tls_socket.create_server(
                make_protocol,
                sock=sock,
                ssl_context=context,
                handshake_timeout=self._handshake_timeout,
                max_handshakes=self._max_handshakes,
                backlog=config.backlog,
                coalesce_writes=True,  # uvicorn writes a response's head and body apart
                **where,
            )

        self.servers = []
        try:
            if sockets is not None:  # a gunicorn worker's, or staple serve's
                for sock in sockets:
                    self.servers.append(await serve(sock))
                return
            if config.fd is not None:  # a copy, as uvicorn's socket.fromfd(): the fd stays theirs
                self.servers.append(await serve(socket.socket(fileno=os.dup(config.fd))))
            elif config.uds is not None:
                self.servers.append(await serve(_unix_socket(config.uds)))
            else:
                self.servers.append(await serve(host=config.host, port=config.port))
        except OSError as exc:
            logger.error(exc)
            for server in self.servers:
                server.close()
            self.started = False
            await self.lifespan.shutdown()
            sys.exit(STARTUP_FAILURE)
        self._log_started_message([s for server in self.servers for s in server.sockets])

    def _protocol_class(
        self, http_protocol: type[asyncio.Protocol], context: SSL.Context
    ) -> type[asyncio.Protocol]:
        """``http_protocol`` behind staple's TLS, constructed the way uvicorn constructs it."""
        http_protocol = getattr(http_protocol, "_staple_wraps", http_protocol)  # started before
        make_http: Any = http_protocol
        gate = tls.HandshakeGate(self._max_handshakes) if self._max_handshakes else None
        handshake_timeout = self._handshake_timeout
        on_connection = self._on_connection

        class StaplingProtocol(tls.TLSServerProtocol):
            """TLS around one connection's uvicorn protocol, given the transport after the
            handshake."""

            def __init__(
                self,
                config: uvicorn.Config,
                server_state: Any,
                app_state: dict[str, Any],
                _loop: asyncio.AbstractEventLoop | None = None,
            ) -> None:
                app = make_http(
                    config=config, server_state=server_state, app_state=app_state, _loop=_loop
                )
                super().__init__(
                    app,
                    context,
                    handshake_timeout=handshake_timeout,
                    on_connection=on_connection,
                    handshake_gate=gate,
                )

        StaplingProtocol._staple_wraps = http_protocol  # type: ignore[attr-defined]
        # uvicorn types it as an asyncio.Protocol; loop.create_server takes any protocol.
        return cast(type[asyncio.Protocol], StaplingProtocol)

    def _on_connection(self, transport: tls.TLSTransport) -> None:
        if self._stopping:  # accepted just before shutdown, connected just after: refuse it
            transport.abort()
            return
        self._transports.add(transport)


def run(
    app: Any,
    *,
    certs: Sequence[CertSpec],
    store: Store | str | None = None,
    on_update: OnUpdate | None = None,
    must_staple: MustStaple | str = MustStaple.LENIENT,
    policy: RefreshPolicy | None = None,
    transport: tls.TransportKind = tls.DEFAULT_TRANSPORT,
    **uvicorn_options: Any,
) -> None:
    """``uvicorn.run(app, **uvicorn_options)``, stapling every TLS handshake.

    ``uvicorn_options`` are ``uvicorn.run``'s keywords (``host``, ``port``, ``log_level``,
    ``lifespan``, ``proxy_headers``, ``root_path``, ``limit_concurrency``, ``ws``, ``http``...;
    also ``uvicorn.Config``'s ``timeout_notify`` and ``callback_notify``). Its ``ssl_*``
    options, ``reload`` and ``http2`` are refused (:exc:`TypeError` / :exc:`ValueError`), as
    are keywords it does not know. ``certs``, ``store``, ``on_update``, ``must_staple``,
    ``policy`` and ``transport``: see :class:`Server`.

    ``workers=N`` forks N processes sharing one listening socket (host and port only), each
    with its own stapler over the same store; unlike ``uvicorn.run`` the app need not be an
    import string. A worker that dies is replaced.

    Returns after a graceful shutdown on SIGINT or SIGTERM (so a process stopped by either
    exits 0; plain ``uvicorn.run`` lets SIGTERM kill the process once it has shut down). Exits
    with status 3 when it could not start, as ``uvicorn.run`` does.
    """
    _check_options(uvicorn_options)
    app_dir = uvicorn_options.pop("app_dir", None)
    if app_dir is not None:
        sys.path.insert(0, app_dir)
    config = uvicorn.Config(app, **uvicorn_options)
    stapling: dict[str, Any] = {
        "certs": certs,
        "store": store,
        "on_update": on_update,
        "must_staple": must_staple,
        "policy": policy,
        "transport": tls._check_transport(transport),
    }
    if config.workers > 1:
        sys.exit(_run_workers(config, stapling))
    server = Server(config, **stapling)
    # uvicorn re-raises the SIGINT it handled: KeyboardInterrupt after a clean shutdown.
    with _sigterm_returns(server), contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def _unix_socket(path: str) -> socket.socket:
    """A bound Unix socket at ``path``, as uvicorn's ``uds=`` makes it: a stale socket file
    is replaced (as ``loop.create_unix_server`` does) and its permissions are kept."""
    permissions = 0o666
    with contextlib.suppress(FileNotFoundError):
        mode = os.stat(path).st_mode
        permissions = stat.S_IMODE(mode)
        if stat.S_ISSOCK(mode):
            os.remove(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, permissions)
    except BaseException:
        sock.close()
        raise
    return sock


def _check_options(options: dict[str, Any]) -> None:
    known = set(inspect.signature(uvicorn.Config).parameters) | _RUN_ONLY
    known.discard("app")
    tls_options = sorted(name for name in options if name.startswith("ssl_"))
    if tls_options:
        raise TypeError(
            f"staple.uvicorn.run() does not take {', '.join(tls_options)}: uvicorn's TLS is the "
            "stdlib ssl module, which cannot staple; pass certs=[(chain, key)] instead"
        )
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"staple.uvicorn.run() got unexpected keyword arguments: {unknown}")
    if options.get("reload"):
        raise ValueError("reload=True is not supported by staple.uvicorn.run()")


class _sigterm_returns:
    """While serving, let SIGTERM end in a return rather than the process's death.

    ``uvicorn.Server`` handles SIGTERM with a graceful shutdown, then restores the previous
    handler and raises the signal again. With the default handler that kills the process
    (status -15) after a clean shutdown; a handler that only asks the server to exit makes
    ``run()`` return instead. Only when nothing else handles SIGTERM, and in the main thread.
    """

    def __init__(self, server: uvicorn.Server) -> None:
        self._server = server
        self._installed = False

    def _handle(self, sig: int, frame: FrameType | None) -> None:
        self._server.should_exit = True  # also covers a SIGTERM before uvicorn's handler

    def __enter__(self) -> None:
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        ):
            signal.signal(signal.SIGTERM, self._handle)
            self._installed = True

    def __exit__(self, *exc_info: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run_workers(config: uvicorn.Config, stapling: dict[str, Any]) -> int:
    """Fork ``config.workers`` processes serving one listening socket; the exit status.

    :func:`staple.workers.run_workers` supervises them: each child runs its own
    :class:`Server` (so its own stapler, over a store of its own making or a forked copy of
    the one given); a child that dies is replaced; one that could not start (status 3) stops
    them all.
    """
    if config.uds is not None or config.fd is not None:
        raise ValueError("workers > 1 needs host and port, not uds or fd")
    host = "0.0.0.0" if config.host is None else config.host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, config.port), family=family, backlog=config.backlog)
    except OSError as exc:
        logger.error("%s", exc)
        return STARTUP_FAILURE
    port = sock.getsockname()[1]
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    logger.info(
        "Uvicorn running on https://%s with %d worker processes, stapling (Press CTRL+C to quit)",
        where,
        config.workers,
    )

    def work() -> int:
        server = Server(config, **stapling)
        with _sigterm_returns(server), contextlib.suppress(KeyboardInterrupt):
            server.run(sockets=[sock])
        return 0 if server.started else STARTUP_FAILURE

    try:
        return run_workers(
            config.workers, work, report=_report_worker, startup_failure=STARTUP_FAILURE
        )
    finally:
        sock.close()


def _report_worker(level: int, message: str) -> None:
    logger.log(level, "%s", message[:1].upper() + message[1:])
