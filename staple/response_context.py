"""Reference-counted response contexts: what a handshake staples, alive until it is freed.

Like Windows' ``CERT_SERVER_OCSP_RESPONSE_CONTEXT``: a context is immutable, a refresh never
changes it but swaps a new one in, and the old one stays usable by every connection that still
holds a reference. The counts exist so leaks are testable: the handle reports how many
contexts and references are alive, and a connection that forgets to ``free()`` shows up there.

A :class:`ContextHolder` (the base class of a handle) holds the current context and every
replaced one still referenced. It is the only code that touches a context's counts besides the
context itself: the handle installs and retires through it and never reads a context's privates.

Counting is for one event loop thread (like everything in asyncio); the OCSP callback runs on
that thread inside the handshake.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from types import TracebackType

from cryptography import x509

from .ocsp import CertStatus, VerifiedResponse
from .trim import stapled_der

__all__ = ["ContextHolder", "OcspResponseContext"]


class OcspResponseContext:
    """One verified OCSP response, as stapled. Obtained from ``handle.get_context()``.

    Every ``get_context()`` and every :meth:`add_ref` must be matched by one :meth:`free`;
    ``with handle.get_context() as ctx:`` frees on exit.
    """

    __slots__ = ("__weakref__", "_current", "_owner", "_refs", "_response", "_stop_at", "encoded")

    encoded: bytes
    """The DER bytes to staple: the response without the certificates the client does not need
    (:func:`staple.trim.stapled_der`)."""

    def __init__(self, response: VerifiedResponse, owner: ContextHolder, stop_at: float) -> None:
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
    def stop_at(self) -> float:
        """When (epoch seconds) its handle stops handing it out (``policy.stop_stapling_at``)."""
        return self._stop_at

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
            self._owner._live.discard(self)

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


class ContextHolder:
    """The contexts of one handle: the current one, and replaced ones still referenced.

    :class:`~staple.ServerOcspResponse` is a holder. A context is alive while it is current
    or while a reference to it is held; once neither holds, it leaves the holder (its last
    :meth:`~OcspResponseContext.free` removes it). The handle swaps contexts with
    :meth:`_install_context` and :meth:`_retire_context`, and the TLS handshake takes
    references with :meth:`get_context`: a base class rather than a member, so that the
    getter stays one call (no delegation layer on the handshake path) while only this module
    touches a context's counts. Single-threaded like the event loop, except that ``free()``
    may run on another thread (the counts are then read as a snapshot).
    """

    __slots__ = ("_current", "_live", "_time")

    def __init__(self, time: Callable[[], float]) -> None:
        self._time = time  # the clock's bound time(), read once per get_context()
        self._current: OcspResponseContext | None = None
        self._live: set[OcspResponseContext] = set()

    def get_context(self) -> OcspResponseContext | None:
        """A new reference to the current time-valid context, or ``None`` (see the handle's
        ``last_error``). Synchronous and I/O-free; call ``free()`` on what it returns. A
        context past its stop moment is handed to :meth:`_stale` (retired) and not returned."""
        ctx = self._current
        if ctx is not None and self._time() < ctx._stop_at:
            ctx._refs += 1
            return ctx
        if ctx is not None:
            self._stale(ctx)
        return None

    def _stale(self, ctx: OcspResponseContext) -> None:
        """``get_context()`` met the current context past its stop moment before the
        refresher did. Retires it; a handle overrides this to also say why."""
        self._retire_context()

    def _install_context(self, response: VerifiedResponse, *, stop_at: float) -> None:
        """Make a context for ``response``, handed out until ``stop_at`` (epoch seconds), the
        current one; the previous one is retired."""
        self._retire_context()
        new = OcspResponseContext(response, self, stop_at)
        self._live.add(new)
        self._current = new

    def _retire_context(self) -> None:
        """Stop handing out the current context; it stays valid for those holding references
        and leaves the holder when the last one frees it. Idempotent."""
        ctx, self._current = self._current, None
        if ctx is not None:
            ctx._current = False
            if ctx._refs == 0:
                self._live.discard(ctx)

    @property
    def live_contexts(self) -> int:
        """Contexts alive: the current one plus replaced ones still referenced."""
        return len(self._live)

    @property
    def live_references(self) -> int:
        """References handed out and not yet freed, over all contexts."""
        # list(): a snapshot taken under the GIL, since free() may run on another thread
        # (weakref.finalize in a threaded TLS server) and shrink the set meanwhile.
        return sum(ctx._refs for ctx in list(self._live))
