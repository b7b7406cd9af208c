"""A throwaway public-key infrastructure for tests, in the spirit of trustme.

``TestPKI()`` with no arguments gives a root CA, an intermediate CA issued by it, a delegated
OCSP responder certificate (with and without the OCSPSigning EKU) and, on demand, an unrelated
"rogue" CA; ``pki.issue_leaf("example.test", ocsp_url=...)`` gives a server certificate with its
chain and key, ready for pyOpenSSL or files on disk. Every certificate a CA issues is recorded
(``ca.issued``), which is how :class:`~staple.testing.OcspResponder` knows that a serial is
``good`` by default.

Keys: CA and responder keys are P-256 unless ``TestPKI(key_type=...)`` says otherwise, one per
CA. Leaf keys are fresh per certificate for ``"ec"`` and ``"ed25519"``; for ``"rsa"`` (2048
bits, slow to generate) one key per :class:`TestPKI` is made on first use and shared by every
RSA leaf of that PKI.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import cached_property
from types import MappingProxyType
from typing import Literal, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto

__all__ = ["CA", "KeyType", "Leaf", "PrivateKey", "TestPKI"]

KeyType: TypeAlias = Literal["rsa", "ec", "ed25519"]
"""The key types the test PKI can make: RSA 2048, ECDSA P-256, Ed25519."""

PrivateKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
"""A private key of one of the :data:`KeyType` kinds."""

StrPath: TypeAlias = str | os.PathLike[str]

_LEAF_LIFETIME = timedelta(days=365)
_CA_LIFETIME = timedelta(days=3650)
_BACKDATE = timedelta(days=1)


def _generate_key(key_type: KeyType) -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key_type {key_type!r}; use 'rsa', 'ec' or 'ed25519'")


def signature_hash(key: PrivateKey) -> hashes.SHA256 | None:
    """The hash to sign with ``key``: SHA-256, or ``None`` for Ed25519 (which hashes itself)."""
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _aware(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


def _pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _general_name(identity: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(identity))
    except ValueError:
        pass
    if not identity.isascii():
        labels = identity.split(".")
        identity = ".".join(
            label if label.isascii() else label.encode("idna").decode("ascii") for label in labels
        )
    return x509.DNSName(identity)


class CA:
    """A certificate authority of a :class:`TestPKI`: its certificate, its key, what it issued.

    Made by the PKI (``pki.root``, ``pki.intermediate``, ``pki.rogue``,
    :meth:`issue_intermediate`); not constructed directly.
    """

    def __init__(
        self,
        pki: TestPKI,
        name: str,
        cert: x509.Certificate,
        key: PrivateKey,
        parent: CA | None,
    ) -> None:
        self.pki = pki
        """The PKI this CA belongs to."""
        self.name = name
        """A short name (``"root"``, ``"intermediate"``, ``"rogue"``...), used in URLs and reprs."""
        self.cert = cert
        """The CA certificate."""
        self.key = key
        """The CA's private key."""
        self.parent = parent
        """The CA that issued this one, or ``None`` for a self-signed CA."""
        self._issued: dict[int, x509.Certificate] = {}
        self.issued: Mapping[int, x509.Certificate] = MappingProxyType(self._issued)
        """Every certificate this CA signed, by serial number (read-only)."""

    def __repr__(self) -> str:
        return f"<CA {self.name} {self.cert.subject.rfc4514_string()}>"

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate in PEM."""
        return _pem([self.cert])

    @property
    def chain(self) -> list[x509.Certificate]:
        """The certificates a server sends after a leaf of this CA: this CA and its parents,
        leaf-most first, without the self-signed root (``[]`` for a root)."""
        chain: list[x509.Certificate] = []
        ca: CA | None = self
        while ca is not None and ca.parent is not None:
            chain.append(ca.cert)
            ca = ca.parent
        return chain

    # -- issuing ------------------------------------------------------------------------------

    def issue_leaf(
        self,
        *hostnames: str,
        key_type: KeyType = "ec",
        ocsp_url: str | Sequence[str] | None = None,
        ca_issuers_url: str | None = None,
        must_staple: bool = False,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> Leaf:
        """Issue a TLS server (and client) certificate for ``hostnames``.

        ``hostnames`` are DNS names (wildcards and IDNs allowed) or IP addresses; with none,
        the certificate is for ``localhost`` and ``127.0.0.1``. ``ocsp_url`` (one or several)
        and ``ca_issuers_url`` go into the Authority Information Access extension, which is
        left out when both are ``None``. ``must_staple`` adds the TLS Feature extension
        (``status_request``, RFC 7633). Validity defaults to one day before the PKI's ``now``
        to 365 days after it.
        """
        identities = hostnames or ("localhost", "127.0.0.1")
        key = self.pki._leaf_key(key_type)
        names = [_general_name(h) for h in identities]
        subject = self.pki._name(identities[0][:64])
        key_usage = x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=key_type == "rsa",
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        )
        extensions: list[tuple[x509.ExtensionType, bool]] = [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (key_usage, True),
            (
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                False,
            ),
            (x509.SubjectAlternativeName(names), False),
        ]
        ocsp_urls = [ocsp_url] if isinstance(ocsp_url, str) else list(ocsp_url or [])
        access = [
            x509.AccessDescription(
                AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(u)
            )
            for u in ocsp_urls
        ]
        if ca_issuers_url is not None:
            access.append(
                x509.AccessDescription(
                    AuthorityInformationAccessOID.CA_ISSUERS,
                    x509.UniformResourceIdentifier(ca_issuers_url),
                )
            )
        if access:
            extensions.append((x509.AuthorityInformationAccess(access), False))
        if must_staple:
            extensions.append((x509.TLSFeature([x509.TLSFeatureType.status_request]), False))
        cert = self._sign(
            subject,
            key,
            extensions,
            not_before=not_before,
            not_after=not_after,
            lifetime=_LEAF_LIFETIME,
        )
        return Leaf(cert, key, self)

    def issue_responder(
        self,
        *,
        ocsp_signing: bool = True,
        nocheck: bool = True,
        key_type: KeyType = "ec",
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> Leaf:
        """Issue a delegated OCSP responder certificate (RFC 6960 §4.2.2.2).

        It carries the ``id-kp-OCSPSigning`` extended key usage unless ``ocsp_signing`` is
        false (then it has no EKU extension at all), and ``id-pkix-ocsp-nocheck`` unless
        ``nocheck`` is false. Its key is always fresh, never shared with a leaf.
        """
        key = _generate_key(key_type)
        extensions: list[tuple[x509.ExtensionType, bool]] = [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                True,
            ),
        ]
        if ocsp_signing:
            extensions.append((x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), False))
        if nocheck:
            extensions.append((x509.OCSPNoCheck(), False))
        label = "OCSP responder" if ocsp_signing else "OCSP responder without EKU"
        cert = self._sign(
            self.pki._name(f"{self.name} {label}"),
            key,
            extensions,
            not_before=not_before,
            not_after=not_after,
            lifetime=_LEAF_LIFETIME,
        )
        return Leaf(cert, key, self)

    def issue_intermediate(
        self,
        name: str | None = None,
        *,
        key_type: KeyType | None = None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> CA:
        """Issue a subordinate CA and add it to the PKI (so responders answer for it).

        ``key_type`` defaults to the PKI's; validity to the PKI's CA validity (ten years).
        """
        key = _generate_key(key_type or self.pki.key_type)
        name = name or f"{self.name}-sub{len(self.pki.cas)}"
        extensions = _ca_extensions()
        cert = self._sign(
            self.pki._name(f"staple test {name} CA"),
            key,
            extensions,
            not_before=not_before,
            not_after=not_after,
            lifetime=_CA_LIFETIME,
        )
        return self.pki._add_ca(CA(self.pki, name, cert, key, self))

    @cached_property
    def responder(self) -> Leaf:
        """This CA's delegated OCSP responder certificate (OCSPSigning EKU and nocheck),
        issued on first access."""
        return self.issue_responder()

    @cached_property
    def responder_without_eku(self) -> Leaf:
        """Like :attr:`responder` but without the OCSPSigning EKU: a responder that must be
        refused."""
        return self.issue_responder(ocsp_signing=False)

    def _sign(
        self,
        subject: x509.Name,
        key: PrivateKey,
        extensions: list[tuple[x509.ExtensionType, bool]],
        *,
        not_before: datetime | None,
        not_after: datetime | None,
        lifetime: timedelta,
    ) -> x509.Certificate:
        base = self.pki.now
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_aware(not_before) if not_before else base - _BACKDATE)
            .not_valid_after(_aware(not_after) if not_after else base + lifetime)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical)
        cert = builder.sign(self.key, signature_hash(self.key))
        self._issued[cert.serial_number] = cert
        return cert


def _ca_extensions() -> list[tuple[x509.ExtensionType, bool]]:
    return [
        (x509.BasicConstraints(ca=True, path_length=None), True),
        (
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        ),
    ]


class Leaf:
    """An end-entity certificate with its key and issuer: a server certificate, or a delegated
    OCSP responder certificate."""

    def __init__(self, cert: x509.Certificate, key: PrivateKey, issuer: CA) -> None:
        self.cert = cert
        """The certificate."""
        self.key = key
        """Its private key."""
        self.issuer = issuer
        """The CA that issued it."""

    def __repr__(self) -> str:
        return f"<Leaf {self.cert.subject.rfc4514_string()} serial={self.cert.serial_number:#x}>"

    @property
    def chain(self) -> list[x509.Certificate]:
        """What a server sends: this certificate then its intermediates, never the root
        (``[leaf, intermediate]`` for a leaf of ``pki.intermediate``)."""
        return [self.cert, *self.issuer.chain]

    @property
    def cert_pem(self) -> bytes:
        """This certificate alone, in PEM."""
        return _pem([self.cert])

    @property
    def chain_pem(self) -> bytes:
        """:attr:`chain` in PEM, leaf first."""
        return _pem(self.chain)

    @property
    def key_pem(self) -> bytes:
        """The private key in unencrypted PKCS#8 PEM."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write_chain(self, path: StrPath) -> None:
        """Write :attr:`chain_pem` to ``path``."""
        with open(path, "wb") as f:
            f.write(self.chain_pem)

    def write_key(self, path: StrPath) -> None:
        """Write :attr:`key_pem` to ``path`` (readable by the owner only)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key_pem)

    def configure_pyopenssl(self, ctx: SSL.Context) -> None:
        """Load this certificate, its intermediates and its key into a pyOpenSSL context.

        Raises :class:`OpenSSL.SSL.Error` if the context refuses them (for example a context
        already used for a connection, which pyOpenSSL freezes).
        """
        ctx.use_certificate(self.cert)
        for cert in self.chain[1:]:
            ctx.add_extra_chain_cert(cert)
        ctx.use_privatekey(self.key)
        ctx.check_privatekey()


class TestPKI:
    """A root CA, an intermediate CA and OCSP responder certificates, made in memory.

    ``now`` is the moment validity periods are centred on (default: the real current time);
    pass ``FakeClock().now()`` to line them up with a fake clock. Certificates are valid from
    one day before ``now``; leaves and responders for 365 days after it, CAs for ten years.
    ``key_type`` is the CAs' key type (responders and leaves choose their own).
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, *, now: datetime | None = None, key_type: KeyType = "ec") -> None:
        self.now = _aware(now) if now is not None else datetime.now(UTC).replace(microsecond=0)
        """The reference moment of default validity periods."""
        self.key_type: KeyType = key_type
        """The key type of the CAs."""
        self._tag = uuid.uuid4().hex[:12]
        self._rsa_key: rsa.RSAPrivateKey | None = None
        self._cas: list[CA] = []

        self.root: CA = self._self_signed("root")
        """The self-signed root CA: the only certificate clients need to trust."""
        self.intermediate: CA = self.root.issue_intermediate("intermediate")
        """The intermediate CA, issued by :attr:`root`, which issues leaves by default."""

    def __repr__(self) -> str:
        return f"<TestPKI {self._tag} cas={[ca.name for ca in self._cas]}>"

    @property
    def cas(self) -> tuple[CA, ...]:
        """Every CA of this PKI, in creation order (the rogue CA once it was made)."""
        return tuple(self._cas)

    @property
    def responder(self) -> Leaf:
        """The intermediate's delegated OCSP responder certificate (OCSPSigning EKU and
        nocheck)."""
        return self.intermediate.responder

    @property
    def responder_without_eku(self) -> Leaf:
        """A responder certificate of the intermediate without the OCSPSigning EKU."""
        return self.intermediate.responder_without_eku

    @cached_property
    def rogue(self) -> CA:
        """An unrelated self-signed CA (not trusted by :attr:`ca_bundle_pem`), whose key signs
        "wrong signer" responses. Made on first access."""
        return self._self_signed("rogue")

    def issue_leaf(
        self,
        *hostnames: str,
        key_type: KeyType = "ec",
        ocsp_url: str | Sequence[str] | None = None,
        ca_issuers_url: str | None = None,
        must_staple: bool = False,
        issuer: CA | None = None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> Leaf:
        """Issue a server certificate from ``issuer`` (default :attr:`intermediate`).

        See :meth:`CA.issue_leaf` for the options.
        """
        return (issuer or self.intermediate).issue_leaf(
            *hostnames,
            key_type=key_type,
            ocsp_url=ocsp_url,
            ca_issuers_url=ca_issuers_url,
            must_staple=must_staple,
            not_before=not_before,
            not_after=not_after,
        )

    @property
    def ca_bundle_pem(self) -> bytes:
        """The trust anchors clients should load: the root certificate alone, in PEM."""
        return self.root.cert_pem

    def write_ca_bundle(self, path: StrPath) -> None:
        """Write :attr:`ca_bundle_pem` to ``path``."""
        with open(path, "wb") as f:
            f.write(self.ca_bundle_pem)

    def configure_trust(self, ctx: ssl.SSLContext | SSL.Context) -> None:
        """Make a stdlib or pyOpenSSL context trust this PKI's root."""
        if isinstance(ctx, ssl.SSLContext):
            ctx.load_verify_locations(cadata=self.ca_bundle_pem.decode("ascii"))
        else:
            store = ctx.get_cert_store()
            if store is None:  # pragma: no cover - only for contexts pyOpenSSL did not make
                raise TypeError(f"{ctx!r} has no certificate store")
            store.add_cert(crypto.X509.from_cryptography(self.root.cert))

    # -- internals ------------------------------------------------------------------------------

    def _name(self, common_name: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "staple.testing"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"test PKI {self._tag}"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )

    def _leaf_key(self, key_type: KeyType) -> PrivateKey:
        if key_type == "rsa":
            if self._rsa_key is None:
                key = _generate_key("rsa")
                assert isinstance(key, rsa.RSAPrivateKey)
                self._rsa_key = key
            return self._rsa_key
        return _generate_key(key_type)

    def _add_ca(self, ca: CA) -> CA:
        self._cas.append(ca)
        return ca

    def _self_signed(self, name: str) -> CA:
        key = _generate_key(self.key_type)
        subject = self._name(f"staple test {name} CA")
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - _BACKDATE)
            .not_valid_after(self.now + _CA_LIFETIME)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        )
        for extension, critical in _ca_extensions():
            builder = builder.add_extension(extension, critical)
        cert = builder.sign(key, signature_hash(key))
        return self._add_ca(CA(self, name, cert, key, None))
