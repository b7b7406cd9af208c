"""Every way a CA's OCSP responder can misbehave, driven through the refresher on a fake clock.

For each fault a handle first holds a good response G (24 h validity, fetched at t0). The fault
is switched on and the fake clock walked, attempt by attempt, from the first refresh (halfway,
~12 h) to two hours past G's stop moment (nextUpdate − margin), then the responder heals.
Each fault must give the same story:

- G, and only G, is stapled until its stop moment; from then on, nothing (one ``expired``
  event), never the faulty answer;
- every retry obeys the backoff: each delay lies within [backoff_min, min(backoff_max,
  base·2^(n−1), time-left/retries_before_expiry)], no attempt comes early, at least as many
  attempts fit before the stop moment as the policy's slowest schedule allows, and the
  responder sees at most a bounded number of HTTP requests per attempt;
- each failure is an event and a WARNING on the ``staple`` logger naming the certificate and
  the reason (the exception class and words per fault are in ``FAULTS``);
- the first attempt after the responder heals succeeds (recovery within one backoff step).

``FAULTS`` below is also the README's table (``fault_table()``): fault → what staple does.
"""

from __future__ import annotations

import asyncio
import logging
import re
import tracemalloc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import aiohttp
import pytest

import staple
from staple import EventKind, RefreshPolicy
from staple.policy import retry_delay
from staple.testing import FakeClock, Fault, Leaf, OcspResponder, TestPKI
from staple.testing._responder import GZIP_BOMB_BYTES

HOUR = 3600.0
EPS = 1e-3
POLICY = RefreshPolicy(jitter=0.0, wait_timeout=5.0, fetch_timeout=5.0, connect_timeout=2.0)
# Faults that hold a request until the fetch timeout: a short (real-time) timeout, and the
# clock walked in hourly strides rather than attempt by attempt, so they cost seconds.
SLOW_POLICY = replace(POLICY, fetch_timeout=0.25)
REFUSED = "refused"  # not a Fault: the responder is closed, nothing listens on its port


@dataclass(frozen=True)
class Expect:
    error: type[staple.OcspError] | tuple[type[staple.OcspError], ...]
    reason: str  # a regex the error's reason must match
    outcome: str  # for the README table
    requests_per_attempt: int = 2  # aiohttp retries an idempotent GET once; 404 → POST
    slow: bool = False
    kind: EventKind = EventKind.FAILED


