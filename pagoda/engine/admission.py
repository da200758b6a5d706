"""Admission control for one engine: bound the work in flight (requests, sequences, tokens
owed) and shed a request that could not start within a bounded time, before it is queued.

The time to start is predicted from what is in flight: a new sequence needs one of the
engine's max_num_seqs slots; running sequences free theirs once they have produced the
output tokens they still owe (at most: a stop or EOS ends them sooner), and sequences
already waiting take freed slots first and hold them for their own outputs. Steps times the
decode step time (measured on the engine's clock from the batches of tokens it sends) gives
seconds, counting what is left of the step in flight: a request that finds a free slot
still waits for that step to end before it can be scheduled. An upper bound on the work
ahead keeps the admitted requests' time to first token under the limit, rather than under
it on average."""

from __future__ import annotations

import heapq
import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

from pagoda.errors import PagodaError

RATE_WINDOW_S = 60.0  # sequence completions counted for the fallback estimate
MIN_RATE_SAMPLES = 4  # completions needed before the fallback estimate is trusted
MAX_RETRY_AFTER_S = 60.0
STEP_TIME_WEIGHT = 0.05  # weight of each batch's sample in the decode step time's moving average


class EngineOverloadedError(PagodaError):
    """The engine has more work than it may take; the client should retry later."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """What one engine admits. None: derived from the engine (see `resolve`)."""

    max_requests: int = 1024
    max_sequences: int | None = None  # default: 4 x max_num_seqs
    max_tokens: int | None = None  # prompt + output tokens owed; default: 4 x KV capacity
    max_queue_wait: float = 10.0  # seconds a new sequence may be expected to wait to start

    def resolve(self, max_num_seqs: int, kv_capacity_tokens: int) -> AdmissionLimits:
        seqs = self.max_sequences if self.max_sequences is not None else 4 * max_num_seqs
        tokens = self.max_tokens if self.max_tokens is not None else 4 * kv_capacity_tokens
        return AdmissionLimits(self.max_requests, max(1, seqs), max(1, tokens),
                               self.max_queue_wait)


@dataclass(frozen=True, slots=True)
class Work:
    """What one request costs: its sequences (n), prompt tokens and output tokens owed."""

    sequences: int
    prompt_tokens: int  # per sequence
    max_tokens: int  # per sequence

    @property
    def tokens(self) -> int:
        return self.sequences * (self.prompt_tokens + self.max_tokens)


@dataclass(slots=True)
class _Owed:
    prompt: int
    output: int
    last_token_at: float | None = None  # when the engine sent its latest tokens (monotonic)

    @property
    def total(self) -> int:
        return self.prompt + self.output


@dataclass(slots=True)
class Admission:
    """Counts the work of every admitted sequence until it finishes; `check` raises
    EngineOverloadedError (a 503 with Retry-After) for a request that must not start."""

    limits: AdmissionLimits
    max_num_seqs: int  # sequences the engine runs at once
    requests: int = 0
    owed: dict[str, _Owed] = field(default_factory=dict)  # sequence id -> tokens owed
    tokens_owed: int = 0
    finished: deque[float] = field(default_factory=deque)  # completion times (monotonic)
    step_time: float | None = None  # seconds per output token of a running sequence
    last_tokens_at: float | None = None  # when the engine last sent tokens: a step's end

    @property
    def sequences(self) -> int:
        return len(self.owed)

    def check(self, work: Work) -> None:
        """Raise if `work` may not be admitted now; an idle engine admits anything."""
        if self.requests == 0:
            return
        limits = self.limits
        if self.requests + 1 > limits.max_requests:
            self._shed(f"the server is at its limit of {limits.max_requests} requests in "
                       f"flight", self.expected_wait(1))
        if self.sequences + work.sequences > limits.max_sequences:
            self._shed(f"the server has {self.sequences} sequences in flight and a limit of "
                       f"{limits.max_sequences}; this request adds {work.sequences}",
                       self.expected_wait(work.sequences))
        if self.tokens_owed + work.tokens > limits.max_tokens:
            self._shed(f"the server owes {self.tokens_owed} tokens (prompts and outputs) and "
                       f"takes at most {limits.max_tokens}; this request adds {work.tokens}",
                       self.expected_wait(work.sequences))
        wait = self.expected_wait(work.sequences)
        if wait is not None and wait > limits.max_queue_wait:
            self._shed(f"this request would wait about {wait:.2g} s to start (limit "
                       f"{limits.max_queue_wait:g} s)", wait)

    def expected_wait(self, sequences: int) -> float | None:
        """Seconds until `sequences` new sequences would all be scheduled: what is left of
        the step in flight if there is room now; else that plus the further steps until
        enough slots free (`steps_to_start`, the step in flight the first) at the measured
        step time, or before any step was measured the rate at which sequences finished
        lately; None if neither is known."""
        ahead = self.sequences + sequences - self.max_num_seqs
        in_flight = self.step_remainder()
        if ahead <= 0:
            return in_flight
        if self.step_time is not None:
            return in_flight + max(self.steps_to_start(sequences) - 1, 0) * self.step_time
        rate = self.finish_rate()
        return None if rate is None else ahead / rate

    def step_remainder(self, now: float | None = None) -> float:
        """Seconds left of the step in flight: the measured step time less the time since
        tokens last streamed back (0 before any step was measured)."""
        if self.step_time is None or self.last_tokens_at is None:
            return 0.0
        now = time.monotonic() if now is None else now
        return max(0.0, self.step_time - (now - self.last_tokens_at))

    def steps_to_start(self, sequences: int) -> int:
        """Decode steps until the last of `sequences` new sequences gets a slot, if every
        sequence in flight produces all the tokens it owes: slots free as running sequences
        finish; waiting ones (no token yet) take them first, in admission order."""
        running = [o.output for o in self.owed.values() if o.prompt == 0]
        free_at = running + [0] * max(0, self.max_num_seqs - len(running))
        heapq.heapify(free_at)
        for owed in self.owed.values():
            if owed.prompt > 0:  # waiting: holds the next free slot for its outputs
                heapq.heappush(free_at, heapq.heappop(free_at) + owed.output + 1)
        start = 0
        for _ in range(sequences):
            start = heapq.heappop(free_at)
        return start

    def finish_rate(self, now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        self._forget_old(now)
        if len(self.finished) < MIN_RATE_SAMPLES:
            return None
        span = max(now - self.finished[0], 1.0)
        return len(self.finished) / span

    def admit(self, sequence_ids: list[str], work: Work) -> None:
        self.requests += 1
        for seq_id in sequence_ids:
            self.owed[seq_id] = _Owed(work.prompt_tokens, work.max_tokens)
        self.tokens_owed += work.tokens

    def record_batch(self, new_tokens: list[tuple[str, int]], at: float) -> None:
        """One batch of engine outputs: each sequence's new tokens (the first computes its
        prompt too); `at`: when the engine sent it, on its clock (time.monotonic, the same
        system-wide clock). The step time is measured once a batch, from the engine's
        clock: the median of its sequences' seconds a token since their previous tokens.
        The API process's own clock would not do: when it falls behind and reads several
        batches at once, they look like instant steps."""
        gaps = []
        for seq_id, count in new_tokens:
            owed = self.owed.get(seq_id)
            if owed is None or count <= 0:
                continue
            if owed.last_token_at is not None:
                gaps.append((at - owed.last_token_at) / count)
            owed.last_token_at = self.last_tokens_at = at
            before = owed.total
            owed.prompt = 0
            owed.output = max(0, owed.output - count)
            self.tokens_owed -= before - owed.total
        if gaps:
            self._measure_step(statistics.median(gaps))

    def _measure_step(self, seconds: float) -> None:
        self.step_time = seconds if self.step_time is None else \
            self.step_time + STEP_TIME_WEIGHT * (seconds - self.step_time)

    def finish_sequence(self, seq_id: str, completed: bool) -> None:
        owed = self.owed.pop(seq_id, None)
        if owed is None:
            return
        self.tokens_owed -= owed.total
        if completed:
            self.finished.append(time.monotonic())

    def finish_request(self) -> None:
        self.requests = max(0, self.requests - 1)

    def _forget_old(self, now: float) -> None:
        while self.finished and now - self.finished[0] > RATE_WINDOW_S:
            self.finished.popleft()

    @staticmethod
    def _shed(reason: str, wait: float | None) -> None:
        retry = 1.0 if wait is None else min(max(wait, 1.0), MAX_RETRY_AFTER_S)
        raise EngineOverloadedError(f"The server is overloaded: {reason}. Retry after "
                                    f"{math.ceil(retry)} s.", retry_after=retry)
