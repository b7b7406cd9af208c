"""A TLS client that sees the server's records: how many a reply took."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable

from .server_process import HOST


async def reply_records(
    port: int, ctx: ssl.SSLContext, message: bytes, complete: Callable[[bytes], bool]
) -> tuple[bytes, list[int]]:
    """Send ``message`` over TLS (a TLS 1.2 ``ctx``) and read the reply until ``complete``,
    on memory BIOs over a plain TCP stream, so that the records are seen as they arrive: the
    reply and each record's length."""
    reader, writer = await asyncio.open_connection(HOST, port)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_client = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")

    async def send_out() -> None:
        writer.write(outgoing.read())
        await writer.drain()

    try:
        while True:
            try:
                tls_client.do_handshake()
                break
            except ssl.SSLWantReadError:
                await send_out()
                data = await reader.read(65536)
                assert data, "EOF in the handshake"
                incoming.write(data)
        tls_client.write(message)
        await send_out()
        reply, records, raw = b"", [], b""
        while not complete(reply):
            data = await reader.read(65536)
            assert data, "EOF before the reply"
            raw += data
            while len(raw) >= 5 and len(raw) >= 5 + int.from_bytes(raw[3:5], "big"):
                length = int.from_bytes(raw[3:5], "big")
                # application_data: in TLS 1.2 nothing else follows the handshake
                assert raw[0] == 23, f"a record of type {raw[0]} in the reply"
                records.append(length)
                incoming.write(raw[: 5 + length])
                raw = raw[5 + length :]
                reply += tls_client.read(65536)
        return reply, records
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
