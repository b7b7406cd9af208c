"""The clock, injected everywhere so days of refresh schedule run in milliseconds in tests.

The sans-I/O core never reads a clock; it takes ``now``. The shells (the handle's refresher)
ask a :class:`Clock` for the time and to sleep until a moment. :class:`SystemClock` is the real
one; ``staple.testing.FakeClock`` is the one tests advance by hand.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Protocol

__all__ = ["Clock", "SystemClock"]

# The longest single sleep of the real clock. Wall time can jump (NTP, suspend); sleeping in
# bounded steps and re-reading the time means a jump delays a deadline by at most this much.
_MAX_STEP = 300.0


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
    """The machine's wall clock, robust to jumps (re-checked at least every five minutes)."""

    # The C function itself, not a wrapper: the getter calls it on every handshake.
    time = staticmethod(time.time)

    async def sleep_until(self, deadline: float) -> None:
        last = time.time()
        while True:
            now = time.time()
            if now < last - 1.0:  # the clock went back: let the caller reschedule
                return
            remaining = deadline - now
            if remaining <= 0:
                return
            last = now
            await asyncio.sleep(min(remaining, _MAX_STEP))


def to_datetime(t: float) -> datetime:
    """Epoch seconds to an aware UTC datetime."""
    return datetime.fromtimestamp(t, UTC)
