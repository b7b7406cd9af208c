"""``python -m bench [SECTION ...] [--quick] [--json FILE]``: run, print a table, write JSON.

Sections (all by default, in this order): ``getter`` (get_context + free, the OCSP callback,
validation), ``handshakes`` (staple.tls + aiohttp vs stdlib ssl + aiohttp), ``instructions``
(the same under callgrind), ``calls`` (Python calls and allocations per new connection),
``tlslayer`` (the TLS layers alone), ``stapling`` (what
stapling costs a handshake, and where), ``bulk`` (200 MB down and up), ``scale`` (10,000 chains
against a responder in another process), ``nginx`` (``staple serve`` vs nginx), ``servers``
(staple.uvicorn, staple.gunicorn and staple.aiohttp vs the same servers on stdlib ssl),
``e2e`` (nginx in front of an aiohttp or ASGI app vs staple in the app's process: total server
CPU per request, with the app alone on plain HTTP as the floor).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from . import (
    _client,
    _env,
    _proc,
    bulk,
    calls,
    core,
    e2e,
    handshakes,
    instructions,
    nginx,
    report,
    scale,
    servers,
    stapling,
    tlslayer,
)
from ._harness import Bench, Section
from ._stats import Row, verdict

SECTIONS: dict[str, Callable[[Bench], Awaitable[Section]]] = {
    "getter": core.run,
    "handshakes": handshakes.run,
    "instructions": instructions.run,
    "calls": calls.run,
    "tlslayer": tlslayer.run,
    "stapling": stapling.run,
    "bulk": bulk.run,
    "scale": scale.run,
    "nginx": nginx.run,
    "servers": servers.run,
    "e2e": e2e.run,
}
ALIASES = {"core": "getter", "refresher": "scale", "bulk-transfer": "bulk"}
# Benchmarks other people own (bench/fleet.py, bench/soak.py): run only when named, through
# their own ``run(quick) -> dict``, each figure becoming a row.
EXTERNAL = ("fleet", "soak")


def external(name: str) -> Callable[[Bench], Awaitable[Section]]:
    async def run(bench: Bench) -> Section:
        module = importlib.import_module(f"bench.{name}")
        if not hasattr(module, "run"):  # a command of its own: run it, keep what it printed
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                f"bench.{name}",
                cwd=_proc.ROOT,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await process.communicate()
            lines = out.decode(errors="replace").rstrip().splitlines()
            row = Row(name, f"python -m bench.{name}", f"exit {process.returncode}")
            return Section(rows=[row], notes=lines[-40:])
        result: dict[str, Any] = await asyncio.to_thread(module.run, bench.quick)
        section = Section(raw=result)
        for key, value in result.items():
            shown = f"{value:,.2f}" if isinstance(value, float) else str(value)
            section.rows.append(Row(name, str(key), shown))
        return section

    return run


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "sections",
        nargs="*",
        metavar="SECTION",
        help=f"any of: {', '.join(SECTIONS)} (default: all); also {', '.join(EXTERNAL)} "
        "when present, run only when named",
    )
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test, ~2 min)")
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    parser.add_argument(
        "--markdown", metavar="FILE", help="also write the tables as Markdown (for the README)"
    )
    args = parser.parse_args()
    chosen = [ALIASES.get(s, s) for s in args.sections] or list(SECTIONS)
    for name in EXTERNAL:
        if name in chosen and importlib.util.find_spec(f"bench.{name}") is not None:
            SECTIONS[name] = external(name)
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    args.sections = chosen
    return args


def header(machine: dict[str, Any], cmd: str) -> str:
    lines = [
        f"command : {cmd}",
        f"machine : {machine['cpu']}, {machine['cpus']} CPUs, Linux {machine['kernel']}",
        f"python  : {machine['python']}; aiohttp {machine['aiohttp']}, uvloop {machine['uvloop']}",
        f"staple  : pyOpenSSL {machine['pyopenssl']} on {machine['openssl_pyopenssl']}"
        f" (cryptography {machine['cryptography']})",
        f"stdlib  : ssl on {machine['openssl_stdlib']}",
        f"client  : {_client.kind()}; nginx: {machine['nginx'] or 'not installed'}",
    ]
    return "\n".join(lines)


def table(rows: list[Row]) -> str:
    what_w = min(max((len(r.what) for r in rows), default=10), 70)
    value_w = min(max((len(r.value) for r in rows), default=10), 64)
    out = []
    current = None
    for row in rows:
        if row.section != current:
            current = row.section
            out.append(f"\n== {current} ==")
        out.append(
            f"{row.what:<{what_w}}  {row.value:<{value_w}}  {row.target:<9}  {verdict(row.met)}"
        )
    return "\n".join(out)


async def run_all(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    bench = Bench(quick=args.quick, workdir=workdir)
    results: dict[str, Any] = {}
    for name in args.sections:
        started = time.perf_counter()
        print(f"[{name}] running...", flush=True)
        try:
            section = await SECTIONS[name](bench)
        except Exception as exc:  # one broken section must not lose the others
            traceback.print_exc()
            section = Section(notes=[f"section failed: {type(exc).__name__}: {exc}"])
        elapsed = time.perf_counter() - started
        results[name] = {"seconds": round(elapsed, 1), "section": section}
        print(table(section.rows), flush=True)
        for note in section.notes:
            print(f"  note: {note}")
        print(f"[{name}] {elapsed:.0f} s", flush=True)
    return results


def main() -> None:
    args = parse_args()
    machine = _env.machine()
    cmd = _env.command()
    print(header(machine, cmd), flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="staple-bench-"))
    started = time.perf_counter()
    try:
        results = asyncio.run(run_all(args, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = [row for r in results.values() for row in r["section"].rows]
    print("\n" + "=" * 30 + " summary " + "=" * 30)
    print(header(machine, cmd))
    print(table(rows))
    for name, r in results.items():
        for note in r["section"].notes:
            print(f"  {name}: {note}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    document = {
        "command": cmd,
        "machine": {**machine, "client": _client.kind()},
        "quick": args.quick,
        "sections": {
            name: {
                "seconds": r["seconds"],
                "rows": [row.as_json() for row in r["section"].rows],
                "notes": r["section"].notes,
                "raw": r["section"].raw,
            }
            for name, r in results.items()
        },
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(document, f, indent=2, default=str)
            f.write("\n")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.markdown(json.loads(json.dumps(document, default=str))))


if __name__ == "__main__":
    main()
