"""``staple probe`` against in-process ``staple.tls`` servers: a good, a revoked, an unstapled
and a wrongly stapled server, and the ways a connection can fail (exit codes 0-4)."""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import pytest
from OpenSSL import SSL

from staple import RefreshPolicy, cli, tls
from staple.probe import parse_target, probe
from staple.server_context import build_server_context
from staple.stapler import Stapler
from staple.testing import Fault, Leaf, TestPKI

pytestmark = pytest.mark.real_clock

HOST = "127.0.0.1"
POLICY = RefreshPolicy(wait_timeout=5.0, fetch_timeout=5.0, connect_timeout=2.0)


async def say_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"hello\n")
    writer.close()


@asynccontextmanager
async def tls_server(ctx: SSL.Context) -> AsyncIterator[int]:
    server = await tls.start_server(say_hello, HOST, 0, ssl_context=ctx)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def stapling_server(*leaves: Leaf) -> AsyncIterator[int]:
    """A staple.tls server whose Stapler fetched a response for each leaf."""
    async with Stapler(policy=POLICY) as stapler:
        for leaf in leaves:
            await stapler.add(leaf.chain)
        ctx = build_server_context([(leaf.chain_pem, leaf.key_pem) for leaf in leaves], stapler)
        async with tls_server(ctx) as port:
            yield port


def fixed_staple_context(leaf: Leaf, staple: bytes, *, send_chain: bool = True) -> SSL.Context:
    """A server context stapling ``staple`` whatever it is (b"": no OCSP callback at all)."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    if send_chain:
        leaf.configure_pyopenssl(ctx)
    else:
        ctx.use_certificate(leaf.cert)
        ctx.use_privatekey(leaf.key)
    if staple:
        ctx.set_ocsp_server_callback(lambda conn, data: staple)
    return ctx


async def cli_probe(port: int, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    code = await cli.run(["probe", f"{HOST}:{port}", *args], out=out)
    return code, out.getvalue()


# -- exit codes by what the server staples ------------------------------------------------------


@pytest.mark.parametrize("version", ["1.2", "1.3"])
async def test_good_staple(pki, responder, ca_file, version) -> None:
    leaf = pki.issue_leaf("good.probe.test", ocsp_url=responder.url)
    async with stapling_server(leaf) as port:
        result = await probe(
            HOST, port, servername="good.probe.test", cafile=ca_file, version=version
        )
    assert result.code == 0, result.lines()
    assert result.status == "good"
    assert result.protocol == f"TLSv{version}"
    assert result.chain_verified is True
    assert result.leaf == leaf.cert and len(result.chain) == 2
    assert result.remaining is not None and result.remaining > timedelta(hours=23)
    assert result.lines()[-1].split() == ["result:", "verified", "good", "staple", "(exit", "0)"]


async def test_good_staple_cli_text_and_json(pki, responder, ca_file) -> None:
    leaf = pki.issue_leaf("cli.probe.test", key_type="rsa", ocsp_url=responder.url)
    async with stapling_server(leaf) as port:
        code, text = await cli_probe(port, "--servername", "cli.probe.test", "--tls1_2")
        assert code == 0, text
        code, js = await cli_probe(port, "--servername", "cli.probe.test", "--json")
    assert "status:" in text and "good" in text and "remaining:" in text
    assert "not verified (no --cafile)" in text and "[RSA 2048]" in text
    assert "TLSv1.2" in text
    info = json.loads(js)
    assert code == 0 and info["exit_code"] == 0
    assert info["status"] == "good" and info["stapled"] is True
    assert info["chain_verified"] is None and info["signer"].endswith("(issuer)")


async def test_revoked_staple(pki, responder) -> None:
    leaf = pki.issue_leaf("revoked.probe.test", ocsp_url=responder.url)
    responder.revoke(leaf)
    async with stapling_server(leaf) as port:
        result = await probe(HOST, port, servername="revoked.probe.test")
        code, text = await cli_probe(port, "--servername", "revoked.probe.test")
    assert result.code == code == 1
    assert result.status == "revoked" and result.response is not None
    assert result.response.revocation_time is not None
    assert "REVOKED" in text and "revocation time:" in text


async def test_no_staple(pki, responder) -> None:
    leaf = pki.issue_leaf("plain.probe.test", ocsp_url=responder.url)
    async with tls_server(fixed_staple_context(leaf, b"")) as port:
        result = await probe(HOST, port, servername="plain.probe.test")
        code, text = await cli_probe(port, "--servername", "plain.probe.test")
    assert result.code == code == 3
    assert result.staple == b"" and result.status is None
    assert re.search(r"^staple: +none$", text, re.M)


async def test_stapler_without_a_response(pki, responder) -> None:
    """A real Stapler whose responder is down staples nothing: 3, not a connection error."""
    leaf = pki.issue_leaf("down.probe.test", ocsp_url=responder.url)
    responder.fault = Fault.DOWN
    async with Stapler(policy=RefreshPolicy(wait_timeout=0.2, fetch_timeout=1.0)) as stapler:
        await stapler.add(leaf.chain)
        ctx = build_server_context([(leaf.chain_pem, leaf.key_pem)], stapler)
        async with tls_server(ctx) as port:
            result = await probe(HOST, port, servername="down.probe.test")
    assert result.code == 3


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (Fault.WRONG_SIGNER, "neither the issuer"),
        (Fault.SIGNER_WITHOUT_EKU, "lacks id-kp-OCSPSigning"),
        (Fault.EXPIRED, "expires"),
        (Fault.FUTURE, "in the future"),
        (Fault.UNKNOWN, "does not know the certificate"),
        (Fault.TRY_LATER, "try_later"),
    ],
    ids=lambda v: v.value if isinstance(v, Fault) else "",
)
async def test_invalid_staple(pki, responder, fault: Fault, reason: str) -> None:
    """A server stapling whatever it was given: each broken response is exit 4, with why."""
    leaf = pki.issue_leaf("bad.probe.test", ocsp_url=responder.url)
    responder.fault = fault
    staple = responder.response_for(leaf)
    async with tls_server(fixed_staple_context(leaf, staple)) as port:
        result = await probe(HOST, port, servername="bad.probe.test")
    assert result.code == 4, result.lines()
    assert result.verdict == "invalid staple"
    assert reason.lower() in (result.error or "").lower()


async def test_garbage_staple(pki, responder) -> None:
    leaf = pki.issue_leaf("junk.probe.test", ocsp_url=responder.url)
    # responseStatus successful but no responseBytes, then junk: OpenSSL parses what it can
    # and staples that (without the junk); it is still no response.
    staple = b"\x30\x03\x0a\x01\x00garbage"
    async with tls_server(fixed_staple_context(leaf, staple)) as port:
        result = await probe(HOST, port, servername="junk.probe.test")
    assert result.code == 4 and result.staple == staple[:5]
    assert "not a DER OCSP response" in (result.error or "")


async def test_staple_about_another_certificate_never_arrives(pki, responder) -> None:
    """OpenSSL 4 (the server side here) drops a staple whose CertID is not the served
    certificate's: the client sees no staple at all."""
    leaf = pki.issue_leaf("mine.probe.test", ocsp_url=responder.url)
    other = pki.issue_leaf("theirs.probe.test", ocsp_url=responder.url)
    async with tls_server(fixed_staple_context(leaf, responder.response_for(other))) as port:
        result = await probe(HOST, port, servername="mine.probe.test")
    assert result.code == 3


