"""Server-side TLS for asyncio with pyOpenSSL on the socket itself (a socket BIO).

The other transport of :mod:`staple.tls` (``create_server(..., transport="socket")``). Here
OpenSSL reads and writes the non-blocking socket directly (``SSL.Connection(ctx, sock)``); the
event loop is only asked when the socket is readable or writable (``loop.add_reader`` /
``loop.add_writer``, which asyncio's loops and uvloop both have for any file descriptor). No
asyncio TCP transport, no TCP protocol, no memory BIOs: a handshake is the kernel's bytes going
straight into OpenSSL and OpenSSL's flight straight out, one ``send`` per flight.

Theory of operation
-------------------
* **Accept.** :class:`SocketTLSServer` (an :class:`asyncio.Server`) listens on its sockets and
  accepts them itself, from a reader callback on each listening socket, as asyncio's selector
  loop does (up to ``backlog`` connections a wake-up, ``TCP_NODELAY`` on each). asyncio never
  wraps the accepted socket in a transport of its own.
* **Handshake.** Each accepted socket gets one :class:`SocketTLSTransport`, which tries the
  handshake at once (the ClientHello has usually arrived with the connection) and then on every
  readiness OpenSSL asks for (``WantReadError``: readable; ``WantWriteError``: writable).
  Handshake timeout, ``max_handshakes``, ``on_connection`` and the two lifecycles
  (:class:`~staple.tls.TLSState`, :class:`~staple.tls.AppState`, changed only in
  ``_set_state``) are those of the memory-BIO transport. The handshake and shutdown timeouts
  are one timer per server, not one per connection (:class:`_Deadlines`).
* **Data.** Readable: records are decrypted 16 KiB at a time until OpenSSL wants more, then
  handed to the application in one call (``recv_into`` its buffers for a
  ``BufferedProtocol``). ``write`` encrypts and sends at once (with ``coalesce_writes``, writes
  smaller than a record wait for the end of the loop's step, so that a response written in
  pieces, as uvicorn writes its head and then its body, leaves in one record and one
  ``send()``); what the socket does not take waits, as plaintext, in a queue that is the write
  buffer flow control counts (asyncio's default limits). OpenSSL may need to write while
  reading (a TLS 1.3 KeyUpdate answer) or read while writing: each direction remembers what
  the other one waits for.
* **Close.** ``close()`` sends the queued data, then close_notify, then waits (bounded by
  ``shutdown_timeout``) for the peer's close_notify or EOF, then closes the socket;
  ``abort()`` closes it at once. ``connection_lost`` follows from the loop, once.

Renegotiation is refused (``OP_NO_RENEGOTIATION``) and the connection closed: OpenSSL writes its
no_renegotiation alert straight to the socket, so it is seen through an info callback that is
installed only on TLS 1.2 connections, once their handshake has completed (no cost during the
handshake, none at all in TLS 1.3).

Where this transport cannot be used, the memory-BIO one remains: a transport that is not a
socket (``loop.connect_accepted_socket``'s sockets are fine, but pipes, ``start_tls`` on an
existing transport, or anything an asyncio transport wraps already), and servers that hand the
loop a protocol factory, such as uvicorn's (``staple.uvicorn`` subclasses the TLS protocol).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import socket
import sys
import time
import warnings
from asyncio import constants as _asyncio_constants
from asyncio import transports as _asyncio_transports
from asyncio import trsock as _asyncio_trsock
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from cryptography import x509
from OpenSSL import SSL

from . import tls as _tls
from .errors import StapleRefused
from .tls import (
    _APP_TRANSITIONS,
    _OP_NO_RENEGOTIATION,
    _RECORD,
    _TLS_TRANSITIONS,
    AppState,
    HandshakeGate,
    TLSState,
)

__all__ = ["SocketTLSServer", "SocketTLSTransport", "create_server"]

logger = logging.getLogger("staple.tls")

_LOG_THRESHOLD_FOR_CONNLOST_WRITES: Final = _asyncio_constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES
_ACCEPT_RETRY_DELAY: Final = _asyncio_constants.ACCEPT_RETRY_DELAY
# Out of file descriptors or memory: stop accepting for a moment, as asyncio does.
_ACCEPT_RESOURCE_ERRORS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
)
# OpenSSL's info callback: a fatal or warning alert written; no_renegotiation is alert 100.
_SSL_CB_WRITE_ALERT: Final = 0x4008
_NO_RENEGOTIATION_ALERT: Final = (1 << 8) | 100  # warning level, no_renegotiation


# asyncio.Server counts its connections; from 3.13 on it also wants to know which.
_SERVER_WANTS_TRANSPORT: Final = sys.version_info >= (3, 13)


# OP_IGNORE_UNEXPECTED_EOF: a TCP EOF without close_notify reads as one (ZeroReturnError).
# Otherwise OpenSSL, reading the EOF itself, fails the connection with a decode_error alert,
# and a half-closed peer could not be answered any more. (The memory-BIO transport sees EOF
# in TCP and never shows it to OpenSSL.)
_OPTIONS: Final[int] = _OP_NO_RENEGOTIATION | SSL.OP_IGNORE_UNEXPECTED_EOF

# OpenSSL sends each 16 KiB record with its own send(): a write of several records is corked
# (Linux) so that it leaves as one. Measured on 50 MB downloads, server CPU per MB: 1.09x the
# memory-BIO transport's uncorked, 1.04x corked.
_CORK: Final[int] = getattr(socket, "TCP_CORK", 0)

# With coalesce_writes, writes smaller than this wait (call_soon) for the others of the same loop
# step, and a step's writes of up to _JOIN bytes in all leave in one SSL_write (one record if
# they fit in one). It costs a callback per response, which an app that writes a response at
# once (aiohttp) pays for nothing: hence not the default.
_COALESCE: Final = _RECORD
_JOIN: Final = 64 * 1024

# The transition tables for lookups that hash no Enum (Enum.__hash__ is Python code): keyed by
# the states' values (distinct across both enums), the moves as tuples (compared by identity).
_NEXT: Final[dict[str, tuple[TLSState | AppState, ...]]] = {
    **{state._value_: tuple(moves) for state, moves in _TLS_TRANSITIONS.items()},
    **{state._value_: tuple(moves) for state, moves in _APP_TRANSITIONS.items()},
}

# At most this much plaintext is read for the application in one readiness callback.
_READ_CAP: Final = 256 * 1024
_READ_CAP_RECORDS: Final = _READ_CAP // _RECORD


def _is_eof(exc: SSL.SysCallError) -> bool:
    """pyOpenSSL's "Unexpected EOF": TCP ended without a close_notify."""
    return bool(exc.args) and exc.args[0] == -1


