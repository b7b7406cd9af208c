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
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from .ocsp import DEFAULT_MARGIN, DEFAULT_SKEW, VerifiedResponse

__all__ = ["RefreshPolicy", "http_fresh_until", "next_refresh", "retry_delay", "stop_stapling_at"]


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
