"""The TLS settings of the contexts staple builds: Mozilla's intermediate and modern profiles.

Every forbidden suite, group and version is offered alone by a real client and must be refused
by the server on the ClientHello; every allowed one must complete a handshake and staple, with
RSA and ECDSA certificates for the same name on one context. First pyOpenSSL clients on memory
BIOs (every knob, no processes), then ``openssl s_client``, ``curl --cert-status`` and
``gnutls-cli --ocsp`` over 127.0.0.1 (marked ``external``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from OpenSSL import SSL
from OpenSSL._util import lib

import staple
from staple import ocsp
from staple.server_context import TLSProfile, build_server_context, new_context
from staple.stapler import Stapler
from staple.testing import FakeClock, Leaf, OcspResponder, TestPKI

from .external import require
from .test_serve import run_tool, serve_process, served_certificate, staple_serial
from .tls_pair import client_context, handshake

HOST = "127.0.0.1"
NAME = "dual.test"

INTERMEDIATE_TLS12 = [
    ("ECDHE-ECDSA-AES128-GCM-SHA256", "ec"),
    ("ECDHE-RSA-AES128-GCM-SHA256", "rsa"),
    ("ECDHE-ECDSA-AES256-GCM-SHA384", "ec"),
    ("ECDHE-RSA-AES256-GCM-SHA384", "rsa"),
    ("ECDHE-ECDSA-CHACHA20-POLY1305", "ec"),
    ("ECDHE-RSA-CHACHA20-POLY1305", "rsa"),
]
TLS13_SUITES = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]
# What OpenSSL's defaults allowed before (sslyze: "supported, but should be rejected").
FORBIDDEN_TLS12 = [
    "AES128-SHA",  # TLS_RSA_*: static RSA key exchange, no forward secrecy
    "AES256-SHA",
    "AES128-SHA256",
    "AES256-SHA256",
    "AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "ECDHE-ECDSA-AES128-SHA",  # CBC
    "ECDHE-RSA-AES128-SHA",
    "ECDHE-ECDSA-AES256-SHA",
    "ECDHE-RSA-AES256-SHA",
    "ECDHE-ECDSA-AES128-SHA256",
    "ECDHE-RSA-AES128-SHA256",
    "ECDHE-ECDSA-AES256-SHA384",
    "ECDHE-RSA-AES256-SHA384",
    "DHE-RSA-AES128-GCM-SHA256",  # in Mozilla's list, but we set up no DH parameters
]
GROUPS = {"X25519": "x25519", "P-256": "secp256r1", "P-384": "secp384r1"}
FORBIDDEN_GROUPS = ["X448", "P-521", "ffdhe2048"]
VERSIONS = {"tls1.2": SSL.TLS1_2_VERSION, "tls1.3": SSL.TLS1_3_VERSION}


@dataclass
class Served:
    stapler: Stapler
    rsa: Leaf
    ec: Leaf
    other: Leaf  # another name, on its own SNI context

    def context(self, **options: object) -> SSL.Context:
        certs = [(leaf.chain_pem, leaf.key_pem) for leaf in (self.ec, self.rsa, self.other)]
        return build_server_context(certs, self.stapler, **options)  # type: ignore[arg-type]


@pytest.fixture
async def served(pki: TestPKI, responder: OcspResponder, clock: FakeClock) -> AsyncIterator[Served]:
    async with Stapler(clock=clock) as stapler:
        leaves = [
            pki.issue_leaf(NAME, key_type="rsa", ocsp_url=responder.url),
            pki.issue_leaf(NAME, key_type="ec", ocsp_url=responder.url),
            pki.issue_leaf("other.test", ocsp_url=responder.url),
        ]
        for leaf in leaves:
            await stapler.add(leaf.chain)
        yield Served(stapler, *leaves)


def _set_groups(ctx: SSL.Context, groups: str) -> None:
    assert lib.SSL_CTX_set1_curves_list(ctx._context, groups.encode()) == 1


def client(
    *,
    version: int | None = None,
    ciphers: str | None = None,
    suites: str | None = None,
    groups: str | None = None,
) -> tuple[SSL.Context, list[bytes]]:
    """A pyOpenSSL client asking for a staple and offering only what it is told to."""
    ctx, seen = client_context(version=version)
    if ciphers is not None:
        ctx.set_cipher_list(ciphers.encode())
    if suites is not None:
        ctx.set_tls13_ciphersuites(suites.encode())
    if groups is not None:
        _set_groups(ctx, groups)
    return ctx, seen


def server_refuses(
    server_ctx: SSL.Context, client_ctx: SSL.Context, *, servername: str = NAME
) -> None:
    """The client's first flight is sent; the *server* must fail on it (not the client)."""
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    conn = SSL.Connection(client_ctx, None)
    conn.set_connect_state()
    conn.set_tlsext_host_name(servername.encode())
    conn.request_ocsp()
    with pytest.raises(SSL.WantReadError):
        conn.do_handshake()  # the ClientHello is written: the client had something to offer
    server.bio_write(conn.bio_read(65536))
    with pytest.raises(SSL.Error) as refused:
        server.do_handshake()
    # WantReadError is an SSL.Error too: it means the server answered and waits for more.
    assert not isinstance(refused.value, SSL.WantReadError), "the server accepted the ClientHello"


