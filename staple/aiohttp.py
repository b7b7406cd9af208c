"""aiohttp integration: a site that serves an ``AppRunner`` over stapling TLS.

Shaped like aiohttp's own ``TCPSite`` (runner, host, port, keyword-only options)::

    runner = web.AppRunner(app)
    await runner.setup()
    site = staple.aiohttp.StaplingSite(runner, "0.0.0.0", 8443, ssl_context=ctx)
    await site.start()

and, for the two-line case, :func:`run_app`, which also owns the :class:`~staple.Stapler`
(opened on startup, closed on cleanup, reachable as ``app[staple.aiohttp.STAPLER_KEY]``).
"""

from __future__ import annotations

import asyncio
import signal
import weakref
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiohttp import web
from OpenSSL import SSL
from yarl import URL

from . import tls
from .server_context import CertSpec, build_server_context
from .stapler import Stapler

__all__ = ["STAPLER_KEY", "StaplingSite", "run_app", "setup"]

STAPLER_KEY: web.AppKey[Stapler] = web.AppKey("staple.stapler", Stapler)
"""Where :func:`setup` / :func:`run_app` keep the app's :class:`~staple.Stapler`."""


class StaplingSite(web.BaseSite):
    """An aiohttp site whose TLS is ``staple.tls`` on a pyOpenSSL context (which can staple).

    Connections still in the TLS handshake are invisible to aiohttp's shutdown; the site
    tracks them and aborts them on :meth:`stop`.
    """

    __slots__ = (
        "_bound_port",
        "_handshake_timeout",
        "_host",
        "_max_handshakes",
        "_port",
        "_reuse_address",
        "_reuse_port",
        "_stopping",
        "_tls_context",
        "_tls_shutdown_timeout",
        "_transports",
    )

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str | None = None,
        port: int | None = None,
        *,
        ssl_context: SSL.Context,
        backlog: int = 128,
        reuse_address: bool | None = None,
        reuse_port: bool | None = None,
        handshake_timeout: float = tls.DEFAULT_HANDSHAKE_TIMEOUT,
        tls_shutdown_timeout: float = tls.DEFAULT_SHUTDOWN_TIMEOUT,
        max_handshakes: int | None = None,
    ) -> None:
        if not isinstance(ssl_context, SSL.Context):
            raise TypeError(
                "StaplingSite needs an OpenSSL.SSL.Context (the stdlib ssl module cannot "
                "staple); use aiohttp's TCPSite for an ssl.SSLContext"
            )
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = 8443 if port is None else port
        self._bound_port: int | None = None
        self._reuse_address = reuse_address
        self._reuse_port = reuse_port
        self._tls_context = ssl_context
        self._handshake_timeout = handshake_timeout
        self._tls_shutdown_timeout = tls_shutdown_timeout
        self._max_handshakes = max_handshakes
        self._transports: weakref.WeakSet[tls.TLSTransport] = weakref.WeakSet()
        self._stopping = False

    @property
    def port(self) -> int:
        """The bound port once started (useful with ``port=0``), else the requested one."""
        return self._bound_port if self._bound_port is not None else self._port

    @property
    def name(self) -> str:
        host = self._host or "0.0.0.0"
        return str(URL.build(scheme="https", host=host, port=self.port))

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        factory = tls.server_protocol_factory(
            server,
            self._tls_context,
            handshake_timeout=self._handshake_timeout,
            shutdown_timeout=self._tls_shutdown_timeout,
            on_connection=self._on_connection,
            max_handshakes=self._max_handshakes,
        )
        loop = asyncio.get_running_loop()
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

    def _on_connection(self, transport: tls.TLSTransport) -> None:
        if self._stopping:  # accepted just before stop(), connected just after: refuse it
            transport.abort()
            return
        self._transports.add(transport)

    async def stop(self) -> None:
        # Handshakes in progress have no aiohttp handler yet, so no one else will end them.
        # A connection accepted but not yet connected is caught by _on_connection.
        self._stopping = True
        for transport in list(self._transports):
            if transport.tls_state is tls.TLSState.DO_HANDSHAKE:
                transport.abort()
        await super().stop()


def setup(app: web.Application, stapler: Stapler) -> None:
    """Attach ``stapler`` to ``app``: stored under :data:`STAPLER_KEY`, closed on cleanup."""

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        yield
        await stapler.close()

    app[STAPLER_KEY] = stapler
    app.cleanup_ctx.append(lifetime)


def run_app(
    app: web.Application,
    *,
    certs: Sequence[CertSpec],
    host: str = "0.0.0.0",
    port: int = 8443,
    print_: Any = print,
    **stapler_options: Any,
) -> None:
    """Serve ``app`` over stapling TLS until interrupted: ``certs`` is ``[(chain, key), ...]``
    (PEM paths or bytes; several for SNI or RSA + ECDSA), ``stapler_options`` go to
    :class:`~staple.Stapler` (``store=staple.FileStore(...)``, ``on_update=...``)."""

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        stapler = Stapler(**stapler_options)
        setup(app, stapler)
        runner = web.AppRunner(app)
        try:
            for chain, _ in certs:
                await stapler.add(chain)
            ctx = build_server_context(certs, stapler)
            await runner.setup()
            site = StaplingSite(runner, host, port, ssl_context=ctx)
            await site.start()
            if print_ is not None:
                print_(f"listening on {site.name}")
            await stop.wait()
        finally:
            await runner.cleanup()
            await stapler.close()  # idempotent; covers a failure before the runner started

    asyncio.run(serve())
