"""``staple demo``: a throwaway PKI, its OCSP responder and ``staple serve`` for localhost on a
free port of 127.0.0.1; prints the openssl/curl/gnutls-cli commands that show the staple.

Exit codes: 0 (``--check``: every check that could run passed), 1 a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..probe import probe
from .serve import ServeConfig, Serving, serve

__all__ = ["add_arguments", "check_commands", "run"]

HELP = "a throwaway PKI, OCSP responder and `staple serve` on 127.0.0.1"
DESCRIPTION = (
    "Start a throwaway PKI and OCSP responder, and `staple serve` for localhost on a free port "
    "of 127.0.0.1; print the openssl/curl/gnutls-cli commands that show the staple, and serve "
    "until Ctrl-C. With --check, run those commands (and `staple probe`) and exit 0 if every "
    "one that could run passed, else 1; a missing program is skipped and reported."
)
EPILOG = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", action="store_true", help="run the checks and exit 0/1")


@dataclass(frozen=True, slots=True)
class _Outcome:
    name: str
    state: str  # "ok", "FAILED", "skipped"
    detail: str


async def run(args: argparse.Namespace, out: TextIO) -> int:
    """A throwaway PKI and responder, ``staple serve`` for localhost on a free port; with
    --check, real clients prove the staple and the demo exits 0/1."""
    from ..testing import OcspResponder, TestPKI  # test helpers: only the demo needs them

    pki = TestPKI()
    async with OcspResponder(pki) as responder:
        leaf = pki.issue_leaf("localhost", "127.0.0.1", ocsp_url=responder.url)
        with tempfile.TemporaryDirectory(prefix="staple-demo-") as tmp:
            files = Path(tmp)
            leaf.write_chain(files / "chain.pem")
            leaf.write_key(files / "key.pem")
            pki.write_ca_bundle(files / "ca.pem")
            print(
                f"staple demo: a throwaway PKI, its OCSP responder at {responder.url}, and\n"
                f"  staple serve --cert {files / 'chain.pem'} --key {files / 'key.pem'} "
                f"--port 0 --cache-dir {files / 'cache'}",
                file=out,
                flush=True,
            )
            config = ServeConfig(
                certs=[(files / "chain.pem", files / "key.pem")],
                host="127.0.0.1",
                port=0,
                cache_dir=files / "cache",
            )
            loop = asyncio.get_running_loop()
            ready: asyncio.Future[Serving] = loop.create_future()
            stop = asyncio.Event() if args.check else None  # None: serve until SIGINT/SIGTERM
            server = asyncio.create_task(serve(config, out=out, ready=ready, stop=stop))
            either: set[asyncio.Future[Any]] = {ready, server}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not ready.done() or ready.cancelled() or ready.exception() is not None:
                ready.cancel()
                return await server
            serving = ready.result()
            commands = check_commands(serving.port, files / "ca.pem")
            print("\nSee the staple with:", file=out)
            for argv in commands.values():
                interactive = argv[0] in ("openssl", "gnutls-cli")  # they wait for stdin
                print("  " + shlex.join(argv) + (" </dev/null" if interactive else ""), file=out)
            if not args.check:
                # Show it working before handing over: the same checks, then serve on.
                print("\nRunning them once:", file=out)
                await _checks(commands, serving, files / "ca.pem", out)
                print("\nServing until Ctrl-C.", file=out, flush=True)
                return await server
            try:
                outcomes = await _checks(commands, serving, files / "ca.pem", out)
            finally:
                assert stop is not None
                stop.set()
                code = await server
    print(f"OCSP responder answered {responder.requests} request(s)", file=out)
    failed = [o.name for o in outcomes if o.state == "FAILED"]
    skipped = [o for o in outcomes if o.state == "skipped"]
    passed = sum(o.state == "ok" for o in outcomes)
    if failed or code != 0:
        print(f"demo checks: FAILED ({', '.join(failed) or f'serve exit {code}'})", file=out)
        return 1
    summary = f"demo checks: passed ({passed} of {len(outcomes)})"
    if skipped:
        summary += "; SKIPPED: " + ", ".join(f"{o.name} ({o.detail})" for o in skipped)
    print(summary, file=out)
    return 0


def check_commands(port: int, ca: Path) -> dict[str, list[str]]:
    return {
        "openssl": [
            "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
            "-status",
        ],
        "curl": ["curl", "--cert-status", "--cacert", str(ca), f"https://localhost:{port}/"],
        "gnutls-cli": [
            "gnutls-cli", "--ocsp", "--x509cafile", str(ca), "-p", str(port), "localhost"
        ],
        "probe": [
            *_staple_command(), "probe", f"127.0.0.1:{port}", "--servername", "localhost",
            "--cafile", str(ca),
        ],
    }  # fmt: skip


def _staple_command() -> list[str]:
    """How to run ``staple`` from a shell: the console script if on PATH, else ``python -m``."""
    return ["staple"] if shutil.which("staple") else [sys.executable, "-m", "staple"]


async def _checks(
    commands: dict[str, list[str]], serving: Serving, ca: Path, out: TextIO
) -> list[_Outcome]:
    outcomes = []
    for name, argv in commands.items():
        if name == "probe":
            result = await probe(
                "127.0.0.1", serving.port, servername="localhost", cafile=ca, timeout=10
            )
            ok = result.code == 0
            outcome = _Outcome(
                name,
                "ok" if ok else "FAILED",
                f"{result.verdict}: {result.error}" if not ok else result.verdict,
            )
        else:
            outcome = await _run_check(name, argv)
        print(f"check {outcome.name}: {outcome.state} - {outcome.detail}", file=out, flush=True)
        outcomes.append(outcome)
    return outcomes


async def _run_check(name: str, argv: list[str]) -> _Outcome:
    path = shutil.which(argv[0])
    if path is None:
        return _Outcome(name, "skipped", f"{argv[0]} not installed")
    if name == "curl":
        argv = [*argv[:1], "-sS", "-o", os.devnull, *argv[1:]]
    try:
        proc = await asyncio.create_subprocess_exec(
            path,
            *argv[1:],
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        return _Outcome(name, "FAILED", f"cannot run {argv[0]}: {exc}")
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return _Outcome(name, "FAILED", f"{argv[0]} did not finish within 30 s")
    text = output.decode(errors="replace")
    code = proc.returncode
    if name == "curl":
        if code == 0:
            return _Outcome(name, "ok", "exit 0: curl verified the stapled response")
        return _Outcome(name, "FAILED", f"exit {code}: {text.strip()[-200:]}")
    if name == "openssl":
        wanted = ("OCSP Response Status: successful", "Cert Status: good")
        missing = [w for w in wanted if w not in text]
        if missing:
            return _Outcome(name, "FAILED", f"output lacks {missing}")
        return _Outcome(name, "ok", "; ".join(wanted))
    # gnutls-cli: verifies the staple itself, and lists the extension when one came
    if code == 0 and "OCSP status request" in text:
        return _Outcome(name, "ok", "exit 0, '- Options: OCSP status request'")
    return _Outcome(name, "FAILED", f"exit {code}, no 'OCSP status request' in its output")
