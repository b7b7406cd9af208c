"""A clock that only moves when a test tells it to.

Theory of operation: :class:`FakeClock` keeps the current time as a float and a list of
*sleepers*, one per coroutine blocked in :meth:`FakeClock.sleep_until`, each with its deadline
and a future. :meth:`~FakeClock.advance` and :meth:`~FakeClock.set` move the time and resolve
the future of every sleeper whose deadline has been reached; that sleeper leaves the list at
once and resumes on the event loop's next iteration. A test that wants to know when the code
under test has gone back to sleep awaits :meth:`~FakeClock.wait_for_sleepers`, which is woken
by the registration of a sleeper, never by polling or by real time passing.

Nothing here is bound to an event loop at construction, so a clock made in a synchronous
fixture works in whatever loop the test runs.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

__all__ = ["FakeClock"]


@dataclass(slots=True, eq=False)
class _Sleeper:
    deadline: float
    future: asyncio.Future[None] = field(repr=False)


@dataclass(slots=True, eq=False)
class _Waiter:
    count: int
    future: asyncio.Future[None] = field(repr=False)


def _to_epoch(t: float | datetime) -> float:
    if isinstance(t, datetime):
        if t.tzinfo is None:
            t = t.replace(tzinfo=UTC)
        return t.timestamp()
    return float(t)


class FakeClock:
    """A :class:`staple.clock.Clock` whose time moves only by :meth:`advance` and :meth:`set`.

    ``start`` is the initial time, as epoch seconds or a datetime (a naive datetime is taken
    as UTC). By default it is the real current time rounded down to the minute, so
    certificates made by a :class:`~staple.testing.TestPKI` with default validity are valid at
    the fake time.

    Drive code under test deterministically::

        clock = FakeClock()
        task = asyncio.create_task(refresher(clock))
        await clock.wait_for_sleepers(1)   # the refresher is now blocked in sleep_until
        clock.advance(3600)                # ... and wakes if its deadline was within the hour
    """

    def __init__(self, start: float | datetime | None = None) -> None:
        if start is None:
            self._now = float(math.floor(time.time() / 60) * 60)
        else:
            self._now = _to_epoch(start)
        self._sleepers: list[_Sleeper] = []
        self._waiters: list[_Waiter] = []

    def __repr__(self) -> str:
        return f"<FakeClock {self.now().isoformat()} sleepers={len(self._sleepers)}>"

    # -- the Clock protocol ---------------------------------------------------------------

    def time(self) -> float:
        """The fake time, in seconds since the epoch."""
        return self._now

    async def sleep_until(self, deadline: float) -> None:
        """Block until the fake time reaches ``deadline`` (return at once if it has).

        The sleeper counts in :attr:`sleepers` from the moment it blocks until it is woken or
        cancelled; a cancelled sleeper is forgotten.
        """
        if deadline <= self._now:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        sleeper = _Sleeper(deadline, future)
        self._sleepers.append(sleeper)
        self._notify_waiters()
        try:
            await future
        finally:
            # Woken sleepers were removed by _wake; this handles cancellation.
            if sleeper in self._sleepers:
                self._sleepers.remove(sleeper)

    # -- extras for tests -------------------------------------------------------------------

    async def sleep(self, seconds: float) -> None:
        """Block until ``seconds`` of fake time have passed (``sleep_until(time() + seconds)``)."""
        await self.sleep_until(self._now + seconds)

    def now(self) -> datetime:
        """The fake time as an aware UTC datetime."""
        return datetime.fromtimestamp(self._now, UTC)

    def advance(self, seconds: float | timedelta) -> None:
        """Move the time forward and wake every sleeper whose deadline has been reached.

        Raises :class:`ValueError` for a negative amount; use :meth:`set` to go back in time.
        The woken coroutines resume on the event loop's next iteration, not inside this call.
        """
        if isinstance(seconds, timedelta):
            seconds = seconds.total_seconds()
        if seconds < 0:
            raise ValueError(f"cannot advance by {seconds} s; use set() to move time backwards")
        self._now += seconds
        self._wake()

    def set(self, t: float | datetime) -> None:
        """Jump to ``t`` (epoch seconds or datetime), forwards or backwards.

        Jumping forwards wakes the sleepers whose deadline has been reached. Jumping backwards
        wakes every sleeper, as :class:`staple.clock.SystemClock` returns early when the wall
        clock goes back: a deadline computed before the jump may mean nothing after it.
        """
        t = _to_epoch(t)
        backwards = t < self._now
        self._now = t
        if backwards:
            for sleeper in self._sleepers:
                if not sleeper.future.done():
                    sleeper.future.set_result(None)
            self._sleepers.clear()
            self._notify_waiters()
        else:
            self._wake()

    @property
    def sleepers(self) -> int:
        """How many coroutines are blocked in :meth:`sleep_until` right now."""
        return len(self._sleepers)

    @property
    def next_deadline(self) -> float | None:
        """The earliest deadline among the blocked sleepers, or ``None`` if there are none."""
        return min((s.deadline for s in self._sleepers), default=None)

    async def wait_for_sleepers(self, n: int = 1) -> None:
        """Return once at least ``n`` coroutines are blocked in :meth:`sleep_until`.

        Returns at once if they already are. This never sleeps in real time; wrap it in
        :func:`asyncio.timeout` if the code under test might never go to sleep.
        """
        if len(self._sleepers) >= n:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(n, future)
        self._waiters.append(waiter)
        try:
            await future
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    # -- internals --------------------------------------------------------------------------

    def _wake(self) -> None:
        due = [s for s in self._sleepers if s.deadline <= self._now]
        for sleeper in due:
            self._sleepers.remove(sleeper)
            if not sleeper.future.done():
                sleeper.future.set_result(None)

    def _notify_waiters(self) -> None:
        count = len(self._sleepers)
        for waiter in [w for w in self._waiters if w.count <= count]:
            self._waiters.remove(waiter)
            if not waiter.future.done():
                waiter.future.set_result(None)
