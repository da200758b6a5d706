"""Overload soak: closed-loop load at a multiple of the server's capacity for a set time;
what happened to every request, TTFT of admitted ones against an idle server's, and what is
left in the engine afterwards (running, waiting, KV blocks must return to 0)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from pagoda.bench.reliability.load import (
    Mix,
    client_processes,
    percentile,
    run_load_in_processes,
    unloaded_ttft,
)
from pagoda.bench.reliability.server import ServerProcess


def soak(server: ServerProcess, mix: Mix, capacity: int, overload: float, duration: float,
         seed: int = 0, processes: int | None = None) -> dict[str, Any]:
    """`capacity`: sequences the engine runs at once (its --max-num-seqs); `processes`:
    client processes (default: enough for the workers, `client_processes`)."""
    mean_n = 1 + mix.multi_n_fraction * 1.5
    workers = max(2, math.ceil(overload * capacity / mean_n))
    processes = processes or client_processes(workers)
    idle_ttft = asyncio.run(unloaded_ttft(server.url, mix.model))
    before, buckets_before = server.snapshot(LATENCY_SERIES, tuple(LATENCY.values()))
    result = run_load_in_processes(server.url, mix, workers, duration, seed, processes)
    residue = server.wait_idle()
    after, buckets_after = server.snapshot(LATENCY_SERIES, tuple(LATENCY.values()))
    counts = result.counts()
    ttfts = result.ttfts()
    p99 = percentile(ttfts, 99)
    lost = counts["lost"] + counts["error_event"] + counts["aborted"]
    return {
        "workers": workers, "client_processes": processes, "capacity_sequences": capacity,
        "overload": overload,
        "duration_s": round(result.stopped - result.started, 1), **counts,
        "lost_total": lost,
        "unloaded_ttft_s": round(idle_ttft, 4),
        "ttft_p50_s": _round(percentile(ttfts, 50)), "ttft_p99_s": _round(p99),
        "ttft_p99_over_unloaded": _round(p99 / idle_ttft if p99 and idle_ttft else None),
        # where the tail is: requests for 2 or 3 choices need as many free slots
        "ttft_p99_by_n_s": {n: _round(percentile(result.ttfts(n), 99)) for n in (1, 2, 3)},
        # the server's own TTFT (arrival to first token, every request): its p99 lies at or
        # below this bucket bound; far below the clients' p99, the tail is not the server's
        "server_ttft_p99_at_most_s": quantile_bound(buckets_before[LATENCY["ttft"]],
                                                    buckets_after[LATENCY["ttft"]], 0.99),
        # the same bound for queue, prefill and inter-token latency: which part holds the tail
        "server_p99_at_most_s": {key: quantile_bound(buckets_before[name], buckets_after[name],
                                                     0.99) for key, name in LATENCY.items()},
        # when the slowest first tokens were asked for: a few seconds holding most of them
        # point to stalls, a spread over the run to queueing
        "slowest_ttft_seconds": result.slowest_ttft_seconds(),
        "completed_per_s": round(counts["completed"] / max(duration, 1e-9), 2),
        "server_means_s": _means(before, after),
        "residue_after": residue,
        "leaked": any(residue.values()),
        "samples": result.samples(),
    }


# the server's histograms of where a request's time goes (means over the soak): queue,
# prefill (scheduled to first token), TTFT (arrival to first token), inter-token latency
LATENCY = {"queue": "vllm:request_queue_time_seconds",
           "prefill": "vllm:request_prefill_time_seconds",
           "ttft": "vllm:time_to_first_token_seconds",
           "itl": "vllm:inter_token_latency_seconds"}
LATENCY_SERIES = tuple(f"{name}_{part}" for name in LATENCY.values() for part in ("sum", "count"))


def _means(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Each LATENCY histogram's mean over the interval between two scrapes."""
    means = {}
    for key, name in LATENCY.items():
        count = after[f"{name}_count"] - before[f"{name}_count"]
        total = after[f"{name}_sum"] - before[f"{name}_sum"]
        means[key] = round(total / count, 4) if count else None
    return means


def quantile_bound(before: dict[float, float], after: dict[float, float], q: float
                   ) -> float | None:
    """The smallest bucket bound holding a share `q` of what a histogram observed between
    two scrapes (cumulative counts by bound): the quantile is at most this."""
    total = after.get(math.inf, 0.0) - before.get(math.inf, 0.0)
    if total <= 0:
        return None
    return next(bound for bound in sorted(after)
                if after[bound] - before.get(bound, 0.0) >= q * total)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
