"""What happens to a handle, as events: passed to ``on_update`` and logged on ``staple``.

Events are frozen, slotted, keyword-only dataclasses (as h11's are). :func:`emit` is the one
place an event leaves a handle: it logs the event at its kind's level, then calls the user's
callback, whose failures are logged and never reach the refresher.
"""

from __future__ import annotations

import enum
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from . import ocsp
from .errors import OcspError

if TYPE_CHECKING:
    from .handle import ServerOcspResponse

__all__ = ["Event", "EventKind", "OnUpdate", "emit"]

log = logging.getLogger("staple")


class EventKind(enum.Enum):
    LOADED = "loaded"
    """A response from the store passed validation and is being stapled."""
    FETCHED = "fetched"
    """A fresh good response from the responder is being stapled."""
    REVOKED = "revoked"
    """The responder says the certificate is revoked (stapled unless the policy withholds)."""
    UNKNOWN = "unknown"
    """The responder does not know the certificate; nothing new is stapled."""
    FAILED = "failed"
    """A refresh failed (network, HTTP, invalid or older response); the last good one stays."""
    REJECTED = "rejected"
    """What the store held failed validation (corrupt, foreign, expired) and was ignored."""
    EXPIRED = "expired"
    """The held response reached its margin: nothing is stapled until a refresh succeeds."""
    CLOSED = "closed"


_LOG_LEVELS = {
    EventKind.LOADED: logging.INFO,
    EventKind.FETCHED: logging.INFO,
    EventKind.REVOKED: logging.ERROR,
    EventKind.UNKNOWN: logging.WARNING,
    EventKind.FAILED: logging.WARNING,
    EventKind.REJECTED: logging.WARNING,
    EventKind.EXPIRED: logging.ERROR,
    EventKind.CLOSED: logging.DEBUG,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """What happened to a handle; passed to ``on_update`` and logged on ``staple``."""

    kind: EventKind
    handle: ServerOcspResponse
    subject: str
    response: ocsp.VerifiedResponse | None = None
    error: OcspError | None = None
    source: str | None = None
    next_refresh: datetime | None = None

    @classmethod
    def about(
        cls,
        handle: ServerOcspResponse,
        kind: EventKind,
        *,
        response: ocsp.VerifiedResponse | None = None,
        error: OcspError | None = None,
        source: str | None = None,
    ) -> Event:
        """An event about ``handle`` now; those that follow an attempt name its next one."""
        scheduled = kind not in (EventKind.REJECTED, EventKind.CLOSED)
        return cls(
            kind=kind,
            handle=handle,
            subject=handle.subject,
            response=response,
            error=error,
            source=source,
            next_refresh=handle.next_refresh if scheduled else None,
        )

    @classmethod
    def installed(
        cls,
        handle: ServerOcspResponse,
        response: ocsp.VerifiedResponse,
        *,
        source: str,
        loaded: bool,
    ) -> Event:
        """A response was adopted: REVOKED if it says so, else LOADED (from a store) or
        FETCHED (from the responder)."""
        kind = EventKind.LOADED if loaded else EventKind.FETCHED
        if response.cert_status is ocsp.CertStatus.REVOKED:
            kind = EventKind.REVOKED
        return cls.about(handle, kind, response=response, source=source)

    def __str__(self) -> str:
        parts = [f"{self.kind.value}: {self.subject}"]
        if self.response is not None:
            r = self.response
            parts.append(
                f"status {r.cert_status.name.lower()}, thisUpdate {r.this_update.isoformat()}, "
                f"nextUpdate {r.next_update.isoformat()}"
            )
        if self.source:
            parts.append(f"from {self.source}")
        if self.error is not None:
            parts.append(f"reason: {self.error.reason}")
        if self.next_refresh is not None:
            parts.append(f"next attempt {self.next_refresh.isoformat()}")
        return "; ".join(parts)


OnUpdate = Callable[[Event], Awaitable[None] | None]


async def emit(event: Event, on_update: OnUpdate | None) -> None:
    """Log ``event`` at its kind's level, then pass it to ``on_update`` (sync or async).

    Never raises (other than cancellation): a callback that raises is logged with its
    traceback, since a user's bug must not stop the refresher.
    """
    log.log(_LOG_LEVELS[event.kind], "%s", event)
    if on_update is None:
        return
    try:
        result = on_update(event)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("%s: on_update callback raised for %s", event.subject, event.kind.value)
