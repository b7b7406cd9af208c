"""Server processes and their CPU time, read from outside.

``cpu_seconds(pid)`` reads another process's CPU clock (Linux: the process CPU-time clock id
``((~pid) << 3) | 2``, nanosecond resolution, all threads), falling back to ``/proc/PID/stat``
(10 ms ticks). The server never measures itself, so the measurement costs it nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parent.parent
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_clock(pid: int) -> int:
    return ((~pid) << 3) | 2  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) used so far by process ``pid``."""
    try:
        return time.clock_gettime(_cpu_clock(pid))
    except OSError:
        pass
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (e.g. nginx's workers)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(x) for x in f.read().split())
    return found


class ChildProcess:
    """``python -m MODULE ARGS...`` that prints one JSON line once ready and runs until its
    stdin closes, then prints a last JSON line (its statistics). ``async with`` runs it."""

    def __init__(self, module: str, *args: str) -> None:
        self.module = module
        self.args = args
        self.process: asyncio.subprocess.Process | None = None
        self.ready: dict[str, Any] = {}
        self.stats: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def port(self) -> int:
        port: int = self.ready["port"]
        return port

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    async def __aenter__(self) -> Self:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            self.module,
            *self.args,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), 60)
            self.ready = json.loads(line)
        except (TimeoutError, ValueError) as exc:
            self.process.kill()
            await self.process.wait()
            raise RuntimeError(f"{self.module} did not start: {self.args}") from exc
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        process = self.process
        if process is None:
            return
        assert process.stdin is not None
        assert process.stdout is not None
        process.stdin.close()
        try:
            out = await asyncio.wait_for(process.stdout.read(), 30)
            self.stats = json.loads(out.decode().strip().splitlines()[-1] or "{}")
        except (TimeoutError, ValueError, IndexError):
            process.kill()
        await process.wait()


class ServerProcess(ChildProcess):
    """A benchmark server (``bench._server``) for one configuration."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__("bench._server", json.dumps(config))
        self.config = config


@contextlib.asynccontextmanager
async def servers(*configs: dict[str, Any]) -> AsyncIterator[list[ServerProcess]]:
    """Start several server processes (one after the other), stop them all on exit."""
    async with contextlib.AsyncExitStack() as stack:
        started = [await stack.enter_async_context(ServerProcess(c)) for c in configs]
        yield started
