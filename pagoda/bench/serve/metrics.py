"""Serving figures from per-request records, as `vllm bench serve` defines them.

TPOT of a request is (E2EL - TTFT) / (output tokens - 1), for requests with more than one
output token. ITLs pool the gaps between token events of every successful request. Token
throughputs count the tokens of successful requests over the whole run's duration.
Goodput counts the successful requests that meet every given SLO (a request with a single
output token has a TPOT of 0 there).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pagoda.bench.serve.client import RequestRecord

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


def parse_goodput(specs: Sequence[str] | None) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` → SLOs in milliseconds, by metric."""
    slos: dict[str, float] = {}
    for spec in specs or []:
        name, sep, value = spec.partition(":")
        if not sep or name not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"--goodput takes ttft:MS, tpot:MS or e2el:MS, got {spec!r}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {spec!r}: {value!r} is not a number") from None
        if slos[name] <= 0:
            raise ValueError(f"--goodput {spec!r}: the SLO must be positive")
    return slos


def request_tpot_s(record: RequestRecord) -> float | None:
    """A successful request's time per output token after the first; None below 2 tokens."""
    if not record.success or not record.output_tokens or record.output_tokens < 2:
        return None
    return (record.e2el_s - record.ttft_s) / (record.output_tokens - 1)


def latency_samples(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    """Each latency metric's samples, in seconds, over the successful requests."""
    ok = [r for r in records if r.success]
    return {
        "ttft": [r.ttft_s for r in ok if r.ttft_s is not None],
        "tpot": [t for t in map(request_tpot_s, ok) if t is not None],
        "itl": [gap for r in ok for gap in r.itl_s],
        "e2el": [r.e2el_s for r in ok],
    }


def summarize(samples_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    """mean, median, std and the chosen percentiles, in milliseconds (0 without samples)."""
    values = np.asarray(samples_s, dtype=np.float64) * 1000.0
    if values.size == 0:
        values = np.zeros(1)
    summary = {"mean_ms": float(values.mean()), "median_ms": float(np.median(values)),
               "std_ms": float(values.std())}
    for p in percentiles:
        summary[f"p{p:g}_ms"] = float(np.percentile(values, p))
    return summary


def is_good(record: RequestRecord, slos: dict[str, float]) -> bool:
    """A successful request within every SLO (milliseconds)."""
    if not record.success:
        return False
    measured = {"ttft": record.ttft_s, "tpot": request_tpot_s(record) or 0.0,
                "e2el": record.e2el_s}
    return all(measured[name] * 1000.0 <= slo for name, slo in slos.items())


def max_concurrency_seen(records: Sequence[RequestRecord]) -> int:
    """The most requests in flight at once, from the successful requests' intervals."""
    events = []
    for r in records:
        if r.success:
            events += [(r.start_s, 1), (r.start_s + r.e2el_s, -1)]
    peak = current = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        current += step
        peak = max(peak, current)
    return peak


def compute_metrics(records: Sequence[RequestRecord], duration_s: float,
                    percentiles: Sequence[float] = (99,),
                    metrics: Sequence[str] = LATENCY_METRICS,
                    slos: dict[str, float] | None = None) -> dict[str, Any]:
    """The benchmark's summary figures from its records and its wall-clock duration."""
    ok = [r for r in records if r.success]
    input_tokens = sum(r.prompt_tokens or 0 for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    result: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "max_concurrency_seen": max_concurrency_seen(records),
    }
    samples = latency_samples(records)
    for name in metrics:
        result[name] = summarize(samples[name], percentiles)
    if slos:
        good = sum(is_good(r, slos) for r in records)
        result["goodput"] = {"slos_ms": dict(slos), "good_requests": good,
                             "request_goodput": good / duration_s}
    return result


def error_counts(records: Sequence[RequestRecord]) -> dict[str, int]:
    """How often each distinct error happened."""
    counts: dict[str, int] = {}
    for r in records:
        if not r.success:
            counts[r.error or "unknown"] = counts.get(r.error or "unknown", 0) + 1
    return counts
