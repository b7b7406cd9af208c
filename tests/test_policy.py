"""The refresh policy's rules, walked with explicit ``now`` and ``rand`` (no clock, no sleeps)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509

import staple
from staple import ocsp, policy
from staple.policy import RefreshPolicy, http_fresh_until, next_refresh, retry_delay
from staple.testing import FakeClock, OcspResponder, TestPKI

T0 = datetime(2026, 3, 1, tzinfo=UTC)
DAY = timedelta(days=1)
P = RefreshPolicy()


def resp(
    this_update: datetime = T0,
    validity: timedelta = 7 * DAY,
    status: ocsp.CertStatus = ocsp.CertStatus.GOOD,
) -> ocsp.VerifiedResponse:
    dummy = x509.load_pem_x509_certificate(_PEM)
    return ocsp.VerifiedResponse(
        der=b"",
        cert_id=ocsp.CertId("sha1", b"", b"", 1),
        cert_status=status,
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


def test_stop_stapling_at_is_expiry_less_margin() -> None:
    r = resp()
    assert policy.stop_stapling_at(r, P) == r.expires - P.margin


def test_withholds_revoked_only_when_told() -> None:
    revoked = resp(status=ocsp.CertStatus.REVOKED)
    assert not policy.withholds(revoked, P)
    assert policy.withholds(revoked, replace(P, staple_revoked=False))
    assert not policy.withholds(resp(), replace(P, staple_revoked=False))


def test_adopting_skips_the_fetch_only_when_it_is_no_longer_due() -> None:
    later, earlier = T0 + DAY, T0 - DAY
    skip = policy.skip_fetch_after_adopting
    assert skip(adopted=True, force=False, now=T0, due=later)
    assert not skip(adopted=True, force=False, now=T0, due=earlier)  # still due: fetch
    assert not skip(adopted=True, force=True, now=T0, due=later)  # refresh() asked for it
    assert not skip(adopted=False, force=False, now=T0, due=later)
    assert not skip(adopted=True, force=False, now=T0, due=None)


def test_lock_ttl_and_looking_again() -> None:
    ttl = policy.fetch_lock_ttl(replace(P, fetch_timeout=15.0), 2)
    assert ttl == 35.0
    assert policy.fetch_lock_ttl(P, 0) == policy.fetch_lock_ttl(P, 1)
    assert policy.look_again_after(ttl) == timedelta(seconds=10)
    assert policy.look_again_after(3.0) == timedelta(seconds=3)


def test_rollback_base_is_the_newer_of_held_and_recorded() -> None:
    held, revoked = resp(T0), resp(T0 + DAY, status=ocsp.CertStatus.REVOKED)
    assert policy.rollback_base(None, None) is None
    assert policy.rollback_base(held, None) is held
    assert policy.rollback_base(None, revoked) is revoked
    assert policy.rollback_base(held, revoked) is revoked
    newest = resp(T0 + 2 * DAY)
    assert policy.rollback_base(newest, revoked) is newest


def test_revocation_record_is_evidence_as_of_its_signing() -> None:
    """Long expired, a revoked response still proves the revocation; a good response, or
    one about another certificate, proves nothing."""
    pki = TestPKI(now=T0)
    leaf, other = pki.issue_leaf("a.policy.test"), pki.issue_leaf("b.policy.test")
    responder = OcspResponder(pki, clock=FakeClock(T0))
    issuer = leaf.chain[1]
    good = responder.response_for(leaf)
    responder.revoke(leaf)
    responder.revoke(other)
    revoked, foreign = responder.response_for(leaf), responder.response_for(other)
    record = policy.revocation_record(revoked, leaf.cert, issuer, P)
    assert record.cert_status is ocsp.CertStatus.REVOKED
    # the rule of ocsp.validate, reused: a good after it is refused, however late
    with pytest.raises(staple.RevocationReversedError):
        ocsp.validate(good, leaf.cert, issuer, now=T0, current=record)
    with pytest.raises(staple.BadResponseError, match="not a revoked response"):
        policy.revocation_record(good, leaf.cert, issuer, P)
    with pytest.raises(staple.CertIdMismatchError):
        policy.revocation_record(foreign, leaf.cert, issuer, P)
    with pytest.raises(staple.BadResponseError):
        policy.revocation_record(b"junk", leaf.cert, issuer, P)


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
