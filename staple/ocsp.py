"""The sans-I/O OCSP core: CertIDs, requests, and what makes a response acceptable.

Nothing here touches a socket, a file or a clock: every function is a pure function of bytes,
certificates and the ``now`` the caller passes. The refresher, the stores and the CLI are thin
shells around it, and every response they see - from the network, the disk or a shared store -
goes through :func:`validate` before it may be stapled.

Theory of operation of :func:`validate` (RFC 6960 §3.2 and §4.2.2.2, as OpenSSL applies them):

1. The given issuer must really have issued the certificate (name and signature), else we would
   ask about - and trust signatures for - the wrong CA.
2. responseStatus is ``successful`` and the body a BasicOCSPResponse.
3. One SingleResponse carries *our* CertID (issuer name hash, issuer key hash, serial), under
   whichever hash algorithm the responder chose.
4. The signer is found from the ResponderID: the issuer itself, or a certificate in the
   response's ``certs`` that the issuer issued directly, that carries id-kp-OCSPSigning and is
   valid now. Anything else is unauthorised, however valid its signature.
5. The signature over ``tbsResponseData`` verifies with the signer's key.
6. thisUpdate is not in the future (beyond ``skew``); nextUpdate exists; the effective expiry,
   min(nextUpdate, delegated signer's notAfter), lies more than ``margin`` ahead.
7. Status ``unknown`` is refused (never stapled); ``good`` and ``revoked`` are returned.
8. Rollback: given the response currently held, an older one is refused.
9. Revocation sticks: given a held ``revoked`` response, a ``good`` one is refused (revocation
   is permanent, RFC 5280 §3.3) unless the held one's reason is certificateHold. A responder that
   un-revokes is broken, restored from an old backup, or not the CA's.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp as x509_ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, SignatureAlgorithmOID

from .der import BIT_STRING, SEQUENCE, explicit, read_element, read_whole
from .errors import (
    BadResponseError,
    CertIdMismatchError,
    ExpiredResponseError,
    IssuerMismatchError,
    NotYetValidError,
    ResponderStatusError,
    RevocationReversedError,
    RollbackError,
    SignatureError,
    UnauthorizedSignerError,
    UnknownStatusError,
)

__all__ = [
    "DEFAULT_MARGIN",
    "DEFAULT_SKEW",
    "GET_LIMIT",
    "CertId",
    "CertStatus",
    "VerifiedResponse",
    "build_request",
    "cert_id",
    "check_issued_by",
    "check_not_older",
    "describe",
    "get_url",
    "validate",
]

CertStatus = x509_ocsp.OCSPCertStatus

DEFAULT_SKEW = timedelta(minutes=5)
"""How far in the future thisUpdate may lie: clocks of responders and servers disagree."""

DEFAULT_MARGIN = timedelta(minutes=5)
"""A response must stay valid at least this long to be stapled (a client's clock may be ahead)."""

GET_LIMIT = 255
"""RFC 5019 §5: use GET when the base64 request is at most 255 bytes, so caches can help."""

_VERSION = explicit(0)  # ResponseData.version, absent for v1
_BY_NAME = explicit(1)  # ResponderID byName; byKey is [2]

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def describe(cert: x509.Certificate) -> str:
    """Name a certificate in errors and logs: serial and subject (what an operator greps for)."""
    return f"serial {cert.serial_number:#x} ({cert.subject.rfc4514_string() or 'empty subject'})"


@dataclass(frozen=True, slots=True)
class CertId:
    """The OCSP CertID of a certificate: what a request asks about and a response answers."""

    hash_algorithm: str
    issuer_name_hash: bytes
    issuer_key_hash: bytes
    serial_number: int

    @property
    def key(self) -> str:
        """A stable, filename- and Redis-safe identifier, used by the stores."""
        return (
            f"{self.hash_algorithm}-{self.issuer_name_hash.hex()}-"
            f"{self.issuer_key_hash.hex()}-{self.serial_number:x}"
        )


def _issuer_hashes(
    cert: x509.Certificate, issuer: x509.Certificate, algorithm: str
) -> tuple[bytes, bytes]:
    # cryptography computes the CertID hashes (over the DER issuer name as the certificate
    # carries it, and over the *contents* of the issuer's subjectPublicKey BIT STRING) when it
    # builds a request; reuse that rather than re-parse DER here.
    builder = x509_ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, _HASHES[algorithm]())
    req = builder.build()
    return req.issuer_name_hash, req.issuer_key_hash


