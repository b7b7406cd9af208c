"""The load generator: ``hsclient`` (C, system OpenSSL), built on first use.

It runs in processes of its own, on the system OpenSSL (which has no ML-KEM, so every server
negotiates the same X25519 key exchange), and asks for a staple (``status_request``) on every
handshake. Without a C compiler and OpenSSL headers, ``bench._pyclient`` (pyOpenSSL, same
command line and output) stands in; the table says which one ran.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ._proc import ROOT

SOURCE = Path(__file__).with_name("hsclient.c")
HOST = "127.0.0.1"
_command: list[str] | None = None


def _build() -> list[str]:
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is not None:
        digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "staple-bench"
        binary = cache / f"hsclient-{digest}"
        if binary.exists():
            return [str(binary)]
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            out = Path(tmp) / "hsclient"
            result = subprocess.run(
                [compiler, "-O2", "-o", str(out), str(SOURCE), "-lssl", "-lcrypto"],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode == 0:
                os.replace(out, binary)
                return [str(binary)]
            print(f"(hsclient.c did not build, using the Python client: {result.stderr.strip()})")
    return [sys.executable, "-m", "bench._pyclient"]


def command() -> list[str]:
    global _command
    if _command is None:
        _command = _build()
    return _command


def kind() -> str:
    return "python (pyOpenSSL)" if "bench._pyclient" in command() else "C (system OpenSSL)"


def _tls(version: str) -> list[str]:
    return ["-tls1_2"] if version == "1.2" else ["-tls1_3"]


async def _run(args: list[str], timeout: float) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        *command(),
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(f"client timed out: {args}") from None
    try:
        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"client failed ({args}): {err.decode().strip()}") from None
    return result


async def handshakes(
    port: int,
    *,
    seconds: float,
    procs: int,
    tls: str,
    path: str = "/",
    status: bool = True,
    sni: str = "bench.test",
    plain: bool = False,
) -> dict[str, Any]:
    """``procs`` processes making full handshakes + one GET each, for ``seconds``. With
    ``plain`` (the C client only), a plain-HTTP connection per GET instead: no TLS."""
    args = ["hs", HOST, str(port), path, f"{seconds:g}", str(procs), *_tls(tls), "-sni", sni]
    if status:
        args.append("-status")
    return await _run(_plain(args, plain), seconds + 60)


async def get(
    port: int, path: str, *, tls: str, status: bool = True, plain: bool = False
) -> dict[str, Any]:
    """One connection, one GET; reports the staple's length (0: none)."""
    args = ["get", HOST, str(port), path, *_tls(tls), "-sni", "bench.test"]
    if status:
        args.append("-status")
    return await _run(_plain(args, plain), 60)


def _plain(args: list[str], plain: bool) -> list[str]:
    if not plain:
        return args
    if kind() != "C (system OpenSSL)":
        raise RuntimeError("plain HTTP needs the C client (bench/hsclient.c)")
    return [*args, "-plain"]


async def download(port: int, nbytes: int, *, tls: str) -> dict[str, Any]:
    args = ["get", HOST, str(port), f"/download?bytes={nbytes}", *_tls(tls), "-sni", "bench.test"]
    return await _run(args, 600)


async def upload(port: int, nbytes: int, *, tls: str) -> dict[str, Any]:
    args = ["put", HOST, str(port), "/upload", str(nbytes), *_tls(tls), "-sni", "bench.test"]
    return await _run(args, 600)
