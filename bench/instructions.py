"""1b. Full handshakes counted in instructions: the same servers and client as ``handshakes``,
with each server process run under ``valgrind --tool=callgrind``.

CPU time per handshake on a shared 2-vCPU machine swings by ±10-15 % from round to round (the
client runs on the same cores, and a hyperthread sibling's load slows every instruction), which
is as large as the differences the targets ask about. Instructions executed do not swing:
callgrind counts the same total for the same work whatever else the machine does. So each
server runs under callgrind; once warm its counters are zeroed (``callgrind_control -z``), the
client makes handshakes (+ tiny GET, close) for a few seconds, the counters are dumped
(``callgrind_control -d``), and the figure is user-space instructions per handshake: Python,
aiohttp, the event loop and OpenSSL, not the kernel (about the same syscalls for both).
Instructions are not time (OpenSSL 4's and 3.0's code run at different instructions per cycle),
so this complements the CPU-time rows; it does not replace them.

Needs valgrind (Debian: ``apt-get install valgrind``); skipped with a note without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from . import _client, _proc
from ._harness import KEY_NAMES, Bench, Section
from ._stats import Row

VARIANTS = ("staple", "stdlib", "staple, stapling off", "staple, socket BIO")


async def run(bench: Bench) -> Section:
    section = Section()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        section.notes.append("valgrind is not installed: instruction counts skipped")
        return section
    seconds = 3.0 if bench.quick else 6.0
    configs = [("ec", "1.3", "asyncio")]
    if not bench.quick:
        configs = [
            (key, tls, loop)
            for key in ("ec", "rsa")
            for loop in ("asyncio", "uvloop")
            for tls in ("1.3", "1.2")
        ]
    for key_type, tls, loop in configs:
        m = bench.material(key_type)
        base = {"chain": str(m.chain), "key": str(m.key), "loop": loop}
        variants: dict[str, dict[str, Any]] = {
            "staple": {**base, "kind": "staple", "staple": str(m.response_path("small"))},
            "stdlib": {**base, "kind": "stdlib"},
            "staple, stapling off": {**base, "kind": "staple", "staple": None},
            "staple, socket BIO": {
                **base,
                "kind": "staple",
                "staple": str(m.response_path("small")),
                "transport": "socket",
            },
        }
        workdir = bench.workdir / "callgrind" / f"{key_type}-{tls}-{loop}"
        # Counts don't depend on timing, so the servers run at once.
        counted = await asyncio.gather(
            *(
                _count(config, tls, seconds, workdir / f"{n}")
                for n, config in enumerate(variants.values())
            )
        )
        per = dict(zip(VARIANTS, counted, strict=True))
        _rows(section, f"{KEY_NAMES[key_type]}, TLS {tls}, {loop}", per)
    return section


def _rows(section: Section, label: str, per: dict[str, tuple[float, int]]) -> None:
    staple, stdlib, off, sock = (per[name][0] for name in VARIANTS)
    counts = ", ".join(f"{per[name][1]:,}" for name in VARIANTS)
    section.rows += [
        Row(
            "instructions",
            f"instructions/handshake staple on memory BIOs÷stdlib — {label}",
            f"{staple / stdlib:.3f}×  [{staple / 1e6:.2f} M vs {stdlib / 1e6:.2f} M]",
            "",
            None,
            {"staple": staple, "stdlib": stdlib, "ratio": staple / stdlib},
        ),
        Row(
            "instructions",
            f"  the same with stapling off ÷ stdlib — {label}",
            f"{off / stdlib:.3f}×  [{off / 1e6:.2f} M; handshakes counted {counts}]",
            "",
            None,
            {"staple_off": off, "ratio": off / stdlib},
        ),
        Row(
            "instructions",
            f"instructions/handshake staple on a socket BIO÷stdlib — {label}",
            f"{sock / stdlib:.3f}×  [{sock / 1e6:.2f} M; ÷ memory BIO {sock / staple:.3f}×]",
            "",
            None,
            {"staple_socket": sock, "ratio": sock / stdlib, "vs_memory": sock / staple},
        ),
    ]


async def _count(
    config: dict[str, Any], tls: str, seconds: float, workdir: Path
) -> tuple[float, int]:
    """User-space instructions per handshake of one server, and how many handshakes."""
    workdir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - before the server starts
    out = workdir / "callgrind.out"
    process = await asyncio.create_subprocess_exec(
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        sys.executable,
        "-m",
        "bench._server",
        json.dumps(config),
        cwd=_proc.ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        ready = json.loads(await asyncio.wait_for(process.stdout.readline(), 300))
        port = ready["port"]
        await _client.handshakes(port, seconds=2.0, procs=1, tls=tls)  # warm up
        await _control("-z", process.pid)
        result = await _client.handshakes(port, seconds=seconds, procs=1, tls=tls)
        await _control("-d", process.pid)
    finally:
        process.stdin.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 120)
        if process.returncode is None:
            process.kill()
            await process.wait()
    return _total(Path(f"{out}.1")) / result["ok"], result["ok"]


async def _control(flag: str, pid: int) -> None:
    control = await asyncio.create_subprocess_exec(
        "callgrind_control",
        flag,
        str(pid),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    if await control.wait() != 0:
        raise RuntimeError(f"callgrind_control {flag} {pid} failed")


def _total(dump: Path) -> int:
    """The instruction total of a callgrind dump."""
    for line in dump.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")
