"""The ``staple`` command: ``check`` a certificate's OCSP status, ``serve`` HTTPS with staples,
``probe`` a server for its staple, ``demo`` the whole thing.

``main(argv)`` is what the console script calls; ``run(argv)`` is the same as a coroutine, so
tests drive the CLI in-process on their own event loop.

Exit codes of ``check``: 0 good, 1 revoked, 2 usage, 3 unknown, 4 no valid response.
Exit codes of ``serve``: 0 after SIGINT/SIGTERM, 2 when it cannot start.
Exit codes of ``probe``: 0 verified good staple, 1 revoked, 2 usage or connection error,
3 no staple, 4 invalid (or unverifiable) staple.
Exit codes of ``demo``: 0 (``--check``: every check that could run passed), 1 a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from . import __version__
from ._probe import DEFAULT_TIMEOUT, TLSVersion, parse_target, probe
from ._serve import (
    LOOPS,
    LoopUnavailable,
    ServeConfig,
    Serving,
    default_cache_dir,
    loop_factory,
    serve,
)
from .chain import load_chain
from .errors import ChainError, NoResponderError, OcspError, UnknownStatusError
from .handle import Event, EventKind, ServerOcspResponse, open_server_ocsp_response
from .ocsp import CertStatus
from .policy import RefreshPolicy

EXIT_GOOD, EXIT_REVOKED, EXIT_USAGE, EXIT_UNKNOWN, EXIT_INVALID = 0, 1, 2, 3, 4


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="staple", description="OCSP stapling for Python TLS servers."
    )
    parser.add_argument("--version", action="version", version=f"staple {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log refresher events to stderr"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser(
        "check",
        help="fetch and verify the OCSP response for a certificate",
        description="Fetch, verify and show the OCSP response for CHAIN's leaf. Exit 0 good, "
        "1 revoked, 2 usage, 3 unknown, 4 no valid response.",
    )
    check.add_argument("chain", metavar="CHAIN.pem", help="leaf certificate, then its issuer")
    check.add_argument("--issuer", metavar="ISSUER.pem", help="the issuer, if not in CHAIN")
    check.add_argument(
        "--responder", metavar="URL", action="append", help="ask this URL instead of the AIA one"
    )
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.add_argument(
        "--timeout", type=float, default=15.0, help="seconds to wait for the responder"
    )

    serve = sub.add_parser(
        "serve",
        help="an HTTPS server (aiohttp) that staples, until Ctrl-C",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve HTTPS on HOST:PORT with an OCSP staple for every certificate. "
        "Prints 'listening on https://HOST:PORT' and one status line per certificate, then "
        "one line per refresh event.",
        epilog=_SERVE_EPILOG,
    )
    serve.add_argument(
        "--cert",
        metavar="CHAIN.pem",
        action="append",
        required=True,
        help="leaf certificate then its issuer; repeat for several (SNI, RSA + ECDSA)",
    )
    serve.add_argument(
        "--key", metavar="KEY.pem", action="append", required=True, help="one per --cert"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    serve.add_argument("--port", type=int, default=8443, help="0 picks a free port (8443)")
    cache = serve.add_mutually_exclusive_group()
    cache.add_argument(
        "--cache-dir",
        metavar="DIR",
        type=Path,
        default=default_cache_dir(),
        help="where OCSP responses persist across restarts (%(default)s)",
    )
    cache.add_argument("--no-cache", action="store_true", help="keep responses in memory only")
    cache.add_argument(
        "--store",
        metavar="URL",
        help="share responses with a fleet through Redis (redis://HOST:PORT/DB): one server "
        "fetches per refresh, the others adopt its response",
    )
    serve.add_argument(
        "--responder", metavar="URL", help="ask this OCSP URL instead of each certificate's AIA one"
    )
    serve.add_argument("--static", metavar="DIR", type=Path, help="serve DIR under /static/")
    serve.add_argument(
        "--loop",
        choices=LOOPS,
        default="auto",
        help="event loop: uvloop if installed, else asyncio's (auto); uvloop needs "
        "ocsp-staple[uvloop]",
    )

    probe = sub.add_parser(
        "probe",
        help="connect to a TLS server and verify the OCSP response it staples",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Connect to HOST:PORT as a TLS client asking for a staple (status_request), "
        "and verify it against the chain the server sent (leaf, issuer): status, thisUpdate, "
        "nextUpdate, remaining validity.",
        epilog=_PROBE_EPILOG,
    )
    probe.add_argument("target", metavar="HOST:PORT", help="port 443 if omitted")
    probe.add_argument(
        "--cafile", metavar="F", help="also verify the chain and name against these CAs"
    )
    probe.add_argument("--servername", metavar="N", help="SNI name (default: HOST unless an IP)")
    versions = probe.add_mutually_exclusive_group()
    versions.add_argument("--tls1_2", action="store_true", help="use TLS 1.2 only")
    versions.add_argument("--tls1_3", action="store_true", help="use TLS 1.3 only")
    probe.add_argument("--json", action="store_true", help="print one JSON object")
    probe.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds for it all (%(default)s)"
    )

    demo = sub.add_parser(
        "demo",
        help="a throwaway PKI, OCSP responder and `staple serve` on 127.0.0.1",
        description="Start a throwaway PKI and OCSP responder, and `staple serve` for localhost "
        "on a free port of 127.0.0.1; print the openssl/curl/gnutls-cli commands that show the "
        "staple, and serve until Ctrl-C. With --check, run those commands (and `staple probe`) "
        "and exit 0 if every one that could run passed, else 1; a missing program is skipped "
        "and reported.",
    )
    demo.add_argument("--check", action="store_true", help="run the checks and exit 0/1")
    return parser


_SERVE_EPILOG = """\
routes:
  /              HTML page with each certificate's staple status
  /status.json   the same as JSON
  /static/...    files under --static (with an index); files up to 64 KiB from memory

