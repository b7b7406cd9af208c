"""Your own app behind ``staple serve``: an OCSP staple on every handshake, no code of ours::

    cd examples
    staple serve --app serve_app:app --cert chain.pem --key key.pem --host 0.0.0.0
    staple serve --app serve_app:asgi_app --cert chain.pem --key key.pem --workers 4

then ``curl --cert-status https://your.host:8443/``. ``app`` is an aiohttp Application (it
finds the stapler at ``app[staple.aiohttp.STAPLER_KEY]``); ``asgi_app`` a bare ASGI app, as
Starlette, FastAPI or Django's ``ASGIHandler`` make, served on uvicorn's protocols
(``pip install 'ocsp-staple[asgi]'``). The leaf must name its OCSP responder (AIA), or add
``--responder URL``.
"""

from typing import Any

from aiohttp import web

import staple.aiohttp


async def hello(request: web.Request) -> web.Response:
    stapler = request.app[staple.aiohttp.STAPLER_KEY]
    stapled = 0
    for handle in stapler.handles:
        context = handle.get_context()  # a reference to the current response, or None
        if context is not None:
            stapled += 1
            context.free()  # every get_context() needs one free()
    return web.Response(text=f"hello over {request.scheme}, {stapled} certificate(s) stapled\n")


app = web.Application()
app.router.add_get("/", hello)


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":  # lifespan, websocket: nothing to do here
        return
    headers = [(b"content-type", b"text/plain")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": f"hello over {scope['scheme']}\n".encode()})
