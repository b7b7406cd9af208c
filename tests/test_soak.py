"""Soak, short: continuous stapled handshakes while the responder keeps switching faults.

``bench/soak.py`` does the work (``python -m bench.soak --minutes N`` runs it by hand); this
runs it for ``STAPLE_SOAK_SECONDS`` (20 by default) with responses that are already 40 s old
when signed (valid one minute, margin 10 s), so the refresher refetches every few seconds and
fails about half the time. Whatever happens, no client may ever receive an invalid or expired
staple, every stapled context must be released, and nothing may reach the loop's exception
handler.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pytest

from bench.soak import run_soak
from staple import tls

pytestmark = pytest.mark.slow

SOAK_SECONDS = float(os.environ.get("STAPLE_SOAK_SECONDS", "20"))


@pytest.mark.parametrize("transport", tls.TRANSPORTS)
async def test_soak_never_serves_an_invalid_or_expired_staple(transport: tls.TransportKind) -> None:
    report = await run_soak(
        SOAK_SECONDS, clients=4, backdate=timedelta(seconds=40), transport=transport
    )
    print("\n" + "\n".join(report.lines()))
    assert report.invalid == 0, report.invalid_reasons
    assert report.expired == 0, report.invalid_reasons
    assert report.leaked_references == 0
    assert report.loop_errors == 0
    assert report.client_errors == 0, report.client_error_samples
    assert report.handshakes >= 10 * SOAK_SECONDS
    assert report.stapled_good > 0
    assert report.fault_switches >= SOAK_SECONDS / 6
    assert report.events.get("fetched", 0) >= 2  # it really refreshed, more than once
    assert report.rss_end_mib - report.rss_start_mib < 64