KEEP = (
    "For every fault below but REVOKED, the last good response keeps being stapled until its "
    "margin, then nothing; retries back off; the first attempt after the responder heals "
    "succeeds; each failure is an event and a WARNING naming the certificate and the reason."
)
FAULTS: dict[Fault | str, Expect] = {
    REFUSED: Expect(
        staple.FetchError,
        r"Cannot connect|Connect call failed|refused",
        "FetchError (connection refused)",
    ),
    Fault.DOWN: Expect(
        staple.FetchError,
        r"reset by peer|disconnected",
        "FetchError (connection reset before any answer)",
    ),
    Fault.CONNECTION_RESET: Expect(
        staple.FetchError,
        r"payload is not completed|reset by peer",
        "FetchError (reset mid-body)",
    ),
    Fault.SLOW: Expect(
        staple.FetchError,
        r"timed out after 0\.25 s",
        "FetchError (total fetch timeout)",
        slow=True,
    ),
    Fault.SLOW_BODY: Expect(
        staple.FetchError,
        r"timed out after 0\.25 s",
        "FetchError (total timeout, body trickling)",
        slow=True,
    ),
    Fault.HTTP_404: Expect(staple.FetchError, r"HTTP 404", "FetchError (GET, then POST: HTTP 404)"),
    Fault.HTTP_500: Expect(staple.FetchError, r"HTTP 500", "FetchError (HTTP 500)"),
    Fault.HTTP_503: Expect(
        staple.FetchError, r"HTTP 503", "FetchError (HTTP 503; Retry-After ignored)"
    ),
    Fault.HTML_ERROR: Expect(
        staple.FetchError,
        r"content type 'text/html'",
        "FetchError (content type text/html)",
    ),
    Fault.WRONG_CONTENT_TYPE: Expect(
        staple.FetchError,
        r"content type 'text/plain'",
        "FetchError (content type text/plain, though the DER is valid)",
    ),
    Fault.GARBAGE: Expect(staple.BadResponseError, r"not a DER OCSP response", "BadResponseError"),
    Fault.TRUNCATED: Expect(
        staple.BadResponseError, r"not a DER OCSP response", "BadResponseError"
    ),
    Fault.OVERSIZE: Expect(
        staple.FetchError,
        r"exceeds the 65536-byte cap",
        "FetchError (1 MiB body > 64 KiB cap, by Content-Length)",
    ),
    Fault.GZIP_BOMB: Expect(
        staple.FetchError,
        r"exceeds the 65536-byte cap",
        "FetchError (gzip, chunked: refused after ~64 KiB inflated, peak memory < 8 MB)",
    ),
    Fault.REDIRECT_LOOP: Expect(
        staple.FetchError,
        r"too many redirects",
        "FetchError (too many redirects, max 3)",
        requests_per_attempt=4,
    ),
    Fault.REDIRECT_FILE: Expect(
        staple.FetchError,
        r"file:///etc/passwd",
        "FetchError (redirect to file: not followed)",
    ),
    Fault.REDIRECT_FTP: Expect(
        staple.FetchError,
        r"ftp://127\.0\.0\.1/ocsp",
        "FetchError (redirect to ftp: not followed)",
    ),
    Fault.TRY_LATER: Expect(staple.ResponderStatusError, r"'try_later'", "ResponderStatusError"),
    Fault.UNAUTHORIZED: Expect(
        staple.ResponderStatusError, r"'unauthorized'", "ResponderStatusError"
    ),
    Fault.MALFORMED_REQUEST: Expect(
        staple.ResponderStatusError, r"'malformed_request'", "ResponderStatusError"
    ),
    Fault.UNKNOWN: Expect(
        staple.UnknownStatusError,
        r"does not know the certificate",
        "UnknownStatusError, 'unknown' event, never stapled",
        kind=EventKind.UNKNOWN,
    ),
    Fault.EXPIRED: Expect(
        staple.ExpiredResponseError, r"less than 0:05:00 after now", "ExpiredResponseError"
    ),
    Fault.FUTURE: Expect(
        staple.NotYetValidError, r"thisUpdate .* is in the future", "NotYetValidError"
    ),
    Fault.NO_NEXT_UPDATE: Expect(
        staple.ExpiredResponseError, r"no nextUpdate", "ExpiredResponseError"
    ),
    Fault.WRONG_SIGNER: Expect(
        staple.UnauthorizedSignerError,
        r"neither the issuer nor a certificate included",
        "UnauthorizedSignerError (another CA's key)",
    ),
    Fault.SIGNER_WITHOUT_EKU: Expect(
        staple.UnauthorizedSignerError,
        r"lacks id-kp-OCSPSigning",
        "UnauthorizedSignerError (delegate without OCSPSigning EKU)",
    ),
    Fault.WRONG_CERT: Expect(
        staple.CertIdMismatchError,
        r"not about this certificate",
        "CertIdMismatchError",
    ),
    Fault.REPLAY: Expect(
        (staple.RollbackError, staple.ExpiredResponseError),
        r"older than the one held|less than 0:05:00 after now",
        "RollbackError (validly signed, but older than the one held), then "
        "ExpiredResponseError once the replayed response runs out",
    ),
}
# Not failures: what they do is tested on its own below.
OTHER_OUTCOMES: dict[Fault, str] = {
    Fault.REVOKED: "stapled (replaces good) with an ERROR 'revoked' event; withheld if "
    "staple_revoked=False",
}


def fault_table() -> str:
    """The README's fault → outcome table, in Markdown."""
    rows = [KEEP, "", "| responder fault | refused as |", "|---|---|"]
    for fault, expect in FAULTS.items():
        name = "not listening (closed)" if fault == REFUSED else f"`{Fault(fault).name}`"
        rows.append(f"| {name} | {expect.outcome} |")
    for fault, outcome in OTHER_OUTCOMES.items():
        rows.append(f"| `{fault.name}` | {outcome} |")
    return "\n".join(rows)


def test_every_fault_has_an_outcome() -> None:
    assert {f for f in FAULTS if isinstance(f, Fault)} | set(OTHER_OUTCOMES) == set(Fault)
    assert fault_table().count("\n| ") == len(FAULTS) + len(OTHER_OUTCOMES) + 1


# -- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def pki(clock: FakeClock) -> TestPKI:
    return TestPKI(now=clock.now())


@pytest.fixture
async def responder(pki: TestPKI, clock: FakeClock) -> AsyncIterator[OcspResponder]:
    async with OcspResponder(pki, clock=clock, slow_seconds=30.0) as r:
        yield r


@pytest.fixture
def leaf(pki: TestPKI, responder: OcspResponder) -> Leaf:
    return pki.issue_leaf("faults.test", ocsp_url=responder.url)


