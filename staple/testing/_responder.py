"""A local OCSP responder with fault switches, for tests.

Theory of operation: :class:`OcspResponder` is an aiohttp low-level server on 127.0.0.1 with a
single handler. A request is, in order: counted; served as a CA certificate if its path was
registered by :meth:`~OcspResponder.serve_issuer`; subjected to the transport faults (DOWN
resets the connection, the REDIRECT_* faults redirect, SLOW waits); decoded (GET
``/<prefix>/<base64>`` or POST ``application/ocsp-request``) into CertIDs; answered from the
status table by :meth:`OcspResponder._answer`, which builds a real signed response; bent by the
content faults (wrong status, dates, signer, encoding, a replay...); and finally sent, all at
once or as the body faults say (CONNECTION_RESET, SLOW_BODY, GZIP_BOMB). The outcome is
appended to :attr:`OcspResponder.log`.

Responses are built with :class:`cryptography.x509.ocsp.OCSPResponseBuilder`. That builder
takes one SingleResponse and stamps producedAt with the real time, so the responder re-signs
its output after two edits to the ResponseData: producedAt becomes the injected clock's time
(so responses agree with a :class:`~staple.testing.FakeClock`), and a request with several
CertIDs gets one SingleResponse for each.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import functools
import math
import os
import socket
import struct
import urllib.parse
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Literal, TypeAlias

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp as x509_ocsp

from staple.clock import Clock, SystemClock
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

from ._pki import CA, Leaf, PrivateKey, TestPKI, signature_hash

__all__ = ["CertStatusName", "Fault", "OcspResponder"]

CertStatusName: TypeAlias = Literal["good", "revoked", "unknown"]
"""A certificate status in the responder's table."""

OCSP_REQUEST_TYPE = "application/ocsp-request"
OCSP_RESPONSE_TYPE = "application/ocsp-response"
PKIX_CERT_TYPE = "application/pkix-cert"

OVERSIZE_BYTES = 1 << 20
"""The body size of :attr:`Fault.OVERSIZE` (1 MiB)."""

GZIP_BOMB_BYTES = 100 << 20
"""What the body of :attr:`Fault.GZIP_BOMB` inflates to (100 MiB of zeros)."""

REDIRECT_FILE_URL = "file:///etc/passwd"
"""Where :attr:`Fault.REDIRECT_FILE` sends the client."""

REDIRECT_FTP_URL = "ftp://127.0.0.1/ocsp"
"""Where :attr:`Fault.REDIRECT_FTP` sends the client."""


