"""The fallback load generator (``hsclient.c``'s command line and output, on pyOpenSSL).

``python -m bench._pyclient hs|get|put HOST PORT PATH [...] [-tls1_2|-tls1_3] [-status]
[-sni NAME]``. Used only when the C client cannot be built; it costs more CPU per handshake,
so check the servers' busy fraction in the JSON before trusting rates measured with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL

_staples: list[int] = []  # length of the staple seen by each handshake (0: none)


class _Opts:
    def __init__(self, argv: list[str]) -> None:
        self.version = 0
        self.status = False
        self.sni: str | None = None
        self.positional: list[str] = []
        it = iter(argv)
        for arg in it:
            if arg == "-tls1_2":
                self.version = SSL.TLS1_2_VERSION
            elif arg == "-tls1_3":
                self.version = SSL.TLS1_3_VERSION
            elif arg == "-status":
                self.status = True
            elif arg == "-sni":
                self.sni = next(it)
            else:
                self.positional.append(arg)


def _context(o: _Opts) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_verify(SSL.VERIFY_NONE, lambda *args: True)
    # One classical group (P-256), never the ML-KEM hybrid that the stdlib's OpenSSL lacks.
    ctx.set_tmp_ecdh(ec.SECP256R1())
    if o.version:
        ctx.set_min_proto_version(o.version)
        ctx.set_max_proto_version(o.version)
    if o.status:

        def seen(conn: SSL.Connection, data: bytes, _: object) -> bool:
            _staples.append(len(data))
            return True

        ctx.set_ocsp_client_callback(seen)
    return ctx


def _connect(ctx: SSL.Context, o: _Opts, host: str, port: int) -> SSL.Connection:
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = SSL.Connection(ctx, sock)
    if o.sni:
        conn.set_tlsext_host_name(o.sni.encode())
    if o.status:
        conn.request_ocsp()
    conn.set_connect_state()
    conn.do_handshake()
    return conn


def _read_all(conn: SSL.Connection) -> tuple[int, bool]:
    total, first = 0, b""
    while True:
        try:
            data = conn.recv(256 * 1024)
        except (SSL.ZeroReturnError, SSL.SysCallError):
            break
        if not data:
            break
        if not first:
            first = data[:12]
        total += len(data)
    return total, first == b"HTTP/1.1 200"


def _finish(conn: SSL.Connection) -> None:
    with contextlib.suppress(SSL.Error):
        conn.shutdown()
    conn.close()


def _request(o: _Opts, path: str, host: str) -> bytes:
    name = o.sni or host
    return f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode()


def _hs(o: _Opts, host: str, port: int, path: str, seconds: float, procs: int) -> dict[str, Any]:
    start = time.monotonic()
    pipes = []
    for _ in range(procs):
        r, w = os.pipe()
        if os.fork() == 0:
            os.close(r)
            ctx = _context(o)
            t: dict[str, Any] = {"ok": 0, "stapled": 0, "errors": 0, "staple_len": 0}
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                try:
                    conn = _connect(ctx, o, host, port)
                    conn.sendall(_request(o, path, host))
                    _, ok = _read_all(conn)
                    _finish(conn)
                except (OSError, SSL.Error):
                    t["errors"] += 1
                    continue
                t["ok" if ok else "errors"] += 1
                if ok and _staples and _staples[-1]:
                    t["stapled"] += 1
                    t["staple_len"] = _staples[-1]
                _staples.clear()
            t["elapsed"] = time.monotonic() - t0
            os.write(w, json.dumps(t).encode())
            os._exit(0)
        os.close(w)
        pipes.append(r)
    total: dict[str, Any] = {"ok": 0, "stapled": 0, "errors": 0, "staple_len": 0, "elapsed": 0.0}
    for r in pipes:
        with os.fdopen(r) as f:
            t = json.loads(f.read())
        for key in ("ok", "stapled", "errors"):
            total[key] += t[key]
        total["elapsed"] = max(total["elapsed"], t["elapsed"])
    for _ in pipes:
        os.wait()
    total.update(wall=time.monotonic() - start, cipher="", version="")
    return total


def main(argv: list[str]) -> int:
    o = _Opts(argv)
    mode, host, port_s, path, *rest = o.positional
    port = int(port_s)
    if mode == "hs":
        print(json.dumps(_hs(o, host, port, path, float(rest[0]), int(rest[1]))))
        return 0
    conn = _connect(_context(o), o, host, port)
    t0 = time.monotonic()
    if mode == "get":
        conn.sendall(_request(o, path, host))
    else:
        nbytes = int(rest[0])
        name = o.sni or host
        conn.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n"
            f"Content-Length: {nbytes}\r\n\r\n".encode()
        )
        chunk = b"x" * 65536
        left = nbytes
        while left > 0:
            part = chunk if left >= len(chunk) else chunk[:left]
            conn.sendall(part)
            left -= len(part)
    received, ok = _read_all(conn)
    cipher = conn.get_cipher_name() or ""
    _finish(conn)
    nbytes = received if mode == "get" else int(rest[0])
    elapsed = time.monotonic() - t0
    staple = _staples[-1] if _staples else 0
    print(
        json.dumps(
            {
                "bytes": nbytes,
                "http_ok": int(ok),
                "elapsed": elapsed,
                "cipher": cipher,
                "staple_len": staple,
            }
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
