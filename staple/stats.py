"""Counters a :class:`~staple.Stapler`'s handles share, for operators: how fetches went, how
long they took, how the store and the fleet lock behaved. Plain integers bumped by the
refresher (never on the handshake path); :mod:`staple.metrics` reads them at scrape time.
"""

from __future__ import annotations

import bisect

__all__ = ["DURATION_BUCKETS", "FetchStats"]

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0)
"""Upper bounds (seconds) of the fetch-duration histogram; the fetch timeout is 15 s."""


class FetchStats:
    """What a set of handles' refreshers did, since they started."""

    __slots__ = (
        "duration_count",
        "duration_counts",
        "duration_sum",
        "error",
        "lock_acquired",
        "lock_adopted",
        "lock_unavailable",
        "ok",
        "rejected",
        "store_errors",
    )

    def __init__(self) -> None:
        self.ok = 0
        """Responses fetched and valid."""
        self.error = 0
        """Fetches that failed: network, timeout, HTTP, proxy (:class:`~staple.FetchError`)."""
        self.rejected = 0
        """Responses fetched but refused by validation (:class:`~staple.ValidationError`)."""
        self.duration_counts = [0] * (len(DURATION_BUCKETS) + 1)  # the last is +Inf
        self.duration_sum = 0.0
        self.duration_count = 0
        self.store_errors = 0
        """Store reads and writes that failed (logged, never fatal)."""
        self.lock_acquired = 0
        """Attempts that held the store's fetch lock and asked the responder."""
        self.lock_adopted = 0
        """Attempts that found a fleet member's fresher response in the store instead."""
        self.lock_unavailable = 0
        """Attempts not granted the lock (another member was fetching)."""

    def fetched(self, result: str, seconds: float) -> None:
        """Count one fetch: ``result`` is ``"ok"``, ``"error"`` or ``"rejected"``."""
        setattr(self, result, getattr(self, result) + 1)
        self.duration_counts[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.duration_sum += seconds
        self.duration_count += 1

    def cumulative_buckets(self) -> list[tuple[str, int]]:
        """``(upper bound, count at or below it)`` pairs, ending with ``"+Inf"``, as
        Prometheus histograms list them."""
        total, out = 0, []
        bounds = (*map(str, DURATION_BUCKETS), "+Inf")
        for bound, count in zip(bounds, self.duration_counts, strict=True):
            total += count
            out.append((bound, total))
        return out
