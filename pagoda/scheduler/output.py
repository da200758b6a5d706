"""The scheduler <-> runner contract: a diff per step, and what comes back. Pure data and no
torch, so that it can be sent to worker processes (and imported by the frontend cheaply)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagoda.core_outputs import LogprobsLists
from pagoda.sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    """A request the runner has not seen: everything needed to build its state."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None
    block_ids: list[list[int]]  # one block table per KV group (0: the null block)
    num_computed_tokens: int
    lora_id: int = 0  # the LoRA adapter it runs with (0: the base model)


@dataclass(slots=True)
class CachedRequestData:
    """A request the runner already holds: only what changed since its last step."""

    request_id: str
    new_block_ids: list[list[int]]  # per KV group; empty: no group got a block
    num_computed_tokens: int
    resumed_from_preemption: bool = False  # new_block_ids then replaces the whole tables


@dataclass(slots=True)
class SchedulerOutput:
    """One step's work: which requests run how many tokens, and what left the batch."""

    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    preempted_request_ids: set[str] = field(default_factory=set)
    finished_request_ids: set[str] = field(default_factory=set)
    # constrained requests that sample this step -> their row of the step's grammar bitmask
    # (int32 [rows, ceil(vocab/32)], bit set = allowed), which the engine core fills while
    # the forward pass runs and hands to the runner's sampling call
    grammar_rows: dict[str, int] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass(slots=True)
class ModelRunnerOutput:
    """What one step produced, keyed by request id."""

    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, LogprobsLists] = field(default_factory=dict)
    prompt_logprobs: dict[str, LogprobsLists] = field(default_factory=dict)