class Fault(enum.Enum):
    """What the responder should get wrong, set with ``responder.fault = Fault.X`` (or ``"x"``).

    Faults apply to OCSP requests only; :meth:`OcspResponder.serve_issuer` paths always work.
    """

    # Transport and HTTP faults.
    DOWN = "down"
    """Accept the TCP connection, read the request, reset the connection (no HTTP response).
    (For a responder that is not listening at all, :meth:`OcspResponder.close` it.)"""
    CONNECTION_RESET = "connection_reset"
    """Send the status line, the headers and half of a valid response, then reset the
    connection: a reset in the middle of the body rather than before any answer."""
    SLOW = "slow"
    """Wait ``responder.slow_seconds`` (real time) before answering normally."""
    SLOW_BODY = "slow_body"
    """Send the headers and the first byte of a valid response at once, the rest after
    ``responder.slow_seconds`` (real time): only a total timeout, not a header timeout, ends
    the wait."""
    HTTP_404 = "http_404"
    """HTTP 404 with a text body (a responder URL that moved)."""
    HTTP_500 = "http_500"
    """HTTP 500 with a text body."""
    HTTP_503 = "http_503"
    """HTTP 503 with a text body and ``Retry-After: 120`` (an overloaded responder)."""
    REDIRECT_LOOP = "redirect_loop"
    """HTTP 307 back to the same URL, every time."""
    REDIRECT_FILE = "redirect_file"
    """HTTP 302 to ``file:///etc/passwd`` (:data:`REDIRECT_FILE_URL`): a client must not follow
    a redirect out of HTTP."""
    REDIRECT_FTP = "redirect_ftp"
    """HTTP 302 to ``ftp://127.0.0.1/ocsp`` (:data:`REDIRECT_FTP_URL`)."""
    GZIP_BOMB = "gzip_bomb"
    """HTTP 200, ``application/ocsp-response``, ``Content-Encoding: gzip``, chunked (no
    Content-Length to refuse early): about 100 KiB that inflate to :data:`GZIP_BOMB_BYTES` of
    zeros."""
    HTML_ERROR = "html_error"
    """HTTP 200 with a ``text/html`` error page, like a captive portal or a misconfigured CDN."""
    WRONG_CONTENT_TYPE = "wrong_content_type"
    """The correct DER response, labelled ``text/plain``."""
    # Unsuccessful OCSP responses (responseStatus other than successful).
    TRY_LATER = "try_later"
    """responseStatus ``tryLater``."""
    UNAUTHORIZED = "unauthorized"
    """responseStatus ``unauthorized``."""
    MALFORMED_REQUEST = "malformed_request"
    """responseStatus ``malformedRequest``."""
    # Broken bodies.
    GARBAGE = "garbage"
    """Random bytes that are not DER, labelled ``application/ocsp-response``."""
    TRUNCATED = "truncated"
    """The first half of a valid response."""
    OVERSIZE = "oversize"
    """A 1 MiB body: a valid response followed by zero padding."""
    # Signed, well-formed responses that must not be stapled (or must be stapled with care).
    UNKNOWN = "unknown"
    """Status ``unknown`` whatever the table says."""
    REVOKED = "revoked"
    """Status ``revoked`` (key compromise, an hour before thisUpdate) whatever the table says."""
    EXPIRED = "expired"
    """nextUpdate one minute ago, thisUpdate one validity period before that."""
    FUTURE = "future"
    """thisUpdate one day from now."""
    NO_NEXT_UPDATE = "no_next_update"
    """No nextUpdate field."""
    WRONG_SIGNER = "wrong_signer"
    """Signed by ``pki.rogue``, responder ID by the rogue CA's name."""
    SIGNER_WITHOUT_EKU = "signer_without_eku"
    """Signed by the issuer's delegated responder certificate that lacks the OCSPSigning EKU,
    embedded in the response."""
    WRONG_CERT = "wrong_cert"
    """A valid signed response about another serial number (the requested one plus one)."""
    REPLAY = "replay"
    """The first response the responder signed, without a fault, for the same CertIDs,
    re-sent unchanged: validly signed, but older than anything fetched since. If none was
    signed yet, the request is answered normally (and that answer is the one replayed)."""


@dataclass(frozen=True, slots=True)
class _Status:
    status: CertStatusName
    revocation_time: datetime | None = None
    reason: x509.ReasonFlags | None = None


@dataclass(frozen=True, slots=True)
class _CertId:
    algorithm: hashes.HashAlgorithm
    name_hash: bytes
    key_hash: bytes
    serial: int


@dataclass(frozen=True, slots=True)
class _Request:
    cert_ids: tuple[_CertId, ...]
    nonce: bytes | None


@dataclass(frozen=True, slots=True)
class _Answer:
    body: bytes
    outcome: str
    content_type: str = OCSP_RESPONSE_TYPE
    http_status: int = 200
    this_update: datetime | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True, eq=False)
class _Waiter:
    count: int
    future: asyncio.Future[None]


class _Server(web.Server):
    """aiohttp's low-level server, refusing connections accepted while it shuts down.

    A client retrying at the wrong moment can be accepted after aiohttp collected the
    connections to close; without this it would leak a socket (and a ResourceWarning).
    """

    closing = False

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if self.closing:
            transport.abort()


