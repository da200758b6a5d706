"""LoRA on pagoda's linear layers: a linear method that wraps the layer's own and adds,
for every token, its adapter's B A x (scaling folded into B). Each adapted layer holds its
adapters' weights stacked in `max_loras` fixed slots; the step's per-token slot index (-1:
the base model) lives in one buffer the runner fills before each forward pass, so the same
tensors serve eager steps and captured CUDA graphs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pagoda.layers.linear import LinearBase, LinearMethod, WeightLoader
from pagoda.lora.adapter import SUPPORTED_MODULES, LoRAAdapter, ModuleShape

LoRAKernel = Callable[["LoRAWeights", torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass(slots=True)
class LoRAStepState:
    """The step's per-token adapter slot (int32, -1 = base model), fixed size and address;
    `active`: whether the layers add adapter deltas at all (off for a step of base-model
    tokens only; always on while CUDA graphs are captured, so replays read the slots)."""

    token_slots: torch.Tensor
    active: bool = True

    @classmethod
    def allocate(cls, max_tokens: int, device: torch.device) -> LoRAStepState:
        return cls(torch.full((max_tokens,), -1, dtype=torch.int32, device=device))


class LoRAWeights:
    """One layer's adapters in slots: A [slots, pieces, rank, in] and B [slots, rank, out]
    (the pieces' outputs side by side, as in the fused layer)."""

    def __init__(self, modules: Sequence[str], piece_sizes: Sequence[int], in_features: int,
                 max_loras: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.modules = tuple(modules)  # checkpoint module of each piece
        self.piece_sizes = tuple(piece_sizes)
        self.offsets = tuple(sum(piece_sizes[:i]) for i in range(len(piece_sizes)))
        self.a = torch.zeros(max_loras, len(modules), max_rank, in_features, dtype=dtype,
                             device=device)
        self.b = torch.zeros(max_loras, max_rank, sum(piece_sizes), dtype=dtype, device=device)

    @property
    def max_rank(self) -> int:
        return self.a.shape[2]

    def shapes(self) -> dict[str, ModuleShape]:
        """Each checkpoint module's shape, as an adapter must match it."""
        return {m: ModuleShape(self.a.shape[3], size)
                for m, size in zip(self.modules, self.piece_sizes)}

    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Copy the adapter's pieces for this layer into `slot` (zeros where it has none)."""
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
        self.kernel(self.weights, flat_x, flat_y, self.state.token_slots[:flat_x.shape[0]])
        return y


def _pieces(name: str, layer: LinearBase, packed: dict[str, tuple[str, ...]]
            ) -> tuple[list[str], list[int]] | None:
    """The checkpoint modules a layer stacks and their output sizes, if LoRA applies."""
    prefix, _, leaf = name.rpartition(".")
    modules = packed.get(leaf, (leaf,))
    if not all(m in SUPPORTED_MODULES for m in modules):
        return None
    sizes = list(getattr(layer, "local_sizes", [layer.local_out]))
    if len(sizes) != len(modules):
        return None
    return [f"{prefix}.{m}" if prefix else m for m in modules], sizes


def add_lora_layers(model: nn.Module, packed: dict[str, tuple[str, ...]], max_loras: int,
                    max_rank: int, dtype: torch.dtype, state: LoRAStepState,
                    kernel: LoRAKernel) -> list[LoRAWeights]:
    """Wrap the method of every q/k/v/o/gate/up/down projection (fused ones included) in
    a LoRALinearMethod; returns each adapted layer's slot weights."""
    added = []
    for name, layer in model.named_modules():
        if not isinstance(layer, LinearBase):
            continue
        pieces = _pieces(name, layer, packed)
        if pieces is None:
            continue
        if layer.group.size != 1:
            raise NotImplementedError("LoRA with tensor parallelism is not supported yet")
        device = next(layer.parameters()).device
        weights = LoRAWeights(pieces[0], pieces[1], layer.local_in, max_loras, max_rank,
                              dtype, device)
        layer.method = LoRALinearMethod(layer.method, weights, state, kernel)
        added.append(weights)
    return added
