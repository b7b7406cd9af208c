"""5. The refresher at scale: 10,000 certificate chains against a responder in another process.

The parent issues N leaves from one TestPKI and pre-signs a response for each with the CA's
key (``OcspResponder.response_for``); ``bench._responder`` serves those bytes from another
process, so the process measured only fetches, verifies and installs. Each measurement runs in
a fresh process (``python -m bench.scale MODE CONFIG``), so nothing else sits in its heap:

- ``real``: a :class:`~staple.Stapler` adds the N chains (PEM, as read from files) at once
  with ``wait=True`` and production settings. Cold start to all stapled (wall), process CPU
  per chain, verified responses per second (wall, and per CPU second: one core), RSS growth per
  chain (everything: Python objects, parsed certificates, the DER, tasks, timers), then the
  CPU used while idle for a while, the timers pending and when they fire.
- ``steps``: the same, then every sleeping handle is woken with nothing due, several times
  over (as the real clock's jump watchdog does after a wall-clock jump), to measure what one
  wake-up of one sleeping handle costs; with the pending refreshes and the watchdog's checks
  (one per loop every ``staple.clock._MAX_STEP``, 300 s) that gives the idle CPU of a whole
  simulated day.
- ``tracemalloc``: the Python-allocated part of the memory per chain.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import logging
import os
import resource
import sys
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import _proc
from ._harness import Bench, Section
from ._stats import Row

RATE_TARGET = 1000.0
MEMORY_TARGET_KIB = 16.0
DAY = 86400.0


# -- the measured process ------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _measure(mode: str, config: dict[str, Any], chains: list[bytes]) -> dict[str, Any]:
    from staple import Event, EventKind, Stapler

    count = len(chains)
    url = config["url"]
    loop = asyncio.get_running_loop()
    warnings = _Counter()
    logger = logging.getLogger("staple")
    logger.addHandler(warnings)
    logger.propagate = False
    gc.collect()
    if mode == "tracemalloc":
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
    rss0 = _trimmed_rss()
    t0, cpu0 = time.perf_counter(), time.process_time()
    installed = 0
    all_stapled = asyncio.Event()

    def on_update(event: Event) -> None:
        nonlocal installed
        if event.kind in (EventKind.FETCHED, EventKind.LOADED):
            installed += 1
            if installed >= count:
                all_stapled.set()

    stapler = Stapler(on_update=on_update)
    try:
        await asyncio.gather(*(stapler.add(c, responder_urls=[url], wait=True) for c in chains))
        added = time.perf_counter() - t0
        # add(wait=True) gives up waiting after wait_timeout (15 s): wait for the stragglers.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_stapled.wait(), 120)
        stapled = _stapled(stapler)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        gc.collect()
        out: dict[str, Any] = {
            "count": count,
            "stapled": stapled,
            "add_seconds": added,
            "gave_up_waiting": warnings.gave_up,
        }
        if mode == "tracemalloc":
            after = tracemalloc.take_snapshot()
            grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
            tracemalloc.stop()
            out["python_bytes_per_chain"] = grown / count
            return out
        out.update(
            seconds=elapsed,
            cpu_seconds=cpu,
            rss_bytes_per_chain=(_rss() - rss0) / count,
            trimmed_rss_bytes_per_chain=(_trimmed_rss() - rss0) / count,
            max_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        )
        # Idle: nothing due for hours; the loop should only sleep.
        idle = config["idle"]
        scheduled = getattr(loop, "_scheduled", None)
        now_loop = loop.time()
        if scheduled is not None:
            whens = sorted(h.when() - now_loop for h in scheduled if not h.cancelled())
            out["timers"] = len(whens)
            if whens:
                out["timers_due_within_s"] = {
                    "first": whens[0],
                    "last": whens[-1],
                    "max_in_any_second": _max_in_window(whens, 1.0),
                }
        now = time.time()
        refresh = sorted(
            h.next_refresh.timestamp() - now for h in stapler.handles if h.next_refresh
        )
        if refresh:
            out["refresh_in_hours"] = {"first": refresh[0] / 3600, "last": refresh[-1] / 3600}
            out["refreshes_max_per_minute"] = _max_in_window(refresh, 60.0)
            out["refresh_interval_h"] = _refresh_interval(stapler) / 3600
        cpu_idle0 = time.process_time()
        await asyncio.sleep(idle)
        out["idle_seconds"] = idle
        out["idle_cpu_seconds"] = time.process_time() - cpu_idle0
        if mode == "steps":
            out.update(await _wake_all(config["rounds"]))
        return out
    finally:
        await stapler.close()


async def _wake_all(rounds: int) -> dict[str, Any]:
    """Wake every sleeper ``rounds`` times with nothing due; CPU per wake-up."""
    import staple.clock

    woken = 0
    cpu = 0.0
    for _ in range(rounds):
        sleepers = [f for w in staple.clock._watchdogs.values() for f in w._sleepers]
        cpu0 = time.process_time()
        for woken_future in sleepers:
            staple.clock._wake(woken_future)
        for _ in range(3):  # each sleeper re-reads the time and re-arms its timer
            await asyncio.sleep(0)
        cpu += time.process_time() - cpu0
        woken += len(sleepers)
    return {"woken": woken, "wake_cpu_seconds": cpu}


def _trimmed_rss() -> int:
    """RSS once glibc has handed back the free memory it keeps (``malloc_trim``)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _rss()


