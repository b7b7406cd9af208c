"""When to fetch the next response: the refresh policy as a few named, pure rules.

Read top-down, like certmagic's ``maintain.go``; each rule says why. Nothing here reads the clock
or draws random numbers: the refresher passes ``now`` and a uniform ``rand`` in [0, 1), so a
test can walk days of schedule, jitter included, in microseconds.

The rules, for a held response valid over [thisUpdate, expires):

- *Stop stapling* at ``expires - margin``: a client whose clock runs a little ahead must not
  receive a response it considers expired (Windows wants ≥ 10 min left; we default to 5).
- *Refresh at the halfway point* of the validity window (certmagic, rustls), so a responder
  outage has half the window to heal before clients notice.
- *Spread a fleet*: add up to ``jitter`` × validity of random delay, so a thousand servers
  restarted together don't hit the CA in the same second.
- *Respect HTTP caching*: no point asking before ``Cache-Control: max-age`` / ``Expires`` says
  the responder has anything newer (RFC 5019 §6) - their CDN would serve the same bytes.
- *Never later than* ``stop - safety``, where safety leaves room for several retries before the
  response must stop being stapled.
- *Back off* after failures exponentially with full jitter (AWS architecture blog), capped so
  that at least ``retries_before_expiry`` retries still fit before the stop moment.

And the stapling rules a handle applies around a refresh:

- *Withhold revoked* responses only when the policy says so (:func:`withholds`).
- *One fetch per fleet*: a response another server stored is adopted, and the fetch skipped,
  unless the refresh is forced or still due (:func:`skip_fetch_after_adopting`); a server
  denied the fleet's lock looks again a little later (:func:`look_again_after`).
- *Revocation sticks*, across restarts too: a recorded revoked response is evidence as of
  when it was signed (:func:`revocation_record`), and the validator refuses a ``good`` after
  it as it does after a revoked response held in memory.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.x509 import ocsp as x509_ocsp

from .errors import BadResponseError
from .ocsp import DEFAULT_MARGIN, DEFAULT_SKEW, CertId, CertStatus, VerifiedResponse, validate

__all__ = [
    "RefreshPolicy",
    "fetch_lock_ttl",
    "http_fresh_until",
    "look_again_after",
    "next_refresh",
    "retry_delay",
    "revocation_record",
    "rollback_base",
    "skip_fetch_after_adopting",
    "stop_stapling_at",
    "withholds",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class RefreshPolicy:
    """Every knob of validation and refresh timing, with production defaults."""

    skew: timedelta = DEFAULT_SKEW
    """Tolerated clock difference for thisUpdate in the future."""
    margin: timedelta = DEFAULT_MARGIN
    """Stop stapling this long before a response expires; responses closer are refused."""
    safety: timedelta = timedelta(hours=1)
    """Refresh no later than this before the stop moment (capped at a quarter of validity)."""
    jitter: float = 0.1
    """Fraction of the validity window over which refreshes are spread after the halfway point."""
    min_interval: timedelta = timedelta(minutes=1)
    """Never schedule a refresh closer than this to the last one (HAProxy: minutes apart)."""
    backoff_base: timedelta = timedelta(seconds=30)
    backoff_max: timedelta = timedelta(hours=1)
    backoff_min: timedelta = timedelta(seconds=1)
    """Floor of a retry delay: full jitter could otherwise draw ~0 and spin."""
    retries_before_expiry: int = 4
    """Cap retries so at least this many fit between now and the stop moment."""
    fetch_timeout: float = 15.0
    """Total seconds for one fetch attempt (Windows uses 15 s)."""
    connect_timeout: float = 5.0
    max_response_size: int = 64 * 1024
    """Largest response body accepted; real responses are 0.5-3 KiB."""
    wait_timeout: float = 15.0
    """How long ``open_server_ocsp_response(wait=True)`` waits for the first response."""
    staple_revoked: bool = True
    """Staple ``revoked`` responses (clients deserve the truth); False withholds them."""
    hash_algorithm: str = "sha1"
    """CertID hash in requests; SHA-1 is what every responder answers (RFC 5019)."""

    def __post_init__(self) -> None:
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be within [0, 1], got {self.jitter}")
        if self.retries_before_expiry < 1:
            raise ValueError("retries_before_expiry must be at least 1")
        if self.max_response_size < 1024:
            raise ValueError("max_response_size below 1 KiB would refuse real responses")
        for name in ("skew", "margin", "safety", "min_interval", "backoff_base", "backoff_max"):
            if getattr(self, name) < timedelta(0):
                raise ValueError(f"{name} must not be negative")


def stop_stapling_at(resp: VerifiedResponse, policy: RefreshPolicy) -> datetime:
    """The moment a held response stops being stapled: its expiry less the margin."""
    return resp.expires - policy.margin


def withholds(resp: VerifiedResponse, policy: RefreshPolicy) -> bool:
    """Whether ``resp`` must not be stapled: it says ``revoked`` and the policy withholds
    revoked responses. By default they staple, since a client deserves the truth and a
    withheld staple looks like a responder outage; a server that would rather fail closed on
    its side (must-staple clients then refuse it) sets ``staple_revoked=False``."""
    return resp.cert_status is CertStatus.REVOKED and not policy.staple_revoked


def fetch_lock_ttl(policy: RefreshPolicy, urls: int) -> float:
    """Seconds a fleet-wide fetch lock is held at most: every responder URL may take its whole
    fetch timeout, plus a few seconds to validate and persist. Past it, a holder that died
    mid-fetch stalls nobody: the lock expires and another server fetches."""
    return policy.fetch_timeout * max(urls, 1) + 5


def look_again_after(lock_ttl: float) -> timedelta:
    """When a server denied the fleet's lock looks at the store again: the holder is fetching
    for everyone, so its response should be there soon; no later than the lock's TTL (by then
    the holder is done or dead) and no later than 10 s, so a fast fleet member's result is
    adopted quickly even when the notice that it stored one is lost."""
    return timedelta(seconds=min(lock_ttl, 10.0))


def skip_fetch_after_adopting(
    *, adopted: bool, force: bool, now: datetime, due: datetime | None
) -> bool:
    """Whether a refresh can stop at what the store held: a fleet member already stored a newer
    response (``adopted``) and that moved the next refresh past ``now``. A forced refresh
    (``handle.refresh()``) fetches anyway, since its caller asked the responder."""
    return adopted and not force and due is not None and now < due


def revocation_record(
    der: bytes,
    cert: x509.Certificate,
    issuer: x509.Certificate,
    policy: RefreshPolicy,
    *,
    expected: CertId | None = None,
    subject: str | None = None,
) -> VerifiedResponse:
    """Verify a recorded revocation (:meth:`staple.Store.get_revocation`): the revoked
    response, validated as of the moment its responder signed it (its producedAt).

    A revocation is permanent (RFC 5280 §3.3, except certificateHold), so the evidence does
    not expire with the response: held as ``current`` for :func:`staple.ocsp.validate`, it
    makes a later ``good`` a :class:`~staple.RevocationReversedError` after any restart.
    Everything else is checked as for a response (signature, signer, CertID), so a forged
    record cannot make a certificate look revoked. Raises :class:`~staple.ValidationError`
    (:class:`~staple.BadResponseError` for unreadable bytes or a record that is not revoked).
    """
    try:
        signed_at = x509_ocsp.load_der_ocsp_response(der).produced_at_utc
    except ValueError as exc:
        raise BadResponseError(f"unreadable revocation record ({exc})", subject=subject) from None
    verified = validate(
        der,
        cert,
        issuer,
        now=signed_at,
        skew=policy.skew,
        margin=timedelta(0),
        expected=expected,
        subject=subject,
    )
    if verified.cert_status is not CertStatus.REVOKED:
        raise BadResponseError("revocation record is not a revoked response", subject=subject)
    return verified


def rollback_base(
    held: VerifiedResponse | None, revoked: VerifiedResponse | None
) -> VerifiedResponse | None:
    """What a new response must not be older than, nor un-revoke: the newer of the response
    ``held`` and the ``revoked`` one recorded in the store. After a restart only the record
    may be there; in a fleet the record may be newer than what this server holds."""
    if held is None or revoked is None:
        return held or revoked
    newer = (revoked.this_update, revoked.produced_at) > (held.this_update, held.produced_at)
    return revoked if newer else held


def next_refresh(
    resp: VerifiedResponse,
    *,
    now: datetime,
    policy: RefreshPolicy,
    fresh_until: datetime | None = None,
    rand: float = 0.0,
) -> datetime:
    """When to fetch a successor for ``resp`` (held since ``now``).

    ``fresh_until`` is the HTTP freshness of the response that was fetched (see
    :func:`http_fresh_until`); ``rand`` a uniform draw in [0, 1) for the jitter.
    """
    validity = resp.expires - resp.this_update
    stop = stop_stapling_at(resp, policy)
    # Rule: refresh at the halfway point, plus jitter so a fleet spreads its load.
    when = resp.this_update + validity / 2 + validity * policy.jitter * rand
    # Rule: not before the responder's cache says anything newer exists ...
    if fresh_until is not None:
        when = max(when, fresh_until)
    # Rule: never so late that several retries no longer fit before we must stop stapling.
    latest = stop - min(policy.safety, (stop - resp.this_update) / 4)
    when = min(when, latest)
    # Rule: never in a tight loop, even past the latest point - a responder (or its CDN) that
    # keeps serving the response we hold must not be asked again at once. Short-lived
    # responses scale the interval down.
    return max(when, now + min(policy.min_interval, validity / 4))


def retry_delay(
    failures: int,
    *,
    now: datetime,
    policy: RefreshPolicy,
    held: VerifiedResponse | None = None,
    rand: float = 1.0,
) -> timedelta:
    """How long to wait after ``failures`` consecutive failed attempts (1 for the first).

    Exponential backoff with full jitter: uniform in [0, min(cap, base × 2^(failures-1))],
    floored at ``backoff_min``. While a response is held, the cap shrinks so that at least
    ``retries_before_expiry`` attempts still fit before it stops being stapled.
    """
    if failures < 1:
        raise ValueError("retry_delay is for after a failure: failures must be >= 1")
    cap = policy.backoff_max
    if held is not None:
        left = stop_stapling_at(held, policy) - now
        cap = min(cap, max(left / policy.retries_before_expiry, policy.backoff_min))
    exponent = min(failures - 1, 32)  # 2**32 × base overflows any sensible cap already
    ceiling: timedelta = min(cap, policy.backoff_base * (2**exponent))
    delay: timedelta = max(ceiling * rand, policy.backoff_min)
    return delay


_MAX_AGE = re.compile(r"(?:^|,)\s*(?:s-)?max-age\s*=\s*\"?(\d+)\"?", re.IGNORECASE)
_NO_CACHE = re.compile(r"(?:^|,)\s*no-(?:cache|store)\b", re.IGNORECASE)


def http_fresh_until(headers: Mapping[str, str], now: datetime) -> datetime | None:
    """Until when the responder's HTTP caching headers say its answer won't change.

    ``Cache-Control: max-age`` (less ``Age``) wins over ``Expires`` (RFC 9111 §5.3), and
    ``Expires`` is read relative to the response's ``Date`` so our clock's offset from the
    responder's doesn't matter. ``no-cache``/``no-store`` or unreadable values give ``None``.
    """
    control = headers.get("Cache-Control", "")
    if _NO_CACHE.search(control):
        return None
    match = _MAX_AGE.search(control)
    if match:
        age = _int_or_zero(headers.get("Age", "0"))
        return now + timedelta(seconds=max(int(match.group(1)) - age, 0))
    expires = _http_date(headers.get("Expires"))
    if expires is None:
        return None
    date = _http_date(headers.get("Date"))
    return now + (expires - date) if date is not None else expires


def _int_or_zero(value: str) -> int:
    try:
        return max(int(value.strip()), 0)
    except ValueError:
        return 0


def _http_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed if parsed.tzinfo is not None else None
