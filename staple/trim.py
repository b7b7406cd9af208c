"""The bytes to staple: a verified OCSP response without the certificates no client needs.

Why: OpenSSL 4 (the one cryptography bundles) decodes the whole stapled BasicOCSPResponse
again on every handshake it staples, embedded certificates included, only to find the
SingleResponse for the certificate being sent; each embedded certificate makes that 3-4x
dearer (``bench/README.md``, section 2). Yet a client verifies an issuer-signed response with
the issuer from the TLS chain, so it needs no embedded certificate at all, and a delegated
responder's response needs the responder's own certificate (how the client finds its key) and
nothing else. Some CAs ship their own certificate, or the root's, in every response anyway.

How: ``certs`` is the last field of the BasicOCSPResponse, outside ``tbsResponseData``, so it
can change without touching the signature. :func:`stapled_der` copies ``tbsResponseData``,
``signatureAlgorithm`` and ``signature`` byte for byte, keeps the signer's certificate (as
embedded) for a delegated response or nothing otherwise, and writes only the lengths of the
five enclosing elements. It runs once per installed response, not per handshake, and parses
what it built before trusting it: if the layout is not the expected one, or that check fails,
the response is stapled exactly as fetched. The store keeps the fetched bytes: whoever reads
them there (a restarted process, another fleet member) validates those.
"""

from __future__ import annotations

import logging

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp as x509_ocsp

from .der import (
    BIT_STRING,
    ENUMERATED,
    OBJECT_IDENTIFIER,
    OCTET_STRING,
    SEQUENCE,
    children,
    encode_tlv,
    expect_tags,
    explicit,
    read_whole,
)
from .ocsp import VerifiedResponse

__all__ = ["stapled_der"]

log = logging.getLogger("staple")

_EXPLICIT_0 = explicit(0)  # responseBytes, and BasicOCSPResponse.certs
_ID_PKIX_OCSP_BASIC = bytes.fromhex("2b0601050507300101")  # 1.3.6.1.5.5.7.48.1.1


def stapled_der(verified: VerifiedResponse) -> bytes:
    """``verified.der`` with its embedded certificates cut down to what the client needs:
    exactly the signer's certificate for a delegated response, none for an issuer-signed one.

    Returns ``verified.der`` itself when there is nothing to drop or when its layout is not the
    expected one; never raises. The signed data is copied untouched, so the result verifies
    wherever the original does.
    """
    der = verified.der
    try:
        keep = (
            verified.signer.public_bytes(serialization.Encoding.DER) if verified.delegated else None
        )
        trimmed = _with_certs(der, keep)
        if trimmed is None:
            return der
        before = x509_ocsp.load_der_ocsp_response(der)
        signed = (before.tbs_response_bytes, before.signature, before.signature_algorithm_oid)
    except Exception as exc:  # an optimisation: nothing about it may cost the staple
        log.debug("not trimming an OCSP response of unexpected layout (%r)", exc)
        return der
    if not _faithful(trimmed, signed, [verified.signer] if verified.delegated else []):
        log.warning("a trimmed OCSP response failed its check; stapling it as fetched")
        return der
    return trimmed


def _with_certs(der: bytes, keep: bytes | None) -> bytes | None:
    """``der`` with BasicOCSPResponse.certs holding just ``keep`` (a DER certificate, which must
    be among those embedded), or removed for ``None``; ``None`` if that is what ``der`` has.
    Raises ValueError for any layout but RFC 6960's."""
    outer = read_whole(der, SEQUENCE)
    status, response = expect_tags(children(der, outer), ENUMERATED, _EXPLICIT_0)  # OCSPResponse
    (response_bytes,) = expect_tags(children(der, response), SEQUENCE)
    oid, octets = expect_tags(children(der, response_bytes), OBJECT_IDENTIFIER, OCTET_STRING)
    if der[oid.body : oid.end] != _ID_PKIX_OCSP_BASIC:
        raise ValueError("responseType is not id-pkix-ocsp-basic")
    basic = read_whole(der, SEQUENCE, octets.body, octets.end)
    fields = children(der, basic)  # BasicOCSPResponse
    if len(fields) == 3:
        return None  # no certs: nothing to drop
    tbs, _, signature, certs_field = expect_tags(
        fields, SEQUENCE, SEQUENCE, BIT_STRING, _EXPLICIT_0
    )
    (sequence,) = expect_tags(children(der, certs_field), SEQUENCE)
    elements = children(der, sequence)
    expect_tags(elements, *[SEQUENCE] * len(elements))
    certs = [der[c.start : c.end] for c in elements]
    if keep is None:
        kept = b""
    elif keep not in certs:
        raise ValueError("the delegated signer's certificate is not among those embedded")
    elif certs == [keep]:
        return None  # the signer's certificate alone: nothing to drop
    else:
        kept = encode_tlv(_EXPLICIT_0, encode_tlv(SEQUENCE, keep))

    new_basic = encode_tlv(SEQUENCE, der[tbs.start : signature.end] + kept)
    new_response_bytes = encode_tlv(
        SEQUENCE, der[oid.start : oid.end] + encode_tlv(OCTET_STRING, new_basic)
    )
    return encode_tlv(
        SEQUENCE, der[status.start : status.end] + encode_tlv(_EXPLICIT_0, new_response_bytes)
    )


def _faithful(
    trimmed: bytes,
    signed: tuple[bytes, bytes, x509.ObjectIdentifier],
    certs: list[x509.Certificate],
) -> bool:
    """Whether cryptography reads ``trimmed`` as a successful response with the ``signed``
    parts (tbsResponseData, signature, signature algorithm) and exactly ``certs`` embedded."""
    try:
        after = x509_ocsp.load_der_ocsp_response(trimmed)
        return (
            after.response_status is x509_ocsp.OCSPResponseStatus.SUCCESSFUL
            and (after.tbs_response_bytes, after.signature, after.signature_algorithm_oid) == signed
            and after.certificates == certs
        )
    except Exception:  # whatever cryptography makes of it, only a clean match is trusted
        return False
