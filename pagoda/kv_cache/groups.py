"""KV cache groups: the attention layers that share one block table per request.

Layers are grouped by attention window (full layers in one kind, each sliding window in
another). All groups draw from one block pool, so memory follows the workload: short
sequences use every group alike, long ones give their local layers' old blocks back. For that
one block must mean the same bytes in every group: a block holds `slots` layers' K and V, and
a kind with more layers than that is split into several groups of `slots` layers (the last one
may leave slots unused). A model with one kind of layer is one group, every layer in a block.
Torch-free: `pagoda estimate` and the fleet planner size the cache with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class LayerKV(Protocol):
    """What the cache needs of one attention layer (a model's `LayerAttention`)."""

    num_kv_heads: int
    head_dim: int
    sliding_window: int | None

# a kind whose layer count is within this factor of the smallest kind's shares its group size
# (a few unused slots instead of an extra group), as vLLM's hybrid allocator does
_SAME_SIZE_RATIO = 1.25


@dataclass(frozen=True, slots=True)
class KVGroup:
    """Layers sharing a block table: their window (None: full attention), in layer order."""

    sliding_window: int | None
    layers: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class KVLayout:
    """How a model's attention layers sit in the KV cache: its groups (full attention first)
    and the number of layer slots of a block; layer `groups[g].layers[j]` uses slot j."""

    groups: tuple[KVGroup, ...]
    slots: int
    num_kv_heads: int
    head_dim: int

    @property
    def windows(self) -> tuple[int | None, ...]:
        return tuple(g.sliding_window for g in self.groups)

    def places(self) -> dict[int, tuple[int, int]]:
        """Layer index -> (its group, its slot in the group's blocks)."""
        return {layer: (g, slot) for g, group in enumerate(self.groups)
                for slot, layer in enumerate(group.layers)}

    def blocks_per_seq(self, seq_len: int, chunk: int, block_size: int) -> int:
        """Blocks one sequence of seq_len tokens holds at most, over all groups."""
        return sum(seq_blocks(w, seq_len, chunk, block_size) for w in self.windows)


def group_layers(layers: Sequence[LayerKV]) -> KVLayout:
    """Group layers by window (full attention first, then windows in increasing order)."""
    if not layers:
        raise ValueError("a model without attention layers has no KV cache")
    shapes = {(layer.num_kv_heads, layer.head_dim) for layer in layers}
    if len(shapes) > 1:
        raise ValueError(f"layers with different KV shapes {sorted(shapes)} cannot share a "
                         "KV cache")
    kinds: dict[int | None, list[int]] = {}
    for i, layer in enumerate(layers):
        kinds.setdefault(layer.sliding_window, []).append(i)
    order = sorted(kinds, key=lambda w: -1 if w is None else w)
    slots = _group_size([len(kinds[w]) for w in order])
    groups = tuple(KVGroup(w, tuple(kinds[w][start:start + slots]))
                   for w in order for start in range(0, len(kinds[w]), slots))
    heads, dim = shapes.pop()
    return KVLayout(groups, slots, heads, dim)


def _group_size(counts: list[int]) -> int:
    smallest, largest = min(counts), max(counts)
    return largest if largest <= smallest * _SAME_SIZE_RATIO else smallest


def seq_blocks(window: int | None, seq_len: int, chunk: int, block_size: int) -> int:
    """Blocks a sequence of seq_len tokens holds at most in a group, when it runs at most
    `chunk` tokens a step: every block for full attention; for a sliding window W, those of
    the window before a step's first query plus the step's own, min(W - 1 + chunk, seq_len)
    tokens (+1 block where they straddle a boundary)."""
    full = -(-seq_len // block_size)
    if window is None:
        return full
    return min(full, -(-(window - 1 + min(chunk, seq_len)) // block_size) + 1)


def first_needed_block(window: int, num_computed: int, block_size: int) -> int:
    """The first block a step whose queries start at num_computed reads: the keys before
    position num_computed - window + 1 are out of every one of its queries' windows."""
    return max(num_computed - window + 1, 0) // block_size
