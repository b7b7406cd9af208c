"""Stapling on Twisted: TLS options for ``listenSSL``, ``SSL4ServerEndpoint`` and twisted.web,
and the ``staple:`` endpoint string for ``twistd`` and Daphne.

::

    options = staple.twisted.server_options([("chain.pem", "key.pem")])
    options.start().addCallback(lambda _: reactor.listenSSL(8443, site, options))

    twistd -n web --listen staple:8443:certKey=chain.pem:privateKey=key.pem --path .
    daphne -e staple:8443:certKey=chain.pem:privateKey=key.pem project.asgi:application

Theory of operation
-------------------
Twisted's TLS is pyOpenSSL over memory BIOs, one ``SSL.Connection`` per TCP connection, made by
the options object (:meth:`StaplingOptions.serverConnectionForTLS`) from one server context
built by :func:`~staple.server_context.build_server_context`: SNI and RSA+ECDSA certificates
work, and every context has the :class:`~staple.Stapler`'s OCSP callback.

The Stapler's refresher is asyncio. Where it runs depends on the reactor, once per reactor
(:class:`Refresher`):

* **the asyncio reactor** (``twisted.internet.asyncioreactor``, which Daphne installs): on the
  reactor's own asyncio loop. Everything happens on one thread, as in any asyncio server.
* **any other reactor** (epoll, select, kqueue...): on an asyncio loop in a daemon thread the
  refresher owns. The OCSP callback then runs on the reactor thread while the handles refresh
  on the loop thread. That is safe under CPython's GIL because the callback only reads the
  handle's current, immutable context and counts a reference (``get_context()`` reads two
  attributes and does ``+= 1``; ``free()`` does ``-= 1``); no lock is held and nothing
  awaits. ``on_update`` callbacks run on the loop thread: hand work to the reactor with
  ``reactor.callFromThread``.

Either way the Staplers are closed, and the thread stopped, by a ``("before", "shutdown")``
system event trigger: the reactor waits for them before it stops.

Opening. :meth:`StaplingOptions.start` returns a Deferred that fires once every chain has its
first response (or the bounded ``wait_timeout`` has passed): listen after it, and the first
handshake is stapled. The ``staple:`` endpoint's ``listen()`` does that for you. With a
threaded refresher and a reactor not yet running, :func:`server_options` itself waits.

References. Each stapled handshake takes a reference to the response it stapled, released when
the ``SSL.Connection`` is gone: the Stapler ties it to the connection with
``weakref.finalize``, and Twisted's ``TLSMemoryBIOProtocol.connectionLost`` drops its
connection (it breaks the protocol <-> connection cycle on purpose), so the reference is
released as the reactor processes ``connectionLost``, not at some later garbage collection.
Code that keeps ``transport.getHandle()`` beyond ``connectionLost`` keeps the reference too.

Refusals. Under ``must_staple="strict"`` (or ``"must_staple"`` for must-staple certificates) a
handshake that asks for a staple when none is held is refused: it fails as any TLS error does
in Twisted, and the connection is closed.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .chain import load_chain
from .handle import OnUpdate
from .server_context import CertSpec, build_server_context
from .stapler import MustStaple, Stapler, StapleRefused
from .store import FileStore, Store
from .store_choice import default_cache_dir

__all__ = [
    "Refresher",
    "StaplingEndpoint",
    "StaplingOptions",
    "parse_endpoint",
    "refresher_for",
    "server_options",
]

T = TypeVar("T")

log = Logger(namespace="staple")

_OPEN_SLACK = 5.0
"""Seconds allowed beyond the policy's ``wait_timeout`` for a blocking open."""
_JOIN_TIMEOUT = 5.0
"""Seconds to wait for the refresher thread to end once its loop is stopped."""