def cert_id(cert: x509.Certificate, issuer: x509.Certificate, *, algorithm: str = "sha1") -> CertId:
    """The CertID for ``cert`` issued by ``issuer``; SHA-1 (the default every CA answers) or
    SHA-256."""
    if algorithm not in _HASHES:
        raise ValueError(f"unsupported CertID hash {algorithm!r}; use one of {sorted(_HASHES)}")
    name_hash, key_hash = _issuer_hashes(cert, issuer, algorithm)
    return CertId(algorithm, name_hash, key_hash, cert.serial_number)


def build_request(
    cert: x509.Certificate, issuer: x509.Certificate, *, algorithm: str = "sha1"
) -> bytes:
    """DER of an OCSPRequest for one certificate, without a nonce (RFC 5019: cacheable)."""
    if algorithm not in _HASHES:
        raise ValueError(f"unsupported CertID hash {algorithm!r}; use one of {sorted(_HASHES)}")
    builder = x509_ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, _HASHES[algorithm]())
    return builder.build().public_bytes(serialization.Encoding.DER)


def get_url(responder_url: str, request_der: bytes) -> str | None:
    """The RFC 5019 GET URL for a request, or ``None`` when it is too long and must be POSTed.

    The base64 form is URL-escaped (``+``, ``/`` and ``=`` are not safe in a path segment).
    """
    encoded = base64.b64encode(request_der).decode("ascii")
    if len(encoded) > GET_LIMIT:
        return None
    # What urllib.parse.quote(encoded, safe="") gives for base64's alphabet, 20x faster.
    escaped = encoded.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
    return responder_url.rstrip("/") + "/" + escaped


