"""Small static files served from memory, in front of aiohttp's static route.

:class:`SmallFiles` answers requests for regular files up to :data:`SMALL_FILE` from memory,
revalidated by ``os.stat`` on every request; everything else (larger files, ``Range`` and
``If-Match`` requests, directory indexes, refusals) goes to aiohttp's ``add_static``, i.e.
``FileResponse`` and ``loop.sendfile``. ``staple serve --static DIR`` uses it::

    static = app.router.add_static("/static/", root, show_index=True)
    files = SmallFiles(root)
    app.middlewares.append(files.middleware(static))
"""

from __future__ import annotations

import mimetypes
import os
import stat
import time
from collections import OrderedDict
from pathlib import Path

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

__all__ = ["MEMORY_BUDGET", "SETTLED_NS", "SMALL_FILE", "SmallFiles"]

SMALL_FILE = 64 * 1024
"""Regular files up to this size are served from memory; larger ones by ``FileResponse``."""
MEMORY_BUDGET = 16 * 1024 * 1024
"""At most this many bytes of files are kept; the least recently served go first."""
SETTLED_NS = 2_000_000_000
"""A file changed (ctime) less than this long before it was read is not kept: see
:class:`SmallFiles`."""

_ENCODINGS = ((".br", "br"), (".gz", "gzip"))  # aiohttp's precompressed siblings, in its order
_CONTENT_TYPES = mimetypes.MimeTypes()  # set up as aiohttp's FileResponse does its own
_CONTENT_TYPES.encodings_map.clear()  # "x.tar.gz" is application/gzip, not a gzipped tar
for _type, _ext in (
    ("application/gzip", ".gz"),
    ("application/x-brotli", ".br"),
    ("application/x-bzip2", ".bz2"),
    ("application/x-compress", ".Z"),
    ("application/x-xz", ".xz"),
):
    _CONTENT_TYPES.add_type(_type, _ext)

_Identity = tuple[int, int, int, int, int]


def _identity(st: os.stat_result) -> _Identity:
    """What changes when a file is replaced (device, inode) or written (size, mtime, ctime)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _File:
    """A small file's bytes and the headers ``FileResponse`` would send with them."""

    __slots__ = ("body", "etag", "headers", "identity", "mtime", "not_modified", "real")

    def __init__(self, real: str, body: bytes, st: os.stat_result) -> None:
        self.real = real
        self.body = body
        self.identity = _identity(st)
        self.mtime = st.st_mtime
        self.etag = f"{st.st_mtime_ns:x}-{st.st_size:x}"  # FileResponse's, so both agree
        # Formatted by aiohttp's own setters, so the bytes on the wire match FileResponse's.
        like = web.StreamResponse()
        like.etag = self.etag
        like.last_modified = st.st_mtime
        self.not_modified = dict(like.headers)
        like.content_type = _CONTENT_TYPES.guess_type(real)[0] or "application/octet-stream"
        like.headers[hdrs.ACCEPT_RANGES] = "bytes"
        self.headers = dict(like.headers)


