"""The app the ``servers`` and ``e2e`` sections serve, twice: a raw ASGI app and an aiohttp app.

Both answer ``GET`` with the same tiny JSON body (``{"hello": "world"}``, with a
``Content-Length``, so keep-alive clients need no chunked decoding). ``asgi`` also completes
the lifespan protocol, so uvicorn and gunicorn start it without a warning.

``python -m bench._apps KIND CHAIN KEY PORT STORE_DIR [LOOP | TRANSPORT]`` runs one of the
servers that have no command line of their own, on 127.0.0.1 until SIGTERM:

- ``staple-uvicorn``: ``staple.uvicorn.run(asgi, certs=[(CHAIN, KEY)], workers=1, loop=LOOP,
  transport=TRANSPORT)`` (``LOOP``: uvicorn's ``--loop``, ``auto`` by default; ``TRANSPORT``:
  ``socket`` by default, or ``memory``);
- ``staple-aiohttp``: ``staple.aiohttp.run_app(aiohttp_app(), certs=[(CHAIN, KEY)])``;
- ``aiohttp``: ``aiohttp.web.run_app(aiohttp_app(), ssl_context=<stdlib ssl.SSLContext>)``;
- ``staple-aiohttp-server``: :class:`staple.aiohttp.StaplingServer` (what ``run_app`` runs,
  serving through ``StaplingSite``) with ``transport=TRANSPORT`` in place of ``LOOP`` (``memory``
  by default, or ``socket``), on asyncio's loop (for the ``e2e`` section);
- ``aiohttp-plain``: ``aiohttp.web.run_app(aiohttp_app())``, plain HTTP (``CHAIN``, ``KEY``
  and ``STORE_DIR`` unused): the app behind nginx in ``e2e``, and its floor.

The staple servers read their OCSP response from the :class:`~staple.FileStore` in
``STORE_DIR``, filled beforehand, as after a restart: they staple from the first handshake and
never need a responder. (``uvicorn`` itself and ``gunicorn`` are run through their own command
lines; gunicorn's staple workers find the store through ``STAPLE_CACHE_DIR``.)
"""

from __future__ import annotations

import json
import ssl
import sys
from typing import Any

from aiohttp import web

BODY = json.dumps({"hello": "world"}).encode()
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": f"{message['type']}.complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


async def _hello(request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


def aiohttp_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", _hello)
    return app


def main(argv: list[str] | None = None) -> None:
    kind, chain, key, port_text, store_dir, *rest = sys.argv[1:] if argv is None else argv
    port = int(port_text)
    host = "127.0.0.1"
    if kind == "staple-uvicorn":
        import staple.uvicorn
        from staple import FileStore

        staple.uvicorn.run(
            asgi,
            certs=[(chain, key)],
            store=FileStore(store_dir),
            host=host,
            port=port,
            workers=1,
            loop=rest[0] if rest else "auto",
            transport=rest[1] if len(rest) > 1 else "socket",
            log_level="warning",
            access_log=False,
        )
    elif kind == "staple-aiohttp":
        import staple.aiohttp
        from staple import FileStore

        staple.aiohttp.run_app(
            aiohttp_app(),
            certs=[(chain, key)],
            host=host,
            port=port,
            store=FileStore(store_dir),
            access_log=None,
            print=None,
        )
    elif kind == "aiohttp":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(chain, key)
        web.run_app(
            aiohttp_app(), host=host, port=port, ssl_context=context, access_log=None, print=None
        )
    elif kind == "staple-aiohttp-server":
        import asyncio

        import staple.aiohttp
        from staple import FileStore, Stapler

        server = staple.aiohttp.StaplingServer(
            aiohttp_app(),
            certs=[(chain, key)],
            stapler=Stapler(store=FileStore(store_dir)),
            host=host,
            port=port,
            transport="socket" if rest and rest[0] == "socket" else "memory",
            access_log=None,
        )
        asyncio.run(server.run())
    elif kind == "aiohttp-plain":
        web.run_app(aiohttp_app(), host=host, port=port, access_log=None, print=None)
    else:
        raise SystemExit(f"unknown server kind {kind!r}")


if __name__ == "__main__":
    main()
