"""Checkpoint tensors a quantized linear layer collects while loading and repacks after:
placeholder parameters whose loaders keep each tensor (a fused layer's per piece). Under
tensor parallelism each tensor is narrowed, as it loads, to the part this rank keeps: its
`Layout` says which dims run along the layer's outputs and inputs, and how many of them
one stored entry covers (eight for a nibble-packed int32, a group for a group's scale)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from pagoda.errors import UnsupportedModelError
from pagoda.layers.linear import LinearBase


@dataclass(frozen=True, slots=True)
class Layout:
    """Where a stored tensor's outputs and inputs lie: dims (None: not along it) and the
    outputs / inputs each entry of that dim covers. `covering_outputs`: a rank's outputs
    may start and end inside an entry (block scales, repeated per row): it keeps the
    entries that cover them, and the method crops (see `first_row_offset`)."""

    output_dim: int | None = None
    input_dim: int | None = None
    output_unit: int = 1
    input_unit: int = 1
    covering_outputs: bool = False


def add_collected_parameters(layer: LinearBase, layouts: dict[str, Layout | None], fmt: str,
                             optional: tuple[str, ...] = (),
                             convert: Callable[[torch.Tensor], Any] | None = None) -> None:
    """Register empty parameters named as `layouts`' keys (those `optional` a checkpoint may
    lack; a layout of None: the tensor is kept whole on every rank); what loads into them is
    narrowed to this rank's part, on the layer's device, and kept in
    `layer.collected[(name, piece)]` (as `convert` makes it, where given) until
    `collected_pieces` takes it."""
    layer.collected = {}
    for name, layout in layouts.items():
        param = nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
        param.weight_loader = partial(_collect, layer, name, layout, fmt, convert)
        param.optional = name in optional
        setattr(layer, name, param)


def _collect(layer: LinearBase, name: str, layout: Layout | None, fmt: str,
             convert: Callable[[torch.Tensor], Any] | None, param: nn.Parameter,
             tensor: torch.Tensor, shard: int | None = None) -> None:
    if layout is not None:
        tensor = rank_part(layer, tensor, layout, shard, f"{fmt} {name}")
    materialize = getattr(tensor, "materialize", None)  # a checkpoint slice: read it now
    tensor = materialize() if materialize is not None else tensor
    tensor = tensor.to(param.device)  # where the layer repacks it
    layer.collected[(name, shard)] = tensor if convert is None else convert(tensor)


def rank_part(layer: LinearBase, tensor: torch.Tensor, layout: Layout, shard: int | None,
              what: str) -> torch.Tensor:
    """The part of checkpoint tensor `tensor` (piece `shard`) this rank of the layer keeps."""
    outputs, inputs = layer.rank_outputs(shard), layer.rank_inputs()
    if outputs is not None:
        tensor = _narrow_units(tensor, layout.output_dim, outputs, layout.output_unit,
                               layout.covering_outputs, f"{what}: output rows", layer)
    if inputs is not None:
        tensor = _narrow_units(tensor, layout.input_dim, inputs, layout.input_unit, False,
                               f"{what}: input columns", layer)
    return tensor


def _narrow_units(tensor: torch.Tensor, dim: int | None, part: tuple[int, int], unit: int,
                  covering: bool, what: str, layer: LinearBase) -> torch.Tensor:
    """`tensor` narrowed along `dim` to the entries holding features [start, start + size),
    `unit` features per entry. A dim of one entry where the part spans more is a value
    shared by every feature (a per-tensor scale): kept whole."""
    if dim is None or tensor.dim() <= dim:
        return tensor
    start, size = part
    if covering:
        first, last = start // unit, -(-(start + size) // unit)
        return tensor if tensor.shape[dim] == 1 else tensor.narrow(dim, first, last - first)
    if start % unit or size % unit:
        raise UnsupportedModelError(
            f"{what} do not split over {layer.group.size} tensor-parallel ranks: each rank's "
            f"{size} (from {start}) are not whole units of {unit} as the format stores them")
    if tensor.shape[dim] == 1 and size // unit != 1:
        return tensor
    return tensor.narrow(dim, start // unit, size // unit)


def first_row_offset(layer: LinearBase, shard: int | None, unit: int) -> int:
    """Where this rank's first output row of piece `shard` lies inside the first entry of a
    `covering_outputs` layout of `unit` rows per entry."""
    outputs = layer.rank_outputs(shard)
    return 0 if outputs is None else outputs[0] % unit


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


def piece_shards(layer: LinearBase, pieces: list) -> list[int | None]:
    """The shard index each of `collected_pieces`' pieces loaded as (None: a whole tensor)."""
    return list(range(len(pieces))) if hasattr(layer, "local_sizes") else [None]
