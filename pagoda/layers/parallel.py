"""A layer's tensor-parallel group: its rank, the group size, and the collectives it needs.
Size 1 (one device) is the default and makes every collective a no-op."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class ParallelGroup:
    """Rank `rank` of `size` devices; `process_group` is torch.distributed's group when size > 1.
    `expert_parallel`: mixture-of-experts layers split their experts over the group (each
    rank whole experts) instead of every expert's width."""

    rank: int = 0
    size: int = 1
    process_group: Any = None
    expert_parallel: bool = False

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
SAMPLED_TAG = 1  # the point-to-point tag of the sampled ids a pipeline's last stage sends


@dataclass(frozen=True, slots=True)
class PipelineStage:
    """Stage `index` of `count`: decoder layers [start, end) live here. `prev_rank` and
    `next_rank` are the global ranks activations come from and go to (None at the ends);
    `last_rank` is the rank whose sampled tokens every rank takes (the last stage's first
    tensor-parallel rank)."""

    index: int = 0
    count: int = 1
    start: int = 0
    end: int | None = None  # None: every layer
    prev_rank: int | None = None
    next_rank: int | None = None
    last_rank: int = 0
    token_group: Any = None  # every rank: the sampled ids go back on it

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1

    def owns(self, layer: int) -> bool:
        return self.start <= layer and (self.end is None or layer < self.end)

    def send(self, tensors: tuple[torch.Tensor, ...]) -> None:
        """Activations to the next stage (point to point)."""
        for tensor in tensors:
            torch.distributed.send(tensor.contiguous(), self.next_rank)

    def receive(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                count: int) -> tuple[torch.Tensor, ...]:
        """`count` tensors of `shape` from the previous stage."""
        tensors = tuple(torch.empty(shape, dtype=dtype, device=device) for _ in range(count))
        for tensor in tensors:
            torch.distributed.recv(tensor, self.prev_rank)
        return tensors

    def share_sampled(self, sampled: torch.Tensor) -> list[Any]:
        """Start sending the last stage's sampled ids to every other rank (`sampled`: their
        buffer elsewhere); returns the transfers to wait for before reading or reusing it.
        Point to point on a group of their own, so that a stage can run the next batch's
        layers while this one's tokens are still on their way (a pipeline keeps several
        batches in flight)."""
        if self.count == 1:
            return []
        me = torch.distributed.get_rank()
        if me != self.last_rank:
            return [torch.distributed.irecv(sampled, self.last_rank, group=self.token_group,
                                            tag=SAMPLED_TAG)]
        return [torch.distributed.isend(sampled, rank, group=self.token_group, tag=SAMPLED_TAG)
                for rank in range(torch.distributed.get_world_size()) if rank != me]


def layer_ranges(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """Each stage's [start, end) of the decoder layers: equal parts, the earlier stages one
    more where they do not divide."""
    if stages > num_layers:
        raise ValueError(f"{num_layers} layers do not split over {stages} pipeline stages")
    base, extra = divmod(num_layers, stages)
    ranges, start = [], 0
    for stage in range(stages):
        end = start + base + (stage < extra)
        ranges.append((start, end))
        start = end
    return ranges


WHOLE = PipelineStage()
