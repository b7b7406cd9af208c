"""``python -m bench [--quick] [--json FILE]``: print a table, optionally write JSON."""

from __future__ import annotations

import argparse
import json
import platform

from . import core


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="fewer loops (a smoke run)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    results = {
        "machine": f"{platform.machine()} {platform.python_implementation()} "
        f"{platform.python_version()}"
    }
    results.update(core.run(args.quick))
    width = max(len(k) for k in results)
    for key, value in results.items():
        shown = f"{value:,.1f}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


main()
