"""``staple check CHAIN.pem``: fetch, verify and show the OCSP response for a certificate.

Exit codes: 0 good, 1 revoked, 2 usage, 3 unknown, 4 no valid response.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from ..chain import load_chain
from ..errors import ChainError, NoResponderError, OcspError, UnknownStatusError
from ..handle import Event, EventKind, ServerOcspResponse, open_server_ocsp_response
from ..ocsp import CertStatus
from ..policy import RefreshPolicy
from .options import add_proxy_argument, proxy_option

__all__ = ["add_arguments", "run"]

EXIT_GOOD, EXIT_REVOKED, EXIT_USAGE, EXIT_UNKNOWN, EXIT_INVALID = 0, 1, 2, 3, 4

HELP = "fetch and verify the OCSP response for a certificate"
DESCRIPTION = (
    "Fetch, verify and show the OCSP response for CHAIN's leaf. Exit 0 good, 1 revoked, "
    "2 usage, 3 unknown, 4 no valid response."
)
EPILOG = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("chain", metavar="CHAIN.pem", help="leaf certificate, then its issuer")
    parser.add_argument("--issuer", metavar="ISSUER.pem", help="the issuer, if not in CHAIN")
    parser.add_argument(
        "--responder", metavar="URL", action="append", help="ask this URL instead of the AIA one"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--timeout", type=float, default=15.0, help="seconds to wait for the responder"
    )
    add_proxy_argument(parser)


async def run(args: argparse.Namespace, out: TextIO) -> int:
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
            chain,
            responder_urls=args.responder,
            policy=policy,
            on_update=events.append,
            proxy=proxy_option(args.proxy),
        )
    except (ChainError, NoResponderError, ValueError) as exc:
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
