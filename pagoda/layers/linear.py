"""Linear layers, including merged projections loaded shard by shard (qkv, gate_up)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Linear(nn.Module):
    """y = x W^T (+ b), with a weight_loader hook for checkpoint tensors."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load(self, name: str, tensor: torch.Tensor, shard: int | None = None) -> None:
        param = self.weight if name == "weight" else self.bias
        copy_checked(param, tensor)


class MergedLinear(Linear):
    """Several projections of the same input stacked on the output dim (e.g. q, k, v)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(out_sizes), bias)
        self.out_sizes = list(out_sizes)
        self.offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes))]

    def load(self, name: str, tensor: torch.Tensor, shard: int | None = None) -> None:
        if shard is None:
            return super().load(name, tensor)
        param = self.weight if name == "weight" else self.bias
        assert param is not None
        start, size = self.offsets[shard], self.out_sizes[shard]
        copy_checked(param.data.narrow(0, start, size), tensor)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(y.split(self.out_sizes, dim=-1))


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(src.shape)} does not fit "
                         f"parameter of shape {tuple(dst.shape)}")
    dst.data.copy_(src)