class Timeline:
    """Events with the fake time they happened at."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.events: list[tuple[float, staple.Event]] = []

    def __call__(self, event: staple.Event) -> None:
        self.events.append((self.clock.time(), event))

    def since(self, mark: int, *kinds: EventKind) -> list[tuple[float, staple.Event]]:
        """The events of these kinds from the ``mark``-th on."""
        return [(when, e) for when, e in self.events[mark:] if e.kind in kinds]


async def settle(clock: FakeClock) -> None:
    """Wait until the refresher is asleep on the fake clock again (bounded in real time)."""
    async with asyncio.timeout(10):
        await clock.wait_for_sleepers(1)


async def advance_to(clock: FakeClock, t: float) -> None:
    await settle(clock)
    if t > clock.time():
        clock.advance(t - clock.time())
    await settle(clock)


async def walk(
    handle: staple.ServerOcspResponse,
    clock: FakeClock,
    until: float,
    *,
    probes: list[float],
    stride: float | None = None,
    check: Callable[[], None],
) -> None:
    """Move the clock to each attempt (or in ``stride`` steps) and each probe, up to ``until``;
    run ``check()`` after each move, once the refresher is asleep again."""
    while clock.time() < until:
        now = clock.time()
        targets = [until, *(p for p in probes if p > now)]
        if stride is not None:
            targets.append(now + stride)
        elif handle.next_refresh is not None:
            targets.append(max(handle.next_refresh.timestamp(), now) + 1e-6)
        await advance_to(clock, min(targets))
        check()


def ceiling(n: int, at: float, held: staple.ocsp.VerifiedResponse | None) -> float:
    """The longest retry delay the policy allows after the n-th consecutive failure."""
    p = POLICY
    cap = p.backoff_max.total_seconds()
    if held is not None:
        left = (held.expires - p.margin).timestamp() - at
        cap = min(cap, max(left / p.retries_before_expiry, p.backoff_min.total_seconds()))
    exponential: float = p.backoff_base.total_seconds() * 2 ** min(n - 1, 32)
    return min(cap, exponential)


def slowest_schedule(first: float, stop: float, held: staple.ocsp.VerifiedResponse) -> int:
    """Attempts in [first, stop) if every retry waited the longest the policy allows.

    t + delay_max(n, t) never decreases as t grows, so by induction the n-th attempt of any
    jittered schedule comes no later than the n-th of this one: a lower bound on the count.
    """
    t, n = first, 0
    while t < stop:
        n += 1
        now = datetime.fromtimestamp(t, tz=held.expires.tzinfo)
        t += retry_delay(n, now=now, policy=POLICY, held=held, rand=1.0).total_seconds()
    return n


async def open_handle(leaf: Leaf, clock: FakeClock, **kw: Any) -> staple.ServerOcspResponse:
    kw.setdefault("policy", POLICY)
    return await staple.open_server_ocsp_response(leaf.chain, clock=clock, **kw)


# -- the walk through every fault -------------------------------------------------------------


# Faults whose walk waits in real time (slow bodies, timeouts, inflating): the slow marker.
_REAL_TIME = {Fault.SLOW, Fault.SLOW_BODY, Fault.GZIP_BOMB}


@pytest.mark.parametrize(
    "fault",
    [pytest.param(f, marks=pytest.mark.slow) if f in _REAL_TIME else f for f in FAULTS],
    ids=lambda f: f if isinstance(f, str) else f.value,
)
async def test_fault_keeps_last_good_backs_off_and_recovers(
    fault: Fault | str,
    leaf: Leaf,
    clock: FakeClock,
    responder: OcspResponder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="staple")
    expect = FAULTS[fault]
    timeline = Timeline(clock)
    policy = SLOW_POLICY if expect.slow else POLICY
    async with await open_handle(leaf, clock, on_update=timeline, policy=policy) as handle:
        if fault is Fault.REPLAY:  # the replayed response must be older than the one held
            await settle(clock)
            clock.advance(60)
            await handle.refresh()
            assert responder.log == [("GET", "good"), ("GET", "good")]
        good = handle.get_context()
        assert good is not None and good.cert_status is staple.CertStatus.GOOD
        good.free()
        stop = (good.expires - POLICY.margin).timestamp()
        end = stop + 2 * HOUR

        if fault == REFUSED:
            await responder.close()
        else:
            responder.fault = fault
        started, requests_before = len(timeline.events), len(responder.log)

        def check() -> None:
            ctx = handle.get_context()
            if clock.time() < stop:
                assert ctx is not None, f"lost the staple {stop - clock.time():.0f} s early"
                assert ctx.encoded == good.encoded  # the good one, never the faulty answer
                ctx.free()
            else:
                assert ctx is None, "stapled past the stop moment"
                assert handle.response is good.response  # nothing replaced it

        probes = [stop - 1, stop, stop + 1]
        await walk(
            handle,
            clock,
            end,
            probes=probes,
            stride=HOUR if expect.slow else None,
            check=check,
        )

        # Every attempt failed, for the expected reason, naming the certificate.
        attempts = timeline.since(started, EventKind.FAILED, EventKind.UNKNOWN)
        assert attempts, "the refresher never tried"
        if fault is Fault.REPLAY:  # a rollback first, until the replayed response runs out
            assert isinstance(attempts[0][1].error, staple.RollbackError)
        for _, event in attempts:
            assert event.kind is expect.kind
            assert isinstance(event.error, expect.error), event
            assert re.search(expect.reason, event.error.reason), event.error.reason
            assert event.subject == handle.subject and "faults.test" in str(event)
        assert [e.kind for _, e in timeline.since(started, EventKind.FETCHED)] == []
        expired = timeline.since(started, EventKind.EXPIRED)
        assert len(expired) == 1 and expired[0][0] >= stop

        # Backoff: each delay within the policy's bounds, no attempt before its time.
        for n, (at, event) in enumerate(attempts, start=1):
            assert event.next_refresh is not None
            delay = event.next_refresh.timestamp() - at
            held = good.response if at < stop else None
            assert POLICY.backoff_min.total_seconds() - EPS <= delay, (n, delay)
            assert delay <= max(ceiling(n, at, held), 1.0) + EPS, (n, delay)
            if n < len(attempts):
                assert attempts[n][0] >= event.next_refresh.timestamp() - EPS
        if not expect.slow:
            before_stop = sum(1 for at, _ in attempts if at < stop)
            assert before_stop >= slowest_schedule(attempts[0][0], stop, good.response)
            assert attempts[-1][1].next_refresh.timestamp() >= end - EPS  # type: ignore[union-attr]
        requests = len(responder.log) - requests_before
        if fault == REFUSED:
            assert requests == 0
        else:
            assert len(attempts) <= requests <= expect.requests_per_attempt * len(attempts)

        # One clear log line per failure, naming the certificate and the reason.
        warnings = [
            r.getMessage()
            for r in caplog.records
            if r.name == "staple" and r.levelno == logging.WARNING
        ]
        reasons = [w for w in warnings if w.startswith(f"{expect.kind.value}: {handle.subject}")]
        assert len(reasons) == len(attempts)
        assert all(re.search(expect.reason, w) for w in reasons)
        assert any(
            r.levelno == logging.ERROR and r.getMessage().startswith(f"expired: {handle.subject}")
            for r in caplog.records
        )
        assert "unexpected error" not in caplog.text

        # Recovery within one backoff step once the responder is healthy.
        if fault == REFUSED:
            await responder.start()
        responder.fault = None
        healed = len(responder.log)
        await advance_to(clock, handle.next_refresh.timestamp() + 1e-6)  # type: ignore[union-attr]
        assert responder.log[healed:] == [("GET", "good")]
        ctx = handle.get_context()
        assert ctx is not None and ctx.this_update > good.this_update
        ctx.free()
        assert handle.failures == 0 and handle.last_error is None
        assert timeline.events[-1][1].kind is EventKind.FETCHED
        assert handle._task is not None and not handle._task.done()
    assert handle.live_references == 0


async def test_recovery_mid_outage_replaces_the_good_response(leaf, clock, responder) -> None:
    """Healing before the stop moment: the next attempt's fresh response replaces G at once."""
    async with await open_handle(leaf, clock) as handle:
        good = handle.get_context()
        assert good is not None
        responder.fault = Fault.HTTP_500
        for _ in range(5):
            await advance_to(clock, handle.next_refresh.timestamp() + 1e-6)  # type: ignore[union-attr]
        assert handle.failures == 5
        still = handle.get_context()
        assert still is good
        still.free()
        responder.fault = None
        await advance_to(clock, handle.next_refresh.timestamp() + 1e-6)  # type: ignore[union-attr]
        fresh = handle.get_context()
        assert fresh is not None and fresh is not good and fresh.this_update > good.this_update
        fresh.free()
        assert good.refs == 1  # the old context lives on for its holder
        good.free()
        assert handle.failures == 0 and handle.live_contexts == 1


