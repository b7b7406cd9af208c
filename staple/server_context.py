"""pyOpenSSL server contexts for a set of certificates, with SNI and the stapler installed.

``build_server_context([(chain, key), ...], stapler)`` groups the certificates by the host names
they cover: certificates for the same names (an RSA and an ECDSA one) share a context, and
OpenSSL picks the one the client can use; different names get their own context, switched in
the servername callback. Every context gets the stapler's OCSP callback (a context without one
staples nothing after an SNI switch).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from OpenSSL import SSL

from .chain import load_chain
from .errors import ChainError
from .stapler import Stapler

__all__ = ["CertSpec", "build_server_context", "host_names"]

PathOrPem = str | os.PathLike[str] | bytes
CertSpec = tuple[PathOrPem, PathOrPem]
"""(chain, key): a PEM file path or PEM bytes each; the chain is leaf first."""


def host_names(cert: x509.Certificate) -> frozenset[str]:
    """The DNS names a certificate serves (SAN, else the subject CN), lower-cased."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
        names |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    except x509.ExtensionNotFound:
        names = set()
    if not names:
        names = {
            str(a.value).lower()
            for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        }
    return frozenset(names)


def _new_context() -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(
        SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION
    )
    return ctx


def _load(ctx: SSL.Context, chain: PathOrPem, key: PathOrPem) -> None:
    """Load one chain and key; OpenSSL keeps a separate chain per key type this way."""
    with tempfile.TemporaryDirectory(prefix="staple-") as tmp:
        chain_path = _as_path(chain, Path(tmp) / "chain.pem")
        key_path = _as_path(key, Path(tmp) / "key.pem")
        try:
            ctx.use_certificate_chain_file(str(chain_path))
            ctx.use_privatekey_file(str(key_path))
            ctx.check_privatekey()
        except SSL.Error as exc:
            raise ChainError(f"cannot load certificate {chain!r} with key {key!r}: {exc}") from None


def _as_path(value: PathOrPem, spill: Path) -> Path:
    if isinstance(value, bytes):
        spill.write_bytes(value)
        os.chmod(spill, 0o600)
        return spill
    return Path(value)


def build_server_context(certs: Sequence[CertSpec], stapler: Stapler) -> SSL.Context:
    """A server context serving ``certs`` (SNI-switched by host name), stapling via
    ``stapler``. The first certificate's context is the default for unknown names."""
    if not certs:
        raise ValueError("at least one (chain, key) pair is needed")
    by_names: dict[frozenset[str], SSL.Context] = {}
    for chain, key in certs:
        leaf = load_chain(chain if not isinstance(chain, str) else Path(chain))[0]
        names = host_names(leaf)
        ctx = by_names.get(names)
        if ctx is None:
            ctx = by_names[names] = _new_context()
            stapler.install(ctx)
        _load(ctx, chain, key)
    default = next(iter(by_names.values()))
    if len(by_names) > 1:
        exact: dict[bytes, SSL.Context] = {}
        wildcard: dict[bytes, SSL.Context] = {}
        for names, ctx in by_names.items():
            for name in names:
                if name.startswith("*."):
                    wildcard.setdefault(name[2:].encode(), ctx)
                else:
                    exact.setdefault(name.encode(), ctx)

        def select(conn: SSL.Connection) -> None:
            name = conn.get_servername()
            if not name:
                return
            name = name.lower()
            ctx = exact.get(name)
            if ctx is None and b"." in name:
                ctx = wildcard.get(name.split(b".", 1)[1])
            if ctx is not None:
                conn.set_context(ctx)

        default.set_tlsext_servername_callback(select)
    return default
