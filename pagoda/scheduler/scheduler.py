"""Phase-free token-budget scheduler with chunked prefill and recompute preemption.

Every request has num_computed_tokens catching up with num_tokens. A step hands out at most
max_num_batched_tokens: running requests first (in priority order), then waiting ones.
Prefill chunks, prefix-cache hits and decodes are all the same rule. When KV blocks run out
the lowest-priority (then newest) running request is preempted and later recomputed.

A step may be scheduled before the previous one's results are back (async scheduling): a
request that samples counts the token as pending until update_from_output brings it, its
next decode is scheduled on that pending token, and a request whose pending token ends it
(max_tokens, max_model_len) is not scheduled again.

Prefill first (`prefill_first`, off by default): when requests can start, they get a step of
their own before the running requests' next decode step (never two such steps in a row):
first tokens come sooner on average, at the cost of an extra step's overhead (fewer tokens a
second) and a longer gap between the running requests' tokens.

A pipeline (`pipeline_depth`: its number of stages) keeps several steps in flight another way:
each step schedules only requests whose tokens are all back, and at most its share of the
live requests, so the steps in flight hold different requests and every stage has one to
work on.
"""

from __future__ import annotations

import time

from pagoda.config import SchedulerConfig
from pagoda.core_outputs import EngineCoreOutput, SchedulerStats
from pagoda.kv_cache.manager import KVCacheManager
from pagoda.request import EngineCoreRequest, Request, RequestStatus
from pagoda.scheduler.output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from pagoda.scheduler.queue import WaitingQueue


