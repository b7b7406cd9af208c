"""OCSP requests and responses as bytes, for the test responder: what cryptography's parsers
and builders do not do.

cryptography parses only single-CertID requests and builds only single-response, real-time
responses. :func:`parse_request` reads every CertID (and the nonce) of a request, GET or POST;
:func:`reassemble` takes a response cryptography built and signs it again with producedAt set
to the injected clock's time and one SingleResponse per requested CertID. The DER is read and
written with :mod:`staple.der`.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp as x509_ocsp

from staple.der import (
    BIT_STRING,
    GENERALIZED_TIME,
    OCTET_STRING,
    SEQUENCE,
    children,
    encode_tlv,
    explicit,
    read_element,
    read_whole,
)

from ._pki import PrivateKey

__all__ = [
    "CertId",
    "Request",
    "decode_get_path",
    "issuer_hashes",
    "parse_request",
    "reassemble",
    "single_responses",
]


_OID_OCSP_BASIC = bytes.fromhex("06092b0601050507300101")
_OID_OCSP_NONCE = bytes.fromhex("2b0601050507300102")
_HASH_OIDS: dict[bytes, type[hashes.HashAlgorithm]] = {
    bytes.fromhex("2b0e03021a"): hashes.SHA1,
    bytes.fromhex("608648016503040204"): hashes.SHA224,
    bytes.fromhex("608648016503040201"): hashes.SHA256,
    bytes.fromhex("608648016503040202"): hashes.SHA384,
    bytes.fromhex("608648016503040203"): hashes.SHA512,
}


@dataclass(frozen=True, slots=True)
class CertId:
    """One CertID of a request, as sent: the hash algorithm and hashes the client chose."""

    algorithm: hashes.HashAlgorithm
    name_hash: bytes
    key_hash: bytes
    serial: int


@dataclass(frozen=True, slots=True)
class Request:
    """What the responder reads of an OCSPRequest: its CertIDs and its nonce, if any."""

    cert_ids: tuple[CertId, ...]
    nonce: bytes | None


def decode_get_path(path: str) -> bytes | None:
    """The DER request in a GET path ``[/prefix...]/<base64>`` (RFC 6960 A.1), or ``None``.

    The base64 may contain ``/``, so each suffix of the path's segments is tried, longest
    first, until one decodes to something shaped like an OCSPRequest. URL escapes, ``+``
    turned into a space, the URL-safe alphabet and missing padding are all tolerated.
    """
    segments = path.lstrip("/").split("/")
    for i in range(len(segments)):
        text = urllib.parse.unquote("/".join(segments[i:])).replace(" ", "+")
        text = text.replace("-", "+").replace("_", "/")
        text += "=" * (-len(text) % 4)
        try:
            der = base64.b64decode(text, validate=True)
            parse_request(der)
        except (binascii.Error, ValueError, IndexError, KeyError):
            continue
        return der
    return None


def parse_request(der: bytes) -> Request:
    """OCSPRequest (RFC 6960 §4.1.1) → its CertIDs and nonce. Raises ValueError or IndexError
    for a malformed request, KeyError for a CertID hash algorithm it does not know."""
    tbs = children(der, read_whole(der, SEQUENCE))[0]
    if tbs.tag != SEQUENCE:
        raise ValueError("no TBSRequest")
    items = children(der, tbs)
    request_list = next((n for n in items if n.tag == SEQUENCE), None)
    if request_list is None:
        raise ValueError("no requestList")
    cert_ids: list[CertId] = []
    for req in children(der, request_list):
        cert_id = children(der, req)[0]
        algorithm, name_hash, key_hash, serial = children(der, cert_id)[:4]
        oid = children(der, algorithm)[0]
        cert_ids.append(
            CertId(
                _HASH_OIDS[der[oid.body : oid.end]](),
                der[name_hash.body : name_hash.end],
                der[key_hash.body : key_hash.end],
                int.from_bytes(der[serial.body : serial.end], "big", signed=True),
            )
        )
    if not cert_ids:
        raise ValueError("empty requestList")
    nonce = None
    for wrapper in (n for n in items if n.tag == explicit(2)):  # requestExtensions
        for extension in children(der, children(der, wrapper)[0]):
            parts = children(der, extension)
            if der[parts[0].body : parts[0].end] == _OID_OCSP_NONCE:
                value = der[parts[-1].body : parts[-1].end]
                nonce = _octet_string_contents(value)
    return Request(tuple(cert_ids), nonce)


def _octet_string_contents(value: bytes) -> bytes:
    """The contents of a DER OCTET STRING (how RFC 8954 wraps a nonce), else ``value`` itself."""
    try:
        inner = read_element(value)
    except ValueError:
        return value
    if inner.tag == OCTET_STRING and inner.end == len(value):
        return value[inner.body :]
    return value


def issuer_hashes(issuer: x509.Certificate, algorithm: hashes.HashAlgorithm) -> tuple[bytes, bytes]:
    """The CertID issuerNameHash and issuerKeyHash of ``issuer`` under ``algorithm``."""
    spki = issuer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    bits = children(spki, read_whole(spki, SEQUENCE))[1]
    key_bits = spki[bits.body + 1 : bits.end]  # skip the unused-bits octet

    def digest(data: bytes) -> bytes:
        h = hashes.Hash(algorithm)
        h.update(data)
        return h.finalize()

    return digest(issuer.subject.public_bytes()), digest(key_bits)


def single_responses(tbs: bytes) -> list[bytes]:
    """The SingleResponse elements of a ResponseData, as DER."""
    items = children(tbs, read_whole(tbs, SEQUENCE))
    produced = next(i for i, n in enumerate(items) if n.tag == GENERALIZED_TIME)
    return [tbs[n.start : n.end] for n in children(tbs, items[produced + 1])]


def reassemble(
    template: x509_ocsp.OCSPResponse,
    singles: Sequence[bytes],
    produced_at: datetime,
    key: PrivateKey,
) -> bytes:
    """``template`` with producedAt and the responses replaced, signed again with ``key``."""
    tbs = template.tbs_response_bytes
    items = children(tbs, read_whole(tbs, SEQUENCE))
    produced = next(i for i, n in enumerate(items) if n.tag == GENERALIZED_TIME)
    responses = items[produced + 1]
    new_tbs = encode_tlv(
        SEQUENCE,
        tbs[items[0].start : items[produced].start]
        + encode_tlv(GENERALIZED_TIME, produced_at.strftime("%Y%m%d%H%M%SZ").encode("ascii"))
        + encode_tlv(SEQUENCE, b"".join(singles))
        + tbs[responses.end :],
    )
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(new_tbs, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(new_tbs, ec.ECDSA(hashes.SHA256()))
    else:
        signature = key.sign(new_tbs)

    # BasicOCSPResponse: tbsResponseData, signatureAlgorithm, signature, [0] certs OPTIONAL.
    outer = template.public_bytes(serialization.Encoding.DER)
    response_bytes = children(outer, children(outer, read_whole(outer, SEQUENCE))[1])[0]
    basic_octets = children(outer, response_bytes)[1]
    basic = outer[basic_octets.body : basic_octets.end]
    parts = children(basic, read_whole(basic, SEQUENCE))
    rest = b"".join(basic[n.start : n.end] for n in parts[3:])
    new_basic = encode_tlv(
        SEQUENCE,
        new_tbs
        + basic[parts[1].start : parts[1].end]
        + encode_tlv(BIT_STRING, b"\x00" + signature)
        + rest,
    )
    body = encode_tlv(SEQUENCE, _OID_OCSP_BASIC + encode_tlv(OCTET_STRING, new_basic))
    return encode_tlv(SEQUENCE, b"\x0a\x01\x00" + encode_tlv(explicit(0), body))