def _os_error(exc: SSL.SysCallError) -> BaseException:
    """The socket's own error (``ConnectionResetError``...), as asyncio's transports report it."""
    code = exc.args[0] if exc.args else None
    if isinstance(code, int) and code > 0:
        return OSError(code, os.strerror(code))
    return exc


class _Deadlines:
    """Connections that must leave a state within ``timeout`` seconds: one timer for all.

    A ``call_later`` per connection costs a timer handle, a heap push and a cancel each time
    (on asyncio's loop the heap compares handles in Python, a dozen times a connection with
    the timers of many connections waiting in it). Here a connection is one dictionary entry,
    added and removed in C. Every entry gets the same timeout, so insertion order is deadline
    order: one timer, armed for the oldest entry, ends the connections past their deadline
    and re-arms for the next one - as exact as a timer per connection.
    """

    __slots__ = ("_expire", "_loop", "_timer", "pending", "timeout")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
        expire: Callable[[SocketTLSTransport], None],
    ) -> None:
        self._loop = loop
        self.timeout = timeout
        self._expire = expire
        self.pending: dict[SocketTLSTransport, float] = {}  # deadline, time.monotonic()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, transport: SocketTLSTransport) -> None:
        self.pending[transport] = _monotonic() + self.timeout
        if self._timer is None:
            self._timer = self._loop.call_later(self.timeout, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        pending = self.pending
        now = _monotonic()
        expired: list[SocketTLSTransport] = []
        for transport, deadline in pending.items():
            if deadline > now:
                self._timer = self._loop.call_later(deadline - now, self._sweep)
                break
            expired.append(transport)
        for transport in expired:
            del pending[transport]
        for transport in expired:
            try:
                self._expire(transport)
            except Exception as exc:  # one failure must not spare the others
                self._loop.call_exception_handler(
                    {"message": "TLS timeout handling failed", "exception": exc}
                )


class _Timeouts:
    """The handshake and shutdown deadlines of a server's connections (or of one)."""

    __slots__ = ("handshake", "shutdown")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, handshake_timeout: float, shutdown_timeout: float
    ) -> None:
        self.handshake = _Deadlines(
            loop, handshake_timeout, SocketTLSTransport._check_handshake_timeout
        )
        self.shutdown = _Deadlines(
            loop, shutdown_timeout, SocketTLSTransport._check_shutdown_timeout
        )


_monotonic: Final = time.monotonic
_IPPROTO_TCP: Final = socket.IPPROTO_TCP
_TCP_NODELAY: Final = socket.TCP_NODELAY


