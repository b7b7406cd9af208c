"""The clock, injected everywhere so days of refresh schedule run in milliseconds in tests.

The sans-I/O core never reads a clock; it takes ``now``. The shells (the handle's refresher)
ask a :class:`Clock` for the time and to sleep until a moment. :class:`SystemClock` is the real
one; ``staple.testing.FakeClock`` is the one tests advance by hand.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

__all__ = ["Clock", "SystemClock"]

# How often the real clock checks that wall time still runs with the loop's monotonic time.
# Wall time can jump (NTP, suspend, an operator); a jump delays a deadline by at most this.
_MAX_STEP = 300.0
_JUMP = 1.0  # seconds of disagreement between the two clocks that count as a jump


class Clock(Protocol):
    """Wall time in seconds since the epoch, and a way to sleep until a wall-time moment."""

    def time(self) -> float:
        """Seconds since the epoch (UTC), like :func:`time.time`."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Return once :meth:`time` has reached ``deadline`` (at once if it already has), or
        early when the clock jumped backwards - callers re-check the time and reschedule."""
        ...


class SystemClock:
    """The machine's wall clock, robust to jumps.

    A sleeper is one timer on the loop's monotonic clock, armed for the wall-clock deadline.
    Jumps are noticed by one watchdog per loop (every five minutes, while anything sleeps),
    not by each sleeper: 10,000 handles wake only when their own refresh is due, instead of
    every five minutes each.
    """

    # The C function itself, not a wrapper: the getter calls it on every handshake.
    time = staticmethod(time.time)

    async def sleep_until(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        wall = self.time
        expected = wall()  # the wall time we should read, had it run with the loop's
        while True:
            now = wall()
            if now < expected - _JUMP:  # the clock went back: let the caller reschedule
                return
            remaining = deadline - now
            if remaining <= 0:
                return
            armed_at = loop.time()
            woken: asyncio.Future[None] = loop.create_future()
            timer = loop.call_later(remaining, _wake, woken)
            watchdog = _watchdog(loop, wall)
            watchdog.add(woken)
            try:
                await woken  # the timer, or the watchdog after a jump: re-read the time
            finally:
                timer.cancel()
                watchdog.discard(woken)
            expected = now + (loop.time() - armed_at)


def _wake(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)


class _Watchdog:
    """Wakes every :class:`SystemClock` sleeper of one loop when wall time jumps.

    Compares ``time.time() - loop.time()`` every :data:`_MAX_STEP` seconds; runs only while
    something sleeps.
    """

    __slots__ = ("_key", "_loop", "_offset", "_sleepers", "_timer", "_wall")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, wall: Callable[[], float], key: _Key
    ) -> None:
        self._loop = loop
        self._wall = wall
        self._key = key
        self._sleepers: set[asyncio.Future[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._offset = 0.0

    def add(self, woken: asyncio.Future[None]) -> None:
        if self._timer is None:
            self._offset = self._wall() - self._loop.time()
            self._timer = self._loop.call_later(_MAX_STEP, self._check)
        self._sleepers.add(woken)

    def discard(self, woken: asyncio.Future[None]) -> None:
        self._sleepers.discard(woken)
        if not self._sleepers:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if _watchdogs.get(self._key) is self:
                del _watchdogs[self._key]

    def _check(self) -> None:
        offset = self._wall() - self._loop.time()
        jumped = abs(offset - self._offset) > _JUMP
        self._offset = offset
        self._timer = self._loop.call_later(_MAX_STEP, self._check)
        if jumped:
            for woken in list(self._sleepers):
                _wake(woken)


# By loop (its id, with the loop kept in the watchdog: uvloop's loops take no weak references)
# and wall-time function; an entry leaves when its last sleeper does.
_Key = tuple[int, Callable[[], float]]
_watchdogs: dict[_Key, _Watchdog] = {}


def _watchdog(loop: asyncio.AbstractEventLoop, wall: Callable[[], float]) -> _Watchdog:
    key = (id(loop), wall)
    watchdog = _watchdogs.get(key)
    if watchdog is None or watchdog._loop is not loop:
        watchdog = _watchdogs[key] = _Watchdog(loop, wall, key)
    return watchdog


def to_datetime(t: float) -> datetime:
    """Epoch seconds to an aware UTC datetime."""
    return datetime.fromtimestamp(t, UTC)
