"""gunicorn worker classes that staple: ``gunicorn -k staple.gunicorn.AiohttpWorker`` (aiohttp
apps) and ``-k staple.gunicorn.UvicornWorker`` (ASGI apps)::

    gunicorn app:app -k staple.gunicorn.UvicornWorker -b 0.0.0.0:8443 -w 4 \\
        --certfile chain.pem --keyfile key.pem

The certificate comes from gunicorn's own ``--certfile`` (the chain, leaf first) and
``--keyfile`` (may be left out when the key is in the certfile). gunicorn never wraps the
listening sockets in TLS itself: each worker class does its own, and these do it with
:mod:`staple.tls` (pyOpenSSL), never the stdlib :mod:`ssl`, so staple's TLS is the only one.
``--ciphers`` applies (TLS 1.2 cipher list); client certificates (``--cert-reqs``,
``--ca-certs``) are not supported and refused at boot.

Every worker runs its own :class:`~staple.Stapler`, opened before it accepts connections (so
its first handshake is stapled) and closed when it stops, over the store ``staple serve``
uses: ``STAPLE_STORE=redis://...`` (one fetch per refresh for the whole fleet), else a
:class:`~staple.FileStore` in ``STAPLE_CACHE_DIR``, else in the per-user cache directory
(shared by the workers of one machine, and kept across restarts).

Only ``AiohttpWorker`` needs nothing beyond staple; ``UvicornWorker`` needs uvicorn
(``pip install 'ocsp-staple[asgi]'``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import sys
from typing import Any

from aiohttp import web
from aiohttp.worker import GunicornWebWorker
from gunicorn.arbiter import Arbiter
from gunicorn.workers.base import Worker
from OpenSSL import SSL

from .aiohttp import MAX_HANDSHAKES, StaplingSite
from .errors import OcspError
from .server_context import CertSpec, build_server_context
from .stapler import Stapler
from .status_page import status_line
from .store import Store
from .store_choice import store_from_environment

__all__ = ["AiohttpWorker", "UvicornWorker"]


def certs_from_config(cfg: Any) -> list[CertSpec]:
    """``[(certfile, keyfile)]`` from gunicorn's settings; :exc:`RuntimeError` with the fix
    when they ask for something staple cannot do."""
    if not cfg.certfile:
        raise RuntimeError(
            "staple's gunicorn workers serve TLS: pass --certfile CHAIN.pem --keyfile KEY.pem"
        )
    if cfg.cert_reqs or cfg.ca_certs:
        raise RuntimeError(
            "staple's gunicorn workers do not verify client certificates: "
            "drop --cert-reqs and --ca-certs"
        )
    return [(cfg.certfile, cfg.keyfile or cfg.certfile)]


class _Stapling:
    """A worker's stapler and store: opened before it serves, closed after."""

    def __init__(self, cfg: Any, log: Any) -> None:
        self.certs = certs_from_config(cfg)
        self.ciphers: str | None = cfg.ciphers
        self.log = log
        self.store: Store | None = None
        self.stapler: Stapler | None = None

    async def open(self) -> SSL.Context:
        """Open every chain (waiting, bounded, for the first responses), then the context.
        :exc:`RuntimeError` saying why when a chain or key cannot be used."""
        try:
            store = self.store = store_from_environment()
        except ValueError as exc:  # STAPLE_STORE is not a redis:// URL
            raise RuntimeError(str(exc)) from None
        redis_store = sys.modules.get("staple.redis_store")  # not loaded: not a RedisStore
        if redis_store is not None and isinstance(store, redis_store.RedisStore):
            await store.connect()  # subscribe before the first fetch, as staple serve does
        stapler = self.stapler = Stapler(store=store)
        try:
            handles = [await stapler.add(chain) for chain, _ in self.certs]
            context = build_server_context(self.certs, stapler)
            if self.ciphers:
                context.set_cipher_list(self.ciphers.encode())
        except (OcspError, SSL.Error) as exc:
            raise RuntimeError(f"cannot staple {self.certs[0][0]!s}: {exc}") from None
        for handle in handles:
            self.log.info("Worker %d: %s", os.getpid(), status_line(handle))
        return context

    async def close(self) -> None:
        stapler, self.stapler = self.stapler, None
        store, self.store = self.store, None
        if stapler is not None:
            await stapler.close()
        if store is not None:
            await store.close()


