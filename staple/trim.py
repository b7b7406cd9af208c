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

from .ocsp import VerifiedResponse

__all__ = ["stapled_der"]

log = logging.getLogger("staple")

_SEQUENCE = 0x30
_OCTET_STRING = 0x04
_BIT_STRING = 0x03
_ENUMERATED = 0x0A
_OID = 0x06
_EXPLICIT_0 = 0xA0  # [0] EXPLICIT, constructed: responseBytes, and BasicOCSPResponse.certs
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


# -- a little DER: each element is (tag, start of header, start of contents, end) ----------------

_Element = tuple[int, int, int, int]


def _read(der: bytes, pos: int, limit: int) -> _Element:
    """The element at ``pos``, which must end by ``limit``; ValueError if it cannot."""
    if pos + 2 > limit:
        raise ValueError(f"truncated element at offset {pos}")
    tag, first = der[pos], der[pos + 1]
    if tag & 0x1F == 0x1F:
        raise ValueError(f"high tag number at offset {pos}")
    body = pos + 2
    if first & 0x80:
        n = first & 0x7F
        if not 1 <= n <= 4 or body + n > limit:
            raise ValueError(f"bad length at offset {pos}")
        length = int.from_bytes(der[body : body + n], "big")
        body += n
    else:
        length = first
    end = body + length
    if end > limit:
        raise ValueError(f"element at offset {pos} overruns its container")
    return tag, pos, body, end


def _children(der: bytes, parent: _Element) -> list[_Element]:
    """The elements inside ``parent``."""
    out: list[_Element] = []
    pos, end = parent[2], parent[3]
    while pos < end:
        child = _read(der, pos, end)
        out.append(child)
        pos = child[3]
    return out


def _expect(elements: list[_Element], *tags: int) -> list[_Element]:
    """``elements``, if there are exactly as many as ``tags``, with those tags."""
    if [e[0] for e in elements] != list(tags):
        found = ", ".join(f"{e[0]:#04x}" for e in elements) or "nothing"
        wanted = ", ".join(f"{t:#04x}" for t in tags)
        raise ValueError(f"expected tags {wanted}, found {found}")
    return elements


def _tlv(tag: int, contents: bytes) -> bytes:
    n = len(contents)
    if n < 0x80:
        return bytes((tag, n)) + contents
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + contents


def _with_certs(der: bytes, keep: bytes | None) -> bytes | None:
    """``der`` with BasicOCSPResponse.certs holding just ``keep`` (a DER certificate, which must
    be among those embedded), or removed for ``None``; ``None`` if that is what ``der`` has.
    Raises ValueError for any layout but RFC 6960's."""
    outer = _read(der, 0, len(der))
    if outer[0] != _SEQUENCE or outer[3] != len(der):
        raise ValueError("not a single DER SEQUENCE")
    status, explicit = _expect(_children(der, outer), _ENUMERATED, _EXPLICIT_0)  # OCSPResponse
    (response_bytes,) = _expect(_children(der, explicit), _SEQUENCE)
    oid, octets = _expect(_children(der, response_bytes), _OID, _OCTET_STRING)  # ResponseBytes
    if der[oid[2] : oid[3]] != _ID_PKIX_OCSP_BASIC:
        raise ValueError("responseType is not id-pkix-ocsp-basic")
    basic = _read(der, octets[2], octets[3])
    if basic[0] != _SEQUENCE or basic[3] != octets[3]:
        raise ValueError("the response OCTET STRING does not hold one SEQUENCE")
    fields = _children(der, basic)  # BasicOCSPResponse
    if len(fields) == 3:
        return None  # no certs: nothing to drop
    tbs, _, signature, certs_field = _expect(fields, _SEQUENCE, _SEQUENCE, _BIT_STRING, _EXPLICIT_0)
    (sequence,) = _expect(_children(der, certs_field), _SEQUENCE)
    elements = _children(der, sequence)
    _expect(elements, *[_SEQUENCE] * len(elements))
    certs = [der[c[1] : c[3]] for c in elements]
    if keep is None:
        kept = b""
    elif keep not in certs:
        raise ValueError("the delegated signer's certificate is not among those embedded")
    elif certs == [keep]:
        return None  # the signer's certificate alone: nothing to drop
    else:
        kept = _tlv(_EXPLICIT_0, _tlv(_SEQUENCE, keep))

    new_basic = _tlv(_SEQUENCE, der[tbs[1] : signature[3]] + kept)
    new_response_bytes = _tlv(_SEQUENCE, der[oid[1] : oid[3]] + _tlv(_OCTET_STRING, new_basic))
    return _tlv(_SEQUENCE, der[status[1] : status[3]] + _tlv(_EXPLICIT_0, new_response_bytes))


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
