"""Closed-loop load on a server: a mix of chat and completion requests, streaming and not,
n > 1, stop strings, mid-stream disconnects and cancellations; every request's outcome."""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import random
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

PROMPTS = ["Tell me a story about a lighthouse.", "List five fruits and their colours.",
           "Explain why the sky is blue.", "Write a short poem about rain.",
           "What is the capital of France?", "Describe a cat in three sentences."]
STOPS = [["\n\n"], ["."], ["the", "and"]]

# One client process's event loop keeps up with about this many workers: in an H200 soak,
# 94 workers in one process saw the server's own TTFT (median 0.080 s against its mean
# 0.076 s), 373 a median of 4.1 s against the server's 0.16 s.
WORKERS_PER_PROCESS = 64

# Outcomes. completed: a full answer with usage; shed: 503 with Retry-After; cancelled: the
# client went away on purpose; refused: nothing listened (connection refused); failed: a
# clear error reached the client (an error event, a 5xx); lost: none of those (a cut stream,
# a transport error mid-request, a hang).
OUTCOMES = ("completed", "aborted", "shed", "shed_without_retry_after", "client_4xx",
            "server_5xx", "error_event", "cancelled", "refused", "lost")


@dataclass(frozen=True, slots=True)
class Mix:
    """What the load sends."""

    model: str
    max_tokens: tuple[int, int] = (8, 64)
    stream_fraction: float = 0.5
    multi_n_fraction: float = 0.25  # requests with n = 2 or 3
    stop_fraction: float = 0.3
    disconnect_fraction: float = 0.1  # half mid-stream disconnects, half cancellations
    request_timeout: float = 120.0


@dataclass(slots=True)
class Outcome:
    """One request: what was sent and how it ended."""

    kind: str
    sent: float
    ended: float
    stream: bool
    n: int
    status: int | None = None
    ttft: float | None = None  # streaming: first content after sending
    detail: str = ""


@dataclass(slots=True)
class LoadResult:
    """Every outcome of one load run."""

    outcomes: list[Outcome] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    stopped: float | None = None

    def counts(self) -> dict[str, int]:
        counted = Counter(o.kind for o in self.outcomes)
        return {"sent": len(self.outcomes), **{k: counted.get(k, 0) for k in OUTCOMES}}

    def first(self, kinds: tuple[str, ...], after: float) -> float | None:
        """Seconds from `after` to the first request of these kinds ending."""
        ends = [o.ended for o in self.outcomes if o.kind in kinds and o.ended >= after]
        return min(ends) - after if ends else None

    def ttfts(self, n: int | None = None) -> list[float]:
        """Sorted TTFTs of completed streams (of those asking for `n` choices)."""
        return sorted(o.ttft for o in self.outcomes if o.ttft is not None
                      and o.kind == "completed" and n in (None, o.n))

    def slowest_ttft_seconds(self, share: float = 0.01, top: int = 5) -> dict[str, Any]:
        """The slowest `share` of completed streams' TTFTs: how many distinct seconds of the
        run (counted from its start) they were sent in, and the `top` seconds holding most."""
        timed = sorted((o.ttft, o.sent) for o in self.outcomes
                       if o.ttft is not None and o.kind == "completed")
        slowest = timed[len(timed) - max(1, int(share * len(timed))):] if timed else []
        by_second = Counter(int(sent - self.started) for _, sent in slowest)
        return {"requests": len(slowest), "seconds": len(by_second),
                "busiest": dict(by_second.most_common(top))}

    def samples(self, limit: int = 5) -> dict[str, list[str]]:
        """A few details of every unwanted outcome, for the report."""
        found: dict[str, list[str]] = {}
        for o in self.outcomes:
            if o.kind in ("completed", "shed", "cancelled", "refused"):
                continue
            found.setdefault(o.kind, [])
            if len(found[o.kind]) < limit:
                found[o.kind].append(f"{o.status}: {o.detail[:200]}")
        return found


