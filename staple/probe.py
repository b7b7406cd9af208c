"""Probe a TLS server: does it staple, and is what it staples any good? (``staple probe``.)

A TLS client on pyOpenSSL asks for a staple (``status_request``) and verifies whatever comes
back with :func:`staple.ocsp.validate` against the chain the server sent (leaf first, then its
issuer). The TLS layer runs over memory BIOs on an asyncio TCP connection, so the whole probe is
one coroutine under one timeout: no thread, no blocking socket.

Exit codes (:attr:`ProbeResult.code`): 0 a verified ``good`` staple, 1 a verified ``revoked``
staple, 2 usage or connection error (refused, timed out, handshake or chain verification
failed), 3 no staple, 4 a staple that does not verify (or cannot: no issuer to check it with).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from OpenSSL import SSL, crypto

from . import ocsp
from .errors import ValidationError

__all__ = [
    "DEFAULT_TIMEOUT",
    "EXIT_CONNECTION",
    "EXIT_GOOD",
    "EXIT_INVALID",
    "EXIT_NO_STAPLE",
    "EXIT_REVOKED",
    "ProbeResult",
    "TLSVersion",
    "parse_target",
    "probe",
]

EXIT_GOOD, EXIT_REVOKED, EXIT_CONNECTION, EXIT_NO_STAPLE, EXIT_INVALID = 0, 1, 2, 3, 4

DEFAULT_TIMEOUT = 10.0

TLSVersion = Literal["1.2", "1.3"]

# The X509_V_ERR_* codes a misconfigured test or server most often hits.
_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    23: "certificate revoked",
    26: "unsuitable certificate purpose",
}


@dataclass(slots=True, kw_only=True)
class ProbeResult:
    """What one probe found. :attr:`code` is the exit code; :attr:`verdict` says it in words."""

    host: str
    port: int
    servername: str | None
    code: int = EXIT_CONNECTION
    verdict: str = ""
    protocol: str | None = None
    cipher: str | None = None
    chain: list[x509.Certificate] = field(default_factory=list)
    """What the server sent, leaf first."""
    chain_verified: bool | None = None
    """``True`` when checked against ``--cafile`` (and the name matched), ``None`` unchecked."""
    staple: bytes | None = None
    """The stapled DER; ``None`` when the handshake did not get that far, ``b""`` for none."""
    response: ocsp.VerifiedResponse | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def leaf(self) -> x509.Certificate | None:
        return self.chain[0] if self.chain else None

    @property
    def status(self) -> str | None:
        """``good`` / ``revoked`` for a verified staple, else ``None``."""
        return self.response.cert_status.name.lower() if self.response else None

    @property
    def remaining(self) -> timedelta | None:
        """How long the verified staple stays valid (until min(nextUpdate, signer notAfter))."""
        return self.response.expires - self.now if self.response else None

    def as_dict(self) -> dict[str, Any]:
        r = self.response
        leaf = self.leaf
        return {
            "server": f"{self.host}:{self.port}",
            "servername": self.servername,
            "protocol": self.protocol,
            "cipher": self.cipher,
            "certificate": ocsp.describe(leaf) if leaf is not None else None,
            "key": _key_type(leaf) if leaf is not None else None,
            "chain_length": len(self.chain),
            "chain_verified": self.chain_verified,
            "stapled": bool(self.staple),
            "staple_size": len(self.staple) if self.staple else None,
            "status": self.status,
            "this_update": r.this_update.isoformat() if r else None,
            "next_update": r.next_update.isoformat() if r else None,
            "produced_at": r.produced_at.isoformat() if r else None,
            "expires": r.expires.isoformat() if r else None,
            "remaining_seconds": int(self.remaining.total_seconds()) if self.remaining else None,
            "revocation_time": r.revocation_time.isoformat() if r and r.revocation_time else None,
            "signer": (r.signer_name + (" (delegated)" if r.delegated else " (issuer)"))
            if r
            else None,
            "error": self.error,
            "notes": self.notes,
            "verdict": self.verdict,
            "exit_code": self.code,
        }

    def lines(self) -> list[str]:
        """The human-readable report."""
        info = self.as_dict()
        rows: list[tuple[str, object]] = [("server", info["server"])]
        if self.servername:
            rows.append(("servername", self.servername))
        if self.protocol:
            rows.append(("protocol", f"{self.protocol}, {self.cipher}"))
        if self.leaf is not None:
            rows.append(("certificate", f"{info['certificate']} [{info['key']}]"))
            sent = f"{len(self.chain)} certificate{'s' if len(self.chain) != 1 else ''} sent"
            if self.chain_verified is None:
                sent += ", not verified (no --cafile)"
            elif self.chain_verified:
                sent += ", verified against --cafile"
            rows.append(("chain", sent))
        if self.staple is not None:
            rows.append(("staple", f"{len(self.staple)} bytes" if self.staple else "none"))
        if self.response is not None:
            r = self.response
            rows += [
                ("status", self.status),
                ("this update", r.this_update.isoformat()),
                ("next update", r.next_update.isoformat()),
                ("remaining", _duration(self.remaining) if self.remaining else None),
                ("signer", info["signer"]),
            ]
            if r.revocation_time is not None:
                rows.append(("revocation time", r.revocation_time.isoformat()))
        rows += [("note", note) for note in self.notes]
        if self.error:
            rows.append(("error", self.error))
        rows.append(("result", f"{self.verdict} (exit {self.code})"))
        width = max(len(k) for k, _ in rows) + 2
        return [f"{k + ':':<{width}}{v}" for k, v in rows if v is not None]


def parse_target(target: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``HOST`` (port 443). Raises ``ValueError``."""
    host, port = target, "443"
    if target.startswith("["):
        end = target.find("]")
        if end < 0:
            raise ValueError(f"unbalanced '[' in {target!r}")
        host, rest = target[1:end], target[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"expected ':PORT' after ']' in {target!r}")
            port = rest[1:]
    elif target.count(":") == 1:
        host, port = target.split(":")
    elif ":" in target:  # a bare IPv6 address
        ipaddress.IPv6Address(target)
    if not host:
        raise ValueError(f"no host in {target!r}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port {port!r} in {target!r}")
    return host, int(port)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


