"""Mixture-of-experts decoders on Llama's layers: Qwen3-MoE (Qwen3 attention with per-head
q/k norm; routed experts renormalised when norm_topk_prob; dense MLP layers mixed in) and
Mixtral (Mistral attention; 8 experts, 2 active, always renormalised). No shared expert."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from pagoda.layers.embedding import LMHead
from pagoda.layers.linear import ReplicatedLinear, UnquantizedLinearMethod
from pagoda.layers.moe.layer import FusedMoE
from pagoda.layers.parallel import SINGLE, WHOLE, ParallelGroup, PipelineStage
from pagoda.models.arch.base import layer_windows
from pagoda.models.arch.moe import is_moe_layer, moe_intermediate_size, num_experts
from pagoda.models.interface import CausalLM, Intermediate, MissingLayer
from pagoda.models.llama import (
    LLAMA_PACKED,
    AttentionOptions,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
)
from pagoda.models.loader.weights import split_stacked_experts
from pagoda.models.qwen import Qwen3ForCausalLM


class SparseMoeBlock(nn.Module):
    """The router (`gate`, one logit per expert) and the experts it picks from."""

    def __init__(self, config: Any, group: ParallelGroup, renormalize: bool) -> None:
        super().__init__()
        experts = num_experts(config)
        # the router stays in the model's dtype in every checkpoint format (as in vLLM)
        self.gate = ReplicatedLinear(config.hidden_size, experts,
                                     method=UnquantizedLinearMethod())
        self.experts = FusedMoE(experts, int(config.num_experts_per_tok), config.hidden_size,
                                moe_intermediate_size(config), renormalize, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts.forward_with_router(x, self.gate)


class MoeForCausalLM(CausalLM):
    """Llama's decoder with routed experts in the layers `is_moe_layer` picks; subclasses
    set the attention options and whether the top-k weights are renormalised. LoRA adapts
    the attention projections and the dense MLP layers; the experts and the router take
    none (an adapter for them is refused)."""

    packed_modules: ClassVar = LLAMA_PACKED
    supports_lora: ClassVar[bool] = True

    supports_pipeline_parallel: ClassVar[bool] = True

    def __init__(self, config: Any, max_position: int, group: ParallelGroup = SINGLE,
                 stage: PipelineStage = WHOLE) -> None:
        super().__init__(config, max_position, group, stage)
        layers = [
            LlamaDecoderLayer(config, max_position, group, self.attention_options(config, window),
                              SparseMoeBlock(config, group, self.renormalize(config))
                              if is_moe_layer(config, i) else None)
            if stage.owns(i) else MissingLayer()
            for i, window in enumerate(layer_windows(config))]
        self.model = LlamaModel(layers, config, group, stage)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = LMHead(config.vocab_size, config.hidden_size,
                              self.model.embed_tokens if tied else None, group)

    @classmethod
    def attention_options(cls, config: Any, window: int | None) -> AttentionOptions:
        raise NotImplementedError

    @classmethod
    def renormalize(cls, config: Any) -> bool:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: Any,
                intermediate: Intermediate | None = None) -> torch.Tensor | Intermediate:
        return self.model(input_ids, positions, attn_metadata, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Experts one tensor each, packed (transformers 5) or stacked per projection (GGUF)."""
        return super().load_weights(split_stacked_experts(weights))


class Qwen3MoeForCausalLM(MoeForCausalLM):
    """Qwen3-MoE: softmax over all experts, top k, renormalised if norm_topk_prob."""

    attention_options = Qwen3ForCausalLM.attention_options

    @classmethod
    def renormalize(cls, config: Any) -> bool:
        return bool(getattr(config, "norm_topk_prob", False))


class MixtralForCausalLM(MoeForCausalLM):
    """Mixtral: softmax over the top-k logits; its original checkpoints name the experts
    block `block_sparse_moe` (transformers 5: `mlp`)."""

    attention_options = LlamaForCausalLM.attention_options

    @classmethod
    def renormalize(cls, config: Any) -> bool:
        return True

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(
            (name.replace(".block_sparse_moe.", ".mlp."), tensor) for name, tensor in weights)
