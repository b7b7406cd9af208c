"""A pre-signed OCSP responder in its own process: ``python -m bench._responder FILE``.

``FILE`` is JSON ``{"<serial hex>": "<base64 DER response>", ...}``, signed beforehand with
the test PKI's keys, so the responder spends no CPU signing and the process that is measured
does only its own work. Raw asyncio HTTP/1.1 (keep-alive; HTTP/1.0 closes): ``GET
<anything>/<url-escaped base64 request>`` or ``POST`` with the DER request. The request's CertID
serial picks the answer; an unknown serial gets ``unauthorized``. Prints ``{"port": P}`` once
listening and ``{"requests": N}`` when stdin closes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import sys
import threading
import urllib.parse

from cryptography.x509 import ocsp

UNAUTHORIZED = bytes.fromhex("30030a0106")


class Responder:
    def __init__(self, table: dict[int, bytes]) -> None:
        self.table = table
        self.requests = 0

    def answer(self, request_der: bytes) -> bytes:
        try:
            serial = ocsp.load_der_ocsp_request(request_der).serial_number
        except ValueError:
            return UNAUTHORIZED
        return self.table.get(serial, UNAUTHORIZED)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, version = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = b""
                if "content-length" in headers:
                    body = await reader.readexactly(int(headers["content-length"]))
                if method == "POST":
                    request_der = body
                else:
                    encoded = urllib.parse.unquote(target.rsplit("/", 1)[-1])
                    try:
                        request_der = base64.b64decode(encoded)
                    except (binascii.Error, ValueError):
                        request_der = b""
                self.requests += 1
                der = self.answer(request_der)
                close = version == "HTTP/1.0" or headers.get("connection", "").lower() == "close"
                writer.write(
                    f"{version} 200 OK\r\nContent-Type: application/ocsp-response\r\n"
                    f"Content-Length: {len(der)}\r\n"
                    f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n".encode()
                    + der
                )
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()


async def main(raw: dict[str, str]) -> None:
    responder = Responder({int(k, 16): base64.b64decode(v) for k, v in raw.items()})
    server = await asyncio.start_server(responder.handle, "127.0.0.1", 0, backlog=1024)
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def wait_for_stdin() -> None:
        sys.stdin.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=wait_for_stdin, daemon=True).start()
    await stop.wait()
    server.close()
    print(json.dumps({"requests": responder.requests}), flush=True)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        table = json.load(f)
    asyncio.run(main(table))
