"""Reference-counted response contexts: what a handshake staples, alive until it is freed.

Like Windows' ``CERT_SERVER_OCSP_RESPONSE_CONTEXT``: a context is immutable, a refresh never
changes it but swaps a new one in, and the old one stays usable by every connection that still
holds a reference. The counts exist so leaks are testable: the handle reports how many
contexts and references are alive, and a connection that forgets to ``free()`` shows up there.

Counting is for one event loop thread (like everything in asyncio); the OCSP callback runs on
that thread inside the handshake.
"""

from __future__ import annotations

from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING

from cryptography import x509

from .ocsp import CertStatus, VerifiedResponse
from .trim import stapled_der

if TYPE_CHECKING:
    from .handle import ServerOcspResponse

__all__ = ["OcspResponseContext"]


class OcspResponseContext:
    """One verified OCSP response, as stapled. Obtained from ``handle.get_context()``.

    Every ``get_context()`` and every :meth:`add_ref` must be matched by one :meth:`free`;
    ``with handle.get_context() as ctx:`` frees on exit.
    """

    __slots__ = ("__weakref__", "_current", "_owner", "_refs", "_response", "_stop_at", "encoded")

    encoded: bytes
    """The DER bytes to staple: the response without the certificates the client does not need
    (:func:`staple.trim.stapled_der`)."""

    def __init__(
        self, response: VerifiedResponse, owner: ServerOcspResponse, stop_at: float
    ) -> None:
        self._response = response
        self.encoded = stapled_der(response)
        self._owner = owner
        self._stop_at = stop_at  # epoch seconds: past it get_context() no longer hands it out
        self._refs = 0
        self._current = True  # held by its handle as the current context

    # What the response says; read-only views of the verified response.
    @property
    def response(self) -> VerifiedResponse:
        return self._response

    @property
    def cert_status(self) -> CertStatus:
        return self._response.cert_status

    @property
    def this_update(self) -> datetime:
        return self._response.this_update

    @property
    def next_update(self) -> datetime:
        return self._response.next_update

    @property
    def produced_at(self) -> datetime:
        return self._response.produced_at

    @property
    def expires(self) -> datetime:
        return self._response.expires

    @property
    def revocation_time(self) -> datetime | None:
        return self._response.revocation_time

    @property
    def signer(self) -> x509.Certificate:
        return self._response.signer

    @property
    def refs(self) -> int:
        """References currently held by users (the handle's own hold is not counted)."""
        return self._refs

    def add_ref(self) -> None:
        """Take one more reference, e.g. for a connection that keeps the context."""
        if self._refs <= 0:
            raise RuntimeError(
                "add_ref() on a context with no live reference: take references from "
                "get_context() or from a context you still hold"
            )
        self._refs += 1

    def free(self) -> None:
        """Give back one reference. Freeing more often than referenced raises RuntimeError."""
        if self._refs <= 0:
            raise RuntimeError("free() called more often than get_context()/add_ref()")
        self._refs -= 1
        if self._refs == 0 and not self._current:
            self._owner._live_contexts.discard(self)

    def __enter__(self) -> OcspResponseContext:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.free()

    def __repr__(self) -> str:
        r = self._response
        return (
            f"<OcspResponseContext {r.cert_status.name.lower()} serial "
            f"{r.cert_id.serial_number:#x} thisUpdate={r.this_update.isoformat()} "
            f"expires={r.expires.isoformat()} refs={self._refs}>"
        )
