"""The keep-alive load generator: ``kaclient`` (C, system OpenSSL), built on first use.

Like ``hsclient`` (``bench._client``) it runs in processes of its own and is the same for every
server; unlike it, each process keeps one connection open and sends requests on it one after
the other. There is no Python stand-in: without a C compiler and the OpenSSL headers,
:func:`command` returns ``None`` and the keep-alive rows say why they are missing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ._client import HOST
from ._proc import ROOT

SOURCE = Path(__file__).with_name("kaclient.c")
_built: dict[str, str | None] = {}


def _build() -> tuple[str | None, str]:
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None, "no C compiler"
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "staple-bench"
    binary = cache / f"kaclient-{digest}"
    if binary.exists():
        return str(binary), ""
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = Path(tmp) / "kaclient"
        result = subprocess.run(
            [compiler, "-O2", "-o", str(out), str(SOURCE), "-lssl", "-lcrypto"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            return None, f"kaclient.c did not build: {result.stderr.strip()[-300:]}"
        os.replace(out, binary)
    return str(binary), ""


def command() -> str | None:
    """The built client, or ``None`` (then :func:`why_not` says why)."""
    if "binary" not in _built:
        binary, why = _build()
        _built["binary"], _built["why"] = binary, why
    return _built["binary"]


def why_not() -> str:
    command()
    return _built.get("why") or ""


async def requests(
    port: int,
    *,
    seconds: float,
    procs: int,
    tls: str,
    path: str = "/",
    sni: str = "bench.test",
    plain: bool = False,
) -> dict[str, Any]:
    """``procs`` keep-alive connections, requests back to back on each, for ``seconds``
    (``plain``: plain HTTP, no TLS)."""
    binary = command()
    if binary is None:
        raise RuntimeError(why_not())
    version = "-tls1_2" if tls == "1.2" else "-tls1_3"
    args = [HOST, str(port), path, f"{seconds:g}", str(procs), version, "-sni", sni]
    if plain:
        args.append("-plain")
    process = await asyncio.create_subprocess_exec(
        binary,
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), seconds + 60)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(f"kaclient timed out: {args}") from None
    try:
        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"kaclient failed ({args}): {err.decode().strip()}") from None
    return result
