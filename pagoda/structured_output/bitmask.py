"""Token bitmasks for structured output: the allowed tokens of each constrained row of a
step, filled from the requests' grammar matchers and applied to the logits."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from pagoda.structured_output.grammar import GrammarMatcherState

FILL_THREADS = max(1, min(8, (os.cpu_count() or 1) // 2))  # bitmask rows filled in parallel


class BitmaskFiller:
    """Fills a step's bitmask rows for many matchers at once, on several CPU threads."""

    def __init__(self, vocab_size: int, threads: int = FILL_THREADS) -> None:
        self.vocab_size = vocab_size
        self.threads = threads
        self._batch: Any = None

    def fill(self, states: list[GrammarMatcherState]) -> torch.Tensor:
        if self._batch is None:
            import xgrammar as xgr
            self._batch = xgr.BatchGrammarMatcher(self.threads)
        bitmask = new_bitmask(len(states), self.vocab_size)
        self._batch.batch_fill_next_token_bitmask([s.matcher for s in states], bitmask)
        return bitmask


def bitmask_words(vocab_size: int) -> int:
    return -(-vocab_size // 32)


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """An int32 [rows, ceil(V/32)] bitmask with every token allowed (bit set = allowed)."""
    return torch.full((rows, bitmask_words(vocab_size)), -1, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set logits[rows[i], t] to -inf wherever bit t of bitmask[i] is clear (in place)."""
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().flatten(1)[:, :logits.shape[-1]]
    index = torch.tensor(rows, device=logits.device)
    sub = logits.index_select(0, index)
    logits.index_copy_(0, index, sub.masked_fill(~allowed.to(logits.device), float("-inf")))
