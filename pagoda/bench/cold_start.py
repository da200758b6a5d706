"""Cold start: `pagoda serve` launched from nothing to the first streamed token."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from typing import Any

import httpx


def _first_token(url: str, deadline: float) -> float:
    """Poll until the server answers, then stream one completion; time of its first token."""
    body = {"prompt": [1, 2, 3, 4], "max_tokens": 2, "stream": True, "ignore_eos": True}
    while time.monotonic() < deadline:
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                if r.status_code == 200:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            return time.monotonic()
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError("no token before the deadline")


def measure_cold_start(model: str, serve_args: list[str], port: int = 8299,
                       timeout: float = 300.0) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pagoda.cli.main", "serve", model, "--host", "127.0.0.1",
           "--port", str(port), *serve_args]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = _first_token(f"http://127.0.0.1:{port}", start + timeout)
    finally:
        proc.terminate()
        log = proc.communicate(timeout=60)[0]
    lines = log.splitlines()
    return {"benchmark": "cold-start", "command": cmd, "seconds_to_first_token": first - start,
            "engine_startup_s": engine_phases(lines), "server_log_tail": lines[-25:]}


_PHASE = re.compile(r"([A-Za-z][\w -]*?) (\d+(?:\.\d+)?)s")


def engine_phases(log_lines: list[str]) -> dict[str, float]:
    """The engine's startup phases (seconds by name) from its "engine started in" line."""
    for line in log_lines:
        if "engine started in" in line and "(" in line:
            inside = line[line.index("(") + 1:line.rindex(")")]
            return {name: float(seconds) for name, seconds in _PHASE.findall(inside)}
    return {}


def main(argv: list[str]) -> int:
    result = measure_cold_start(argv[0], argv[1:])
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
