"""Render a saved run as Markdown: ``python -m bench.report results.json [> table.md]``.

``python -m bench --json results.json`` saves a run; this turns it into the tables that go into
the README's Performance section (``python -m bench --markdown FILE`` writes them directly).
"""

from __future__ import annotations

import json
import sys
from typing import Any

VERDICT = {True: "ok", False: "**missed**", None: ""}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").strip()


def markdown(document: dict[str, Any]) -> str:
    m = document["machine"]
    lines = [
        f"`{document['command']}` on {m['cpu']} ({m['cpus']} vCPUs, Linux {m['kernel']}), "
        f"{m['python']}; staple: pyOpenSSL {m['pyopenssl']} on {m['openssl_pyopenssl']}; "
        f"stdlib ssl on {m['openssl_stdlib']}; aiohttp {m['aiohttp']}, uvloop {m['uvloop']}; "
        f"nginx {m['nginx'] or 'not installed'}; client: {m.get('client', '?')}.",
        "",
    ]
    for name, section in document["sections"].items():
        rows = section["rows"]
        if not rows:
            continue
        lines += [f"**{name}** ({section['seconds']:.0f} s)", ""]
        lines += ["| measured | result | target | |", "| --- | --- | --- | --- |"]
        for row in rows:
            lines.append(
                f"| {_cell(row['what'])} | {_cell(row['value'])} | {_cell(row['target'])} "
                f"| {VERDICT[row['met']]} |"
            )
        for note in section.get("notes", []):
            lines += ["", f"Note: {note}"]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m bench.report RESULTS.json")
    with open(sys.argv[1]) as f:
        print(markdown(json.load(f)))


if __name__ == "__main__":
    main()
