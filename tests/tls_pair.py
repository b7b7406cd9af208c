"""A real TLS handshake between two pyOpenSSL connections over memory BIOs (no sockets).

For testing the OCSP callback the way a TLS stack we don't own would run it: the server's
``SSL.Connection`` is an ordinary object whose lifetime ends when it's garbage collected.
"""

from __future__ import annotations

from collections.abc import Callable

from OpenSSL import SSL

Staple = list[bytes]


def client_context(
    *, version: int | None = None, sigalgs: bytes | None = None, request_status: bool = True
) -> tuple[SSL.Context, Staple]:
    """A client context that asks for a staple and records what it received (b"" for none)."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if version is not None:
        ctx.set_min_proto_version(version)
        ctx.set_max_proto_version(version)
    if sigalgs is not None:
        # pyOpenSSL has no wrapper for this; its binding has the OpenSSL function.
        from OpenSSL._util import lib

        assert lib.SSL_CTX_set1_sigalgs_list(ctx._context, sigalgs) == 1
    seen: Staple = []

    def on_status(conn: SSL.Connection, data: bytes, _: object) -> bool:
        seen.append(data)
        return True

    if request_status:
        ctx.set_ocsp_client_callback(on_status)
    return ctx, seen


def handshake(
    server_ctx: SSL.Context,
    client_ctx: SSL.Context,
    *,
    servername: bytes | None = None,
    request_status: bool = True,
    on_server: Callable[[SSL.Connection], None] | None = None,
) -> SSL.Connection:
    """Run a full handshake; returns the server connection (the caller decides its lifetime).
    Raises whatever either side raised (``SSL.Error``) if the handshake fails."""
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    if servername is not None:
        client.set_tlsext_host_name(servername)
    if request_status:
        client.request_ocsp()
    if on_server is not None:
        on_server(server)
    done = [False, False]
    for _ in range(20):
        for i, (a, b) in enumerate(((client, server), (server, client))):
            if not done[i]:
                try:
                    a.do_handshake()
                    done[i] = True
                except SSL.WantReadError:
                    pass
            try:
                data = a.bio_read(65536)
            except SSL.WantReadError:
                continue
            b.bio_write(data)
        if all(done):
            return server
    raise AssertionError("handshake did not complete")