class Scheduler:
    """Decides, each step, which requests run and how many tokens each computes."""

    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager,
                 max_model_len: int, max_loras: int = 0, pipeline_depth: int = 1) -> None:
        self.config = config
        self.pipeline_depth = pipeline_depth  # steps in flight, each with its own requests
        self.prefill_first = config.prefill_first and pipeline_depth == 1
        self._last_step_prefills_only = False
        self.max_loras = max_loras  # distinct LoRA adapters the running batch may hold
        self.kv = kv_manager
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}
        self.waiting = WaitingQueue()
        self.running: list[Request] = []
        self._finished_ids: set[str] = set()
        self._preempted_ids: set[str] = set()
        self._next_seq = 0
        self.num_preemptions = 0
        self.num_computed_tokens_total = 0

    # ---- admission and removal -------------------------------------------------------------
    def add_request(self, core_req: EngineCoreRequest, lora_id: int = 0) -> None:
        if core_req.request_id in self.requests:
            raise ValueError(f"duplicate request id {core_req.request_id!r}")
        max_tokens = self.max_model_len - len(core_req.prompt_token_ids)
        if core_req.sampling_params.max_tokens is not None:
            max_tokens = min(max_tokens, core_req.sampling_params.max_tokens)
        request = Request.from_core_request(core_req, max_tokens, self._next_seq, lora_id)
        self._next_seq += 1
        self.requests[request.request_id] = request
        self.waiting.push(request)

    def finish_requests(self, request_ids: list[str] | set[str],
                        status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        """End requests now (abort, or a stop string the frontend found); frees their blocks."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running or self.waiting)

    # ---- one step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_request_ids=self._finished_ids,
                              preempted_request_ids=self._preempted_ids)
        self._finished_ids, self._preempted_ids = set(), set()
        budget, seats = self.config.max_num_batched_tokens, self._seats_per_step()
        self.running.sort(key=lambda r: r.sort_key)
        self._last_step_prefills_only = self._schedule_prefills_alone(out, budget, seats)
        if not self._last_step_prefills_only:
            budget, num_ending = self._schedule_running(out, budget, seats)
            if not out.preempted_request_ids:
                self._schedule_waiting(out, budget, len(self.running) - num_ending, seats)
        for request_id, n in out.num_scheduled_tokens.items():
            request = self.requests[request_id]
            request.num_computed_tokens += n
            if request.num_computed_tokens == request.num_tokens_with_pending:
                request.num_pending_tokens += 1  # it samples this step
        out.total_num_scheduled_tokens = sum(out.num_scheduled_tokens.values())
        self.num_computed_tokens_total += out.total_num_scheduled_tokens
        return out

    @property
    def pipelined(self) -> bool:
        return self.pipeline_depth > 1

    def _seats_per_step(self) -> int:
        """Requests one step may take: all of them, or in a pipeline its stage's share."""
        if not self.pipelined:
            return self.config.max_num_seqs
        live = min(len(self.running) + len(self.waiting), self.config.max_num_seqs)
        return max(1, -(-live // self.pipeline_depth))

    def _schedule_prefills_alone(self, out: SchedulerOutput, budget: int, seats: int) -> bool:
        """Prefill first: a step of only the waiting requests that can start, when some can,
        others are running and the last step was not one already. Whether it made one."""
        if not self.prefill_first or self._last_step_prefills_only or not self.waiting \
                or not self.running:
            return False
        active = sum(not self._ends_with_pending_token(r) for r in self.running)
        if active >= self.config.max_num_seqs:
            return False
        self._schedule_waiting(out, budget, active, seats)
        return bool(out.num_scheduled_tokens)

    def _schedule_running(self, out: SchedulerOutput, budget: int,
                          seats: int) -> tuple[int, int]:
        """Returns the budget left and how many running requests are only waiting for the
        token that ends them (their seats go to waiting requests now, as they would once
        finished). `seats`: how many requests this step may take."""
        i = num_ending = 0
        while i < len(self.running) and budget > 0 and len(out.num_scheduled_tokens) < seats:
            request = self.running[i]
            if self._ends_with_pending_token(request):
                i += 1
                num_ending += 1
                continue
            if self.pipelined and request.num_pending_tokens:
                i += 1  # in a step still in the pipeline
                continue
            num_new = min(request.num_tokens_with_pending - request.num_computed_tokens, budget)
            new_block_ids = self._allocate_or_preempt(request, num_new, out)
            if new_block_ids is None:
                break  # the request preempted itself: everything after it is gone too
            out.cached_requests.append(CachedRequestData(
                request.request_id, new_block_ids, request.num_computed_tokens))
            out.num_scheduled_tokens[request.request_id] = num_new
            budget -= num_new
            i += 1
        return budget, num_ending

    def _ends_with_pending_token(self, request: Request) -> bool:
        """Its token still on the device will finish it by length: nothing left to compute."""
        if not request.num_pending_tokens:
            return False
        return request.num_output_tokens + request.num_pending_tokens >= request.max_tokens \
            or request.num_tokens_with_pending >= self.max_model_len

    def _allocate_or_preempt(self, request: Request, num_new: int,
                             out: SchedulerOutput) -> list[list[int]] | None:
        while True:
            new_block_ids = self.kv.allocate_slots(request, num_new)
            if new_block_ids is not None:
                return new_block_ids
            victim = self.running[-1]  # running is sorted: the last is the least important
            self._preempt(victim, out)
            if victim is request:
                return None

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.push(request)
        out.preempted_request_ids.add(request.request_id)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, num_active: int,
                          seats: int) -> None:
        # keep their place: constrained requests whose grammar is still compiling, and
        # preempted ones whose last sampled token is not back yet
        # and requests whose adapter would be one more than --max-loras in the batch
        not_ready = []
        adapters = {r.lora_id for r in self.running if r.lora_id}
        while self.waiting and budget > 0 and num_active < self.config.max_num_seqs \
                and len(out.num_scheduled_tokens) < seats:
            request = self.waiting.peek()
            if request.waiting_for_grammar or request.num_pending_tokens \
                    or not self._adapter_fits(request, adapters):
                not_ready.append(self.waiting.pop())
                continue
            hit_blocks, num_hit = self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit, budget)
            new_block_ids = self.kv.allocate_slots(request, num_new, hit_blocks, num_hit)
            if new_block_ids is None:
                break
            self.waiting.pop()
            if request.lora_id:
                adapters.add(request.lora_id)
            self._admit(request, num_hit, num_new, out)
            budget -= num_new
            num_active += 1
        for request in not_ready:
            self.waiting.push(request)

    def _adapter_fits(self, request: Request, adapters: set[int]) -> bool:
        return not request.lora_id or request.lora_id in adapters \
            or len(adapters) < self.max_loras

    def _admit(self, request: Request, num_hit: int, num_new: int, out: SchedulerOutput) -> None:
        resumed = request.status == RequestStatus.PREEMPTED
        self.kv.record_lookup(request, num_hit)
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = num_hit
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_hit
            request.first_scheduled_time = time.monotonic()
        self.running.append(request)
        block_ids = self.kv.block_ids(request.request_id)
        if resumed:
            out.cached_requests.append(CachedRequestData(
                request.request_id, block_ids, num_hit, resumed_from_preemption=True))
        else:
            out.new_requests.append(NewRequestData(
                request.request_id, request.prompt_token_ids, request.sampling_params,
                request.eos_token_id, block_ids, num_hit, request.lora_id))
        out.num_scheduled_tokens[request.request_id] = num_new

    # ---- results -----------------------------------------------------------------------------
    def update_from_output(self, sched_out: SchedulerOutput,
                           runner_out: ModelRunnerOutput) -> list[EngineCoreOutput]:
        outputs = []
        for request_id in sched_out.num_scheduled_tokens:
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            sampled = runner_out.sampled_token_ids.get(request_id, [])
            prompt_logprobs = runner_out.prompt_logprobs.get(request_id)
            if not sampled and prompt_logprobs is None:
                continue  # a prefill chunk that ended mid-prompt
            first = request.num_output_tokens == 0
            request.num_pending_tokens -= len(sampled)
            was_running = request.status == RequestStatus.RUNNING  # else preempted meanwhile
            new_tokens = self._append_tokens(request, sampled)
            outputs.append(EngineCoreOutput(
                request_id, new_tokens, runner_out.logprobs.get(request_id), prompt_logprobs,
                request.status.finish_reason, request.stop_reason,
                max(request.num_cached_tokens, 0), self._queue_time(request) if first else None))
            if request.is_finished:
                (self.running if was_running else self.waiting).remove(request)
                self._finish(request, request.status)
        return outputs

    @staticmethod
    def _queue_time(request: Request) -> float | None:
        if request.first_scheduled_time is None:
            return None
        return max(request.first_scheduled_time - request.arrival_time, 0.0)

    def _append_tokens(self, request: Request, sampled: list[int]) -> list[int]:
        new_tokens = []
        for token_id in sampled:
            request.append_output_token(token_id)
            new_tokens.append(token_id)
            status = self._advance_grammar(request, token_id) or self._check_stop(request, token_id)
            if status is not None:
                request.status = status
                break
        return new_tokens

    @staticmethod
    def _advance_grammar(request: Request, token_id: int) -> RequestStatus | None:
        """Feed a constrained request's grammar; it stops once the grammar is complete (or,
        defensively, if a token the mask allowed is refused)."""
        if request.grammar is None:
            return None
        if not request.grammar.accept(token_id) or request.grammar.is_terminated:
            return RequestStatus.FINISHED_STOPPED
        return None

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if token_id == request.eos_token_id and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.kv.free(request)
        self._finished_ids.add(request.request_id)
        del self.requests[request.request_id]

    def stats(self) -> SchedulerStats:
        prefix = self.kv.stats
        return SchedulerStats(
            num_running=len(self.running), num_waiting=len(self.waiting),
            kv_cache_usage=self.kv.usage, num_preemptions=self.num_preemptions,
            prefix_cache_queries=prefix.queries, prefix_cache_hits=prefix.hits,
            num_computed_tokens_total=self.num_computed_tokens_total,
            running_lora_adapters=_adapter_names(self.running),
            waiting_lora_adapters=_adapter_names(self.waiting))

    def live_lora_ids(self) -> set[int]:
        """The adapters of every unfinished request."""
        return {r.lora_id for r in self.requests.values() if r.lora_id}


def _adapter_names(requests) -> list[str]:
    return sorted({r.lora_name for r in requests if r.lora_name})
