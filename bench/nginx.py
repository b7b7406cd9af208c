"""6. ``staple serve`` against nginx: same certificates, same responder, same client.

nginx (Debian's package, when installed) runs from its own prefix and config in a temporary
directory on 127.0.0.1: one worker, ``ssl_stapling on``, ``ssl_stapling_verify on`` with the
root and intermediate as ``ssl_trusted_certificate``, ``ssl_stapling_responder`` pointing at
the same pre-signed responder process (``bench._responder``) that ``staple serve
--responder`` uses; no ``resolver`` is needed for an IP URL. Both serve the same small static
file (``GET /static/hello.txt``); the C client makes a full handshake (asking for a staple)
per request, from several processes.

First, each server is started cold and asked once: is its first handshake stapled? (nginx
fetches lazily, inside the first handshake that asks, and staples from the next one on;
``staple serve`` waits for a verified response before it listens.) Then handshakes per second
and server CPU per handshake (nginx's worker; ``staple serve``'s process), alternating.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import getpass
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from . import _client, _env, _proc
from ._harness import KEY_NAMES, Bench, HandshakeRun, Section, alternate, handshake_run
from ._pki import Material
from ._stats import Ratio, Row, median

PATH = "/static/hello.txt"
TARGET = 0.9

NGINX_CONF = """\
daemon off;
{user}master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
{http_extra}    server {{
        listen 127.0.0.1:{port} ssl;
        server_name bench.test;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {chain};
        ssl_certificate_key {key};
        ssl_stapling on;
        ssl_stapling_verify on;
        ssl_trusted_certificate {trusted};
        ssl_stapling_responder {responder};
        {locations}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)


class Nginx:
    """nginx with one worker; ``cpu()`` is the worker's. ``locations`` replaces the server's
    ``location /static/`` block, ``http_extra`` goes in ``http {}`` before the server (the
    ``e2e`` section's reverse proxy: an ``upstream`` and ``location / { proxy_pass ... }``)."""

    def __init__(
        self,
        binary: str,
        directory: Path,
        m: Material,
        www: Path,
        responder: str,
        *,
        locations: str | None = None,
        http_extra: str = "",
    ):
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (directory / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        (directory / "logs").mkdir(exist_ok=True)
        self.conf = directory / "nginx.conf"
        self.conf.write_text(
            NGINX_CONF.format(
                # Workers drop to "nobody", who cannot read a private temp directory.
                user=f"user {getpass.getuser()};\n" if os.geteuid() == 0 else "",
                dir=directory,
                port=self.port,
                chain=m.chain,
                key=m.key,
                trusted=m.trusted,
                responder=responder,
                locations=locations or f"location /static/ {{ root {www.parent}; }}",
                http_extra=http_extra,
            )
        )
        self.process: asyncio.subprocess.Process | None = None
        self.worker = 0

    async def __aenter__(self) -> Nginx:
        self.process = await asyncio.create_subprocess_exec(
            self.binary,
            "-p",
            str(self.directory),
            "-c",
            str(self.conf),
            "-e",
            str(self.directory / "error.log"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await wait_for_port(self.port)
        for _ in range(100):
            workers = _proc.children(self.process.pid)
            if workers:
                self.worker = workers[0]
                break
            await asyncio.sleep(0.05)
        return self

    def cpu(self) -> float:
        return _proc.cpu_seconds(self.worker)

    async def __aexit__(self, *exc_info: object) -> None:
        if self.process is not None:
            self.process.terminate()
            await self.process.wait()


class StapleServe:
    """``python -m staple serve`` (the CLI, unmodified) on a free port."""

    def __init__(
        self, directory: Path, m: Material, www: Path, responder: str, transport: str = "memory"
    ):
        self.port = free_port()
        self.args = [
            "serve",
            "--transport",
            transport,
            "--cert",
            str(m.chain),
            "--key",
            str(m.key),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--cache-dir",
            str(directory / "cache"),
            "--responder",
            responder,
            "--static",
            str(www),
        ]
        self.process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> StapleServe:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "staple",
            *self.args,
            cwd=_proc.ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert self.process.stdout is not None
        while True:
            line = await asyncio.wait_for(self.process.stdout.readline(), 60)
            if not line:
                raise RuntimeError("staple serve exited before listening")
            if line.startswith(b"listening on"):
                break
        asyncio.get_running_loop().create_task(self._drain())
        return self

    async def _drain(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        while await self.process.stdout.readline():
            pass

    def cpu(self) -> float:
        assert self.process is not None
        return _proc.cpu_seconds(self.process.pid)

    async def __aexit__(self, *exc_info: object) -> None:
        if self.process is not None:
            self.process.terminate()
            await self.process.wait()


@contextlib.asynccontextmanager
async def responder_for(directory: Path, materials: list[Material]) -> AsyncIterator[str]:
    table = {
        f"{m.leaf.cert.serial_number:x}": base64.b64encode(m.responses["small"]).decode()
        for m in materials
    }
    path = directory / "responses.json"
    path.write_text(json.dumps(table))
    async with _proc.ChildProcess("bench._responder", str(path)) as responder:
        yield f"http://127.0.0.1:{responder.port}/ocsp"


async def run(bench: Bench) -> Section:
    section = Section()
    binary = _env.nginx_binary()
    if binary is None:
        section.rows.append(
            Row("nginx", "staple serve vs nginx", "skipped: nginx is not installed", "", None)
        )
        section.notes.append("apt-get install nginx (Debian) to run this section")
        return section
    section.raw["nginx"] = _env.nginx_version()
    rounds, seconds = (2, 0.4) if bench.quick else (5, 2.0)
    materials = [bench.material("ec"), bench.material("rsa")]
    top = bench.workdir / "nginx"
    www = top / "www" / "static"
    www.mkdir(parents=True, exist_ok=True)
    (www / "hello.txt").write_bytes(b"ok")
    async with responder_for(top, materials) as url:
        first = await _first_handshakes(binary, top, materials[0], www, url)
        section.rows += [
            Row(
                "nginx",
                f"first handshake after a cold start stapled? — {name}",
                "yes" if staple_len else "no (unstapled)",
                data={"staple_len": staple_len},
            )
            for name, staple_len in first.items()
        ]
        for m in materials:
            for tls_version in ("1.3", "1.2"):
                if m.key_type == "rsa" and tls_version == "1.2" and bench.quick:
                    continue
                label = f"{KEY_NAMES[m.key_type]}, TLS {tls_version}"
                d = top / f"{m.key_type}-{tls_version}"
                async with (
                    Nginx(binary, d / "nginx", m, www, url) as nginx,
                    StapleServe(d / "staple", m, www, url) as serve,
                    StapleServe(d / "staple-socket", m, www, url, "socket") as socket_serve,
                ):
                    by_name: dict[str, Any] = {
                        "staple serve": serve,
                        "nginx": nginx,
                        "staple serve --transport socket": socket_serve,
                    }
                    for target in by_name.values():  # warm up; nginx fetches its staple
                        await handshake_run(
                            target, seconds=0.5, procs=3, tls=tls_version, path=PATH
                        )

                    async def one(
                        name: str, tls_version: str = tls_version, by_name: dict[str, Any] = by_name
                    ) -> HandshakeRun:
                        return await handshake_run(
                            by_name[name], seconds=seconds, procs=3, tls=tls_version, path=PATH
                        )

                    results = await alternate(list(by_name), one, rounds)
                _rows(section, label, results)
    return section


async def _first_handshakes(
    binary: str, top: Path, m: Material, www: Path, url: str
) -> dict[str, int]:
    out = {}
    async with Nginx(binary, top / "first-nginx", m, www, url) as nginx:
        out["nginx"] = (await _client.get(nginx.port, PATH, tls="1.3"))["staple_len"]
    async with StapleServe(top / "first-staple", m, www, url) as serve:
        out["staple serve"] = (await _client.get(serve.port, PATH, tls="1.3"))["staple_len"]
    return out


def _rows(section: Section, label: str, results: dict[str, list[HandshakeRun]]) -> None:
    for variant in ("staple serve", "staple serve --transport socket"):
        _variant_rows(section, label, variant, results)
    section.raw[label] = {name: [r.as_json() for r in runs] for name, runs in results.items()}


def _variant_rows(
    section: Section, label: str, variant: str, results: dict[str, list[HandshakeRun]]
) -> None:
    ours, theirs = results[variant], results["nginx"]
    rate = Ratio.of([r.rate for r in ours], [r.rate for r in theirs])
    cpu = Ratio.of([r.cpu_us for r in ours], [r.cpu_us for r in theirs])
    stapled = {
        n: sum(r.stapled for r in runs) / max(sum(r.ok for r in runs), 1)
        for n, runs in results.items()
    }
    o_rate, t_rate = median([r.rate for r in ours]), median([r.rate for r in theirs])
    o_busy, t_busy = median([r.busy for r in ours]), median([r.busy for r in theirs])
    section.rows.append(
        Row(
            "nginx",
            f"handshakes/s {variant}÷nginx — {label}",
            f"{rate}  [{o_rate:,.0f} vs {t_rate:,.0f}/s; busy {o_busy:.2f} vs {t_busy:.2f} cores]",
            f"≥ {TARGET:.1f}×",
            round(rate.median, 2) >= TARGET,
            {"ratio": rate.__dict__, "stapled_fraction": stapled},
        )
    )
    o_us, t_us = median([r.cpu_us for r in ours]), median([r.cpu_us for r in theirs])
    section.rows.append(
        Row(
            "nginx",
            f"server CPU/handshake {variant}÷nginx — {label}",
            f"{cpu}  [{o_us:,.0f} vs {t_us:,.0f} µs → one core: {1e6 / o_us:,.0f} vs "
            f"{1e6 / t_us:,.0f}/s]",
            "",
            None,
            {"ratio": cpu.__dict__},
        )
    )
