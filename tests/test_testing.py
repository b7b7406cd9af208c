"""staple.testing: the fake clock, the test PKI and the local OCSP responder.

Real HTTP against 127.0.0.1, real signatures checked with cryptography; no real sleeping
for timing (the fake clock is driven by hand).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import typing
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
import yarl
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store
from multidict import CIMultiDictProxy
from OpenSSL import SSL

import staple.testing
from staple.clock import Clock
from staple.der import SEQUENCE, children, encode_tlv, read_whole
from staple.testing import CA, FakeClock, Fault, KeyType, Leaf, OcspResponder, TestPKI

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


# -- helpers ---------------------------------------------------------------------------------


def request_der(leaf: Leaf, algorithm: hashes.HashAlgorithm | None = None) -> bytes:
    return (
        ocsp.OCSPRequestBuilder()
        .add_certificate(leaf.cert, leaf.issuer.cert, algorithm or hashes.SHA1())
        .build()
        .public_bytes(serialization.Encoding.DER)
    )


def get_url(base: str, der: bytes) -> str:
    return f"{base}/{urllib.parse.quote(base64.b64encode(der).decode(), safe='')}"


def verify_signature(response: ocsp.OCSPResponse, signer: x509.Certificate) -> None:
    """Raise InvalidSignature unless ``signer``'s key signed ``response``."""
    key = signer.public_key()
    tbs, signature = response.tbs_response_bytes, response.signature
    algorithm = response.signature_hash_algorithm
    if isinstance(key, rsa.RSAPublicKey):
        assert algorithm is not None
        key.verify(signature, tbs, padding.PKCS1v15(), algorithm)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        assert algorithm is not None
        key.verify(signature, tbs, ec.ECDSA(algorithm))
    else:
        assert isinstance(key, ed25519.Ed25519PublicKey)
        key.verify(signature, tbs)


async def post(
    session: aiohttp.ClientSession, url: str, der: bytes
) -> tuple[int, str, bytes, CIMultiDictProxy[str]]:
    headers = {"Content-Type": "application/ocsp-request"}
    async with session.post(url, data=der, headers=headers) as resp:
        return resp.status, resp.content_type, await resp.read(), resp.headers


async def fetch(responder: OcspResponder, session: aiohttp.ClientSession, leaf: Leaf) -> bytes:
    status, content_type, body, _ = await post(session, responder.url, request_der(leaf))
    assert (status, content_type) == (200, "application/ocsp-response")
    return body


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def pki(clock: FakeClock) -> TestPKI:
    return TestPKI(now=clock.now())


@pytest.fixture
async def responder(pki: TestPKI, clock: FakeClock) -> AsyncIterator[OcspResponder]:
    async with OcspResponder(pki, clock=clock) as responder:
        yield responder


@pytest.fixture
def leaf(pki: TestPKI, responder: OcspResponder) -> Leaf:
    return pki.issue_leaf("example.test", ocsp_url=responder.url)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def test_public_names() -> None:
    assert set(staple.testing.__all__) == {
        "TestPKI",
        "CA",
        "Leaf",
        "OcspResponder",
        "Fault",
        "FakeClock",
        "KeyType",
    }
    assert TestPKI.__test__ is False  # pytest must not collect it as a test class


# -- FakeClock -------------------------------------------------------------------------------


def test_clock_defaults_to_real_time_rounded_to_the_minute() -> None:
    before = datetime.now(UTC).timestamp()
    t = FakeClock().time()
    assert t % 60 == 0
    assert before - 60 < t <= before


def test_clock_start_and_set() -> None:
    clock: Clock = FakeClock(T0)  # satisfies the protocol
    assert clock.time() == T0.timestamp()
    fake = FakeClock(T0.timestamp() + 0.5)
    assert fake.now() == T0 + timedelta(seconds=0.5)
    assert fake.now().tzinfo is UTC
    fake.set(T0 - timedelta(days=1))
    assert fake.now() == T0 - timedelta(days=1)
    assert FakeClock(T0.replace(tzinfo=None)).now() == T0  # naive means UTC
    with pytest.raises(ValueError, match="set"):
        fake.advance(-1)


async def test_clock_sleepers_wake_on_advance_and_not_before(clock: FakeClock) -> None:
    deadline = clock.time() + 100
    task = asyncio.create_task(clock.sleep_until(deadline))
    await clock.wait_for_sleepers(1)
    assert (clock.sleepers, clock.next_deadline) == (1, deadline)

    clock.advance(99.5)
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()
    assert clock.sleepers == 1

    clock.advance(timedelta(seconds=0.5))
    assert clock.sleepers == 0  # leaves the list at once
    await task
    assert clock.next_deadline is None


async def test_clock_past_deadline_returns_at_once(clock: FakeClock) -> None:
    await clock.sleep_until(clock.time())
    await clock.sleep_until(clock.time() - 10)
    assert clock.sleepers == 0


async def test_clock_set_backwards_wakes_everyone_forwards_only_the_due(
    clock: FakeClock,
) -> None:
    """Like SystemClock: a jump back returns sleepers early so they reschedule."""
    early = asyncio.create_task(clock.sleep(10))
    late = asyncio.create_task(clock.sleep(3600))
    await clock.wait_for_sleepers(2)
    clock.set(T0 + timedelta(seconds=10))  # forwards: only the due one
    await early
    assert not late.done()
    assert clock.sleepers == 1
    clock.set(clock.time() - 3600)  # backwards: everyone re-checks
    await late
    assert clock.sleepers == 0


async def test_clock_wakes_in_deadline_order(clock: FakeClock) -> None:
    woke: list[int] = []

    async def sleeper(n: int) -> None:
        await clock.sleep(n)
        woke.append(n)

    tasks = [asyncio.create_task(sleeper(n)) for n in (30, 10, 20)]
    await clock.wait_for_sleepers(3)
    assert clock.next_deadline == clock.time() + 10
    clock.advance(15)
    await asyncio.sleep(0)
    assert woke == [10]
    assert clock.sleepers == 2
    clock.advance(100)
    await asyncio.gather(*tasks)
    assert sorted(woke) == [10, 20, 30]


