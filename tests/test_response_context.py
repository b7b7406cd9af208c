"""ContextHolder on its own: install, retire, references and the stop moment, no handle."""

from __future__ import annotations

import pytest

from staple import ocsp
from staple.response_context import ContextHolder
from staple.testing import FakeClock, OcspResponder, TestPKI


@pytest.fixture
def verified(pki: TestPKI, clock: FakeClock) -> ocsp.VerifiedResponse:
    leaf = pki.issue_leaf("ctx.test")
    der = OcspResponder(pki, clock=clock).response_for(leaf)
    return ocsp.validate(der, leaf.cert, leaf.chain[1], now=clock.now())


def test_install_take_retire_and_counts(verified, clock: FakeClock) -> None:
    holder = ContextHolder(clock.time)
    assert holder.get_context() is None and holder.live_contexts == 0
    holder._install_context(verified, stop_at=clock.time() + 60)
    first = holder.get_context()
    assert first is not None and first.refs == 1 and first.stop_at == clock.time() + 60
    holder._install_context(verified, stop_at=clock.time() + 60)  # a refresh replaces it
    second = holder.get_context()
    assert second is not None and second is not first
    assert holder.live_contexts == 2 and holder.live_references == 2
    first.free()  # the replaced one leaves with its last reference
    assert holder.live_contexts == 1 and holder.live_references == 1
    holder._retire_context()
    holder._retire_context()  # idempotent
    assert holder.get_context() is None
    assert holder.live_contexts == 1  # still referenced
    second.free()
    assert holder.live_contexts == 0 and holder.live_references == 0


def test_past_its_stop_moment_a_context_is_retired_not_handed_out(
    verified, clock: FakeClock
) -> None:
    holder = ContextHolder(clock.time)
    holder._install_context(verified, stop_at=clock.time() + 60)
    clock.advance(60)
    assert holder.get_context() is None
    assert holder.live_contexts == 0
