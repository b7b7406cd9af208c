"""Fixtures most tests share: a fake clock, a PKI lined up with it, a local responder that
signs with that clock, and a throwaway redis-server. Modules that need the real clock define
their own PKI and responder."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from staple.testing import FakeClock, OcspResponder, TestPKI

from .redis_server import RedisServer, redis_server_missing


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def pki(clock: FakeClock) -> TestPKI:
    return TestPKI(now=clock.now())


@pytest.fixture
async def responder(pki: TestPKI, clock: FakeClock) -> AsyncIterator[OcspResponder]:
    async with OcspResponder(pki, clock=clock) as r:
        yield r


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A throwaway redis-server; skipped when it is not installed, failed under CI=true."""
    missing = redis_server_missing()
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing}; CI=true requires the Redis tests to run")
        pytest.skip(missing)
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()
