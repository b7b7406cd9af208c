"""Reading certificate chains and what a certificate says about its own OCSP service."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import AuthorityInformationAccessOID

from .errors import ChainError

__all__ = ["ChainInput", "ca_issuers_urls", "load_chain", "must_staple", "ocsp_urls"]

ChainInput = Sequence[x509.Certificate] | bytes | str | os.PathLike[str]
"""A chain as certificates ``[leaf, issuer, ...]``, PEM bytes, or the path of a PEM file."""


def load_chain(chain: ChainInput) -> list[x509.Certificate]:
    """Normalise a chain to certificates, leaf first. Raises :class:`ChainError` when empty or
    unparseable, naming the file."""
    if isinstance(chain, bytes):
        source, data = "PEM data", chain
    elif isinstance(chain, str | os.PathLike):
        path = Path(chain)
        source = str(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ChainError(f"cannot read chain file {source}: {exc.strerror or exc}") from None
    else:
        certs = list(chain)
        if not certs:
            raise ChainError("empty certificate chain")
        for cert in certs:
            if not isinstance(cert, x509.Certificate):
                raise ChainError(
                    f"chain items must be cryptography x509.Certificate, got {type(cert).__name__}"
                )
        return certs
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        try:
            certs = [x509.load_der_x509_certificate(data)]
        except ValueError:
            raise ChainError(f"{source}: no PEM or DER certificate found") from None
    if not certs:
        raise ChainError(f"{source}: no certificate found")
    return certs


def _aia(cert: x509.Certificate, method: x509.ObjectIdentifier) -> list[str]:
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return []
    return [
        d.access_location.value
        for d in aia
        if d.access_method == method
        and isinstance(d.access_location, x509.UniformResourceIdentifier)
    ]


def ocsp_urls(cert: x509.Certificate) -> list[str]:
    """The OCSP responder URLs from the certificate's AIA extension, in order."""
    return _aia(cert, AuthorityInformationAccessOID.OCSP)


ResponderUrls = Sequence[str] | Mapping[str, str]
"""``responder_urls=``: a list replacing a certificate's AIA OCSP URLs, or a mapping from AIA URL
to the URL to ask instead."""


def responder_urls(cert: x509.Certificate, override: ResponderUrls | None = None) -> list[str]:
    """The URLs to ask about ``cert``: its AIA OCSP URLs, replaced or rewritten by
    ``override`` (see :data:`ResponderUrls`; a single string is one URL)."""
    if override is None:
        return ocsp_urls(cert)
    if isinstance(override, Mapping):
        return [override.get(url, url) for url in ocsp_urls(cert)]
    if isinstance(override, str):
        return [override]
    return list(override)


def ca_issuers_urls(cert: x509.Certificate) -> list[str]:
    """Where the issuer's certificate can be downloaded (AIA caIssuers)."""
    return _aia(cert, AuthorityInformationAccessOID.CA_ISSUERS)


def must_staple(cert: x509.Certificate) -> bool:
    """Whether the certificate carries the TLS Feature status_request (RFC 7633)."""
    try:
        features = cert.extensions.get_extension_for_class(x509.TLSFeature).value
    except x509.ExtensionNotFound:
        return False
    return x509.TLSFeatureType.status_request in features
