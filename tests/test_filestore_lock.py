"""``FileStore.lock``: one fetcher per key among the processes sharing a directory.

Real files, real ``flock``, real processes: two store objects on one directory contend as two
processes do (each ``lock`` opens the file anew), and a holder in another process is SIGKILLed.
A contender waits for the holder; ``FileStore._take_lock`` is one try, granted or not.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import staple.store
from staple import FileStore

KEY = "0123abcd"
TTL = 60.0


def lock_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob(FileStore.LOCK_PREFIX + "*"))


def take(store: FileStore, key: str = KEY, ttl: float = TTL) -> tuple[bool, int | None]:
    return store._take_lock(store._lock_path(key), ttl)


async def test_one_holder_at_a_time(tmp_path: Path) -> None:
    a, b = FileStore(tmp_path), FileStore(tmp_path)
    async with a.lock(KEY, ttl=TTL) as granted:
        assert granted
        assert lock_files(tmp_path) == [FileStore.LOCK_PREFIX + KEY]
        assert take(b) == (False, None)
        assert take(a) == (False, None)  # the same store, a second taker: refused too
        async with b.lock("other", ttl=TTL) as other:  # keys are independent
            assert other
    held, fd = take(b)
    assert held and fd is not None
    FileStore._release_lock(b._lock_path(KEY), fd)
    assert lock_files(tmp_path) == []  # each release removes its file
    assert not any(tmp_path.iterdir())  # noqa: ASYNC240 - a directory of the test's own


async def test_a_contender_waits_for_the_holder(tmp_path: Path) -> None:
    a, b = FileStore(tmp_path), FileStore(tmp_path)
    order: list[str] = []

    async def contend() -> None:
        async with b.lock(KEY, ttl=TTL) as granted:
            assert granted
            order.append("b holds")

    async with a.lock(KEY, ttl=TTL):
        waiter = asyncio.create_task(contend())
        done, _ = await asyncio.wait({waiter}, timeout=0.3)
        assert not done  # still waiting while a holds it
        order.append("a lets go")
    await asyncio.wait_for(waiter, 10)
    assert order == ["a lets go", "b holds"]


async def test_released_when_the_block_raises(tmp_path: Path) -> None:
    store = FileStore(tmp_path)

    async def fetch_fails() -> None:
        async with store.lock(KEY, ttl=TTL) as granted:
            assert granted
            raise RuntimeError("fetch failed")

    with pytest.raises(RuntimeError):
        await fetch_fails()
    assert take(FileStore(tmp_path))[0]


async def test_cancelled_while_waiting_holds_nothing(tmp_path: Path) -> None:
    a, b = FileStore(tmp_path), FileStore(tmp_path)
    async with a.lock(KEY, ttl=TTL):
        waiter = asyncio.create_task(b.lock(KEY, ttl=TTL).__aenter__())
        done, _ = await asyncio.wait({waiter}, timeout=0.1)
        assert not done
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    assert lock_files(tmp_path) == []
    assert take(b)[0]


HOLDER = """
import asyncio, sys
from staple import FileStore

async def main() -> None:
    async with FileStore(sys.argv[1]).lock(sys.argv[2], ttl=60) as granted:
        print("held" if granted else "refused", flush=True)
        sys.stdin.readline()  # hold until told (or killed)

asyncio.run(main())
"""


async def holder(directory: Path) -> asyncio.subprocess.Process:
    """Another process holding the lock on ``KEY``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, str(directory), KEY,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert line == b"held\n", line
    return proc


async def test_another_process_holds_it_until_it_lets_go(tmp_path: Path) -> None:
    proc = await holder(tmp_path)
    store = FileStore(tmp_path)
    assert take(store) == (False, None)
    lock = store.lock(KEY, ttl=TTL)
    waiter = asyncio.create_task(lock.__aenter__())
    assert proc.stdin is not None
    proc.stdin.write(b"done\n")
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert await asyncio.wait_for(waiter, 10) is True
    assert lock_files(tmp_path) == [FileStore.LOCK_PREFIX + KEY]  # ours now
    assert take(FileStore(tmp_path)) == (False, None)
    await lock.__aexit__(None, None, None)
    assert lock_files(tmp_path) == []


