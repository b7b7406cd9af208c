"""Fixtures of the tests that run real server processes (uvicorn, gunicorn, ``staple serve
--app``): these processes live on the real clock, so the PKI and the responder do too, in
place of the fake-clock ones of ``tests/conftest.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from staple.testing import OcspResponder, TestPKI


@pytest.fixture(scope="module")
def pki() -> TestPKI:
    return TestPKI()


@pytest.fixture
async def responder(pki: TestPKI) -> AsyncIterator[OcspResponder]:
    async with OcspResponder(pki) as r:
        yield r


@pytest.fixture
def ca_file(pki: TestPKI, tmp_path: Path) -> Path:
    """The test PKI's CA bundle, for curl and stdlib clients."""
    path = tmp_path / "ca.pem"
    pki.write_ca_bundle(path)
    return path
