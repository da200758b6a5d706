"""The model interface the runner drives: every architecture's causal LM subclasses it."""

from __future__ import annotations

import re
from abc import abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from pagoda.layers.attention.layer import Attention
from pagoda.layers.parallel import SINGLE, WHOLE, ParallelGroup, PipelineStage
from pagoda.models.arch.base import LayerAttention
from pagoda.models.loader.weights import expected_weights, load_named_weights
from pagoda.models.registry import arch_spec

LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")
Intermediate = tuple[torch.Tensor, torch.Tensor]  # (hidden, residual) between pipeline stages


class MissingLayer(nn.Module):
    """The place of a decoder layer that lives on another pipeline stage (no parameters)."""



class CausalLM(nn.Module):
    """A decoder over flat tokens: `forward` runs the batch's tokens through the layers
    against the paged KV cache, `compute_logits` scores the rows that sample. On a pipeline
    stage (`stage`) only its decoder layers exist: a stage after the first takes the previous
    stage's (hidden, residual) as `intermediate`, and a stage before the last returns its own
    instead of hidden states.

    Subclasses declare `packed_modules` (a fused module name -> the checkpoint modules stacked
    into it, in order) and their capabilities, which later features read."""

    packed_modules: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    supports_lora: ClassVar[bool] = False
    supports_pipeline_parallel: ClassVar[bool] = False

    def __init__(self, config: Any, max_position: int, group: ParallelGroup = SINGLE,
                 stage: PipelineStage = WHOLE) -> None:
        super().__init__()
        self.config = config
        self.max_position = max_position
        self.group = group
        self.stage = stage

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: Any,
                intermediate: Intermediate | None = None) -> torch.Tensor | Intermediate:
        """Hidden states [tokens, hidden] of the step's flat tokens (a stage before the last:
        its (hidden, residual))."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [rows, vocab] of the given hidden rows."""

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def attention_layers(self) -> list[Attention]:
        """The attention modules in layer order (each binds one slice of the KV cache)."""
        return [module for module in self.modules() if isinstance(module, Attention)]

    def kv_cache_spec(self) -> list[LayerAttention]:
        """Each attention layer's KV heads, head size and sliding window, in layer order."""
        return [LayerAttention(a.num_kv_heads, a.head_dim, a.sliding_window)
                for a in self.attention_layers()]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named checkpoint tensors in through each parameter's weight loader;
        returns the names filled (a fused piece as `name#index`); tensors the architecture's
        declaration ignores are skipped."""
        if self.stage.count > 1:
            weights = ((name, tensor) for name, tensor in weights if self._on_this_stage(name))
        return load_named_weights(self, weights, self.packed_modules,
                                  arch_spec(self.config).ignored_weights)

    def _on_this_stage(self, name: str) -> bool:
        """Whether a checkpoint tensor belongs here: not one of another stage's layers."""
        match = LAYER_NAME.match(name)
        return match is None or self.stage.owns(int(match[1]))

    def expected_weights(self) -> set[str]:
        """Names load_weights must fill for a complete checkpoint."""
        return expected_weights(self)
