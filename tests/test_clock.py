"""The real clock: one timer per sleeper, one watchdog per loop for wall-clock jumps.

The wall time is a hand-set function (a subclass of :class:`SystemClock`); the loop's own
monotonic clock is real. The watchdog's periodic check is called by hand, as its timer would
after five minutes.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from staple import clock as clock_module
from staple.clock import SystemClock


class WallClock(SystemClock):
    """The system clock with a wall time the test can jump."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset


def watchdog_for(clock: SystemClock) -> clock_module._Watchdog:
    key = (id(asyncio.get_running_loop()), clock.time)
    return clock_module._watchdogs[key]


async def sleeping(clock: SystemClock, deadline: float) -> asyncio.Task[None]:
    task = asyncio.create_task(clock.sleep_until(deadline))
    for _ in range(3):
        await asyncio.sleep(0)
    assert not task.done()
    return task


async def test_returns_at_the_deadline_and_leaves_nothing_behind() -> None:
    clock = SystemClock()
    deadline = clock.time() + 0.02
    await clock.sleep_until(deadline)
    assert clock.time() >= deadline
    assert not clock_module._watchdogs  # no watchdog runs while nothing sleeps


async def test_past_deadline_returns_at_once() -> None:
    clock = SystemClock()
    await clock.sleep_until(clock.time() - 10)
    assert not clock_module._watchdogs


async def test_sleepers_share_one_watchdog_and_arm_one_timer_each() -> None:
    clock = SystemClock()
    loop = asyncio.get_running_loop()
    before = len(loop._scheduled)  # type: ignore[attr-defined]
    tasks = [await sleeping(clock, clock.time() + 3600 + n) for n in range(50)]
    assert len(clock_module._watchdogs) == 1
    assert len(watchdog_for(clock)._sleepers) == 50
    # 50 sleepers, 1 watchdog: timers, not polling tasks.
    assert len(loop._scheduled) - before == 51  # type: ignore[attr-defined]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert not clock_module._watchdogs  # cancelled sleepers leave, and the watchdog with them


async def test_a_steady_clock_wakes_no_one() -> None:
    clock = WallClock()
    task = await sleeping(clock, clock.time() + 3600)
    watchdog = watchdog_for(clock)
    watchdog._check()
    await asyncio.sleep(0)
    assert not task.done()
    assert watchdog._timer is not None  # re-armed for the next check
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_jump_back_returns_the_sleeper_early() -> None:
    clock = WallClock()
    task = await sleeping(clock, clock.time() + 3600)
    clock.offset = -600.0
    watchdog_for(clock)._check()
    await asyncio.wait_for(task, 5)  # returned early, so the caller re-plans


async def test_a_jump_forward_past_the_deadline_ends_the_sleep() -> None:
    clock = WallClock()
    deadline = clock.time() + 3600
    task = await sleeping(clock, deadline)
    clock.offset = 7200.0
    watchdog_for(clock)._check()
    await asyncio.wait_for(task, 5)
    assert clock.time() >= deadline


async def test_a_jump_forward_short_of_the_deadline_re_arms() -> None:
    clock = WallClock()
    deadline = clock.time() + 3600
    task = await sleeping(clock, deadline)
    clock.offset = 1800.0
    watchdog = watchdog_for(clock)
    watchdog._check()
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()
    assert len(watchdog_for(clock)._sleepers) == 1  # asleep again, for the 1800 s left
    clock.offset = 3600.0
    watchdog_for(clock)._check()
    await asyncio.wait_for(task, 5)


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_runs_on_uvloop_too(loop_name: str) -> None:
    async def main() -> None:
        clock = WallClock()
        task = await sleeping(clock, clock.time() + 3600)
        clock.offset = -600.0
        watchdog_for(clock)._check()
        await asyncio.wait_for(task, 5)
        assert not clock_module._watchdogs

    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    else:
        asyncio.run(main())
