"""Cost of the hot path (get_context + free) and of validating one response.

pyperf-style: many loops per sample, several samples, median reported, with a baseline
(an empty Python function call) measured in the same run, since these machines are noisy.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from staple import RefreshPolicy, ocsp, open_server_ocsp_response
from staple.testing import FakeClock, OcspResponder, TestPKI


def per_call_ns(fn: Callable[[], object], loops: int, samples: int) -> float:
    results = []
    for _ in range(samples):
        t0 = time.perf_counter_ns()
        for _ in range(loops):
            fn()
        results.append((time.perf_counter_ns() - t0) / loops)
    return statistics.median(results)


async def measure(quick: bool) -> dict[str, Any]:
    loops, samples = (50_000, 5) if quick else (500_000, 11)
    clock = FakeClock()
    pki = TestPKI(now=clock.now())
    results: dict[str, Any] = {}
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

            results["empty call (baseline), ns"] = per_call_ns(empty, loops, samples)
            gross = per_call_ns(get_free, loops, samples)
            results["get_context() + free(), ns"] = gross
            results["get_context() + free() net of the call, ns"] = (
                gross - results["empty call (baseline), ns"]
            )
            assert handle.live_references == 0
        finally:
            await handle.close()

        now = clock.now() + timedelta(seconds=1)
        for label, signer, key_type in (
            ("issuer-signed P-256", "issuer", "ec"),
            ("delegated P-256", "delegated", "ec"),
            ("issuer-signed RSA-2048", "issuer", "rsa"),
        ):
            p = TestPKI(now=clock.now(), key_type=key_type)  # type: ignore[arg-type]
            responder_for = OcspResponder(p, clock=clock, signer=signer)  # type: ignore[arg-type]
            lf = p.issue_leaf("v.test", key_type=key_type)  # type: ignore[arg-type]
            der = responder_for.response_for(lf)
            cert, issuer = lf.cert, p.intermediate.cert

            def one(der: bytes = der, cert: Any = cert, issuer: Any = issuer) -> None:
                ocsp.validate(der, cert, issuer, now=now)

            n = 300 if quick else 2000
            us = per_call_ns(one, n, 5) / 1000
            results[f"validate {label} ({len(der)} B), µs"] = us
            results[f"validate {label}, responses/s"] = 1e6 / us
    return results


def run(quick: bool) -> dict[str, Any]:
    return asyncio.run(measure(quick))
