"""Many certificates, one pyOpenSSL OCSP server callback.

A :class:`Stapler` owns a handle per certificate chain (sharing one HTTP session and store) and
installs a callback on pyOpenSSL contexts. Inside the handshake the callback finds the handle
for the certificate OpenSSL actually selected (``conn.get_certificate()``: with RSA and ECDSA
certificates on one context, only it knows), takes a reference to the current context, ties
its release to the connection's end, and returns the DER. It never awaits, never does I/O, and
never raises - except, deliberately, to refuse a handshake under a strict must-staple policy
(:class:`StapleRefused`: counted in ``refused``, logged at most once a minute per certificate).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from .chain import ChainInput, load_chain
from .clock import Clock
from .errors import ClosedError, StapleRefused
from .handle import OnUpdate, ResponderUrls, ServerOcspResponse, open_server_ocsp_response
from .policy import RefreshPolicy
from .proxy import ProxyOption, ProxySettings
from .stats import FetchStats
from .store import MemoryStore, Store
from .tls import call_when_closed, count_handshakes, note_status_request

__all__ = ["MustStaple", "StapleRefused", "Stapler"]

log = logging.getLogger("staple")

_LOG_EVERY = 60.0  # seconds between repeated callback-problem log lines


class MustStaple(enum.Enum):
    """What to do with a handshake that asks for a staple when no valid response is held
    (like Envoy's ``ocsp_staple_policy``). Clients that don't ask are never refused."""

    LENIENT = "lenient"
    """Complete the handshake without a staple (the default)."""
    STRICT = "strict"
    """Refuse the handshake, for every certificate."""
    MUST_STAPLE = "must_staple"
    """Refuse it only for certificates with the TLS Feature status_request (RFC 7633): their
    clients would reject an unstapled handshake anyway, so fail fast and visibly."""


class Stapler:
    """Keeps OCSP responses for many certificate chains and staples them into handshakes.

    ``policy_options`` are :class:`RefreshPolicy` fields (``margin=...``) for convenience.
    At most ``max_concurrent_fetches`` requests are in flight at once, across all handles;
    ``proxy`` is their HTTP proxy: a URL, ``False`` for none, or ``None`` (the default) for the
    environment's ``http_proxy``/``https_proxy``/``no_proxy`` (:mod:`staple.proxy`).
    Close it with :meth:`close` or ``async with``; after that :meth:`add` raises
    :class:`~staple.ClosedError`.
    """

    def __init__(
        self,
        *,
        store: Store | None = None,
        on_update: OnUpdate | None = None,
        session: aiohttp.ClientSession | None = None,
        clock: Clock | None = None,
        policy: RefreshPolicy | None = None,
        must_staple: MustStaple | str = MustStaple.LENIENT,
        max_concurrent_fetches: int = 16,
        proxy: ProxyOption = None,
        **policy_options: Any,
    ) -> None:
        if policy is not None and policy_options:
            raise TypeError("pass either policy= or policy options, not both")
        self.proxies = ProxySettings.resolve(proxy)
        """Which HTTP proxy each responder URL is fetched through (resolved once, here)."""
        self.stats = FetchStats()
        """What the handles' refreshers did (fetches, store errors, fleet lock), for metrics."""
        self.policy = policy or RefreshPolicy(**policy_options)
        self.store = store if store is not None else MemoryStore()
        self.must_staple = MustStaple(must_staple)
        self._on_update = on_update
        self._clock = clock
        self._session = session
        self._owns_session = session is None
        if max_concurrent_fetches < 1:
            raise ValueError("max_concurrent_fetches must be at least 1")
        self._fetch_slots = asyncio.Semaphore(max_concurrent_fetches)
        # Opens in progress at once. 10,000 add()s gathered at start-up would otherwise all
        # parse, open and wait in lockstep: their short-lived objects, interleaved with the
        # handles' long-lived ones, leave the allocator's pools fragmented (3x the memory the
        # handles need). Waiting here costs a coroutine frame.
        self._open_slots = asyncio.Semaphore(max_concurrent_fetches)
        self.handles: list[ServerOcspResponse] = []
        self._by_serial: dict[int, list[ServerOcspResponse]] = {}
        # One certificate object per distinct issuer: thousands of chains from files would
        # otherwise each parse and keep their own copy of the same intermediate.
        self._issuers: dict[bytes, x509.Certificate] = {}
        self._closed = False
        self._close_done: asyncio.Future[None] | None = None  # done once close() has finished
        self._opening: set[asyncio.Task[ServerOcspResponse]] = set()  # add()s in progress
        # Counters for operators and tests.
        self.stapled = 0
        self.unstapled = 0
        self.refused = 0
        self.not_requested = 0
        """Handshakes completed by staple's transports whose client did not ask for a staple
        (OpenSSL never shows those to the OCSP callback; other TLS stacks are not counted)."""
        self.callback_errors = 0
        # Log throttling reads the injected clock (tests), else the monotonic one.
        self._time: Callable[[], float] = clock.time if clock is not None else time.monotonic
        self._last_log = -_LOG_EVERY
        self._refusal_logged: dict[ServerOcspResponse, float] = {}

    async def add(
        self,
        chain: ChainInput,
        *,
        responder_urls: ResponderUrls | None = None,
        wait: bool = True,
    ) -> ServerOcspResponse:
        """Open a handle for ``chain`` (see :func:`staple.open_server_ocsp_response`).

        Raises :class:`~staple.ClosedError` if the Stapler is closed, or closes while this
        waits: then no handle is left open. Other errors as ``open_server_ocsp_response``.
        """
        self._check_open()
        async with self._open_slots:
            self._check_open()
            # A task of its own, so that close() can cancel this open and wait for it. At most
            # max_concurrent_fetches exist at once (we hold an open slot).
            task = asyncio.create_task(
                self._add(chain, responder_urls=responder_urls, wait=wait),
                name="staple Stapler.add",
            )
            self._opening.add(task)
            try:
                return await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if task.cancelled() and self._closed and not (current and current.cancelling()):
                    raise self._closed_error() from None  # close() cancelled the open, not us
                raise
            finally:
                self._opening.discard(task)

    def _check_open(self) -> None:
        if self._closed:
            raise self._closed_error()

    @staticmethod
    def _closed_error() -> ClosedError:
        return ClosedError("the Stapler is closed: it accepts no more certificates")

    async def _add(
        self, chain: ChainInput, *, responder_urls: ResponderUrls | None, wait: bool
    ) -> ServerOcspResponse:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        certs = load_chain(chain)
        certs[1:] = [
            self._issuers.setdefault(cert.public_bytes(serialization.Encoding.DER), cert)
            for cert in certs[1:]
        ]
        handle = await open_server_ocsp_response(
            certs,
            wait=wait,
            store=self.store,
            on_update=self._on_update,
            responder_urls=responder_urls,
            session=self._session,
            clock=self._clock,
            policy=self.policy,
            fetch_slots=self._fetch_slots,
            proxy=self.proxies,
            stats=self.stats,
        )
        if self._closed:  # close() began as the open finished: it must not outlive us
            await handle.close()
            raise self._closed_error()
        self.handles.append(handle)
        self._by_serial.setdefault(handle.cert.serial_number, []).append(handle)
        return handle

    def install(self, ssl_context: SSL.Context) -> None:
        """Set the OCSP server callback on a pyOpenSSL context (before any connection is made
        from it: OpenSSL contexts are frozen after that). Install it on every context the
        servername callback may switch to."""
        if not isinstance(ssl_context, SSL.Context):
            raise TypeError(
                f"install() needs an OpenSSL.SSL.Context, not {type(ssl_context).__name__}; "
                "the stdlib ssl module cannot staple"
            )
        ssl_context.set_ocsp_server_callback(self._callback)
        count_handshakes(ssl_context, self._handshake_completed)

    def handle_for(self, serial_number: int) -> ServerOcspResponse | None:
        found = self._by_serial.get(serial_number)
        return found[0] if found else None

    @property
    def live_references(self) -> int:
        return sum(h.live_references for h in self.handles)

    async def close(self) -> None:
        """Cancel the :meth:`add` calls in progress (they raise :class:`~staple.ClosedError`),
        close every handle and the shared HTTP session. Idempotent; concurrent callers all
        return once it is closed. Contexts already handed out stay valid until freed."""
        if self._close_done is not None:
            await asyncio.shield(self._close_done)
            return
        self._close_done = asyncio.get_running_loop().create_future()
        self._closed = True
        try:
            opening = list(self._opening)
            for task in opening:
                task.cancel()
            if opening:
                await asyncio.wait(opening)
            await asyncio.gather(*(h.close() for h in self.handles))
            if self._owns_session and self._session is not None:
                await self._session.close()
        finally:
            self._close_done.set_result(None)

    async def __aenter__(self) -> Stapler:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- the handshake path ----------------------------------------------------------------

    def _callback(self, conn: SSL.Connection, data: object) -> bytes:
        try:
            note_status_request(conn)  # for staple_handshakes_total{outcome="not_requested"}
            cert = conn.get_certificate()
            if cert is None:
                return self._problem("the connection has no certificate selected")
            found = self._by_serial.get(cert.get_serial_number())
            if found is None:
                return self._problem(
                    f"no handle for the served certificate (serial {cert.get_serial_number():#x})"
                )
            handle = found[0] if len(found) == 1 else self._pick(found, cert)
            ctx = handle.get_context()
            if ctx is None:
                self.unstapled += 1
                if self.must_staple is MustStaple.STRICT or (
                    self.must_staple is MustStaple.MUST_STAPLE and handle.must_staple
                ):
                    raise self._refuse(handle)
                return b""
            if not call_when_closed(conn, ctx.free):  # our transport: freed on close
                weakref.finalize(conn, ctx.free)
            self.stapled += 1
            return ctx.encoded
        except StapleRefused:
            raise
        except Exception as exc:  # a bug must cost a staple, never the handshake
            return self._problem(f"{type(exc).__name__}: {exc}")

    def _refuse(self, handle: ServerOcspResponse) -> StapleRefused:
        """Count a refused handshake and log it, at most once a minute per certificate: a
        refusal is the configured policy at work, not an error (the TLS layer closes the
        connection without reporting it)."""
        self.refused += 1
        error = handle.last_error
        refusal = StapleRefused(
            f"handshake refused: no valid OCSP response to staple "
            f"({error.reason if error is not None else 'none held'})",
            subject=handle.subject,
        )
        now = self._time()
        if now - self._refusal_logged.get(handle, -_LOG_EVERY) >= _LOG_EVERY:
            self._refusal_logged[handle] = now
            log.warning(
                "%s (must_staple=%s; %d handshakes refused so far)",
                refusal,
                self.must_staple.value,
                self.refused,
            )
        return refusal

    def _handshake_completed(self, asked: bool) -> None:
        if not asked:
            self.not_requested += 1

    @staticmethod
    def _pick(found: Sequence[ServerOcspResponse], cert: Any) -> ServerOcspResponse:
        # Serials are unique per CA only; tell same-serial certificates apart by issuer.
        issuer = cert.to_cryptography().issuer
        for handle in found:
            if handle.cert.issuer == issuer:
                return handle
        return found[0]

    def _problem(self, what: str) -> bytes:
        self.callback_errors += 1
        now = self._time()
        if now - self._last_log >= _LOG_EVERY:
            self._last_log = now
            log.warning(
                "OCSP callback served no staple: %s (%d such problems so far)",
                what,
                self.callback_errors,
            )
        return b""
