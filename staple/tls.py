"""Server-side TLS for asyncio on pyOpenSSL, so that OCSP responses can be stapled.

The stdlib :mod:`ssl` module has no way to staple an OCSP response; pyOpenSSL has
(``Context.set_ocsp_server_callback``). This module is the asyncio glue that lets an ordinary
asyncio server (``asyncio.Protocol``, ``asyncio.BufferedProtocol``, streams, aiohttp) run over a
pyOpenSSL ``SSL.Connection`` instead of ``ssl.SSLContext``.

Public surface::

    server = await staple.tls.create_server(factory, host, port, ssl_context=ctx)
    server = await staple.tls.start_server(client_connected_cb, host, port, ssl_context=ctx)
    factory = staple.tls.server_protocol_factory(app_factory, ctx, on_connection=track)
    staple.tls.call_when_closed(conn, callback)   # for the OCSP stapler
    server = await staple.tls.create_server(factory, host, port, ssl_context=ctx,
                                            transport="memory")   # memory BIOs (below)

Two transports
--------------
``transport="socket"`` (the default) is :mod:`staple.tls_socket`: OpenSSL reads and writes each
accepted socket itself, and the server accepts connections itself, so no asyncio transport is
made. ``transport="memory"`` is this module's: memory BIOs under asyncio's own TCP transport.
Both keep the same guarantees (the test suites run on both). Measured against each other
(``bench``): the socket transport executes fewer instructions per full handshake (the Python
that pumps each flight through two BIOs is gone), and uploads cost the same; but OpenSSL sends
every 16 KiB record with its own ``send()``, so downloads cost a few per cent more CPU per MB
(1.04x, corked). Connections are what a TLS server pays for most often, hence the default.

The memory transport remains where a socket BIO cannot work: where the loop creates the
connection and hands a protocol factory its transport, i.e. :func:`server_protocol_factory`
with ``loop.create_server``; and anything that is not a socket of its own (pipes, a transport
that already wraps the socket). :mod:`staple.uvicorn` listens itself on the socket transport
(uvicorn still runs its lifespan, protocols and shutdown), and on ``transport="memory"`` wraps
uvicorn's protocol in :class:`TLSServerProtocol` under uvicorn's own listener.

Theory of operation
-------------------
Each accepted TCP connection gets two objects, exactly as in CPython's ``asyncio/sslproto.py``:

* :class:`TLSServerProtocol` is the *TCP transport's* protocol. It owns an
  ``SSL.Connection(ctx, None)`` in accept state: two memory BIOs, no socket. Bytes from the
  network go into the incoming BIO (``bio_write``); OpenSSL's output is drained from the
  outgoing BIO (``bio_read``) and written to TCP. All TLS work happens inside the callbacks the
  event loop makes anyway; there is no task, thread or extra buffer per connection.
* :class:`TLSTransport` is the *application's* transport: a complete ``asyncio.Transport``
  (flow control both ways, ``get_extra_info``, ``loop.sendfile`` through asyncio's fallback).
  The application protocol is connected to it only once the handshake has completed.

The TLS layer is a small state machine, :class:`TLSState`, changed in one place
(``_set_state``), which refuses any move not in ``_TLS_TRANSITIONS``::

    UNWRAPPED --connection_made--> DO_HANDSHAKE --handshake ok--> WRAPPED
    WRAPPED --close() / peer's close_notify--> SHUTDOWN --peer's close_notify / EOF--> CLOSED
    any state --error / abort() / timeout / TCP lost--> CLOSED

* ``DO_HANDSHAKE``: every incoming chunk drives ``do_handshake`` (``_start_handshake`` ->
  ``_do_handshake`` -> ``_on_handshake_complete``). A timer aborts handshakes slower than
  ``handshake_timeout``; a failed handshake flushes OpenSSL's alert to TCP, then closes it.
* ``WRAPPED``: records are decrypted 16 KiB at a time (``recv``) until OpenSSL wants more input,
  then handed to the application in one call. Application data that arrived in the same TCP
  read as the client's Finished is decrypted right after the handshake completes.
* ``SHUTDOWN``: our close_notify has been sent; incoming application data is discarded until
  the peer's close_notify or EOF, then TCP is closed. A timer bounds the wait
  (``shutdown_timeout``) and also bounds a TCP close stuck behind a peer that does not read.
* ``CLOSED``: terminal. TCP is closed or closing; writes are dropped (logged after a few, like
  asyncio's own transports).

sslproto also has a ``FLUSHING`` state, for plaintext that ``SSLObject.write`` could not take
yet. Writing to a memory BIO never blocks and renegotiation is refused, so here application data
is encrypted the moment it is written: there is nothing to flush and no such state.

The application protocol has its own lifecycle, :class:`AppState` (``INIT -> CON_MADE [-> EOF]
-> CON_LOST``), changed through the same ``_set_state``: ``connection_made`` once, after the
handshake; ``eof_received`` at most once; ``connection_lost`` once, and only if
``connection_made`` happened.

Outgoing data and flow control
------------------------------
Everything OpenSSL produces goes out through one method, ``_process_outgoing``, which reads the
outgoing BIO about 64 KiB at a time and writes each chunk (immutable ``bytes``) straight to TCP.
What one incoming event produces (handshake flight, session tickets, the application's response,
close_notify) is *corked* and flushed once at the end of the event; application writes made
outside an event are flushed at once. Large writes are encrypted 64 KiB at a time (four
records, whose ciphertext fits one 68 KiB read), so the BIO never holds more than that.

Since nothing is held back in the TLS layer, the write buffer *is* the TCP transport's buffer:
``pause_writing``/``resume_writing`` reach the application when the TCP transport pauses or
resumes us, and ``set_write_buffer_limits`` sets the TCP transport's limits. When the
application pauses reading, TCP reading is paused too; what is already in the incoming BIO is
delivered after ``resume_reading``.

The TCP side is an ``asyncio.BufferedProtocol`` reading into one receive buffer shared by all
connections of a thread (it is copied into the BIO before the callback returns), so an idle
connection costs no receive buffer.

Renegotiation is refused: ``OP_NO_RENEGOTIATION`` is set on every connection, so OpenSSL answers
a TLS 1.2 ClientHello after the handshake with a no_renegotiation warning alert, and we then close
the connection. We see that alert where it leaves: an alert record leading a flush in ``WRAPPED``
is that refusal and nothing else (``_refuse_renegotiation``), one comparison on flushes that
carry bytes and nothing per connection. The close is best effort where the alert does not lead:
a ClientHello in the same TCP read as the client's Finished (our last flight, or what the app
wrote from ``connection_made``, leads), or behind data that a ``BufferedProtocol`` app, its
buffer full, answered before the ClientHello was read. Such a peer is still refused, only not
disconnected. TLS 1.3 has no renegotiation; OpenSSL itself fails a late ClientHello there.

The OCSP stapler's hook
-----------------------
:func:`call_when_closed` lets code running inside a handshake callback (the OCSP server
callback) ask to be told, exactly once, when that connection goes away.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import warnings
import weakref
from asyncio import constants as _asyncio_constants
from asyncio import transports as _asyncio_transports
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Literal, cast

from cryptography import x509
from OpenSSL import SSL

from .errors import StapleRefused

__all__ = [
    "DEFAULT_TRANSPORT",
    "TRANSPORTS",
    "AppState",
    "TLSServerProtocol",
    "TLSState",
    "TLSTransport",
    "TransportKind",
    "call_when_closed",
    "create_server",
    "server_protocol_factory",
    "start_server",
]

logger = logging.getLogger("staple.tls")

DEFAULT_HANDSHAKE_TIMEOUT: Final = 60.0
DEFAULT_SHUTDOWN_TIMEOUT: Final = 30.0

# One TLS record carries at most 16 KiB of plaintext: the unit of ``recv``.
_RECORD: Final = 16 * 1024
# Plaintext encrypted between two drains: four full records.
_WRITE_CHUNK: Final = 4 * _RECORD
# ``bio_read`` allocates its argument each call. 68 KiB holds the ciphertext of _WRITE_CHUNK
# whatever the cipher (at most ~330 bytes of overhead a record, for CBC with SHA-384), so one
# read drains it; and it stays well under glibc's 128 KiB mmap threshold (256 KiB reads tripled
# CPU per MB through heap churn).
_BIO_READ: Final = 68 * 1024
# The TCP transport reads into this; one per thread, shared by every connection.
_RECEIVE_BUFFER_SIZE: Final = 256 * 1024
_LOG_THRESHOLD_FOR_CONNLOST_WRITES: Final = _asyncio_constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES

_OP_NO_RENEGOTIATION: Final[int] = getattr(SSL, "OP_NO_RENEGOTIATION", 0)
# A TLS record's first byte is its content type; 21 is an alert. In TLS 1.3 every record after
# the handshake says 23 (application data), whatever it carries.
_ALERT_RECORD: Final = 21


class TLSState(enum.Enum):
    """The TLS layer's lifecycle. See the module docstring for the diagram."""

    UNWRAPPED = "UNWRAPPED"  # created; no TCP connection yet
    DO_HANDSHAKE = "DO_HANDSHAKE"  # TCP up, handshake in progress; the app is not started
    WRAPPED = "WRAPPED"  # handshake done; application data flows both ways
    SHUTDOWN = "SHUTDOWN"  # our close_notify sent; waiting (bounded) for the peer's or EOF
    CLOSED = "CLOSED"  # terminal: TCP closed or closing


