"""``staple sync``: verified staple files for nginx, HAProxy and Envoy (:mod:`staple.sync`).

Runs the same handles, refresher, policy and store as ``staple serve``, and keeps one DER file
per certificate current: written atomically when the response changes, retired at its stop
moment, pushed to HAProxy's admin sockets, followed by ``--on-change``. ``--once`` fetches,
writes, pushes and exits (for cron); otherwise it runs until SIGINT/SIGTERM.

Exit codes: 0 every response good, 1 one revoked, 2 usage or could not start, 3 one unknown to
its responder, 4 one without a valid response (``--once``; a service exits 0 when stopped).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from ..errors import ChainError, NoResponderError
from ..proxy import ProxyOption
from ..status_page import status_line
from ..store import Store
from ..sync import OnExpiry, StapleFiles
from .options import (
    add_proxy_argument,
    add_store_arguments,
    open_store,
    proxy_option,
    store_url_problem,
)

__all__ = ["add_arguments", "run"]

EXIT_OK, EXIT_USAGE = 0, 2

HELP = "keep OCSP staple files current for nginx, HAProxy and Envoy"
DESCRIPTION = (
    "Fetch, verify and keep current one DER OCSP response file per certificate (nginx "
    "ssl_stapling_file, HAProxy <crt>.ocsp, Envoy ocsp_staple): written atomically when it "
    "changes, retired before it goes stale, pushed to HAProxy's admin socket."
)
EPILOG = """\
examples:
  staple sync --cert site.pem --out /etc/nginx/site.ocsp --on-expiry try-later \\
              --on-change 'nginx -s reload'
  staple sync --cert site.pem --out /etc/haproxy/site.pem.ocsp \\
              --haproxy-socket /run/haproxy/admin.sock

--on-expiry: nginx refuses to reload with a missing or empty file and then keeps stapling what
it had loaded, however stale; 'try-later' writes a tryLater response it staples instead, which
clients treat as no staple. HAProxy takes 'remove' (default) or 'empty'.

exit codes (--once): 0 all good, 1 one revoked, 2 usage, 3 one unknown, 4 one without a valid
response. As a service: 0 after SIGINT/SIGTERM, 2 when it cannot start.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cert",
        metavar="CHAIN.pem",
        action="append",
        required=True,
        help="leaf certificate then its issuer; repeat, each followed by its --out",
    )
    parser.add_argument(
        "--out", metavar="FILE", action="append", required=True, help="one per --cert"
    )
    parser.add_argument(
        "--haproxy-socket",
        metavar="PATH",
        action="append",
        default=[],
        help="an HAProxy admin socket (path, or HOST:PORT) to push each new response to; repeat",
    )
    parser.add_argument(
        "--on-change", metavar="CMD", help="shell command run after each batch of changes"
    )
    parser.add_argument(
        "--on-change-timeout",
        metavar="S",
        type=float,
        default=30.0,
        help="seconds before --on-change is killed (30)",
    )
    parser.add_argument(
        "--on-expiry",
        choices=[e.value for e in OnExpiry],
        default=OnExpiry.REMOVE.value,
        help="what becomes of a file with no valid response left (remove)",
    )
    parser.add_argument("--once", action="store_true", help="fetch, write, push, then exit")
    add_store_arguments(parser)
    add_proxy_argument(parser)
    parser.add_argument(
        "--responder", metavar="URL", help="ask this OCSP URL instead of each certificate's AIA one"
    )


async def run(args: argparse.Namespace, out: TextIO) -> int:
    if len(args.cert) != len(args.out):
        return _usage(
            f"{len(args.cert)} --cert but {len(args.out)} --out: give one --out after each --cert"
        )
    bad_store = store_url_problem(args.store)
    if bad_store is not None:
        return _usage(bad_store)
    try:
        proxy = proxy_option(args.proxy)
    except ValueError as exc:
        return _usage(f"--proxy: {exc}")
    # What happens to the files is what an operator wants to see, with or without -v.
    logging.getLogger("staple.sync").setLevel(logging.INFO)
    store = await open_store(
        cache_dir=None if args.no_cache else args.cache_dir, store_url=args.store
    )
    with _stop_on_signals() as stop:
        try:
            return await _sync(args, out, store, stop, proxy)
        finally:
            await store.close()


async def _sync(
    args: argparse.Namespace, out: TextIO, store: Store, stop: asyncio.Event, proxy: ProxyOption
) -> int:
    files = StapleFiles(
        haproxy_sockets=args.haproxy_socket,
        on_change=args.on_change,
        on_change_timeout=args.on_change_timeout,
        on_expiry=args.on_expiry,
        store=store,
        proxy=proxy,
    )
    async with files:
        responder_urls = [args.responder] if args.responder else None
        opened = await asyncio.gather(
            *(
                files.add(Path(chain), Path(target), responder_urls=responder_urls)
                for chain, target in zip(args.cert, args.out, strict=True)
            ),
            return_exceptions=True,
        )
        for chain, outcome in zip(args.cert, opened, strict=True):
            if isinstance(outcome, ChainError | NoResponderError | ValueError):
                return _usage(f"{chain}: {outcome}")
            if isinstance(outcome, BaseException):
                raise outcome
        await files.flush()  # the start-up batch's --on-change, before saying we're up
        for handle, output in files.outputs():
            print(f"{output}: {status_line(handle)}", file=out, flush=True)
        if args.once:
            return files.status()
        await stop.wait()
        return EXIT_OK


def _usage(reason: str) -> int:
    print(f"staple sync: {reason}", file=sys.stderr, flush=True)
    return EXIT_USAGE


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[asyncio.Event]:
    """An event SIGINT and SIGTERM set, from before the first fetch until the command ends."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in signals:
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
