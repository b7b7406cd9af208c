"""The refresher at scale: many handles against one local responder.

Cold start to all-stapled, responses verified per second, and memory per tracked chain
(tracemalloc: Python-side allocations, which include the DER and the parsed certificates'
wrappers but not OpenSSL's own heap).
"""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from typing import Any

from staple import Stapler
from staple.testing import OcspResponder, TestPKI


async def measure(count: int) -> dict[str, Any]:
    pki = TestPKI()
    async with OcspResponder(pki) as responder:
        leaves = [pki.issue_leaf(f"h{i}.test", ocsp_url=responder.url) for i in range(count)]
        # Pre-sign: the responder shares our process and CPU, so time only our side.
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        async with Stapler(jitter=0.1) as stapler:
            await asyncio.gather(*(stapler.add(leaf.chain, wait=True) for leaf in leaves))
            elapsed = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
            stapled = sum(1 for h in stapler.handles if h.get_context() is not None)
            gc.collect()
            after = tracemalloc.take_snapshot()
            grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
            tracemalloc.stop()
            for h in stapler.handles:
                ctx = h.get_context()
                if ctx is not None:
                    ctx.free()
                    ctx.free()
    return {
        f"{count} chains: cold start to all stapled, s": elapsed,
        f"{count} chains: stapled": stapled,
        "fetch + verify + install per second (responder in-process)": count / elapsed,
        "process CPU per chain (incl. responder signing), ms": 1000 * cpu / count,
        "Python memory per tracked chain, KiB": grown / count / 1024,
    }


def run(quick: bool) -> dict[str, Any]:
    return asyncio.run(measure(1000 if quick else 10_000))