class AppState(enum.Enum):
    """The application protocol's lifecycle: ``INIT -> CON_MADE [-> EOF] -> CON_LOST``."""

    INIT = "INIT"  # not connected (handshake not done, or it failed)
    CON_MADE = "CON_MADE"  # connection_made() called
    EOF = "EOF"  # eof_received() called
    CON_LOST = "CON_LOST"  # connection_lost() called


_TLS_TRANSITIONS: Final[Mapping[TLSState, frozenset[TLSState]]] = {
    TLSState.UNWRAPPED: frozenset({TLSState.DO_HANDSHAKE, TLSState.CLOSED}),
    TLSState.DO_HANDSHAKE: frozenset({TLSState.WRAPPED, TLSState.CLOSED}),
    TLSState.WRAPPED: frozenset({TLSState.SHUTDOWN, TLSState.CLOSED}),
    TLSState.SHUTDOWN: frozenset({TLSState.CLOSED}),
    TLSState.CLOSED: frozenset(),
}

_APP_TRANSITIONS: Final[Mapping[AppState, frozenset[AppState]]] = {
    AppState.INIT: frozenset({AppState.CON_MADE}),
    AppState.CON_MADE: frozenset({AppState.EOF, AppState.CON_LOST}),
    AppState.EOF: frozenset({AppState.CON_LOST}),
    AppState.CON_LOST: frozenset(),
}

_APP_CONNECTED: Final = frozenset({AppState.CON_MADE, AppState.EOF})

# Live protocols by id() of their SSL.Connection, for call_when_closed(). Weak values: an entry
# never keeps a connection alive.
# Either transport's object (TLSServerProtocol, tls_socket.SocketTLSTransport): both have
# ``_ssl`` and ``_close_callbacks``.
_live: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()

_thread_local = threading.local()


def _receive_buffer() -> memoryview:
    """This thread's receive buffer, shared by all connections (copied into a BIO at once)."""
    try:
        view: memoryview = _thread_local.receive_buffer
    except AttributeError:
        view = memoryview(bytearray(_RECEIVE_BUFFER_SIZE))
        _thread_local.receive_buffer = view
    return view