def staple_of(seen: list[bytes], leaf: Leaf, clock: FakeClock) -> ocsp.VerifiedResponse:
    assert len(seen) == 1 and seen[0], seen
    return ocsp.validate(seen[0], leaf.cert, leaf.chain[1], now=clock.now())


# -- intermediate (the default) ---------------------------------------------------------------


@pytest.mark.parametrize(("cipher", "key_type"), INTERMEDIATE_TLS12)
async def test_intermediate_tls12_suites_staple(served, clock, cipher, key_type) -> None:
    """Each allowed TLS 1.2 suite completes, picks the certificate its signature needs from
    the two on the context, and staples that certificate's response."""
    ctx, seen = client(version=SSL.TLS1_2_VERSION, ciphers=cipher)
    server = handshake(served.context(), ctx, servername=NAME.encode())
    assert server.get_cipher_name() == cipher
    leaf = served.ec if key_type == "ec" else served.rsa
    assert server.get_certificate(as_cryptography=True) == leaf.cert
    assert staple_of(seen, leaf, clock).cert_status is staple.CertStatus.GOOD


@pytest.mark.parametrize("suite", TLS13_SUITES)
@pytest.mark.parametrize("sigalgs", [b"ECDSA+SHA256", b"RSA-PSS+SHA256"], ids=["ec", "rsa"])
async def test_intermediate_tls13_suites_staple(served, clock, suite, sigalgs) -> None:
    ctx, seen = client_context(version=SSL.TLS1_3_VERSION, sigalgs=sigalgs)
    ctx.set_tls13_ciphersuites(suite.encode())
    server = handshake(served.context(), ctx, servername=NAME.encode())
    assert server.get_cipher_name() == suite
    leaf = served.ec if sigalgs.startswith(b"ECDSA") else served.rsa
    assert server.get_certificate(as_cryptography=True) == leaf.cert
    staple_of(seen, leaf, clock)


@pytest.mark.parametrize("cipher", FORBIDDEN_TLS12)
async def test_intermediate_refuses_weak_tls12_suites(served, cipher) -> None:
    server_refuses(served.context(), client(version=SSL.TLS1_2_VERSION, ciphers=cipher)[0])


async def test_intermediate_refuses_tls13_suites_outside_the_list(served) -> None:
    ctx, _ = client(version=SSL.TLS1_3_VERSION, suites="TLS_AES_128_CCM_SHA256")
    server_refuses(served.context(), ctx)


@pytest.mark.parametrize("version", [SSL.TLS1_VERSION, SSL.TLS1_1_VERSION], ids=["1.0", "1.1"])
async def test_intermediate_refuses_old_versions(served, version) -> None:
    # SECLEVEL=0: this client may offer TLS 1.0/1.1 at all; the server must refuse them.
    server_refuses(served.context(), client(version=version, ciphers="DEFAULT:@SECLEVEL=0")[0])


