"""Staple files for servers that aren't Python: nginx, HAProxy, Envoy.

nginx reads ``ssl_stapling_file`` only at (re)load and never checks it; HAProxy loads
``<crt>.ocsp`` at start and takes ``set ssl ocsp-response <base64>`` on its admin socket; Envoy
reads ``ocsp_staple`` files. :class:`StapleFiles` keeps such files current with the same
handles, refresher, validation, policy and store as a stapling server:

- each chain's verified response is written as DER, atomically (temp file, fsync, rename),
  and only when it changed;
- when no valid response is held any more (its stop moment came with no replacement, it was
  withheld, the handle closed), the file is removed, emptied or replaced by a ``tryLater``
  response (:class:`OnExpiry`: nginx needs the last), so the server stops stapling instead of
  stapling something stale;
- each new response is pushed to every HAProxy admin socket given, and HAProxy's answer is
  checked;
- an ``on_change`` shell command (``nginx -s reload``) runs once after each batch of changes,
  with a timeout; its failure is logged, never fatal.

The file always mirrors the handle's :meth:`~staple.ServerOcspResponse.get_context`: every
event of a handle makes :class:`StapleFiles` look at that state again, so what is on disk is
what staple itself would staple.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import inspect
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import remove_durably, write_atomically
from .chain import ChainInput
from .errors import OcspError, UnknownStatusError
from .handle import Event, OnUpdate, ResponderUrls, ServerOcspResponse
from .ocsp import CertStatus
from .stapler import Stapler

__all__ = ["TRY_LATER", "HaproxyError", "OnExpiry", "StapleFiles", "push_to_haproxy"]

log = logging.getLogger("staple.sync")

FILE_MODE = 0o644
"""Staple files hold no secret, and the server's workers (www-data, haproxy) must read them."""


TRY_LATER = bytes.fromhex("30030a0103")
"""An OCSPResponse with responseStatus ``tryLater`` and no body (RFC 6960 §4.2.1)."""


class OnExpiry(enum.Enum):
    """What becomes of a staple file when no valid response is held any more.

    Measured with nginx 1.22 and HAProxy 2.6: nginx refuses to (re)load when its
    ``ssl_stapling_file`` is missing or empty, and a refused reload keeps the old workers
    stapling what they loaded, however stale, forever. HAProxy starts without a staple when
    ``<crt>.ocsp`` is missing, empty or unparseable, and itself stops stapling a response
    past its nextUpdate.
    """

    REMOVE = "remove"
    """Delete it: for HAProxy (at its next start) and for servers that read the file per use."""
    EMPTY = "empty"
    """Truncate it to zero bytes: HAProxy starts without a staple for it."""
    TRY_LATER = "try-later"
    """Write a 5-byte ``tryLater`` response: nginx reloads and staples it, and clients treat it
    as no staple (``curl --cert-status`` fails as without one). The choice for nginx."""


class HaproxyError(OcspError):
    """An HAProxy admin socket could not be reached or refused the response."""


@dataclass(slots=True)
class _Output:
    path: Path
    written: bytes | None = None  # what the file holds now (None: no file / empty)


