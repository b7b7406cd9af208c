"""4. The getter and the callback: ``get_context()`` + ``free()``, ``Stapler._callback``,
``ocsp.validate``, in ns or µs per call.

timeit-style: many loops per sample, many samples, the *fastest* sample reported (on a shared
machine every other sample is the same work plus someone else's interference; the median is
in the JSON), with a baseline (an empty Python function call, what any call costs) measured in
the same run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from staple import RefreshPolicy, Stapler, ocsp, open_server_ocsp_response, tls
from staple.testing import FakeClock, OcspResponder, TestPKI

from . import _server
from ._harness import Bench, Section
from ._stats import Row

GET_FREE_TARGET_NS = 300.0
CALLBACK_TARGET_US = 5.0


def per_call_ns(fn: Callable[[], object], loops: int, samples: int) -> float:
    results = []
    for _ in range(samples):
        t0 = time.perf_counter_ns()
        for _ in range(loops):
            fn()
        results.append((time.perf_counter_ns() - t0) / loops)
    return min(results)


async def getter_ns(quick: bool) -> dict[str, float]:
    loops, samples = (50_000, 9) if quick else (200_000, 31)
    pki = TestPKI()
    async with OcspResponder(pki) as responder:
        leaf = pki.issue_leaf("bench.test", ocsp_url=responder.url)
        # The real clock: the getter's cost includes reading it.
        handle = await open_server_ocsp_response(leaf.chain, policy=RefreshPolicy(jitter=0))
        try:
            get = handle.get_context

            def get_free() -> None:
                get().free()  # type: ignore[union-attr]

            def empty() -> None:
                return None

            baseline = per_call_ns(empty, loops, samples)
            gross = per_call_ns(get_free, loops, samples)
            assert handle.live_references == 0
        finally:
            await handle.close()
    return {"empty": baseline, "gross": gross, "net": gross - baseline}


async def callback_ns(chain: str, key: str, der: bytes, quick: bool) -> float:
    """``Stapler._callback(conn, None)`` on a real connection of staple's transport (its
    certificate set, ``call_when_closed`` taking the free), ns per call."""
    stapler: Stapler = await _server.preloaded_stapler(chain, der)
    protocol = tls.TLSServerProtocol(asyncio.Protocol(), _server.plain_context(chain, key))
    conn = protocol._ssl
    try:
        callback = stapler._callback
        loops, samples = (10_000, 9) if quick else (20_000, 31)
        results = []
        for _ in range(samples):
            t0 = time.perf_counter_ns()
            for _ in range(loops):
                callback(conn, None)
            results.append((time.perf_counter_ns() - t0) / loops)
            # What a closing connection does: run the frees call_when_closed registered.
            protocol._release()
            protocol._released = False
            tls._live[id(conn)] = protocol
        if stapler.callback_errors or stapler.live_references or stapler.stapled == 0:
            raise RuntimeError("the callback did not staple cleanly")
        return min(results)
    finally:
        tls._live.pop(id(conn), None)
        await stapler.close()


def validate_us(quick: bool) -> dict[str, tuple[int, float, float]]:
    """µs per ``ocsp.validate``: a first check of a pair (verifies that the issuer signed the
    leaf, too), and as a handle re-validates each refresh (``issuer_checked=True``, its CertID
    and description passed in)."""
    clock = FakeClock()
    now = clock.now() + timedelta(seconds=1)
    out = {}
    for label, signer, key_type in (
        ("issuer-signed P-256", "issuer", "ec"),
        ("delegated P-256", "delegated", "ec"),
        ("issuer-signed RSA-2048", "issuer", "rsa"),
    ):
        p = TestPKI(now=clock.now(), key_type=key_type)  # type: ignore[arg-type]
        responder = OcspResponder(p, clock=clock, signer=signer)  # type: ignore[arg-type]
        lf = p.issue_leaf("v.test", key_type=key_type)  # type: ignore[arg-type]
        der = responder.response_for(lf)
        cert, issuer = lf.cert, p.intermediate.cert

        expected, subject = ocsp.cert_id(cert, issuer), ocsp.describe(cert)

        def first(der: bytes = der, cert: Any = cert, issuer: Any = issuer) -> None:
            ocsp.validate(der, cert, issuer, now=now)

        def again(
            der: bytes = der,
            cert: Any = cert,
            issuer: Any = issuer,
            expected: Any = expected,
            subject: str = subject,
        ) -> None:
            ocsp.validate(
                der, cert, issuer, now=now, expected=expected, subject=subject, issuer_checked=True
            )

        n, repeat = (100, 7) if quick else (200, 21)
        out[label] = (
            len(der),
            per_call_ns(first, n, repeat) / 1000,
            per_call_ns(again, n, repeat) / 1000,
        )
    return out


async def run(bench: Bench) -> Section:
    section = Section()
    g = await getter_ns(bench.quick)
    section.rows += [
        Row("getter", "empty Python call (baseline)", f"{g['empty']:.0f} ns", data=g),
        Row("getter", "get_context() + free(), as called", f"{g['gross']:.0f} ns"),
        Row(
            "getter",
            "get_context() + free(), net of the call",
            f"{g['net']:.0f} ns",
            f"≤ {GET_FREE_TARGET_NS:.0f} ns",
            g["net"] <= GET_FREE_TARGET_NS,
        ),
    ]
    m = bench.material("ec")
    ns = await callback_ns(str(m.chain), str(m.key), m.responses["small"], bench.quick)
    section.rows.append(
        Row(
            "getter",
            "whole OCSP callback: Stapler._callback (cert → handle, get_context, ref)",
            f"{ns:,.0f} ns",
            f"≤ {CALLBACK_TARGET_US:g} µs",
            ns / 1000 <= CALLBACK_TARGET_US,
            {"ns": ns},
        )
    )
    for label, (size, us, again_us) in validate_us(bench.quick).items():
        section.rows.append(
            Row(
                "getter",
                f"ocsp.validate, {label} ({size} B): first check / as a handle re-validates",
                f"{us:,.0f} / {again_us:,.0f} µs  [{1e6 / again_us:,.0f}/s on one core]",
                data={"us": us, "again_us": again_us, "bytes": size},
            )
        )
    section.raw["when"] = datetime.now(UTC).isoformat()
    return section
