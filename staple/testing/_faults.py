"""The fault switches of :class:`~staple.testing.OcspResponder`: what each one does, and the
fixed answers, redirects and bodies the responder sends for them."""

from __future__ import annotations

import enum
import functools
import zlib

from cryptography.x509 import ocsp as x509_ocsp

__all__ = [
    "GZIP_BOMB_BYTES",
    "HTTP_ERRORS",
    "OVERSIZE_BYTES",
    "REDIRECTS",
    "REDIRECT_FILE_URL",
    "REDIRECT_FTP_URL",
    "UNSUCCESSFUL",
    "Fault",
    "gzip_bomb",
]

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


# What the responder answers for some faults.

UNSUCCESSFUL = {
    Fault.TRY_LATER: x509_ocsp.OCSPResponseStatus.TRY_LATER,
    Fault.UNAUTHORIZED: x509_ocsp.OCSPResponseStatus.UNAUTHORIZED,
    Fault.MALFORMED_REQUEST: x509_ocsp.OCSPResponseStatus.MALFORMED_REQUEST,
}

HTTP_ERRORS: dict[Fault, tuple[int, str, tuple[tuple[str, str], ...]]] = {
    Fault.HTTP_404: (404, "Not Found", ()),
    Fault.HTTP_500: (500, "Internal Server Error", ()),
    Fault.HTTP_503: (503, "Service Unavailable", (("Retry-After", "120"),)),
}

REDIRECTS: dict[Fault, tuple[int, str | None]] = {
    Fault.REDIRECT_LOOP: (307, None),  # None: back to the request's own path
    Fault.REDIRECT_FILE: (302, REDIRECT_FILE_URL),
    Fault.REDIRECT_FTP: (302, REDIRECT_FTP_URL),
}


@functools.cache
def gzip_bomb() -> bytes:
    """GZIP_BOMB_BYTES of zeros, gzipped (about 100 KiB), built once without holding them."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    parts = [compressor.compress(block) for _ in range(GZIP_BOMB_BYTES // len(block))]
    parts.append(compressor.flush())
    return b"".join(parts)
