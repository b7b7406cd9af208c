"""Prometheus metrics: what a scrape of a real stapler says, over a real HTTP listener."""

from __future__ import annotations

import gc
import io
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import staple
from staple import FileStore, cli, metrics
from staple.stapler import Stapler
from staple.testing import FakeClock, Fault

from .test_serve import config_for, files, running
from .test_stapler import server_context
from .tls_pair import client_context, handshake

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
async def stapler(clock: FakeClock) -> AsyncIterator[Stapler]:
    async with Stapler(clock=clock, jitter=0.0, max_concurrent_fetches=1) as s:
        yield s


async def scrape(registry: CollectorRegistry) -> Samples:
    runner = await metrics.start_server("127.0.0.1", 0, registry=registry)
    try:
        port = runner.addresses[0][1]
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as response,
        ):
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=")
            text = await response.text()
    finally:
        await runner.cleanup()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def cert_labels(leaf) -> frozenset[tuple[str, str]]:
    return frozenset(
        {
            ("serial", f"{leaf.cert.serial_number:x}"),
            ("subject", leaf.cert.subject.rfc4514_string()),
        }
    )


async def test_a_good_response_and_its_times(stapler, pki, responder, clock) -> None:
    leaf = pki.issue_leaf("a.test", ocsp_url=responder.url)
    handle = await stapler.add(leaf.chain)
    registry = CollectorRegistry()
    metrics.register(stapler, registry=registry)
    samples = await scrape(registry)
    labels = cert_labels(leaf)
    response = handle.response
    assert response is not None
    assert samples[("staple_ocsp_response_status", labels)] == 0
    assert samples[("staple_ocsp_response_this_update_timestamp_seconds", labels)] == (
        response.this_update.timestamp()
    )
    assert samples[("staple_ocsp_response_next_update_timestamp_seconds", labels)] == (
        response.next_update.timestamp()
    )
    assert samples[("staple_ocsp_response_produced_at_timestamp_seconds", labels)] == (
        response.produced_at.timestamp()
    )
    assert samples[("staple_certificate_not_after_timestamp_seconds", labels)] == (
        leaf.cert.not_valid_after_utc.timestamp()
    )
    assert handle.next_refresh is not None
    assert samples[("staple_ocsp_next_refresh_timestamp_seconds", labels)] == (
        handle.next_refresh.timestamp()
    )
    assert samples[("staple_ocsp_consecutive_failures", labels)] == 0


async def test_revoked_is_1_and_nothing_held_is_absent(stapler, pki, responder) -> None:
    revoked = pki.issue_leaf("revoked.test", ocsp_url=responder.url)
    responder.revoke(revoked.cert)
    await stapler.add(revoked.chain)
    down = pki.issue_leaf("down.test", ocsp_url="http://127.0.0.1:9/never")
    await stapler.add(down.chain, wait=False)
    registry = CollectorRegistry()
    metrics.register(stapler, registry=registry)
    samples = await scrape(registry)
    assert samples[("staple_ocsp_response_status", cert_labels(revoked))] == 1
    assert ("staple_ocsp_response_status", cert_labels(down)) not in samples
    # The certificate is known even while no response is held.
    assert ("staple_certificate_not_after_timestamp_seconds", cert_labels(down)) in samples


async def test_handshakes_and_references_follow_connections(stapler, pki, responder) -> None:
    leaf = pki.issue_leaf("a.test", ocsp_url=responder.url)
    await stapler.add(leaf.chain)
    ctx = server_context(stapler, leaf)
    registry = CollectorRegistry()
    metrics.register(stapler, registry=registry)
    labels = cert_labels(leaf)

    servers = [handshake(ctx, client_context()[0]) for _ in range(3)]
    samples = await scrape(registry)
    assert samples[("staple_handshakes_total", frozenset({("outcome", "stapled")}))] == 3
    assert samples[("staple_handshakes_total", frozenset({("outcome", "no_staple")}))] == 0
    # Not counted here: these handshakes ran on memory BIOs, not on staple's transports.
    assert samples[("staple_handshakes_total", frozenset({("outcome", "not_requested")}))] == 0
    assert samples[("staple_context_references_live", labels)] == 3
    assert samples[("staple_contexts_live", labels)] == 1

    del servers
    gc.collect()
    samples = await scrape(registry)
    assert samples[("staple_context_references_live", labels)] == 0  # the AddRef/Free check


