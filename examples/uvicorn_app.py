"""A raw ASGI app on uvicorn, stapling OCSP: ``python examples/uvicorn_app.py CHAIN KEY [PORT]``,
then ``curl --cert-status https://your.host:8443/``. The leaf must name its OCSP responder (AIA).
"""

import sys
from typing import Any

import staple.uvicorn


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":  # lifespan, websocket: nothing to do here
        return
    headers = [(b"content-type", b"text/plain")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": f"hello over {scope['scheme']}\n".encode()})


if __name__ == "__main__":
    chain, key, *port = sys.argv[1:]
    staple.uvicorn.run(app, certs=[(chain, key)], host="0.0.0.0", port=int((port or [8443])[0]))
