"""2. What stapling costs a handshake, and where that cost is.

A. Real handshakes (server process, C client asking for a staple): the staple server with
   stapling off (no OCSP callback) and stapling each response kind of ``bench._pki`` —
   ``small`` (issuer-signed, nothing embedded), ``redundant`` (the same plus the issuer's
   certificate, which clients already have), ``large`` (delegated responder certificate
   embedded). Server CPU per handshake, as ratios to "off". The server staples through a
   Stapler, so ``redundant`` goes out trimmed (``staple.trim``: the issuer's certificate
   dropped) — the row shows both sizes, and its cost should now be ``small``'s.
B. The same inside one process, on memory BIOs, timing only the server's calls (handshake and
   the SSL_free that ends the connection), variants interleaved handshake by handshake:
   the pyOpenSSL callback returning ``b""`` (cost of calling into Python at all), then each
   response returned as constant bytes (cost of handing OpenSSL a response: pyOpenSSL's
   malloc + copy, then OpenSSL's work). That split isolates OpenSSL's part from Python's.
C. The Python side alone: ``Stapler._callback(conn, None)`` in a loop on a real connection of
   staple's transport (certificate set, ``call_when_closed`` registering the free).

Where OpenSSL spends it (OpenSSL 4.0.3 as bundled by cryptography 50; disassembly and
callgrind, see bench/README.md): pyOpenSSL hands the callback's bytes to
``SSL_set_tlsext_status_ocsp_resp`` → ``ssl3_ctrl``, which parses the outer OCSPResponse
(``d2i_OCSP_RESPONSE``; invalid bytes are dropped silently). At send time
(``tls_construct_stoc_status_request`` in TLS 1.3, ``tls_construct_cert_status`` in TLS 1.2)
``ossl_get_ocsp_response`` decodes the whole BasicOCSPResponse again
(``OCSP_response_get1_basic``: names, SingleResponses, every embedded certificate) to find the
SingleResponse of the certificate being sent, then frees it; ``i2d_OCSP_RESPONSE`` re-encodes
the response into the message; ``SSL_free`` frees the parsed tree. The send-time decode is most
of the cost, and an embedded certificate makes it several times dearer.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from OpenSSL import SSL

from staple import ocsp
from staple.trim import stapled_der

from . import _server, core
from ._harness import KEY_NAMES, Bench, HandshakeRun, Section, alternate, handshake_run
from ._pki import Material
from ._proc import servers
from ._stats import Ratio, Row, median

VARIANTS = ("off", "small", "redundant", "large")
PYTHON_TARGET_US = 5.0


async def run(bench: Bench) -> Section:
    section = Section()
    await _real_handshakes(bench, section)
    _breakdown(bench, section)
    await _python_side(bench, section)
    return section


# -- A. real handshakes -------------------------------------------------------------------


async def _real_handshakes(bench: Bench, section: Section) -> None:
    rounds, seconds = (2, 0.4) if bench.quick else (6, 1.5)
    for key_type, tls_versions in (("ec", ("1.3", "1.2")), ("rsa", ("1.3",))):
        m = bench.material(key_type)
        base = {"chain": str(m.chain), "key": str(m.key), "kind": "staple"}
        configs = [
            {**base, "staple": None if v == "off" else str(m.response_path(v))} for v in VARIANTS
        ]
        async with servers(*configs) as started:
            by_name = dict(zip(VARIANTS, started, strict=True))
            for tls_version in tls_versions:
                for server in started:
                    await handshake_run(server, seconds=0.3, procs=3, tls=tls_version)

                async def one(
                    name: str, tls_version: str = tls_version, by_name: dict[str, Any] = by_name
                ) -> HandshakeRun:
                    return await handshake_run(
                        by_name[name], seconds=seconds, procs=3, tls=tls_version
                    )

                results = await alternate(VARIANTS, one, rounds)
                label = f"{KEY_NAMES[key_type]}, TLS {tls_version}"
                off = results["off"]
                for name in VARIANTS[1:]:
                    runs = results[name]
                    ratio = Ratio.of([r.cpu_us for r in runs], [r.cpu_us for r in off])
                    extra = median([r.cpu_us for r in runs]) - median([r.cpu_us for r in off])
                    size = len(m.responses[name])
                    sent = _stapled_size(m, name)
                    sizes = f"{size} B" if sent == size else f"{size} B fetched, {sent} B stapled"
                    stapled = sum(r.stapled for r in runs) == sum(r.ok for r in runs)
                    section.rows.append(
                        Row(
                            "stapling",
                            f"server CPU/handshake {name} ({sizes}) ÷ off — {label}",
                            f"{ratio}  [{extra:+,.0f} µs]{'' if stapled else ' NOT STAPLED'}",
                            "",
                            None,
                            {
                                "ratio": ratio.__dict__,
                                "extra_us": extra,
                                "bytes": size,
                                "stapled_bytes": sent,
                            },
                        )
                    )
                section.raw[f"real handshakes, {label}"] = {
                    name: [r.as_json() for r in runs] for name, runs in results.items()
                }


def _stapled_size(m: Material, name: str) -> int:
    """How many bytes of response ``name`` a Stapler hands OpenSSL (after ``staple.trim``)."""
    verified = ocsp.validate(m.responses[name], m.leaf.cert, m.leaf.chain[1], now=datetime.now(UTC))
    return len(stapled_der(verified))


# -- B. in-process breakdown ----------------------------------------------------------------


def _context(m: Material, callback: Callable[[SSL.Connection, Any], bytes] | None) -> SSL.Context:
    ctx = _server.plain_context(str(m.chain), str(m.key))
    if callback is not None:
        ctx.set_ocsp_server_callback(callback)
    return ctx


def _drain(conn: SSL.Connection) -> bytes:
    try:
        return conn.bio_read(65536)
    except SSL.WantReadError:
        return b""


def _step(conn: SSL.Connection) -> bool:
    try:
        conn.do_handshake()
        return True
    except SSL.WantReadError:
        return False


def _one_handshake(server_ctx: SSL.Context, client_ctx: SSL.Context) -> int:
    """Run one full handshake on memory BIOs; return the server side's nanoseconds."""
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    client.request_ocsp()
    t0 = time.perf_counter_ns()
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    ns = time.perf_counter_ns() - t0
    client_done = _step(client)
    server_done = False
    for _ in range(8):
        out = _drain(client)
        if out:
            t0 = time.perf_counter_ns()
            server.bio_write(out)
            server_done = server_done or _step(server)
            back = _drain(server)
            ns += time.perf_counter_ns() - t0
            if back:
                client.bio_write(back)
        client_done = client_done or _step(client)
        if client_done and server_done:
            break
    if not (client_done and server_done):
        raise RuntimeError("in-process handshake did not complete")
    t0 = time.perf_counter_ns()
    del server  # SSL_free: frees the parsed OCSP_RESPONSE too
    return ns + time.perf_counter_ns() - t0


