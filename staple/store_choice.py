"""Which store a server uses, chosen the same way by the ``staple`` commands (``--cache-dir``,
``--store``) and by servers started by someone else's program (gunicorn, uvicorn), which read
environment variables since there is no command line of ours:

- ``STAPLE_STORE=redis://HOST:PORT/DB`` (or ``rediss://``, ``unix://``): a
  :class:`~staple.RedisStore` shared by the fleet;
- else a :class:`~staple.FileStore` in :func:`default_cache_dir`: ``STAPLE_CACHE_DIR``, else
  the user's cache directory.

Every worker process makes its own store object over the same place, so the workers of one
machine (FileStore) or a whole fleet (Redis) share responses.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .store import FileStore, Store

if TYPE_CHECKING:
    from .redis_store import RedisStore

__all__ = [
    "STORE_SCHEMES",
    "check_store_url",
    "default_cache_dir",
    "store_from_environment",
    "store_from_url",
]

STORE_SCHEMES = ("redis://", "rediss://", "unix://")


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$STAPLE_CACHE_DIR``, else ``$XDG_CACHE_HOME/staple``, else ``~/.cache/staple``: per
    user, survives restarts, shared by every command and worker that runs as that user."""
    env = os.environ if environ is None else environ
    explicit = env.get("STAPLE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "staple"


def check_store_url(url: str) -> None:
    """Raises ValueError unless ``url`` names a Redis store."""
    if not url.startswith(STORE_SCHEMES):
        raise ValueError(f"store URL {url!r}: expected redis://HOST:PORT/DB")


def store_from_url(url: str) -> RedisStore:
    """A :class:`~staple.RedisStore` for ``url`` (not connected yet); ValueError for any
    other scheme."""
    check_store_url(url)
    from .redis_store import RedisStore  # redis loads only for fleets

    return RedisStore(url)


def store_from_environment(environ: Mapping[str, str] | None = None) -> Store:
    """``STAPLE_STORE``, else a FileStore in :func:`default_cache_dir`. Raises ValueError for a
    ``STAPLE_STORE`` that is no Redis URL."""
    env = os.environ if environ is None else environ
    url = env.get("STAPLE_STORE")
    if url:
        try:
            return store_from_url(url)
        except ValueError as exc:
            raise ValueError(f"STAPLE_STORE: {exc}") from None
    return FileStore(default_cache_dir(env))
