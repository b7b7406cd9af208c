"""The refresh policy's rules, walked with explicit ``now`` and ``rand`` (no clock, no sleeps)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509

from staple import ocsp
from staple.policy import RefreshPolicy, http_fresh_until, next_refresh, retry_delay

T0 = datetime(2026, 3, 1, tzinfo=UTC)
DAY = timedelta(days=1)
P = RefreshPolicy()


def resp(this_update: datetime = T0, validity: timedelta = 7 * DAY) -> ocsp.VerifiedResponse:
    dummy = x509.load_pem_x509_certificate(_PEM)
    return ocsp.VerifiedResponse(
        der=b"",
        cert_id=ocsp.CertId("sha1", b"", b"", 1),
        cert_status=ocsp.CertStatus.GOOD,
        this_update=this_update,
        next_update=this_update + validity,
        produced_at=this_update,
        expires=this_update + validity,
        signer=dummy,
        delegated=False,
    )


def test_halfway_without_jitter() -> None:
    r = resp()
    assert next_refresh(r, now=T0, policy=P, rand=0.0) == T0 + 3.5 * DAY


def test_jitter_spreads_after_halfway() -> None:
    r = resp()
    lo = next_refresh(r, now=T0, policy=P, rand=0.0)
    hi = next_refresh(r, now=T0, policy=P, rand=0.999)
    assert lo == T0 + 3.5 * DAY
    assert T0 + 3.5 * DAY < hi <= T0 + 3.5 * DAY + 0.1 * 7 * DAY
    assert next_refresh(r, now=T0, policy=replace(P, jitter=0), rand=0.999) == lo


def test_cache_control_delays_but_never_past_latest() -> None:
    r = resp()
    # max-age later than halfway: wait for it
    fresh = T0 + 5 * DAY
    assert next_refresh(r, now=T0, policy=P, fresh_until=fresh) == fresh
    # max-age beyond the safety point: the safety point wins
    latest = r.expires - P.margin - P.safety
    assert next_refresh(r, now=T0, policy=P, fresh_until=T0 + 30 * DAY) == latest
    # max-age earlier than halfway changes nothing
    assert next_refresh(r, now=T0, policy=P, fresh_until=T0 + DAY) == T0 + 3.5 * DAY


def test_short_lived_responses_scale_the_safety() -> None:
    r = resp(validity=timedelta(minutes=20))
    stop = r.expires - P.margin  # 15 min after thisUpdate
    when = next_refresh(r, now=T0, policy=P, fresh_until=T0 + DAY)
    assert when == stop - (stop - T0) / 4  # a quarter of the window, not the full hour
    assert when > T0


def test_never_in_the_past_and_min_interval() -> None:
    r = resp()
    late = T0 + 6.99 * DAY  # past the latest refresh point: soon, but never a tight loop
    assert next_refresh(r, now=late, policy=P) == late + P.min_interval
    overdue = T0 + 6.9 * DAY  # overdue but before the latest point: after the min interval
    assert next_refresh(r, now=overdue, policy=P) == overdue + P.min_interval
    early = T0 + 3.5 * DAY - timedelta(seconds=10)
    assert next_refresh(r, now=early, policy=P) == early + P.min_interval


def test_backoff_grows_with_full_jitter_and_cap() -> None:
    ceilings = [retry_delay(n, now=T0, policy=P, rand=1.0) for n in range(1, 12)]
    assert ceilings[0] == P.backoff_base
    assert ceilings[1] == 2 * P.backoff_base
    assert ceilings[-1] == P.backoff_max
    assert ceilings == sorted(ceilings)
    half = retry_delay(3, now=T0, policy=P, rand=0.5)
    assert half == 2 * P.backoff_base
    assert retry_delay(1, now=T0, policy=P, rand=0.0) == P.backoff_min
    assert retry_delay(10_000, now=T0, policy=P, rand=1.0) == P.backoff_max
    with pytest.raises(ValueError, match="failures"):
        retry_delay(0, now=T0, policy=P)


def test_backoff_leaves_room_for_retries_before_expiry() -> None:
    r = resp(validity=DAY)
    now = r.expires - timedelta(hours=2)
    left = r.expires - P.margin - now
    delay = retry_delay(20, now=now, policy=P, held=r, rand=1.0)
    assert delay == left / P.retries_before_expiry
    assert now + P.retries_before_expiry * delay <= r.expires - P.margin


def test_http_fresh_until() -> None:
    now = T0
    assert http_fresh_until({"Cache-Control": "max-age=3600, public"}, now) == now + timedelta(
        hours=1
    )
    assert http_fresh_until({"Cache-Control": "public, max-age=600", "Age": "100"}, now) == (
        now + timedelta(seconds=500)
    )
    assert http_fresh_until({"Cache-Control": "no-cache, max-age=600"}, now) is None
    assert http_fresh_until({}, now) is None
    # Expires relative to Date: the responder's clock offset doesn't matter
    headers = {"Date": "Sun, 01 Mar 2026 10:00:00 GMT", "Expires": "Sun, 01 Mar 2026 12:00:00 GMT"}
    assert http_fresh_until(headers, now) == now + timedelta(hours=2)
    assert http_fresh_until({"Expires": "garbage"}, now) is None
    assert http_fresh_until({"Cache-Control": "max-age=abc"}, now) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"jitter": 2.0},
        {"retries_before_expiry": 0},
        {"max_response_size": 10},
        {"margin": timedelta(seconds=-1)},
    ],
)
def test_policy_refuses_nonsense(kwargs) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - message checked per field below
        RefreshPolicy(**kwargs)


_PEM = b"""-----BEGIN CERTIFICATE-----
MIIBDDCBs6ADAgECAgEBMAoGCCqGSM49BAMCMBAxDjAMBgNVBAMMBWR1bW15MB4X
DTI2MDEwMTAwMDAwMFoXDTM2MDEwMTAwMDAwMFowEDEOMAwGA1UEAwwFZHVtbXkw
WTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAASl9kfgVeFf2tBkBsJ+xT9XdB54ztAx
MvyQ9JbME/9Y+i2my+6uVg3gX95qtkQrAYi/jlTYZ5L5SdDEeGJwulozMAoGCCqG
SM49BAMCA0gAMEUCIHoTJdbg4C2RXptQTXTP1pG99bzOrg9D9IPXIkQQAsAhAiEA
gHYc3pV/3orgADq5avze9muw+cNTz3cevTkWynf7TzY=
-----END CERTIFICATE-----
"""