exit codes: 0 stopped by SIGINT/SIGTERM, 2 could not start (bad chain/key, no responder,
port in use). Without --no-cache, a restart staples its first handshake from the cache even
while the responder is down.
"""

_PROBE_EPILOG = """\
exit codes:
  0  a verified good staple
  1  a verified staple saying the certificate is REVOKED
  2  usage or connection error (refused, timeout, handshake or --cafile verification failed)
  3  no staple
  4  a staple that does not verify (signature, CertID, expired, unknown status...), or cannot
     be verified: the server sent only its leaf and --cafile holds no issuer
"""


async def run(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run the CLI; returns the exit code."""
    out = out or sys.stdout
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 for --help
        return int(exc.code or 0)
    # The report says what matters; the refresher's log lines are for -v.
    logger = logging.getLogger("staple")
    saved = logger.level
    logger.setLevel(logging.INFO if args.verbose else logging.CRITICAL)
    try:
        if args.command == "check":
            return await _check(args, out)
        if args.command == "serve":
            return await _serve(args, out)
        if args.command == "probe":
            return await _probe(args, out)
        return await _demo(args, out)
    finally:
        logger.setLevel(saved)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)  # usage errors exit 2 here, as run() would return
    with asyncio.Runner(loop_factory=_loop_factory(args)) as runner:
        code = runner.run(run(argv))
    sys.exit(code)


