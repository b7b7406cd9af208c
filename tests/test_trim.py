"""``staple.trim.stapled_der``: a staple carries only the certificates the client needs.

Unit: responses from :class:`~staple.testing.OcspResponder` with ``extra_certs`` (the CA's own
certificate, the root's) lose them; a delegated response keeps exactly its responder's
certificate. The signed parts come out byte for byte, the result equals an independent
re-encoding (``with_certs`` below, on :mod:`staple.testing`'s DER helpers) and still passes
:func:`staple.ocsp.validate`. Anything with nothing to drop, or of a layout the trimmer does not
expect, comes back as the very same object, and nothing raises (hand-made layouts, every
truncation, hypothesis mutations).

Integration: real handshakes through the Stapler (pyOpenSSL on memory BIOs) deliver the trimmed
bytes to the client's OCSP callback while the store keeps the fetched ones; ``staple serve``
staples them to ``curl --cert-status``, ``gnutls-cli --ocsp`` and ``openssl ocsp -respin``,
which all verify them (marked ``external``).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp as x509_ocsp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

import staple
import staple.trim
from staple import ocsp
from staple.cli.serve import Serving
from staple.der import SEQUENCE, Element, children, encode_tlv, read_element, read_whole
from staple.response_context import OcspResponseContext
from staple.stapler import Stapler
from staple.testing import FakeClock, Leaf, OcspResponder, TestPKI
from staple.trim import stapled_der

from .external import require
from .test_serve import config_for, curl, files, gnutls_cli, run_tool, running
from .test_stapler import server_context
from .tls_pair import client_context, handshake

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
Signer = Literal["issuer", "delegated"]
SIGNERS: list[Signer] = ["issuer", "delegated"]
VERSIONS = [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION]


# -- helpers -----------------------------------------------------------------------------------


def der_of(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def embedded(der: bytes) -> list[x509.Certificate]:
    return x509_ocsp.load_der_ocsp_response(der).certificates


def signed_parts(der: bytes) -> tuple[bytes, bytes, x509.ObjectIdentifier]:
    resp = x509_ocsp.load_der_ocsp_response(der)
    return resp.tbs_response_bytes, resp.signature, resp.signature_algorithm_oid


def basic_fields(der: bytes) -> tuple[Element, list[Element]]:
    """The responseType OID and the BasicOCSPResponse fields of ``der`` (offsets into it)."""
    _, explicit = children(der, read_whole(der, SEQUENCE))
    (response_bytes,) = children(der, explicit)
    oid, octets = children(der, response_bytes)
    return oid, children(der, read_element(der, octets.body, octets.end))


def with_certs(der: bytes, certs: list[bytes] | None, *, tail: bytes = b"") -> bytes:
    """``der`` re-encoded with ``certs`` as its certs field (``None``: no field), then ``tail``
    inside the BasicOCSPResponse: the signed parts untouched."""
    oid, fields = basic_fields(der)
    field = b"" if certs is None else encode_tlv(0xA0, encode_tlv(0x30, b"".join(certs)))
    basic = encode_tlv(0x30, der[fields[0].start : fields[2].end] + field + tail)
    response_bytes = encode_tlv(0x30, der[oid.start : oid.end] + encode_tlv(0x04, basic))
    return encode_tlv(0x30, b"\x0a\x01\x00" + encode_tlv(0xA0, response_bytes))


def verify(der: bytes, leaf: Leaf, now: datetime) -> ocsp.VerifiedResponse:
    return ocsp.validate(der, leaf.cert, leaf.chain[1], now=now)


@dataclasses.dataclass(frozen=True)
class Case:
    pki: TestPKI
    leaf: Leaf
    verified: ocsp.VerifiedResponse  # of a response embedding certificates to drop

    @property
    def der(self) -> bytes:
        return self.verified.der


@functools.cache
def case(signer: Signer) -> Case:
    """A response from ``signer`` that also embeds the intermediate and the root (built once:
    hypothesis wants no function-scoped fixtures)."""
    pki = TestPKI(now=NOW)
    leaf = pki.issue_leaf("trim.test")
    extras = [pki.intermediate.cert, pki.root.cert]
    responder = OcspResponder(pki, clock=FakeClock(NOW), signer=signer, extra_certs=extras)
    return Case(pki, leaf, verify(responder.response_for(leaf), leaf, NOW))


def check_trimmed(original: bytes, trimmed: bytes, keep: list[x509.Certificate]) -> None:
    assert trimmed != original and len(trimmed) < len(original)
    assert signed_parts(trimmed) == signed_parts(original)
    assert embedded(trimmed) == keep
    assert trimmed == with_certs(original, [der_of(c) for c in keep] or None)


# -- what is dropped and what is kept ----------------------------------------------------------


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
@pytest.mark.parametrize("extras", ["issuer", "issuer+root"])
def test_issuer_signed_response_loses_every_embedded_certificate(
    clock: FakeClock, key_type, extras
) -> None:
    pki = TestPKI(now=clock.now(), key_type=key_type)
    leaf = pki.issue_leaf("trim.test", key_type=key_type)
    certs = [pki.intermediate.cert] + ([pki.root.cert] if extras == "issuer+root" else [])
    der = OcspResponder(pki, clock=clock, extra_certs=certs).response_for(leaf)
    assert embedded(der) == certs
    verified = verify(der, leaf, clock.now())
    assert not verified.delegated

    trimmed = stapled_der(verified)

    check_trimmed(der, trimmed, [])
    again = verify(trimmed, leaf, clock.now())
    assert dataclasses.replace(again, der=der) == verified  # says the same, signed by the same
    assert stapled_der(again) is trimmed  # nothing left to drop


def test_delegated_response_keeps_exactly_its_responder_certificate(
    pki: TestPKI, clock: FakeClock
) -> None:
    leaf = pki.issue_leaf("trim.test")
    extras = [pki.intermediate.cert, pki.root.cert]
    responder = OcspResponder(pki, clock=clock, signer="delegated", extra_certs=extras)
    der = responder.response_for(leaf)
    delegate = pki.intermediate.responder.cert
    assert embedded(der) == [delegate, *extras]
    verified = verify(der, leaf, clock.now())
    assert verified.delegated and verified.signer == delegate

    trimmed = stapled_der(verified)

    check_trimmed(der, trimmed, [delegate])
    again = verify(trimmed, leaf, clock.now())
    assert again.delegated and again.signer == delegate
    assert again.expires == verified.expires
    assert stapled_der(again) is trimmed


def test_delegated_responder_certificate_found_anywhere_in_the_list() -> None:
    c = case("delegated")
    delegate = der_of(c.verified.signer)
    ca, root = der_of(c.pki.intermediate.cert), der_of(c.pki.root.cert)
    for order in ([ca, delegate], [ca, root, delegate], [delegate, delegate], [root, delegate]):
        der = with_certs(c.der, order)
        trimmed = stapled_der(verify(der, c.leaf, NOW))
        check_trimmed(der, trimmed, [c.verified.signer])


@pytest.mark.parametrize("copies", [1, 4, 200])
def test_long_form_lengths(copies: int) -> None:
    """A certs field of a few hundred bytes, of several KB, and one making the whole response
    need three length octets: every enclosing length is re-written right."""
    for signer in SIGNERS:
        c = case(signer)
        ca = der_of(c.pki.intermediate.cert)
        keep = [der_of(c.verified.signer)] if c.verified.delegated else []
        der = with_certs(c.der, keep + [ca] * copies)
        if copies == 200:
            assert der[1] == 0x83  # 16 bits of length are not enough
        trimmed = stapled_der(verify(der, c.leaf, NOW))
        check_trimmed(der, trimmed, [c.verified.signer] if c.verified.delegated else [])
        assert trimmed[1] == 0x82  # a few hundred bytes: two length octets


def test_an_empty_certs_field_is_dropped_too() -> None:
    c = case("issuer")
    der = with_certs(c.der, [])
    check_trimmed(der, stapled_der(verify(der, c.leaf, NOW)), [])


# -- nothing to drop: the same object back -----------------------------------------------------


def test_nothing_to_drop_is_returned_as_is(pki: TestPKI, clock: FakeClock) -> None:
    leaf = pki.issue_leaf("trim.test")
    for signer in SIGNERS:
        der = OcspResponder(pki, clock=clock, signer=signer).response_for(leaf)
        verified = verify(der, leaf, clock.now())
        assert len(embedded(der)) == (1 if signer == "delegated" else 0)
        assert stapled_der(verified) is der


# -- layouts the trimmer does not expect: the same object back, never an exception -------------


def _odd_layouts() -> dict[str, tuple[Signer, bytes]]:
    issuer, delegated = case("issuer"), case("delegated")
    der = issuer.der
    oid, fields = basic_fields(der)
    certs_field = fields[3]
    assert der[certs_field.start] == 0xA0 and der[certs_field.body] == 0x30

    def patch(at: int, value: int, base: bytes = der) -> bytes:
        return base[:at] + bytes([value]) + base[at + 1 :]

    bare = with_certs(der, None)
    tbs = fields[0]  # filled with an OCTET STRING of zeros, so only cryptography objects:
    junk = encode_tlv(0x04, bytes(tbs.end - tbs.body - 3))
    assert len(junk) == tbs.end - tbs.body
    return {
        "trailing byte": ("issuer", der + b"\x00"),
        "indefinite outer length": (
            "issuer",
            b"\x30\x80" + der[read_whole(der, SEQUENCE).body :] + b"\0\0",
        ),
        "not id-pkix-ocsp-basic": ("issuer", patch(oid.end - 1, 0x02)),
        "certs tagged [1]": ("issuer", patch(certs_field.start, 0xA1)),
        "certs a SET": ("issuer", patch(certs_field.body, 0x31)),
        "a field after certs": ("issuer", with_certs(der, [], tail=b"\x05\x00")),
        "a field instead of certs": ("issuer", with_certs(der, None, tail=b"\x05\x00")),
        "a certificate that is no SEQUENCE": ("issuer", with_certs(der, [b"\x04\x01\x00"])),
        "unsuccessful": ("issuer", bytes.fromhex("30030a0103")),
        "empty": ("issuer", b""),
        "garbage": ("issuer", b"\x00staple garbage\xff" * 8),
        "delegated signer not embedded": ("delegated", der),
        "delegated signer not embedded, no certs": ("delegated", bare),
        "high tag number": ("delegated", patch(certs_field.start, 0xBF, delegated.der)),
        "tbsResponseData no ResponseData": ("issuer", der[: tbs.body] + junk + der[tbs.end :]),
    }


ODD = _odd_layouts()


@pytest.mark.parametrize("name", list(ODD))
def test_odd_layout_is_returned_as_is(name: str) -> None:
    signer, der = ODD[name]
    verified = dataclasses.replace(case(signer).verified, der=der)
    assert stapled_der(verified) is der


@pytest.mark.parametrize("signer", SIGNERS)
def test_every_truncation_is_returned_as_is(signer: Signer) -> None:
    verified = case(signer).verified
    for n in range(len(verified.der)):
        der = verified.der[:n]
        assert stapled_der(dataclasses.replace(verified, der=der)) is der, n


def test_a_trimmed_response_that_fails_the_check_is_not_stapled(monkeypatch, caplog) -> None:
    """The guard: had the DER surgery a bug (here: one flipped signature bit), cryptography's
    reading of the result would not match the original, and the original is stapled."""
    c = case("issuer")
    rebuild = staple.trim._with_certs

    def flip_last_bit(der: bytes, keep: bytes | None) -> bytes | None:
        out = rebuild(der, keep)
        assert out is not None
        return out[:-1] + bytes([out[-1] ^ 1])  # the signature is last once certs are gone

    monkeypatch.setattr(staple.trim, "_with_certs", flip_last_bit)
    with caplog.at_level(logging.WARNING, logger="staple"):
        assert stapled_der(c.verified) is c.der
    assert "failed its check" in caplog.text


MUTATE = settings(
    max_examples=300,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the repository
    suppress_health_check=[HealthCheck.too_slow],
)


def header_offsets(der: bytes) -> list[int]:
    """Where the tags and lengths of the elements the trimmer reads lie in ``der``."""
    oid, fields = basic_fields(der)
    outer = read_whole(der, SEQUENCE)
    status, explicit = children(der, outer)
    (response_bytes,) = children(der, explicit)
    _, octets = children(der, response_bytes)
    nodes = [outer, status, explicit, response_bytes, oid, octets, *fields]
    nodes.append(read_element(der, octets.body, octets.end))  # the BasicOCSPResponse
    if len(fields) == 4:
        (sequence,) = children(der, fields[3])
        nodes += [sequence, *children(der, sequence)]
    return sorted({i for n in nodes for i in range(n.start, n.body)})


@MUTATE
@given(
    signer=st.sampled_from(SIGNERS),
    edits=st.lists(
        st.tuples(st.integers(0, 1 << 16), st.booleans(), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
    cut=st.integers(0, 3),
)
def test_mutated_responses_never_raise(signer: Signer, edits, cut: int) -> None:
    """Byte changes anywhere or in a tag or length the trimmer reads (and a few bytes cut off
    the end): the result is the input itself, or a response with the input's signed parts and
    only the certificate kept."""
    verified = case(signer).verified
    data = bytearray(verified.der)
    headers = header_offsets(verified.der)
    for where, in_header, value in edits:
        data[headers[where % len(headers)] if in_header else where % len(data)] = value
    der = bytes(data[: len(data) - cut])

    out = stapled_der(dataclasses.replace(verified, der=der))

    if out is not der:
        assert signed_parts(out) == signed_parts(der)
        assert embedded(out) == ([verified.signer] if verified.delegated else [])
        assert len(out) < len(der)


# -- real handshakes: what the client's OCSP callback receives ---------------------------------


@pytest.mark.parametrize("version", VERSIONS, ids=["tls1.2", "tls1.3"])
@pytest.mark.parametrize("signer", SIGNERS)
async def test_handshake_staples_the_trimmed_response(
    pki: TestPKI, clock: FakeClock, signer: Signer, version: int
) -> None:
    extras = [pki.intermediate.cert, pki.root.cert]
    delegated = signer == "delegated"
    async with (
        OcspResponder(pki, clock=clock, signer=signer, extra_certs=extras) as responder,
        Stapler(clock=clock, jitter=0.0) as stapler,
    ):
        leaf = pki.issue_leaf("trim.test", ocsp_url=responder.url)
        handle = await stapler.add(leaf.chain)
        client, seen = client_context(version=version)
        server = handshake(server_context(stapler, leaf), client)
        assert server.get_protocol_version() == version

        fetched = await stapler.store.get(handle.cert_id.key)  # the store keeps what was fetched
        assert fetched is not None
        assert (
            embedded(fetched) == ([pki.intermediate.responder.cert] if delegated else []) + extras
        )
        (stapled,) = seen
        keep = [pki.intermediate.responder.cert] if delegated else []
        check_trimmed(fetched, stapled, keep)
        verified = verify(stapled, leaf, clock.now())
        assert verified.cert_status is staple.CertStatus.GOOD
        assert verified.delegated is delegated
        del server
        gc.collect()
        assert handle.live_references == 0


async def test_handshake_staples_an_untrimmable_response_unchanged(
    pki: TestPKI, clock: FakeClock, responder: OcspResponder
) -> None:
    """The plain responder embeds nothing: the context staples the fetched object itself."""
    async with Stapler(clock=clock, jitter=0.0) as stapler:
        leaf = pki.issue_leaf("trim.test", ocsp_url=responder.url)
        handle = await stapler.add(leaf.chain)
        ctx = handle.get_context()
        assert isinstance(ctx, OcspResponseContext)
        with ctx:
            assert ctx.encoded is ctx.response.der
        client, seen = client_context()
        server = handshake(server_context(stapler, leaf), client)
        assert seen == [await stapler.store.get(handle.cert_id.key)]
        del server


# -- real clients verify the trimmed staple ----------------------------------------------------


@pytest.fixture(scope="module")
def live_pki() -> TestPKI:
    return TestPKI()  # on the real clock, like staple serve


@dataclasses.dataclass
class Served:
    serving: Serving
    leaf: Leaf
    root: Path  # the clients' trust anchor
    stapled: bytes  # what the server staples
    fetched: bytes  # what the responder sent (and the cache keeps)


@asynccontextmanager
async def trimmed_server(pki: TestPKI, tmp_path: Path, signer: Signer) -> AsyncIterator[Served]:
    """``staple serve`` stapling a response that also embedded the intermediate and the root."""
    extras = [pki.intermediate.cert, pki.root.cert]
    async with OcspResponder(pki, signer=signer, extra_certs=extras) as responder:
        leaf = pki.issue_leaf("trim.test", ocsp_url=responder.url, must_staple=True)
        root = tmp_path / "root.pem"
        pki.write_ca_bundle(root)
        async with running(config_for(tmp_path, files(tmp_path, leaf, "leaf"))) as serving:
            (handle,) = serving.handles
            ctx = handle.get_context()
            assert ctx is not None, handle.last_error
            with ctx:
                stapled, fetched = ctx.encoded, ctx.response.der
            (cached,) = (tmp_path / "cache").glob("*.ocsp")
            assert cached.read_bytes() == fetched
            keep = [pki.intermediate.responder.cert] if signer == "delegated" else []
            check_trimmed(fetched, stapled, keep)
            yield Served(serving, leaf, root, stapled, fetched)


@pytest.mark.external
@pytest.mark.parametrize("signer", SIGNERS)
async def test_curl_verifies_the_trimmed_staple(live_pki, tmp_path, signer) -> None:
    require("curl")
    async with trimmed_server(live_pki, tmp_path, signer) as served:
        code, out = await curl(served.serving.port, "trim.test", served.root)
        assert served.serving.stapler.stapled == 1
    assert code == 0, out


@pytest.mark.external
@pytest.mark.parametrize("signer", SIGNERS)
async def test_gnutls_cli_verifies_the_trimmed_staple(live_pki, tmp_path, signer) -> None:
    gnutls = require("gnutls-cli")
    async with trimmed_server(live_pki, tmp_path, signer) as served:
        code, out, err = await gnutls_cli(gnutls, served.serving.port, "trim.test", served.root)
        assert served.serving.stapler.stapled == 1
    assert code == 0, out + err
    assert "The certificate is trusted" in out
    assert re.search(r"- Options: .*OCSP status request", out), out


@pytest.mark.external
@pytest.mark.parametrize("signer", SIGNERS)
async def test_openssl_ocsp_verifies_the_trimmed_staple(live_pki, tmp_path, signer) -> None:
    openssl = require("openssl")
    async with trimmed_server(live_pki, tmp_path, signer) as served:
        staple_der, issuer, cert = (
            tmp_path / "staple.der",
            tmp_path / "issuer.pem",
            tmp_path / "leaf.pem",
        )
        staple_der.write_bytes(served.stapled)
        issuer.write_bytes(live_pki.intermediate.cert_pem)
        cert.write_bytes(served.leaf.cert_pem)
        code, out, err = await run_tool(
            openssl, "ocsp", "-respin", str(staple_der), "-issuer", str(issuer),
            "-cert", str(cert), "-CAfile", str(served.root),
        )  # fmt: skip
    assert code == 0, out + err
    assert "Response verify OK" in out + err
    assert f"{cert}: good" in out
