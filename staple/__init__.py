"""staple: OCSP stapling for Python TLS servers.

A handle per certificate chain keeps a verified, current OCSP response (refreshed by an asyncio
task, persisted in a store); a non-blocking getter hands it to the TLS handshake.
"""

from typing import TYPE_CHECKING

from . import aiohttp as aiohttp  # staple.aiohttp.StaplingSite
from . import ocsp as ocsp
from . import server_context as server_context  # build_server_context
from . import tls as tls  # staple.tls.create_server, start_server
from .clock import Clock, SystemClock
from .errors import (
    BadResponseError,
    CertIdMismatchError,
    CertificateRevokedError,
    ChainError,
    ClosedError,
    ExpiredResponseError,
    FetchError,
    IssuerMismatchError,
    NoResponderError,
    NotYetValidError,
    OcspError,
    ResponderStatusError,
    ResponseUnavailableError,
    RevocationReversedError,
    RollbackError,
    SignatureError,
    StapleRefused,
    UnauthorizedSignerError,
    UnknownStatusError,
    ValidationError,
)
from .events import Event, EventKind
from .handle import HandleState, ServerOcspResponse, open_server_ocsp_response
from .ocsp import CertId, CertStatus, VerifiedResponse
from .policy import RefreshPolicy
from .response_context import OcspResponseContext
from .server_context import TLSProfile
from .stapler import MustStaple, Stapler
from .store import FileStore, MemoryStore, Store

if TYPE_CHECKING:
    from .redis_store import RedisStore

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # RedisStore imports redis.asyncio (~130 ms): loaded on first use, not with staple.
    if name == "RedisStore":
        from .redis_store import RedisStore

        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BadResponseError",
    "CertId",
    "CertIdMismatchError",
    "CertStatus",
    "CertificateRevokedError",
    "ChainError",
    "Clock",
    "ClosedError",
    "Event",
    "EventKind",
    "ExpiredResponseError",
    "FetchError",
    "FileStore",
    "HandleState",
    "IssuerMismatchError",
    "MemoryStore",
    "MustStaple",
    "NoResponderError",
    "NotYetValidError",
    "OcspError",
    "OcspResponseContext",
    "RedisStore",
    "RefreshPolicy",
    "ResponderStatusError",
    "ResponseUnavailableError",
    "RevocationReversedError",
    "RollbackError",
    "ServerOcspResponse",
    "SignatureError",
    "StapleRefused",
    "Stapler",
    "Store",
    "SystemClock",
    "TLSProfile",
    "UnauthorizedSignerError",
    "UnknownStatusError",
    "ValidationError",
    "VerifiedResponse",
    "open_server_ocsp_response",
]
