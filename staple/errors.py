"""One exception tree for everything staple refuses.

Like h11's split between local misuse and remote misbehaviour, every error a caller can see is
an :class:`OcspError`. Validation failures (a response that must not be stapled) carry the
certificate they concern, so a log line or an event says *which* certificate and *why*.
"""

from __future__ import annotations

__all__ = [
    "BadResponseError",
    "CertIdMismatchError",
    "CertificateRevokedError",
    "ChainError",
    "ClosedError",
    "ExpiredResponseError",
    "FetchError",
    "IssuerMismatchError",
    "NoResponderError",
    "NotYetValidError",
    "OcspError",
    "ResponderStatusError",
    "ResponseUnavailableError",
    "RevocationReversedError",
    "RollbackError",
    "SignatureError",
    "StapleRefused",
    "UnauthorizedSignerError",
    "UnknownStatusError",
    "ValidationError",
]


class OcspError(Exception):
    """Base of every error staple raises about OCSP data, responders or certificates.

    ``subject`` names the certificate concerned (serial and subject) when one is known.
    """

    def __init__(self, reason: str, *, subject: str | None = None) -> None:
        self.reason = reason
        self.subject = subject
        super().__init__(f"{subject}: {reason}" if subject else reason)


class ChainError(OcspError):
    """The certificate chain given to staple is unusable (unparseable, issuer missing or wrong)."""


class NoResponderError(OcspError):
    """The certificate names no OCSP responder and no override URL was given."""


class FetchError(OcspError):
    """Talking to the responder failed: network, timeout, HTTP status, content type, size."""


class ValidationError(OcspError):
    """A response (from the network, the disk or a shared store) must not be stapled."""


class BadResponseError(ValidationError):
    """Not a parseable OCSP response, or not a basic response."""


class ResponderStatusError(ValidationError):
    """responseStatus is not ``successful`` (malformedRequest, tryLater, unauthorized, ...)."""

    def __init__(self, reason: str, *, status: str, subject: str | None = None) -> None:
        self.status = status
        super().__init__(reason, subject=subject)


class IssuerMismatchError(ValidationError, ChainError):
    """The given issuer did not issue the certificate (wrong name or its key does not verify)."""


class CertIdMismatchError(ValidationError):
    """No SingleResponse in the response is about our certificate."""


class SignatureError(ValidationError):
    """The response's signature does not verify with the signer's key."""


class UnauthorizedSignerError(ValidationError):
    """The signer is neither the issuer nor a delegated responder the issuer authorised."""


class NotYetValidError(ValidationError):
    """thisUpdate lies in the future beyond the allowed clock skew."""


class ExpiredResponseError(ValidationError):
    """nextUpdate is missing, or passed, or closer than the stapling margin."""


class RollbackError(ValidationError):
    """The response is older than the one already held (a replay or a stale cache)."""


class RevocationReversedError(ValidationError):
    """A ``good`` response after a ``revoked`` one held for the same certificate: revocation is
    permanent (RFC 5280 §3.3), unless the reason was certificateHold."""


class UnknownStatusError(ValidationError):
    """The responder does not know the certificate: such a response is never stapled."""


class ResponseUnavailableError(OcspError):
    """No time-valid response is held yet (first fetch pending or failing)."""


class CertificateRevokedError(OcspError):
    """The certificate is revoked and the policy withholds revoked responses."""


class ClosedError(OcspError):
    """The handle or :class:`~staple.Stapler` was closed; it hands out no more contexts and
    accepts no more certificates."""


class StapleRefused(OcspError):
    """Raised inside the OCSP server callback to abort a handshake that asked for a staple when
    none is held, under a strict must-staple policy (:class:`~staple.MustStaple`). pyOpenSSL
    turns it into an internal_error alert; staple's TLS transport closes that connection
    quietly (the :class:`~staple.Stapler` counts and logs refusals)."""
