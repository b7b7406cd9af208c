"""A fleet sharing responses through Redis: what the CA's responder sees per refresh cycle.

N servers (N handles, each with its own store and connections, as separate processes would
have) serve the same certificate. Without a shared store each fetches for itself; with a
:class:`~staple.redis_store.RedisStore` on one local ``redis-server`` one fetches per cycle and
the others adopt its response. A fake clock drives the cycles with jitter 0, so every server is
due at the same instant: the worst case for the fleet's single-flight lock.

Reported per N: responder requests at cold start (all servers started together) and per
refresh cycle, with and without the shared store, and the real time from a cycle's start until
every server staples the new response. ``python -m bench.fleet [--quick]``.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import staple
from staple import RefreshPolicy
from staple.redis_store import RedisStore
from staple.store import MemoryStore, Store
from staple.testing import FakeClock, OcspResponder, TestPKI

POLICY = RefreshPolicy(jitter=0.0, wait_timeout=10.0, fetch_timeout=5.0)
SERVERS = (1, 3, 10)
WAIT = 20.0  # real seconds a cycle may take before the run is declared broken
LOOK_AGAIN = 10.0  # a server denied the lock looks at the store again this much later


class _Fleet:
    def __init__(self) -> None:
        self.handles: list[staple.ServerOcspResponse] = []
        self.changed = asyncio.Event()
        self.late = 0  # waits that ended with a server adopting only on its 10 s second look

    def on_update(self, event: staple.Event) -> None:
        self.changed.set()

    def converged(self, before: set[Any]) -> bool:
        return all(h.response is not None and h.response.der not in before for h in self.handles)

    async def wait_converged(self, clock: FakeClock, before: set[Any]) -> None:
        """Until every server holds a response it didn't hold before. A server that was denied
        the lock and missed the notice adopts on its second look: move the clock there."""
        async with asyncio.timeout(WAIT):
            while not self.converged(before):
                self.changed.clear()
                try:
                    async with asyncio.timeout(1.0):
                        await self.changed.wait()
                except TimeoutError:
                    await clock.wait_for_sleepers(len(self.handles))
                    if not self.converged(before):
                        self.late += 1
                        clock.advance(LOOK_AGAIN)
            await clock.wait_for_sleepers(len(self.handles))


async def run_fleet(
    servers: int, cycles: int, redis_url: str | None, prefix: str
) -> dict[str, Any]:
    clock = FakeClock()
    pki = TestPKI(now=clock.now())
    fleet = _Fleet()
    stores: list[Store] = [
        RedisStore(redis_url, prefix=prefix) if redis_url else MemoryStore() for _ in range(servers)
    ]
    async with OcspResponder(pki, clock=clock) as responder:
        leaf = pki.issue_leaf("fleet.bench", ocsp_url=responder.url)
        try:
            fleet.handles += await asyncio.gather(
                *(
                    staple.open_server_ocsp_response(
                        leaf.chain, store=s, clock=clock, policy=POLICY, on_update=fleet.on_update
                    )
                    for s in stores
                )
            )
            await fleet.wait_converged(clock, set())
            cold = responder.requests
            per_cycle: list[int] = []
            seconds: list[float] = []
            for _ in range(cycles):
                before = {h.response.der for h in fleet.handles if h.response}
                start = responder.requests
                due = min(h.next_refresh.timestamp() for h in fleet.handles if h.next_refresh)
                t0 = time.perf_counter()
                clock.set(due + 1e-6)
                await fleet.wait_converged(clock, before)
                seconds.append(time.perf_counter() - t0)
                per_cycle.append(responder.requests - start)
            distinct = len({h.response.der for h in fleet.handles if h.response})
        finally:
            await asyncio.gather(*(h.close() for h in fleet.handles))
            await asyncio.gather(*(s.close() for s in stores))
    return {
        "cold": cold,
        "per_cycle": statistics.mean(per_cycle),
        "max_per_cycle": max(per_cycle),
        "cycle_ms": 1000 * statistics.median(seconds),
        "distinct": distinct,
        "late": fleet.late,
    }


async def measure(quick: bool) -> dict[str, Any]:
    from tests.redis_server import RedisServer, redis_server_missing

    missing = redis_server_missing()
    if missing is not None:
        return {"fleet": f"skipped: {missing}"}
    cycles = 3 if quick else 10
    results: dict[str, Any] = {"fleet: refresh cycles per run (jitter 0)": cycles}
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as redis:
        for n in SERVERS:
            own = await run_fleet(n, cycles, None, "")
            shared = await run_fleet(n, cycles, redis.url, f"bench{n}:")
            label = f"fleet of {n}"
            results[f"{label}: responder requests at cold start, own stores"] = own["cold"]
            results[f"{label}: responder requests at cold start, shared Redis"] = shared["cold"]
            results[f"{label}: responder requests per cycle, own stores"] = own["per_cycle"]
            results[f"{label}: responder requests per cycle, shared Redis"] = shared["per_cycle"]
            results[f"{label}: most requests in one cycle, shared Redis"] = shared["max_per_cycle"]
            results[f"{label}: cycle until all stapling, own stores, ms"] = own["cycle_ms"]
            results[f"{label}: cycle until all stapling, shared Redis, ms"] = shared["cycle_ms"]
            results[f"{label}: distinct responses stapled at the end, shared Redis"] = shared[
                "distinct"
            ]
            results[f"{label}: cycles where a server missed the notice (10 s look)"] = shared[
                "late"
            ]
    return results


def run(quick: bool) -> dict[str, Any]:
    return asyncio.run(measure(quick))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.fleet")
    parser.add_argument("--quick", action="store_true", help="fewer cycles (a smoke run)")
    args = parser.parse_args()
    out = run(args.quick)
    width = max(len(k) for k in out)
    for key, value in out.items():
        shown = f"{value:,.1f}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
