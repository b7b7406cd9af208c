"""The TLS examples run with ``--check`` and do what they say: a real handshake, a staple that
the client verifies, exit 0. Each runs as its users would, as a separate process."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


async def run_example(name: str, *, env: dict[str, str] | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-W",
        "error",  # a ResourceWarning or similar in an example is a bug too
        str(EXAMPLES / name),
        "--check",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out.decode()}\n{err.decode()}"
    return out.decode()


async def test_aiohttp_app() -> None:
    out = await run_example("aiohttp_app.py")
    assert "stapled 1 handshakes, 0 without a staple" in out
    if shutil.which("curl"):
        assert "curl --cert-status exit 0: stapled, good" in out
    else:
        assert "pyOpenSSL client: stapled, good" in out


async def test_aiohttp_app_without_curl() -> None:
    """Where curl is missing, the example checks with a pyOpenSSL client instead."""
    env = {**os.environ, "PATH": os.devnull}  # no curl to be found
    out = await run_example("aiohttp_app.py", env=env)
    assert "pyOpenSSL client: stapled, good" in out
    assert "curl" not in out


async def test_streams_echo() -> None:
    out = await run_example("streams_echo.py")
    assert "echoed: hello, stapled world" in out
    assert "staple: good" in out


async def test_threaded_pyopenssl() -> None:
    out = await run_example("threaded_pyopenssl.py")
    assert "live references during the connection: 1" in out
    assert "echoed: hello from a thread" in out
    assert "staple: good" in out
    assert "live references after the close: 0" in out


@pytest.mark.parametrize("name", ["aiohttp_app.py", "streams_echo.py", "threaded_pyopenssl.py"])
def test_example_documents_itself(name: str) -> None:
    source = (EXAMPLES / name).read_text()
    assert source.startswith('"""') and "--check" in source
    if name == "aiohttp_app.py":
        assert 'staple.aiohttp.run_app(app, certs=[("chain.pem", "key.pem")])' in source
