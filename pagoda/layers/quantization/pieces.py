"""Checkpoint tensors a quantized linear layer collects while loading and repacks after:
placeholder parameters whose loaders keep each tensor (a fused layer's per piece)."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from pagoda.errors import UnsupportedModelError
from pagoda.layers.linear import LinearBase


def add_collected_parameters(layer: LinearBase, names: tuple[str, ...], fmt: str,
                             optional: tuple[str, ...] = ()) -> None:
    """Register empty parameters `names` on the layer (those `optional` a checkpoint may
    lack); what loads into them is kept in `layer.collected[(name, piece)]` until
    `collected_pieces` takes it."""
    if layer.group.size != 1:
        raise UnsupportedModelError(f"{fmt} weights do not split over a tensor-parallel "
                                    "group yet")
    layer.collected = {}
    for name in names:
        param = nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
        param.weight_loader = partial(_collect, layer, name)
        param.optional = name in optional
        setattr(layer, name, param)


def _collect(layer: LinearBase, name: str, param: nn.Parameter, tensor: torch.Tensor,
             shard: int | None = None) -> None:
    layer.collected[(name, shard)] = tensor


def piece_sizes(layer: LinearBase) -> list[int]:
    """Output rows of each checkpoint piece of the layer (one piece when not fused)."""
    return list(getattr(layer, "local_sizes", None) or [layer.local_out])


def collected_pieces(layer: LinearBase) -> list[dict[str, torch.Tensor]]:
    """The collected tensors per piece, in piece order; forgets them on the layer."""
    found, layer.collected = layer.collected, {}
    count = len(piece_sizes(layer)) if any(shard is not None for _, shard in found) else 1
    pieces: list[dict[str, torch.Tensor]] = [{} for _ in range(count)]
    for (name, shard), tensor in found.items():
        pieces[shard or 0][name] = tensor
    return pieces
