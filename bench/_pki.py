"""Certificates, keys and pre-signed OCSP responses for the benchmarks, written to a directory.

Per key type (``"ec"``: ECDSA P-256 CAs and leaf; ``"rsa"``: RSA-2048), from one
:class:`~staple.testing.TestPKI`:

- ``chain.pem`` (leaf + intermediate), ``key.pem``, ``root.pem``, ``trusted.pem`` (root +
  intermediate, for nginx's ``ssl_trusted_certificate``);
- the responses a server may staple, all for the same leaf and all valid for 24 h:

  ``small``      signed by the issuing CA itself, no certificates embedded (like Let's Encrypt);
  ``redundant``  the same signed data plus the issuer's certificate in the ``certs`` field, as
                 some CAs send it: the client already has that certificate from the chain;
  ``large``      signed by a delegated RSA-2048 responder whose certificate is embedded (it has
                 to be: clients need it to check the signature), like DigiCert's.

The ``certs`` field of a BasicOCSPResponse lies outside the signed ``tbsResponseData``, which is
why :func:`set_certs` can add or drop certificates without re-signing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from staple.der import OCTET_STRING, SEQUENCE, children, encode_tlv, explicit, read_whole
from staple.testing import KeyType, Leaf, OcspResponder, TestPKI

RESPONSES = ("small", "redundant", "large")


@dataclass
class Material:
    key_type: str
    directory: Path
    pki: TestPKI
    leaf: Leaf
    responses: dict[str, bytes] = field(default_factory=dict)

    @property
    def chain(self) -> Path:
        return self.directory / "chain.pem"

    @property
    def key(self) -> Path:
        return self.directory / "key.pem"

    @property
    def root(self) -> Path:
        return self.directory / "root.pem"

    @property
    def trusted(self) -> Path:
        return self.directory / "trusted.pem"

    def response_path(self, name: str) -> Path:
        return self.directory / f"{name}.der"


def make(key_type: KeyType, directory: Path, ocsp_url: str = "http://127.0.0.1:9/ocsp") -> Material:
    """Issue everything for ``key_type`` under ``directory`` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = TestPKI(key_type=key_type)
    leaf = pki.issue_leaf(
        "bench.test", "localhost", "127.0.0.1", key_type=key_type, ocsp_url=ocsp_url
    )
    m = Material(key_type, directory, pki, leaf)
    leaf.write_chain(m.chain)
    leaf.write_key(m.key)
    pki.write_ca_bundle(m.root)
    m.trusted.write_bytes(pki.root.cert_pem + pki.intermediate.cert_pem)

    small = OcspResponder(pki).response_for(leaf)
    issuer_der = pki.intermediate.cert.public_bytes(serialization.Encoding.DER)
    delegate = pki.intermediate.issue_responder(key_type="rsa")
    m.responses = {
        "small": small,
        "redundant": set_certs(small, [issuer_der]),
        "large": OcspResponder(pki, signer=delegate).response_for(leaf),
    }
    for name, der in m.responses.items():
        m.response_path(name).write_bytes(der)
    return m


def set_certs(der: bytes, certs: list[bytes]) -> bytes:
    """``der`` (an OCSPResponse with a BasicOCSPResponse) with its ``certs`` field replaced by
    ``certs`` (DER certificates; ``[]`` removes the field). The signed data is untouched."""
    status, response = children(der, read_whole(der, SEQUENCE))  # OCSPResponse
    (response_bytes,) = children(der, response)  # [0] EXPLICIT ResponseBytes
    oid, octets = children(der, response_bytes)
    fields = children(der, read_whole(der, SEQUENCE, octets.body, octets.end))
    kept = der[fields[0].start : fields[2].end]  # tbsResponseData, algorithm, signature
    if certs:
        kept += encode_tlv(explicit(0), encode_tlv(SEQUENCE, b"".join(certs)))
    basic = encode_tlv(SEQUENCE, kept)
    rb = encode_tlv(SEQUENCE, der[oid.start : oid.end] + encode_tlv(OCTET_STRING, basic))
    return encode_tlv(SEQUENCE, der[status.start : status.end] + encode_tlv(explicit(0), rb))


def certs_of(der: bytes) -> int:
    """How many certificates the response embeds."""
    from cryptography.x509 import ocsp

    return len(ocsp.load_der_ocsp_response(der).certificates)