class SmallFiles:
    """Serve ``--static``'s small regular files from memory, in front of aiohttp's static route.

    Why: ``FileResponse`` hands ``stat``/``open``/``read``/``close`` to the default executor
    (thread hand-offs on every request) and streams through the sendfile fallback; profiled
    under ``bench nginx``, ``GET /static/hello.txt`` cost ~1,340 µs of server CPU against
    ~940 µs for ``/status.json``. From memory, a request costs one ``os.stat``.

    Every request is revalidated: ``os.stat`` of the requested path (following symlinks, as
    the first lookup did) must give the same device, inode, size, mtime and ctime as the bytes
    kept, so an edit, a replacement (rename over it) or a removal is seen by the very next
    request. A file whose ctime is less than :data:`SETTLED_NS` old when read is served but not
    kept: timestamps are coarse (a kernel tick, 1–10 ms; seconds on some filesystems), and a
    same-size rewrite within one tick would otherwise look unchanged (git's "racily clean").

    The ``stat`` (and, on a miss, ``realpath``, ``open`` and a read of at most 64 KiB) run
    synchronously on the event loop. That is deliberate: on a local filesystem they are
    microseconds from the dentry and page caches, far less than a thread hand-off, and it is
    what nginx does too (its ``open``/``fstat``/``read`` block its worker; ``open_file_cache``
    only skips them for a while). On a network filesystem a ``stat`` can stall the loop for a
    round trip: serve ``--static`` from local disk.

    Anything else is left to aiohttp's static route, unchanged: files over :data:`SMALL_FILE`,
    non-regular files, directories (the index), anything missing or refused (403/404), requests
    with ``Range``, ``If-Match`` or ``If-Unmodified-Since``, and files with a precompressed
    ``.br``/``.gz`` sibling the client accepts. ``If-None-Match`` and ``If-Modified-Since`` are
    answered here with ``FileResponse``'s rules (304, same ETag and Last-Modified).

    Path safety: a path is kept only after the checks aiohttp's static route makes (not
    absolute, no NUL, ``realpath`` inside the root, so no ``..`` and no symlink leads out);
    what it names is then identified by inode, so a kept path that is later swapped for a
    symlink pointing elsewhere no longer matches and is checked afresh.
    """

    def __init__(
        self, root: Path, *, max_size: int = SMALL_FILE, budget: int = MEMORY_BUDGET
    ) -> None:
        self.root = root.expanduser().resolve(strict=True)  # as add_static resolves it
        self.max_size = max_size
        self.budget = budget
        self.served = 0
        """Responses answered from memory (200 and 304)."""
        self.size = 0
        """Bytes kept."""
        self._base = os.path.join(self.root, "")  # "ROOT/"; joined by +, never os.path.join
        self._files: OrderedDict[str, _File] = OrderedDict()  # by requested path, LRU first

    def __len__(self) -> int:
        return len(self._files)

    def middleware(self, static: web.AbstractResource) -> Middleware:
        """A middleware answering requests routed to ``static`` when it can, else passing on."""

        @web.middleware
        async def small_files(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.match_info.route.resource is static:
                response = self.respond(request)
                if response is not None:
                    return response
            return await handler(request)

        return small_files

    def respond(self, request: web.Request) -> web.Response | None:
        """The response for a request to the static route, or ``None``: ask ``FileResponse``."""
        headers = request.headers
        if hdrs.RANGE in headers or hdrs.IF_MATCH in headers or hdrs.IF_UNMODIFIED_SINCE in headers:
            return None
        file = self.get(request.match_info["filename"])
        if file is None:
            return None
        accepted = headers.get(hdrs.ACCEPT_ENCODING)
        if accepted and _has_precompressed(file.real, accepted.lower()):
            return None
        self.served += 1
        etags = request.if_none_match
        if etags is not None:
            if (len(etags) == 1 and etags[0].value == "*") or any(
                etag.value == file.etag for etag in etags
            ):
                return web.Response(status=304, headers=file.not_modified)
        elif (since := request.if_modified_since) is not None and file.mtime <= since.timestamp():
            return web.Response(status=304, headers=file.not_modified)
        return web.Response(body=file.body, headers=file.headers)

    def get(self, filename: str) -> _File | None:
        """``filename`` (relative to the root, as routed) if it is a small regular file inside
        the root, as it is now; ``None`` for anything else."""
        path = self._base + filename
        file = self._files.get(filename)
        if file is not None:
            try:
                current = _identity(os.stat(path))
            except OSError:
                current = None
            if current == file.identity:
                self._files.move_to_end(filename)
                return file
            self._forget(filename)
        return self._load(filename, path)

    def _load(self, filename: str, path: str) -> _File | None:
        if "\x00" in filename or os.path.isabs(filename):  # aiohttp: 404
            return None
        try:
            real = Path(path).resolve()
            real.relative_to(self.root)  # ValueError: ".." or a symlink leads out
            st = os.stat(real)
        except (OSError, ValueError, RuntimeError):  # RuntimeError: a symlink loop
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size > self.max_size:
            return None
        try:
            # O_NONBLOCK: were it swapped for a FIFO since the stat, open must not wait.
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            body = b""
            while chunk := os.read(fd, self.max_size + 1 - len(body)):
                body += chunk
            read = os.fstat(fd)
        except OSError:
            return None
        finally:
            os.close(fd)
        if len(body) != read.st_size or _identity(read) != _identity(st):
            return None  # changed while read: FileResponse serves whatever it finds
        file = _File(str(real), body, read)
        if time.time_ns() - read.st_ctime_ns >= SETTLED_NS:
            self._keep(filename, file)
        return file

    def _keep(self, filename: str, file: _File) -> None:
        self._files[filename] = file
        self.size += len(file.body)
        while self.size > self.budget:
            _, evicted = self._files.popitem(last=False)
            self.size -= len(evicted.body)

    def _forget(self, filename: str) -> None:
        self.size -= len(self._files.pop(filename).body)


def _has_precompressed(real: str, accepted: str) -> bool:
    """Whether ``FileResponse`` would send a ``.br``/``.gz`` sibling instead (it ``lstat``s)."""
    for extension, encoding in _ENCODINGS:
        if encoding in accepted:
            try:
                if stat.S_ISREG(os.lstat(real + extension).st_mode):
                    return True
            except OSError:
                continue
    return False