async def test_clock_wait_for_sleepers_waits_for_n(clock: FakeClock) -> None:
    waiter = asyncio.create_task(clock.wait_for_sleepers(2))
    first = asyncio.create_task(clock.sleep(5))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert clock.sleepers == 1
    assert not waiter.done()
    second = asyncio.create_task(clock.sleep(5))
    await waiter
    assert clock.sleepers == 2
    clock.advance(5)
    await asyncio.gather(first, second)


async def test_clock_cancelled_sleepers_disappear(clock: FakeClock) -> None:
    task = asyncio.create_task(clock.sleep(60))
    await clock.wait_for_sleepers()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert clock.sleepers == 0
    assert clock.next_deadline is None

    waiter = asyncio.create_task(clock.wait_for_sleepers())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    clock.advance(60)  # nothing left to wake, nothing breaks


async def test_clock_drives_a_refresh_loop(clock: FakeClock) -> None:
    """The pattern the refresher tests use: wait until it sleeps, advance, repeat."""
    ticks: list[float] = []

    async def refresher() -> None:
        while True:
            ticks.append(clock.time())
            await clock.sleep_until(clock.time() + 3600)

    task = asyncio.create_task(refresher())
    for _ in range(24):
        await clock.wait_for_sleepers(1)
        clock.advance(3600)
    await clock.wait_for_sleepers(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ticks == [T0.timestamp() + 3600 * i for i in range(25)]
    assert clock.sleepers == 0


# -- TestPKI ---------------------------------------------------------------------------------


def test_pki_chain_verifies_to_the_root(pki: TestPKI) -> None:
    leaf = pki.issue_leaf("example.test", "127.0.0.1")
    assert leaf.chain == [leaf.cert, pki.intermediate.cert]
    assert leaf.issuer is pki.intermediate
    assert pki.intermediate.parent is pki.root
    assert pki.root.chain == []
    verifier = (
        PolicyBuilder()
        .store(Store([pki.root.cert]))
        .time(pki.now)
        .build_server_verifier(x509.DNSName("example.test"))
    )
    path = verifier.verify(leaf.cert, leaf.chain[1:])
    assert path == [leaf.cert, pki.intermediate.cert, pki.root.cert]
    san = leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["example.test"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert leaf.cert.serial_number in pki.intermediate.issued


def test_pki_rogue_is_unrelated(pki: TestPKI) -> None:
    leaf = pki.issue_leaf(issuer=pki.rogue)
    assert leaf.chain == [leaf.cert]
    assert pki.rogue.cert.issuer == pki.rogue.cert.subject != pki.root.cert.subject
    verifier = (
        PolicyBuilder()
        .store(Store([pki.root.cert]))
        .time(pki.now)
        .build_server_verifier(x509.DNSName("localhost"))
    )
    with pytest.raises(x509.verification.VerificationError):
        verifier.verify(leaf.cert, [])
    assert pki.cas == (pki.root, pki.intermediate, pki.rogue)


def test_pki_validity_follows_now() -> None:
    pki = TestPKI(now=T0)
    leaf = pki.issue_leaf()
    assert leaf.cert.not_valid_before_utc == T0 - timedelta(days=1)
    assert leaf.cert.not_valid_after_utc == T0 + timedelta(days=365)
    custom = pki.issue_leaf(not_before=T0, not_after=T0 + timedelta(hours=1))
    assert custom.cert.not_valid_after_utc == T0 + timedelta(hours=1)
    assert pki.root.cert.not_valid_after_utc > leaf.cert.not_valid_after_utc
    real = TestPKI().issue_leaf().cert
    assert real.not_valid_before_utc < datetime.now(UTC) < real.not_valid_after_utc


def test_pki_must_staple_and_aia(pki: TestPKI) -> None:
    leaf = pki.issue_leaf(
        "a.test",
        ocsp_url=["http://ocsp.one/", "http://ocsp.two/"],
        ca_issuers_url="http://ca.test/int.der",
        must_staple=True,
    )
    feature = leaf.cert.extensions.get_extension_for_class(x509.TLSFeature).value
    assert list(feature) == [x509.TLSFeatureType.status_request]
    aia = leaf.cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert [(d.access_method, d.access_location.value) for d in aia] == [
        (AuthorityInformationAccessOID.OCSP, "http://ocsp.one/"),
        (AuthorityInformationAccessOID.OCSP, "http://ocsp.two/"),
        (AuthorityInformationAccessOID.CA_ISSUERS, "http://ca.test/int.der"),
    ]
    plain = pki.issue_leaf("b.test")
    for absent in (x509.TLSFeature, x509.AuthorityInformationAccess):
        with pytest.raises(x509.ExtensionNotFound):
            plain.cert.extensions.get_extension_for_class(absent)
    single = pki.issue_leaf(ocsp_url="http://ocsp.one/")
    aia = single.cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert len(list(aia)) == 1


def test_pki_responder_certificates(pki: TestPKI) -> None:
    responder = pki.responder
    assert responder.issuer is pki.intermediate
    eku = responder.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.OCSP_SIGNING]
    responder.cert.extensions.get_extension_for_class(x509.OCSPNoCheck)
    assert pki.responder is responder  # made once

    without = pki.responder_without_eku
    assert without.issuer is pki.intermediate
    with pytest.raises(x509.ExtensionNotFound):
        without.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert without.cert.public_key() != responder.cert.public_key()

    mine = pki.root.issue_responder(nocheck=False)
    assert mine.chain == [mine.cert]
    with pytest.raises(x509.ExtensionNotFound):
        mine.cert.extensions.get_extension_for_class(x509.OCSPNoCheck)


def test_pki_key_types(pki: TestPKI) -> None:
    ec_leaf = pki.issue_leaf()
    assert isinstance(ec_leaf.key, ec.EllipticCurvePrivateKey)
    assert ec_leaf.key.curve.name == "secp256r1"
    ed = pki.issue_leaf(key_type="ed25519")
    assert isinstance(ed.key, ed25519.Ed25519PrivateKey)
    first, second = pki.issue_leaf(key_type="rsa"), pki.issue_leaf(key_type="rsa")
    assert isinstance(first.key, rsa.RSAPrivateKey)
    assert first.key.key_size == 2048
    assert first.key is second.key  # one RSA key per PKI, by design
    assert first.cert.serial_number != second.cert.serial_number
    with pytest.raises(ValueError, match="key_type"):
        pki.issue_leaf(key_type="dsa")  # type: ignore[arg-type]


_KEY_CLASSES = {
    "rsa": rsa.RSAPrivateKey,
    "ec": ec.EllipticCurvePrivateKey,
    "ed25519": ed25519.Ed25519PrivateKey,
}


@pytest.mark.parametrize("key_type", typing.get_args(KeyType))
def test_pki_key_type_names_every_kind(key_type: KeyType) -> None:
    """KeyType lists exactly the kinds TestPKI makes, so tests can parametrize over it."""
    assert set(typing.get_args(KeyType)) == set(_KEY_CLASSES)
    pki = TestPKI(key_type=key_type)
    leaf = pki.issue_leaf(key_type=key_type)
    assert isinstance(pki.intermediate.key, _KEY_CLASSES[key_type])
    assert isinstance(leaf.key, _KEY_CLASSES[key_type])


def test_pki_outputs(pki: TestPKI, tmp_path: Path) -> None:
    leaf = pki.issue_leaf("files.test")
    assert x509.load_pem_x509_certificates(leaf.chain_pem) == leaf.chain
    assert leaf.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    key = serialization.load_pem_private_key(leaf.key_pem, password=None)
    assert key.public_key() == leaf.cert.public_key()
    assert x509.load_pem_x509_certificates(pki.ca_bundle_pem) == [pki.root.cert]

    leaf.write_chain(tmp_path / "chain.pem")
    leaf.write_key(tmp_path / "key.pem")
    pki.write_ca_bundle(str(tmp_path / "ca.pem"))
    assert (tmp_path / "chain.pem").read_bytes() == leaf.chain_pem
    assert (tmp_path / "key.pem").read_bytes() == leaf.key_pem
    assert (tmp_path / "key.pem").stat().st_mode & 0o077 == 0
    assert (tmp_path / "ca.pem").read_bytes() == pki.ca_bundle_pem


def _handshake(server: SSL.Connection, client: SSL.Connection) -> None:
    """Drive a TLS handshake between two memory-BIO connections."""
    done = {id(server): False, id(client): False}
    for _ in range(20):
        for conn, peer in ((client, server), (server, client)):
            if not done[id(conn)]:
                try:
                    conn.do_handshake()
                    done[id(conn)] = True
                except SSL.WantReadError:
                    pass
            with contextlib.suppress(SSL.WantReadError):
                peer.bio_write(conn.bio_read(65536))
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def test_pki_configure_pyopenssl_serves_chain_and_staple(pki: TestPKI) -> None:
    leaf = pki.issue_leaf("tls.test", must_staple=True)
    # OpenSSL drops a staple that is not an OCSP response, so staple a real one.
    staple_der = OcspResponder(pki).response_for(leaf)
    server_ctx = SSL.Context(SSL.TLS_METHOD)
    leaf.configure_pyopenssl(server_ctx)
    server_ctx.set_ocsp_server_callback(lambda conn, data: staple_der)

    seen: list[bytes] = []

    def on_staple(conn: SSL.Connection, der: bytes, data: object) -> bool:
        seen.append(der)
        return True

    client_ctx = SSL.Context(SSL.TLS_METHOD)
    client_ctx.set_verify(SSL.VERIFY_PEER)
    pki.configure_trust(client_ctx)
    client_ctx.set_ocsp_client_callback(on_staple)

    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    client.request_ocsp()
    _handshake(server, client)
    assert client.get_peer_cert_chain(as_cryptography=True) == leaf.chain
    assert seen == [staple_der]


def test_pki_configure_trust_stdlib(pki: TestPKI) -> None:
    import ssl

    ctx = ssl.create_default_context(cafile=None)
    before = len(ctx.get_ca_certs())
    pki.configure_trust(ctx)
    assert len(ctx.get_ca_certs()) == before + 1


def test_pki_issue_intermediate(pki: TestPKI) -> None:
    sub = pki.intermediate.issue_intermediate("sub")
    leaf = sub.issue_leaf("deep.test")
    assert leaf.chain == [leaf.cert, sub.cert, pki.intermediate.cert]
    assert sub in pki.cas
    assert isinstance(sub, CA)


# -- OcspResponder: the happy paths ------------------------------------------------------------


async def test_responder_post_answers_signed_good(
    responder: OcspResponder,
    session: aiohttp.ClientSession,
    leaf: Leaf,
    pki: TestPKI,
    clock: FakeClock,
) -> None:
    resp = ocsp.load_der_ocsp_response(await fetch(responder, session, leaf))
    assert resp.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    assert resp.certificate_status is ocsp.OCSPCertStatus.GOOD
    assert resp.serial_number == leaf.cert.serial_number
    assert isinstance(resp.hash_algorithm, hashes.SHA1)
    assert resp.responder_name == pki.intermediate.cert.subject
    assert resp.certificates == []
    assert resp.this_update_utc == clock.now() - timedelta(minutes=1)
    assert resp.next_update_utc == resp.this_update_utc + timedelta(hours=24)
    assert resp.produced_at_utc == clock.now()  # follows the fake clock, not real time
    verify_signature(resp, pki.intermediate.cert)
    with pytest.raises(InvalidSignature):
        verify_signature(resp, pki.root.cert)
    assert responder.requests == 1
    assert responder.log == [("POST", "good")]


@pytest.mark.parametrize("algorithm", [hashes.SHA1(), hashes.SHA256()], ids=["sha1", "sha256"])
async def test_responder_get_with_and_without_escaping(
    responder: OcspResponder,
    session: aiohttp.ClientSession,
    leaf: Leaf,
    pki: TestPKI,
    algorithm: hashes.HashAlgorithm,
) -> None:
    der = request_der(leaf, algorithm)
    raw = base64.b64encode(der).decode()
    urls = [
        yarl.URL(get_url(responder.url, der), encoded=True),  # /ocsp/<escaped>
        yarl.URL(f"{responder.base_url}/{raw}", encoded=True),  # /<raw>, '/' and '+' as is
        yarl.URL(f"{responder.base_url}/a/b/{raw.rstrip('=')}", encoded=True),  # no padding
    ]
    for url in urls:
        async with session.get(url) as http:
            assert http.status == 200
            resp = ocsp.load_der_ocsp_response(await http.read())
        assert resp.certificate_status is ocsp.OCSPCertStatus.GOOD
        assert type(resp.hash_algorithm) is type(algorithm)
        assert resp.issuer_key_hash == ocsp.load_der_ocsp_request(der).issuer_key_hash
        verify_signature(resp, pki.intermediate.cert)
    assert responder.log == [("GET", "good")] * 3


async def test_responder_revoke_and_set_status(
    responder: OcspResponder, session: aiohttp.ClientSession, leaf: Leaf, clock: FakeClock
) -> None:
    assert responder.status_of(leaf) == "good"
    when = clock.now() - timedelta(days=2)
    responder.revoke(leaf, reason=x509.ReasonFlags.superseded, at=when)
    resp = ocsp.load_der_ocsp_response(await fetch(responder, session, leaf))
    assert resp.certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert resp.revocation_time_utc == when
    assert resp.revocation_reason is x509.ReasonFlags.superseded

    responder.set_status(leaf.cert, "unknown")
    resp = ocsp.load_der_ocsp_response(await fetch(responder, session, leaf))
    assert resp.certificate_status is ocsp.OCSPCertStatus.UNKNOWN

    responder.set_status(leaf, "revoked")
    resp = ocsp.load_der_ocsp_response(await fetch(responder, session, leaf))
    assert resp.certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert resp.revocation_time_utc == clock.now()
    assert resp.revocation_reason is None

    responder.set_status(leaf, "good")
    resp = ocsp.load_der_ocsp_response(await fetch(responder, session, leaf))
    assert resp.certificate_status is ocsp.OCSPCertStatus.GOOD
    assert [outcome for _, outcome in responder.log] == ["revoked", "unknown", "revoked", "good"]
    with pytest.raises(ValueError, match="status"):
        responder.set_status(leaf, "bad")  # type: ignore[arg-type]


async def test_responder_unknown_serial_and_foreign_issuer(
    responder: OcspResponder, session: aiohttp.ClientSession, leaf: Leaf
) -> None:
    known = ocsp.load_der_ocsp_request(request_der(leaf))
    forged = (
        ocsp.OCSPRequestBuilder()
        .add_certificate_by_hash(
            known.issuer_name_hash, known.issuer_key_hash, 12345, hashes.SHA1()
        )
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    _, _, body, _ = await post(session, responder.url, forged)
    resp = ocsp.load_der_ocsp_response(body)
    assert resp.certificate_status is ocsp.OCSPCertStatus.UNKNOWN
    assert resp.serial_number == 12345

    stranger = TestPKI().issue_leaf()
    _, _, body, _ = await post(session, responder.url, request_der(stranger))
    resp = ocsp.load_der_ocsp_response(body)
    assert resp.response_status is ocsp.OCSPResponseStatus.UNAUTHORIZED
    assert responder.status_of(stranger) == "unknown"


async def test_responder_answers_for_every_ca(
    responder: OcspResponder, session: aiohttp.ClientSession, pki: TestPKI
) -> None:
    for issuer in (pki.root, pki.rogue):
        leaf = pki.issue_leaf(issuer=issuer)
        resp = ocsp.load_der_ocsp_response(await fetch(responder, session, leaf))
        assert resp.certificate_status is ocsp.OCSPCertStatus.GOOD
        assert resp.responder_name == issuer.cert.subject
        verify_signature(resp, issuer.cert)


async def test_responder_delegated_signer(
    pki: TestPKI, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    leaf = pki.issue_leaf()
    async with OcspResponder(pki, clock=clock, signer="delegated") as responder:
        resp = ocsp.load_der_ocsp_response(await fetch(responder, session, leaf))
    assert resp.responder_name is None
    assert (
        resp.responder_key_hash
        == x509.SubjectKeyIdentifier.from_public_key(pki.responder.cert.public_key()).digest
    )
    assert resp.certificates == [pki.responder.cert]
    verify_signature(resp, pki.responder.cert)
    with pytest.raises(InvalidSignature):
        verify_signature(resp, pki.intermediate.cert)

    custom = pki.intermediate.issue_responder(not_after=clock.now() + timedelta(hours=1))
    async with OcspResponder(pki, clock=clock, signer=custom) as responder:
        resp = ocsp.load_der_ocsp_response(await fetch(responder, session, leaf))
    assert resp.certificates == [custom.cert]
    verify_signature(resp, custom.cert)
    with pytest.raises(ValueError, match="signer"):
        OcspResponder(pki, signer="nobody")  # type: ignore[arg-type]


@pytest.mark.parametrize("key_type", ["rsa", "ed25519"])
async def test_responder_signs_with_any_ca_key_type(
    key_type: KeyType, session: aiohttp.ClientSession
) -> None:
    pki = TestPKI(key_type=key_type)
    leaf = pki.issue_leaf()
    async with OcspResponder(pki) as responder:
        resp = ocsp.load_der_ocsp_response(await fetch(responder, session, leaf))
    verify_signature(resp, pki.intermediate.cert)
    assert resp.certificate_status is ocsp.OCSPCertStatus.GOOD


def _multi_request(*ders: bytes) -> bytes:
    """Merge single-CertID requests into one request with several CertIDs."""
    requests = b""
    for der in ders:
        tbs = children(der, read_whole(der, SEQUENCE))[0]
        request_list = children(der, tbs)[0]
        requests += der[request_list.body : request_list.end]
    return encode_tlv(0x30, encode_tlv(0x30, encode_tlv(0x30, requests)))


async def test_responder_answers_each_certid(
    responder: OcspResponder, session: aiohttp.ClientSession, pki: TestPKI, leaf: Leaf
) -> None:
    other = pki.issue_leaf("other.test")
    responder.revoke(other)
    der = _multi_request(request_der(leaf), request_der(other, hashes.SHA256()))
    _, _, body, _ = await post(session, responder.url, der)
    resp = ocsp.load_der_ocsp_response(body)
    singles = list(resp.responses)
    assert [s.serial_number for s in singles] == [leaf.cert.serial_number, other.cert.serial_number]
    assert [s.certificate_status for s in singles] == [
        ocsp.OCSPCertStatus.GOOD,
        ocsp.OCSPCertStatus.REVOKED,
    ]
    assert isinstance(singles[1].hash_algorithm, hashes.SHA256)
    verify_signature(resp, pki.intermediate.cert)
    assert responder.log == [("POST", "good,revoked")]

    mixed = _multi_request(request_der(leaf), request_der(pki.issue_leaf(issuer=pki.root)))
    _, _, body, _ = await post(session, responder.url, mixed)
    unauthorized = ocsp.OCSPResponseStatus.UNAUTHORIZED
    assert ocsp.load_der_ocsp_response(body).response_status is unauthorized


async def test_responder_echoes_nonce(
    responder: OcspResponder, session: aiohttp.ClientSession, leaf: Leaf, pki: TestPKI
) -> None:
    der = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(leaf.cert, pki.intermediate.cert, hashes.SHA1())
        .add_extension(x509.OCSPNonce(b"0123456789abcdef"), critical=False)
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    _, _, body, _ = await post(session, responder.url, der)
    resp = ocsp.load_der_ocsp_response(body)
    nonce = resp.extensions.get_extension_for_class(x509.OCSPNonce).value
    assert nonce.nonce == b"0123456789abcdef"
    verify_signature(resp, pki.intermediate.cert)


async def test_responder_caching_headers(
    pki: TestPKI, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    leaf = pki.issue_leaf()
    async with OcspResponder(pki, clock=clock, max_age=600) as responder:
        _, _, body, headers = await post(session, responder.url, request_der(leaf))
        assert headers["Cache-Control"] == "max-age=600, public, no-transform, must-revalidate"
        resp = ocsp.load_der_ocsp_response(body)

        def header_time(name: str) -> datetime:
            return email.utils.parsedate_to_datetime(headers[name])

        assert header_time("Date") == clock.now()
        assert header_time("Last-Modified") == resp.this_update_utc
        assert header_time("Expires") == clock.now() + timedelta(seconds=600)

        responder.max_age = None
        _, _, _, headers = await post(session, responder.url, request_der(leaf))
        assert "Cache-Control" not in headers
        assert "Expires" not in headers


async def test_responder_follows_the_clock_and_validity(
    pki: TestPKI, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    leaf = pki.issue_leaf()
    async with OcspResponder(
        pki, clock=clock, validity=timedelta(hours=4), backdate=timedelta(0)
    ) as responder:
        first = ocsp.load_der_ocsp_response(await fetch(responder, session, leaf))
        clock.advance(7200)
        second = ocsp.load_der_ocsp_response(await fetch(responder, session, leaf))
    assert first.this_update_utc == T0
    assert first.next_update_utc == T0 + timedelta(hours=4)
    assert second.this_update_utc == T0 + timedelta(hours=2)
    assert second.produced_at_utc == T0 + timedelta(hours=2)


async def test_responder_serves_issuer(
    responder: OcspResponder, session: aiohttp.ClientSession, pki: TestPKI
) -> None:
    url = responder.serve_issuer(pki.intermediate)
    assert url == f"{responder.base_url}/issuer/intermediate.der"
    responder.fault = Fault.DOWN  # faults are for OCSP only
    async with session.get(url) as http:
        assert http.status == 200
        assert http.content_type == "application/pkix-cert"
        assert x509.load_der_x509_certificate(await http.read()) == pki.intermediate.cert
    assert responder.log == [("GET", "issuer")]


async def test_responder_refuses_bad_requests(
    responder: OcspResponder, session: aiohttp.ClientSession, leaf: Leaf
) -> None:
    async with session.get(f"{responder.url}/bm90IGEgcmVxdWVzdA==") as http:
        resp = ocsp.load_der_ocsp_response(await http.read())
        assert resp.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    async with session.post(responder.url, data=b"\x30\x00", headers=_OCSP_POST) as http:
        resp = ocsp.load_der_ocsp_response(await http.read())
        assert resp.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    async with session.post(responder.url, data=request_der(leaf)) as http:
        assert http.status == 415
    async with session.put(responder.url, data=request_der(leaf)) as http:
        assert http.status == 405
    assert [outcome for _, outcome in responder.log] == [
        "malformed_request",
        "malformed_request",
        "bad_content_type",
        "method_not_allowed",
    ]
    assert responder.requests == 4


_OCSP_POST = {"Content-Type": "application/ocsp-request"}


@pytest.mark.parametrize(
    "body",
    [
        b"\x30",  # a truncated header
        b"\x30\x02\x30\x00",  # an empty TBSRequest: no requestList
        b"\x30\x04\x30\x02\xa0\x00",  # a TBSRequest with only a version
        b"\x30\x04\x30\x02\x30\x00",  # an empty requestList
        b"\x30\x06\x30\x04\x30\x02\x30\x00",  # a Request without a CertID
        b"\x30\x80\x30\x00\x00\x00",  # indefinite length
    ],
    ids=["truncated", "no-request-list", "version-only", "empty-list", "no-cert-id", "indefinite"],
)
async def test_responder_answers_any_malformed_request_with_malformed_request(
    responder: OcspResponder, session: aiohttp.ClientSession, body: bytes
) -> None:
    async with session.post(responder.url, data=body, headers=_OCSP_POST) as http:
        assert http.status == 200
        resp = ocsp.load_der_ocsp_response(await http.read())
        assert resp.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    assert responder.log == [("POST", "malformed_request")]


async def test_responder_response_for_needs_no_http(pki: TestPKI, clock: FakeClock) -> None:
    responder = OcspResponder(pki, clock=clock)
    leaf = pki.issue_leaf()
    resp = ocsp.load_der_ocsp_response(responder.response_for(leaf))
    assert resp.certificate_status is ocsp.OCSPCertStatus.GOOD
    resp = ocsp.load_der_ocsp_response(responder.response_for(leaf.cert, algorithm=hashes.SHA256()))
    assert isinstance(resp.hash_algorithm, hashes.SHA256)
    responder.fault = "expired"
    resp = ocsp.load_der_ocsp_response(responder.response_for(leaf))
    assert resp.next_update_utc is not None
    assert resp.next_update_utc < clock.now()
    assert responder.requests == 0
    with pytest.raises(RuntimeError, match="start"):
        _ = responder.url


# -- OcspResponder: faults -------------------------------------------------------------------


def test_fault_coercion(pki: TestPKI) -> None:
    responder = OcspResponder(pki)
    responder.fault = "DOWN"
    assert responder.fault is Fault.DOWN
    responder.fault = " Try_Later"
    assert responder.fault is Fault.TRY_LATER
    responder.fault = Fault.GARBAGE
    assert responder.fault is Fault.GARBAGE
    responder.fault = None
    assert responder.fault is None
    with pytest.raises(ValueError, match="try_later"):
        responder.fault = "broken"


Check = Callable[[int, str, bytes, TestPKI, Leaf, datetime], None]


def _parsed(body: bytes) -> ocsp.OCSPResponse:
    return ocsp.load_der_ocsp_response(body)


def _successful(body: bytes) -> ocsp.OCSPResponse:
    resp = _parsed(body)
    assert resp.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    return resp


def _check_unsuccessful(status: ocsp.OCSPResponseStatus) -> Check:
    def check(code: int, ctype: str, body: bytes, pki: TestPKI, leaf: Leaf, now: datetime) -> None:
        assert (code, ctype) == (200, "application/ocsp-response")
        assert _parsed(body).response_status is status

    return check


def _check_not_der(code: int, ctype: str, body: bytes, *_: object) -> None:
    assert (code, ctype) == (200, "application/ocsp-response")
    with pytest.raises(ValueError, match="asn1"):
        _parsed(body)


def _check_oversize(code: int, ctype: str, body: bytes, *_: object) -> None:
    assert len(body) == 1 << 20


def _check_http_500(code: int, ctype: str, body: bytes, *_: object) -> None:
    assert code == 500


def _check_http_status(status: int) -> Check:
    def check(code: int, ctype: str, body: bytes, *_: object) -> None:
        assert (code, ctype) == (status, "text/plain")
        assert body.startswith(f"{status} ".encode())

    return check


def _check_html(code: int, ctype: str, body: bytes, *_: object) -> None:
    assert (code, ctype) == (200, "text/html")
    assert body.startswith(b"<!doctype html>")


def _check_wrong_type(
    code: int, ctype: str, body: bytes, pki: TestPKI, leaf: Leaf, now: datetime
) -> None:
    assert ctype == "text/plain"
    verify_signature(_successful(body), pki.intermediate.cert)


def _check_status(status: ocsp.OCSPCertStatus) -> Check:
    def check(code: int, ctype: str, body: bytes, pki: TestPKI, leaf: Leaf, now: datetime) -> None:
        resp = _successful(body)
        assert resp.certificate_status is status
        verify_signature(resp, pki.intermediate.cert)
        if status is ocsp.OCSPCertStatus.REVOKED:
            assert resp.revocation_time_utc is not None
            assert resp.revocation_time_utc < resp.this_update_utc

    return check


def _check_expired(
    code: int, ctype: str, body: bytes, pki: TestPKI, leaf: Leaf, now: datetime
) -> None:
    resp = _successful(body)
    assert resp.next_update_utc is not None
    assert resp.this_update_utc < resp.next_update_utc < now
    verify_signature(resp, pki.intermediate.cert)


def _check_future(
    code: int, ctype: str, body: bytes, pki: TestPKI, leaf: Leaf, now: datetime
) -> None:
    resp = _successful(body)
    assert resp.this_update_utc == now + timedelta(days=1)
    verify_signature(resp, pki.intermediate.cert)


def _check_no_next_update(
    code: int, ctype: str, body: bytes, pki: TestPKI, leaf: Leaf, now: datetime
) -> None:
    resp = _successful(body)
    assert resp.next_update_utc is None
    verify_signature(resp, pki.intermediate.cert)


def _check_wrong_signer(
    code: int, ctype: str, body: bytes, pki: TestPKI, leaf: Leaf, now: datetime
) -> None:
    resp = _successful(body)
    assert resp.responder_name == pki.rogue.cert.subject
    verify_signature(resp, pki.rogue.cert)
    with pytest.raises(InvalidSignature):
        verify_signature(resp, pki.intermediate.cert)


def _check_signer_without_eku(
    code: int, ctype: str, body: bytes, pki: TestPKI, leaf: Leaf, now: datetime
) -> None:
    resp = _successful(body)
    assert resp.certificates == [pki.responder_without_eku.cert]
    assert resp.responder_name is None
    verify_signature(resp, pki.responder_without_eku.cert)


def _check_wrong_cert(
    code: int, ctype: str, body: bytes, pki: TestPKI, leaf: Leaf, now: datetime
) -> None:
    resp = _successful(body)
    assert resp.serial_number != leaf.cert.serial_number
    assert resp.certificate_status is ocsp.OCSPCertStatus.GOOD
    verify_signature(resp, pki.intermediate.cert)


CHECKS: dict[Fault, Check] = {
    Fault.HTTP_404: _check_http_status(404),
    Fault.HTTP_500: _check_http_500,
    Fault.HTTP_503: _check_http_status(503),
    Fault.HTML_ERROR: _check_html,
    Fault.WRONG_CONTENT_TYPE: _check_wrong_type,
    Fault.TRY_LATER: _check_unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER),
    Fault.UNAUTHORIZED: _check_unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED),
    Fault.MALFORMED_REQUEST: _check_unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST),
    Fault.GARBAGE: _check_not_der,
    Fault.TRUNCATED: _check_not_der,
    Fault.OVERSIZE: _check_oversize,
    Fault.UNKNOWN: _check_status(ocsp.OCSPCertStatus.UNKNOWN),
    Fault.REVOKED: _check_status(ocsp.OCSPCertStatus.REVOKED),
    Fault.EXPIRED: _check_expired,
    Fault.FUTURE: _check_future,
    Fault.NO_NEXT_UPDATE: _check_no_next_update,
    Fault.WRONG_SIGNER: _check_wrong_signer,
    Fault.SIGNER_WITHOUT_EKU: _check_signer_without_eku,
    Fault.WRONG_CERT: _check_wrong_cert,
}


# Faults about how (or whether) the answer is sent, each with a test of its own below.
SENDING_FAULTS = {
    Fault.DOWN,
    Fault.SLOW,
    Fault.CONNECTION_RESET,
    Fault.SLOW_BODY,
    Fault.REDIRECT_LOOP,
    Fault.REDIRECT_FILE,
    Fault.REDIRECT_FTP,
    Fault.GZIP_BOMB,
    Fault.REPLAY,
}


def test_every_fault_is_checked() -> None:
    assert set(CHECKS) | SENDING_FAULTS == set(Fault)
    assert not set(CHECKS) & SENDING_FAULTS


@pytest.mark.parametrize("fault", list(CHECKS), ids=lambda f: f.value)
async def test_fault(
    fault: Fault,
    responder: OcspResponder,
    session: aiohttp.ClientSession,
    leaf: Leaf,
    pki: TestPKI,
    clock: FakeClock,
) -> None:
    responder.fault = fault.value.upper()
    der = request_der(leaf)
    for method in ("POST", "GET"):
        if method == "POST":
            code, ctype, body, _ = await post(session, responder.url, der)
        else:
            async with session.get(yarl.URL(get_url(responder.url, der), encoded=True)) as http:
                code, ctype, body = http.status, http.content_type, await http.read()
        CHECKS[fault](code, ctype, body, pki, leaf, clock.now())
    assert responder.log == [("POST", fault.value), ("GET", fault.value)]

    responder.fault = None  # takes effect on the next request
    resp = ocsp.load_der_ocsp_response(await fetch(responder, session, leaf))
    assert resp.certificate_status is ocsp.OCSPCertStatus.GOOD
    assert resp.serial_number == leaf.cert.serial_number
    assert responder.requests == 3


async def test_fault_down_resets_the_connection(
    responder: OcspResponder, leaf: Leaf, pki: TestPKI
) -> None:
    responder.fault = "down"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            await post(session, responder.url, request_der(leaf))
        assert responder.log == [("POST", "down")]
        with pytest.raises(aiohttp.ClientError):
            async with session.get(get_url(responder.url, request_der(leaf))):
                pass
        # aiohttp retries an idempotent GET once after a reset; every try is counted.
        assert responder.requests == len(responder.log) >= 2
        assert set(responder.log[1:]) == {("GET", "down")}
        responder.fault = None
        await fetch(responder, session, leaf)


async def test_fault_slow_answers_late(
    responder: OcspResponder, session: aiohttp.ClientSession, leaf: Leaf
) -> None:
    responder.fault = Fault.SLOW
    responder.slow_seconds = 0.01
    resp = ocsp.load_der_ocsp_response(await fetch(responder, session, leaf))
    assert resp.certificate_status is ocsp.OCSPCertStatus.GOOD
    assert responder.log == [("POST", "slow")]


async def test_fault_slow_is_cut_short_by_close(pki: TestPKI, leaf: Leaf) -> None:
    responder = OcspResponder(pki)
    await responder.start()
    responder.fault = Fault.SLOW  # 30 s by default
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        pending = asyncio.create_task(post(session, responder.url, request_der(leaf)))
        await responder.wait_for_requests(1)  # logged as soon as it starts waiting
        assert responder.log == [("POST", "slow")]
        started = asyncio.get_running_loop().time()
        await responder.close()
        assert asyncio.get_running_loop().time() - started < 2
        with pytest.raises(aiohttp.ClientError):
            await pending
    assert responder.log == [("POST", "slow")]


async def test_fault_slow_lets_a_client_time_out(
    responder: OcspResponder, leaf: Leaf, session: aiohttp.ClientSession
) -> None:
    responder.fault = Fault.SLOW
    with pytest.raises(TimeoutError):
        async with session.post(
            responder.url,
            data=request_der(leaf),
            headers=_OCSP_POST,
            timeout=aiohttp.ClientTimeout(total=0.05),
        ):
            pass


async def test_fault_http_503_says_retry_after(
    responder: OcspResponder, session: aiohttp.ClientSession, leaf: Leaf
) -> None:
    responder.fault = Fault.HTTP_503
    code, _, _, headers = await post(session, responder.url, request_der(leaf))
    assert code == 503
    assert headers["Retry-After"] == "120"


async def test_fault_connection_reset_mid_body(
    responder: OcspResponder, session: aiohttp.ClientSession, leaf: Leaf
) -> None:
    responder.fault = Fault.CONNECTION_RESET
    async with session.post(responder.url, data=request_der(leaf), headers=_OCSP_POST) as resp:
        assert resp.status == 200  # the headers arrived ...
        assert resp.content_type == "application/ocsp-response"
        length = resp.content_length
        assert length is not None and length > 100
        with pytest.raises(aiohttp.ClientPayloadError):  # ... half the body did not
            await resp.read()
    assert responder.log == [("POST", "connection_reset")]
    responder.fault = None
    await fetch(responder, session, leaf)


async def test_fault_slow_body_sends_headers_then_waits(
    responder: OcspResponder, session: aiohttp.ClientSession, leaf: Leaf
) -> None:
    responder.fault = Fault.SLOW_BODY
    responder.slow_seconds = 30
    async with session.post(responder.url, data=request_der(leaf), headers=_OCSP_POST) as resp:
        assert resp.status == 200  # headers at once: only a total timeout helps
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await resp.read()
    responder.slow_seconds = 0.01
    async with session.post(responder.url, data=request_der(leaf), headers=_OCSP_POST) as resp:
        body = await resp.read()
    assert ocsp.load_der_ocsp_response(body).certificate_status is ocsp.OCSPCertStatus.GOOD
    assert responder.log == [("POST", "slow_body"), ("POST", "slow_body")]


@pytest.mark.parametrize(
    ("fault", "location"),
    [
        (Fault.REDIRECT_FILE, "file:///etc/passwd"),
        (Fault.REDIRECT_FTP, "ftp://127.0.0.1/ocsp"),
        (Fault.REDIRECT_LOOP, "/ocsp"),
    ],
)
async def test_fault_redirects(
    responder: OcspResponder,
    session: aiohttp.ClientSession,
    leaf: Leaf,
    fault: Fault,
    location: str,
) -> None:
    responder.fault = fault
    async with session.post(
        responder.url,
        data=request_der(leaf),
        headers=_OCSP_POST,
        allow_redirects=False,
    ) as resp:
        assert resp.status in (302, 307)
        assert resp.headers["Location"] == location
    # Following: a loop ends in TooManyRedirects, anything else leaves HTTP (refused).
    with pytest.raises(aiohttp.ClientError):
        async with session.post(
            responder.url, data=request_der(leaf), headers=_OCSP_POST, max_redirects=3
        ):
            pass
    assert set(responder.log) == {("POST", fault.value)}


async def test_fault_gzip_bomb(responder: OcspResponder, leaf: Leaf) -> None:
    from staple.testing._faults import GZIP_BOMB_BYTES

    responder.fault = Fault.GZIP_BOMB
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.post(responder.url, data=request_der(leaf), headers=_OCSP_POST) as resp,
    ):
        assert resp.headers["Content-Encoding"] == "gzip"
        assert resp.headers["Transfer-Encoding"] == "chunked"
        assert resp.content_type == "application/ocsp-response"
        compressed = await resp.read()
    assert len(compressed) < 200 * 1024
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    inflated = 0
    pending = compressed
    while pending:  # inflate in bounded steps: the test must not hold 100 MiB either
        inflated += len(inflater.decompress(pending, 1 << 20))
        pending = inflater.unconsumed_tail
    assert inflated == GZIP_BOMB_BYTES
    assert responder.log == [("POST", "gzip_bomb")]


async def test_fault_replay_sends_the_first_response_signed(
    responder: OcspResponder, session: aiohttp.ClientSession, leaf: Leaf, clock: FakeClock
) -> None:
    other = responder.pki.issue_leaf("other.test")
    responder.fault = Fault.REPLAY  # nothing signed yet: answered normally, and remembered
    first = await fetch(responder, session, leaf)
    responder.fault = None
    clock.advance(3600)
    newer = await fetch(responder, session, leaf)
    assert ocsp.load_der_ocsp_response(newer).this_update_utc > (
        ocsp.load_der_ocsp_response(first).this_update_utc
    )
    responder.fault = "replay"
    assert await fetch(responder, session, leaf) == first  # byte for byte
    assert responder.response_for(leaf) == first  # without HTTP too
    # Per certificate: another one's first response is its own.
    replayed = ocsp.load_der_ocsp_response(await fetch(responder, session, other))
    assert replayed.serial_number == other.cert.serial_number
    assert responder.log == [("POST", "good"), ("POST", "good"), ("POST", "replay"),
                             ("POST", "good")]  # fmt: skip


# -- OcspResponder: lifecycle and counters ---------------------------------------------------


async def test_responder_lifecycle(pki: TestPKI, session: aiohttp.ClientSession) -> None:
    responder = OcspResponder(pki)
    with pytest.raises(RuntimeError, match="start"):
        responder.serve_issuer(pki.root)
    await responder.start()
    with pytest.raises(RuntimeError, match="already running"):
        await responder.start()
    url = responder.url
    assert url.startswith("http://127.0.0.1:")
    assert url.endswith("/ocsp")
    await responder.close()
    await responder.close()  # idempotent
    leaf = pki.issue_leaf(ocsp_url=url)
    with pytest.raises(aiohttp.ClientError):
        await post(session, url, request_der(leaf))

    await responder.start()  # comes back on the same port, so certificate URLs still work
    try:
        assert responder.url == url
        await fetch(responder, session, leaf)
    finally:
        await responder.close()


async def test_responder_wait_for_requests(
    responder: OcspResponder, session: aiohttp.ClientSession, leaf: Leaf
) -> None:
    await responder.wait_for_requests(0)
    waiter = asyncio.create_task(responder.wait_for_requests(2))
    await fetch(responder, session, leaf)
    await asyncio.sleep(0)
    assert not waiter.done()
    responder.fault = Fault.TRY_LATER
    await fetch(responder, session, leaf)
    await waiter
    assert responder.requests == 2
    assert responder.log == [("POST", "good"), ("POST", "try_later")]
