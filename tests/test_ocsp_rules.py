"""Every rule of validate(): a response that breaks exactly that rule must be refused.

Each refused case is paired with the same construction minus the fault, which must pass, so a
test can't pass merely because the builder made something broken.
"""

from __future__ import annotations

import base64
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509 import ocsp as x509_ocsp
from hypothesis import given
from hypothesis import strategies as st

from staple import errors, ocsp
from staple.testing import TestPKI

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def pki() -> TestPKI:
    return TestPKI(now=NOW)


@dataclass
class Resp:
    """Knobs for one response; the defaults make a valid issuer-signed 'good' response."""

    status: x509_ocsp.OCSPCertStatus = x509_ocsp.OCSPCertStatus.GOOD
    this_update: datetime = NOW - timedelta(hours=1)
    next_update: datetime | None = NOW + timedelta(days=1)
    signer: str = "issuer"  # issuer | delegated | no_eku | rogue | root
    by_hash: bool = False
    hash_algorithm: type[hashes.HashAlgorithm] = hashes.SHA1
    serial_delta: int = 0
    about_other_issuer: bool = False
    extra_certs: list[x509.Certificate] = field(default_factory=list)


def build(pki: TestPKI, leaf: Any, r: Resp) -> bytes:
    issuer = pki.intermediate
    subject_cert = leaf.cert
    if r.serial_delta:
        subject_cert = pki.issue_leaf("other.test").cert
    builder = x509_ocsp.OCSPResponseBuilder().add_response(
        cert=subject_cert,
        issuer=pki.root.cert if r.about_other_issuer else issuer.cert,
        algorithm=r.hash_algorithm(),
        cert_status=r.status,
        this_update=r.this_update,
        next_update=r.next_update,
        revocation_time=NOW - timedelta(days=2)
        if r.status is x509_ocsp.OCSPCertStatus.REVOKED
        else None,
        revocation_reason=x509.ReasonFlags.key_compromise
        if r.status is x509_ocsp.OCSPCertStatus.REVOKED
        else None,
    )
    encoding = (
        x509_ocsp.OCSPResponderEncoding.HASH if r.by_hash else x509_ocsp.OCSPResponderEncoding.NAME
    )
    if r.signer == "issuer":
        cert, key = issuer.cert, issuer.key
    elif r.signer == "root":
        cert, key = pki.root.cert, pki.root.key
    elif r.signer == "rogue":
        cert, key = pki.rogue.cert, pki.rogue.key
    elif r.signer == "delegated":
        cert, key = pki.responder.cert, pki.responder.key
        builder = builder.certificates([cert])
    elif r.signer == "no_eku":
        cert, key = pki.responder_without_eku.cert, pki.responder_without_eku.key
        builder = builder.certificates([cert])
    else:
        raise AssertionError(r.signer)
    if r.extra_certs:
        builder = builder.certificates(r.extra_certs)
    builder = builder.responder_id(encoding, cert)
    algo = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    resp = builder.sign(key, algo)
    return resp.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def leaf(pki: TestPKI) -> Any:
    return pki.issue_leaf("rules.test")


def check(pki: TestPKI, leaf: Any, der: bytes, **kw: Any) -> ocsp.VerifiedResponse:
    return ocsp.validate(der, leaf.cert, pki.intermediate.cert, now=kw.pop("now", NOW), **kw)


# -- what passes ---------------------------------------------------------------------------


@pytest.mark.parametrize("signer", ["issuer", "delegated"])
@pytest.mark.parametrize("by_hash", [False, True])
@pytest.mark.parametrize("algo", [hashes.SHA1, hashes.SHA256])
def test_valid_responses_pass(pki, leaf, signer, by_hash, algo) -> None:
    der = build(pki, leaf, Resp(signer=signer, by_hash=by_hash, hash_algorithm=algo))
    v = check(pki, leaf, der)
    assert v.cert_status is ocsp.CertStatus.GOOD
    assert v.delegated is (signer == "delegated")
    assert v.cert_id.hash_algorithm == algo.name
    assert v.der == der


