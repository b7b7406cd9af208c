"""The store a server started by someone else's program uses (gunicorn, uvicorn): the same as
``staple serve``'s, chosen by environment variables since there is no command line of ours.

- ``STAPLE_STORE=redis://HOST:PORT/DB`` (or ``rediss://``, ``unix://``): a
  :class:`~staple.RedisStore` shared by the fleet;
- else ``STAPLE_CACHE_DIR=DIR``: a :class:`~staple.FileStore` there;
- else ``staple serve``'s default cache directory (:func:`staple._serve.default_cache_dir`).

Every worker process makes its own store object over the same place, so the workers of one
machine (FileStore) or a whole fleet (Redis) share responses.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ._serve import default_cache_dir
from .store import FileStore, Store

__all__ = ["STORE_SCHEMES", "store_from_environment", "store_from_url"]

STORE_SCHEMES = ("redis://", "rediss://", "unix://")


def store_from_url(url: str) -> Store:
    """A :class:`~staple.RedisStore` for ``url``; :exc:`ValueError` for any other scheme."""
    if not url.startswith(STORE_SCHEMES):
        raise ValueError(f"store URL {url!r}: expected redis://HOST:PORT/DB")
    from .redis_store import RedisStore  # redis loads only for fleets

    return RedisStore(url)


def store_from_environment(environ: Mapping[str, str] | None = None) -> Store:
    """``STAPLE_STORE``, else ``STAPLE_CACHE_DIR``, else the default cache directory."""
    env = os.environ if environ is None else environ
    url = env.get("STAPLE_STORE")
    if url:
        try:
            return store_from_url(url)
        except ValueError as exc:
            raise ValueError(f"STAPLE_STORE: {exc}") from None
    return FileStore(env.get("STAPLE_CACHE_DIR") or default_cache_dir())
