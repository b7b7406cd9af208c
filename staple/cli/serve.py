"""``staple serve``: an aiohttp HTTPS server that staples, for trying staple on real clients.

One :class:`~staple.Stapler` (responses persisted in a :class:`~staple.FileStore`, so a restart
staples its first handshake even while the responder is down, or shared through Redis with
``--store``), served by :class:`~staple.aiohttp.StaplingServer` (what
:func:`staple.aiohttp.run_app` runs too). Routes (:mod:`staple.status_page`):

- ``/``: an HTML page with each certificate's staple status;
- ``/status.json``: the same, as JSON;
- ``/static/...``: the files under ``--static``: regular files up to 64 KiB from memory
  (:class:`~staple.static_files.SmallFiles`), everything else by aiohttp's ``add_static``.

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
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from .. import tls
from ..aiohttp import StaplingServer, StartError
from ..handle import Event, ServerOcspResponse
from ..policy import RefreshPolicy
from ..proxy import ProxyOption
from ..server_context import TLSProfile
from ..stapler import Stapler
from ..static_files import SmallFiles
from ..status_page import status_app, status_line
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
]

EXIT_OK, EXIT_USAGE = 0, 2

HELP = "an HTTPS server (aiohttp) that staples, until Ctrl-C"
DESCRIPTION = (
    "Serve HTTPS on HOST:PORT with an OCSP staple for every certificate. Prints 'listening on "
    "https://HOST:PORT' and one status line per certificate, then one line per refresh event."
)
EPILOG = """\
routes:
  /              HTML page with each certificate's staple status
  /status.json   the same as JSON
  /static/...    files under --static (with an index); files up to 64 KiB from memory

exit codes: 0 stopped by SIGINT/SIGTERM, 2 could not start (bad chain/key, no responder,
port in use). Without --no-cache, a restart staples its first handshake from the cache even
while the responder is down.
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
        "--transport",
        choices=tls.TRANSPORTS,
        default="memory",
        help="TLS transport: memory BIOs under asyncio's TCP transport, or OpenSSL on the "
        "socket itself (%(default)s)",
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
        transport=args.transport,
    )
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
    transport: tls.TransportKind = "memory"
    """The TLS transport: memory BIOs, or OpenSSL on the socket (see :mod:`staple.tls`)."""


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
    """What serves it: its sites, their handshake cap."""


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
    handle_signals = stop is None
    stop = asyncio.Event() if stop is None else stop
    started = False

    def on_update(event: Event) -> None:
        # Before the start the status lines say it all; after the stop, "closed" is noise.
        if started and not stop.is_set():
            _say(out, f"{_stamp()} {event}")

    def cannot_start(reason: str) -> int:
        print(f"staple serve: {reason}", file=sys.stderr, flush=True)
        if ready is not None and not ready.done():
            ready.set_exception(RuntimeError(reason))
        return EXIT_USAGE

    bad_store = store_url_problem(config.store_url)
    if bad_store is not None:
        return cannot_start(bad_store)
    try:
        _check_paths(config)
    except StartError as exc:
        return cannot_start(str(exc))
    store = await open_store(cache_dir=config.cache_dir, store_url=config.store_url)
    try:
        stapler = Stapler(
            store=store, policy=config.policy, on_update=on_update, proxy=config.proxy
        )
        static = Path(config.static) if config.static is not None else None
        files = SmallFiles(static) if static is not None else None
        server = StaplingServer(
            status_app(static=static, files=files),
            certs=[(Path(chain), Path(key)) for chain, key in config.certs],
            stapler=stapler,
            host=config.host,
            port=config.port,
            responder_urls=[config.responder] if config.responder else None,
            access_log=None,
            tls_profile=config.tls_profile,
            transport=config.transport,
        )

        def on_start(server: StaplingServer) -> None:
            nonlocal started
            _say(out, f"listening on {server.url}")
            _say(out, f"event loop: {describe_loop(asyncio.get_running_loop())}")
            for handle in server.handles:
                _say(out, status_line(handle))
            started = True
            if ready is not None and not ready.done():
                serving = Serving(
                    server.url, config.host, server.port, stapler, server.handles, files, server
                )
                ready.set_result(serving)

        try:
            await server.run(stop=stop, handle_signals=handle_signals, on_start=on_start)
        except StartError as exc:
            return cannot_start(str(exc))
        return EXIT_OK
    finally:
        await store.close()


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
    if config.static is not None and not os.path.isdir(config.static):
        raise StartError(f"--static {os.fspath(config.static)!r} is not a directory")


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
