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

from staple.testing import OcspResponder, TestPKI
from staple.testing._pki import KeyType, Leaf

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


# -- a few lines of DER, enough to edit the certs field -------------------------------------


def _header(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of contents, end) of the TLV at ``pos``."""
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    return tag, pos, pos + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(tag, tlv start, contents start, end) of each TLV in data[start:end]."""
    out = []
    pos = start
    while pos < end:
        tag, contents, stop = _header(data, pos)
        out.append((tag, pos, contents, stop))
        pos = stop
    return out


def _tlv(tag: int, contents: bytes) -> bytes:
    n = len(contents)
    if n < 0x80:
        return bytes([tag, n]) + contents
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + contents


def set_certs(der: bytes, certs: list[bytes]) -> bytes:
    """``der`` (an OCSPResponse with a BasicOCSPResponse) with its ``certs`` field replaced by
    ``certs`` (DER certificates; ``[]`` removes the field). The signed data is untouched."""
    _, outer, outer_end = _header(der, 0)
    status, response_bytes = _children(der, outer, outer_end)
    _, _, rb_contents, _ = response_bytes  # [0] EXPLICIT
    _, seq, seq_end = _header(der, rb_contents)  # ResponseBytes SEQUENCE
    oid, octets = _children(der, seq, seq_end)
    basic_der = der[octets[2] : octets[3]]
    _, b_start, b_end = _header(basic_der, 0)
    fields = _children(basic_der, b_start, b_end)
    kept = b"".join(basic_der[f[1] : f[3]] for f in fields[:3])  # tbs, algorithm, signature
    if certs:
        kept += _tlv(0xA0, _tlv(0x30, b"".join(certs)))
    basic = _tlv(0x30, kept)
    rb = _tlv(0x30, der[oid[1] : oid[3]] + _tlv(0x04, basic))
    return _tlv(0x30, der[status[1] : status[3]] + _tlv(0xA0, rb))


def certs_of(der: bytes) -> int:
    """How many certificates the response embeds."""
    from cryptography.x509 import ocsp

    return len(ocsp.load_der_ocsp_response(der).certificates)
