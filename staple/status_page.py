"""What a stapling server staples, for people: a status line per certificate, an HTML page
and its JSON twin.

:func:`status_of` turns a handle into plain data; :func:`status_line` is the line ``staple
serve`` prints per certificate at start; :func:`render_page` the ``/`` page (every value
HTML-escaped); :func:`status_app` serves ``/``, ``/status.json`` and ``/static/`` under a
:class:`~staple.aiohttp.StaplingServer`.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from . import ocsp
from .aiohttp import SERVER_KEY
from .handle import ServerOcspResponse
from .server_context import host_names
from .static_files import SmallFiles

__all__ = ["render_page", "status_app", "status_line", "status_of"]


def status_of(handle: ServerOcspResponse) -> dict[str, Any]:
    """What a certificate's handle staples right now (or why nothing), as plain data."""
    info: dict[str, Any] = {
        "certificate": handle.subject,
        "names": sorted(host_names(handle.cert)),
        "responders": list(handle.urls),
        "stapling": False,
        "status": None,
        "this_update": None,
        "next_update": None,
        "next_refresh": _iso(handle.next_refresh),
        "reason": None,
    }
    ctx = handle.get_context()
    if ctx is None:
        info["reason"] = str(handle.last_error) if handle.last_error else "no response yet"
        held = handle.response  # e.g. a revocation the policy withholds
        if held is not None:
            info["status"] = held.cert_status.name.lower()
        return info
    with ctx:
        info.update(
            stapling=True,
            status=ctx.cert_status.name.lower(),
            this_update=_iso(ctx.this_update),
            next_update=_iso(ctx.next_update),
            size=len(ctx.encoded),
        )
        if ctx.revocation_time is not None:
            info["revocation_time"] = _iso(ctx.revocation_time)
    return info


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds") if moment is not None else None


def status_line(handle: ServerOcspResponse) -> str:
    """One line per certificate, as ``staple serve`` prints it at start."""
    info = status_of(handle)
    head = f"{info['certificate']} [{', '.join(info['names'])}]"
    if not info["stapling"]:
        return f"{head}: NO STAPLE: {info['reason']}; next attempt {info['next_refresh']}"
    line = f"{head}: stapling {info['status']}"
    if "revocation_time" in info:
        line += f" (revoked {info['revocation_time']})"
    return (
        f"{line}, nextUpdate {info['next_update']}, next refresh {info['next_refresh']}"
        if info["next_refresh"]
        else f"{line}, nextUpdate {info['next_update']}"
    )


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>staple serve</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: .3em .6em; text-align: left; vertical-align: top; }}
.good {{ color: #060; }} .revoked, .none {{ color: #a00; }}
</style></head>
<body>
<h1>staple serve</h1>
<p>{summary}</p>
<table>
<tr><th>certificate</th><th>names</th><th>staple</th><th>thisUpdate</th><th>nextUpdate</th>
<th>next refresh</th></tr>
{rows}
</table>
<p>This connection: {connection}. Same data as JSON: <a href="/status.json">/status.json</a>.
{static}</p>
</body></html>
"""


def render_page(
    statuses: Sequence[dict[str, Any]], *, stapled: int, connection: str, static: bool = False
) -> str:
    """The ``/`` page; every value from a certificate or an error is HTML-escaped."""
    rows = []
    for info in statuses:
        if info["stapling"]:
            staple = f'<span class="{info["status"]}">{html.escape(info["status"])}</span>'
        else:
            staple = f'<span class="none">none: {html.escape(str(info["reason"]))}</span>'
        cells = [
            html.escape(info["certificate"]),
            html.escape(", ".join(info["names"])),
            staple,
            html.escape(info["this_update"] or "-"),
            html.escape(info["next_update"] or "-"),
            html.escape(info["next_refresh"] or "-"),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return _PAGE.format(
        summary=f"{len(statuses)} certificate(s); {stapled} handshake(s) stapled so far.",
        rows="\n".join(rows),
        connection=html.escape(connection),
        static='Files: <a href="/static/">/static/</a>.' if static else "",
    )


def status_app(*, static: Path | None = None, files: SmallFiles | None = None) -> web.Application:
    """The status page as an app for :class:`~staple.aiohttp.StaplingServer`, which it reads
    through ``app[SERVER_KEY]``: ``/`` (HTML), ``/status.json`` and, with ``static``, the files
    under ``/static/`` (small ones from ``files``, if given)."""
    app = web.Application()

    async def index(request: web.Request) -> web.Response:
        server = request.app[SERVER_KEY]
        page = render_page(
            [status_of(h) for h in server.handles],
            stapled=server.stapler.stapled,
            connection=_describe_connection(request),
            static=static is not None,
        )
        return web.Response(text=page, content_type="text/html")

    async def status(request: web.Request) -> web.Response:
        server = request.app[SERVER_KEY]
        body = {
            "stapled": server.stapler.stapled,
            "unstapled": server.stapler.unstapled,
            "certificates": [status_of(h) for h in server.handles],
        }
        return web.Response(text=json.dumps(body, indent=2), content_type="application/json")

    app.router.add_get("/", index)
    app.router.add_get("/status.json", status)
    if static is not None:
        resource = app.router.add_static("/static/", static, show_index=True)
        if files is not None:
            app.middlewares.append(files.middleware(resource))
    return app


def _describe_connection(request: web.Request) -> str:
    transport = request.transport
    conn = transport.get_extra_info("ssl_object") if transport is not None else None
    if conn is None:
        return "unknown"
    try:
        cert = conn.get_certificate(as_cryptography=True)
        served = ocsp.describe(cert) if cert is not None else "no certificate"
        name = conn.get_servername()
        sni = name.decode("ascii", "replace") if name else "none"
        return f"{conn.get_protocol_version_name()}, SNI {sni}, certificate {served}"
    except Exception:  # cosmetic: never fail the page over it
        return "unknown"