def test_revoked_passes_validation_with_details(pki, leaf) -> None:
    v = check(pki, leaf, build(pki, leaf, Resp(status=x509_ocsp.OCSPCertStatus.REVOKED)))
    assert v.cert_status is ocsp.CertStatus.REVOKED
    assert v.revocation_time == NOW - timedelta(days=2)
    assert v.revocation_reason is x509.ReasonFlags.key_compromise


@pytest.mark.parametrize("key_type", ["rsa", "ec", "ed25519"])
def test_signature_algorithms(key_type) -> None:
    """RSA PKCS#1 v1.5, ECDSA and Ed25519 signers all verify (PSS below)."""
    pki = TestPKI(now=NOW, key_type=key_type)
    leaf = pki.issue_leaf("alg.test", key_type=key_type)
    v = ocsp.validate(build(pki, leaf, Resp()), leaf.cert, pki.intermediate.cert, now=NOW)
    assert v.cert_status is ocsp.CertStatus.GOOD


def test_rsa_pss_signature() -> None:
    """RSASSA-PSS signatures verify (through the same code path responses use). cryptography
    can't sign OCSP responses with PSS, so a PSS-signed certificate exercises it."""
    pki = TestPKI(now=NOW, key_type="rsa")
    issuer = pki.intermediate
    assert isinstance(issuer.key, rsa.RSAPrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "pss.test")]))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .sign(
            issuer.key,
            hashes.SHA256(),
            rsa_padding=padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
        )
    )
    assert cert.signature_algorithm_oid == x509.SignatureAlgorithmOID.RSASSA_PSS
    ocsp.check_issued_by(cert, issuer.cert)
    other = TestPKI(now=NOW, key_type="rsa").intermediate.cert
    with pytest.raises(errors.IssuerMismatchError):
        ocsp.check_issued_by(cert, other)


# -- one rule broken at a time --------------------------------------------------------------


def test_garbage_is_bad_response(pki, leaf) -> None:
    with pytest.raises(errors.BadResponseError, match="not a DER OCSP response"):
        check(pki, leaf, b"\x30\x03garbage")


@pytest.mark.parametrize(
    "status",
    [
        x509_ocsp.OCSPResponseStatus.TRY_LATER,
        x509_ocsp.OCSPResponseStatus.UNAUTHORIZED,
        x509_ocsp.OCSPResponseStatus.MALFORMED_REQUEST,
        x509_ocsp.OCSPResponseStatus.INTERNAL_ERROR,
    ],
)
def test_unsuccessful_status(pki, leaf, status) -> None:
    der = x509_ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER
    )
    with pytest.raises(errors.ResponderStatusError) as info:
        check(pki, leaf, der)
    assert info.value.status == status.name.lower()


def test_other_serial_is_certid_mismatch(pki, leaf) -> None:
    with pytest.raises(errors.CertIdMismatchError, match="not about this certificate"):
        check(pki, leaf, build(pki, leaf, Resp(serial_delta=1)))


def test_other_issuer_hashes_are_certid_mismatch(pki, leaf) -> None:
    with pytest.raises(errors.CertIdMismatchError):
        check(pki, leaf, build(pki, leaf, Resp(about_other_issuer=True)))


def test_tampered_signature(pki, leaf) -> None:
    der = bytearray(build(pki, leaf, Resp()))
    der[-3] ^= 0x55
    with pytest.raises((errors.SignatureError, errors.BadResponseError)):
        check(pki, leaf, bytes(der))


def test_tampered_signed_field(pki, leaf) -> None:
    """Flip a byte of thisUpdate inside tbsResponseData: the signature must catch it."""
    good = build(pki, leaf, Resp())
    stamp = (NOW - timedelta(hours=1)).strftime("%Y%m%d%H%M%S").encode()
    i = good.index(stamp)
    der = good[:i] + stamp.replace(b"11", b"10", 1) + good[i + len(stamp) :]
    assert der != good
    check(pki, leaf, good)
    with pytest.raises(errors.SignatureError):
        check(pki, leaf, der)


def test_rogue_signer_is_unauthorized(pki, leaf) -> None:
    with pytest.raises(errors.UnauthorizedSignerError, match="neither the issuer"):
        check(pki, leaf, build(pki, leaf, Resp(signer="rogue")))