async def test_the_kernel_releases_a_killed_holder(tmp_path: Path) -> None:
    """The holder is SIGKILLed while a contender waits: the contender gets it at once, with no
    TTL to wait out, and the file the dead holder left works as a lock again."""
    proc = await holder(tmp_path)
    store = FileStore(tmp_path)

    async def contend() -> bool:
        async with store.lock(KEY, ttl=TTL) as granted:
            assert take(FileStore(tmp_path)) == (False, None)  # really held, by us
            return granted

    waiter = asyncio.create_task(contend())
    done, _ = await asyncio.wait({waiter}, timeout=0.3)
    assert not done
    proc.send_signal(signal.SIGKILL)
    assert await asyncio.wait_for(proc.wait(), 30) == -signal.SIGKILL
    assert await asyncio.wait_for(waiter, 10) is True
    assert lock_files(tmp_path) == []  # removed by the next holder's release


async def test_a_holder_past_its_ttl_is_presumed_hung(tmp_path: Path) -> None:
    """As a Redis lock expires: a lock taken more than ``ttl`` ago no longer refuses."""
    a, b = FileStore(tmp_path), FileStore(tmp_path)
    async with a.lock(KEY, ttl=TTL) as granted:
        assert granted
        path = tmp_path / (FileStore.LOCK_PREFIX + KEY)
        taken = time.time() - 100
        os.utime(path, (taken, taken))
        assert take(b, ttl=200) == (False, None)
        async with b.lock(KEY, ttl=50) as past:  # at once, without waiting
            assert past
            assert path.exists()  # granted without taking it: the holder still owns the file
    assert not path.exists()


async def test_an_orphan_file_is_never_a_lock(tmp_path: Path, monkeypatch: Any) -> None:
    """A contender opens the lock file; its holder removes it and unlocks; a third process takes
    the new file. The contender's flock on the removed file then succeeds, but that is no
    lock: it must see that the path names another file now, and be refused by that one."""
    path = tmp_path / (FileStore.LOCK_PREFIX + KEY)
    first, third, contender = FileStore(tmp_path), FileStore(tmp_path), FileStore(tmp_path)
    granted, first_fd = first._take_lock(path, TTL)
    assert granted and first_fd is not None
    third_fd: list[int] = []
    raced: list[bool] = []
    real = fcntl

    class Racing:
        """``fcntl`` as the contender sees it: the others move between its open and flock."""

        LOCK_EX, LOCK_NB, LOCK_UN = real.LOCK_EX, real.LOCK_NB, real.LOCK_UN

        @staticmethod
        def flock(fd: int, operation: int) -> None:
            if not raced and operation & real.LOCK_NB:
                raced.append(True)  # once, and not for the third store's own flock below
                assert first_fd is not None
                FileStore._release_lock(path, first_fd)  # removes the file, then unlocks
                taken, fd3 = third._take_lock(path, TTL)  # makes a new file and locks it
                assert taken and fd3 is not None
                third_fd.append(fd3)
            real.flock(fd, operation)

    monkeypatch.setattr(staple.store, "fcntl", Racing)
    assert take(contender) == (False, None)
    monkeypatch.setattr(staple.store, "fcntl", real)
    assert len(third_fd) == 1
    FileStore._release_lock(path, third_fd[0])
    assert lock_files(tmp_path) == []


async def test_an_unusable_directory_grants_every_caller(tmp_path: Path) -> None:
    """Fail open, as RedisStore does when Redis is down: each process fetches for itself."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    a, b = FileStore(blocker / "cache"), FileStore(blocker / "cache")
    async with a.lock(KEY, ttl=TTL) as first, b.lock(KEY, ttl=TTL) as second:
        assert first and second


async def test_the_sweep_removes_only_free_stale_lock_files(tmp_path: Path) -> None:
    """A dead holder's file is removed by the first write once it is stale, but never a file
    somebody holds, however old."""
    old = time.time() - 2 * FileStore.STALE_TEMP
    dead = tmp_path / (FileStore.LOCK_PREFIX + "dead")
    dead.write_bytes(b"")
    os.utime(dead, (old, old))
    fresh = tmp_path / (FileStore.LOCK_PREFIX + "fresh")
    fresh.write_bytes(b"")
    holder_store = FileStore(tmp_path)
    async with holder_store.lock("held", ttl=TTL) as granted:
        assert granted
        held = tmp_path / (FileStore.LOCK_PREFIX + "held")
        os.utime(held, (old, old))
        await FileStore(tmp_path).put(KEY, b"der", expires=datetime.now(UTC))
        assert sorted(lock_files(tmp_path)) == [fresh.name, held.name]
        assert take(FileStore(tmp_path), "held", 3 * FileStore.STALE_TEMP) == (False, None)
