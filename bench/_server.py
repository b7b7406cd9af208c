"""A benchmark server in its own process: ``python -m bench._server CONFIG_JSON``.

The same aiohttp app behind either TLS stack:

- ``"staple"``: :class:`staple.aiohttp.StaplingSite` on a pyOpenSSL context. With
  ``"staple": "path.der"`` a :class:`~staple.Stapler` holds that (pre-signed) response, loaded
  from a pre-filled :class:`~staple.MemoryStore` exactly as after a restart, and staples it; with
  ``null`` no OCSP callback is installed (stapling off).
  ``"transport"`` is the site's TLS transport, ``"memory"`` (the default) or ``"socket"``.
- ``"stdlib"``: aiohttp's ``TCPSite`` with an ``ssl.SSLContext`` (which cannot staple).

Routes: ``GET /`` a two-byte body; ``GET /download?bytes=N`` N bytes in 64 KiB writes;
``POST /upload`` counts the body. On ``"loop": "uvloop"`` it runs on uvloop.

Protocol with the parent: one line ``{"port": P, "pid": PID}`` on stdout once listening; it
serves until stdin closes, then prints ``{"stapled": ..., ...}`` and exits. The parent measures
this process's CPU time from outside (``bench._proc.cpu_seconds``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from OpenSSL import SSL

from staple import MemoryStore, Stapler, ocsp
from staple.aiohttp import StaplingSite
from staple.chain import load_chain
from staple.server_context import build_server_context, new_context

CHUNK = os.urandom(64 * 1024)


def app() -> web.Application:
    application = web.Application()

    async def index(request: web.Request) -> web.Response:
        return web.Response(body=b"ok")

    async def download(request: web.Request) -> web.StreamResponse:
        total = int(request.query.get("bytes", "0"))
        response = web.StreamResponse()
        response.content_length = total
        response.content_type = "application/octet-stream"
        await response.prepare(request)
        sent = 0
        while sent < total:
            part = CHUNK if total - sent >= len(CHUNK) else CHUNK[: total - sent]
            await response.write(part)
            sent += len(part)
        await response.write_eof()
        return response

    async def upload(request: web.Request) -> web.Response:
        received = 0
        async for chunk in request.content.iter_any():
            received += len(chunk)
        return web.Response(text=str(received))

    application.router.add_get("/", index)
    application.router.add_get("/download", download)
    application.router.add_post("/upload", upload)
    return application


def plain_context(chain: str, key: str) -> SSL.Context:
    """What ``build_server_context`` makes (the same TLS profile), without the OCSP callback:
    stapling off."""
    ctx = new_context()
    ctx.use_certificate_chain_file(chain)
    ctx.use_privatekey_file(key)
    return ctx


async def preloaded_store(chain: str, der: bytes) -> MemoryStore:
    """A store that already holds ``der``, ``chain``'s response: a stapler over it staples
    from the first handshake and schedules its refresh hours ahead, so the (unreachable)
    responder is never asked."""
    certs = load_chain(Path(chain))
    store = MemoryStore()
    key = ocsp.cert_id(certs[0], certs[1]).key
    verified = ocsp.validate(der, certs[0], certs[1], now=datetime.now(UTC))
    await store.put(key, der, expires=verified.expires)
    return store


async def preloaded_stapler(chain: str, der: bytes) -> Stapler:
    """A Stapler over :func:`preloaded_store`."""
    stapler = Stapler(store=await preloaded_store(chain, der))
    handle = await stapler.add(Path(chain), responder_urls=["http://127.0.0.1:9/"], wait=False)
    if handle.get_context() is None:
        raise SystemExit(f"the pre-signed response was not adopted: {handle.last_error}")
    ctx = handle.get_context()
    assert ctx is not None
    ctx.free()
    ctx.free()
    return stapler


async def serve(config: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def wait_for_stdin() -> None:
        sys.stdin.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=wait_for_stdin, daemon=True).start()
    runner = web.AppRunner(app(), access_log=None)
    await runner.setup()
    stapler: Stapler | None = None
    site: web.BaseSite
    host = config.get("host", "127.0.0.1")
    if config["kind"] == "staple":
        if config.get("staple"):
            der = Path(config["staple"]).read_bytes()  # noqa: ASYNC240 - before serving
            stapler = await preloaded_stapler(config["chain"], der)
            ctx = build_server_context([(config["chain"], config["key"])], stapler)
        else:
            ctx = plain_context(config["chain"], config["key"])
        site = StaplingSite(
            runner, host, 0, ssl_context=ctx, transport=config.get("transport", "memory")
        )
        await site.start()
        port = site.port
    else:
        stdlib_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        stdlib_ctx.load_cert_chain(config["chain"], config["key"])
        site = web.TCPSite(runner, host, 0, ssl_context=stdlib_ctx)
        await site.start()
        port = runner.addresses[0][1]
    print(json.dumps({"port": port, "pid": os.getpid()}), flush=True)
    await stop.wait()
    stats: dict[str, Any] = {"loop": f"{type(loop).__module__}.{type(loop).__name__}"}
    if stapler is not None:
        stats.update(stapled=stapler.stapled, unstapled=stapler.unstapled)
        stats["callback_errors"] = stapler.callback_errors
    await runner.cleanup()
    if stapler is not None:
        await stapler.close()
    return stats


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    config = json.loads(sys.argv[1])
    if config.get("loop") == "uvloop":
        import uvloop

        stats = uvloop.run(serve(config))
    else:
        stats = asyncio.run(serve(config))
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
