"""Llama-family decoder (Llama 2/3, SmolLM, Mistral, Yi, TinyLlama) on pagoda's layers; its
attention and decoder layer take the options that Qwen2 and Qwen3 change."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from pagoda.layers.activation import SiluAndMul
from pagoda.layers.attention.layer import Attention
from pagoda.layers.embedding import LMHead, VocabEmbedding
from pagoda.layers.float8_rows import Float8Rows
from pagoda.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagoda.layers.norm import RMSNorm, norm_for_product, norm_in_products, product_then_norm
from pagoda.layers.normed_rows import NormedRows
from pagoda.layers.parallel import SINGLE, WHOLE, ParallelGroup, PipelineStage
from pagoda.layers.rotary import RotaryEmbedding
from pagoda.models.arch.base import head_dim, layer_windows
from pagoda.models.hf_config import rope_parameters
from pagoda.models.interface import CausalLM, Intermediate, MissingLayer

LLAMA_PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True, slots=True)
class AttentionOptions:
    """What differs between the attention layers of the Llama-like families."""

    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: type[RMSNorm] | None = None  # per-head RMSNorm of q and k before RoPE
    scale: float | None = None  # None: head_dim ** -0.5
    rope: dict[str, Any] | None = None  # None: the config's rope parameters
    sliding_window: int | None = None


class LlamaAttention(nn.Module):
    """Self-attention: fused qkv projection, optional q/k norm, RoPE, paged attention,
    output projection; heads split over the tensor-parallel group."""

    def __init__(self, config: Any, max_position: int, group: ParallelGroup,
                 options: AttentionOptions) -> None:
        super().__init__()
        self.head_dim = head_dim(config)
        heads = config.num_attention_heads
        kv_heads = config.num_key_value_heads or heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, heads, kv_heads,
                                          options.qkv_bias, group=group)
        self.o_proj = RowParallelLinear(heads * self.head_dim, config.hidden_size,
                                        options.o_bias, group=group)
        norm = options.qk_norm
        self.q_norm = norm(self.head_dim, config.rms_norm_eps) if norm else None
        self.k_norm = norm(self.head_dim, config.rms_norm_eps) if norm else None
        self.rotary_emb = RotaryEmbedding(self.head_dim, max_position,
                                          options.rope or rope_parameters(config))
        self.attn = Attention(self.qkv_proj.local_heads, self.qkv_proj.local_kv_heads,
                              self.head_dim, options.scale or self.head_dim ** -0.5,
                              sliding_window=options.sliding_window)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                attn_metadata: Any) -> torch.Tensor:
        return self.o_proj(self.attend(positions, hidden, attn_metadata))

    def attend(self, positions: torch.Tensor, hidden: torch.Tensor | NormedRows | Float8Rows,
               attn_metadata: Any) -> torch.Tensor:
        """The attention's output heads, before the output projection."""
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        qk_norm = (self.q_norm, self.k_norm) if self.q_norm is not None else None
        return self.attn(q, k, v, attn_metadata, positions, self.rotary_emb, qk_norm)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward with a fused gate/up projection."""

    def __init__(self, config: Any, group: ParallelGroup, act: nn.Module | None = None) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], bias,
                                                       group=group)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias, group=group)
        self.act = act or SiluAndMul()

    def forward(self, x: torch.Tensor | NormedRows | Float8Rows) -> torch.Tensor:
        return self.down_proj(self.activated(x))

    def activated(self, x: torch.Tensor | NormedRows | Float8Rows) -> torch.Tensor | Float8Rows:
        """The gated activation of x's gate and up products: the down product's input."""
        return self.gate_up_proj(x, activation=self.act, float8_for=self.down_proj)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block; the residual stream is carried through the fused norms."""

    def __init__(self, config: Any, max_position: int, group: ParallelGroup,
                 options: AttentionOptions, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, max_position, group, options)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp or LlamaMLP(config, group)  # a mixture of experts passes its own
        # the next layer's input norm and qkv projection (a tuple: not submodules of this
        # layer), where the down projection and they can do that norm (hand_norm_to)
        self.next_norm: tuple[RMSNorm, QKVParallelLinear] | None = None

    def hand_norm_to(self, after: LlamaDecoderLayer) -> None:
        """Let this layer's down projection and `after`'s qkv projection do `after`'s input
        norm where their kernels can (the layer then returns NormedRows, which `after`
        takes in place of its norm's rows)."""
        if isinstance(self.mlp, LlamaMLP):
            self.next_norm = (after.input_layernorm, after.self_attn.qkv_proj)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor | NormedRows,
                residual: torch.Tensor | None,
                attn_metadata: Any) -> tuple[torch.Tensor | NormedRows, torch.Tensor]:
        if not isinstance(hidden, NormedRows):  # (else the layer before did the norm)
            hidden, residual = norm_for_product(self.input_layernorm, hidden, residual,
                                                self.self_attn.qkv_proj)
        heads = self.self_attn.attend(positions, hidden, attn_metadata)
        # the norms in the products around them where they can
        mlp = self.mlp if isinstance(self.mlp, LlamaMLP) else None
        hidden, residual = product_then_norm(self.self_attn.o_proj, heads,
                                             self.post_attention_layernorm, residual,
                                             mlp.gate_up_proj if mlp is not None else None)
        if mlp is None or self.next_norm is None:
            return self.mlp(hidden), residual
        norm, qkv = self.next_norm
        activated = mlp.activated(hidden)
        done = norm_in_products(mlp.down_proj, activated, norm, residual, qkv)
        return done if done is not None else (mlp.down_proj(activated), residual)


