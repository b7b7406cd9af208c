"""Responder fetches through HTTP forward proxies: the settings as a pure function, and real
fetches through a real ``tinyproxy``."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

import staple
from staple import cli, ocsp
from staple.errors import FetchError
from staple.fetch import fetch_response
from staple.proxy import Proxy, ProxySettings
from staple.stapler import Stapler
from staple.testing import Leaf, OcspResponder, TestPKI

from .external import require
from .proxy_server import ForwardProxy
from .redis_server import free_port

RESPONDER = "http://ocsp.example.com/"


# -- which proxy, from the environment ------------------------------------------------------


def proxy_name(env: dict[str, str], url: str = RESPONDER) -> str | None:
    proxy = ProxySettings.from_environment(env).for_url(url)
    return proxy.name if proxy is not None else None


def test_http_proxy_lower_case_wins() -> None:
    env = {"http_proxy": "http://lower:3128", "HTTP_PROXY": "http://upper:3128"}
    assert proxy_name(env) == "http://lower:3128"
    assert proxy_name({"HTTP_PROXY": "http://upper:3128"}) == "http://upper:3128"


def test_upper_case_http_proxy_is_ignored_under_cgi() -> None:
    # httpoxy: in a CGI environment HTTP_PROXY comes from the client's "Proxy:" header.
    env = {"HTTP_PROXY": "http://attacker:3128", "REQUEST_METHOD": "GET"}
    assert proxy_name(env) is None
    assert proxy_name({**env, "http_proxy": "http://ours:3128"}) == "http://ours:3128"


def test_scheme_specific_then_all_proxy() -> None:
    env = {"https_proxy": "http://secure:3128", "ALL_PROXY": "http://all:3128"}
    assert proxy_name(env, "https://ocsp.example.com/") == "http://secure:3128"
    assert proxy_name(env, "http://ocsp.example.com/") == "http://all:3128"
    assert proxy_name({}, "http://ocsp.example.com/") is None


def test_host_port_without_scheme_is_an_http_proxy() -> None:
    assert proxy_name({"http_proxy": "proxy.corp:8080"}) == "http://proxy.corp:8080"


@pytest.mark.parametrize(
    ("no_proxy", "url", "direct"),
    [
        ("example.com", "http://ocsp.example.com/", True),
        (".example.com", "http://example.com/", True),
        ("example.com", "http://example.com:8080/", True),
        ("ocsp.example.com:80", "http://ocsp.example.com/", True),
        ("example.com", "http://notexample.com/", False),
        ("other.org, example.com", "http://a.b.example.com/", True),
        ("*", "http://anything.test/", True),
        ("10.0.0.0/8", "http://10.1.2.3/", True),
        ("10.0.0.0/8", "http://11.1.2.3/", False),
        ("127.0.0.1", "http://127.0.0.1:8080/", True),
        ("::1", "http://[::1]:8080/", True),
        ("", "http://ocsp.example.com/", False),
    ],
)
def test_no_proxy(no_proxy: str, url: str, direct: bool) -> None:
    env = {"http_proxy": "http://proxy:3128", "NO_PROXY": no_proxy}
    assert (proxy_name(env, url) is None) is direct


def test_credentials_never_in_the_name() -> None:
    settings = ProxySettings.resolve("http://alice:s3cret@proxy.corp:3128")
    proxy = settings.for_url(RESPONDER)
    assert proxy is not None
    assert proxy.url.password == "s3cret"  # sent to the proxy ...
    assert "s3cret" not in proxy.name  # ... and shown nowhere
    assert "s3cret" not in str(proxy) and "s3cret" not in repr(proxy)
    assert "s3cret" not in repr(settings)


def test_explicit_option_beats_the_environment_and_false_disables() -> None:
    env = {"http_proxy": "http://env:3128"}
    assert ProxySettings.resolve(None, environ=env).for_url(RESPONDER) is not None
    assert ProxySettings.resolve(False, environ=env).for_url(RESPONDER) is None
    chosen = ProxySettings.resolve("http://chosen:1", environ=env).for_url(RESPONDER)
    assert chosen is not None and chosen.name == "http://chosen:1"


@pytest.mark.parametrize("bad", ["socks5://proxy:1080", "https://proxy:443", "http://"])
def test_unusable_proxy_url_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not an http:// proxy URL"):
        ProxySettings.resolve(bad)


# -- real fetches through tinyproxy -----------------------------------------------------------


@pytest.fixture
def tinyproxy() -> str:
    return require("tinyproxy")


@pytest.fixture
def open_proxy(tinyproxy: str, tmp_path: Path) -> Iterator[ForwardProxy]:
    with ForwardProxy(tinyproxy, tmp_path / "open") as proxy:
        yield proxy


@pytest.fixture
def auth_proxy(tinyproxy: str, tmp_path: Path) -> Iterator[ForwardProxy]:
    with ForwardProxy(tinyproxy, tmp_path / "auth", user="alice", password="s3cret") as proxy:
        yield proxy


@pytest.fixture
def leaf(pki: TestPKI, responder: OcspResponder) -> Leaf:
    return pki.issue_leaf("proxied.test", ocsp_url=responder.url)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def fetch(session: aiohttp.ClientSession, leaf: Leaf, url: str, proxy: Proxy | None):
    return await fetch_response(
        session,
        url,
        ocsp.build_request(leaf.cert, leaf.chain[1]),
        timeout=10,
        connect_timeout=5,
        max_size=64 * 1024,
        proxy=proxy,
    )


def proxy(url: str) -> Proxy:
    found = ProxySettings.resolve(url).for_url(RESPONDER)
    assert found is not None
    return found


async def test_fetch_goes_through_the_proxy(session, leaf, responder, open_proxy, clock) -> None:
    before = responder.requests
    fetched = await fetch(session, leaf, responder.url, proxy(open_proxy.url))
    assert ocsp.validate(fetched.der, leaf.cert, leaf.chain[1], now=clock.now())
    assert responder.requests == before + 1
    assert open_proxy.requests() == 1  # it went through the proxy ...
    await fetch(session, leaf, responder.url, None)
    assert open_proxy.requests() == 1  # ... and without one it does not


async def test_proxy_credentials_are_sent(session, leaf, responder, auth_proxy) -> None:
    fetched = await fetch(session, leaf, responder.url, proxy(auth_proxy.url))
    assert fetched.der
    assert auth_proxy.requests() == 1


async def test_refusing_proxy_names_the_proxy_not_the_secret(
    session, leaf, responder, auth_proxy
) -> None:
    wrong = auth_proxy.url.replace("s3cret", "wr0ng-secret")
    with pytest.raises(FetchError) as caught:
        await fetch(session, leaf, responder.url, proxy(wrong))
    message = str(caught.value)
    assert "HTTP 401" in message or "HTTP 407" in message  # tinyproxy: 401 for a wrong password
    assert f"via proxy http://127.0.0.1:{auth_proxy.port}" in message
    assert "wr0ng-secret" not in message and "alice" not in message
    assert responder.requests == 0


async def test_dead_proxy_is_a_fetch_error_naming_it(session, leaf, responder) -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(FetchError) as caught:
        await fetch(session, leaf, responder.url, proxy(f"http://bob:hunter2@127.0.0.1:{port}"))
    message = str(caught.value)
    assert f"via proxy http://127.0.0.1:{port}" in message
    assert "cannot connect to the proxy" in message
    assert "hunter2" not in message and "bob" not in message
    assert responder.requests == 0


# -- the handle, the Stapler and the command through the proxy --------------------------------


async def test_stapler_follows_the_environment(monkeypatch, pki, responder, open_proxy) -> None:
    monkeypatch.setenv("http_proxy", open_proxy.url)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    leaf = pki.issue_leaf("env.test", ocsp_url=responder.url)
    async with Stapler() as stapler:
        handle = await stapler.add(leaf.chain)
        assert handle.get_context() is not None
    assert open_proxy.requests() == 1
    monkeypatch.setenv("no_proxy", "localhost,127.0.0.0/8")  # the responder is reached directly
    async with Stapler() as stapler:
        handle = await stapler.add(leaf.chain)
        assert handle.get_context() is not None
    assert open_proxy.requests() == 1


async def test_proxy_false_ignores_the_environment(monkeypatch, pki, responder, open_proxy):
    monkeypatch.setenv("http_proxy", open_proxy.url)
    leaf = pki.issue_leaf("direct.test", ocsp_url=responder.url)
    async with Stapler(proxy=False) as stapler:
        await stapler.add(leaf.chain)
    assert open_proxy.requests() == 0
    assert responder.requests == 1


async def test_credentials_stay_out_of_events_and_logs(pki, responder, caplog) -> None:
    port = free_port()  # a dead proxy
    events: list[staple.Event] = []
    leaf = pki.issue_leaf("secret.test", ocsp_url=responder.url)
    async with Stapler(proxy=f"http://bob:hunter2@127.0.0.1:{port}", on_update=events.append) as s:
        handle = await s.add(leaf.chain)
        assert handle.get_context() is None
        assert f"via proxy http://127.0.0.1:{port}" in str(handle.last_error)
    assert events and caplog.records
    for text in [*map(str, events), caplog.text, str(handle.last_error)]:
        assert "hunter2" not in text and "bob" not in text


async def test_check_command_through_a_proxy(pki, responder, open_proxy, tmp_path) -> None:
    leaf = pki.issue_leaf("cli.test", ocsp_url=responder.url)
    leaf.write_chain(tmp_path / "chain.pem")
    out = io.StringIO()
    argv = ["check", str(tmp_path / "chain.pem"), "--proxy", open_proxy.url, "--timeout", "5"]
    assert await cli.run(argv, out=out) == 0
    assert open_proxy.requests() == 1
    dead = f"http://127.0.0.1:{free_port()}"
    out = io.StringIO()
    argv = ["check", str(tmp_path / "chain.pem"), "--proxy", dead, "--timeout", "5"]
    assert await cli.run(argv, out=out) == 4
    assert f"via proxy {dead}" in out.getvalue()
    assert await cli.run(["check", str(tmp_path / "chain.pem"), "--proxy", "socks5://x:1"]) == 2