class SocketTLSTransport(_asyncio_transports._FlowControlMixin, asyncio.Transport):
    """One TLS connection on its own socket: a complete :class:`asyncio.Transport`.

    The application protocol is connected once the handshake has completed; before that only
    ``on_connection`` sees the transport. ``get_extra_info`` knows what
    :class:`~staple.tls.TLSTransport`'s does, and ``socket``, ``peername`` and ``sockname``.
    ``can_write_eof()`` is ``False``: TLS has no half-close.
    """

    # asyncio's loop.sendfile() streams files through write() with flow control.
    _sendfile_compatible = _asyncio_constants._SendfileMode.FALLBACK
    _start_tls_compatible = False
    # _FlowControlMixin's, which typeshed does not declare.
    _loop: asyncio.AbstractEventLoop
    _protocol_paused: bool
    _high_water: int
    _low_water: int
    _maybe_pause_protocol: Callable[[], None]
    _maybe_resume_protocol: Callable[[], None]

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        ssl_context: SSL.Context,
        app_protocol: asyncio.BaseProtocol,
        *,
        handshake_timeout: float = _tls.DEFAULT_HANDSHAKE_TIMEOUT,
        shutdown_timeout: float = _tls.DEFAULT_SHUTDOWN_TIMEOUT,
        on_connection: Callable[[Any], None] | None = None,
        handshake_gate: HandshakeGate | None = None,
        server: SocketTLSServer | None = None,
        timeouts: _Timeouts | None = None,
        coalesce_writes: bool = False,
    ) -> None:
        super().__init__(None, loop)  # asyncio's default write buffer limits
        self._sock: socket.socket | None = sock
        self._fd = sock.fileno()
        self._server = server
        self._gate = handshake_gate
        # A server's connections share its timers; a transport made on its own has its own.
        self._timeouts = (
            timeouts
            if timeouts is not None
            else _Timeouts(loop, handshake_timeout, shutdown_timeout)
        )

        ssl = SSL.Connection(ssl_context, sock)
        ssl.set_accept_state()
        ssl.set_options(_OPTIONS)
        self._ssl = ssl
        _tls._live[id(ssl)] = self

        self._protocol: Any = app_protocol
        self._app_is_buffered = isinstance(app_protocol, asyncio.BufferedProtocol)
        self._state = TLSState.UNWRAPPED
        self._app_state = AppState.INIT
        self._closed = False  # close() or abort() called, or the connection ended
        self._released = False
        self._close_callbacks: list[Callable[[], None]] | None = None
        self._status_requested = False  # the client asked for a staple (note_status_request)
        self._close_exc: BaseException | None = None
        self._conn_lost_writes = 0
        self._renegotiation_alert = False

        # Readiness: what the socket is watched for, and who waits for what.
        self._reading = False  # add_reader is on
        self._writing = False  # add_writer is on
        self._app_reading_paused = False
        self._read_wants_write = False  # SSL_read said WANT_WRITE: retry it when writable
        self._write_wants_read = False  # SSL_write said WANT_READ: retry it when readable
        self._close_notify_sent = False
        self._write_queue: collections.deque[bytes] = collections.deque()
        self._write_offset = 0  # into _write_queue[0]
        self._write_size = 0  # plaintext bytes queued
        self._coalesce = _COALESCE if coalesce_writes else 0  # writes below this wait a step
        self._lost_scheduled = False  # connection_lost is on its way
        self._transport_socket: _asyncio_trsock.TransportSocket | None = None

        if server is not None:
            if _SERVER_WANTS_TRANSPORT:
                server._attach(self)
            else:
                server._attach()
        gate = handshake_gate
        if gate is not None and gate.active >= gate.limit:
            # Too many handshakes in progress (slowloris): refuse at once, before the handshake
            # costs anything, rather than let memory grow.
            gate.refused += 1
            if gate.refused == 1 or gate.refused % 1000 == 0:
                logger.warning(
                    "refusing connections: %d TLS handshakes in progress (max_handshakes); "
                    "%d refused so far",
                    gate.active,
                    gate.refused,
                )
            self.abort()
            return
        if on_connection is not None:
            try:
                on_connection(self)
            except Exception as exc:
                self._fatal_error(exc, "on_connection callback failed")
                return
        if self._state is TLSState.UNWRAPPED:  # on_connection may have aborted it
            self._start_handshake()

    def __repr__(self) -> str:
        return (
            f"<SocketTLSTransport fd={self._fd} {self._state.value} "
            f"app={self._app_state.value} closing={self._closed}>"
        )

    def __del__(self, _warnings: Any = warnings) -> None:
        if self._sock is not None:
            _warnings.warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            self._sock.close()

    @property
    def tls_state(self) -> TLSState:
        """The TLS layer's state (e.g. ``DO_HANDSHAKE`` for connections still handshaking)."""
        return self._state

    @property
    def app_state(self) -> AppState:
        """The application protocol's state (``INIT`` until the handshake has completed)."""
        return self._app_state

    # -- state

    def _set_state(self, new_state: TLSState | AppState) -> None:
        """The one place either lifecycle changes; refuses moves not in the transition tables."""
        is_tls = type(new_state) is TLSState
        old: TLSState | AppState = self._state if is_tls else self._app_state
        if new_state not in _NEXT[old._value_]:
            raise RuntimeError(f"cannot switch state from {old} to {new_state}")
        if is_tls:
            # The handshake and shutdown deadlines and the handshake gate follow the state.
            gate = self._gate
            if new_state is TLSState.DO_HANDSHAKE:
                self._timeouts.handshake.add(self)
                if gate is not None:
                    gate.active += 1
            elif old is TLSState.DO_HANDSHAKE:
                self._timeouts.handshake.pending.pop(self, None)  # unless the sweep took it
                if gate is not None:
                    gate.active -= 1
            elif old is TLSState.SHUTDOWN:
                self._timeouts.shutdown.pending.pop(self, None)
            if new_state is TLSState.SHUTDOWN:
                self._timeouts.shutdown.add(self)
            self._state = new_state  # type: ignore[assignment]
            if new_state is TLSState.SHUTDOWN or new_state is TLSState.CLOSED:
                self._release()
        else:
            self._app_state = new_state  # type: ignore[assignment]

    def _app_connected(self) -> bool:
        app_state = self._app_state  # compared by identity: a set would hash the Enum
        return app_state is AppState.CON_MADE or app_state is AppState.EOF

    def _release(self) -> None:
        """The connection is ending: run the call_when_closed callbacks."""
        self._closed = True
        if self._released:
            return
        self._released = True
        _tls._live.pop(id(self._ssl), None)
        callbacks, self._close_callbacks = self._close_callbacks, None
        for callback in callbacks or ():
            try:
                callback()
            except Exception:
                logger.exception("call_when_closed callback %r failed", callback)

    # -- readiness

    def _want_read(self, on: bool) -> None:
        if on is not self._reading and self._sock is not None:
            self._reading = on
            if on:
                self._loop.add_reader(self._fd, self._on_readable)
            else:
                self._loop.remove_reader(self._fd)

    def _want_write(self, on: bool) -> None:
        if on is not self._writing and self._sock is not None:
            self._writing = on
            if on:
                self._loop.add_writer(self._fd, self._on_writable)
            else:
                self._loop.remove_writer(self._fd)

    def _on_readable(self) -> None:
        state = self._state
        if state is TLSState.WRAPPED:
            if self._write_wants_read:
                self._write_wants_read = False
                self._flush()
                if self._state is not TLSState.WRAPPED:
                    return
            if self._read_wants_write:
                return  # waiting for writable first
            if self._app_reading_paused:
                self._want_read(self._write_wants_read)
                return
            self._do_read()
        elif state is TLSState.DO_HANDSHAKE:
            self._do_handshake()
        elif state is TLSState.SHUTDOWN:
            self._do_shutdown()

    def _on_writable(self) -> None:
        state = self._state
        if state is TLSState.WRAPPED:
            if self._read_wants_write:
                self._read_wants_write = False
                self._do_read()
                if self._state is not TLSState.WRAPPED:
                    return
            self._flush()
        elif state is TLSState.DO_HANDSHAKE:
            self._do_handshake()
        elif state is TLSState.SHUTDOWN:
            self._flush()  # then close_notify (again, if the socket was full)

    def _update_interest(self) -> None:
        """Watch the socket for what is waited for, in WRAPPED and SHUTDOWN."""
        if self._state is TLSState.SHUTDOWN:
            read = self._close_notify_sent
            write = bool(self._write_queue) or not read
        else:
            read = self._write_wants_read or not (
                self._app_reading_paused or self._read_wants_write
            )
            write = self._read_wants_write or bool(self._write_queue)
        if read is not self._reading:
            self._want_read(read)
        if write is not self._writing:
            self._want_write(write)

    # -- handshake

    def _start_handshake(self) -> None:
        self._set_state(TLSState.DO_HANDSHAKE)  # the handshake deadline starts
        self._do_handshake()  # the ClientHello has usually arrived already

    def _check_handshake_timeout(self) -> None:
        if self._state is TLSState.DO_HANDSHAKE:
            self._fatal_error(
                ConnectionAbortedError(
                    "TLS handshake is taking longer than "
                    f"{self._timeouts.handshake.timeout} seconds: "
                    "aborting the connection"
                ),
            )

    def _do_handshake(self) -> None:
        try:
            self._ssl.do_handshake()
        except SSL.WantReadError:
            if self._writing:
                self._want_write(False)
            if not self._reading:
                self._want_read(True)
            return
        except SSL.WantWriteError:
            if self._reading:
                self._want_read(False)
            if not self._writing:
                self._want_write(True)
            return
        except SSL.ZeroReturnError:  # EOF (OP_IGNORE_UNEXPECTED_EOF)
            self._fatal_error(
                ConnectionResetError("the peer closed the connection during the TLS handshake"),
                "TLS handshake failed",
            )
            return
        except SSL.SysCallError as exc:
            self._fatal_error(_os_error(exc), "TLS handshake failed")
            return
        except Exception as exc:
            # SSL.Error: the peer's fault. Anything else: a context callback (SNI, ALPN, OCSP)
            # raised, and pyOpenSSL re-raises it here.
            self._fatal_error(exc, "TLS handshake failed")
            return
        self._on_handshake_complete()

    def _on_handshake_complete(self) -> None:
        self._set_state(TLSState.WRAPPED)
        _tls._handshake_counted(self._ssl, self._status_requested)
        if _OP_NO_RENEGOTIATION and self._ssl.get_protocol_version() < SSL.TLS1_3_VERSION:
            self._ssl.set_info_callback(self._on_info)
        self._set_state(AppState.CON_MADE)
        try:
            self._protocol.connection_made(self)
        except Exception as exc:
            self._fatal_error(exc, "application protocol connection_made() failed")
            return
        if self._state is not TLSState.WRAPPED:  # the app closed it already
            return
        self._update_interest()
        if not self._app_reading_paused:
            self._do_read()  # application data that came with the client's Finished

    def _on_info(self, conn: SSL.Connection, where: int, ret: int) -> None:
        # TLS 1.2 only, after the handshake: OpenSSL refused a renegotiation (see module doc).
        if where == _SSL_CB_WRITE_ALERT and ret == _NO_RENEGOTIATION_ALERT:
            self._renegotiation_alert = True

    # -- incoming data

    def _do_read(self) -> None:
        """Decrypt what the socket holds and hand it to the app (state WRAPPED)."""
        if self._app_reading_paused:
            return
        try:
            eof = self._read_buffered() if self._app_is_buffered else self._read_copied()
        except SSL.WantWriteError:
            self._read_wants_write = True
            self._update_interest()
            return
        except SSL.SysCallError as exc:
            if not _is_eof(exc):
                self._fatal_error(_os_error(exc), "TLS error on read")
                return
            if self._state is TLSState.WRAPPED:
                self._on_peer_eof()
            return
        except SSL.Error as exc:
            self._fatal_error(exc, "TLS error on read")
            return
        except Exception as exc:
            self._fatal_error(exc, "application protocol failed to receive data")
            return
        if self._renegotiation_alert:
            self._fatal_error(
                SSL.Error("the peer attempted TLS renegotiation, which is refused"),
                "TLS renegotiation refused",
            )
            return
        if eof and self._state is TLSState.WRAPPED:
            self._call_eof_received()
            self._start_shutdown()

    def _read_copied(self) -> bool:
        """Read records until OpenSSL wants more, or _READ_CAP; one data_received().

        True at close_notify. A peer sending faster than we read would otherwise keep us
        here; the socket stays readable for the rest (OpenSSL holds no more than the record it
        is reading, and ``recv`` takes whole records).
        """
        recv = self._ssl.recv
        chunks: list[bytes] = []
        eof = False
        try:
            for _ in range(_READ_CAP_RECORDS):
                chunks.append(recv(_RECORD))
        except SSL.WantReadError:
            pass
        except SSL.ZeroReturnError:
            eof = True
        except (SSL.WantWriteError, SSL.SysCallError):
            if chunks:
                self._deliver(chunks)
            raise
        if chunks:
            self._deliver(chunks)
        return eof

    def _deliver(self, chunks: list[bytes]) -> None:
        self._protocol.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _read_buffered(self) -> bool:
        """Fill the app's buffers; stop if it pauses reading. True at close_notify."""
        recv_into = self._ssl.recv_into
        protocol = self._protocol
        ssl = self._ssl
        total = 0
        while True:
            if total >= _READ_CAP and not ssl.pending():
                return False  # more on the next readiness (see _read_copied)
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
            except (SSL.WantWriteError, SSL.SysCallError):
                if offset:
                    protocol.buffer_updated(offset)
                raise
            protocol.buffer_updated(offset)  # buffer full: ask for another one
            total += offset
            if self._app_reading_paused or self._state is not TLSState.WRAPPED:
                return False

    def _call_eof_received(self) -> None:
        if self._app_state is not AppState.CON_MADE:
            return
        self._set_state(AppState.EOF)
        eof_received = getattr(self._protocol, "eof_received", None)  # BaseProtocol has none
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
        self._call_eof_received()  # the app may close() here: its close_notify goes out then
        if self._state is TLSState.WRAPPED:
            if self._write_queue:  # TCP is half-closed: what the app wrote still goes out
                self._start_shutdown()
                return
            self._set_state(TLSState.CLOSED)
            self._close_socket()

    # -- outgoing data

    def _send_view(self, view: memoryview) -> int:
        """Encrypt and send from ``view`` until done or the socket is full; bytes taken."""
        send = self._ssl.send
        size = len(view)
        sent = 0
        try:
            while sent < size:
                sent += send(view[sent:])
        except SSL.WantWriteError:
            pass
        except SSL.WantReadError:
            self._write_wants_read = True
        return sent

    def _flush(self) -> None:
        """Send what the queue holds, as far as the socket takes it."""
        queue = self._write_queue
        try:
            while queue and not self._write_wants_read:
                head = queue[0]
                offset = self._write_offset
                sent = self._send_view(memoryview(head)[offset:])
                self._write_size -= sent
                if offset + sent < len(head):
                    self._write_offset = offset + sent
                    break
                queue.popleft()
                self._write_offset = 0
        except SSL.SysCallError as exc:
            self._fatal_error(_os_error(exc), "TLS error on write")
            return
        except SSL.Error as exc:
            self._fatal_error(exc, "TLS error on write")
            return
        if self._state is TLSState.CLOSED:
            return
        self._maybe_resume_protocol()
        if self._state is TLSState.SHUTDOWN and not queue and not self._close_notify_sent:
            self._do_shutdown()
            return
        self._update_interest()

    def _flush_step(self) -> None:
        """The end of the step that wrote small pieces: send them (and what followed them in
        the same step, up to _JOIN) as one record."""
        queue = self._write_queue
        state = self._state
        if state is TLSState.SHUTDOWN:
            if self._close_notify_sent:
                return
        elif state is not TLSState.WRAPPED:
            return
        if len(queue) > 1 and not self._write_offset and self._write_size <= _JOIN:
            joined = b"".join(queue)
            queue.clear()
            queue.append(joined)
        if queue:
            self._flush()

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        if self._state is not TLSState.WRAPPED:
            if self._state is TLSState.UNWRAPPED or self._state is TLSState.DO_HANDSHAKE:
                raise RuntimeError("cannot write before the TLS handshake has completed")
            if self._conn_lost_writes >= _LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                logger.warning("TLS connection is closed: write() ignored")
            self._conn_lost_writes += 1
            return
        if self._write_queue:
            self._write_queue.append(bytes(data))
            self._write_size += len(data)
            self._maybe_pause_protocol()
            return
        coalesce = self._coalesce
        if len(data) < coalesce and (type(data) is bytes or memoryview(data).nbytes < coalesce):
            self._write_queue.append(bytes(data))
            self._write_size += len(data)
            self._loop.call_soon(self._flush_step)
            return
        view = memoryview(data).cast("B")
        sock = self._sock
        corked = bool(_CORK) and len(view) > _RECORD and sock is not None
        if corked and sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, _CORK, 1)
        try:
            sent = self._send_view(view)
        except SSL.SysCallError as exc:
            self._fatal_error(_os_error(exc), "TLS error on write")
            return
        except SSL.Error as exc:
            self._fatal_error(exc, "TLS error on write")
            return
        finally:
            if corked and sock is not None and sock.fileno() != -1:
                sock.setsockopt(socket.IPPROTO_TCP, _CORK, 0)
        if sent < len(view):
            # The socket is full. OpenSSL holds the record it could not send whole and wants
            # the same bytes again (moving buffers are allowed): queue them from there.
            rest = bytes(view[sent:]) if sent or type(data) is not bytes else data
            self._write_queue.append(bytes(rest))
            self._write_size += len(rest)
            self._update_interest()
            self._maybe_pause_protocol()

    # -- BaseTransport

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            if self._sock is None:
                return default
            if self._transport_socket is None:
                self._transport_socket = _asyncio_trsock.TransportSocket(self._sock)
            return self._transport_socket
        ssl = self._ssl
        if name == "sslcontext":
            return ssl.get_context()
        if name == "ssl_object":
            return ssl
        if name in ("peercert", "cipher", "compression"):
            if self._state is not TLSState.WRAPPED and self._state is not TLSState.SHUTDOWN:
                return default
            if name == "peercert":
                cert: x509.Certificate | None = ssl.get_peer_certificate(as_cryptography=True)
                return cert
            if name == "cipher":
                return (ssl.get_cipher_name(), ssl.get_cipher_version(), ssl.get_cipher_bits())
            return None  # compression: OpenSSL 3 has none
        sock = self._sock
        if sock is None:
            return default
        try:
            if name == "peername":
                return sock.getpeername()
            if name == "sockname":
                return sock.getsockname()
        except OSError:
            return default
        return default

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Send what is queued and close_notify, then close once the peer answers (bounded).

        Idempotent. No more data is delivered. During the handshake this is :meth:`abort`.
        """
        if not self._closed:
            self._closed = True
            self._start_shutdown()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._app_is_buffered = isinstance(protocol, asyncio.BufferedProtocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        protocol: asyncio.BaseProtocol = self._protocol
        return protocol

    # -- ReadTransport

    def is_reading(self) -> bool:
        return not self._closed and not self._app_reading_paused

    def pause_reading(self) -> None:
        if self._app_reading_paused:
            return
        self._app_reading_paused = True
        if self._state is TLSState.WRAPPED:
            self._update_interest()

    def resume_reading(self) -> None:
        if not self._app_reading_paused:
            return
        self._app_reading_paused = False
        if self._state is TLSState.WRAPPED:
            self._update_interest()
            self._loop.call_soon(self._resume_read)  # what OpenSSL holds already

    def _resume_read(self) -> None:
        if (
            self._state is TLSState.WRAPPED
            and not self._app_reading_paused
            and not self._read_wants_write
        ):
            self._do_read()

    # -- WriteTransport

    def get_write_buffer_size(self) -> int:
        return self._write_size

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` and send it; what the socket does not take is queued."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data: expecting a bytes-like instance, got {type(data).__name__}")
        if data:
            self._write(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        data = b"".join(list_of_data)
        if data:
            self._write(data)

    def write_eof(self) -> None:
        raise NotImplementedError("TLS transports cannot half-close: use close()")

    def can_write_eof(self) -> bool:
        return False

    def abort(self) -> None:
        """Close the socket at once, dropping queued data. ``connection_lost(None)`` follows."""
        self._closed = True
        if self._state is not TLSState.CLOSED:
            self._set_state(TLSState.CLOSED)
        self._close_socket()

    # -- shutdown

    def _start_shutdown(self) -> None:
        """close() from the app, or the peer's close_notify: send ours, await the peer's."""
        state = self._state
        if state is TLSState.SHUTDOWN or state is TLSState.CLOSED:
            return
        if state is not TLSState.WRAPPED:
            self.abort()  # no TLS session to close yet
            return
        self._set_state(TLSState.SHUTDOWN)  # the shutdown deadline starts
        if self._write_queue:
            # This step's writes, if they wait for _flush_step, go now; close_notify follows
            # the queue (_flush), at once or once the socket takes it.
            self._flush_step()
        else:
            self._do_shutdown()

    def _do_shutdown(self) -> None:
        ssl = self._ssl
        try:
            if not self._close_notify_sent:
                if ssl.shutdown():  # the peer's close_notify had arrived already
                    self._close_notify_sent = True
                    self._on_shutdown_complete()
                    return
                self._close_notify_sent = True
                if not ssl.pending():
                    # OpenSSL holds nothing of the peer's (it reads a record at a time, as
                    # needed): its close_notify, when it comes, makes the socket readable. Wait
                    # for that rather than read now, which almost always finds nothing.
                    self._update_interest()
                    return
            while True:  # discard application data until the peer's close_notify
                ssl.recv(_RECORD)
        except SSL.WantReadError:
            self._update_interest()
        except SSL.WantWriteError:
            self._update_interest()
        except SSL.ZeroReturnError:
            self._on_shutdown_complete()
        except SSL.SysCallError as exc:
            if _is_eof(exc) and self._close_notify_sent:
                self._on_shutdown_complete()
            else:
                self._fatal_error(_os_error(exc), "TLS error during shutdown")
        except SSL.Error as exc:
            self._fatal_error(exc, "TLS error during shutdown")

    def _check_shutdown_timeout(self) -> None:
        if self._sock is None:
            return
        logger.debug("%r: TLS shutdown timed out, aborting", self)
        if self._app_connected() and self._close_exc is None:
            self._close_exc = TimeoutError("TLS shutdown timed out")
        self.abort()

    def _on_shutdown_complete(self) -> None:
        if self._state is not TLSState.CLOSED:
            self._set_state(TLSState.CLOSED)
        self._close_socket()

    def _fatal_error(
        self,
        exc: BaseException,
        message: str = "Fatal error on TLS transport",
    ) -> None:
        """The one exit for errors: OpenSSL's alert is on the socket already; close it.

        The peer's misbehaviour (``SSL.Error``), network errors and a handshake the OCSP
        stapler refused by policy are logged at debug level; anything else is a bug in the
        application or a callback, and goes to the loop's exception handler.
        """
        if self._app_connected() and self._close_exc is None:
            self._close_exc = exc
        if self._state is not TLSState.CLOSED:
            self._set_state(TLSState.CLOSED)
        self._close_socket()
        if isinstance(exc, (SSL.Error, OSError, StapleRefused)):
            logger.debug("%r: %s: %r", self, message, exc)
        else:
            self._loop.call_exception_handler(
                {
                    "message": message,
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )

    def _close_socket(self) -> None:
        """Stop watching the socket; close it and call connection_lost from the loop, once."""
        self._closed = True
        if self._sock is None or self._lost_scheduled:
            return
        self._lost_scheduled = True
        self._want_read(False)
        self._want_write(False)
        self._write_queue.clear()
        self._write_size = 0
        self._loop.call_soon(self._call_connection_lost)

    def _call_connection_lost(self) -> None:
        sock, self._sock = self._sock, None
        protocol = self._protocol
        try:
            if self._app_connected():
                self._set_state(AppState.CON_LOST)
                close_exc, self._close_exc = self._close_exc, None
                self._protocol = None
                protocol.connection_lost(close_exc)
        finally:
            self._protocol = None
            if sock is not None:
                sock.close()
            server, self._server = self._server, None
            if server is not None:
                if _SERVER_WANTS_TRANSPORT:
                    server._detach(self)
                else:
                    server._detach()


class SocketTLSServer(asyncio.Server):
    """An :class:`asyncio.Server` whose connections are :class:`SocketTLSTransport`.

    It accepts connections itself (a reader on each listening socket) so that asyncio never
    wraps them; ``close()``, ``wait_closed()``, ``serve_forever()``, ``sockets`` and ``async
    with`` behave as asyncio's.
    """

    # asyncio.Server's own attributes, set by its __init__ (typeshed does not declare them).
    _loop: asyncio.AbstractEventLoop
    _sockets: list[socket.socket] | None
    _backlog: int
    _serving: bool
    _serving_forever_fut: asyncio.Future[None] | None
    _active_count: int
    _wakeup: Callable[[], None]
    _attach: Callable[..., None]
    _detach: Callable[..., None]

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: list[socket.socket],
        make_transport: Callable[[socket.socket], object],
        backlog: int,
        timeouts: _Timeouts | None = None,
    ) -> None:
        super().__init__(loop, sockets, None, None, backlog, None)  # type: ignore[arg-type]
        self._make_transport = make_transport
        self._listening = False
        self._timeouts = timeouts

    def handshaking(self) -> list[SocketTLSTransport]:
        """The connections still in the TLS handshake (no application protocol sees them)."""
        return [] if self._timeouts is None else list(self._timeouts.handshake.pending)

    def _start_serving(self) -> None:
        if self._serving:
            return
        self._serving = True
        for sock in self._sockets or ():
            if not self._listening:
                sock.listen(self._backlog)
            self._loop.add_reader(sock.fileno(), self._accept, sock, self._kind(sock))
        self._listening = True

    @staticmethod
    def _kind(sock: socket.socket) -> tuple[int, int, int]:
        # family and type as plain ints: socket.accept() converts them to enums (in Python)
        # for every connection; this is what it then passes to socket.socket().
        return int(sock.family), int(sock.type), sock.proto

    def close(self) -> None:
        sockets = self._sockets
        if sockets is None:
            return
        self._sockets = None
        for sock in sockets:
            if self._serving:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._serving = False
        future = self._serving_forever_fut
        if future is not None and not future.done():
            future.cancel()
            self._serving_forever_fut = None
        if self._active_count == 0:
            self._wakeup()

    def _accept(self, sock: socket.socket, kind: tuple[int, int, int] | None = None) -> None:
        # socket.accept() as the standard library writes it, less its per-connection Python:
        # the C accept, then the socket object around the new descriptor.
        accept = sock._accept  # type: ignore[attr-defined]
        family, type_, proto = kind if kind is not None else self._kind(sock)
        make_socket = socket.socket
        for _ in range(self._backlog):
            try:
                fd, _address = accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in _ACCEPT_RESOURCE_ERRORS:
                    raise
                self._loop.call_exception_handler(
                    {"message": "socket.accept() out of system resource", "exception": exc}
                )
                self._loop.remove_reader(sock.fileno())
                self._loop.call_later(_ACCEPT_RETRY_DELAY, self._resume_accepting, sock)
                return
            conn = make_socket(family, type_, proto, fileno=fd)
            conn.setblocking(False)
            try:  # noqa: SIM105 - contextlib.suppress costs three Python calls a connection
                conn.setsockopt(_IPPROTO_TCP, _TCP_NODELAY, 1)
            except OSError:
                pass
            self._make_transport(conn)

    def _resume_accepting(self, sock: socket.socket) -> None:
        if self._serving and self._sockets is not None and sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock, self._kind(sock))


async def _listening_sockets(
    host: str | Sequence[str] | None,
    port: int | None,
    *,
    family: int,
    flags: int,
    reuse_address: bool | None,
    reuse_port: bool | None,
) -> list[socket.socket]:
    """Bound sockets for ``host``/``port``, as ``loop.create_server`` makes them."""
    loop = asyncio.get_running_loop()
    hosts: list[str | None] = [host] if host is None or isinstance(host, str) else list(host)
    if "" in hosts:
        hosts = [None]
    if reuse_address is None:
        reuse_address = True
    infos: list[Any] = []
    for one in hosts:
        for info in await loop.getaddrinfo(
            one, port, family=family, type=socket.SOCK_STREAM, flags=flags | socket.AI_PASSIVE
        ):
            if info not in infos:
                infos.append(info)
    if not infos:
        raise OSError(f"getaddrinfo({host!r}) returned empty list")
    sockets: list[socket.socket] = []
    try:
        for af, socktype, proto, _canonname, sa in infos:
            sock = socket.socket(af, socktype, proto)
            sockets.append(sock)
            if reuse_address:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if af == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, True)
            try:
                sock.bind(sa)
            except OSError as err:
                raise OSError(
                    err.errno, f"error while attempting to bind on address {sa!r}: {err.strerror}"
                ) from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def create_server(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    host: str | Sequence[str] | None = None,
    port: int | None = None,
    *,
    ssl_context: SSL.Context,
    handshake_timeout: float = _tls.DEFAULT_HANDSHAKE_TIMEOUT,
    shutdown_timeout: float = _tls.DEFAULT_SHUTDOWN_TIMEOUT,
    on_connection: Callable[[Any], None] | None = None,
    max_handshakes: int | None = None,
    sock: socket.socket | None = None,
    family: int = socket.AF_UNSPEC,
    flags: int = socket.AI_PASSIVE,
    backlog: int = 100,
    reuse_address: bool | None = None,
    reuse_port: bool | None = None,
    start_serving: bool = True,
    coalesce_writes: bool = False,
) -> SocketTLSServer:
    """A server whose connections run TLS on their sockets (see the module docstring).

    Arguments as :func:`staple.tls.create_server` and ``loop.create_server`` (those that apply).
    ``coalesce_writes``: a loop step's small writes leave as one record (for apps that write a
    response in pieces, as uvicorn does; it costs a callback per response).
    """
    context = _tls._check_context(ssl_context)
    handshake_timeout = _tls._check_timeout("handshake_timeout", handshake_timeout)
    shutdown_timeout = _tls._check_timeout("shutdown_timeout", shutdown_timeout)
    gate = HandshakeGate(max_handshakes) if max_handshakes is not None else None
    loop = asyncio.get_running_loop()
    timeouts = _Timeouts(loop, handshake_timeout, shutdown_timeout)
    if sock is not None:
        if host is not None or port is not None:
            raise ValueError("host/port and sock can not be specified at the same time")
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"A Stream Socket was expected, got {sock!r}")
        sockets = [sock]
    else:
        sockets = await _listening_sockets(
            host,
            port,
            family=family,
            flags=flags,
            reuse_address=reuse_address,
            reuse_port=reuse_port,
        )
    for one in sockets:
        one.setblocking(False)
    server: SocketTLSServer

    def make_transport(conn: socket.socket) -> object:
        try:
            app_protocol = protocol_factory()
        except Exception as exc:
            conn.close()
            loop.call_exception_handler(
                {"message": "the protocol factory failed", "exception": exc}
            )
            return None
        return SocketTLSTransport(
            loop,
            conn,
            context,
            app_protocol,
            handshake_timeout=handshake_timeout,
            shutdown_timeout=shutdown_timeout,
            on_connection=on_connection,
            handshake_gate=gate,
            server=server,
            timeouts=timeouts,
            coalesce_writes=coalesce_writes,
        )

    server = SocketTLSServer(loop, sockets, make_transport, backlog, timeouts)
    if start_serving:
        server._start_serving()
        await asyncio.sleep(0)
    return server