@dataclass(frozen=True, slots=True)
class VerifiedResponse:
    """A response that passed :func:`validate`: the bytes to staple and what they say."""

    der: bytes
    cert_id: CertId
    cert_status: CertStatus
    this_update: datetime
    next_update: datetime
    produced_at: datetime
    expires: datetime
    """min(nextUpdate, the delegated signer's notAfter): past it, the response proves nothing."""
    signer: x509.Certificate
    delegated: bool
    revocation_time: datetime | None = None
    revocation_reason: x509.ReasonFlags | None = None

    @property
    def signer_name(self) -> str:
        return self.signer.subject.rfc4514_string()


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer``'s key verifies ``cert``'s signature.

    Not cached: a cache keyed by certificates keeps every leaf it saw alive, and thrashes past
    its size with thousands of chains. A handle checks its pair once, at open, and then
    validates with ``issuer_checked=True``.
    """
    try:
        _verify(
            issuer.public_key(),
            cert.signature,
            cert.tbs_certificate_bytes,
            cert.signature_algorithm_oid,
            cert.signature_hash_algorithm,
        )
    except (InvalidSignature, UnsupportedAlgorithm, TypeError, ValueError):
        return False
    # As for responses: OpenSSL refuses a signature BIT STRING with unused bits, so must we.
    der = cert.public_bytes(serialization.Encoding.DER)
    return _signature_unused_bits(der, cert.tbs_certificate_bytes) == 0


def check_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    """Raise :class:`IssuerMismatchError` unless ``issuer`` really issued ``cert``.

    Checked by name and by signature with the issuer's key directly: cryptography's
    ``verify_directly_issued_by`` refuses SHA-1 signatures, which real 2012-era CAs still use.
    The issuer's own signature is not checked - the issuer is trusted as configured.
    """
    if cert.issuer != issuer.subject:
        raise IssuerMismatchError(
            f"the given issuer {issuer.subject.rfc4514_string()!r} is not the certificate's "
            f"issuer {cert.issuer.rfc4514_string()!r}",
            subject=describe(cert),
        )
    if not _signed_by(cert, issuer):
        raise IssuerMismatchError(
            f"the certificate's signature does not verify with the key of the given issuer "
            f"{issuer.subject.rfc4514_string()!r}",
            subject=describe(cert),
        )


def _verify(
    key: object,
    signature: bytes,
    data: bytes,
    oid: x509.ObjectIdentifier,
    hash_algorithm: hashes.HashAlgorithm | None,
) -> None:
    """Check one signature; raises InvalidSignature or UnsupportedAlgorithm."""
    if isinstance(key, rsa.RSAPublicKey):
        if hash_algorithm is None:
            raise UnsupportedAlgorithm("RSA signature without a hash algorithm")
        if oid == SignatureAlgorithmOID.RSASSA_PSS:
            # The PSS parameters aren't exposed for OCSP responses; MGF1 uses the signature's
            # hash in practice, and AUTO recovers the salt length from the signature itself.
            pad: padding.AsymmetricPadding = padding.PSS(
                mgf=padding.MGF1(hash_algorithm), salt_length=padding.PSS.AUTO
            )
        else:
            pad = padding.PKCS1v15()
        key.verify(signature, data, pad, hash_algorithm)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if hash_algorithm is None:
            raise UnsupportedAlgorithm("ECDSA signature without a hash algorithm")
        key.verify(signature, data, ec.ECDSA(hash_algorithm))
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        key.verify(signature, data)
    elif isinstance(key, dsa.DSAPublicKey):
        if hash_algorithm is None:
            raise UnsupportedAlgorithm("DSA signature without a hash algorithm")
        key.verify(signature, data, hash_algorithm)
    else:
        raise UnsupportedAlgorithm(f"unsupported signer key type {type(key).__name__}")


def _key_hash(cert: x509.Certificate) -> bytes:
    # ResponderID byKey: SHA-1 of the subjectPublicKey BIT STRING contents (RFC 6960 §4.2.1),
    # which is exactly what a method-1 SubjectKeyIdentifier is.
    return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest  # type: ignore[arg-type,unused-ignore]


def _matches_responder_id(
    resp: x509_ocsp.OCSPResponse, cert: x509.Certificate, name_der: bytes | None = None
) -> bool:
    """Whether ``cert`` is the responder the ResponderID names. ``name_der``, the byName
    ResponderID as encoded (:func:`_responder_name_der`), settles the usual case - the same
    bytes as the certificate's subject - without building either name as Python objects;
    otherwise names are compared as cryptography compares them (attribute by attribute)."""
    if name_der is not None and name_der == cert.subject.public_bytes():
        return True
    if resp.responder_name is not None:
        return resp.responder_name == cert.subject
    return resp.responder_key_hash == _key_hash(cert)


def _responder_name_der(tbs: bytes) -> bytes | None:
    """The DER Name of a byName ResponderID ([1] EXPLICIT, after the optional [0] version),
    read from tbsResponseData; ``None`` for byKey or anything unexpected."""
    try:
        data = read_whole(tbs, SEQUENCE)
        field = read_element(tbs, data.body, data.end)
        if field.tag == _VERSION:
            field = read_element(tbs, field.end, data.end)
    except ValueError:
        return None
    return tbs[field.body : field.end] if field.tag == _BY_NAME else None


def _find_signer(
    resp: x509_ocsp.OCSPResponse, issuer: x509.Certificate, now: datetime, skew: timedelta, who: str
) -> tuple[x509.Certificate, bool]:
    """Who signed the response, and whether that is a delegated responder. Raises if no one
    the issuer authorised (RFC 6960 §4.2.2.2) matches the ResponderID."""
    name_der = _responder_name_der(resp.tbs_response_bytes)
    if _matches_responder_id(resp, issuer, name_der):
        return issuer, False
    candidates = [c for c in resp.certificates if _matches_responder_id(resp, c, name_der)]
    if not candidates:
        rid = (
            resp.responder_name.rfc4514_string()
            if resp.responder_name is not None
            else f"key hash {resp.responder_key_hash.hex() if resp.responder_key_hash else '?'}"
        )
        raise UnauthorizedSignerError(
            f"responder {rid!r} is neither the issuer nor a certificate included in the response",
            subject=who,
        )
    problems = []
    for delegate in candidates:
        name = delegate.subject.rfc4514_string()
        if delegate.issuer != issuer.subject or not _signed_by(delegate, issuer):
            problems.append(f"delegated responder {name!r} was not issued by the issuer")
            continue
        try:
            eku = delegate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = None
        if eku is None or ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
            problems.append(f"delegated responder {name!r} lacks id-kp-OCSPSigning")
            continue
        if not (delegate.not_valid_before_utc - skew <= now < delegate.not_valid_after_utc):
            problems.append(
                f"delegated responder {name!r} is not valid now "
                f"({delegate.not_valid_before_utc.isoformat()} to "
                f"{delegate.not_valid_after_utc.isoformat()})"
            )
            continue
        return delegate, True
    raise UnauthorizedSignerError("; ".join(problems), subject=who)


def validate(
    der: bytes,
    cert: x509.Certificate,
    issuer: x509.Certificate,
    *,
    now: datetime,
    skew: timedelta = DEFAULT_SKEW,
    margin: timedelta = DEFAULT_MARGIN,
    current: VerifiedResponse | None = None,
    expected: CertId | None = None,
    subject: str | None = None,
    issuer_checked: bool = False,
) -> VerifiedResponse:
    """Verify an OCSP response for ``cert`` (issued by ``issuer``) at ``now``.

    Returns the :class:`VerifiedResponse` (status ``good`` or ``revoked``), or raises a
    :class:`~staple.errors.ValidationError` subclass naming the rule broken and the
    certificate. ``now`` must be timezone-aware. With ``current``, a response older than it is
    refused (:class:`RollbackError`), and after a ``revoked`` one a ``good`` one
    (:class:`RevocationReversedError`, unless the revocation was a certificateHold). Pure: no
    I/O, no clock.

    A caller that validates for the same pair again and again (a handle: every refresh, for
    days) can pass what does not change: ``expected``, the pair's :func:`cert_id` (for its
    hash algorithm; a response using another one is matched the slow way), ``subject``, the
    :func:`describe` text for errors, and ``issuer_checked=True`` once :func:`check_issued_by`
    has passed for the pair. Nothing else is skipped.
    """
    who = describe(cert) if subject is None else subject
    if expected is not None and expected.serial_number != cert.serial_number:
        raise ValueError(f"expected= is the CertID of another certificate than {who}")
    if not issuer_checked:
        check_issued_by(cert, issuer)

    try:
        resp = x509_ocsp.load_der_ocsp_response(der)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BadResponseError(f"not a DER OCSP response ({exc})", subject=who) from None
    if resp.response_status is not x509_ocsp.OCSPResponseStatus.SUCCESSFUL:
        rstatus = resp.response_status.name.lower()
        raise ResponderStatusError(
            f"responder answered {rstatus!r} instead of a response", status=rstatus, subject=who
        )

    try:
        single, found_id = _find_single(resp, cert, issuer, who, expected)
        signer, delegated = _find_signer(resp, issuer, now, skew, who)
        try:
            _verify(
                signer.public_key(),
                resp.signature,
                resp.tbs_response_bytes,
                resp.signature_algorithm_oid,
                resp.signature_hash_algorithm,
            )
        except InvalidSignature:
            raise SignatureError(
                f"response signature does not verify with the key of "
                f"{signer.subject.rfc4514_string()!r}",
                subject=who,
            ) from None
        except UnsupportedAlgorithm as exc:
            raise SignatureError(
                f"response signed with an unsupported algorithm "
                f"({resp.signature_algorithm_oid.dotted_string}: {exc})",
                subject=who,
            ) from None
        if _signature_unused_bits(der, resp.tbs_response_bytes) != 0:
            # cryptography ignores the BIT STRING's unused-bits octet; OpenSSL refuses a
            # signature with bits left over, so every OpenSSL client would reject the staple.
            raise BadResponseError(
                "response signature BIT STRING has unused bits (not DER)", subject=who
            )

        this_update = single.this_update_utc
        next_update = single.next_update_utc
        produced_at = resp.produced_at_utc
        status = single.certificate_status
        revocation_time = single.revocation_time_utc if status is CertStatus.REVOKED else None
        revocation_reason = single.revocation_reason if status is CertStatus.REVOKED else None
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # cryptography raises ValueError on malformed inner fields, TypeError on some
        # mistyped name attributes, UnsupportedAlgorithm on an unknown CertID hash or key type:
        # either way, not a response we can vouch for.
        raise BadResponseError(f"malformed response ({exc})", subject=who) from None

    if this_update > now + skew:
        raise NotYetValidError(
            f"thisUpdate {this_update.isoformat()} is in the future (now {now.isoformat()})",
            subject=who,
        )
    if next_update is None:
        raise ExpiredResponseError(
            "response has no nextUpdate: it would never expire, so it is refused", subject=who
        )
    expires = min(next_update, signer.not_valid_after_utc) if delegated else next_update
    if expires <= now + margin:
        raise ExpiredResponseError(
            f"response expires {expires.isoformat()}, less than {margin} after now "
            f"{now.isoformat()}",
            subject=who,
        )
    if status is CertStatus.UNKNOWN:
        raise UnknownStatusError("responder does not know the certificate", subject=who)

    verified = VerifiedResponse(
        der=der,
        cert_id=found_id,
        cert_status=status,
        this_update=this_update,
        next_update=next_update,
        produced_at=produced_at,
        expires=expires,
        signer=signer,
        delegated=delegated,
        revocation_time=revocation_time,
        revocation_reason=revocation_reason,
    )
    if current is not None:
        check_not_older(verified, current, who=who)
        check_not_unrevoked(verified, current, who=who)
    return verified


def _signature_unused_bits(der: bytes, tbs: bytes) -> int:
    """The unused-bits octet of BasicOCSPResponse.signature, which follows tbsResponseData and
    signatureAlgorithm; -1 if it cannot be located."""
    at = der.find(tbs)
    if at < 0:
        return -1
    try:
        algorithm = read_element(der, at + len(tbs))
        bits = read_element(der, algorithm.end)
    except ValueError:
        return -1
    if bits.tag != BIT_STRING or bits.length == 0:
        return -1
    return der[bits.body]


def _find_single(
    resp: x509_ocsp.OCSPResponse,
    cert: x509.Certificate,
    issuer: x509.Certificate,
    who: str,
    expected: CertId | None,
) -> tuple[x509_ocsp.OCSPSingleResponse, CertId]:
    seen = []
    for single in resp.responses:
        algorithm = single.hash_algorithm.name
        if algorithm not in _HASHES:
            seen.append(f"{algorithm} CertID")
            continue
        if expected is not None and expected.hash_algorithm == algorithm:
            wanted = expected
        else:
            wanted = cert_id(cert, issuer, algorithm=algorithm)
        if (
            single.serial_number == wanted.serial_number
            and single.issuer_name_hash == wanted.issuer_name_hash
            and single.issuer_key_hash == wanted.issuer_key_hash
        ):
            return single, wanted
        seen.append(f"serial {single.serial_number:#x} ({algorithm})")
    raise CertIdMismatchError(
        f"response is not about this certificate (it answers for {', '.join(seen) or 'nothing'})",
        subject=who,
    )


def check_not_older(
    new: VerifiedResponse, current: VerifiedResponse, *, who: str | None = None
) -> None:
    """Rollback protection: refuse ``new`` if it is older than ``current``.

    Ordered by thisUpdate, then producedAt. An equal response is not older (re-reading the same
    bytes from a store is fine). A replayed or stale cached response would otherwise undo a
    revocation the server already knows about.
    """
    if (new.this_update, new.produced_at) < (current.this_update, current.produced_at):
        raise RollbackError(
            f"response (thisUpdate {new.this_update.isoformat()}, producedAt "
            f"{new.produced_at.isoformat()}) is older than the one held (thisUpdate "
            f"{current.this_update.isoformat()}, producedAt {current.produced_at.isoformat()})",
            subject=who,
        )


def check_not_unrevoked(
    new: VerifiedResponse, current: VerifiedResponse, *, who: str | None = None
) -> None:
    """Revocation sticks: refuse a ``good`` ``new`` while ``current`` says ``revoked``, unless
    that revocation was a certificateHold (the one reason that may be lifted)."""
    if (
        current.cert_status is CertStatus.REVOKED
        and new.cert_status is CertStatus.GOOD
        and current.revocation_reason is not x509.ReasonFlags.certificate_hold
    ):
        when = current.revocation_time.isoformat() if current.revocation_time else "?"
        reason = current.revocation_reason.value if current.revocation_reason else "unspecified"
        raise RevocationReversedError(
            f"responder says 'good' for a certificate it said was revoked (at {when}, reason "
            f"{reason}); revocation is permanent, so the revoked response is kept",
            subject=who,
        )
