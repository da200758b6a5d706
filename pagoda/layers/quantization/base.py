"""What a quantization format provides: a linear method per layer, by the layer's name; and
the float form a method falls back to where no kernel takes its codes."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn
from torch.nn import functional as F

from pagoda.layers.embedding import LMHead, VocabEmbedding
from pagoda.layers.linear import LinearBase, LinearMethod


class QuantizationConfig(ABC):
    """One checkpoint's quantization: the format's name and the method of each linear
    layer (None: the layer stays in the model's dtype)."""

    name: str

    @abstractmethod
    def linear_method(self, prefix: str, layer: LinearBase) -> LinearMethod | None:
        """The method of the linear layer called `prefix` (its module path)."""

    def bind_embedding(self, embedding: VocabEmbedding) -> None:
        """Give an embedding whose table no LM head shares the format's form of its table
        (by default it stays in the model's dtype)."""

    def bind_tied_table(self, embedding: VocabEmbedding, head: LMHead) -> None:
        """Give a table that `embedding` and `head` share the format's form (by default it
        stays in the model's dtype)."""


class DenseWeight(nn.Module):
    """A layer's weights held as floats (decoded at load, or stored so); `__call__(x)` is
    x W^T in x's dtype."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))