class OcspResponder:
    """A real OCSP responder for a :class:`~staple.testing.TestPKI`, on 127.0.0.1.

    Every certificate the PKI's CAs issued is ``good`` until :meth:`revoke` or
    :meth:`set_status` says otherwise; serials the CA never issued are ``unknown``; CertIDs of
    issuers outside the PKI get an ``unauthorized`` response.

    ``clock`` supplies "now" (default: the system clock). Responses are valid from ``now -
    backdate`` for ``validity``. ``signer`` is ``"issuer"`` (the CA's own key, responder ID by
    name), ``"delegated"`` (the CA's :attr:`~staple.testing.CA.responder` certificate,
    responder ID by key hash, certificate embedded) or any :class:`~staple.testing.Leaf` to
    sign delegated-style with it. ``extra_certs`` are embedded in every signed response, after
    a delegated signer's own certificate, the way some CAs embed their own certificate or the
    root's: harmless, and of no use to a client. With ``max_age``, responses carry RFC 5019
    caching headers.

    Use it as ``async with OcspResponder(pki) as responder:``, or call :meth:`start` and
    :meth:`close`. :meth:`response_for` builds a response without any HTTP.
    """

    def __init__(
        self,
        pki: TestPKI,
        *,
        clock: Clock | None = None,
        validity: timedelta = timedelta(hours=24),
        backdate: timedelta = timedelta(minutes=1),
        signer: Literal["issuer", "delegated"] | Leaf = "issuer",
        extra_certs: Sequence[x509.Certificate] = (),
        max_age: int | None = None,
        slow_seconds: float = 30.0,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str = "/ocsp",
    ) -> None:
        if not (isinstance(signer, Leaf) or signer in ("issuer", "delegated")):
            raise ValueError(f"signer must be 'issuer', 'delegated' or a Leaf, not {signer!r}")
        self.pki = pki
        """The PKI whose CAs this responder answers for."""
        self.clock: Clock = clock if clock is not None else SystemClock()
        """Where "now" comes from."""
        self.validity = validity
        """nextUpdate − thisUpdate of the responses."""
        self.backdate = backdate
        """How far before now thisUpdate is set."""
        self.signer = signer
        """``"issuer"``, ``"delegated"`` or the :class:`~staple.testing.Leaf` that signs."""
        self.extra_certs: list[x509.Certificate] = list(extra_certs)
        """Certificates embedded in every signed response besides a delegated signer's."""
        self.max_age = max_age
        """The ``Cache-Control: max-age`` to send, or ``None`` for no caching headers."""
        self.slow_seconds = slow_seconds
        """How long (real seconds) :attr:`Fault.SLOW` waits before answering."""
        self.requests = 0
        """How many HTTP requests arrived, faulted or not."""
        self.log: list[tuple[str, str]] = []
        """One ``(method, outcome)`` per handled request (a SLOW one as soon as it starts
        waiting); the outcome is the fault's value
        (``"down"``, ``"try_later"``...) when a fault applied, else the status(es) answered
        (``"good"``, ``"revoked"``, ``"good,unknown"``), ``"issuer"``, ``"malformed_request"``,
        ``"unauthorized"``, ``"bad_content_type"`` or ``"method_not_allowed"``."""
        self._host = host
        self._port = port
        self._path = "/" + path.strip("/") if path.strip("/") else ""
        self._fault: Fault | None = None
        self._table: dict[tuple[bytes, int], _Status] = {}
        self._issuers: dict[str, bytes] = {}
        self._first: dict[tuple[tuple[str, bytes, bytes, int], ...], _Answer] = {}
        self._runner: web.ServerRunner | None = None
        self._server: _Server | None = None
        self._closing: asyncio.Event | None = None
        self._waiters: list[_Waiter] = []

    def __repr__(self) -> str:
        where = self.url if self._runner is not None else "not started"
        fault = self._fault.value if self._fault else None
        return f"<OcspResponder {where} fault={fault} requests={self.requests}>"

    def __del__(self) -> None:
        if getattr(self, "_runner", None) is not None:
            warnings.warn(
                f"unclosed OcspResponder on port {self._port}; call await responder.close()",
                ResourceWarning,
                source=self,
                stacklevel=1,
            )

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening. Restarting after :meth:`close` reuses the same port.

        Raises :class:`RuntimeError` if already running.
        """
        if self._runner is not None:
            raise RuntimeError(f"{self!r} is already running")
        self._closing = asyncio.Event()
        server = _Server(self._handle, access_log=None)
        runner = web.ServerRunner(server, shutdown_timeout=5.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._server = runner, server
        self._port = runner.addresses[0][1]

    async def close(self) -> None:
        """Stop listening and end pending requests (a SLOW request is reset). Idempotent."""
        runner, self._runner = self._runner, None
        server, self._server = self._server, None
        if runner is None or server is None:
            return
        assert self._closing is not None
        self._closing.set()
        server.closing = True
        await runner.cleanup()
        # Let connections accepted during the shutdown reach connection_made (and be aborted),
        # and aborted transports run connection_lost, so no socket outlives close().
        for _ in range(3):
            await asyncio.sleep(0)

    async def __aenter__(self) -> OcspResponder:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def port(self) -> int:
        """The TCP port. Raises :class:`RuntimeError` before the first :meth:`start`."""
        if self._port == 0:
            raise RuntimeError("the responder has no port yet: call await responder.start()")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``, without a path."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The OCSP URL to put in certificates' AIA, e.g. ``http://127.0.0.1:PORT/ocsp``.

        Any path is served, so ``base_url`` or ``url + "/anything"`` work as well.
        """
        return self.base_url + self._path

    # -- switches and the status table ------------------------------------------------------

    @property
    def fault(self) -> Fault | None:
        """The fault applied to the next OCSP requests, or ``None`` to behave.

        Accepts a :class:`Fault` or its name as a case-insensitive string (``"down"``).
        """
        return self._fault

    @fault.setter
    def fault(self, value: Fault | str | None) -> None:
        if value is None or isinstance(value, Fault):
            self._fault = value
            return
        try:
            self._fault = Fault(value.strip().lower())
        except ValueError:
            names = ", ".join(f.value for f in Fault)
            raise ValueError(f"unknown fault {value!r}; choose one of: {names}") from None

    def revoke(
        self,
        leaf_or_cert: Leaf | x509.Certificate,
        *,
        reason: x509.ReasonFlags | None = x509.ReasonFlags.key_compromise,
        at: datetime | None = None,
    ) -> None:
        """Mark a certificate revoked, at ``at`` (default: the clock's now) for ``reason``."""
        when = at.astimezone(UTC) if at is not None else self._now()
        self._table[self._key(leaf_or_cert)] = _Status(
            "revoked", when.replace(microsecond=0), reason
        )

    def set_status(self, leaf_or_cert: Leaf | x509.Certificate, status: CertStatusName) -> None:
        """Set a certificate's status. ``"revoked"`` means revoked now, with no reason; use
        :meth:`revoke` to choose the time and reason."""
        if status == "revoked":
            self.revoke(leaf_or_cert, reason=None)
        elif status in ("good", "unknown"):
            self._table[self._key(leaf_or_cert)] = _Status(status)
        else:
            raise ValueError(f"status must be 'good', 'revoked' or 'unknown', not {status!r}")

    def status_of(self, leaf_or_cert: Leaf | x509.Certificate) -> CertStatusName:
        """The status the responder currently gives a certificate (ignoring faults)."""
        cert = leaf_or_cert.cert if isinstance(leaf_or_cert, Leaf) else leaf_or_cert
        entry = self._table.get(self._key(cert))
        if entry is not None:
            return entry.status
        issued = any(
            ca.cert.subject == cert.issuer and ca.issued.get(cert.serial_number) == cert
            for ca in self.pki.cas
        )
        return "good" if issued else "unknown"

    def serve_issuer(self, ca: CA) -> str:
        """Serve ``ca``'s certificate (DER, ``application/pkix-cert``) and return its URL,
        for the caIssuers entry of a leaf's AIA. Needs the port, so call after :meth:`start`.
        """
        path = f"/issuer/{urllib.parse.quote(ca.name, safe='')}.der"
        der = ca.cert.public_bytes(serialization.Encoding.DER)
        if self._issuers.get(path, der) != der:
            path = f"/issuer/{urllib.parse.quote(ca.name, safe='')}-{ca.cert.serial_number:x}.der"
        self._issuers[path] = der
        return self.base_url + path

    async def wait_for_requests(self, n: int = 1) -> None:
        """Return once at least ``n`` requests have been handled (``len(log) >= n``).

        Never sleeps in real time; wrap it in :func:`asyncio.timeout` to bound it.
        """
        if len(self.log) >= n:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(n, future)
        self._waiters.append(waiter)
        try:
            await future
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    # -- building responses -----------------------------------------------------------------

    def response_for(
        self,
        leaf_or_cert: Leaf | x509.Certificate,
        *,
        issuer: CA | None = None,
        algorithm: hashes.HashAlgorithm | None = None,
    ) -> bytes:
        """The DER response the responder would send now for one certificate, without HTTP.

        Content faults apply (TRY_LATER, EXPIRED, WRONG_SIGNER, GARBAGE, TRUNCATED, REPLAY...);
        transport and HTTP faults (DOWN, SLOW, redirects, body faults) do not, and the HTTP
        error faults return their text body. The CertID uses
        ``algorithm`` (default SHA-1) and ``issuer`` (default the leaf's issuer, or the PKI CA
        whose name is the certificate's issuer). Nothing is counted or logged.
        """
        if isinstance(leaf_or_cert, Leaf):
            cert, ca = leaf_or_cert.cert, issuer or leaf_or_cert.issuer
        else:
            cert, ca = leaf_or_cert, issuer or self._ca_named(leaf_or_cert.issuer)
        request = (
            x509_ocsp.OCSPRequestBuilder()
            .add_certificate(cert, ca.cert, algorithm or hashes.SHA1())
            .build()
            .public_bytes(serialization.Encoding.DER)
        )
        return self._answer(request, self._fault).body

    def _answer(self, request_der: bytes | None, fault: Fault | None) -> _Answer:
        """The answer to one decoded request body (``None``: undecodable), fault applied."""
        if fault in _UNSUCCESSFUL:
            assert fault is not None
            return _unsuccessful(_UNSUCCESSFUL[fault], fault.value)
        if fault is Fault.GARBAGE:
            return _Answer(b"\x00staple.testing garbage\xff" + os.urandom(64), fault.value)
        if fault in _HTTP_ERRORS:
            assert fault is not None
            status, text, headers = _HTTP_ERRORS[fault]
            return _Answer(
                f"{status} {text} (staple.testing fault {fault.value})\n".encode(),
                fault.value,
                content_type="text/plain",
                http_status=status,
                headers=headers,
            )
        if fault is Fault.HTML_ERROR:
            page = b"<!doctype html><html><body><h1>Service unavailable</h1></body></html>\n"
            return _Answer(page, fault.value, content_type="text/html")

        try:
            request = _parse_request(request_der) if request_der is not None else None
        except (ValueError, IndexError, KeyError):
            request = None
        if request is None:
            answer = _unsuccessful(
                x509_ocsp.OCSPResponseStatus.MALFORMED_REQUEST, "malformed_request"
            )
        else:
            key = _request_key(request)
            first = self._first.get(key)
            if fault is Fault.REPLAY and first is not None:
                return _Answer(first.body, fault.value, this_update=first.this_update)
            answer = self._successful(request, None if fault is Fault.REPLAY else fault)
            if fault in (None, Fault.REPLAY) and first is None and answer.this_update is not None:
                self._first[key] = answer  # what REPLAY will send from now on

        if fault is Fault.WRONG_CONTENT_TYPE:
            return _Answer(answer.body, fault.value, "text/plain", this_update=answer.this_update)
        if fault is Fault.TRUNCATED:
            return _Answer(answer.body[: len(answer.body) // 2], fault.value)
        if fault is Fault.OVERSIZE:
            padded = answer.body + bytes(max(0, OVERSIZE_BYTES - len(answer.body)))
            return _Answer(padded, fault.value)
        return answer

    def _successful(self, request: _Request, fault: Fault | None) -> _Answer:
        cas = [self._ca_for(cert_id) for cert_id in request.cert_ids]
        ca = cas[0]
        if ca is None or any(other is not ca for other in cas):
            # Not authoritative for (all of) these issuers: RFC 5019 §2.2.3 says unauthorized.
            return _unsuccessful(x509_ocsp.OCSPResponseStatus.UNAUTHORIZED, "unauthorized")

        now = self._now()
        this_update = now - self.backdate
        next_update: datetime | None = this_update + self.validity
        if fault is Fault.EXPIRED:
            next_update = now - timedelta(minutes=1)
            this_update = next_update - self.validity
        elif fault is Fault.FUTURE:
            this_update = now + timedelta(days=1)
            next_update = this_update + self.validity
        elif fault is Fault.NO_NEXT_UPDATE:
            next_update = None

        # Who signs, and how the response names them.
        key: PrivateKey
        certs: list[x509.Certificate] = []
        if fault is Fault.WRONG_SIGNER:
            key, signer_cert = self.pki.rogue.key, self.pki.rogue.cert
            encoding = x509_ocsp.OCSPResponderEncoding.NAME
        elif fault is Fault.SIGNER_WITHOUT_EKU or self.signer != "issuer":
            if fault is Fault.SIGNER_WITHOUT_EKU:
                delegate = ca.responder_without_eku
            elif isinstance(self.signer, Leaf):
                delegate = self.signer
            else:
                delegate = ca.responder
            key, signer_cert = delegate.key, delegate.cert
            encoding = x509_ocsp.OCSPResponderEncoding.HASH
            certs = [delegate.cert]
        else:
            key, signer_cert = ca.key, ca.cert
            encoding = x509_ocsp.OCSPResponderEncoding.NAME
        certs += self.extra_certs

        singles: list[bytes] = []
        statuses: list[str] = []
        template: x509_ocsp.OCSPResponse | None = None
        for cert_id in request.cert_ids:
            entry = self._lookup(ca, cert_id.serial)
            if fault is Fault.UNKNOWN:
                entry = _Status("unknown")
            elif fault is Fault.REVOKED:
                entry = _Status(
                    "revoked", this_update - timedelta(hours=1), x509.ReasonFlags.key_compromise
                )
            serial = cert_id.serial + 1 if fault is Fault.WRONG_CERT else cert_id.serial
            builder = (
                x509_ocsp.OCSPResponseBuilder()
                .add_response_by_hash(
                    cert_id.name_hash,
                    cert_id.key_hash,
                    serial,
                    cert_id.algorithm,
                    _CERT_STATUS[entry.status],
                    this_update,
                    next_update,
                    entry.revocation_time,
                    entry.reason,
                )
                .responder_id(encoding, signer_cert)
            )
            if template is None:
                if certs:
                    builder = builder.certificates(certs)
                if request.nonce is not None:
                    builder = builder.add_extension(x509.OCSPNonce(request.nonce), False)
            response = builder.sign(key, signature_hash(key))
            template = template or response
            singles.append(_single_responses(response.tbs_response_bytes)[0])
            statuses.append(entry.status)

        assert template is not None
        der = _reassemble(template, singles, now, key)
        return _Answer(der, fault.value if fault else ",".join(statuses), this_update=this_update)

    # -- HTTP ---------------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.requests += 1
        method = request.method
        path = request.raw_path.split("?", 1)[0]
        fault = self._fault

        if method == "GET" and path in self._issuers:
            answer = _Answer(self._issuers[path], "issuer", content_type=PKIX_CERT_TYPE)
            self._record(method, answer.outcome)
            return self._respond(answer)
        if method not in ("GET", "POST"):
            self._record(method, "method_not_allowed")
            return web.Response(
                status=405, text="OCSP wants GET or POST\n", headers={"Allow": "GET, POST"}
            )
        if fault is Fault.DOWN:
            self._record(method, fault.value)
            return self._reset(request)
        if fault in _REDIRECTS:
            assert fault is not None
            self._record(method, fault.value)
            status, location = _REDIRECTS[fault]
            return web.Response(
                status=status,
                text=f"staple.testing fault {fault.value}\n",
                headers={"Location": location or request.raw_path},
            )

        slow = fault is Fault.SLOW
        if slow:
            # Logged as the wait starts, so wait_for_requests() tells a test a client hangs.
            self._record(method, Fault.SLOW.value)
            assert self._closing is not None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.slow_seconds):
                    await self._closing.wait()
            if self._closing.is_set():
                return self._reset(request)
            fault = None

        if method == "POST":
            content_type = request.headers.get("Content-Type", "")
            if content_type.split(";")[0].strip().lower() != OCSP_REQUEST_TYPE:
                if not slow:
                    self._record(method, "bad_content_type")
                return web.Response(
                    status=415, text=f"POST needs Content-Type: {OCSP_REQUEST_TYPE}\n"
                )
            request_der: bytes | None = await request.read()
        else:
            request_der = _decode_get_path(path)

        if fault is Fault.GZIP_BOMB:
            self._record(method, fault.value)
            return await self._send_gzip_bomb(request)
        answer = self._answer(request_der, fault)
        if not slow:
            self._record(method, answer.outcome)
        if fault is Fault.CONNECTION_RESET:
            return await self._send_then_reset(request, answer)
        if fault is Fault.SLOW_BODY:
            return await self._send_slowly(request, answer)
        return self._respond(answer)

    async def _send_then_reset(
        self, request: web.BaseRequest, answer: _Answer
    ) -> web.StreamResponse:
        """Headers and half the body, then a reset (CONNECTION_RESET)."""
        response = web.StreamResponse(headers={"Content-Type": answer.content_type})
        response.content_length = len(answer.body)
        with contextlib.suppress(ConnectionError):
            await response.prepare(request)
            await response.write(answer.body[: len(answer.body) // 2])
        self._reset(request)
        return response

    async def _send_slowly(self, request: web.BaseRequest, answer: _Answer) -> web.StreamResponse:
        """Headers and one byte at once, the rest after ``slow_seconds`` (SLOW_BODY)."""
        response = web.StreamResponse(headers={"Content-Type": answer.content_type})
        response.content_length = len(answer.body)
        try:
            await response.prepare(request)
            await response.write(answer.body[:1])
        except ConnectionError:
            return response
        assert self._closing is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.slow_seconds):
                await self._closing.wait()
        if self._closing.is_set():
            self._reset(request)
            return response
        with contextlib.suppress(ConnectionError):
            await response.write(answer.body[1:])
        return response

    async def _send_gzip_bomb(self, request: web.BaseRequest) -> web.StreamResponse:
        """A small gzip body that inflates to GZIP_BOMB_BYTES, chunked (GZIP_BOMB)."""
        response = web.StreamResponse(
            headers={"Content-Type": OCSP_RESPONSE_TYPE, "Content-Encoding": "gzip"}
        )
        response.enable_chunked_encoding()
        bomb = _gzip_bomb()
        with contextlib.suppress(ConnectionError):
            await response.prepare(request)
            for start in range(0, len(bomb), 16 * 1024):
                await response.write(bomb[start : start + 16 * 1024])
        return response

    def _respond(self, answer: _Answer) -> web.Response:
        now = self._now()
        response = web.Response(
            body=answer.body, status=answer.http_status, content_type=answer.content_type
        )
        response.headers["Date"] = format_datetime(now, usegmt=True)
        response.headers.extend(answer.headers)
        if self.max_age is not None and answer.this_update is not None:
            response.headers["Cache-Control"] = (
                f"max-age={self.max_age}, public, no-transform, must-revalidate"
            )
            response.headers["Last-Modified"] = format_datetime(answer.this_update, usegmt=True)
            expires = now + timedelta(seconds=self.max_age)
            response.headers["Expires"] = format_datetime(expires, usegmt=True)
        return response

    def _reset(self, request: web.BaseRequest) -> web.StreamResponse:
        """Reset the TCP connection (RST, not FIN) and give aiohttp nothing to send."""
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # SO_LINGER with a zero timeout turns close() into a reset.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        return web.Response(status=204)

    def _record(self, method: str, outcome: str) -> None:
        self.log.append((method, outcome))
        count = len(self.log)
        for waiter in [w for w in self._waiters if w.count <= count]:
            self._waiters.remove(waiter)
            if not waiter.future.done():
                waiter.future.set_result(None)

    # -- helpers ------------------------------------------------------------------------------

    def _now(self) -> datetime:
        return datetime.fromtimestamp(math.floor(self.clock.time()), UTC)

    def _key(self, leaf_or_cert: Leaf | x509.Certificate) -> tuple[bytes, int]:
        cert = leaf_or_cert.cert if isinstance(leaf_or_cert, Leaf) else leaf_or_cert
        return cert.issuer.public_bytes(), cert.serial_number

    def _lookup(self, ca: CA, serial: int) -> _Status:
        entry = self._table.get((ca.cert.subject.public_bytes(), serial))
        if entry is not None:
            return entry
        return _Status("good") if serial in ca.issued else _Status("unknown")

    def _ca_named(self, name: x509.Name) -> CA:
        for ca in self.pki.cas:
            if ca.cert.subject == name:
                return ca
        raise ValueError(f"no CA of {self.pki!r} is named {name.rfc4514_string()}; pass issuer=")

    def _ca_for(self, cert_id: _CertId) -> CA | None:
        for ca in self.pki.cas:
            name_hash, key_hash = _issuer_hashes(ca.cert, cert_id.algorithm)
            if (name_hash, key_hash) == (cert_id.name_hash, cert_id.key_hash):
                return ca
        return None


_UNSUCCESSFUL = {
    Fault.TRY_LATER: x509_ocsp.OCSPResponseStatus.TRY_LATER,
    Fault.UNAUTHORIZED: x509_ocsp.OCSPResponseStatus.UNAUTHORIZED,
    Fault.MALFORMED_REQUEST: x509_ocsp.OCSPResponseStatus.MALFORMED_REQUEST,
}

_HTTP_ERRORS: dict[Fault, tuple[int, str, tuple[tuple[str, str], ...]]] = {
    Fault.HTTP_404: (404, "Not Found", ()),
    Fault.HTTP_500: (500, "Internal Server Error", ()),
    Fault.HTTP_503: (503, "Service Unavailable", (("Retry-After", "120"),)),
}

_REDIRECTS: dict[Fault, tuple[int, str | None]] = {
    Fault.REDIRECT_LOOP: (307, None),  # None: back to the request's own path
    Fault.REDIRECT_FILE: (302, REDIRECT_FILE_URL),
    Fault.REDIRECT_FTP: (302, REDIRECT_FTP_URL),
}

_CERT_STATUS = {
    "good": x509_ocsp.OCSPCertStatus.GOOD,
    "revoked": x509_ocsp.OCSPCertStatus.REVOKED,
    "unknown": x509_ocsp.OCSPCertStatus.UNKNOWN,
}


@functools.cache
def _gzip_bomb() -> bytes:
    """GZIP_BOMB_BYTES of zeros, gzipped (about 100 KiB), built once without holding them."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    parts = [compressor.compress(block) for _ in range(GZIP_BOMB_BYTES // len(block))]
    parts.append(compressor.flush())
    return b"".join(parts)


def _request_key(request: _Request) -> tuple[tuple[str, bytes, bytes, int], ...]:
    """The CertIDs of a request, hashable: what REPLAY remembers first responses by."""
    return tuple((c.algorithm.name, c.name_hash, c.key_hash, c.serial) for c in request.cert_ids)


def _unsuccessful(status: x509_ocsp.OCSPResponseStatus, outcome: str) -> _Answer:
    der = x509_ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER
    )
    return _Answer(der, outcome)


def _decode_get_path(path: str) -> bytes | None:
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
            _parse_request(der)
        except (binascii.Error, ValueError, IndexError, KeyError):
            continue
        return der
    return None


# -- a little DER, enough to read requests and to edit responses -------------------------------
#
# cryptography parses only single-CertID requests and builds only single-response, real-time
# responses; these helpers cover the rest, with staple.der's elements (offsets into the bytes).

_OID_OCSP_BASIC = bytes.fromhex("06092b0601050507300101")
_OID_OCSP_NONCE = bytes.fromhex("2b0601050507300102")
_HASH_OIDS: dict[bytes, type[hashes.HashAlgorithm]] = {
    bytes.fromhex("2b0e03021a"): hashes.SHA1,
    bytes.fromhex("608648016503040204"): hashes.SHA224,
    bytes.fromhex("608648016503040201"): hashes.SHA256,
    bytes.fromhex("608648016503040202"): hashes.SHA384,
    bytes.fromhex("608648016503040203"): hashes.SHA512,
}


def _parse_request(der: bytes) -> _Request:
    """OCSPRequest (RFC 6960 §4.1.1) → its CertIDs and nonce. Raises ValueError/IndexError."""
    tbs = children(der, read_whole(der, SEQUENCE))[0]
    if tbs.tag != SEQUENCE:
        raise ValueError("no TBSRequest")
    items = children(der, tbs)
    request_list = next((n for n in items if n.tag == SEQUENCE), None)
    if request_list is None:
        raise ValueError("no requestList")
    cert_ids: list[_CertId] = []
    for req in children(der, request_list):
        cert_id = children(der, req)[0]
        algorithm, name_hash, key_hash, serial = children(der, cert_id)[:4]
        oid = children(der, algorithm)[0]
        cert_ids.append(
            _CertId(
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
    return _Request(tuple(cert_ids), nonce)


def _octet_string_contents(value: bytes) -> bytes:
    """The contents of a DER OCTET STRING (how RFC 8954 wraps a nonce), else ``value`` itself."""
    try:
        inner = read_element(value)
    except ValueError:
        return value
    if inner.tag == OCTET_STRING and inner.end == len(value):
        return value[inner.body :]
    return value


def _issuer_hashes(
    issuer: x509.Certificate, algorithm: hashes.HashAlgorithm
) -> tuple[bytes, bytes]:
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


def _single_responses(tbs: bytes) -> list[bytes]:
    """The SingleResponse elements of a ResponseData, as DER."""
    items = children(tbs, read_whole(tbs, SEQUENCE))
    produced = next(i for i, n in enumerate(items) if n.tag == GENERALIZED_TIME)
    return [tbs[n.start : n.end] for n in children(tbs, items[produced + 1])]


def _reassemble(
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
