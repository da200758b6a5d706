"""Log-probabilities of sampled and prompt tokens: batched tensors and their python form."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pagoda.outputs import Logprob, PositionLogprobs

# Rows of prompt logits turned into float32 log-probabilities at a time (bounds the temporary).
PROMPT_LOGPROBS_CHUNK = 1024


@dataclass(slots=True)
class LogprobsTensors:
    """Per-position logprobs of one target token (column 0) followed by the top-K tokens."""

    token_ids: Tensor  # [N, K+1] int64
    logprobs: Tensor  # [N, K+1] float32
    ranks: Tensor  # [N] int64, rank of the target token (1 = most likely)

    @property
    def num_rows(self) -> int:
        return self.token_ids.shape[0]

    @staticmethod
    def cat(parts: list[LogprobsTensors]) -> LogprobsTensors:
        """Concatenate along the position dimension (all parts share K)."""
        return LogprobsTensors(
            token_ids=torch.cat([p.token_ids for p in parts]),
            logprobs=torch.cat([p.logprobs for p in parts]),
            ranks=torch.cat([p.ranks for p in parts]),
        )


def gather_logprobs(logprobs: Tensor, num_top: int, targets: Tensor) -> LogprobsTensors:
    """Pick each row's target logprob, its rank and the row's `num_top` best tokens."""
    targets = targets.to(torch.int64).unsqueeze(-1)
    target_logprobs = logprobs.gather(-1, targets)
    # Competition ranking: tokens tied with the target share its (best) rank.
    # counted in int32 (a bool sum widens every element to int64 first: twice the time)
    ranks = (logprobs > target_logprobs).sum(-1, dtype=torch.int32).to(torch.int64) + 1
    top = logprobs.topk(min(num_top, logprobs.shape[-1]), dim=-1)
    return LogprobsTensors(
        token_ids=torch.cat([targets, top.indices], dim=-1),
        logprobs=torch.cat([target_logprobs, top.values], dim=-1),
        ranks=ranks,
    )


def compute_prompt_logprobs(logits: Tensor, targets: Tensor, num_top: int,
                            chunk_size: int = PROMPT_LOGPROBS_CHUNK) -> LogprobsTensors:
    """Logprobs of each position's next prompt token, via float32 log_softmax in chunks."""
    parts = [
        gather_logprobs(chunk.float().log_softmax(-1), num_top, chunk_targets)
        for chunk, chunk_targets in zip(logits.split(chunk_size), targets.split(chunk_size))
    ]
    return LogprobsTensors.cat(parts)


def to_position_logprobs(t: LogprobsTensors, num_top_per_row: list[int],
                         decode: Callable[[int], str] | None) -> list[PositionLogprobs]:
    """Python form of each row, trimmed to that row's own number of top logprobs."""
    if len(num_top_per_row) != t.num_rows:
        raise ValueError(f"{len(num_top_per_row)} row sizes given for {t.num_rows} rows")
    token_ids, logprobs, ranks = t.token_ids.tolist(), t.logprobs.tolist(), t.ranks.tolist()
    return [
        _position(token_ids[i], logprobs[i], ranks[i], k, decode)
        for i, k in enumerate(num_top_per_row)
    ]


def _position(token_ids: list[int], logprobs: list[float], rank: int, num_top: int,
              decode: Callable[[int], str] | None) -> PositionLogprobs:
    """One position: the target token first, then the top tokens not already present."""
    out = {token_ids[0]: Logprob(logprobs[0], rank, _decoded(token_ids[0], decode))}
    for j in range(1, min(num_top, len(token_ids) - 1) + 1):
        token_id = token_ids[j]
        if token_id not in out:
            out[token_id] = Logprob(logprobs[j], j, _decoded(token_id, decode))
    return out


def _decoded(token_id: int, decode: Callable[[int], str] | None) -> str | None:
    return decode(token_id) if decode is not None else None
