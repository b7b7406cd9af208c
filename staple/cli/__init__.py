"""The ``staple`` command: ``check`` a certificate's OCSP status, ``serve`` HTTPS with staples,
``sync`` staple files for nginx and HAProxy, ``probe`` a server for its staple, ``status`` of
what a store holds, ``demo`` the whole thing. One module per command, each with
``add_arguments(parser)`` and ``run(args, out)``; this one holds the parser and dispatches.

``main(argv)`` is what the console script (and ``python -m staple``) calls; ``run(argv)`` is the
same as a coroutine, so tests drive the CLI in-process on their own event loop.

Exit codes of ``check``: 0 good, 1 revoked, 2 usage, 3 unknown, 4 no valid response.
Exit codes of ``serve``: 0 after SIGINT/SIGTERM, 2 when it cannot start.
Exit codes of ``sync --once``: as ``check``'s, for the worst certificate; as a service, 0 after
SIGINT/SIGTERM, 2 when it cannot start.
Exit codes of ``probe``: 0 verified good staple, 1 revoked, 2 usage or connection error,
3 no staple, 4 invalid (or unverifiable) staple.
Exit codes of ``status``: 0 every response of a recorded certificate valid past the margin,
1 one revoked, 2 usage or unreadable store, 4 one expired, invalid or missing.
Exit codes of ``demo``: 0 (``--check``: every check that could run passed), 1 a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from types import ModuleType
from typing import TextIO

from .. import __version__
from . import check, demo, probe, serve, status, sync

__all__ = ["main", "run"]

COMMANDS: dict[str, ModuleType] = {
    "check": check,
    "serve": serve,
    "sync": sync,
    "probe": probe,
    "status": status,
    "demo": demo,
}
"""Each command's module: ``HELP``, ``DESCRIPTION``, ``EPILOG``, ``add_arguments``, ``run``."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="staple", description="OCSP stapling for Python TLS servers."
    )
    parser.add_argument("--version", action="version", version=f"staple {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log refresher events to stderr"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        command = sub.add_parser(
            name,
            help=module.HELP,
            description=module.DESCRIPTION,
            epilog=module.EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter
            if module.EPILOG
            else argparse.HelpFormatter,
        )
        module.add_arguments(command)
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
        command: Callable[[argparse.Namespace, TextIO], Awaitable[int]]
        command = COMMANDS[args.command].run
        return await command(args, out)
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
    for everything else, and when uvloop is asked for but missing (``serve`` says so)."""
    if args.command != "serve":
        return None
    try:
        return serve.loop_factory(args.loop)
    except serve.LoopUnavailable:
        return None