# -- faults with their own story --------------------------------------------------------------


@pytest.mark.parametrize("withhold", [False, True], ids=["staple_revoked", "withhold"])
async def test_revoked_replaces_good_and_is_loud(
    leaf, clock, responder, caplog, withhold: bool
) -> None:
    caplog.set_level(logging.INFO, logger="staple")
    timeline = Timeline(clock)
    policy = replace(POLICY, staple_revoked=not withhold)
    async with await open_handle(leaf, clock, on_update=timeline, policy=policy) as handle:
        good = handle.get_context()
        assert good is not None
        good.free()
        responder.fault = Fault.REVOKED
        await advance_to(clock, handle.next_refresh.timestamp() + 1e-6)  # type: ignore[union-attr]
        (_, event) = timeline.events[-1]
        assert event.kind is EventKind.REVOKED and "faults.test" in str(event)
        assert handle.response is not None
        assert handle.response.cert_status is staple.CertStatus.REVOKED
        ctx = handle.get_context()
        if withhold:
            assert ctx is None
            assert isinstance(handle.last_error, staple.CertificateRevokedError)
        else:
            assert ctx is not None and ctx.cert_status is staple.CertStatus.REVOKED
            ctx.free()
        assert handle.failures == 0  # a revocation is news, not a failure: no backoff
        assert any(
            r.levelno == logging.ERROR and r.getMessage().startswith(f"revoked: {handle.subject}")
            for r in caplog.records
        )


