"""Apps the uvicorn and gunicorn subprocess tests serve (imported by the server processes).

``app``: a raw ASGI app (no framework). HTTP answers a JSON description of its scope
(``scheme``, ``client``, ``server``); a WebSocket echoes each text message prefixed with the
scope's scheme; lifespan prints ``app: startup`` / ``app: shutdown`` to stdout.
``aiohttp_app``: an aiohttp application answering the same JSON for HTTP.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

Scope = dict[str, Any]


async def app(scope: Scope, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = message["type"].rsplit(".", 1)[-1]  # startup / shutdown
            print(f"app: {kind}", flush=True)
            await send({"type": f"{message['type']}.complete"})
            if kind == "shutdown":
                return
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": f"{scope['scheme']}: {message['text']}"})
        return
    body = json.dumps(
        {
            "scheme": scope["scheme"],
            "client": scope["client"],
            "server": scope["server"],
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _describe(request: web.Request) -> web.Response:
    return web.json_response(
        {"scheme": request.scheme, "client": request.remote, "server": request.host}
    )


aiohttp_app = web.Application()
aiohttp_app.router.add_get("/", _describe)
