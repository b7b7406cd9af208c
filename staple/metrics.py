"""Prometheus metrics for a :class:`~staple.Stapler` (the ``ocsp-staple[metrics]`` extra).

A collector reads the stapler's handles when Prometheus scrapes: nothing is recorded on the
handshake path beyond the integer counters the OCSP callback already keeps. Names follow the
Prometheus conventions and what ssl_exporter, cert-manager and Envoy publish; per-certificate
series carry the labels ``serial`` (lower-case hex) and ``subject`` (RFC 4514)::

    from prometheus_client import REGISTRY
    staple.metrics.register(stapler)                 # or register(stapler, registry=...)
    app.router.add_get("/metrics", staple.metrics.handler())

``staple serve --metrics HOST:PORT`` serves the same on a separate plain-HTTP listener.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from .ocsp import CertStatus
from .store import MemoryStore

if TYPE_CHECKING:
    from .handle import ServerOcspResponse
    from .stapler import Stapler

__all__ = ["STATUS_VALUES", "StaplerCollector", "handler", "register", "start_server"]

STATUS_VALUES = {CertStatus.GOOD: 0, CertStatus.REVOKED: 1, CertStatus.UNKNOWN: 2}
"""``staple_ocsp_response_status``: 0 good, 1 revoked, 2 unknown."""

_LABELS = ("serial", "subject")


def _labels(handle: ServerOcspResponse) -> list[str]:
    return [f"{handle.cert.serial_number:x}", handle.cert.subject.rfc4514_string()]


class StaplerCollector(Collector):
    """Exports the state of every handle of ``stapler`` at scrape time."""

    def __init__(self, stapler: Stapler) -> None:
        self._stapler = stapler

    def describe(self) -> Iterable[Metric]:
        return list(self.collect())

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        for handle in list(self._stapler.handles):
            self._add_handle(families, handle)
        self._add_stapler(families)
        yield from families.values()
        yield from self._fetch_families()

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily | CounterMetricFamily]:
        def gauge(name: str, doc: str, labels: Iterable[str] = _LABELS) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=list(labels))

        families: list[GaugeMetricFamily | CounterMetricFamily] = [
            gauge(
                "staple_ocsp_response_status",
                "Status of the held OCSP response: 0 good, 1 revoked, 2 unknown.",
            ),
            gauge(
                "staple_ocsp_response_this_update_timestamp_seconds",
                "thisUpdate of the held OCSP response.",
            ),
            gauge(
                "staple_ocsp_response_next_update_timestamp_seconds",
                "nextUpdate of the held OCSP response.",
            ),
            gauge(
                "staple_ocsp_response_produced_at_timestamp_seconds",
                "producedAt of the held OCSP response.",
            ),
            gauge(
                "staple_ocsp_response_stop_stapling_timestamp_seconds",
                "When the held response stops being stapled (its expiry less the margin).",
            ),
            gauge(
                "staple_certificate_not_after_timestamp_seconds",
                "notAfter of the certificate.",
            ),
            gauge(
                "staple_ocsp_next_refresh_timestamp_seconds",
                "When the refresher next asks the responder.",
            ),
            gauge(
                "staple_ocsp_last_success_timestamp_seconds",
                "When a responder last gave a valid response.",
            ),
            gauge(
                "staple_ocsp_consecutive_failures",
                "Refresh attempts failed in a row (0 after a success).",
            ),
            gauge(
                "staple_contexts_live",
                "Response contexts alive: the current one plus replaced ones still referenced.",
            ),
            gauge(
                "staple_context_references_live",
                "References to response contexts handed to connections and not yet freed.",
            ),
            CounterMetricFamily(
                "staple_handshakes",
                "Handshakes by outcome: stapled, no_staple (asked, none held), refused (asked, "
                "none held, must-staple policy), not_requested (did not ask; counted on "
                "staple's own TLS transports).",
                labels=["outcome"],
            ),
        ]
        return {family.name: family for family in families}

    @staticmethod
    def _add_handle(
        families: dict[str, GaugeMetricFamily | CounterMetricFamily], handle: ServerOcspResponse
    ) -> None:
        labels = _labels(handle)

        def put(name: str, value: float) -> None:
            families[name].add_metric(labels, value)

        response = handle.response
        if response is not None:
            put("staple_ocsp_response_status", STATUS_VALUES[response.cert_status])
            put(
                "staple_ocsp_response_this_update_timestamp_seconds",
                response.this_update.timestamp(),
            )
            put(
                "staple_ocsp_response_next_update_timestamp_seconds",
                response.next_update.timestamp(),
            )
            put(
                "staple_ocsp_response_produced_at_timestamp_seconds",
                response.produced_at.timestamp(),
            )
            put(
                "staple_ocsp_response_stop_stapling_timestamp_seconds",
                (response.expires - handle.policy.margin).timestamp(),
            )
        put(
            "staple_certificate_not_after_timestamp_seconds",
            handle.cert.not_valid_after_utc.timestamp(),
        )
        if handle.next_refresh is not None:
            put("staple_ocsp_next_refresh_timestamp_seconds", handle.next_refresh.timestamp())
        if handle.last_success is not None:
            put("staple_ocsp_last_success_timestamp_seconds", handle.last_success.timestamp())
        put("staple_ocsp_consecutive_failures", handle.failures)
        put("staple_contexts_live", handle.live_contexts)
        put("staple_context_references_live", handle.live_references)

    def _add_stapler(self, families: dict[str, GaugeMetricFamily | CounterMetricFamily]) -> None:
        s = self._stapler
        handshakes = families["staple_handshakes"]
        handshakes.add_metric(["stapled"], s.stapled)
        handshakes.add_metric(["no_staple"], s.unstapled - s.refused)
        handshakes.add_metric(["not_requested"], s.not_requested)
        handshakes.add_metric(["refused"], s.refused)

    def _fetch_families(self) -> Iterator[Metric]:
        stats = self._stapler.stats
        fetches = CounterMetricFamily(
            "staple_ocsp_fetch",
            "Responder fetches by result: ok (valid), error (network, HTTP, proxy), "
            "rejected (refused by validation).",
            labels=["result"],
        )
        for result in ("ok", "error", "rejected"):
            fetches.add_metric([result], getattr(stats, result))
        yield fetches
        yield HistogramMetricFamily(
            "staple_ocsp_fetch_duration_seconds",
            "Time one responder fetch took, validation included.",
            buckets=stats.cumulative_buckets(),
            sum_value=stats.duration_sum,
        )
        yield CounterMetricFamily(
            "staple_store_errors",
            "Store reads and writes that failed (logged; stapling goes on from memory).",
            value=stats.store_errors,
        )
        if not isinstance(self._stapler.store, MemoryStore):  # a store others may share
            lock = CounterMetricFamily(
                "staple_fleet_lock",
                "Refresh attempts by what the store's fetch lock gave: acquired (this server "
                "fetched), adopted (a member's response was there), unavailable (a member "
                "was fetching).",
                labels=["result"],
            )
            lock.add_metric(["acquired"], stats.lock_acquired)
            lock.add_metric(["adopted"], stats.lock_adopted)
            lock.add_metric(["unavailable"], stats.lock_unavailable)
            yield lock


def register(stapler: Stapler, *, registry: CollectorRegistry = REGISTRY) -> StaplerCollector:
    """Register a :class:`StaplerCollector` for ``stapler`` with ``registry`` (the default
    one unless given); returns it, for ``registry.unregister()``."""
    collector = StaplerCollector(stapler)
    registry.register(collector)
    return collector


def handler(
    registry: CollectorRegistry = REGISTRY,
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An aiohttp handler serving ``registry`` in Prometheus' text format."""

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return metrics


async def start_server(
    host: str | None = None,
    port: int | None = None,
    *,
    registry: CollectorRegistry = REGISTRY,
    sock: socket.socket | None = None,
) -> web.AppRunner:
    """Serve ``/metrics`` over plain HTTP on ``host:port`` (or on a listening ``sock``);
    ``await runner.cleanup()`` stops it. The bound port is ``runner.addresses[0][1]``."""
    app = web.Application()
    app.router.add_get("/metrics", handler(registry))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.SockSite(runner, sock) if sock is not None else web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
