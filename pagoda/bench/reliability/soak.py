"""Overload soak: closed-loop load at a multiple of the server's capacity for a set time;
what happened to every request, TTFT of admitted ones against an idle server's, and what is
left in the engine afterwards (running, waiting, KV blocks must return to 0)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from pagoda.bench.reliability.load import Mix, percentile, run_load, unloaded_ttft
from pagoda.bench.reliability.server import ServerProcess


def soak(server: ServerProcess, mix: Mix, capacity: int, overload: float, duration: float,
         seed: int = 0) -> dict[str, Any]:
    """`capacity`: sequences the engine runs at once (its --max-num-seqs)."""
    mean_n = 1 + mix.multi_n_fraction * 1.5
    workers = max(2, math.ceil(overload * capacity / mean_n))
    idle_ttft = asyncio.run(unloaded_ttft(server.url, mix.model))
    result = asyncio.run(run_load(server.url, mix, workers, duration, seed))
    residue = server.wait_idle()
    counts = result.counts()
    ttfts = result.ttfts()
    p99 = percentile(ttfts, 99)
    lost = counts["lost"] + counts["error_event"] + counts["aborted"]
    return {
        "workers": workers, "capacity_sequences": capacity, "overload": overload,
        "duration_s": round(result.stopped - result.started, 1), **counts,
        "lost_total": lost,
        "unloaded_ttft_s": round(idle_ttft, 4),
        "ttft_p50_s": _round(percentile(ttfts, 50)), "ttft_p99_s": _round(p99),
        "ttft_p99_over_unloaded": _round(p99 / idle_ttft if p99 and idle_ttft else None),
        "completed_per_s": round(counts["completed"] / max(duration, 1e-9), 2),
        "residue_after": residue,
        "leaked": any(residue.values()),
        "samples": result.samples(),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
