"""Walks a checkpoint's (name, tensor) pairs onto a model's parameters through each
parameter's `weight_loader`, mapping pieces of fused modules (q/k/v -> qkv_proj)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from pagoda.layers.linear import default_weight_loader


def fused_target(name: str, packed: Mapping[str, tuple[str, ...]]) -> tuple[str, int | None]:
    """The parameter a checkpoint name loads into, and its piece index in a fused module."""
    for fused, pieces in packed.items():
        for index, piece in enumerate(pieces):
            fragment = f".{piece}."
            if fragment in name:
                return name.replace(fragment, f".{fused}."), index
    return name, None


def load_named_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                       packed: Mapping[str, tuple[str, ...]],
                       ignored: tuple[str, ...]) -> set[str]:
    """Load every tensor; returns the names filled. A tensor with no parameter is an error,
    except those `ignored` and an lm_head tied to the embedding."""
    params = dict(model.named_parameters())
    tied = {f"{name}.weight" for name, module in model.named_modules() if getattr(module, "tied", False)}
    loaded: set[str] = set()
    for name, tensor in weights:
        if name.endswith(ignored) or name in tied:
            continue
        target, piece = fused_target(name, packed)
        param = params.get(target)
        if param is None:
            raise KeyError(f"checkpoint tensor {name!r} has no place in the model")
        loader = getattr(param, "weight_loader", default_weight_loader)
        loader(param, tensor, piece)
        loaded.add(target if piece is None else f"{target}#{piece}")
    return loaded


def expected_weights(model: nn.Module) -> set[str]:
    """Every parameter name, a fused module's as one `name#index` per piece; tied heads none."""
    expected = set()
    for module_name, module in model.named_modules():
        if getattr(module, "tied", False):
            continue
        pieces = getattr(module, "num_shards", None)
        for param_name, _ in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}"
            expected |= {f"{name}#{i}" for i in range(pieces)} if pieces else {name}
    return expected