async def test_gzip_bomb_is_refused_without_inflating(leaf, clock, responder) -> None:
    """~100 KiB of gzip that inflate to 100 MiB: refused after the 64 KiB cap, never inflated."""
    async with await open_handle(leaf, clock) as handle:
        await settle(clock)
        clock.advance(60)
        responder.fault = Fault.GZIP_BOMB
        tracemalloc.start()
        try:
            with pytest.raises(staple.FetchError, match="exceeds the 65536-byte cap"):
                await handle.refresh()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert responder.log[-1] == ("GET", "gzip_bomb")
        assert peak < 8 << 20, f"peak {peak / 1e6:.1f} MB while refusing a gzip bomb"

    # The broken pair: a client without a cap really inflates it all (so the measure works).
    tracemalloc.start()
    try:
        async with aiohttp.ClientSession() as session, session.get(responder.url) as resp:
            assert resp.headers["Content-Encoding"] == "gzip"
            assert "Content-Length" not in resp.headers
            body = await resp.read()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(body) == GZIP_BOMB_BYTES
    del body
    assert peak >= GZIP_BOMB_BYTES


async def test_replay_of_the_held_response_is_accepted_as_the_same(leaf, clock, responder) -> None:
    """REPLAY before any newer response: the bytes held come back, which is not a rollback."""
    async with await open_handle(leaf, clock) as handle:
        held = handle.response
        assert held is not None
        responder.fault = Fault.REPLAY
        await settle(clock)
        clock.advance(60)
        await handle.refresh()
        assert responder.log[-1] == ("GET", "replay")
        assert handle.response is not None and handle.response.der == held.der


async def test_responder_serving_the_held_response_is_not_hammered(leaf, clock, responder) -> None:
    """A responder (or its CDN) that keeps serving the response we hold, past the refresh
    deadline: the refresher must keep trying at a sane pace, not spin. (It once re-fetched in
    a tight loop, ~1000 requests/s: next_refresh() returned ``now`` past ``latest``.)"""
    async with await open_handle(leaf, clock) as handle:
        good = handle.get_context()
        assert good is not None
        stop = good._stop_at
        good.free()
        responder.fault = Fault.REPLAY  # the first response signed: the one held
        await settle(clock)
        before = responder.requests
        clock.advance(stop - 1800 - clock.time())  # past latest: the refresh is due now
        await responder.wait_for_requests(before + 1)  # the refresher asks ...
        await settle(clock)  # ... and then sleeps again (a spinning one never would)
        assert responder.requests - before <= 2, f"{responder.requests - before} requests"
        assert handle.next_refresh is not None
        assert handle.next_refresh >= clock.now() + POLICY.min_interval / 2


@pytest.mark.parametrize("fault", [Fault.REDIRECT_FILE, Fault.REDIRECT_FTP])
async def test_redirect_out_of_http_says_so(leaf, clock, responder, fault: Fault) -> None:
    """The reason says it was a redirect out of HTTP, not just the target URL."""
    async with await open_handle(leaf, clock) as handle:
        await settle(clock)
        clock.advance(60)
        responder.fault = fault
        with pytest.raises(staple.FetchError) as info:
            await handle.refresh()
        assert "redirect" in info.value.reason.lower()
