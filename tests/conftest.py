"""Fixtures most tests share: a fake clock, a PKI lined up with it, a local responder that
signs with that clock, the PKI's CA bundle as a file, and a throwaway redis-server.

A module marked ``real_clock`` (``pytestmark = pytest.mark.real_clock``: its servers run in
other processes, or on the loop's own time) gets a PKI on the real clock instead, one per
module, and a responder that signs with the real clock."""

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


def _real_clock(request: pytest.FixtureRequest) -> bool:
    return request.node.get_closest_marker("real_clock") is not None


@pytest.fixture(scope="module")
def real_clock_pki() -> TestPKI:
    """The PKI of a ``real_clock`` module (see :func:`pki`)."""
    return TestPKI()


@pytest.fixture
def pki(request: pytest.FixtureRequest, clock: FakeClock) -> TestPKI:
    if _real_clock(request):
        pki: TestPKI = request.getfixturevalue("real_clock_pki")
        return pki
    return TestPKI(now=clock.now())


@pytest.fixture
async def responder(
    request: pytest.FixtureRequest, pki: TestPKI, clock: FakeClock
) -> AsyncIterator[OcspResponder]:
    async with OcspResponder(pki, clock=None if _real_clock(request) else clock) as r:
        yield r


@pytest.fixture
def ca_file(pki: TestPKI, tmp_path: Path) -> Path:
    """The PKI's CA bundle, for curl and stdlib clients."""
    path = tmp_path / "ca.pem"
    pki.write_ca_bundle(path)
    return path


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