@pytest.mark.parametrize("version", VERSIONS.values(), ids=VERSIONS.keys())
@pytest.mark.parametrize("group", GROUPS)
async def test_allowed_groups(served, clock, version, group) -> None:
    ctx, seen = client(version=version, groups=group)
    server = handshake(served.context(), ctx, servername=NAME.encode())
    assert server.get_group_name() == GROUPS[group]
    leaf = (
        served.ec if server.get_certificate(as_cryptography=True) == served.ec.cert else served.rsa
    )
    staple_of(seen, leaf, clock)


@pytest.mark.parametrize("version", VERSIONS.values(), ids=VERSIONS.keys())
@pytest.mark.parametrize("group", FORBIDDEN_GROUPS)
async def test_forbidden_groups(served, version, group) -> None:
    server_refuses(served.context(), client(version=version, groups=group)[0])


@pytest.mark.parametrize(
    ("version", "ciphers", "suites", "expected"),
    [
        (
            SSL.TLS1_2_VERSION,
            "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256",
            None,
            "ECDHE-ECDSA-CHACHA20-POLY1305",
        ),
        (
            SSL.TLS1_3_VERSION,
            None,
            "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256",
            "TLS_CHACHA20_POLY1305_SHA256",
        ),
    ],
    ids=["tls1.2", "tls1.3"],
)
async def test_the_client_order_wins(served, version, ciphers, suites, expected) -> None:
    """No server cipher preference (Mozilla's guidance): a client without AES hardware that
    prefers ChaCha20 gets it, although the server lists AES-GCM first."""
    ctx, _ = client(version=version, ciphers=ciphers, suites=suites)
    server = handshake(served.context(), ctx, servername=NAME.encode())
    assert server.get_cipher_name() == expected


async def test_sni_context_has_the_profile_too(served, clock) -> None:
    server_ctx = served.context()
    ctx, seen = client(version=SSL.TLS1_2_VERSION)
    server = handshake(server_ctx, ctx, servername=b"other.test")
    assert server.get_certificate(as_cryptography=True) == served.other.cert
    staple_of(seen, served.other, clock)
    for cipher in ("AES128-SHA", "ECDHE-ECDSA-AES128-SHA"):
        ctx, _ = client(version=SSL.TLS1_2_VERSION, ciphers=cipher)
        server_refuses(server_ctx, ctx, servername="other.test")
    server_refuses(server_ctx, client(groups="X448")[0], servername="other.test")


# -- modern -----------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", [TLSProfile.MODERN, "modern"])
async def test_modern_is_tls13_only(served, clock, profile) -> None:
    server_ctx = served.context(profile=profile)
    for name, leaf in ((NAME, served.ec), ("other.test", served.other)):
        ctx, seen = client(version=SSL.TLS1_3_VERSION)
        server = handshake(server_ctx, ctx, servername=name.encode())
        assert server.get_protocol_version() == SSL.TLS1_3_VERSION
        staple_of(seen, leaf, clock)
    for cipher, _ in INTERMEDIATE_TLS12:
        server_refuses(server_ctx, client(version=SSL.TLS1_2_VERSION, ciphers=cipher)[0])
    server_refuses(server_ctx, client(version=SSL.TLS1_3_VERSION, groups="X448")[0])


# -- choosing the settings ----------------------------------------------------------------------


async def test_context_factory_replaces_the_profile(served, clock) -> None:
    """context_factory's contexts are used as they come: here, TLS 1.2 at most (which no
    profile allows on its own), made once per SNI context, each stapling."""
    made: list[SSL.Context] = []

    def tls12_only() -> SSL.Context:
        ctx = new_context()
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
        made.append(ctx)
        return ctx

    server_ctx = served.context(context_factory=tls12_only)
    assert len(made) == 2 and server_ctx is made[0]
    ctx, seen = client()
    server = handshake(server_ctx, ctx, servername=b"other.test")
    assert server.get_protocol_version() == SSL.TLS1_2_VERSION
    staple_of(seen, served.other, clock)


