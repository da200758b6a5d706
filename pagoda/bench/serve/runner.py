"""Drive a serving benchmark: arrivals, a concurrency cap, warm-ups, then the timed run.

Arrivals follow a fixed schedule drawn up front: gaps from a gamma distribution with shape
`burstiness` and mean 1/rate (burstiness 1 is a Poisson process; lower is burstier), or all
at time zero for an infinite rate. With `max_concurrency`, a request that arrives while the
cap is reached waits for a free slot; its timings start when it is sent.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from pagoda.bench.serve.client import RequestRecord, RequestSettings, send_request
from pagoda.bench.serve.datasets import ServeRequest
from pagoda.bench.serve.metrics import LATENCY_METRICS, compute_metrics, error_counts


class BenchmarkAborted(Exception):
    """The server failed the initial test request: nothing would be measured."""


@dataclass(slots=True)
class RunSettings:
    """How requests are released."""

    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    num_warmups: int = 0
    seed: int = 0
    percentiles: Sequence[float] = (99,)
    metrics: Sequence[str] = LATENCY_METRICS
    slos: dict[str, float] = field(default_factory=dict)
    show_progress: bool = True

    def check(self) -> None:
        if not self.request_rate > 0:
            raise ValueError("--request-rate must be positive (inf sends everything at once)")
        if not self.burstiness > 0:
            raise ValueError("--burstiness must be positive")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("--max-concurrency must be at least 1")
        if self.num_warmups < 0:
            raise ValueError("--num-warmups must be >= 0")
        if any(not 0 <= p <= 100 for p in self.percentiles):
            raise ValueError("--metric-percentiles must lie in [0, 100]")


def arrival_times(num: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """When each request arrives, in seconds from the start (the first at 0)."""
    if math.isinf(rate):
        return np.zeros(num)
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num)
    gaps[0] = 0.0
    return np.cumsum(gaps)


@dataclass(slots=True)
class RunResult:
    records: list[RequestRecord]
    duration_s: float
    metrics: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "errors": error_counts(self.records),
                "requests": [r.to_json() for r in self.records]}


async def run_benchmark(settings: RequestSettings, run: RunSettings,
                        requests: Sequence[ServeRequest]) -> RunResult:
    """The initial test request, the warm-ups, then every request timed."""
    run.check()
    limits = httpx.Limits(max_connections=run.max_concurrency or len(requests) + 1,
                          max_keepalive_connections=run.max_concurrency or len(requests) + 1)
    # reads wait as long as the request may (a queued request is silent until its first
    # token); the client times silence after the first token itself (client.Stalled)
    timeout = httpx.Timeout(settings.stall_timeout_s, read=settings.request_timeout_s,
                            pool=None)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        await _test_request(http, settings, requests[0])
        if run.num_warmups:
            await _release(http, settings, _cycle(requests, run.num_warmups),
                           np.zeros(run.num_warmups), run.max_concurrency, None)
        times = arrival_times(len(requests), run.request_rate, run.burstiness, run.seed)
        progress = _progress_bar(len(requests), run.show_progress)
        start = time.perf_counter()
        records = await _release(http, settings, list(requests), times, run.max_concurrency,
                                 progress, start)
        duration = time.perf_counter() - start
        if progress is not None:
            progress.close()
    metrics = compute_metrics(records, duration, run.percentiles, run.metrics, run.slos)
    return RunResult(records, duration, metrics)


async def _test_request(http: httpx.AsyncClient, settings: RequestSettings,
                        request: ServeRequest) -> None:
    probe = ServeRequest(request.prompt, min(request.max_tokens, 4), request.prompt_len)
    record = await send_request(http, settings, probe, -1, time.perf_counter())
    if not record.success:
        raise BenchmarkAborted(f"the initial test request failed: {record.error}")


def _cycle(requests: Sequence[ServeRequest], num: int) -> list[ServeRequest]:
    return [requests[i % len(requests)] for i in range(num)]


async def _release(http: httpx.AsyncClient, settings: RequestSettings,
                   requests: list[ServeRequest], times: np.ndarray,
                   max_concurrency: int | None, progress: Any,
                   start: float | None = None) -> list[RequestRecord]:
    """Send each request at its arrival time, at most `max_concurrency` at once."""
    start = time.perf_counter() if start is None else start
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(index: int, request: ServeRequest, at: float) -> RequestRecord:
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if slots is None:
            record = await send_request(http, settings, request, index, start)
        else:
            async with slots:
                record = await send_request(http, settings, request, index, start)
        if progress is not None:
            progress.update(1)
        return record

    pairs = enumerate(zip(requests, times, strict=True))
    return list(await asyncio.gather(*(one(i, r, float(t)) for i, (r, t) in pairs)))


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc="requests", unit="req", leave=False)
