"""Request state inside the engine core: the request as it arrives, its lifecycle status, and
the scheduler's view of its tokens and progress (shared by the scheduler and the KV cache)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from pagoda.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Lifecycle of a request inside the engine core."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(slots=True)
class EngineCoreRequest:
    """A validated, tokenized request as handed to the engine core."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0
    cache_salt: str | None = None
    parent_id: str | None = None  # set on the `n` children of one user request
    lora_name: str | None = None  # the LoRA adapter the request runs with (None: the base)


@dataclass(slots=True, eq=False)
class Request:
    """A request's state while the scheduler owns it.

    num_computed_tokens catches up with num_tokens; whatever lies between is the work left,
    whether prompt (prefill), recomputation after preemption, or the newest sampled token.
    With async scheduling a step may be scheduled before the previous step's token is back:
    that token counts in num_pending_tokens until update_from_output appends it.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int
    eos_token_id: int | None
    arrival_time: float
    arrival_seq: int
    priority: int = 0
    cache_salt: str | None = None
    parent_id: str | None = None
    lora_name: str | None = None
    lora_id: int = 0  # the adapter's engine id (0: the base model)
    all_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_pending_tokens: int = 0  # sampled on the device by a step whose result is not back yet
    num_cached_tokens: int = -1  # prefix-cache hit length at first scheduling
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    block_hashes: list[bytes] = field(default_factory=list)
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    grammar: Any = None  # GrammarMatcherState of a constrained request, once compiled
    waiting_for_grammar: bool = False  # not schedulable until its grammar is compiled

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @classmethod
    def from_core_request(cls, req: EngineCoreRequest, max_tokens: int, seq: int,
                          lora_id: int = 0) -> Request:
        return cls(
            request_id=req.request_id, prompt_token_ids=list(req.prompt_token_ids),
            sampling_params=req.sampling_params, max_tokens=max_tokens,
            eos_token_id=req.eos_token_id, arrival_time=req.arrival_time, arrival_seq=seq,
            priority=req.priority, cache_salt=req.cache_salt, parent_id=req.parent_id,
            lora_name=req.lora_name if lora_id else None, lora_id=lora_id)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_pending(self) -> int:
        return len(self.all_token_ids) + self.num_pending_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def sort_key(self) -> tuple[int, int]:
        """Scheduling order: lower priority value first, then arrival (FCFS)."""
        return (self.priority, self.arrival_seq)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
