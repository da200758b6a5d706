"""Facts about a loaded model that the frontend needs, and prompt checks against them.
Kept free of torch so the API process can import it cheaply."""

from __future__ import annotations

from dataclasses import dataclass

from pagoda.errors import ContextLengthExceededError, InvalidRequestError


@dataclass(slots=True)
class ModelInfo:
    """What the engine reports about its model once loaded."""

    name: str
    max_model_len: int
    vocab_size: int
    eos_token_id: int | None
    extra_eos_token_ids: list[int]
    num_kv_blocks: int
    block_size: int
    kv_capacity_tokens: int
    device: str = "cpu"  # where the engine runs: "cpu" or "cuda:N"
    weight_bytes: int = 0
    kv_cache_bytes: int = 0
    activation_bytes: int = 0  # profiled step peak above the weights (GPU); 0 where unmeasured
    max_num_seqs: int = 0  # sequences one step runs at most; 0 where unknown
    cpu_threads: int = 0  # torch's intra-op threads in the engine process
    # the model split over devices: weight_bytes and kv_cache_bytes are one rank's
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    kv_cache_dtype: str = "auto"  # as --kv-cache-dtype
    expert_weight_bytes: int = 0  # of weight_bytes, a mixture of experts' routed experts'


def validate_prompt_ids(token_ids: list[int], info: ModelInfo) -> None:
    """Non-empty, in vocabulary, and leaving room for at least one output token."""
    if not token_ids:
        raise InvalidRequestError("the prompt is empty", "prompt")
    vocab = info.vocab_size
    for t in token_ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise InvalidRequestError(f"prompt token id {t!r} is out of vocabulary "
                                      f"(size {vocab})", "prompt")
    limit = info.max_model_len
    if len(token_ids) >= limit:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {limit} tokens. However, your "
            f"prompt has {len(token_ids)} tokens, which leaves no room for output.")
