"""``staple serve``: an aiohttp HTTPS server that staples, for trying staple on real clients.

One :class:`~staple.Stapler` (responses persisted in a :class:`~staple.FileStore`, so a restart
staples its first handshake even while the responder is down), one SNI-aware pyOpenSSL context
from :func:`~staple.contexts.build_server_context`, served by
:class:`~staple.aiohttp.StaplingSite`. Routes:

- ``/``: an HTML page with each certificate's staple status;
- ``/status.json``: the same, as JSON;
- ``/static/...``: the files under ``--static`` (aiohttp's ``add_static``, i.e. ``FileResponse``
  and ``loop.sendfile`` over staple's TLS transport).

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
import json
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from aiohttp import web
from OpenSSL import SSL

from . import ocsp
from .aiohttp import StaplingSite
from .contexts import build_server_context, host_names
from .errors import ChainError, OcspError
from .handle import Event, ServerOcspResponse
from .policy import RefreshPolicy
from .stapler import Stapler
from .store import FileStore, MemoryStore, Store

__all__ = ["ServeConfig", "Serving", "default_cache_dir", "serve", "status_of"]

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


async def serve(
    config: ServeConfig,
    *,
    out: TextIO | None = None,
    ready: asyncio.Future[Serving] | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Run ``staple serve`` until ``stop`` is set (default: until SIGINT or SIGTERM).

    Prints ``listening on https://HOST:PORT`` and one status line per certificate to ``out``
    (default stdout), then one line per refresher event. Returns the exit code: 0 after a clean
    shutdown, 2 when it could not start (unreadable chain or key, no responder, port in use);
    ``ready`` then gets a ``RuntimeError`` instead of a :class:`Serving`.
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
            runner = web.AppRunner(_app(config, stapler, handles), access_log=None)
            await runner.setup()
            site = await _listen(runner, config, ctx)
        except _CannotStart as exc:
            print(f"staple serve: {exc}", file=sys.stderr, flush=True)
            if ready is not None and not ready.done():
                ready.set_exception(RuntimeError(str(exc)))
            return EXIT_USAGE
        _say(out, f"listening on {site.name}")
        for handle in handles:
            _say(out, status_line(handle))
        started = True
        if ready is not None and not ready.done():
            ready.set_result(Serving(site.name, config.host, site.port, stapler, handles))
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
    config: ServeConfig, stapler: Stapler, handles: list[ServerOcspResponse]
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
        app.router.add_static("/static/", Path(config.static), show_index=True)
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
