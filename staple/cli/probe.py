"""``staple probe HOST:PORT``: connect as a TLS client asking for a staple, and verify it
(:func:`staple.probe.probe`).

Exit codes: 0 verified good staple, 1 revoked, 2 usage or connection error, 3 no staple,
4 invalid (or unverifiable) staple.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from ..probe import DEFAULT_TIMEOUT, EXIT_CONNECTION, TLSVersion, parse_target, probe

__all__ = ["add_arguments", "run"]

HELP = "connect to a TLS server and verify the OCSP response it staples"
DESCRIPTION = (
    "Connect to HOST:PORT as a TLS client asking for a staple (status_request), and verify it "
    "against the chain the server sent (leaf, issuer): status, thisUpdate, nextUpdate, "
    "remaining validity."
)
EPILOG = """\
exit codes:
  0  a verified good staple
  1  a verified staple saying the certificate is REVOKED
  2  usage or connection error (refused, timeout, handshake or --cafile verification failed)
  3  no staple
  4  a staple that does not verify (signature, CertID, expired, unknown status...), or cannot
     be verified: the server sent only its leaf and --cafile holds no issuer
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="HOST:PORT", help="port 443 if omitted")
    parser.add_argument(
        "--cafile", metavar="F", help="also verify the chain and name against these CAs"
    )
    parser.add_argument("--servername", metavar="N", help="SNI name (default: HOST unless an IP)")
    versions = parser.add_mutually_exclusive_group()
    versions.add_argument("--tls1_2", action="store_true", help="use TLS 1.2 only")
    versions.add_argument("--tls1_3", action="store_true", help="use TLS 1.3 only")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds for it all (%(default)s)"
    )


async def run(args: argparse.Namespace, out: TextIO) -> int:
    try:
        host, port = parse_target(args.target)
    except ValueError as exc:
        print(f"staple probe: {exc}", file=sys.stderr)
        return EXIT_CONNECTION
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
