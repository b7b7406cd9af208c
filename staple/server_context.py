"""pyOpenSSL server contexts for a set of certificates, with SNI and the stapler installed.

``build_server_context([(chain, key), ...], stapler)`` groups the certificates by the host names
they cover: certificates for the same names (an RSA and an ECDSA one) share a context, and
OpenSSL picks the one the client can use; different names get their own context, switched in
the servername callback. Every context gets the stapler's OCSP callback (a context without one
staples nothing after an SNI switch).

TLS settings follow Mozilla's Server Side TLS guidelines (version 5.7,
https://ssl-config.mozilla.org/), :class:`TLSProfile`:

* ``"intermediate"`` (the default, for general-purpose servers): TLS 1.2 and 1.3; in TLS 1.2
  only ECDHE key exchange with AES-GCM or ChaCha20-Poly1305 (no static-RSA key exchange, no
  CBC, no DHE since no DH parameters are set up); TLS 1.3's three standard suites; key
  exchange groups X25519, P-256 and P-384.
* ``"modern"``: TLS 1.3 only, same suites and groups.

Neither sets a server cipher preference: every allowed suite is strong, and the client knows
best whether it has AES hardware (Mozilla's guidance for both). Compression and renegotiation
are off.

Other settings: ``build_server_context(..., context_factory=make)`` calls ``make()`` for each
context instead of :func:`new_context`, and uses what it returns as it is (start from
``new_context(profile)`` to keep these defaults and add to them). For full control, build your
own ``SSL.Context`` and call ``stapler.install(ctx)`` on it (and on every context your
servername callback may switch to).
"""

from __future__ import annotations

import enum
import functools
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from cryptography import x509
from OpenSSL import SSL

from .chain import load_chain
from .errors import ChainError
from .stapler import Stapler

__all__ = ["CertSpec", "TLSProfile", "build_server_context", "host_names", "new_context"]


class TLSProfile(enum.Enum):
    """Mozilla's recommended server configurations (Server Side TLS guidelines 5.7)."""

    INTERMEDIATE = "intermediate"
    """TLS 1.2 and 1.3, forward-secret AEAD suites only: general-purpose servers (default)."""
    MODERN = "modern"
    """TLS 1.3 only: for clients that all speak it (no TLS 1.2 client can connect)."""


# TLS 1.2 suites, Mozilla's order. Mozilla also lists DHE-RSA with AES-GCM and ChaCha20, which
# need DH parameters we don't generate: without them OpenSSL would never pick those anyway.
_TLS12_CIPHERS: Final = b":".join(
    [
        b"ECDHE-ECDSA-AES128-GCM-SHA256",
        b"ECDHE-RSA-AES128-GCM-SHA256",
        b"ECDHE-ECDSA-AES256-GCM-SHA384",
        b"ECDHE-RSA-AES256-GCM-SHA384",
        b"ECDHE-ECDSA-CHACHA20-POLY1305",
        b"ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
_TLS13_SUITES: Final = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
# Both profiles: X448, P-521 (and OpenSSL 4's hybrid X25519MLKEM768) are not in Mozilla's list.
_GROUPS: Final = b"X25519:prime256v1:secp384r1"
_MIN_VERSION: Final = {
    TLSProfile.INTERMEDIATE: SSL.TLS1_2_VERSION,
    TLSProfile.MODERN: SSL.TLS1_3_VERSION,
}


def _profile(profile: TLSProfile | str) -> TLSProfile:
    try:
        return TLSProfile(profile)
    except ValueError:
        choices = ", ".join(repr(p.value) for p in TLSProfile)
        raise ValueError(f"unknown TLS profile {profile!r}: use one of {choices}") from None


def _set_groups(ctx: SSL.Context, groups: bytes) -> None:
    """Restrict the key exchange groups (TLS 1.2 ECDHE curves and TLS 1.3 key shares).

    pyOpenSSL 26 has no public call for a list of groups (``set_tmp_ecdh`` takes a single
    curve), so this uses the binding's ``SSL_CTX_set1_curves_list`` (the older name of
    ``SSL_CTX_set1_groups_list``), the one private API staple touches.
    """
    from OpenSSL._util import lib

    if lib.SSL_CTX_set1_curves_list(ctx._context, groups) != 1:
        raise ValueError(f"OpenSSL refused the group list {groups!r}")


def new_context(profile: TLSProfile | str = TLSProfile.INTERMEDIATE) -> SSL.Context:
    """A fresh pyOpenSSL server context with ``profile``'s TLS settings and nothing else: no
    certificate, no OCSP callback (what :func:`build_server_context` starts from).

    Raises :exc:`ValueError` for an unknown profile.
    """
    chosen = _profile(profile)
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(_MIN_VERSION[chosen])
    ctx.set_cipher_list(_TLS12_CIPHERS)
    ctx.set_tls13_ciphersuites(_TLS13_SUITES)
    _set_groups(ctx, _GROUPS)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    return ctx


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


def build_server_context(
    certs: Sequence[CertSpec],
    stapler: Stapler,
    *,
    profile: TLSProfile | str = TLSProfile.INTERMEDIATE,
    context_factory: Callable[[], SSL.Context] | None = None,
) -> SSL.Context:
    """A server context serving ``certs`` (SNI-switched by host name), stapling via
    ``stapler``. The first certificate's context is the default for unknown names.

    ``profile`` picks the TLS settings (:class:`TLSProfile`: ``"intermediate"``, the default,
    or ``"modern"``, TLS 1.3 only). ``context_factory``, if given, makes each context instead
    of :func:`new_context` (called once per distinct set of host names); its contexts are used
    as they come, so ``profile`` does not apply to them. The certificates are loaded into them
    and the stapler installed. Make them all alike: a connection keeps the protocol versions,
    suites and groups of the first (default) context; an SNI switch changes only certificates
    and callbacks.

    Raises :exc:`ValueError` for no certificates or an unknown profile,
    :class:`~staple.ChainError` for a chain or key that cannot be loaded, :exc:`TypeError` if
    ``context_factory`` returns something else than an ``OpenSSL.SSL.Context``.
    """
    if not certs:
        raise ValueError("at least one (chain, key) pair is needed")
    make = context_factory or functools.partial(new_context, _profile(profile))
    by_names: dict[frozenset[str], SSL.Context] = {}
    for chain, key in certs:
        leaf = load_chain(chain if not isinstance(chain, str) else Path(chain))[0]
        names = host_names(leaf)
        ctx = by_names.get(names)
        if ctx is None:
            ctx = by_names[names] = make()
            stapler.install(ctx)  # TypeError for anything but a pyOpenSSL context
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