async def test_bad_profile_or_factory(served) -> None:
    with pytest.raises(ValueError, match=r"unknown TLS profile 'old': use one of 'intermediate'"):
        served.context(profile="old")
    with pytest.raises(ValueError, match="unknown TLS profile"):
        new_context("TLSv1.3")
    with pytest.raises(TypeError, match=r"OpenSSL\.SSL\.Context"):
        served.context(context_factory=lambda: object())


def test_profile_is_exported() -> None:
    assert staple.TLSProfile is TLSProfile
    assert TLSProfile("intermediate") is TLSProfile.INTERMEDIATE


# -- real clients over TCP ----------------------------------------------------------------------


class Hello(asyncio.Protocol):
    """Answers any request with a tiny HTTP response and closes (enough for curl)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
        )
        self.transport.close()


@asynccontextmanager
async def listening(ctx: SSL.Context) -> AsyncIterator[int]:
    server = await staple.tls.create_server(Hello, HOST, 0, ssl_context=ctx)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def s_client(port: int, *args: str) -> tuple[int, str]:
    code, out, err = await run_tool(
        require("openssl"), "s_client", "-connect", f"{HOST}:{port}", "-servername", NAME, *args
    )
    return code, out + err


REFUSED_BY_S_CLIENT = [
    pytest.param(("-tls1_2", "-cipher", "AES128-SHA"), 40, id="static-rsa"),
    pytest.param(("-tls1_2", "-cipher", "AES256-GCM-SHA384"), 40, id="static-rsa-gcm"),
    pytest.param(("-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA"), 40, id="cbc"),
    pytest.param(("-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-SHA384"), 40, id="cbc-sha384"),
    pytest.param(("-curves", "X448"), 40, id="X448"),
    pytest.param(("-curves", "P-521"), 40, id="P-521"),
    pytest.param(("-tls1_2", "-curves", "P-521"), 40, id="tls1.2-P-521"),
    pytest.param(("-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"), 70, id="tls1.1"),
]


@pytest.mark.external
@pytest.mark.parametrize(("args", "alert"), REFUSED_BY_S_CLIENT)
async def test_s_client_forbidden(served, args, alert) -> None:
    async with listening(served.context()) as port:
        code, out = await s_client(port, *args)
    assert code != 0, out
    assert f"SSL alert number {alert}" in out, out  # the server's alert, not a client refusal
    assert "Cipher is (NONE)" in out


@pytest.mark.external
@pytest.mark.parametrize(
    ("args", "key_type", "cipher"),
    [
        (("-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"), "ec", None),
        (("-tls1_2", "-cipher", "ECDHE-RSA-CHACHA20-POLY1305"), "rsa", None),
        (("-tls1_2", "-curves", "P-384", "-sigalgs", "RSA+SHA256"), "rsa", None),
        (("-tls1_3", "-sigalgs", "RSA-PSS+SHA256"), "rsa", "TLS_AES_256_GCM_SHA384"),
        (("-tls1_3", "-curves", "X25519", "-sigalgs", "ECDSA+SHA256"), "ec", None),
    ],
    ids=["tls1.2-ec", "tls1.2-rsa-chacha", "tls1.2-P-384", "tls1.3-rsa", "tls1.3-ec"],
)
async def test_s_client_allowed_and_stapled(served, args, key_type, cipher) -> None:
    leaf = served.ec if key_type == "ec" else served.rsa
    async with listening(served.context()) as port:
        code, out = await s_client(port, "-status", *args)
    assert code == 0, out
    assert "OCSP Response Status: successful" in out, out
    assert served_certificate(out) == leaf.cert
    assert staple_serial(out) == leaf.cert.serial_number
    if cipher is not None:
        assert f"Cipher is {cipher}" in out, out


@pytest.mark.external
async def test_s_client_modern_refuses_tls12(served) -> None:
    async with listening(served.context(profile="modern")) as port:
        code, out = await s_client(port, "-tls1_2")
        assert code != 0 and "SSL alert number 70" in out, out
        code, out = await s_client(port, "-tls1_3", "-status")
    assert code == 0, out
    assert "OCSP Response Status: successful" in out, out


CLIENT_VERSIONS = ["tls1.2", "tls1.3"]


async def single_leaf_context(
    pki: TestPKI, responder: OcspResponder, stapler: Stapler, key_type: str, tmp_path: Path
) -> tuple[SSL.Context, Path]:
    leaf = pki.issue_leaf(NAME, key_type=key_type, ocsp_url=responder.url, must_staple=True)  # type: ignore[arg-type]
    await stapler.add(leaf.chain)
    ca = tmp_path / "ca.pem"
    pki.write_ca_bundle(ca)
    return build_server_context([(leaf.chain_pem, leaf.key_pem)], stapler), ca


@pytest.mark.external
@pytest.mark.parametrize("version", CLIENT_VERSIONS)
@pytest.mark.parametrize("key_type", ["ec", "rsa"])
async def test_curl_verifies_the_staple(pki, responder, clock, tmp_path, key_type, version) -> None:
    curl = require("curl")
    flags = ["--tlsv1.2", "--tls-max", "1.2"] if version == "tls1.2" else ["--tlsv1.3"]
    async with Stapler(clock=clock) as stapler:
        ctx, ca = await single_leaf_context(pki, responder, stapler, key_type, tmp_path)
        async with listening(ctx) as port:
            code, out, err = await run_tool(
                curl, "-sS", "--cert-status", "--cacert", str(ca), *flags,
                "--resolve", f"{NAME}:{port}:{HOST}", f"https://{NAME}:{port}/",
            )  # fmt: skip
        assert stapler.stapled == 1
    assert code == 0, out + err
    assert out == "ok\n"


@pytest.mark.external
@pytest.mark.parametrize("version", CLIENT_VERSIONS)
@pytest.mark.parametrize("key_type", ["ec", "rsa"])
async def test_gnutls_cli_verifies_the_staple(
    pki, responder, clock, tmp_path, key_type, version
) -> None:
    gnutls = require("gnutls-cli")
    priority = (
        "NORMAL:-VERS-ALL:+VERS-TLS1.2" if version == "tls1.2" else "NORMAL:-VERS-ALL:+VERS-TLS1.3"
    )
    async with Stapler(clock=clock) as stapler:
        ctx, ca = await single_leaf_context(pki, responder, stapler, key_type, tmp_path)
        async with listening(ctx) as port:
            code, out, err = await run_tool(
                gnutls, "--ocsp", "--x509cafile", str(ca), "--priority", priority,
                "-p", str(port), "--sni-hostname", NAME, "--verify-hostname", NAME, HOST,
            )  # fmt: skip
        assert stapler.stapled == 1
    assert code == 0, out + err
    assert "The certificate is trusted" in out, out
    assert re.search(r"- Options: .*OCSP status request", out), out
    assert f"- Description: ({'TLS1.2' if version == 'tls1.2' else 'TLS1.3'}-X.509)" in out, out


@pytest.mark.slow  # a real process
@pytest.mark.external
@pytest.mark.parametrize("profile", ["intermediate", "modern"])
async def test_staple_serve_tls_profile(pki, responder, tmp_path, profile) -> None:
    """``staple serve --tls-profile``: modern refuses TLS 1.2, intermediate takes it; both
    staple over TLS 1.3."""
    leaf = pki.issue_leaf(NAME, ocsp_url=responder.url)
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    leaf.write_chain(chain)
    leaf.write_key(key)
    async with serve_process(
        "--cert", str(chain), "--key", str(key), "--no-cache", "--tls-profile", profile
    ) as (_, port):  # fmt: skip
        code, text = await s_client(port, "-tls1_3", "-status")
        assert code == 0 and "OCSP Response Status: successful" in text, text
        code, text = await s_client(port, "-tls1_2", "-status")
        if profile == "modern":
            assert code != 0 and "alert protocol version" in text, text
        else:
            assert code == 0 and "OCSP Response Status: successful" in text, text
