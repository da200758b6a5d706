"""Gemma 3 text decoder: four norms per layer, per-head q/k norm, scaled embeddings, GELU
MLP, local (sliding-window) and global layers with their own RoPE bases, tied embeddings and
optional final logit soft-capping."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from pagoda.errors import UnsupportedModelError
from pagoda.layers.activation import GeluTanhAndMul
from pagoda.layers.embedding import LMHead, VocabEmbedding
from pagoda.layers.norm import GemmaRMSNorm, norm_add_norm
from pagoda.layers.parallel import SINGLE, WHOLE, ParallelGroup, PipelineStage
from pagoda.models.arch.base import FULL, SLIDING, layer_windows
from pagoda.models.interface import CausalLM, Intermediate, MissingLayer
from pagoda.models.llama import LLAMA_PACKED, AttentionOptions, LlamaAttention, LlamaMLP


def attention_options(config: Any, window: int | None) -> AttentionOptions:
    """A local layer (window set) uses the local RoPE base, a global one the global base."""
    rope = config.rope_parameters[SLIDING if window else FULL]
    return AttentionOptions(qk_norm=GemmaRMSNorm, scale=config.query_pre_attn_scalar ** -0.5,
                            rope=dict(rope), sliding_window=window)


class Gemma3DecoderLayer(nn.Module):
    """Norms before and after both attention and MLP; each output is normed before its
    residual add, in one kernel with the add and the next pre-norm. The layer returns its
    MLP output before the post-feedforward norm, which the model fuses the same way with the
    next layer's input norm."""

    def __init__(self, config: Any, max_position: int, group: ParallelGroup,
                 window: int | None) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.self_attn = LlamaAttention(config, max_position, group,
                                        attention_options(config, window))
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.mlp = LlamaMLP(config, group, act=GeluTanhAndMul())
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor,
                attn_metadata: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """`hidden` is already input-normed; returns the MLP output (not yet post-normed)."""
        hidden = self.self_attn(positions, hidden, attn_metadata)
        hidden, residual = norm_add_norm(hidden, residual, self.post_attention_layernorm,
                                         self.pre_feedforward_layernorm)
        return self.mlp(hidden), residual


class Gemma3Model(nn.Module):
    """Scaled embedding, decoder layers (a pipeline stage's only), final norm."""

    def __init__(self, config: Any, max_position: int, group: ParallelGroup,
                 stage: PipelineStage = WHOLE) -> None:
        super().__init__()
        self.stage = stage
        # transformers rounds the scale to the weights' dtype before multiplying
        embed_scale = float(torch.tensor(config.hidden_size ** 0.5,
                                         dtype=torch.get_default_dtype()))
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, group,
                                           scale=embed_scale)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(config, max_position, group, window)
            if stage.owns(i) else MissingLayer()
            for i, window in enumerate(layer_windows(config)))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: Any,
                intermediate: Intermediate | None = None) -> torch.Tensor | Intermediate:
        if intermediate is None:
            hidden, residual = self.embed_tokens(input_ids), None  # scaled
        else:  # the previous stage applied its last post-feedforward norm
            hidden, residual = intermediate
        output_norm = None  # the previous layer's post-feedforward norm, still to apply
        for layer in self.layers:
            if isinstance(layer, MissingLayer):
                continue
            hidden, residual = norm_add_norm(hidden, residual, output_norm,
                                             layer.input_layernorm)
            hidden, residual = layer(positions, hidden, residual, attn_metadata)
            output_norm = layer.post_feedforward_layernorm
        if not self.stage.is_last:
            return output_norm(hidden)[0], residual
        return norm_add_norm(hidden, residual, output_norm, self.norm)[0]


class Gemma3ForCausalLM(CausalLM):
    """Causal LM over Gemma3Model; logits soft-capped when the config says so."""

    packed_modules: ClassVar = LLAMA_PACKED
    supports_lora: ClassVar[bool] = True
    supports_pipeline_parallel: ClassVar[bool] = True

    def __init__(self, config: Any, max_position: int, group: ParallelGroup = SINGLE,
                 stage: PipelineStage = WHOLE) -> None:
        super().__init__(config, max_position, group, stage)
        if getattr(config, "attn_logit_softcapping", None):
            raise UnsupportedModelError("Gemma 3 with attn_logit_softcapping is not supported")
        self.model = Gemma3Model(config, max_position, group, stage)
        tied = bool(getattr(config, "tie_word_embeddings", True))
        self.lm_head = LMHead(config.vocab_size, config.hidden_size,
                              self.model.embed_tokens if tied else None, group)
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: Any,
                intermediate: Intermediate | None = None) -> torch.Tensor | Intermediate:
        return self.model(input_ids, positions, attn_metadata, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
