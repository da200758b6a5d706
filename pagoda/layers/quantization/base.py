"""What a quantization format provides: a linear method per layer, by the layer's name."""

from __future__ import annotations

from abc import ABC, abstractmethod

from pagoda.layers.embedding import VocabEmbedding
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