def _loop_factory(args: argparse.Namespace) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop ``serve --loop`` asks for, which must exist before ``run`` starts; asyncio's
    for everything else, and when uvloop is asked for but missing (``_serve`` says so)."""
    if args.command != "serve":
        return None
    try:
        return loop_factory(args.loop)
    except LoopUnavailable:
        return None


async def _check(args: argparse.Namespace, out: TextIO) -> int:
    try:
        chain = load_chain(Path(args.chain))
        if args.issuer:
            chain = chain[:1] + load_chain(Path(args.issuer))
    except ChainError as exc:
        print(f"staple check: {exc}", file=sys.stderr)
        return EXIT_USAGE
    events: list[Event] = []
    policy = RefreshPolicy(wait_timeout=args.timeout, fetch_timeout=args.timeout)
    try:
        handle = await open_server_ocsp_response(
            chain, responder_urls=args.responder, policy=policy, on_update=events.append
        )
    except (ChainError, NoResponderError) as exc:
        print(f"staple check: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _report(handle, events, args.json, out)
    finally:
        await handle.close()


def _report(handle: ServerOcspResponse, events: list[Event], as_json: bool, out: TextIO) -> int:
    ctx = handle.get_context()
    info: dict[str, Any] = {"certificate": handle.subject, "responders": handle.urls}
    if ctx is None:
        error: OcspError | None = handle.last_error
        for event in reversed(events):  # the refresher's own reason beats "none yet"
            if event.error is not None and event.kind is not EventKind.CLOSED:
                error = event.error
                break
        code = EXIT_UNKNOWN if isinstance(error, UnknownStatusError) else EXIT_INVALID
        info.update(status="unknown" if code == EXIT_UNKNOWN else None, error=str(error))
        if as_json:
            print(json.dumps(info, indent=2), file=out)
        else:
            print(f"certificate:  {handle.subject}", file=out)
            print(f"no valid OCSP response: {error}", file=out)
        return code
    with ctx:
        r = ctx.response
        source = next((e.source for e in reversed(events) if e.source), None)
        info.update(
            status=r.cert_status.name.lower(),
            this_update=r.this_update.isoformat(),
            next_update=r.next_update.isoformat(),
            produced_at=r.produced_at.isoformat(),
            expires=r.expires.isoformat(),
            responder=source,
            signer=r.signer_name + (" (delegated)" if r.delegated else " (issuer)"),
            next_refresh=handle.next_refresh.isoformat() if handle.next_refresh else None,
            revocation_time=r.revocation_time.isoformat() if r.revocation_time else None,
            size=len(r.der),
        )
        revoked = r.cert_status is CertStatus.REVOKED
    if as_json:
        print(json.dumps(info, indent=2), file=out)
    else:
        width = max(len(k) for k in info) + 2
        for key, value in info.items():
            if value is None:
                continue
            if isinstance(value, list):
                value = ", ".join(value)
            print(f"{key.replace('_', ' ') + ':':<{width}}{value}", file=out)
    return EXIT_REVOKED if revoked else EXIT_GOOD


async def _serve(args: argparse.Namespace, out: TextIO) -> int:
    if len(args.cert) != len(args.key):
        print(
            f"staple serve: {len(args.cert)} --cert but {len(args.key)} --key: give one --key "
            "after each --cert",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        loop_factory(args.loop)  # main() has picked the loop; this says why it could not
    except LoopUnavailable as exc:
        print(f"staple serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    config = ServeConfig(
        certs=list(zip(args.cert, args.key, strict=True)),
        host=args.host,
        port=args.port,
        cache_dir=None if args.no_cache else args.cache_dir,
        store_url=args.store,
        responder=args.responder,
        static=args.static,
    )
    return await serve(config, out=out)


async def _probe(args: argparse.Namespace, out: TextIO) -> int:
    try:
        host, port = parse_target(args.target)
    except ValueError as exc:
        print(f"staple probe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    version: TLSVersion | None = "1.2" if args.tls1_2 else "1.3" if args.tls1_3 else None
    result = await probe(
        host,
        port,
        servername=args.servername,
        cafile=args.cafile,
        version=version,
        timeout=args.timeout,
    )
    if args.json:
        print(json.dumps(result.as_dict(), indent=2), file=out)
    else:
        for line in result.lines():
            print(line, file=out)
    return result.code


# -- demo ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Outcome:
    name: str
    state: str  # "ok", "FAILED", "skipped"
    detail: str


async def _demo(args: argparse.Namespace, out: TextIO) -> int:
    """A throwaway PKI and responder, ``staple serve`` for localhost on a free port; with
    --check, real clients prove the staple and the demo exits 0/1."""
    from .testing import OcspResponder, TestPKI  # test helpers: only the demo needs them

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
            commands = _demo_commands(serving.port, files / "ca.pem")
            print("\nSee the staple with:", file=out)
            for argv in commands.values():
                interactive = argv[0] in ("openssl", "gnutls-cli")  # they wait for stdin
                print("  " + shlex.join(argv) + (" </dev/null" if interactive else ""), file=out)
            if not args.check:
                # Show it working before handing over: the same checks, then serve on.
                print("\nRunning them once:", file=out)
                await _demo_checks(commands, serving, files / "ca.pem", out)
                print("\nServing until Ctrl-C.", file=out, flush=True)
                return await server
            try:
                outcomes = await _demo_checks(commands, serving, files / "ca.pem", out)
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


def _demo_commands(port: int, ca: Path) -> dict[str, list[str]]:
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


async def _demo_checks(
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
