"""Fuzzing every route of a live server from its own OpenAPI schema (schemathesis): schema-
conforming and schema-violating cases, plus a generation profile that steers conforming
completion and chat bodies to the served model and a small max_tokens, so they generate.
Figures: cases, status histogram, 5xx (must be 0; a 503 with Retry-After is load shedding and
counted apart), hangs (no answer within the request timeout), cases that generated."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
MAX_GENERATED_TOKENS = 12
# Routes whose effect is not a request's business: fuzzing them would end the run.
SKIPPED_PATHS: frozenset[str] = frozenset()


@dataclass(slots=True)
class FuzzResult:
    """What the fuzzing saw."""

    cases: int = 0
    statuses: Counter = field(default_factory=Counter)
    by_route: dict[str, Counter] = field(default_factory=dict)
    generated: int = 0  # 200s from a generation route that produced tokens
    shed: int = 0  # 503 with Retry-After: honest load shedding, not an error
    hangs: int = 0
    hang_samples: list[str] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, route: str, status: int | None, generated: bool, note: str,
               retry_after: bool = False) -> None:
        with self.lock:
            self._record(route, status, generated, note, retry_after)

    def hung(self, route: str, body: Any) -> None:
        with self.lock:
            self.hangs += 1
            if isinstance(body, dict):
                body = {k: body.get(k) for k in ("n", "max_tokens", "max_completion_tokens",
                                                 "stream")}
            self.hang_samples.append(f"{route} {json.dumps(body, default=str)}"[:300])

    def _record(self, route: str, status: int | None, generated: bool, note: str,
                retry_after: bool) -> None:
        self.cases += 1
        key = str(status) if status is not None else "no response"
        self.statuses[key] += 1
        self.by_route.setdefault(route, Counter())[key] += 1
        self.generated += int(generated)
        if status == 503 and retry_after:
            self.shed += 1
        elif status is not None and status >= 500:
            self.server_errors.append(f"{route} {status}: {note}"[:400])

    def to_json(self) -> dict[str, Any]:
        return {"cases": self.cases, "generated": self.generated,
                "server_5xx": len(self.server_errors), "shed_503_with_retry_after": self.shed,
                "hangs": self.hangs, "hang_samples": self.hang_samples[:10],
                "statuses": dict(sorted(self.statuses.items())),
                "by_route": {r: dict(sorted(c.items())) for r, c in sorted(self.by_route.items())},
                "server_error_samples": self.server_errors[:10],
                "transport_error_samples": self.transport_errors[:10]}


def _collect(strategy: Any, count: int, seed: int) -> list[Any]:
    """Draw `count` cases from a hypothesis strategy (generation only, no shrinking)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as fix_seed
    cases: list[Any] = []

    @fix_seed(seed)
    @settings(max_examples=count, phases=[Phase.generate], deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def draw(case: Any) -> None:
        cases.append(case)

    draw()
    return cases


def steer_to_generation(body: Any, model: str, rng: random.Random) -> Any:
    """A conforming body made to generate: the served model, a small max_tokens, n <= 2."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    body["model"] = model
    for key in ("max_tokens", "max_completion_tokens"):
        if key in body:
            body[key] = rng.randint(1, MAX_GENERATED_TOKENS)
    body.setdefault("max_tokens", rng.randint(1, MAX_GENERATED_TOKENS))
    if "max_completion_tokens" in body:
        body.pop("max_tokens", None)
    body["n"] = rng.choice((1, 1, 2))
    body.pop("best_of", None)
    if "prompt" in body and not body["prompt"]:
        body["prompt"] = "Hello"
    return body


class Fuzzer:
    """Draws cases per operation and sends them from a few threads."""

    def __init__(self, base_url: str, model: str, request_timeout: float = 300.0,
                 concurrency: int = 4, seed: int = 0) -> None:
        import schemathesis
        self.base_url = base_url
        self.model = model
        self.timeout = request_timeout
        self.concurrency = concurrency
        self.seed = seed
        self.schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
        self.result = FuzzResult()

    def operations(self) -> list[Any]:
        ops = []
        for found in self.schema.get_all_operations():
            op = found.ok()
            if op.path not in SKIPPED_PATHS:
                ops.append(op)
        return ops

    def run(self, cases_per_route: int, generation_cases: int) -> FuzzResult:
        from schemathesis.generation.modes import GenerationMode
        planned: list[tuple[Any, bool]] = []
        for i, op in enumerate(self.operations()):
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                if mode == GenerationMode.NEGATIVE and not op.body and not op.query:
                    continue  # nothing to violate
                planned += [(c, False) for c in _collect(op.as_strategy(generation_mode=mode),
                                                         cases_per_route, self.seed + i)]
            if op.path in GENERATION_PATHS and op.method.upper() == "POST":
                share = generation_cases // len(GENERATION_PATHS)
                planned += [(c, True) for c in _collect(op.as_strategy(), share,
                                                        self.seed + 1000 + i)]
        random.Random(self.seed).shuffle(planned)
        with ThreadPoolExecutor(self.concurrency) as pool:
            for _ in pool.map(lambda item: self._send(*item), planned):
                pass
        return self.result

    def _send(self, case: Any, steer: bool) -> None:
        import requests
        route = f"{case.operation.method.upper()} {case.operation.path}"
        if steer:
            case.body = steer_to_generation(case.body, self.model, random.Random(id(case)))
        started = time.monotonic()
        try:
            response = case.call(base_url=self.base_url, timeout=self.timeout)
        except requests.Timeout:
            self.result.hung(route, case.body)
            self.result.record(route, None, False, "timeout")
            return
        except requests.RequestException as exc:
            self.result.transport_errors.append(f"{route}: {exc!r}"[:300])
            self.result.record(route, None, False, repr(exc))
            return
        generated = steer and response.status_code == 200 and _generated(response)
        if time.monotonic() - started > self.timeout:
            self.result.hung(route, case.body)
        self.result.record(route, response.status_code, generated, response.text[:300],
                           bool(response.headers.get("retry-after")))


def _generated(response: Any) -> bool:
    """A 200 that produced tokens: usage in the JSON body, or content events then [DONE]."""
    if "text/event-stream" in response.headers.get("content-type", ""):
        lines = [line for line in response.text.splitlines() if line.startswith("data: ")]
        return bool(lines) and lines[-1] == "data: [DONE]" and len(lines) >= 2
    try:
        usage = response.json().get("usage") or {}
    except (ValueError, AttributeError):
        return False
    return json.dumps(usage) != "{}" and usage.get("completion_tokens", 0) >= 1
