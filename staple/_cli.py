"""The ``staple`` command: ``check`` a certificate's OCSP status, ``demo`` the whole thing.

``main(argv)`` is what the console script calls; ``run(argv)`` is the same as a coroutine, so
tests drive the CLI in-process on their own event loop.

Exit codes of ``check``: 0 good, 1 revoked, 2 usage, 3 unknown, 4 no valid response.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from . import __version__
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

    demo = sub.add_parser(
        "demo", help="a throwaway PKI and OCSP responder on 127.0.0.1, checked end to end"
    )
    demo.add_argument("--check", action="store_true", help="run the checks and exit 0/1")
    return parser


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
        return await _demo(args, out)
    finally:
        logger.setLevel(saved)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(run(argv)))


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


async def _demo(args: argparse.Namespace, out: TextIO) -> int:
    """A throwaway PKI and responder on 127.0.0.1; check a good and a revoked certificate."""
    from .testing import OcspResponder, TestPKI  # test helpers: only the demo needs them

    pki = TestPKI()
    async with OcspResponder(pki) as responder:
        good = pki.issue_leaf("good.staple.test", ocsp_url=responder.url)
        revoked = pki.issue_leaf("revoked.staple.test", ocsp_url=responder.url)
        responder.revoke(revoked)
        with tempfile.TemporaryDirectory(prefix="staple-demo-") as tmp:
            ok = True
            for leaf, name, expect in ((good, "good", EXIT_GOOD), (revoked, "revoked", 1)):
                path = Path(tmp) / f"{name}.pem"
                leaf.write_chain(path)
                print(f"$ staple check {path}", file=out)
                code = await run(["check", str(path)], out=out)
                print(f"(exit {code})\n", file=out)
                ok = ok and code == expect
    print(f"OCSP responder saw {responder.requests} requests", file=out)
    if args.check:
        print("demo checks: " + ("passed" if ok else "FAILED"), file=out)
        return 0 if ok else 1
    return 0