class AiohttpWorker(GunicornWebWorker):
    """aiohttp's ``GunicornWebWorker`` serving a :class:`~staple.aiohttp.StaplingSite` on each
    of gunicorn's sockets instead of its TLS site.

    ``_run`` mirrors aiohttp 3.14's (app or app factory, runner, sites, the notify loop);
    everything else (loop setup, signals, access-log format) is inherited.
    """

    async def _run(self) -> None:
        stapling = _Stapling(self.cfg, self.log)
        try:
            context = await stapling.open()
        except RuntimeError as exc:
            self.log.error("%s", exc)
            await stapling.close()
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
        try:
            await self._serve(context)
        finally:
            await stapling.close()

    async def _serve(self, context: SSL.Context) -> None:
        runner: web.BaseRunner | None = None
        if isinstance(self.wsgi, web.Application):
            app = self.wsgi
        elif inspect.iscoroutinefunction(self.wsgi):
            made = await self.wsgi()
            if isinstance(made, web.AppRunner):
                runner = made
            else:
                app = made
        else:
            raise RuntimeError(
                "wsgi app should be either Application or "
                f"async function returning Application, got {self.wsgi}"
            )
        if runner is None:
            runner = web.AppRunner(
                app,
                logger=self.log,
                keepalive_timeout=self.cfg.keepalive,
                access_log=self.log.access_log if self.cfg.accesslog else None,
                access_log_format=self._get_valid_log_format(self.cfg.access_log_format),
                shutdown_timeout=self.cfg.graceful_timeout / 100 * 95,
            )
        await runner.setup()
        server = runner.server
        assert server is not None
        for sock in self.sockets:
            await StaplingSite(
                runner, sock=sock, ssl_context=context, max_handshakes=MAX_HANDSHAKES
            ).start()
        self.booted = True  # the arbiter tells a boot failure from an exit by this
        pid = os.getpid()
        try:
            while self.alive:
                self.notify()
                if self.max_requests and server.requests_count > self.max_requests:
                    self.alive = False
                    self.log.info("Max requests, shutting down: %s", self)
                elif pid == os.getpid() and self.ppid != os.getppid():
                    self.alive = False
                    self.log.info("Parent changed, shutting down: %s", self)
                else:
                    await self._wait_next_notify()
        except Exception:
            pass
        await runner.cleanup()


class UvicornWorker(Worker):  # type: ignore[misc]
    """An ASGI worker: ``uvicorn.workers.UvicornWorker`` (deprecated in uvicorn for the
    ``uvicorn-worker`` package, which this mirrors) running :class:`staple.uvicorn.Server`.

    ``CONFIG_KWARGS`` are extra ``uvicorn.Config`` keywords, as in uvicorn's worker.
    """

    CONFIG_KWARGS: dict[str, Any] = {"loop": "auto", "http": "auto"}  # noqa: RUF012

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        import uvicorn

        for name, source in (
            ("uvicorn.error", self.log.error_log),
            ("uvicorn.access", self.log.access_log),
        ):
            logger = logging.getLogger(name)
            logger.handlers = source.handlers
            logger.setLevel(source.level)
            logger.propagate = False
        options: dict[str, Any] = {
            "app": None,
            "log_config": None,
            "timeout_keep_alive": self.cfg.keepalive,
            "timeout_notify": self.timeout,
            "callback_notify": self.callback_notify,
            "limit_max_requests": self.max_requests,
            "forwarded_allow_ips": self.cfg.forwarded_allow_ips,
        }
        if self.cfg.settings["backlog"].value:
            options["backlog"] = self.cfg.settings["backlog"].value
        options.update(self.CONFIG_KWARGS)
        self.config = uvicorn.Config(**options)

    def init_signals(self) -> None:
        # uvicorn's Server handles SIGINT/SIGTERM itself; gunicorn's handlers would swallow
        # them (and subprocess exit codes).
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, self.handle_usr1)
        signal.siginterrupt(signal.SIGUSR1, False)

    async def _serve(self) -> None:
        from .uvicorn import Server

        try:
            certs = certs_from_config(self.cfg)
        except RuntimeError as exc:
            self.log.error("%s", exc)
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
        self.config.app = self.wsgi
        server = Server(self.config, certs=certs)
        if self.cfg.ciphers:
            self.log.warning("--ciphers is not applied by staple.gunicorn.UvicornWorker")
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGQUIT, self.handle_exit, signal.SIGQUIT, None)
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)

    def run(self) -> None:
        with asyncio.Runner(loop_factory=self.config.get_loop_factory()) as runner:
            runner.run(self._serve())

    async def callback_notify(self) -> None:
        self.notify()
