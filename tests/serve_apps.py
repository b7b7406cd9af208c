"""Apps ``staple serve --app tests.serve_apps:...`` serves in the tests (imported by the server
processes, from the repository root).

``aiohttp_app``: an aiohttp Application answering ``aiohttp app, pid PID, scheme https``.
``make_aiohttp_app``: a factory of the same (taking the argument list, as
``python -m aiohttp.web`` calls one); ``make_aiohttp_app_async``: an async factory taking nothing.
``asgi_app``: :data:`tests.asgi_apps.app` (a raw ASGI app: JSON of its scope, a WebSocket echo,
lifespan lines).
``failing_startup``: an ASGI app whose lifespan start-up fails.
``not_an_app``, ``make_nothing``: what ``--app`` must refuse. Importing
``tests.serve_apps_broken`` raises.
"""

from __future__ import annotations

import os
from typing import Any

from aiohttp import web

from .asgi_apps import app as asgi_app

__all__ = [
    "aiohttp_app",
    "asgi_app",
    "failing_startup",
    "make_aiohttp_app",
    "make_aiohttp_app_async",
    "make_nothing",
    "not_an_app",
]


async def _hello(request: web.Request) -> web.Response:
    return web.Response(text=f"aiohttp app, pid {os.getpid()}, scheme {request.scheme}\n")


def make_aiohttp_app(argv: list[str]) -> web.Application:
    app = web.Application()
    app.router.add_get("/", _hello)
    return app


async def make_aiohttp_app_async() -> web.Application:
    return make_aiohttp_app([])


def make_nothing() -> int:
    return 42


aiohttp_app = make_aiohttp_app([])
not_an_app = "a string"


async def failing_startup(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await receive()  # lifespan.startup
        await send({"type": "lifespan.startup.failed", "message": "no database"})
