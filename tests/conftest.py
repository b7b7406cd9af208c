"""Fixtures most tests share: a fake clock, a PKI lined up with it, and a local responder
that signs with that clock. Modules that need the real clock define their own."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from staple.testing import FakeClock, OcspResponder, TestPKI


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
