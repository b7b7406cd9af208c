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

Beside this module: ``_faults`` (the :class:`Fault` switches and their fixed answers) and
``_messages`` (requests parsed and responses re-signed at the byte level).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import struct
import urllib.parse
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Literal, TypeAlias

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp as x509_ocsp

from staple.clock import Clock, SystemClock

from ._faults import (
    GZIP_BOMB_BYTES,
    HTTP_ERRORS,
    OVERSIZE_BYTES,
    REDIRECT_FILE_URL,
    REDIRECT_FTP_URL,
    REDIRECTS,
    UNSUCCESSFUL,
    Fault,
    gzip_bomb,
)
from ._messages import (
    CertId,
    Request,
    decode_get_path,
    issuer_hashes,
    parse_request,
    reassemble,
    single_responses,
)
from ._pki import CA, Leaf, PrivateKey, TestPKI, signature_hash

__all__ = [
    # The fault constants stay importable from here, where they were defined at first.
    "GZIP_BOMB_BYTES",
    "OVERSIZE_BYTES",
    "REDIRECT_FILE_URL",
    "REDIRECT_FTP_URL",
    "CertStatusName",
    "Fault",
    "OcspResponder",
]

CertStatusName: TypeAlias = Literal["good", "revoked", "unknown"]
"""A certificate status in the responder's table."""

OCSP_REQUEST_TYPE = "application/ocsp-request"
OCSP_RESPONSE_TYPE = "application/ocsp-response"
PKIX_CERT_TYPE = "application/pkix-cert"


@dataclass(frozen=True, slots=True)
class _Status:
    status: CertStatusName
    revocation_time: datetime | None = None
    reason: x509.ReasonFlags | None = None


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
        if fault in UNSUCCESSFUL:
            assert fault is not None
            return _unsuccessful(UNSUCCESSFUL[fault], fault.value)
        if fault is Fault.GARBAGE:
            return _Answer(b"\x00staple.testing garbage\xff" + os.urandom(64), fault.value)
        if fault in HTTP_ERRORS:
            assert fault is not None
            status, text, headers = HTTP_ERRORS[fault]
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
            request = parse_request(request_der) if request_der is not None else None
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

    def _successful(self, request: Request, fault: Fault | None) -> _Answer:
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
            singles.append(single_responses(response.tbs_response_bytes)[0])
            statuses.append(entry.status)

        assert template is not None
        der = reassemble(template, singles, now, key)
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
        if fault in REDIRECTS:
            assert fault is not None
            self._record(method, fault.value)
            status, location = REDIRECTS[fault]
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
            request_der = decode_get_path(path)

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
        bomb = gzip_bomb()
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

    def _ca_for(self, cert_id: CertId) -> CA | None:
        for ca in self.pki.cas:
            name_hash, key_hash = issuer_hashes(ca.cert, cert_id.algorithm)
            if (name_hash, key_hash) == (cert_id.name_hash, cert_id.key_hash):
                return ca
        return None


_CERT_STATUS = {
    "good": x509_ocsp.OCSPCertStatus.GOOD,
    "revoked": x509_ocsp.OCSPCertStatus.REVOKED,
    "unknown": x509_ocsp.OCSPCertStatus.UNKNOWN,
}


def _request_key(request: Request) -> tuple[tuple[str, bytes, bytes, int], ...]:
    """The CertIDs of a request, hashable: what REPLAY remembers first responses by."""
    return tuple((c.algorithm.name, c.name_hash, c.key_hash, c.serial) for c in request.cert_ids)


def _unsuccessful(status: x509_ocsp.OCSPResponseStatus, outcome: str) -> _Answer:
    der = x509_ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER
    )
    return _Answer(der, outcome)