async def probe(
    host: str,
    port: int,
    *,
    servername: str | None = None,
    cafile: str | Path | None = None,
    version: TLSVersion | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    now: datetime | None = None,
) -> ProbeResult:
    """Connect to ``host:port``, ask for a staple and verify it. Never raises for anything the
    server or network does; the result's :attr:`~ProbeResult.code` says what happened.

    ``servername`` (default: ``host`` unless it is an IP address) is sent as SNI and, with
    ``cafile``, checked against the leaf's subjectAltName. ``version`` pins TLS 1.2 or 1.3.
    ``timeout`` bounds the whole probe (connect, handshake, close).
    """
    if servername is None and not _is_ip(host):
        servername = host
    result = ProbeResult(host=host, port=port, servername=servername)
    if now is not None:
        result.now = now
    try:
        ctx, seen = _client_context(cafile, version)
    except (OSError, SSL.Error, ValueError) as exc:
        result.code, result.verdict = EXIT_CONNECTION, "usage error"
        result.error = f"cannot load --cafile {cafile}: {exc}"
        return result
    try:
        async with asyncio.timeout(timeout):
            await _connect(result, ctx, seen)
    except TimeoutError:
        result.error = f"no answer within {timeout:g} s"
        result.code, result.verdict = EXIT_CONNECTION, "connection error"
        return result
    except (OSError, SSL.Error, EOFError) as exc:
        result.error = _describe_failure(exc, result)
        result.code, result.verdict = EXIT_CONNECTION, "connection error"
        if seen.verify_errors:
            result.chain_verified = False
            result.verdict = "certificate verification failed"
            result.error = "certificate verification failed: " + "; ".join(seen.verify_errors)
        return result
    if cafile is not None:
        _check_name(result)
        if result.chain_verified is False:
            result.code, result.verdict = EXIT_CONNECTION, "certificate verification failed"
            return result
    _judge_staple(result, cafile)
    return result


# -- the TLS client ------------------------------------------------------------------------


@dataclass(slots=True)
class _Seen:
    staple: bytes | None = None
    verify_errors: list[str] = field(default_factory=list)


def _client_context(
    cafile: str | Path | None, version: TLSVersion | None
) -> tuple[SSL.Context, _Seen]:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    if version == "1.2":
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    elif version == "1.3":
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    seen = _Seen()

    def on_status(conn: SSL.Connection, der: bytes, data: object) -> bool:
        seen.staple = der
        return True  # judged after the handshake, where the chain is known

    ctx.set_ocsp_client_callback(on_status)
    if cafile is not None:
        ctx.load_verify_locations(str(cafile))

        def on_verify(
            conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int
        ) -> bool:
            if not ok:
                reason = _VERIFY_ERRORS.get(errnum, f"X509 verify error {errnum}")
                subject = cert.to_cryptography().subject.rfc4514_string()
                seen.verify_errors.append(f"{reason} at depth {depth} ({subject})")
            return bool(ok)

        ctx.set_verify(SSL.VERIFY_PEER, on_verify)
    else:
        ctx.set_verify(SSL.VERIFY_NONE)
    return ctx, seen


