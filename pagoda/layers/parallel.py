"""A layer's tensor-parallel group: its rank, the group size, and the collectives it needs.
Size 1 (one device) is the default and makes every collective a no-op."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class ParallelGroup:
    """Rank `rank` of `size` devices; `process_group` is torch.distributed's group when size > 1."""

    rank: int = 0
    size: int = 1
    process_group: Any = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is outside a group of {self.size}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the group (in place)."""
        if self.size > 1:
            torch.distributed.all_reduce(x, group=self.process_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x concatenated along `dim`, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=self.process_group)
        return torch.cat(parts, dim=dim)

    def split(self, total: int) -> tuple[int, int]:
        """(start, size) of this rank's equal part of `total` (which the group divides)."""
        if total % self.size:
            raise ValueError(f"{total} does not divide over {self.size} ranks")
        part = total // self.size
        return self.rank * part, part


SINGLE = ParallelGroup()