def _breakdown(bench: Bench, section: Section) -> None:
    m = bench.material("ec")
    count = 200 if bench.quick else 3000

    def constant(der: bytes) -> Callable[[SSL.Connection, Any], bytes]:
        return lambda conn, data: der

    variants: dict[str, SSL.Context] = {
        "no callback": _context(m, None),
        "callback returns b''": _context(m, constant(b"")),
        **{
            f"{name} ({len(der)} B)": _context(m, constant(der))
            for name, der in m.responses.items()
        },
    }
    for tls_version, version in (("1.3", SSL.TLS1_3_VERSION), ("1.2", SSL.TLS1_2_VERSION)):
        client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        client_ctx.set_min_proto_version(version)
        client_ctx.set_max_proto_version(version)
        client_ctx.set_ocsp_client_callback(lambda conn, der, data: True)
        samples: dict[str, list[int]] = {name: [] for name in variants}
        for ctx in variants.values():  # warm up
            for _ in range(20):
                _one_handshake(ctx, client_ctx)
        for i in range(count):
            names = list(variants) if i % 2 == 0 else list(reversed(variants))
            for name in names:
                samples[name].append(_one_handshake(variants[name], client_ctx))
        med = {name: statistics.median(v) / 1000 for name, v in samples.items()}
        base = med["no callback"]
        empty = med["callback returns b''"]
        section.rows.append(
            Row(
                "stapling",
                f"in-process server handshake, no callback — ECDSA P-256, TLS {tls_version}",
                f"{base:,.1f} µs",
                data={"us": base},
            )
        )
        section.rows.append(
            Row(
                "stapling",
                f"  + pyOpenSSL calling a Python callback (returns b'') — TLS {tls_version}",
                f"{empty - base:+.1f} µs",
                data={"us": empty - base},
            )
        )
        for name in list(variants)[2:]:
            section.rows.append(
                Row(
                    "stapling",
                    f"  + handing OpenSSL the {name} response — TLS {tls_version}",
                    f"{med[name] - empty:+.1f} µs  ({(med[name] - empty) / base:+.1%})",
                    data={"us": med[name] - empty, "of_handshake": (med[name] - empty) / base},
                )
            )
        section.raw[f"in-process server µs (median), TLS {tls_version}"] = med
    redundant = next(n for n in variants if n.startswith("redundant"))
    small = next(n for n in variants if n.startswith("small"))
    section.notes.append(
        f"'{redundant}' minus '{small}' is what dropping the redundant certs field saves "
        "(signature untouched: certs lie outside tbsResponseData); staple.trim does it before "
        "stapling, see bench/README.md"
    )


# -- C. the Python side ----------------------------------------------------------------------


async def _python_side(bench: Bench, section: Section) -> None:
    m = bench.material("ec")
    us = await core.callback_ns(str(m.chain), str(m.key), m.responses["small"], bench.quick) / 1000
    section.rows.append(
        Row(
            "stapling",
            "Python side per handshake: Stapler._callback (lookup + get_context + ref)",
            f"{us:.2f} µs",
            f"≤ {PYTHON_TARGET_US:g} µs",
            us <= PYTHON_TARGET_US,
            {"us": us},
        )
    )
