"""LoRA on pagoda's linear layers: a linear method that wraps the layer's own and adds,
for every token, its adapter's B A x (scaling folded into B). Each adapted layer holds its
adapters' weights stacked in `max_loras` fixed slots; the step's per-token slot index (-1:
the base model) lives in one buffer the runner fills before each forward pass, so the same
tensors serve eager steps and captured CUDA graphs.

Under tensor parallelism each rank holds its shard of every adapter, cut like the layer's own
weight: a column-parallel layer (q/k/v, gate/up, fused or not) keeps all of A and the rows of
B for its outputs, each fused piece's own slice; a row-parallel layer (o, down) keeps the
columns of A for its input slice and all of B, so its delta B (A_r x_r) is a partial sum like
the layer's W_r x_r: added before the layer's all-reduce, the ranks' parts add up to B A x,
counted once and with no collective of its own."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pagoda.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethod,
    MergedColumnParallelLinear,
    RowParallelLinear,
    WeightLoader,
)
from pagoda.lora.adapter import SUPPORTED_MODULES, LoRAAdapter, ModuleShape

LoRAKernel = Callable[["LoRAWeights", torch.Tensor, torch.Tensor, "LoRAStepState"], None]

TILE_TOKENS = 16  # tokens of one adapter per work tile of the Triton kernels


def max_tiles(num_tokens: int, max_loras: int) -> int:
    """Tiles a step of num_tokens can need: each adapter's tokens in tiles of TILE_TOKENS,
    the last one of each adapter partly filled."""
    return -(-num_tokens // TILE_TOKENS) + min(max_loras, num_tokens)


class LoRAStepState:
    """The step's adapters per token, in one int32 device buffer of fixed size and address
    (CUDA graphs replay on it), filled from the host before each forward pass:

    - `token_slots` [max_tokens]: each token's adapter slot, -1 for the base model;
    - `sorted_tokens` [max_tokens]: the adapted tokens' indices, grouped by slot;
    - `tiles` [max_tiles, 3]: (slot, start in sorted_tokens, count) covering each slot's
      tokens TILE_TOKENS at a time; count 0 marks a tile with nothing to do.

    `active`: whether the layers add adapter deltas at all (off for a step of base-model
    tokens only; always on while CUDA graphs are captured, so replays read the buffer)."""

    def __init__(self, max_tokens: int, max_loras: int, device: torch.device) -> None:
        self.max_tokens = max_tokens
        self.packed = torch.zeros(self.packed_size(max_tokens, max_loras), dtype=torch.int32,
                                  device=device)
        self.token_slots = self.packed[:max_tokens]
        self.token_slots.fill_(-1)
        self.sorted_tokens = self.packed[max_tokens:2 * max_tokens]
        self.tiles = self.packed[2 * max_tokens:].view(-1, 3)
        self.active = True

    @staticmethod
    def packed_size(max_tokens: int, max_loras: int) -> int:
        return 2 * max_tokens + 3 * max_tiles(max_tokens, max_loras)

    def set(self, token_slots: np.ndarray) -> None:
        """Fill the buffer for a step whose tokens have these slots (a synchronous copy;
        the runner stages it in pinned memory instead)."""
        host = np.empty(self.packed.numel(), dtype=np.int32)
        pack_step(host, token_slots, self.max_tokens)
        self.packed.copy_(torch.from_numpy(host))


def pack_step(packed: np.ndarray, token_slots: np.ndarray, max_tokens: int) -> None:
    """Write a step into a host array laid out as LoRAStepState's buffer: the per-token
    slots (-1 past the step), the adapted tokens grouped by slot (in token order within a
    slot) and the tiles covering each slot's group (count 0 past the last)."""
    n = len(token_slots)
    slots, grouped = packed[:max_tokens], packed[max_tokens:2 * max_tokens]
    tiles = packed[2 * max_tokens:].reshape(-1, 3)
    slots[:n] = token_slots
    slots[n:] = -1
    adapted = np.flatnonzero(token_slots >= 0)
    order = adapted[np.argsort(token_slots[adapted], kind="stable")]
    grouped[:len(order)] = order
    group_slot, group_start, group_count = np.unique(token_slots[order], return_index=True,
                                                     return_counts=True)
    per_group = -(-group_count // TILE_TOKENS)
    group = np.repeat(np.arange(len(group_slot)), per_group)
    offset = (np.arange(len(group)) - np.repeat(np.cumsum(per_group) - per_group, per_group)) \
        * TILE_TOKENS
    used = len(group)
    tiles[:used, 0] = group_slot[group]
    tiles[:used, 1] = group_start[group] + offset
    tiles[:used, 2] = np.minimum(TILE_TOKENS, group_count[group] - offset)
    tiles[used:] = 0


@dataclass(frozen=True, slots=True)
class ModuleShard:
    """This rank's part of one checkpoint module's LoRA: A's input columns [in_start,
    in_start + in_size) and B's output rows [out_start, out_start + out_size). `shape`: the
    whole module, as an adapter holds it."""

    shape: ModuleShape
    in_start: int
    in_size: int
    out_start: int
    out_size: int

    @classmethod
    def whole(cls, in_features: int, out_features: int) -> ModuleShard:
        """One device's: all of the module."""
        return cls(ModuleShape(in_features, out_features), 0, in_features, 0, out_features)

    def take(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (A, B) of the module's whole A [rank, in] and B [out, rank]."""
        return (a.narrow(1, self.in_start, self.in_size).contiguous(),
                b.narrow(0, self.out_start, self.out_size).contiguous())


def shard_adapter(adapter: LoRAAdapter, shards: Mapping[str, ModuleShard]) -> LoRAAdapter:
    """The adapter as this rank holds it: every module cut to its shard."""
    return LoRAAdapter(adapter.request, adapter.rank, adapter.scaling,
                       {module: shards[module].take(a, b)
                        for module, (a, b) in adapter.weights.items()})


class LoRAWeights:
    """One layer's adapters in slots: A [slots, pieces, rank, in] and B [slots, rank, out]
    (the pieces' outputs side by side, as in the fused layer), both this rank's shard."""

    def __init__(self, modules: Sequence[str], shards: Sequence[ModuleShard], max_loras: int,
                 max_rank: int, dtype: torch.dtype, device: torch.device) -> None:
        self.modules = tuple(modules)  # checkpoint module of each piece
        self.module_shards = tuple(shards)
        self.piece_sizes = tuple(shard.out_size for shard in shards)
        self.offsets = tuple(sum(self.piece_sizes[:i]) for i in range(len(shards)))
        self.a = torch.zeros(max_loras, len(modules), max_rank, shards[0].in_size, dtype=dtype,
                             device=device)
        self.b = torch.zeros(max_loras, max_rank, sum(self.piece_sizes), dtype=dtype,
                             device=device)

    @property
    def max_rank(self) -> int:
        return self.a.shape[2]

    def shards(self) -> dict[str, ModuleShard]:
        """Each checkpoint module's shard (its `shape`: what an adapter must match)."""
        return dict(zip(self.modules, self.module_shards))

    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Copy the adapter's pieces for this layer (already cut to this rank's shards by
        shard_adapter) into `slot`, zeros where it has none."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        for piece, module in enumerate(self.modules):
            weights = adapter.weights.get(module)
            if weights is None:
                continue
            a, b = weights
            rank, offset, size = a.shape[0], self.offsets[piece], self.piece_sizes[piece]
            self.a[slot, piece, :rank].copy_(a)
            self.b[slot, :rank, offset:offset + size].copy_(b.t())


def lora_torch(weights: LoRAWeights, x: torch.Tensor, y: torch.Tensor,
               token_slots: torch.Tensor) -> None:
    """The reference: y[t] += B[s_t] A[s_t] x[t] for every token t whose slot s_t >= 0,
    as dense matmuls over all slots masked per token (no host sync, graph-capturable)."""
    slots, pieces, rank, in_features = weights.a.shape
    xs = x.to(weights.a.dtype)
    shrunk = (xs @ weights.a.view(-1, in_features).t()).view(-1, slots, pieces, rank)
    chosen = token_slots.unsqueeze(1) == torch.arange(slots, device=x.device)
    shrunk = shrunk * chosen.to(shrunk.dtype)[:, :, None, None]
    b = weights.b.view(slots * rank, -1)
    for piece, (offset, size) in enumerate(zip(weights.offsets, weights.piece_sizes)):
        delta = shrunk[:, :, piece].reshape(-1, slots * rank) @ b[:, offset:offset + size]
        y[:, offset:offset + size] += delta.to(y.dtype)


def lora_torch_step(weights: LoRAWeights, x: torch.Tensor, y: torch.Tensor,
                    state: LoRAStepState) -> None:
    """lora_torch on the step's per-token slots: the kernel of devices without Triton."""
    lora_torch(weights, x, y, state.token_slots[:x.shape[0]])


class LoRALinearMethod(LinearMethod):
    """The layer's own method, then each token's adapter delta."""

    def __init__(self, base: LinearMethod, weights: LoRAWeights, state: LoRAStepState,
                 kernel: LoRAKernel) -> None:
        self.base = base
        self.weights = weights
        self.state = state
        self.kernel = kernel

    def create_weights(self, layer: LinearBase, loader: WeightLoader) -> None:
        self.base.create_weights(layer, loader)

    def apply(self, layer: LinearBase, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        y = self.base.apply(layer, x, bias)
        if not self.state.active:
            return y
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        self.kernel(self.weights, flat_x, flat_y, self.state)
        return y


def _modules(name: str, layer: LinearBase, packed: dict[str, tuple[str, ...]]
             ) -> list[str] | None:
    """The checkpoint modules a layer stacks, if LoRA applies to it."""
    prefix, _, leaf = name.rpartition(".")
    modules = packed.get(leaf, (leaf,))
    if not all(m in SUPPORTED_MODULES for m in modules):
        return None
    if len(getattr(layer, "local_sizes", [layer.local_out])) != len(modules):
        return None
    return [f"{prefix}.{m}" if prefix else m for m in modules]


def layer_shards(layer: LinearBase) -> list[ModuleShard]:
    """Each stacked piece's shard, cut as the layer cuts its own weight: a row-parallel
    layer its inputs, a column-parallel one its outputs (each fused piece its own slice)."""
    if isinstance(layer, RowParallelLinear):
        in_start, in_size = layer.group.split(layer.in_features)
    else:
        in_start, in_size = 0, layer.in_features
    if isinstance(layer, MergedColumnParallelLinear):
        outs = [(layer.piece_start(i), size, whole)
                for i, (size, whole) in enumerate(zip(layer.local_sizes, layer.out_sizes))]
    elif isinstance(layer, ColumnParallelLinear):
        outs = [(*layer.group.split(layer.out_features), layer.out_features)]
    elif layer.group.size == 1 or isinstance(layer, RowParallelLinear):
        outs = [(0, layer.out_features, layer.out_features)]
    else:
        raise NotImplementedError(f"LoRA on a tensor-parallel {type(layer).__name__}")
    return [ModuleShard(ModuleShape(layer.in_features, whole), in_start, in_size, start, size)
            for start, size, whole in outs]


def add_lora_layers(model: nn.Module, packed: dict[str, tuple[str, ...]], max_loras: int,
                    max_rank: int, dtype: torch.dtype, state: LoRAStepState,
                    kernel: LoRAKernel) -> list[LoRAWeights]:
    """Wrap the method of every q/k/v/o/gate/up/down projection (fused ones included) in
    a LoRALinearMethod; returns each adapted layer's slot weights (this rank's shard)."""
    added = []
    for name, layer in model.named_modules():
        if not isinstance(layer, LinearBase):
            continue
        modules = _modules(name, layer, packed)
        if modules is None:
            continue
        device = next(layer.parameters()).device
        weights = LoRAWeights(modules, layer_shards(layer), max_loras, max_rank, dtype, device)
        layer.method = LoRALinearMethod(layer.method, weights, state, kernel)
        added.append(weights)
    return added