def test_grandparent_signer_is_unauthorized(pki, leaf) -> None:
    """The root may be trusted by clients, but RFC 6960 only authorises the issuer itself."""
    with pytest.raises(errors.UnauthorizedSignerError):
        check(pki, leaf, build(pki, leaf, Resp(signer="root")))


def test_delegate_without_eku_is_unauthorized(pki, leaf) -> None:
    with pytest.raises(errors.UnauthorizedSignerError, match="OCSPSigning"):
        check(pki, leaf, build(pki, leaf, Resp(signer="no_eku")))


def test_delegate_not_issued_by_issuer(pki, leaf) -> None:
    """A responder certificate with the EKU, but from another CA (the root)."""
    foreign = pki.root.issue_responder()
    builder = x509_ocsp.OCSPResponseBuilder().add_response(
        cert=leaf.cert,
        issuer=pki.intermediate.cert,
        algorithm=hashes.SHA1(),
        cert_status=x509_ocsp.OCSPCertStatus.GOOD,
        this_update=NOW - timedelta(hours=1),
        next_update=NOW + timedelta(days=1),
        revocation_time=None,
        revocation_reason=None,
    )
    der = (
        builder.certificates([foreign.cert])
        .responder_id(x509_ocsp.OCSPResponderEncoding.HASH, foreign.cert)
        .sign(foreign.key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    with pytest.raises(errors.UnauthorizedSignerError, match="not issued by the issuer"):
        check(pki, leaf, der)


def test_delegate_expired(pki, leaf) -> None:
    der = build(pki, leaf, Resp(signer="delegated"))
    after_responder = pki.responder.cert.not_valid_after_utc + timedelta(hours=1)
    with pytest.raises(errors.UnauthorizedSignerError, match="not valid now"):
        check(pki, leaf, der, now=after_responder, margin=timedelta(0))


def test_delegate_notafter_caps_expiry(pki, leaf) -> None:
    cap = pki.responder.cert.not_valid_after_utc
    der = build(pki, leaf, Resp(signer="delegated", next_update=cap + timedelta(days=30)))
    v = check(pki, leaf, der)
    assert v.expires == cap
    assert v.next_update == cap + timedelta(days=30)


def test_future_this_update(pki, leaf) -> None:
    der = build(pki, leaf, Resp(this_update=NOW + timedelta(minutes=10)))
    with pytest.raises(errors.NotYetValidError, match="in the future"):
        check(pki, leaf, der)
    # Within the skew it is fine (clocks differ).
    check(pki, leaf, build(pki, leaf, Resp(this_update=NOW + timedelta(minutes=4))))


def test_missing_next_update(pki, leaf) -> None:
    with pytest.raises(errors.ExpiredResponseError, match="no nextUpdate"):
        check(pki, leaf, build(pki, leaf, Resp(next_update=None)))


def test_expired(pki, leaf) -> None:
    der = build(
        pki, leaf, Resp(this_update=NOW - timedelta(days=2), next_update=NOW - timedelta(hours=1))
    )
    with pytest.raises(errors.ExpiredResponseError):
        check(pki, leaf, der)


def test_within_margin_is_refused(pki, leaf) -> None:
    der = build(pki, leaf, Resp(next_update=NOW + timedelta(minutes=4)))
    with pytest.raises(errors.ExpiredResponseError, match="less than"):
        check(pki, leaf, der)
    check(pki, leaf, der, margin=timedelta(minutes=3))


def test_unknown_is_refused(pki, leaf) -> None:
    der = build(pki, leaf, Resp(status=x509_ocsp.OCSPCertStatus.UNKNOWN))
    with pytest.raises(errors.UnknownStatusError):
        check(pki, leaf, der)


def test_wrong_issuer_given(pki, leaf) -> None:
    der = build(pki, leaf, Resp())
    with pytest.raises(errors.IssuerMismatchError, match="not the certificate's issuer"):
        ocsp.validate(der, leaf.cert, pki.root.cert, now=NOW)


def test_issuer_with_same_name_but_other_key() -> None:
    """An impostor CA with the issuer's exact name but its own key (like OpenSSL's WKIC)."""
    pki = TestPKI(now=NOW)
    leaf = pki.issue_leaf("impostor.test")
    real = pki.intermediate.cert
    key = ec.generate_private_key(ec.SECP256R1())
    impostor = (
        x509.CertificateBuilder()
        .subject_name(real.subject)
        .issuer_name(real.issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(real.not_valid_before_utc)
        .not_valid_after(real.not_valid_after_utc)
        .sign(key, hashes.SHA256())
    )
    der = build(pki, leaf, Resp())
    with pytest.raises(errors.IssuerMismatchError, match="does not verify"):
        ocsp.validate(der, leaf.cert, impostor, now=NOW)


def test_rollback(pki, leaf) -> None:
    older = check(pki, leaf, build(pki, leaf, Resp(this_update=NOW - timedelta(hours=3))))
    newer = check(pki, leaf, build(pki, leaf, Resp(this_update=NOW - timedelta(hours=1))))
    with pytest.raises(errors.RollbackError, match="older"):
        check(pki, leaf, older.der, current=newer)
    assert check(pki, leaf, newer.der, current=older) == newer
    assert check(pki, leaf, newer.der, current=newer) == newer  # same response is not older


def test_error_names_certificate(pki, leaf) -> None:
    with pytest.raises(errors.OcspError) as info:
        check(pki, leaf, b"junk")
    assert f"{leaf.cert.serial_number:#x}" in str(info.value)
    assert "rules.test" in str(info.value)
    assert info.value.subject is not None


# -- requests ---------------------------------------------------------------------------------


def test_request_and_get_url(pki, leaf) -> None:
    der = ocsp.build_request(leaf.cert, pki.intermediate.cert)
    req = x509_ocsp.load_der_ocsp_request(der)
    cid = ocsp.cert_id(leaf.cert, pki.intermediate.cert)
    assert req.serial_number == leaf.cert.serial_number == cid.serial_number
    assert req.issuer_key_hash == cid.issuer_key_hash
    assert req.issuer_name_hash == cid.issuer_name_hash
    url = ocsp.get_url("http://ocsp.test/", der)
    assert url is not None and url.startswith("http://ocsp.test/MF")
    assert "/" not in url[len("http://ocsp.test/") :] and "+" not in url
    assert ocsp.get_url("http://x", b"\0" * 200) is None  # 268 base64 chars: POST


def test_sha256_cert_id_differs(pki, leaf) -> None:
    a = ocsp.cert_id(leaf.cert, pki.intermediate.cert)
    b = ocsp.cert_id(leaf.cert, pki.intermediate.cert, algorithm="sha256")
    assert a.key != b.key and len(b.issuer_key_hash) == 32
    with pytest.raises(ValueError, match="unsupported"):
        ocsp.cert_id(leaf.cert, pki.intermediate.cert, algorithm="md5")


# -- what a handle passes to skip repeated work ---------------------------------------------


@pytest.mark.parametrize("algo", [hashes.SHA1, hashes.SHA256])
def test_expected_cert_id_matches_like_the_computed_one(pki, leaf, algo) -> None:
    """With ``expected`` (SHA-1, as a handle asks), a SHA-1 response matches it and a SHA-256
    one is matched the slow way: both pass, with the CertID they carry."""
    expected = ocsp.cert_id(leaf.cert, pki.intermediate.cert)
    v = check(pki, leaf, build(pki, leaf, Resp(hash_algorithm=algo)), expected=expected)
    assert v.cert_id == ocsp.cert_id(leaf.cert, pki.intermediate.cert, algorithm=algo.name)


def test_expected_cert_id_still_refuses_other_certificates(pki, leaf) -> None:
    expected = ocsp.cert_id(leaf.cert, pki.intermediate.cert)
    with pytest.raises(errors.CertIdMismatchError):
        check(pki, leaf, build(pki, leaf, Resp(serial_delta=1)), expected=expected)
    with pytest.raises(errors.CertIdMismatchError):
        check(pki, leaf, build(pki, leaf, Resp(about_other_issuer=True)), expected=expected)


def test_expected_cert_id_of_another_certificate_is_a_caller_bug(pki, leaf) -> None:
    other = pki.issue_leaf("other-expected.test")
    wrong = ocsp.cert_id(other.cert, pki.intermediate.cert)
    with pytest.raises(ValueError, match="another certificate"):
        check(pki, leaf, build(pki, leaf, Resp()), expected=wrong)


def test_subject_names_the_certificate_in_errors(pki, leaf) -> None:
    with pytest.raises(errors.OcspError) as info:
        check(pki, leaf, b"junk", subject="the described leaf")
    assert info.value.subject == "the described leaf"


def test_issuer_checked_skips_only_the_issuer_check(pki, leaf) -> None:
    """``issuer_checked=True`` trusts the caller on issuance; a response for the wrong issuer
    is still refused, by its CertID."""
    der = build(pki, leaf, Resp())
    assert check(pki, leaf, der, issuer_checked=True).cert_status is ocsp.CertStatus.GOOD
    with pytest.raises(errors.IssuerMismatchError):
        ocsp.validate(der, leaf.cert, pki.root.cert, now=NOW)
    with pytest.raises(errors.CertIdMismatchError):
        ocsp.validate(der, leaf.cert, pki.root.cert, now=NOW, issuer_checked=True)


# -- fast paths that must agree with the slow ones --------------------------------------------


@given(st.binary(min_size=1, max_size=190))
def test_get_url_escapes_as_urllib_does(request_der: bytes) -> None:
    url = ocsp.get_url("http://ocsp.test", request_der)
    encoded = base64.b64encode(request_der).decode()
    assert url == "http://ocsp.test/" + urllib.parse.quote(encoded, safe="")


@pytest.mark.parametrize("by_hash", [False, True])
def test_responder_name_read_from_the_signed_bytes(pki, leaf, by_hash) -> None:
    der = build(pki, leaf, Resp(by_hash=by_hash))
    tbs = x509_ocsp.load_der_ocsp_response(der).tbs_response_bytes
    name = ocsp._responder_name_der(tbs)
    assert name == (None if by_hash else pki.intermediate.cert.subject.public_bytes())
    assert ocsp._responder_name_der(b"\x30\x03\x02\x01\x00") is None
    assert ocsp._responder_name_der(tbs[:6]) is None  # truncated


def test_responder_name_encoded_otherwise_still_matches(pki, leaf) -> None:
    """A ResponderID naming the issuer with other string types (PrintableString, not
    UTF8String) is not the same bytes, but the same name: still the issuer's response."""
    issuer = pki.intermediate
    twin_name = x509.Name(
        [
            x509.NameAttribute(a.oid, a.value, _type=x509.name._ASN1Type.PrintableString)
            for a in issuer.cert.subject
        ]
    )
    assert twin_name.public_bytes() != issuer.cert.subject.public_bytes()
    assert twin_name == issuer.cert.subject
    twin = (
        x509.CertificateBuilder()
        .subject_name(twin_name)
        .issuer_name(twin_name)
        .public_key(issuer.key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .sign(issuer.key, hashes.SHA256())
    )
    der = (
        x509_ocsp.OCSPResponseBuilder()
        .add_response(
            cert=leaf.cert,
            issuer=issuer.cert,
            algorithm=hashes.SHA1(),
            cert_status=x509_ocsp.OCSPCertStatus.GOOD,
            this_update=NOW - timedelta(hours=1),
            next_update=NOW + timedelta(days=1),
            revocation_time=None,
            revocation_reason=None,
        )
        .responder_id(x509_ocsp.OCSPResponderEncoding.NAME, twin)
        .sign(issuer.key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    assert check(pki, leaf, der).delegated is False


def test_revocation_is_not_reversed(pki, leaf) -> None:
    revoked = check(pki, leaf, build(pki, leaf, Resp(status=x509_ocsp.OCSPCertStatus.REVOKED)))
    good_later = build(pki, leaf, Resp(this_update=NOW - timedelta(minutes=30)))
    with pytest.raises(errors.RevocationReversedError, match="keyCompromise"):
        check(pki, leaf, good_later, current=revoked)
    assert check(pki, leaf, good_later).cert_status is ocsp.CertStatus.GOOD  # nothing held
    later_revoked = build(pki, leaf, Resp(status=x509_ocsp.OCSPCertStatus.REVOKED, this_update=NOW))
    assert check(pki, leaf, later_revoked, current=revoked).cert_status is ocsp.CertStatus.REVOKED
