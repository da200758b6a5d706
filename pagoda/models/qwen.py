"""Qwen2 / Qwen2.5 and Qwen3 decoders: Llama's layers with Qwen's attention options."""

from __future__ import annotations

from typing import Any

from pagoda.layers.norm import RMSNorm
from pagoda.models.llama import AttentionOptions, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: a bias on the q, k and v projections, none on o."""

    @classmethod
    def attention_options(cls, config: Any, window: int | None) -> AttentionOptions:
        return AttentionOptions(qkv_bias=True, sliding_window=window)


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: per-head RMSNorm on q and k before RoPE; explicit head_dim."""

    @classmethod
    def attention_options(cls, config: Any, window: int | None) -> AttentionOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionOptions(qkv_bias=bias, o_bias=bias, qk_norm=RMSNorm,
                                sliding_window=window)