class LlamaModel(nn.Module):
    """Embedding, decoder layers (a pipeline stage's only, the others MissingLayer), final
    norm."""

    def __init__(self, layers: list[nn.Module], config: Any, group: ParallelGroup,
                 stage: PipelineStage = WHOLE) -> None:
        super().__init__()
        self.stage = stage
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, group)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        for layer, after in zip(layers, layers[1:]):  # two decoder layers of this stage
            if isinstance(layer, LlamaDecoderLayer) and isinstance(after, LlamaDecoderLayer):
                layer.hand_norm_to(after)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: Any,
                intermediate: Intermediate | None = None) -> torch.Tensor | Intermediate:
        if intermediate is None:
            hidden, residual = self.embed_tokens(input_ids), None
        else:
            hidden, residual = intermediate
        for layer in self.layers:
            if not isinstance(layer, MissingLayer):
                hidden, residual = layer(positions, hidden, residual, attn_metadata)
        if not self.stage.is_last:
            return hidden, residual
        return self.norm(hidden, residual)[0]


class LlamaForCausalLM(CausalLM):
    """Causal LM head over LlamaModel; subclasses change `attention_options`."""

    packed_modules: ClassVar = LLAMA_PACKED
    supports_lora: ClassVar[bool] = True

    supports_pipeline_parallel: ClassVar[bool] = True

    def __init__(self, config: Any, max_position: int, group: ParallelGroup = SINGLE,
                 stage: PipelineStage = WHOLE) -> None:
        super().__init__(config, max_position, group, stage)
        windows = layer_windows(config)
        layers = [LlamaDecoderLayer(config, max_position, group,
                                    self.attention_options(config, windows[i]))
                  if stage.owns(i) else MissingLayer()
                  for i in range(config.num_hidden_layers)]
        self.model = LlamaModel(layers, config, group, stage)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = LMHead(config.vocab_size, config.hidden_size,
                              self.model.embed_tokens if tied else None, group)

    @classmethod
    def attention_options(cls, config: Any, window: int | None) -> AttentionOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionOptions(qkv_bias=bias, o_bias=bias, sliding_window=window)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: Any,
                intermediate: Intermediate | None = None) -> torch.Tensor | Intermediate:
        return self.model(input_ids, positions, attn_metadata, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
