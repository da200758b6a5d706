"""`pagoda ps`: the models a running server holds: device, state, memory, idle time;
`pagoda stop MODEL`: unload one of them."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ps", help="list the models a running `pagoda serve` holds")
    _add_server_args(p)
    p.add_argument("--json", action="store_true", help="print the server's answer as JSON")
    p.set_defaults(func=run)
    stop = subparsers.add_parser("stop", help="unload a model from a running `pagoda serve`")
    stop.add_argument("model", help="the model's name (see `pagoda ps`)")
    _add_server_args(stop)
    stop.set_defaults(func=run_stop)


def _add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("PAGODA_URL", "http://127.0.0.1:8000"),
                   help="the server (default: $PAGODA_URL or http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=os.environ.get("PAGODA_API_KEY"))


def _headers(args: argparse.Namespace) -> dict[str, str]:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def run_stop(args: argparse.Namespace) -> int:
    """Ask the server to unload the model; its error message if it cannot (status 1)."""
    import httpx
    try:
        response = httpx.post(args.url.rstrip("/") + "/pagoda/stop", json={"model": args.model},
                              headers=_headers(args), timeout=60)
    except httpx.HTTPError as exc:
        print(f"pagoda stop: cannot ask {args.url}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {response.status_code}"
        print(f"pagoda stop: {message}", file=sys.stderr)
        return 1
    print(f"stopped {response.json()['model']}")
    return 0


def run(args: argparse.Namespace) -> int:
    import httpx
    headers = _headers(args)
    try:
        response = httpx.get(args.url.rstrip("/") + "/pagoda/ps", headers=headers, timeout=10)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        print(f"pagoda ps: cannot ask {args.url}: {exc}", file=sys.stderr)
        return 1
    rows = response.json()["models"]
    print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
    return 0


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m"


def _device(row: dict[str, Any]) -> str:
    """The device, and how the model is split when it is (weights and KV: per rank)."""
    tp, pp = row.get("tensor_parallel_size", 1), row.get("pipeline_parallel_size", 1)
    if tp == pp == 1:
        return row["device"]
    return f"{row['device']} (tp {tp} x pp {pp}, per rank)"


def format_rows(rows: list[dict[str, Any]]) -> str:
    header = ("NAME", "DEVICE", "STATE", "WEIGHTS", "KV CACHE", "HELD", "IN FLIGHT", "IDLE",
              "UNTIL")
    table = [header]
    for r in rows:
        name = r["model"] if r["replica"] == 0 else f"{r['model']}#{r['replica']}"
        state = r["state"] + (" (pinned)" if r["pinned"] else "")
        table.append((name, _device(r), state, _gib(r["weight_bytes"]),
                      _gib(r["kv_cache_bytes"]), _gib(r["held_bytes"]), str(r["in_flight"]),
                      _seconds(r["idle_seconds"]),
                      "forever" if r["expires_in_seconds"] is None and r["state"] != "unloaded"
                      else _seconds(r["expires_in_seconds"])))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in table)
