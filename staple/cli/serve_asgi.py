"""``staple serve --app`` for an ASGI application: :class:`staple.uvicorn.Server` (uvicorn's
HTTP and WebSocket protocols, its lifespan, its graceful shutdown) over staple's TLS, on a
socket ``staple serve`` bound, stopped by ``staple serve``'s ``stop`` event rather than by
uvicorn's own signal handling.

Importing this module imports uvicorn: ``staple serve`` imports it only for an ASGI app, and
says which extra to install when that fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import uvicorn
from OpenSSL import SSL

from ..errors import OcspError
from ..handle import OnUpdate, ResponderUrls
from ..policy import RefreshPolicy
from ..proxy import ProxyOption
from ..server_context import CertSpec, TLSProfile, build_server_context
from ..store import Store
from ..tls import DEFAULT_TRANSPORT, TransportKind
from ..uvicorn import Server

__all__ = ["UVICORN_VERSION", "AppServer", "serve_asgi"]

UVICORN_VERSION = uvicorn.__version__


class AppServer(Server):
    """:class:`staple.uvicorn.Server` with what ``staple serve`` adds: the responder URL
    override, the responders' proxy, the TLS profile, an ``on_start`` callback once it
    listens, and no signal handling of its own."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        certs: Sequence[CertSpec],
        store: Store,
        on_update: OnUpdate | None,
        policy: RefreshPolicy | None,
        responder_urls: ResponderUrls | None,
        proxy: ProxyOption,
        tls_profile: TLSProfile,
        on_start: Callable[[AppServer], object],
        transport: TransportKind = DEFAULT_TRANSPORT,
    ) -> None:
        super().__init__(
            config,
            certs=certs,
            store=store,
            on_update=on_update,
            policy=policy,
            transport=transport,
        )
        self._stapler_options["proxy"] = proxy
        self._responder_urls = responder_urls
        self._tls_profile = tls_profile
        self._on_start = on_start

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """``staple serve`` handles SIGINT and SIGTERM (they set its ``stop`` event)."""
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._on_start(self)

    async def _open_stapler(self) -> SSL.Context:
        context = await super()._open_stapler()
        if self._tls_profile is TLSProfile.INTERMEDIATE or self.stapler is None:
            return context  # what Server builds
        return build_server_context(self.certs, self.stapler, profile=self._tls_profile)

    async def _add(self, spec: CertSpec) -> str | None:
        chain = spec[0]
        assert self.stapler is not None
        try:
            await self.stapler.add(
                chain if isinstance(chain, bytes) else Path(chain),
                responder_urls=self._responder_urls,
            )
        except OcspError as exc:  # ChainError, NoResponderError
            where = "PEM data" if isinstance(chain, bytes) else os.fspath(chain)
            return f"{where}: {exc}"
        return None


async def serve_asgi(
    app: Any,
    *,
    sock: socket.socket,
    stop: asyncio.Event,
    **server_options: Any,
) -> bool:
    """Serve ``app`` on ``sock`` until ``stop`` is set; whether it started (``False``: the
    stapler or the app's lifespan start-up failed, and uvicorn logged why).
    ``server_options`` are :class:`AppServer`'s."""
    config = uvicorn.Config(
        app,
        lifespan="auto",
        log_config=None,  # staple serve prints its own lines; uvicorn's go to logging
        access_log=False,
        proxy_headers=False,  # clients connect here directly, over our TLS
    )
    server = AppServer(config, **server_options)

    async def stop_when_asked() -> None:
        await stop.wait()
        server.should_exit = True

    watcher = asyncio.create_task(stop_when_asked(), name="staple serve: stop uvicorn")
    try:
        await server.serve(sockets=[sock])
    except SystemExit:  # uvicorn's STARTUP_FAILURE: the stapler or the lifespan start-up
        return False
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return server.started
