"""Options several commands share: the store (``--cache-dir``, ``--no-cache``,
``--store redis://...``) and opening it; the responder proxy (``--proxy``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..proxy import ProxyOption, ProxySettings
from ..store import FileStore, MemoryStore, Store
from ..store_choice import check_store_url, default_cache_dir, store_from_url

__all__ = [
    "add_proxy_argument",
    "add_store_arguments",
    "default_cache_dir",
    "open_store",
    "proxy_option",
    "store_url_problem",
]


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    cache = parser.add_mutually_exclusive_group()
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


def store_url_problem(url: str | None) -> str | None:
    """Why ``--store URL`` is unusable, or ``None`` when it is fine (or not given)."""
    if url is None:
        return None
    try:
        check_store_url(url)
    except ValueError:
        return f"--store {url!r}: expected redis://HOST:PORT/DB"
    return None


async def open_store(*, cache_dir: str | os.PathLike[str] | None, store_url: str | None) -> Store:
    """The store the options name: Redis (connected, so no fleet notice is missed; Redis being
    down is not fatal, the store fails open), else a :class:`FileStore`, else memory."""
    if store_url is not None:
        store = store_from_url(store_url)
        await store.connect()  # subscribe before the first fetch: no fleet notice is missed
        return store
    if cache_dir is not None:
        return FileStore(cache_dir)
    return MemoryStore()


def add_proxy_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--proxy",
        metavar="URL",
        help="fetch from responders through this HTTP proxy (http://[USER:PASS@]HOST:PORT); "
        "'none' for none; default: the http_proxy/https_proxy/no_proxy environment, as curl",
    )


def proxy_option(value: str | None) -> ProxyOption:
    """``--proxy VALUE`` as ``proxy=`` takes it. Raises ValueError for an unusable URL."""
    if value is None:
        return None
    if value.strip().lower() == "none":
        return False
    ProxySettings.resolve(value)  # refuse a bad URL up front, with its reason
    return value
