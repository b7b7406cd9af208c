"""A server program run as a subprocess (uvicorn, gunicorn), watched through its output, and
the curl client the tests point at it.

Both output streams are read as they come (so a chatty server never blocks on a full pipe);
tests wait for a line matching a pattern, with a bounded deadline, instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

from staple.testing import Leaf

from .external import require

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 60.0
HOST = "127.0.0.1"
CURL_BAD_STAPLE = 91  # CURLE_SSL_INVALIDCERTSTATUS (Debian curl 7.88)


class ServerProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []  # stdout and stderr, interleaved as read
        self._changed = asyncio.Condition()
        assert proc.stdout is not None and proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(proc.stdout)),
            asyncio.create_task(self._read(proc.stderr)),
        ]

    @property
    def finished(self) -> bool:
        """Every process that held its output (gunicorn's workers too) has closed it."""
        return all(reader.done() for reader in self._readers)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            async with self._changed:
                self.lines.append(line.decode(errors="replace"))
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    def matches(self, pattern: str) -> list[re.Match[str]]:
        return [m for line in self.lines if (m := re.search(pattern, line))]

    async def wait_for(
        self, pattern: str, count: int = 1, timeout: float = DEADLINE
    ) -> re.Match[str]:
        """The first line matching ``pattern`` once ``count`` lines match; fails if the process
        ends first or after ``timeout`` seconds, showing what it printed."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                while len(found := self.matches(pattern)) < count:
                    if self.finished:
                        raise AssertionError(f"exited before {pattern!r}:\n{self.output}")
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.output}") from None
        return found[0]

    async def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = DEADLINE) -> int:
        """Send ``sig`` and wait for the exit status."""
        self.proc.send_signal(sig)
        return await self.wait(timeout)

    async def wait(self, timeout: float = DEADLINE) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.gather(*self._readers)
        return code


@asynccontextmanager
async def server_process(
    *argv: str, env: Mapping[str, str] | None = None
) -> AsyncIterator[ServerProcess]:
    """Run ``argv`` from the repository root (so ``tests.asgi_apps`` imports), in a session of
    its own; kill that process group (gunicorn's workers too) if the block leaves any running."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "error", **(env or {})},
        start_new_session=True,
    )
    server = ServerProcess(proc)
    try:
        yield server
    finally:
        if proc.returncode is None or not server.finished:
            with contextlib.suppress(ProcessLookupError):  # none left: all exited
                os.killpg(proc.pid, signal.SIGKILL)
            await server.wait()


def python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def python_file(path: str, *args: str) -> tuple[str, ...]:
    """Run a file of the repository (``examples/...``) with arguments."""
    return (sys.executable, str(ROOT / path), *args)


def files(tmp_path: Path, leaf: Leaf, name: str = "leaf") -> tuple[Path, Path]:
    chain, key = tmp_path / f"{name}.chain.pem", tmp_path / f"{name}.key.pem"
    leaf.write_chain(chain)
    leaf.write_key(key)
    return chain, key


async def curl(port: int, ca: Path, *args: str, cert_status: bool = True) -> tuple[int, str]:
    """``curl --cert-status`` (verifies the staple: exit 91 when missing or bad)."""
    if cert_status:
        args = ("--cert-status", *args)
    proc = await asyncio.create_subprocess_exec(
        require("curl"), "-sS", "--cacert", str(ca),
        "--resolve", f"localhost:{port}:{HOST}", *args, f"https://localhost:{port}/",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, (out + err).decode(errors="replace")