def _asyncio_loop_of(reactor: Any) -> asyncio.AbstractEventLoop | None:
    """The asyncio loop an asyncio reactor runs on; ``None`` for any other reactor."""
    try:
        from twisted.internet.asyncioreactor import AsyncioSelectorReactor
    except ImportError:  # pragma: no cover - part of every Twisted we support
        return None
    if not isinstance(reactor, AsyncioSelectorReactor):
        return None
    loop: asyncio.AbstractEventLoop = reactor._asyncioEventloop
    return loop


class _Outcome:
    """The outcome of something that happens once (opening chains, closing), for any number of
    Deferreds to wait on. Consumes the source's failure, so none is left unhandled."""

    def __init__(self, source: Deferred[Any] | None) -> None:
        self._result: Failure | bool = source is None  # False while pending
        self._waiters: list[Deferred[None]] = []
        if source is not None:
            source.addBoth(self._settle)

    def _settle(self, result: object) -> None:
        self._result = result if isinstance(result, Failure) else True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._fire(waiter)

    def _fire(self, waiter: Deferred[None]) -> None:
        if isinstance(self._result, Failure):
            waiter.errback(self._result)
        else:
            waiter.callback(None)

    def wait(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        if self._result is False:
            self._waiters.append(waiter)
        else:
            self._fire(waiter)
        return waiter


class Refresher:
    """Where one reactor's Staplers refresh, and who closes them when the reactor shuts down.

    Get it with :func:`refresher_for`; there is one per reactor. ``threaded`` says whether the
    asyncio loop runs in a thread of its own (any reactor but the asyncio one).
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        loop = _asyncio_loop_of(reactor)
        self.threaded = loop is None
        self._thread: threading.Thread | None = None
        if loop is None:
            loop = asyncio.new_event_loop()
            self._thread = threading.Thread(
                target=self._run_loop, args=(loop,), name="staple refresher", daemon=True
            )
            self._thread.start()
        self.loop = loop
        self.staplers: list[Stapler] = []
        self._closing: _Outcome | None = None
        reactor.addSystemEventTrigger("before", "shutdown", self.close)

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    @property
    def closed(self) -> bool:
        return self._closing is not None

    def adopt(self, stapler: Stapler) -> None:
        """Close ``stapler`` with the others at shutdown."""
        if self.closed:
            raise RuntimeError("the reactor is shutting down: its staple refresher is closed")
        if stapler not in self.staplers:
            self.staplers.append(stapler)

    def run(self, coro: Coroutine[Any, Any, T]) -> Deferred[T]:
        """Run ``coro`` on the refresher's loop; its result arrives on the reactor thread."""
        if not self.threaded:
            return Deferred.fromFuture(asyncio.ensure_future(coro, loop=self.loop))
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        result: Deferred[T] = Deferred()

        def deliver(done: Any) -> None:
            if done.cancelled():
                result.errback(asyncio.CancelledError())
            elif done.exception() is not None:
                result.errback(done.exception())
            else:
                result.callback(done.result())

        future.add_done_callback(lambda done: self._reactor.callFromThread(deliver, done))
        return result

    def run_blocking(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the refresher's thread and wait for it (threaded refresher only)."""
        if not self.threaded:
            coro.close()
            raise RuntimeError("the refresher runs on the reactor's loop: use run()")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> Deferred[None]:
        """Close every Stapler, then stop the thread if there is one. Idempotent: later calls
        get a Deferred for the same close."""
        if self._closing is None:
            _refreshers.pop(self._reactor, None)
            closing = self.run(self._close_staplers())
            closing.addBoth(self._stopped)
            self._closing = _Outcome(closing)
        return self._closing.wait()

    async def _close_staplers(self) -> None:
        await asyncio.gather(*(s.close() for s in self.staplers), return_exceptions=True)

    def _stopped(self, result: object) -> None:
        if isinstance(result, Failure):
            log.failure("closing the staple refresher", result)
        log.info(
            "staple: stopped refreshing {count} certificate(s)",
            count=sum(len(s.handles) for s in self.staplers),
        )
        if self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(_JOIN_TIMEOUT)


_refreshers: weakref.WeakKeyDictionary[Any, Refresher] = weakref.WeakKeyDictionary()


def refresher_for(reactor: Any) -> Refresher:
    """The :class:`Refresher` of ``reactor``, made on first use."""
    refresher = _refreshers.get(reactor)
    if refresher is None:
        refresher = _refreshers[reactor] = Refresher(reactor)
    return refresher


class _Connection(SSL.Connection):
    """A server connection whose handshake, refused by the Stapler's must-staple policy, fails
    with the ``SSL.Error`` Twisted's TLS protocol handles (it closes the connection) instead
    of escaping as an unhandled ``StapleRefused`` with a traceback in the log."""

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except StapleRefused as exc:
            raise SSL.Error([("staple", "do_handshake", f"no OCSP staple: {exc}")]) from exc


@implementer(IOpenSSLServerConnectionCreator)
class StaplingOptions:
    """TLS options that staple: an ``IOpenSSLServerConnectionCreator`` (and, for older APIs, a
    context factory with ``getContext()``) for ``reactor.listenSSL``, ``SSL4ServerEndpoint``,
    ``twisted.web`` and anything else that takes ``CertificateOptions``.

    Made by :func:`server_options`; the constructor is for a ``context`` you built and a
    ``stapler`` you run yourself (``start()`` then fires at once).
    """

    def __init__(
        self,
        context: SSL.Context,
        stapler: Stapler,
        *,
        opening: Deferred[None] | None = None,
    ) -> None:
        self.context = context
        self.stapler = stapler
        self._opening = _Outcome(opening)

    def start(self) -> Deferred[None]:
        """A Deferred that fires once every chain is open (its first response fetched, or the
        policy's ``wait_timeout`` passed): listen after it to staple the first handshake. It
        fails if a chain could not be opened (an unreadable file, a certificate without an
        issuer). Call it as often as you like."""
        return self._opening.wait()

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """A connection for Twisted's ``TLSMemoryBIOProtocol`` (which sets accept state)."""
        return _Connection(self.context, None)

    def getContext(self) -> SSL.Context:
        """The server context, for APIs that still take a ``ContextFactory``."""
        return self.context


def server_options(
    certs: Sequence[CertSpec],
    *,
    stapler: Stapler | None = None,
    store: Store | None = None,
    on_update: OnUpdate | None = None,
    must_staple: MustStaple | str = MustStaple.LENIENT,
    reactor: Any = None,
    **policy_options: Any,
) -> StaplingOptions:
    """TLS options serving ``certs`` (``[(chain, key), ...]``, PEM paths or bytes, the chain
    leaf first) with their OCSP responses stapled, refreshed on ``reactor``'s
    :class:`Refresher` (default: the installed reactor).

    Without ``stapler``, a new :class:`~staple.Stapler` is made with ``store`` (default: a
    :class:`~staple.MemoryStore`), ``on_update``, ``must_staple`` and the
    :class:`~staple.RefreshPolicy` fields in ``policy_options``. With one, the chains it does
    not hold yet are added to it (share one Stapler between several ports of one reactor this
    way; it must not run on any other loop) and the other options are refused. Either way the
    Stapler runs on the reactor's :class:`Refresher` and is closed when the reactor shuts down.

    Raises :class:`~staple.ChainError` for a chain or key that cannot be loaded. The chains are
    opened in the background: see :meth:`StaplingOptions.start`. With a threaded refresher and
    a reactor that is not running yet, this waits for them itself (bounded by the policy's
    ``wait_timeout``), so ``start()`` has already fired.
    """
    if stapler is not None and (
        store is not None
        or on_update is not None
        or MustStaple(must_staple) is not MustStaple.LENIENT
        or policy_options
    ):
        raise TypeError("pass either stapler= or the options for a new Stapler, not both")
    if stapler is None:
        stapler = Stapler(
            store=store, on_update=on_update, must_staple=must_staple, **policy_options
        )
    context = build_server_context(certs, stapler)
    chains = [load_chain(Path(chain) if isinstance(chain, str) else chain) for chain, _ in certs]
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    refresher = refresher_for(reactor)
    refresher.adopt(stapler)
    opening = _open(stapler, chains)
    mode = "a thread of its own" if refresher.threaded else "the reactor's asyncio loop"
    log.info(
        "staple: stapling {count} certificate(s), refreshed on {mode}", count=len(chains), mode=mode
    )
    if refresher.threaded and not reactor.running:
        refresher.run_blocking(opening, stapler.policy.wait_timeout + _OPEN_SLACK)
        return StaplingOptions(context, stapler)
    return StaplingOptions(context, stapler, opening=refresher.run(opening))


async def _open(stapler: Stapler, chains: Sequence[Any]) -> None:
    held = {h.cert for h in stapler.handles}
    await asyncio.gather(*(stapler.add(chain) for chain in chains if chain[0] not in held))


# -- the staple: endpoint ----------------------------------------------------------------------


@implementer(IStreamServerEndpoint)
class StaplingEndpoint:
    """A TLS server endpoint, like ``SSL4ServerEndpoint`` (an IPv6 ``interface`` listens on
    IPv6), that starts listening once the options' chains are open, so that the first
    handshake is stapled."""

    def __init__(
        self,
        reactor: Any,
        port: int,
        options: StaplingOptions,
        *,
        backlog: int = 50,
        interface: str = "",
    ) -> None:
        self._reactor = reactor
        self.port = port
        self.options = options
        self.backlog = backlog
        self.interface = interface

    def listen(self, protocolFactory: Any) -> Deferred[Any]:
        """Listen once the chains are open; fails if they cannot be, or the port is taken."""

        def listen_now(_: None) -> Any:
            return self._reactor.listenSSL(
                self.port,
                protocolFactory,
                self.options,
                backlog=self.backlog,
                interface=self.interface,
            )

        return self.options.start().addCallback(listen_now)


def parse_endpoint(
    reactor: Any,
    port: str,
    *,
    certKey: str | None = None,
    privateKey: str | None = None,
    extraCertChain: str | None = None,
    interface: str = "",
    backlog: str = "50",
    cacheDir: str | None = None,
    mustStaple: str = "lenient",
) -> StaplingEndpoint:
    """The endpoint for ``staple:PORT:certKey=CHAIN.pem:privateKey=KEY.pem[:interface=IP]
    [:backlog=N][:cacheDir=DIR][:extraCertChain=ISSUERS.pem][:mustStaple=strict]``.

    ``certKey`` is the chain, leaf first (or only the leaf, with its issuers in
    ``extraCertChain``, as Twisted's ``ssl:`` endpoint takes them); ``privateKey`` its key.
    Responses are kept in ``cacheDir`` (default: ``staple serve``'s cache directory,
    ``$XDG_CACHE_HOME/staple``), so a restart staples at once even while the responder is down.
    """
    if certKey is None or privateKey is None:
        raise ValueError(
            "the staple: endpoint needs certKey=CHAIN.pem and privateKey=KEY.pem, "
            "e.g. staple:8443:certKey=chain.pem:privateKey=key.pem"
        )
    chain: Path | bytes = Path(certKey)
    if extraCertChain is not None:
        chain = Path(certKey).read_bytes().rstrip(b"\n") + b"\n" + Path(extraCertChain).read_bytes()
    store = FileStore(Path(cacheDir) if cacheDir is not None else default_cache_dir())
    options = server_options(
        [(chain, Path(privateKey))], store=store, must_staple=mustStaple, reactor=reactor
    )
    return StaplingEndpoint(reactor, int(port), options, backlog=int(backlog), interface=interface)