def _check_timeout(name: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _check_context(ssl_context: object) -> SSL.Context:
    if not isinstance(ssl_context, SSL.Context):
        raise TypeError(
            "ssl_context must be an OpenSSL.SSL.Context (staple.tls does TLS with pyOpenSSL, "
            f"not the ssl module); got {type(ssl_context).__name__}"
        )
    return ssl_context


def call_when_closed(conn: SSL.Connection, callback: Callable[[], None]) -> bool:
    """Run ``callback()`` once when the TLS connection ``conn`` of one of our transports ends.

    Meant for code running inside a handshake callback (the OCSP stapler's server callback),
    which needs to release something when the connection goes away. If ``conn`` belongs to a
    live :class:`TLSServerProtocol`, ``callback`` is registered and ``True`` is returned; it
    runs exactly once, when the connection starts closing (``close()``, the peer's
    close_notify, ``abort()``, an error, a timeout) or is lost, whichever comes first.
    Exceptions it raises are logged, not raised. Otherwise (a connection we did not make, or
    one already closing) nothing is registered and ``False`` is returned: use
    :func:`weakref.finalize` instead.

    Cheap: one dictionary lookup.
    """
    protocol = _live.get(id(conn))
    if protocol is None or protocol._ssl is not conn:
        return False
    callbacks = protocol._close_callbacks
    if callbacks is None:
        protocol._close_callbacks = [callback]
    else:
        callbacks.append(callback)
    return True


def note_status_request(conn: SSL.Connection) -> None:
    """Mark ``conn`` (one of our transports' connections) as having asked for a staple: the
    OCSP callback calls this, so that :func:`count_handshakes` can tell who did not ask.
    Connections we did not make are ignored. Cheap: one dictionary lookup."""
    protocol = _live.get(id(conn))
    if protocol is not None and protocol._ssl is conn:
        protocol._status_requested = True


_handshake_counters: weakref.WeakKeyDictionary[SSL.Context, Callable[[bool], None]] = (
    weakref.WeakKeyDictionary()
)


def count_handshakes(ctx: SSL.Context, counter: Callable[[bool], None]) -> None:
    """Call ``counter(asked)`` each time one of our transports completes a handshake on
    ``ctx`` (the context the connection ended up on, after any SNI switch): ``asked`` is
    whether the client asked for a staple (:func:`note_status_request`). The
    :class:`~staple.Stapler` counts clients that did not ask this way, which OpenSSL never
    shows its OCSP callback."""
    _handshake_counters[ctx] = counter


def _handshake_counted(ssl: SSL.Connection, asked: bool) -> None:
    counter = _handshake_counters.get(ssl.get_context())
    if counter is not None:
        counter(asked)


class TLSTransport(_asyncio_transports._FlowControlMixin, asyncio.Transport):
    """The application's side of a TLS connection: a complete :class:`asyncio.Transport`.

    Created by :class:`TLSServerProtocol` when TCP connects; handed to the application protocol
    (``connection_made``) once the handshake has completed, and before that only to an
    ``on_connection`` hook.

    ``get_extra_info`` knows ``sslcontext`` (the connection's current ``SSL.Context``: after an
    SNI switch, the new one), ``ssl_object`` (the ``SSL.Connection``), and after the handshake
    ``peercert`` (the peer's certificate as a ``cryptography`` ``x509.Certificate``, or
    ``None``), ``cipher`` (``(name, protocol, secret bits)`` like ``ssl.SSLObject.cipher()``)
    and ``compression`` (always ``None``); anything else (``peername``, ``sockname``,
    ``socket``...) comes from the TCP transport.

    ``can_write_eof()`` is ``False`` and ``write_eof()`` raises :exc:`NotImplementedError`: TLS
    has no half-close.
    """

    # asyncio's loop.sendfile() streams files through write() with flow control.
    _sendfile_compatible = _asyncio_constants._SendfileMode.FALLBACK
    _start_tls_compatible = False

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: TLSServerProtocol) -> None:
        # _FlowControlMixin.__init__ is not called: limits and pausing live in the TCP transport.
        self._loop = loop
        self._tls_protocol = protocol
        self._closed = False

    def __repr__(self) -> str:
        return f"<TLSTransport {self._tls_protocol._state.value} closing={self._closed}>"

    def __del__(self, _warnings: Any = warnings) -> None:
        if not self._closed:
            self._closed = True
            _warnings.warn(f"unclosed transport {self!r}", ResourceWarning, source=self)

    @property
    def tls_state(self) -> TLSState:
        """The TLS layer's state (e.g. ``DO_HANDSHAKE`` for connections still handshaking)."""
        return self._tls_protocol._state

    @property
    def app_state(self) -> AppState:
        """The application protocol's state (``INIT`` until the handshake has completed)."""
        return self._tls_protocol._app_state

    @property
    def _protocol_paused(self) -> bool:  # read by asyncio's sendfile fallback
        return self._tls_protocol._app_writing_paused

    # -- BaseTransport

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._tls_protocol._get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Send close_notify and close TCP once the peer answers (bounded by shutdown_timeout).

        Idempotent. No more data is delivered. The protocol's ``connection_lost()`` is called
        once TCP is closed. During the handshake this is :meth:`abort`.
        """
        if not self._closed:
            self._closed = True
            self._tls_protocol._start_shutdown()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._tls_protocol._set_app_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return cast(asyncio.BaseProtocol, self._tls_protocol._app_protocol)

    # -- ReadTransport

    def is_reading(self) -> bool:
        return not self._closed and not self._tls_protocol._app_reading_paused

    def pause_reading(self) -> None:
        """Stop delivering data (TCP reading is paused too) until :meth:`resume_reading`."""
        self._tls_protocol._pause_reading()

    def resume_reading(self) -> None:
        self._tls_protocol._resume_reading()

    # -- WriteTransport

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Set the TCP transport's limits: TLS holds nothing back, so its buffer is ours."""
        self._tls_protocol._transport_or_raise().set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._tls_protocol._transport_or_raise().get_write_buffer_limits()

    def get_write_buffer_size(self) -> int:
        protocol = self._tls_protocol
        return protocol._transport_or_raise().get_write_buffer_size() + protocol._unflushed

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` now and queue it on TCP. Never blocks; mind ``pause_writing``."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data: expecting a bytes-like instance, got {type(data).__name__}")
        if data:
            self._tls_protocol._write_appdata(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self._tls_protocol._write_appdata_many(list_of_data)

    def write_eof(self) -> None:
        raise NotImplementedError("TLS transports cannot half-close: use close()")

    def can_write_eof(self) -> bool:
        return False

    def abort(self) -> None:
        """Close TCP at once, dropping buffered data. ``connection_lost(None)`` follows."""
        self._closed = True
        self._tls_protocol._abort()


class TLSServerProtocol(asyncio.BufferedProtocol):
    """Server-side TLS over a TCP transport, for one connection; the app gets a TLSTransport.

    ``app_protocol`` is any asyncio protocol (``Protocol``, ``BufferedProtocol``, or a
    ``BaseProtocol`` with ``data_received`` such as aiohttp's request handler). ``on_connection``
    is called with the :class:`TLSTransport` as soon as TCP connects, before the handshake:
    a server can keep the transports (e.g. in a ``weakref.WeakSet``) and ``abort()`` those still
    in ``TLSState.DO_HANDSHAKE`` when it stops, since the application cannot see them yet.

    Must be created inside a running event loop (normally by the loop, through the factory
    from :func:`server_protocol_factory`).
    """

    def __init__(
        self,
        app_protocol: asyncio.BaseProtocol,
        ssl_context: SSL.Context,
        *,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        on_connection: Callable[[TLSTransport], None] | None = None,
        handshake_gate: HandshakeGate | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._gate = handshake_gate
        self._handshake_timeout = _check_timeout("handshake_timeout", handshake_timeout)
        self._shutdown_timeout = _check_timeout("shutdown_timeout", shutdown_timeout)
        self._on_connection = on_connection

        ssl = SSL.Connection(_check_context(ssl_context), None)
        ssl.set_accept_state()
        if _OP_NO_RENEGOTIATION:
            ssl.set_options(_OP_NO_RENEGOTIATION)
        self._ssl = ssl
        _live[id(ssl)] = self

        self._app_protocol: Any = None
        self._app_is_buffered = False
        self._set_app_protocol(app_protocol)
        self._app_transport: TLSTransport | None = None
        self._transport: asyncio.Transport | None = None
        self._recv_view = _receive_buffer()

        self._state = TLSState.UNWRAPPED
        self._app_state = AppState.INIT
        self._handshake_timeout_handle: asyncio.TimerHandle | None = None
        self._shutdown_timeout_handle: asyncio.TimerHandle | None = None
        self._handshake_start_time = 0.0
        self._close_callbacks: list[Callable[[], None]] | None = None
        self._status_requested = False  # the client asked for a staple (note_status_request)
        self._released = False
        self._close_notify_sent = False
        self._peer_eof = False  # TCP EOF seen while the app had paused reading
        self._close_exc: BaseException | None = None  # given to the app's connection_lost()
        self._conn_lost_writes = 0

        # Output is corked while we handle one incoming event: flushed once at its end. Writes
        # made outside one (from a task) are drained once, after the loop's current callbacks.
        self._corked = False
        self._drain_scheduled = False
        self._unflushed = 0  # plaintext bytes encrypted into the outgoing BIO since the drain
        self._tcp_closing = False
        self._tcp_lost = False
        self._tcp_writing_paused = False
        self._tcp_reading_paused = False
        self._app_writing_paused = False
        self._app_reading_paused = False

    def __repr__(self) -> str:
        return f"<TLSServerProtocol {self._state.value} app={self._app_state.value}>"

    # -- state

    def _set_state(self, new_state: TLSState | AppState) -> None:
        """The one place either lifecycle changes; refuses moves not in the transition tables."""
        if isinstance(new_state, TLSState):
            old: TLSState | AppState = self._state
            allowed = new_state in _TLS_TRANSITIONS[self._state]
        else:
            old = self._app_state
            allowed = new_state in _APP_TRANSITIONS[self._app_state]
        if not allowed:
            raise RuntimeError(f"cannot switch state from {old} to {new_state}")
        if isinstance(new_state, TLSState):
            gate = self._gate
            if gate is not None:  # count handshakes in progress, for the server's cap
                if new_state is TLSState.DO_HANDSHAKE:
                    gate.active += 1
                elif self._state is TLSState.DO_HANDSHAKE:
                    gate.active -= 1
            self._state = new_state
            if new_state is TLSState.SHUTDOWN or new_state is TLSState.CLOSED:
                self._release()
        else:
            self._app_state = new_state

    def _release(self) -> None:
        """The connection is ending: stop the handshake timer, run call_when_closed callbacks."""
        if self._app_transport is not None:
            self._app_transport._closed = True
        if self._handshake_timeout_handle is not None:
            self._handshake_timeout_handle.cancel()
            self._handshake_timeout_handle = None
        if self._released:
            return
        self._released = True
        _live.pop(id(self._ssl), None)
        callbacks, self._close_callbacks = self._close_callbacks, None
        for callback in callbacks or ():
            try:
                callback()
            except Exception:
                logger.exception("call_when_closed callback %r failed", callback)

    def _set_app_protocol(self, app_protocol: asyncio.BaseProtocol) -> None:
        self._app_protocol = app_protocol
        self._app_is_buffered = isinstance(app_protocol, asyncio.BufferedProtocol)

    def _transport_or_raise(self) -> asyncio.Transport:
        if self._transport is None:
            raise RuntimeError("the TCP connection is not made yet")
        return self._transport

    def _get_extra_info(self, name: str, default: Any = None) -> Any:
        ssl = self._ssl
        if name == "sslcontext":
            return ssl.get_context()
        if name == "ssl_object":
            return ssl
        if name in ("peercert", "cipher", "compression") and self._state in (
            TLSState.WRAPPED,
            TLSState.SHUTDOWN,
        ):
            if name == "peercert":
                cert: x509.Certificate | None = ssl.get_peer_certificate(as_cryptography=True)
                return cert
            if name == "cipher":
                return (ssl.get_cipher_name(), ssl.get_cipher_version(), ssl.get_cipher_bits())
            return None  # compression: OpenSSL 3 has none
        if self._transport is not None:
            return self._transport.get_extra_info(name, default)
        return default

    # -- TCP side: asyncio.BufferedProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        app_transport = self._app_transport = TLSTransport(self._loop, self)
        gate = self._gate
        if gate is not None and gate.active >= gate.limit:
            # Too many handshakes in progress (slowloris): refuse this one at once, before it
            # costs an SSL object's handshake state, rather than let memory grow.
            gate.refused += 1
            if gate.refused == 1 or gate.refused % 1000 == 0:
                logger.warning(
                    "refusing connections: %d TLS handshakes in progress (max_handshakes); "
                    "%d refused so far",
                    gate.active,
                    gate.refused,
                )
            app_transport.abort()
            return
        if self._on_connection is not None:
            try:
                self._on_connection(app_transport)
            except Exception as exc:
                self._fatal_error(exc, "on_connection callback failed")
                return
        if self._state is TLSState.UNWRAPPED:  # on_connection may have aborted it
            self._start_handshake()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._recv_view

    def buffer_updated(self, nbytes: int) -> None:
        state = self._state
        if state is TLSState.CLOSED:
            return
        self._ssl.bio_write(self._recv_view[:nbytes])
        self._corked = True
        try:
            if state is TLSState.WRAPPED:
                self._do_read()
            elif state is TLSState.DO_HANDSHAKE:
                self._do_handshake()
            elif state is TLSState.SHUTDOWN:
                self._do_shutdown()
        finally:
            self._corked = False
        self._process_outgoing()

    def eof_received(self) -> bool:
        state = self._state
        keep_open = False
        self._corked = True
        try:
            if state is TLSState.DO_HANDSHAKE:
                self._on_handshake_complete(
                    ConnectionResetError("the peer closed the connection during the TLS handshake")
                )
            elif state is TLSState.WRAPPED:
                self._do_read()  # what is left in the BIO (and maybe a close_notify)
                if self._state is TLSState.WRAPPED:
                    if self._app_reading_paused:
                        self._peer_eof = True  # finish once the app resumes reading
                        keep_open = True
                    else:
                        self._on_peer_eof()
            elif state is TLSState.SHUTDOWN:
                self._on_shutdown_complete()
        finally:
            self._corked = False
        self._process_outgoing()
        return keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        self._tcp_lost = self._tcp_closing = True
        for handle in (self._handshake_timeout_handle, self._shutdown_timeout_handle):
            if handle is not None:
                handle.cancel()
        self._handshake_timeout_handle = self._shutdown_timeout_handle = None
        if self._state is not TLSState.CLOSED:
            self._set_state(TLSState.CLOSED)
        app_protocol = self._app_protocol
        if self._app_state in _APP_CONNECTED:
            self._set_state(AppState.CON_LOST)
            close_exc, self._close_exc = self._close_exc, None
            # Drop references first: the app's connection_lost may raise.
            self._app_protocol = None
            self._app_transport = None
            app_protocol.connection_lost(close_exc if close_exc is not None else exc)
        else:
            self._app_protocol = None
            self._app_transport = None

    def pause_writing(self) -> None:
        self._tcp_writing_paused = True
        self._control_app_writing()

    def resume_writing(self) -> None:
        self._tcp_writing_paused = False
        self._control_app_writing()

    # -- handshake flow

    def _start_handshake(self) -> None:
        self._set_state(TLSState.DO_HANDSHAKE)
        if self._loop.get_debug():
            logger.debug("%r starts the TLS handshake", self)
            self._handshake_start_time = self._loop.time()
        self._handshake_timeout_handle = self._loop.call_later(
            self._handshake_timeout, self._check_handshake_timeout
        )
        # A server speaks second: nothing to do until the ClientHello arrives.

    def _check_handshake_timeout(self) -> None:
        self._handshake_timeout_handle = None
        if self._state is TLSState.DO_HANDSHAKE:
            self._fatal_error(
                ConnectionAbortedError(
                    f"TLS handshake is taking longer than {self._handshake_timeout} seconds: "
                    "aborting the connection"
                ),
                abort=True,
            )

    def _do_handshake(self) -> None:
        try:
            self._ssl.do_handshake()
        except SSL.WantReadError:
            return  # the flight OpenSSL produced is flushed at the end of the event
        except Exception as exc:
            # SSL.Error: the peer's fault. Anything else: a context callback (SNI, ALPN, OCSP)
            # raised, and pyOpenSSL re-raises it here.
            self._on_handshake_complete(exc)
            return
        self._on_handshake_complete(None)

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        if self._handshake_timeout_handle is not None:
            self._handshake_timeout_handle.cancel()
            self._handshake_timeout_handle = None
        if handshake_exc is not None:
            self._fatal_error(handshake_exc, "TLS handshake failed")
            return
        self._set_state(TLSState.WRAPPED)
        _handshake_counted(self._ssl, self._status_requested)
        if self._loop.get_debug():
            dt = self._loop.time() - self._handshake_start_time
            logger.debug("%r: TLS handshake took %.1f ms", self, dt * 1e3)

        self._set_state(AppState.CON_MADE)
        try:
            self._app_protocol.connection_made(self._app_transport)
        except Exception as exc:
            self._fatal_error(exc, "application protocol connection_made() failed")
            return
        if self._state is not TLSState.WRAPPED:  # the app closed it already
            return
        self._control_app_writing()  # TCP may have paused us during the handshake
        if self._app_reading_paused:
            self._pause_tcp_reading()
        else:
            self._do_read()  # application data that came with the client's Finished

    # -- incoming flow

    def _do_read(self) -> None:
        """Decrypt what the incoming BIO holds and hand it to the app (state WRAPPED)."""
        if self._app_reading_paused:
            return
        try:
            eof = self._do_read__buffered() if self._app_is_buffered else self._do_read__copied()
        except SSL.Error as exc:
            self._fatal_error(exc, "TLS error on read")
            return
        except Exception as exc:
            self._fatal_error(exc, "application protocol failed to receive data")
            return
        if eof and self._state is TLSState.WRAPPED:
            self._call_eof_received()
            self._start_shutdown()

    def _do_read__copied(self) -> bool:
        """Read records until OpenSSL wants more; one data_received(). True at close_notify."""
        recv = self._ssl.recv
        chunks: list[bytes] = []
        eof = False
        try:
            while True:
                chunks.append(recv(_RECORD))
        except SSL.WantReadError:
            pass
        except SSL.ZeroReturnError:
            eof = True
        if chunks:
            self._app_protocol.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        return eof

    def _do_read__buffered(self) -> bool:
        """Fill the app's buffers; stop if it pauses reading. True at close_notify."""
        recv_into = self._ssl.recv_into
        protocol = self._app_protocol
        while True:
            buf = memoryview(protocol.get_buffer(-1)).cast("B")
            wants = len(buf)
            if not wants:
                raise RuntimeError("get_buffer() returned an empty buffer")
            offset = 0
            try:
                while offset < wants:
                    offset += recv_into(buf[offset:], min(_RECORD, wants - offset))
            except SSL.WantReadError:
                if offset:
                    protocol.buffer_updated(offset)
                return False
            except SSL.ZeroReturnError:
                if offset:
                    protocol.buffer_updated(offset)
                return True
            protocol.buffer_updated(offset)  # buffer full: ask for another one
            if self._app_reading_paused or self._state is not TLSState.WRAPPED:
                return False

    def _call_eof_received(self) -> None:
        if self._app_state is not AppState.CON_MADE:
            return
        self._set_state(AppState.EOF)
        eof_received = getattr(self._app_protocol, "eof_received", None)  # BaseProtocol has none
        try:
            keep_open = eof_received() if eof_received is not None else None
        except Exception as exc:
            self._fatal_error(exc, "application protocol eof_received() failed")
            return
        if keep_open:
            logger.debug("%r: returning true from eof_received() has no effect over TLS", self)

    def _on_peer_eof(self) -> None:
        """TCP EOF in WRAPPED without a close_notify first: end the connection."""
        logger.debug("%r: the peer closed TCP without a TLS close_notify", self)
        self._call_eof_received()  # the app may close() here: then its close_notify goes out
        if self._state is not TLSState.CLOSED:
            self._set_state(TLSState.CLOSED)
        self._close_tcp()

    # -- shutdown flow

    def _start_shutdown(self) -> None:
        """close() from the app, or the peer's close_notify: send ours, await the peer's."""
        state = self._state
        if state is TLSState.SHUTDOWN or state is TLSState.CLOSED:
            return
        if state is not TLSState.WRAPPED:
            self._abort()  # no TLS session to close yet
            return
        self._set_state(TLSState.SHUTDOWN)
        self._shutdown_timeout_handle = self._loop.call_later(
            self._shutdown_timeout, self._check_shutdown_timeout
        )
        self._resume_tcp_reading()  # the peer's close_notify must get in
        self._do_shutdown()
        if self._peer_eof and self._state is TLSState.SHUTDOWN:
            self._on_shutdown_complete()  # TCP already ended: nothing more will come
        if not self._corked:
            self._process_outgoing()

    def _do_shutdown(self) -> None:
        ssl = self._ssl
        try:
            if not self._close_notify_sent:
                self._close_notify_sent = True
                if ssl.shutdown():  # the peer's close_notify had arrived already
                    self._on_shutdown_complete()
                    return
            while True:  # discard application data until the peer's close_notify
                ssl.recv(_RECORD)
        except SSL.WantReadError:
            return
        except SSL.ZeroReturnError:
            self._on_shutdown_complete()
        except SSL.Error as exc:
            self._on_shutdown_complete(exc)

    def _check_shutdown_timeout(self) -> None:
        self._shutdown_timeout_handle = None
        if self._tcp_lost:
            return
        logger.debug("%r: TLS shutdown timed out, aborting", self)
        if self._app_state in _APP_CONNECTED and self._close_exc is None:
            self._close_exc = TimeoutError("TLS shutdown timed out")
        self._abort()

    def _on_shutdown_complete(self, shutdown_exc: BaseException | None = None) -> None:
        if shutdown_exc is not None:
            self._fatal_error(shutdown_exc, "TLS error during shutdown")
            return
        if self._state is not TLSState.CLOSED:
            self._set_state(TLSState.CLOSED)
        self._close_tcp()

    def _abort(self) -> None:
        if self._state is not TLSState.CLOSED:
            self._set_state(TLSState.CLOSED)
        self._tcp_closing = True
        if self._transport is not None and not self._tcp_lost:
            self._transport.abort()

    def _close_tcp(self) -> None:
        """Flush what OpenSSL queued (alerts, close_notify), then close TCP gracefully.

        A peer that does not read could hold the close forever: the shutdown timer (started
        here if not yet running) aborts it after shutdown_timeout.
        """
        if self._tcp_closing:
            return
        self._process_outgoing()
        self._tcp_closing = True
        transport = self._transport
        if transport is None:
            return
        transport.close()
        if (
            self._shutdown_timeout_handle is None
            and not self._tcp_lost
            and transport.get_write_buffer_size()
        ):
            self._shutdown_timeout_handle = self._loop.call_later(
                self._shutdown_timeout, self._check_shutdown_timeout
            )

    def _fatal_error(
        self,
        exc: BaseException,
        message: str = "Fatal error on TLS transport",
        *,
        abort: bool = False,
    ) -> None:
        """The one exit for errors: flush OpenSSL's alert, close TCP, report ``exc``.

        The peer's misbehaviour (``SSL.Error``), network errors and a handshake the OCSP
        stapler refused by policy (:class:`~staple.StapleRefused`, which it logs itself) are
        logged at debug level; anything else is a bug in the application or a callback, and
        goes to the loop's exception handler. The app's ``connection_lost`` receives ``exc``.
        """
        if self._app_state in _APP_CONNECTED and self._close_exc is None:
            self._close_exc = exc
        if self._state is not TLSState.CLOSED:
            self._set_state(TLSState.CLOSED)
        if abort:
            self._abort()
        else:
            self._close_tcp()
        if isinstance(exc, (SSL.Error, OSError, StapleRefused)):
            logger.debug("%r: %s: %r", self, message, exc)
        else:
            self._loop.call_exception_handler(
                {
                    "message": message,
                    "exception": exc,
                    "transport": self._transport,
                    "protocol": self,
                }
            )

    # -- outgoing flow

    def _process_outgoing(self) -> None:
        """Drain the outgoing BIO to TCP: 68 KiB reads, each written as it is read.

        Also where a TLS 1.2 renegotiation attempt shows, at the cost of one comparison on a
        flush that has bytes (see ``_refuse_renegotiation``).
        """
        self._unflushed = 0
        if self._tcp_closing:
            return
        transport = self._transport
        if transport is None:
            return
        bio_read = self._ssl.bio_read
        try:
            data = bio_read(_BIO_READ)
        except SSL.WantReadError:
            return  # empty
        # Every flush empties the BIO and OpenSSL writes whole records, so this starts a record.
        if (
            data[0] == _ALERT_RECORD
            and self._state is TLSState.WRAPPED
            and self._ssl.get_protocol_version() < SSL.TLS1_3_VERSION
        ):
            transport.write(data)  # the refusal goes out first
            self._refuse_renegotiation()
            return
        while True:
            transport.write(data)
            if len(data) < _BIO_READ:
                return  # a short read from a memory BIO means it is empty
            try:
                data = bio_read(_BIO_READ)
            except SSL.WantReadError:
                return

    def _refuse_renegotiation(self) -> None:
        """An alert led a flush in WRAPPED, TLS 1.2: OpenSSL refused a renegotiation. Close.

        ``OP_NO_RENEGOTIATION`` makes OpenSSL answer a ClientHello after the handshake with a
        no_renegotiation warning alert and carry on; closing the connection is our addition
        (the peer is misbehaving, or expects a handshake it will not get). Seen here rather
        than by an info callback, which pyOpenSSL allocates per connection and OpenSSL calls
        on every state change: that cost tens of µs per TLS 1.2 handshake.

        Why an alert leading a flush means exactly that: in TLS 1.2 after the handshake, the
        no_renegotiation warning is the only record OpenSSL writes of its own accord without
        failing (OpenSSL 3.x/4.x ``ssl3_read_bytes``: other warning alerts get no answer; a
        peer's close_notify gets ours only from ``shutdown()``, in SHUTDOWN; anything else is
        fatal, and a fatal error has set CLOSED before its alert is flushed; heartbeats are
        gone since OpenSSL 3.0; KeyUpdate is TLS 1.3, whose records all say application data
        anyway). A flush starts with what OpenSSL wrote in the event's ``recv`` loop, which
        runs before the application is handed the data; the handshake's last flight starts
        with a handshake or ChangeCipherSpec record; the application's records are
        application data.
        """
        self._fatal_error(
            SSL.Error("the peer attempted TLS renegotiation, which is refused"),
            "TLS renegotiation refused",
        )

    def _write_appdata(self, data: bytes | bytearray | memoryview) -> None:
        if self._state is not TLSState.WRAPPED:
            if self._state is TLSState.UNWRAPPED or self._state is TLSState.DO_HANDSHAKE:
                raise RuntimeError("cannot write before the TLS handshake has completed")
            if self._conn_lost_writes >= _LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                logger.warning("TLS connection is closed: write() ignored")
            self._conn_lost_writes += 1
            return
        view = data if type(data) is bytes else memoryview(data).cast("B")
        size = len(view)
        sendall = self._ssl.sendall
        try:
            if self._unflushed + size <= _WRITE_CHUNK:
                sendall(view)
                self._unflushed += size
            else:
                mv = memoryview(view)
                for start in range(0, size, _WRITE_CHUNK):
                    if start or self._unflushed:
                        self._process_outgoing()
                        if self._tcp_closing:
                            return  # closed under us (a renegotiation attempt, an abort)
                    chunk = mv[start : start + _WRITE_CHUNK]
                    sendall(chunk)
                    self._unflushed = len(chunk)
        except SSL.Error as exc:
            self._fatal_error(exc, "TLS error on write")
            return
        if not self._corked and not self._drain_scheduled:
            # A response is often several writes in one step of a task (uvicorn: its head,
            # then its body): what they encrypted goes to TCP in one write, one send().
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        if not self._corked:
            self._process_outgoing()

    def _write_appdata_many(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        corked, self._corked = self._corked, True
        try:
            for data in list_of_data:
                if data:
                    self._write_appdata(data)
        finally:
            self._corked = corked
        if not corked:
            self._process_outgoing()

    # -- flow control

    def _control_app_writing(self) -> None:
        """Mirror the TCP transport's pause state to the app (once it is connected)."""
        paused = self._tcp_writing_paused
        if paused is self._app_writing_paused or self._app_state not in _APP_CONNECTED:
            return
        self._app_writing_paused = paused
        try:
            if paused:
                self._app_protocol.pause_writing()
            else:
                self._app_protocol.resume_writing()
        except Exception as exc:
            self._loop.call_exception_handler(
                {
                    "message": f"protocol.{'pause' if paused else 'resume'}_writing() failed",
                    "exception": exc,
                    "transport": self._app_transport,
                    "protocol": self._app_protocol,
                }
            )

    def _pause_reading(self) -> None:
        if self._app_reading_paused:
            return
        self._app_reading_paused = True
        if self._state is TLSState.WRAPPED:
            self._pause_tcp_reading()

    def _resume_reading(self) -> None:
        if not self._app_reading_paused:
            return
        self._app_reading_paused = False
        if self._state is TLSState.WRAPPED:
            if not self._peer_eof:
                self._resume_tcp_reading()
            self._loop.call_soon(self._resume_read)  # what the incoming BIO still holds

    def _resume_read(self) -> None:
        if self._state is not TLSState.WRAPPED or self._app_reading_paused:
            return
        self._corked = True
        try:
            self._do_read()
            if self._peer_eof and self._state is TLSState.WRAPPED and not self._app_reading_paused:
                self._on_peer_eof()
        finally:
            self._corked = False
        self._process_outgoing()

    def _pause_tcp_reading(self) -> None:
        if not self._tcp_reading_paused and not self._tcp_closing and self._transport:
            self._tcp_reading_paused = True
            self._transport.pause_reading()

    def _resume_tcp_reading(self) -> None:
        if self._tcp_reading_paused and not self._tcp_closing and self._transport:
            self._tcp_reading_paused = False
            self._transport.resume_reading()


class HandshakeGate:
    """Counts a server's connections still in the TLS handshake, against a cap."""

    __slots__ = ("active", "limit", "refused")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"max_handshakes must be at least 1, got {limit}")
        self.limit = limit
        self.active = 0
        self.refused = 0


def server_protocol_factory(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    ssl_context: SSL.Context,
    *,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    on_connection: Callable[[Any], None] | None = None,
    max_handshakes: int | None = None,
) -> Callable[[], TLSServerProtocol]:
    """Wrap ``protocol_factory`` for ``loop.create_server``: each connection gets TLS.

    The returned factory makes one :class:`TLSServerProtocol` per accepted connection around
    ``protocol_factory()``. ``on_connection(transport)`` is called when TCP connects, before
    the handshake (see :class:`TLSServerProtocol`), e.g. for an aiohttp site::

        transports: weakref.WeakSet[TLSTransport] = weakref.WeakSet()
        factory = server_protocol_factory(runner.server, ctx, on_connection=transports.add)
        server = await loop.create_server(factory, host, port)
        ...  # on stop: abort what the app cannot see yet
        for t in list(transports):
            if t.tls_state is TLSState.DO_HANDSHAKE:
                t.abort()

    ``max_handshakes`` caps the connections of this factory that may be in the handshake at
    once; more are aborted on arrival (a slowloris flood costs a refused connection each, not
    an SSL object each). ``None``: no cap, like asyncio's own servers.

    Raises :exc:`TypeError` if ``ssl_context`` is not an ``OpenSSL.SSL.Context`` and
    :exc:`ValueError` for a timeout that is not positive.
    """
    context = _check_context(ssl_context)
    gate = HandshakeGate(max_handshakes) if max_handshakes is not None else None
    handshake_timeout = _check_timeout("handshake_timeout", handshake_timeout)
    shutdown_timeout = _check_timeout("shutdown_timeout", shutdown_timeout)

    def factory() -> TLSServerProtocol:
        return TLSServerProtocol(
            protocol_factory(),
            context,
            handshake_timeout=handshake_timeout,
            shutdown_timeout=shutdown_timeout,
            on_connection=on_connection,
            handshake_gate=gate,
        )

    return factory


TransportKind = Literal["memory", "socket"]
TRANSPORTS: Final[tuple[TransportKind, ...]] = ("memory", "socket")
DEFAULT_TRANSPORT: Final[TransportKind] = "socket"
"""What :func:`create_server`, :func:`start_server` and :class:`staple.aiohttp.StaplingSite`
use unless told: OpenSSL on the socket, the cheaper per connection (see the module docstring)."""


def _check_transport(transport: str) -> TransportKind:
    if transport == "memory":
        return "memory"
    if transport == "socket":
        return "socket"
    raise ValueError(f"transport must be 'memory' or 'socket', got {transport!r}")


async def create_server(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    host: str | Sequence[str] | None = None,
    port: int | None = None,
    *,
    ssl_context: SSL.Context,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    max_handshakes: int | None = None,
    transport: TransportKind = DEFAULT_TRANSPORT,
    on_connection: Callable[[Any], None] | None = None,
    **kwargs: Any,
) -> asyncio.Server:
    """Like ``loop.create_server(protocol_factory, host, port, ssl=...)``, TLS by pyOpenSSL.

    Other keyword arguments (``backlog``, ``reuse_address``, ``sock``, ``start_serving``...)
    go to ``loop.create_server``. A handshake slower than ``handshake_timeout`` seconds is
    aborted; ``close()`` waits at most ``shutdown_timeout`` seconds for the peer's close_notify.

    ``transport="socket"`` (the default) lets OpenSSL read and write each accepted socket
    itself (:mod:`staple.tls_socket`), which costs less per handshake; it takes ``sock``,
    ``family``, ``flags``, ``backlog``, ``reuse_address``, ``reuse_port`` and ``start_serving``
    of ``loop.create_server``'s keywords. ``transport="memory"`` runs TLS on memory BIOs under
    asyncio's own TCP transport (:class:`TLSServerProtocol`) and passes every other keyword to
    ``loop.create_server``. ``on_connection`` is called with
    each connection's transport before its handshake (see :func:`server_protocol_factory`).
    """
    if "ssl" in kwargs:
        raise TypeError("staple.tls.create_server takes ssl_context=, an OpenSSL.SSL.Context")
    if _check_transport(transport) == "socket":
        from . import tls_socket

        return await tls_socket.create_server(
            protocol_factory,
            host,
            port,
            ssl_context=ssl_context,
            handshake_timeout=handshake_timeout,
            shutdown_timeout=shutdown_timeout,
            on_connection=on_connection,
            max_handshakes=max_handshakes,
            **kwargs,
        )
    factory = server_protocol_factory(
        protocol_factory,
        ssl_context,
        handshake_timeout=handshake_timeout,
        shutdown_timeout=shutdown_timeout,
        on_connection=on_connection,
        max_handshakes=max_handshakes,
    )
    loop: Any = asyncio.get_running_loop()  # kwargs pass through: skip the overloads
    server: asyncio.Server = await loop.create_server(factory, host, port, **kwargs)
    return server


async def start_server(
    client_connected_cb: Callable[
        [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None
    ],
    host: str | Sequence[str] | None = None,
    port: int | None = None,
    *,
    ssl_context: SSL.Context,
    limit: int = 2**16,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    max_handshakes: int | None = None,
    transport: TransportKind = DEFAULT_TRANSPORT,
    **kwargs: Any,
) -> asyncio.Server:
    """Like ``asyncio.start_server(..., ssl=...)``, TLS by pyOpenSSL.

    ``client_connected_cb(reader, writer)`` runs once the handshake has completed;
    ``writer.get_extra_info`` reaches the TLS transport (``ssl_object``...).
    ``writer.start_tls`` is not supported. ``transport`` as for :func:`create_server`.
    """
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.StreamReaderProtocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)

    return await create_server(
        factory,
        host,
        port,
        ssl_context=ssl_context,
        handshake_timeout=handshake_timeout,
        shutdown_timeout=shutdown_timeout,
        max_handshakes=max_handshakes,
        transport=transport,
        **kwargs,
    )