def _stapled(stapler: Any) -> int:
    stapled = 0
    for h in stapler.handles:
        ctx = h.get_context()
        if ctx is not None:
            stapled += 1
            ctx.free()
    return stapled


class _Counter(logging.Handler):
    """Counts the handles that stopped waiting for a first response (and silences the log)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.gave_up = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "no response within" in str(record.msg):
            self.gave_up += 1


def _max_in_window(times: list[float], width: float) -> int:
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] > width:
            start += 1
        best = max(best, end - start + 1)
    return best


def _refresh_interval(stapler: Any) -> float:
    """Median time from a response's thisUpdate to its scheduled refresh: the refresh period."""
    gaps = []
    for h in stapler.handles:
        if h.next_refresh is not None and h.response is not None:
            gaps.append((h.next_refresh - h.response.this_update).total_seconds())
    return sorted(gaps)[len(gaps) // 2] if gaps else float("nan")


# -- the section -----------------------------------------------------------------------------


def _prepare(directory: Path, count: int) -> tuple[Path, Path]:
    """Issue ``count`` leaves and pre-sign their responses; write both to files."""
    from staple.testing import OcspResponder, TestPKI

    pki = TestPKI()
    signer = OcspResponder(pki)
    chains, responses = [], {}
    for i in range(count):
        leaf = pki.issue_leaf(f"h{i}.bench.test", ocsp_url="http://127.0.0.1:9/ocsp")
        chains.append(leaf.chain_pem.decode())
        responses[f"{leaf.cert.serial_number:x}"] = base64.b64encode(
            signer.response_for(leaf)
        ).decode()
    directory.mkdir(parents=True, exist_ok=True)
    chains_path, responses_path = directory / "chains.json", directory / "responses.json"
    chains_path.write_text(json.dumps(chains))
    responses_path.write_text(json.dumps(responses))
    return chains_path, responses_path


async def _child(mode: str, config: dict[str, Any]) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.scale",
        mode,
        json.dumps(config),
        cwd=_proc.ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"bench.scale {mode} failed (exit {process.returncode})")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def run(bench: Bench) -> Section:
    section = Section()
    count = 1000 if bench.quick else 10_000
    idle = 3.0 if bench.quick else 60.0
    t0 = time.perf_counter()
    chains, responses = await asyncio.to_thread(_prepare, bench.workdir / "scale", count)
    section.raw["prepare_seconds"] = time.perf_counter() - t0
    async with _proc.ChildProcess("bench._responder", str(responses)) as responder:
        url = f"http://127.0.0.1:{responder.port}/ocsp"
        config = {"chains": str(chains), "url": url, "idle": idle, "rounds": 5}
        cpu0 = responder.cpu()
        real = await _child("real", config)
        responder_cpu = responder.cpu() - cpu0
        steps = await _child("steps", {**config, "idle": 0})
        traced = await _child("tracemalloc", {**config, "idle": 0})
    section.raw.update(real=real, steps=steps, tracemalloc=traced, responder=responder.stats)
    section.raw["responder_cpu_seconds"] = responder_cpu

    wall_rate = real["count"] / real["seconds"]
    cpu_rate = real["count"] / real["cpu_seconds"]
    section.rows += [
        Row(
            "scale",
            f"{count:,} chains: cold start to all stapled",
            f"{real['seconds']:.1f} s  [{real['stapled']:,} stapled]",
            "",
            real["stapled"] == count,
        ),
        Row(
            "scale",
            "responses fetched + verified + installed per second (wall)",
            f"{wall_rate:,.0f}/s",
        ),
        Row(
            "scale",
            "  handles whose add(wait=True) gave up after 15 s (stapled later)",
            f"{real['gave_up_waiting']:,} of {count:,}",
        ),
        Row(
            "scale",
            "  the same per CPU second of the staple process (one core)",
            f"{cpu_rate:,.0f}/s  [{1e3 * real['cpu_seconds'] / count:.2f} ms CPU per chain]",
            f"≥ {RATE_TARGET:,.0f}/s",
            cpu_rate >= RATE_TARGET,
        ),
    ]
    kib = real["rss_bytes_per_chain"] / 1024
    section.rows += [
        Row(
            "scale",
            "memory per tracked chain incl. its response (RSS growth ÷ N)",
            f"{kib:.1f} KiB",
            f"≤ {MEMORY_TARGET_KIB:g} KiB",
            kib <= MEMORY_TARGET_KIB,
        ),
        Row(
            "scale",
            "  of which Python-allocated (tracemalloc)",
            f"{traced['python_bytes_per_chain'] / 1024:.1f} KiB",
        ),
    ]
    idle_ms_per_min = real["idle_cpu_seconds"] / real["idle_seconds"] * 60_000
    section.rows.append(
        Row(
            "scale",
            f"idle CPU, {count:,} handles, measured over {idle:g} s",
            f"{idle_ms_per_min:.1f} ms per minute  [{real.get('timers', '?')} timers pending]",
        )
    )
    wakeups = steps["woken"]
    per_wakeup_us = steps["wake_cpu_seconds"] / max(wakeups, 1) * 1e6
    interval_h = real.get("refresh_interval_h", 12.0)
    watchdog_checks_per_day = DAY / 300.0  # one per loop, not per handle
    refresh_wakeups_per_day = count * 24 / interval_h
    day_cpu = (watchdog_checks_per_day + refresh_wakeups_per_day) * per_wakeup_us / 1e6
    due = real.get("timers_due_within_s", {})
    section.rows += [
        Row(
            "scale",
            "cost of one sleeping handle waking up (no work due)",
            f"{per_wakeup_us:.1f} µs  "
            f"[{steps['wake_cpu_seconds'] * 1e3:.0f} ms for {wakeups:,.0f} wake-ups]",
        ),
        Row(
            "scale",
            "simulated day: wake-ups (refresh timers + one clock watchdog every 300 s)",
            f"{watchdog_checks_per_day + refresh_wakeups_per_day:,.0f}  → "
            f"{day_cpu:.2f} s CPU/day ({day_cpu / DAY:.4%} of a core), refresh work excluded",
        ),
        Row(
            "scale",
            "refreshes spread by jitter: busiest minute",
            f"{real.get('refreshes_max_per_minute', '?')} of {count:,}  [due "
            f"{real.get('refresh_in_hours', {}).get('first', 0):.1f}–"
            f"{real.get('refresh_in_hours', {}).get('last', 0):.1f} h from now]",
        ),
        Row(
            "scale",
            "pending timers: busiest second (one per handle: its refresh, spread by jitter)",
            f"{due.get('max_in_any_second', '?')} of {real.get('timers', '?')}  "
            f"[pending timers fire {due.get('first', 0):.0f}–{due.get('last', 0):.0f} s from now]",
        ),
    ]
    section.notes.append(
        f"responder in another process: {section.raw['responder'].get('requests', '?')} requests, "
        f"{responder_cpu:.1f} s CPU; leaves + responses prepared in "
        f"{section.raw['prepare_seconds']:.1f} s (not measured)"
    )
    section.raw["when"] = datetime.now(UTC).isoformat()
    return section


def main() -> None:
    mode, config = sys.argv[1], json.loads(sys.argv[2])
    with open(config["chains"]) as f:
        chains = [pem.encode() for pem in json.load(f)]
    result = asyncio.run(_measure(mode, config, chains))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
