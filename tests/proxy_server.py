"""A throwaway ``tinyproxy`` (an HTTP forward proxy) on 127.0.0.1 for the proxy tests.

Its own config and log in a temporary directory, a free port, optional Basic credentials.
:meth:`ForwardProxy.requests` counts the requests its log shows it forwarded. Tests find the
program with :func:`tests.external.require` (skipped off CI when missing; ``.ci/sysdeps``
installs it).
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from .redis_server import _die_with_parent, free_port

__all__ = ["ForwardProxy"]

START_TIMEOUT = 10.0


class ForwardProxy:
    """One ``tinyproxy -d`` process; use as a context manager."""

    def __init__(
        self, program: str, directory: Path, *, user: str | None = None, password: str = ""
    ) -> None:
        self.program = program
        self.directory = directory
        self.port = free_port()
        self.user = user
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The proxy URL, with the credentials when it wants them."""
        auth = f"{self.user}:{self.password}@" if self.user else ""
        return f"http://{auth}127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory / "tinyproxy.log"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "tinyproxy.conf"
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 15",
            "MaxClients 50",
            "Allow 127.0.0.1",
            "LogLevel Connect",
            "DisableViaHeader Yes",
        ]
        if self.user:
            lines.append(f"BasicAuth {self.user} {self.password}")
        config.write_text("\n".join(lines) + "\n")
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [self.program, "-d", "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._listening():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tinyproxy did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.02)

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                return True
        except OSError:
            return False

    def requests(self) -> int:
        """Requests the proxy forwarded (its log's "Request (file descriptor" lines)."""
        return self.log.read_text(errors="replace").count("Request (file descriptor")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
        if process is not None:
            process.wait(timeout=10)

    def __enter__(self) -> ForwardProxy:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
