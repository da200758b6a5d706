"""What the engine core sends the frontend after each step: per-request token deltas and the
scheduler's counters. Plain data without torch, so the API process imports it cheaply."""

from __future__ import annotations

from dataclasses import dataclass, field

# Per position: (token ids [k+1], logprobs [k+1], rank of the first id). Col 0 is the actual token.
LogprobsLists = tuple[list[list[int]], list[list[float]], list[int]]


@dataclass(slots=True)
class EngineCoreOutput:
    """New tokens (and whether it finished) for one request after one step."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: LogprobsLists | None = None
    new_prompt_logprobs: LogprobsLists | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    queue_time: float | None = None  # seconds from arrival to first scheduling; first output only

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class SchedulerStats:
    """Counters the engine exposes (and the server turns into metrics)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_computed_tokens_total: int = 0
    running_lora_adapters: list[str] = field(default_factory=list)
    waiting_lora_adapters: list[str] = field(default_factory=list)