async def _connect(result: ProbeResult, ctx: SSL.Context, seen: _Seen) -> None:
    reader, writer = await asyncio.open_connection(result.host, result.port)
    try:
        conn = SSL.Connection(ctx, None)
        conn.set_connect_state()
        if result.servername:
            conn.set_tlsext_host_name(result.servername.encode("idna"))
        conn.request_ocsp()
        await _handshake(conn, reader, writer)
        result.staple = seen.staple if seen.staple is not None else b""
        result.protocol = conn.get_protocol_version_name()
        result.cipher = conn.get_cipher_name()
        leaf = conn.get_peer_certificate(as_cryptography=True)
        chain = conn.get_peer_cert_chain(as_cryptography=True) or []
        if leaf is not None and (not chain or chain[0] != leaf):
            chain.insert(0, leaf)
        result.chain = chain
        if ctx.get_verify_mode() & SSL.VERIFY_PEER:
            result.chain_verified = True  # OpenSSL would have failed the handshake otherwise
        with contextlib.suppress(SSL.Error):
            conn.shutdown()  # close_notify
            await _flush(conn, writer)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _handshake(
    conn: SSL.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    while True:
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            pass
        except SSL.Error:
            with contextlib.suppress(SSL.Error, OSError):  # send our alert, if any
                await _flush(conn, writer)
            raise
        else:
            await _flush(conn, writer)
            return
        await _flush(conn, writer)
        data = await reader.read(65536)
        if not data:
            raise EOFError("the server closed the connection during the TLS handshake")
        conn.bio_write(data)


async def _flush(conn: SSL.Connection, writer: asyncio.StreamWriter) -> None:
    while True:
        try:
            data = conn.bio_read(65536)
        except SSL.WantReadError:
            break
        writer.write(data)
    await writer.drain()


def _describe_failure(exc: BaseException, result: ProbeResult) -> str:
    where = f"{result.host}:{result.port}"
    if isinstance(exc, SSL.Error):
        # Reason strings of the OpenSSL error queue, e.g. "tlsv1 alert internal error".
        queue = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
        reasons = [str(e[2]) for e in queue if isinstance(e, tuple) and len(e) == 3]
        text = "; ".join(reasons) or str(exc) or type(exc).__name__
        return f"TLS handshake with {where} failed: {text}"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection to {where} refused"
    if isinstance(exc, OSError):
        return f"cannot connect to {where}: {exc.strerror or exc}"
    return f"{where}: {exc}"


# -- judging what came back ----------------------------------------------------------------


def _check_name(result: ProbeResult) -> None:
    """With --cafile, the served leaf must also be for the name we asked for."""
    leaf = result.leaf
    name = result.servername or result.host
    if leaf is None or _name_matches(leaf, name):
        return
    result.chain_verified = False
    result.error = f"the certificate is not valid for {name!r} (subjectAltName: {_sans(leaf)})"


def _sans(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "none"
    names = [*san.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return ", ".join(names) or "none"


def _name_matches(cert: x509.Certificate, name: str) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False  # RFC 6125: no subject CN fallback, like every current browser
    if _is_ip(name):
        return ipaddress.ip_address(name) in san.get_values_for_type(x509.IPAddress)
    name = name.rstrip(".").lower()
    for pattern in (p.lower() for p in san.get_values_for_type(x509.DNSName)):
        if pattern == name:
            return True
        if pattern.startswith("*.") and "." in name and name.split(".", 1)[1] == pattern[2:]:
            return True
    return False


def _find_issuer(
    leaf: x509.Certificate, chain: list[x509.Certificate], cafile: str | Path | None
) -> x509.Certificate | None:
    candidates = list(chain[1:])
    if cafile is not None:
        with contextlib.suppress(OSError, ValueError):
            candidates += x509.load_pem_x509_certificates(Path(cafile).read_bytes())
    for cert in candidates:
        if cert.subject == leaf.issuer:
            return cert
    return None


def _judge_staple(result: ProbeResult, cafile: str | Path | None) -> None:
    leaf = result.leaf
    if not result.staple:
        result.code, result.verdict = EXIT_NO_STAPLE, "no staple"
        result.error = result.error or "the server sent no OCSP response (status_request asked)"
        return
    if leaf is None:  # pragma: no cover - a TLS server always sends a certificate
        result.code, result.verdict = EXIT_INVALID, "staple not verifiable"
        result.error = "the server sent no certificate"
        return
    if len(result.chain) == 1:
        result.notes.append(
            "the server sent only its leaf certificate, not the issuer; clients that lack the "
            "intermediate cannot build the chain"
        )
    issuer = _find_issuer(leaf, result.chain, cafile)
    if issuer is None:
        result.code, result.verdict = EXIT_INVALID, "staple not verifiable"
        result.error = (
            f"no issuer certificate ({leaf.issuer.rfc4514_string()}) to verify the staple with: "
            "the server did not send it; pass it with --cafile"
        )
        return
    try:
        # margin 0: the question is whether a client accepts it now, not whether a server
        # should still staple it; the remaining validity is reported.
        result.response = ocsp.validate(
            result.staple, leaf, issuer, now=result.now, margin=timedelta(0)
        )
    except ValidationError as exc:
        result.code, result.verdict = EXIT_INVALID, "invalid staple"
        result.error = str(exc)
        return
    if result.response.cert_status is ocsp.CertStatus.REVOKED:
        result.code, result.verdict = EXIT_REVOKED, "verified staple: certificate REVOKED"
    else:
        result.code, result.verdict = EXIT_GOOD, "verified good staple"


def _key_type(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448"
    return type(key).__name__


def _duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    text = f"{days}d {hours}h {minutes}m" if days else f"{hours}h {minutes}m"
    return sign + text + (" (EXPIRED)" if sign else "")
