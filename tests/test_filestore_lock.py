"""``FileStore.lock``: one fetcher per key among the processes sharing a directory.

Real files, real ``flock``, real processes: two store objects on one directory contend as two
processes do (each ``lock`` opens the file anew), and a holder in another process is SIGKILLed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import staple.store
from staple import FileStore

KEY = "0123abcd"
TTL = 60.0


def lock_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob(FileStore.LOCK_PREFIX + "*"))


async def test_one_holder_at_a_time(tmp_path: Path) -> None:
    a, b = FileStore(tmp_path), FileStore(tmp_path)
    async with a.lock(KEY, ttl=TTL) as granted:
        assert granted
        assert lock_files(tmp_path) == [FileStore.LOCK_PREFIX + KEY]
        async with b.lock(KEY, ttl=TTL) as second:
            assert not second
        async with a.lock(KEY, ttl=TTL) as again:  # the same store, a second taker: refused too
            assert not again
        async with b.lock("other", ttl=TTL) as other:  # keys are independent
            assert other
    async with b.lock(KEY, ttl=TTL) as after:
        assert after
    assert lock_files(tmp_path) == []  # each release removes its file
    assert not any(tmp_path.iterdir())  # noqa: ASYNC240 - a directory of the test's own


async def test_released_when_the_block_raises(tmp_path: Path) -> None:
    store = FileStore(tmp_path)

    async def fetch_fails() -> None:
        async with store.lock(KEY, ttl=TTL) as granted:
            assert granted
            raise RuntimeError("fetch failed")

    with pytest.raises(RuntimeError):
        await fetch_fails()
    async with FileStore(tmp_path).lock(KEY, ttl=TTL) as granted:
        assert granted


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
    async with store.lock(KEY, ttl=TTL) as granted:
        assert not granted
    assert proc.stdin is not None
    proc.stdin.write(b"done\n")
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert lock_files(tmp_path) == []  # it removed its file on release
    async with store.lock(KEY, ttl=TTL) as granted:
        assert granted


async def test_the_kernel_releases_a_killed_holder(tmp_path: Path) -> None:
    proc = await holder(tmp_path)
    store = FileStore(tmp_path)
    async with store.lock(KEY, ttl=TTL) as granted:
        assert not granted
    proc.send_signal(signal.SIGKILL)
    assert await asyncio.wait_for(proc.wait(), 30) == -signal.SIGKILL
    assert lock_files(tmp_path) == [FileStore.LOCK_PREFIX + KEY]  # left by the dead holder
    async with store.lock(KEY, ttl=TTL) as granted:
        assert granted  # at once: no TTL to wait out
        async with FileStore(tmp_path).lock(KEY, ttl=TTL) as second:
            assert not second  # the file the dead holder left is a working lock again
    assert lock_files(tmp_path) == []  # and gone once released


async def test_a_holder_past_its_ttl_is_presumed_hung(tmp_path: Path) -> None:
    """As a Redis lock expires: a lock taken more than ``ttl`` ago no longer refuses."""
    a, b = FileStore(tmp_path), FileStore(tmp_path)
    async with a.lock(KEY, ttl=TTL) as granted:
        assert granted
        path = tmp_path / (FileStore.LOCK_PREFIX + KEY)
        taken = time.time() - 100
        os.utime(path, (taken, taken))
        async with b.lock(KEY, ttl=200) as within:
            assert not within
        async with b.lock(KEY, ttl=50) as past:
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
    real = staple.store.fcntl

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
    async with contender.lock(KEY, ttl=TTL) as contended:
        assert not contended
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
        await FileStore(tmp_path).put(KEY, b"der", expires=staple.store.datetime.now())
        assert sorted(lock_files(tmp_path)) == [fresh.name, held.name]
        async with FileStore(tmp_path).lock("held", ttl=3 * FileStore.STALE_TEMP) as second:
            assert not second  # still a working lock