async def test_register_twice_on_one_registry_is_refused(stapler) -> None:
    registry = CollectorRegistry()
    metrics.register(stapler, registry=registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        metrics.register(stapler, registry=registry)


def labels_of(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


async def test_fetches_by_result_and_their_durations(clock, pki, responder) -> None:
    leaf = pki.issue_leaf("fetch.test", ocsp_url=responder.url)
    async with Stapler(clock=clock, jitter=0.0) as stapler:
        handle = await stapler.add(leaf.chain)
        responder.fault = Fault.HTTP_500
        with pytest.raises(staple.FetchError):
            await handle.refresh()
        responder.fault = Fault.WRONG_SIGNER
        with pytest.raises(staple.ValidationError):
            await handle.refresh()
        registry = CollectorRegistry()
        metrics.register(stapler, registry=registry)
        samples = await scrape(registry)
    for result in ("ok", "error", "rejected"):
        assert samples[("staple_ocsp_fetch_total", labels_of(result=result))] == 1
    assert samples[("staple_ocsp_fetch_duration_seconds_count", frozenset())] == 3
    assert samples[("staple_ocsp_fetch_duration_seconds_bucket", labels_of(le="+Inf"))] == 3
    assert handle.last_success is not None
    assert samples[("staple_ocsp_last_success_timestamp_seconds", cert_labels(leaf))] == (
        handle.last_success.timestamp()
    )
    assert samples[("staple_store_errors_total", frozenset())] == 0
    # An in-memory store is nobody else's: no fleet-lock series.
    assert not any(name.startswith("staple_fleet_lock") for name, _ in samples)


async def test_fleet_lock_and_store_errors_with_a_shared_store(clock, pki, responder, tmp_path):
    leaf = pki.issue_leaf("fleet.test", ocsp_url=responder.url)
    unwritable = tmp_path / "not-a-directory"
    unwritable.write_text("a file where the store's directory should be")
    async with Stapler(clock=clock, store=FileStore(unwritable)) as stapler:
        handle = await stapler.add(leaf.chain)
        assert handle.get_context() is not None  # stapling goes on from memory
        registry = CollectorRegistry()
        metrics.register(stapler, registry=registry)
        samples = await scrape(registry)
    assert samples[("staple_fleet_lock_total", labels_of(result="acquired"))] == 1
    assert samples[("staple_fleet_lock_total", labels_of(result="unavailable"))] == 0
    assert samples[("staple_store_errors_total", frozenset())] >= 1


# -- staple serve --metrics ------------------------------------------------------------------


async def scrape_url(url: str) -> Samples:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_serve_exposes_metrics_on_its_own_listener(pki, responder, tmp_path) -> None:
    leaf = pki.issue_leaf("metrics.serve.test", ocsp_url=responder.url)
    config = config_for(tmp_path, files(tmp_path, leaf, "leaf"), metrics=("127.0.0.1", 0))
    out = io.StringIO()
    async with running(config, out) as serving:
        line = next(x for x in out.getvalue().splitlines() if x.startswith("metrics on "))
        url = line.removeprefix("metrics on ")
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        assert not url.startswith(serving.url)  # a listener of its own, plain HTTP
        samples = await scrape_url(url)
        assert samples[("staple_ocsp_response_status", cert_labels(leaf))] == 0
        assert samples[("staple_ocsp_fetch_total", labels_of(result="ok"))] == 1
    with pytest.raises(aiohttp.ClientConnectionError):  # closed with the server
        await scrape_url(url)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--metrics", "nowhere"], "expected HOST:PORT"),
        (["--metrics", "127.0.0.1:0", "--workers", "2"], "--metrics with --workers"),
    ],
)
async def test_serve_metrics_usage_errors(tmp_path, capsys, argv, message) -> None:
    chain, key = tmp_path / "c.pem", tmp_path / "k.pem"
    code = await cli.run(["serve", "--cert", str(chain), "--key", str(key), *argv])
    assert code == 2
    assert message in capsys.readouterr().err