async def test_server_sends_only_the_leaf(pki, responder, tmp_path) -> None:
    leaf = pki.issue_leaf("lonely.probe.test", ocsp_url=responder.url)
    ctx = fixed_staple_context(leaf, responder.response_for(leaf), send_chain=False)
    both = tmp_path / "root-and-intermediate.pem"
    both.write_bytes(pki.ca_bundle_pem + pki.intermediate.cert_pem)
    async with tls_server(ctx) as port:
        alone = await probe(HOST, port, servername="lonely.probe.test")
        helped = await probe(HOST, port, servername="lonely.probe.test", cafile=both)
    assert alone.code == 4 and alone.verdict == "staple not verifiable"
    assert "sent only its leaf" in " ".join(alone.notes)
    assert "pass it with --cafile" in (alone.error or "")
    # With the intermediate in --cafile, the chain verifies and so does the staple.
    assert helped.code == 0, helped.lines()
    assert "sent only its leaf" in " ".join(helped.notes)


# -- connection problems: exit 2 ---------------------------------------------------------------


async def test_connection_refused() -> None:
    server = await asyncio.start_server(say_hello, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    result = await probe(HOST, port)
    assert result.code == 2 and "refused" in (result.error or "")


async def test_timeout() -> None:
    """A server that accepts and never speaks: the probe gives up after ``timeout``."""
    silent: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)

    server = await asyncio.start_server(hold, HOST, 0)
    try:
        port = server.sockets[0].getsockname()[1]
        result = await probe(HOST, port, timeout=0.3)
    finally:
        for writer in silent:
            writer.close()
        server.close()
        await server.wait_closed()
    assert result.code == 2 and "no answer within 0.3 s" in (result.error or "")


async def test_not_tls() -> None:
    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(http, HOST, 0)
    try:
        result = await probe(HOST, server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()
    assert result.code == 2 and "TLS handshake" in (result.error or "")


async def test_cafile_of_another_pki_and_wrong_name(pki, responder, tmp_path) -> None:
    leaf = pki.issue_leaf("named.probe.test", ocsp_url=responder.url)
    stranger = tmp_path / "stranger.pem"
    TestPKI().write_ca_bundle(stranger)
    mine = tmp_path / "mine.pem"
    pki.write_ca_bundle(mine)
    async with stapling_server(leaf) as port:
        foreign = await probe(HOST, port, servername="named.probe.test", cafile=stranger)
        misnamed = await probe(HOST, port, servername="other.probe.test", cafile=mine)
        right = await probe(HOST, port, servername="named.probe.test", cafile=mine)
    assert foreign.code == 2 and foreign.chain_verified is False
    assert "unable to get local issuer certificate" in (foreign.error or "")
    assert misnamed.code == 2 and "not valid for 'other.probe.test'" in (misnamed.error or "")
    assert right.code == 0


async def test_usage_errors(tmp_path) -> None:
    assert await cli.run(["probe", "host:notaport"], out=io.StringIO()) == 2
    assert await cli.run(["probe", "h:1", "--tls1_2", "--tls1_3"], out=io.StringIO()) == 2
    result = await probe(HOST, 1, cafile=tmp_path / "missing.pem")
    assert result.code == 2 and "--cafile" in (result.error or "")


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("example.com:8443", ("example.com", 8443)),
        ("example.com", ("example.com", 443)),
        ("[::1]:4433", ("::1", 4433)),
        ("[::1]", ("::1", 443)),
        ("::1", ("::1", 443)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
    ],
)
def test_parse_target(target: str, expected: tuple[str, int]) -> None:
    assert parse_target(target) == expected


@pytest.mark.parametrize("target", ["host:0", "host:65536", ":443", "[::1", "[::1]x", "a:b:c"])
def test_parse_target_refuses(target: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the messages are tested via the CLI
        parse_target(target)