def build_request(mix: Mix, rng: random.Random) -> tuple[str, dict[str, Any], str | None]:
    """(path, body, how the client leaves early: None, 'disconnect' or 'cancel')."""
    stream = rng.random() < mix.stream_fraction
    n = rng.choice((2, 3)) if rng.random() < mix.multi_n_fraction else 1
    body: dict[str, Any] = {"model": mix.model, "max_tokens": rng.randint(*mix.max_tokens),
                            "n": n, "temperature": 0.8, "seed": rng.randint(0, 1 << 30),
                            "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < mix.stop_fraction:
        body["stop"] = rng.choice(STOPS)
    prompt = rng.choice(PROMPTS)
    if rng.random() < 0.5:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/v1/completions", prompt
    leave = None
    if rng.random() < mix.disconnect_fraction:
        leave = "disconnect" if stream else "cancel"
    return path, body, leave


async def send(http: httpx.AsyncClient, base: str, mix: Mix, path: str, body: dict[str, Any],
               leave: str | None, rng: random.Random) -> Outcome:
    sent = time.monotonic()
    outcome = Outcome("lost", sent, sent, body["stream"], body["n"])
    try:
        if leave == "cancel":
            try:
                await asyncio.wait_for(_call(http, base, path, body, outcome),
                                       timeout=rng.uniform(0.05, 0.5))
            except TimeoutError:
                outcome.kind = "cancelled"
        else:
            await asyncio.wait_for(_call(http, base, path, body, outcome, leave),
                                   timeout=mix.request_timeout)
    except TimeoutError:
        outcome.kind, outcome.detail = "lost", "hung past the request timeout"
    except httpx.ConnectError as exc:
        outcome.kind, outcome.detail = "refused", repr(exc)
    except httpx.HTTPError as exc:
        outcome.kind, outcome.detail = "lost", repr(exc)
    outcome.ended = time.monotonic()
    if outcome.kind == "lost":
        outcome.detail += f" after {outcome.ended - sent:.1f} s; {_summary(path, body)}"
    return outcome


def _summary(path: str, body: dict[str, Any]) -> str:
    """What a request asked for, for the report of one that went wrong."""
    keys = ("n", "max_tokens", "stream", "stop")
    return f"{path} " + json.dumps({k: body.get(k) for k in keys})


async def _call(http: httpx.AsyncClient, base: str, path: str, body: dict[str, Any],
                outcome: Outcome, leave: str | None = None) -> None:
    async with http.stream("POST", f"{base}{path}", json=body) as response:
        outcome.status = response.status_code
        if response.status_code != 200:
            await response.aread()
            _refusal(outcome, response)
            return
        if not body["stream"]:
            await response.aread()
            _whole(outcome, response.json(), body["n"])
            return
        await _read_stream(outcome, response, leave)


def _refusal(outcome: Outcome, response: httpx.Response) -> None:
    status = response.status_code
    outcome.detail = response.text[:300]
    if status == 503:
        outcome.kind = "shed" if response.headers.get("retry-after") else \
            "shed_without_retry_after"
    elif 400 <= status < 500:
        outcome.kind = "client_4xx"
    else:
        outcome.kind = "server_5xx"


def _whole(outcome: Outcome, payload: dict[str, Any], n: int) -> None:
    choices = payload.get("choices") or []
    usage = payload.get("usage") or {}
    reasons = {c.get("finish_reason") for c in choices}
    if "abort" in reasons:
        outcome.kind = "aborted"
    elif len(choices) == n and usage.get("completion_tokens", 0) >= 1:
        outcome.kind = "completed"
    else:
        outcome.detail = f"incomplete answer: {json.dumps(payload)[:200]}"


async def _read_stream(outcome: Outcome, response: httpx.Response, leave: str | None) -> None:
    usage, done, reasons = None, False, set()
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        event = json.loads(line[6:])
        if "error" in event:
            outcome.kind, outcome.detail = "error_event", json.dumps(event)[:300]
            return
        if outcome.ttft is None and event.get("choices"):
            outcome.ttft = time.monotonic() - outcome.sent
            if leave == "disconnect":
                outcome.kind = "cancelled"
                return  # leaving the block closes the connection mid-stream
        reasons.update(c.get("finish_reason") for c in event.get("choices") or [])
        usage = event.get("usage") or usage
    if "abort" in reasons:
        outcome.kind = "aborted"
    elif done and usage and usage.get("completion_tokens", 0) >= 1:
        outcome.kind = "completed"
    else:
        outcome.detail = f"stream ended without [DONE] and usage (done={done})"


async def run_load(base: str, mix: Mix, workers: int, duration: float, seed: int = 0,
                   stop: asyncio.Event | None = None, shed_backoff: float = 0.25,
                   first_worker: int = 0) -> LoadResult:
    """`workers` closed-loop clients for `duration` seconds (or until `stop` is set). A shed
    client waits `shed_backoff` s, not Retry-After, so the pressure stays on. Worker i
    draws its requests from seed and first_worker + i."""
    result = LoadResult()
    deadline = time.monotonic() + duration
    stop = stop or asyncio.Event()
    limits = httpx.Limits(max_connections=workers + 8, max_keepalive_connections=workers + 8)

    async def worker(index: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(seed * 10_007 + first_worker + index)
        while time.monotonic() < deadline and not stop.is_set():
            path, body, leave = build_request(mix, rng)
            outcome = await send(http, base, mix, path, body, leave, rng)
            result.outcomes.append(outcome)
            if outcome.kind in ("shed", "shed_without_retry_after", "refused"):
                await asyncio.sleep(shed_backoff)

    async with httpx.AsyncClient(timeout=httpx.Timeout(mix.request_timeout, connect=5),
                                 limits=limits) as http:
        await asyncio.gather(*[worker(i, http) for i in range(workers)])
    result.stopped = time.monotonic()
    return result


def client_processes(workers: int) -> int:
    """Client processes that keep `workers` from waiting on their own event loop."""
    return max(1, math.ceil(workers / WORKERS_PER_PROCESS))


def run_load_in_processes(base: str, mix: Mix, workers: int, duration: float, seed: int = 0,
                          processes: int = 1) -> LoadResult:
    """run_load with its workers split over `processes` client processes, each with its own
    event loop, their outcomes merged (monotonic times are the same clock in every process):
    a loop that falls behind would count its own lag as the server's latency."""
    if processes <= 1:
        return asyncio.run(run_load(base, mix, workers, duration, seed))
    shares = [workers // processes + (i < workers % processes) for i in range(processes)]
    firsts = [sum(shares[:i]) for i in range(processes)]
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=spawn) as pool:
        parts = list(pool.map(_load_part, [base] * processes, [mix] * processes, shares,
                              [duration] * processes, [seed] * processes, firsts))
    return LoadResult(outcomes=[o for part in parts for o in part.outcomes],
                      started=min(part.started for part in parts),
                      stopped=max(part.stopped or part.started for part in parts))


def _load_part(base: str, mix: Mix, workers: int, duration: float, seed: int,
               first_worker: int) -> LoadResult:
    return asyncio.run(run_load(base, mix, workers, duration, seed, first_worker=first_worker))


async def unloaded_ttft(base: str, model: str, count: int = 8) -> float:
    """Median time to first token of single streaming requests on an idle server."""
    mix = Mix(model, max_tokens=(8, 8), stream_fraction=1.0, multi_n_fraction=0.0,
              stop_fraction=0.0, disconnect_fraction=0.0)
    rng = random.Random(1)
    ttfts = []
    async with httpx.AsyncClient(timeout=60) as http:
        for _ in range(count):
            path, body, _ = build_request(mix, rng)
            outcome = await send(http, base, mix, path, body, None, rng)
            if outcome.ttft is not None:
                ttfts.append(outcome.ttft)
    ttfts.sort()
    return ttfts[len(ttfts) // 2] if ttfts else float("nan")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]
