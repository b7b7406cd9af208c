"""The low-level API in one screen: open a handle, get a context, staple its bytes, free it.

Runs against a throwaway PKI and local responder: ``python examples/handle_basics.py``.
"""

from __future__ import annotations

import asyncio

import staple
from staple.testing import OcspResponder, TestPKI


async def main() -> int:
    pki = TestPKI()
    async with OcspResponder(pki) as responder:
        leaf = pki.issue_leaf("example.test", ocsp_url=responder.url)
        async with await staple.open_server_ocsp_response(leaf.chain) as handle:
            ctx = handle.get_context()  # synchronous: safe inside a TLS handshake callback
            if ctx is None:
                print("nothing to staple:", handle.last_error)
                return 1
            with ctx:  # one free() per get_context()
                print(f"{ctx.cert_status.name.lower()} until {ctx.next_update:%Y-%m-%d %H:%M}")
                print(f"{len(ctx.encoded)} bytes to staple; next refresh {handle.next_refresh}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