class StapleFiles:
    """Keeps one DER staple file per certificate chain current, and HAProxy told.

    ``stapler_options`` go to the :class:`~staple.Stapler` it owns (``store=``, ``policy=``,
    ``clock=``, ``on_update=``, ...). Close it with :meth:`close` or ``async with``.
    """

    def __init__(
        self,
        *,
        haproxy_sockets: Sequence[str] = (),
        on_change: str | None = None,
        on_change_timeout: float = 30.0,
        on_expiry: OnExpiry | str = OnExpiry.REMOVE,
        batch_delay: float = 1.0,
        on_update: OnUpdate | None = None,
        **stapler_options: Any,
    ) -> None:
        self.haproxy_sockets = list(haproxy_sockets)
        self.on_change = on_change
        self.on_change_timeout = on_change_timeout
        self.on_expiry = OnExpiry(on_expiry)
        self.batch_delay = batch_delay
        self._user_on_update = on_update
        self.stapler = Stapler(on_update=self._on_event, **stapler_options)
        self._outputs: dict[ServerOcspResponse, _Output] = {}
        self._changed = False
        self._batch: asyncio.Task[None] | None = None
        self._closed = False
        self.writes = 0
        self.removals = 0
        self.pushes = 0
        self.push_failures = 0
        self.command_runs = 0
        self.command_failures = 0

    async def add(
        self,
        chain: ChainInput,
        out: str | os.PathLike[str],
        *,
        responder_urls: ResponderUrls | None = None,
        wait: bool = True,
    ) -> ServerOcspResponse:
        """Open a handle for ``chain`` and keep ``out`` in step with it. Raises what
        :meth:`Stapler.add` raises, and ValueError when ``out`` is already someone's file or
        its directory does not exist."""
        path = _output_path(out)
        if any(o.path == path for o in self._outputs.values()):
            raise ValueError(f"{path} is already the staple file of another certificate")
        # What a previous run left there counts as written: a restart with a warm store
        # neither rewrites the file nor pushes nor reloads anything.
        on_disk = await asyncio.to_thread(_read_or_none, path)
        handle = await self.stapler.add(chain, responder_urls=responder_urls, wait=wait)
        self._outputs[handle] = _Output(path, on_disk)
        await self._sync(handle)
        return handle

    def outputs(self) -> list[tuple[ServerOcspResponse, Path]]:
        """Each handle with the file it keeps, in the order they were added."""
        return [(handle, output.path) for handle, output in self._outputs.items()]

    def status(self) -> int:
        """What ``staple check`` would exit with for the worst chain: 0 every response good,
        1 one revoked, 3 one unknown to its responder, 4 one without a valid response."""
        worst = 0
        for handle in self._outputs:
            response = handle.response
            ctx = handle.get_context()
            if ctx is not None:
                ctx.free()
            if ctx is None and response is not None and response.cert_status is CertStatus.REVOKED:
                code = 1  # withheld, yet still revoked
            elif ctx is None:
                code = 3 if isinstance(handle.last_error, UnknownStatusError) else 4
            else:
                code = 1 if ctx.cert_status is CertStatus.REVOKED else 0
            worst = max(worst, code)
        return worst

    async def flush(self) -> None:
        """Run the ``on_change`` command now if anything changed since it last ran."""
        if self._batch is not None and not self._batch.done():
            self._batch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._batch
        self._batch = None
        await self._run_command_if_changed()

    async def close(self) -> None:
        """Stop the refreshers and any pending command batch. The files stay as they are: a
        restarted sync (or the server reading them) picks up from there. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._batch is not None:
            self._batch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._batch
        await self.stapler.close()

    async def __aenter__(self) -> StapleFiles:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- keeping files in step ---------------------------------------------------------------

    async def _on_event(self, event: Event) -> None:
        if event.handle in self._outputs and not self._closed:
            await self._sync(event.handle)
        if self._user_on_update is not None:
            result = self._user_on_update(event)
            if inspect.isawaitable(result):
                await result

    async def _sync(self, handle: ServerOcspResponse) -> None:
        """Make the handle's file hold what the handle would staple now, if that changed."""
        output = self._outputs[handle]
        ctx = handle.get_context()
        if ctx is None:
            der = None
        else:
            with ctx:
                der = ctx.encoded
        if der == output.written:
            return
        try:
            if der is not None:
                await asyncio.to_thread(write_atomically, output.path, der, mode=FILE_MODE)
                self.writes += 1
                log.info("%s: wrote %s (%d bytes)", handle.subject, output.path, len(der))
            elif self.on_expiry is not OnExpiry.REMOVE:
                filler = b"" if self.on_expiry is OnExpiry.EMPTY else TRY_LATER
                await asyncio.to_thread(write_atomically, output.path, filler, mode=FILE_MODE)
                self.removals += 1
                log.warning(
                    "%s: %s %s: %s",
                    handle.subject,
                    "emptied" if not filler else "wrote tryLater to",
                    output.path,
                    handle.last_error,
                )
            else:
                await asyncio.to_thread(remove_durably, output.path)
                self.removals += 1
                log.warning("%s: removed %s: %s", handle.subject, output.path, handle.last_error)
        except OSError as exc:
            log.error("%s: could not update %s: %s", handle.subject, output.path, exc)
            return  # written stays as it was: the next event tries again
        output.written = der
        if der is not None:
            await self._push(handle, der)
        self._changed = True
        self._schedule_command()

    async def _push(self, handle: ServerOcspResponse, der: bytes) -> None:
        for address in self.haproxy_sockets:
            try:
                await push_to_haproxy(address, der)
                self.pushes += 1
            except HaproxyError as exc:
                self.push_failures += 1
                log.error("%s: %s", handle.subject, exc)

    # -- the on_change command ---------------------------------------------------------------

    def _schedule_command(self) -> None:
        if self.on_change is None or self._closed:
            return
        if self._batch is None or self._batch.done():
            self._batch = asyncio.get_running_loop().create_task(
                self._command_after_batch(), name="staple sync on-change"
            )

    async def _command_after_batch(self) -> None:
        await asyncio.sleep(self.batch_delay)  # let the rest of a batch (a mass refresh) land
        await self._run_command_if_changed()

    async def _run_command_if_changed(self) -> None:
        if not self._changed or self.on_change is None:
            return
        self._changed = False
        self.command_runs += 1
        process = await asyncio.create_subprocess_shell(
            self.on_change,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(self.on_change_timeout):
                output, _ = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            self.command_failures += 1
            log.error(
                "on-change command %r did not finish within %g s; killed",
                self.on_change,
                self.on_change_timeout,
            )
            return
        if process.returncode != 0:
            self.command_failures += 1
            tail = output.decode(errors="replace").strip()[-500:]
            log.error(
                "on-change command %r exited with %s: %s", self.on_change, process.returncode, tail
            )


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes() or None
    except FileNotFoundError:
        return None


def _output_path(out: str | os.PathLike[str]) -> Path:
    path = Path(out).absolute()
    if not path.parent.is_dir():
        raise ValueError(f"{path.parent} is not a directory")
    return path


async def push_to_haproxy(address: str, der: bytes, *, timeout: float = 10.0) -> None:
    """Send ``der`` to an HAProxy admin socket (a Unix socket path, or ``host:port`` for a
    TCP ``stats socket``) with ``set ssl ocsp-response`` and check the answer.

    Raises :class:`HaproxyError` when the socket can't be reached or HAProxy refuses the
    response (e.g. its CertID matches no certificate HAProxy serves).
    """
    command = b"set ssl ocsp-response " + base64.b64encode(der) + b"\n"
    try:
        async with asyncio.timeout(timeout):
            if address.startswith("/") or address.startswith("."):
                reader, writer = await asyncio.open_unix_connection(address)
            else:
                host, _, port = address.rpartition(":")
                reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
            try:
                writer.write(command)
                await writer.drain()
                answer = (await reader.read(64 * 1024)).decode(errors="replace").strip()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        raise HaproxyError(f"HAProxy socket {address}: no answer within {timeout:g} s") from None
    except (OSError, ValueError) as exc:
        raise HaproxyError(f"HAProxy socket {address}: {exc}") from None
    if "OCSP Response updated" not in answer:
        raise HaproxyError(f"HAProxy socket {address} refused the response: {answer!r}")
