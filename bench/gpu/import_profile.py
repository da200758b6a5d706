"""Where a process's import time goes: runs `python -X importtime -c "import MODULE"` for each
module named (twice, the second with warm caches) and prints the total and the slowest imports
by cumulative time. Usage: python bench/gpu/import_profile.py MODULE... [--top N]"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def import_times(statement: str) -> tuple[float, list[tuple[float, float, str]]]:
    """Wall seconds of running `statement` in a fresh interpreter, and (cumulative s, self s,
    indented module name) for each module it imported."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", statement],
                          capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, name = line.removeprefix("import time:").split("|")
        rows.append((int(cumulative_us) / 1e6, int(self_us) / 1e6, name.rstrip()))
    return wall, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("modules", nargs="+")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    for module in args.modules:
        statement = module if " " in module else f"import {module}"
        for run in ("cold", "warm"):
            wall, rows = import_times(statement)
            print(f"--- {statement!r} ({run}): {wall:.2f} s wall, "
                  f"{sum(s for _, s, _ in rows):.2f} s in imports")
            if run == "warm":
                for cumulative, own, name in sorted(rows, reverse=True)[:args.top]:
                    print(f"{cumulative:7.3f} {own:7.3f} {name}")


if __name__ == "__main__":
    main()
