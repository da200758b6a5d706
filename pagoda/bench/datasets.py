"""Synthetic benchmark workloads: random token prompts with fixed or ranged lengths."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(slots=True)
class BenchRequest:
    """One benchmark request: the prompt as token ids and how many tokens to generate."""

    prompt_token_ids: list[int]
    output_len: int


def length_range(length: int, range_ratio: float) -> tuple[int, int]:
    """[length*(1-r), length*(1+r)] as integers, never below 1 (vLLM's random dataset rule)."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    low = max(1, int(np.floor(length * (1 - range_ratio))))
    high = max(low, int(np.ceil(length * (1 + range_ratio))))
    return low, high


def check_range(bounds: tuple[int, int], what: str) -> tuple[int, int]:
    """Validate an explicit (min, max) length range."""
    low, high = int(bounds[0]), int(bounds[1])
    if not 1 <= low <= high:
        raise ValueError(f"{what} range needs 1 <= min <= max, got {low} {high}")
    return low, high


def special_token_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer marks as special (BOS, EOS, PAD, added special tokens)."""
    if tokenizer is None:
        return []
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return sorted(ids)


def allowed_token_ids(vocab_size: int, excluded: Iterable[int] = ()) -> np.ndarray:
    """Every id in [0, vocab_size) except the excluded ones."""
    mask = np.ones(vocab_size, dtype=bool)
    banned = np.array([t for t in excluded if 0 <= t < vocab_size], dtype=np.int64)
    mask[banned] = False
    allowed = np.flatnonzero(mask)
    if allowed.size == 0:
        raise ValueError("no token ids left to draw prompts from")
    return allowed


def random_requests(num: int, input_len: int = 128, output_len: int = 64,
                    range_ratio: float = 0.0, vocab_size: int = 32000, seed: int = 0, *,
                    input_len_range: tuple[int, int] | None = None,
                    output_len_range: tuple[int, int] | None = None,
                    excluded_token_ids: Iterable[int] = ()) -> list[BenchRequest]:
    """`num` requests with random prompt tokens and lengths uniform in their ranges.

    Lengths are uniform integers in [len*(1-r), len*(1+r)], or in the explicit (min, max)
    ranges when given (nano-vllm's `100 1024` protocol). Prompt tokens are drawn uniformly
    from the vocabulary minus `excluded_token_ids` (pass the tokenizer's special ids).
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    in_low, in_high = (check_range(input_len_range, "input length") if input_len_range
                       else length_range(input_len, range_ratio))
    out_low, out_high = (check_range(output_len_range, "output length") if output_len_range
                         else length_range(output_len, range_ratio))
    rng = np.random.default_rng(seed)
    input_lens = rng.integers(in_low, in_high, size=num, endpoint=True)
    output_lens = rng.integers(out_low, out_high, size=num, endpoint=True)
    vocab = allowed_token_ids(vocab_size, excluded_token_ids)
    return [BenchRequest(rng.choice(vocab, size=int(n)).tolist(), int(m))
            for n, m in zip(input_lens, output_lens)]
