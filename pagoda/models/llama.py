"""Llama-family decoder (Llama 2/3, SmolLM, Mistral-style configs) on pagoda's layers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pagoda.layers.activation import SiluAndMul
from pagoda.layers.attention.layer import Attention
from pagoda.layers.embedding import LMHead, VocabEmbedding
from pagoda.layers.linear import Linear, MergedLinear, copy_checked
from pagoda.layers.norm import RMSNorm
from pagoda.layers.rotary import RotaryEmbedding
from pagoda.models.hf_config import rope_parameters

# checkpoint name fragment -> (merged module name, shard index)
STACKED_PARAMS = {
    ".q_proj.": (".qkv_proj.", 0), ".k_proj.": (".qkv_proj.", 1), ".v_proj.": (".qkv_proj.", 2),
    ".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1),
}
IGNORED_PARAMS = ("rotary_emb.inv_freq",)


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    """Self-attention: merged qkv projection, RoPE, paged attention, output projection."""

    def __init__(self, config: Any, max_position: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        bias = bool(getattr(config, "attention_bias", False))
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(config.hidden_size, [q_size, kv_size, kv_size], bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias)
        self.rotary_emb = RotaryEmbedding(self.head_dim, max_position, rope_parameters(config))
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim,
                              self.head_dim ** -0.5)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                attn_metadata: Any) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        return self.o_proj(self.attn(q, k, v, attn_metadata, positions, self.rotary_emb))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward with a merged gate/up projection."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        inter = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, [inter, inter], bias)
        self.down_proj = Linear(inter, config.hidden_size, bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block; the residual stream is carried through the fused norms."""

    def __init__(self, config: Any, max_position: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, max_position)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None,
                attn_metadata: Any) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, attn_metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm."""

    def __init__(self, config: Any, max_position: int) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, max_position) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: Any) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, attn_metadata)
        return self.norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    """Causal LM head over LlamaModel; loads HF-named checkpoint tensors."""

    def __init__(self, config: Any, max_position: int) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_position)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = LMHead(config.vocab_size, config.hidden_size,
                              self.model.embed_tokens if tied else None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: Any) -> torch.Tensor:
        return self.model(input_ids, positions, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors into parameters; returns the parameter names filled."""
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith(IGNORED_PARAMS) or (name == "lm_head.weight" and self.lm_head.tied):
                continue
            target, shard = self._target(name)
            module_name, _, param_name = target.rpartition(".")
            module = modules.get(module_name)
            if module is None or not isinstance(getattr(module, param_name, None), nn.Parameter):
                raise KeyError(f"checkpoint tensor {name!r} has no place in the model")
            if isinstance(module, Linear):
                module.load(param_name, tensor, shard)
            else:
                copy_checked(getattr(module, param_name), tensor)
            loaded.add(target if shard is None else f"{target}#{shard}")
        return loaded

    @staticmethod
    def _target(name: str) -> tuple[str, int | None]:
        for fragment, (merged, shard) in STACKED_PARAMS.items():
            if fragment in name:
                return name.replace(fragment, merged), shard
        return name, None

    def expected_weights(self) -> set[str]:
        """Names load_weights must fill for a complete checkpoint."""
        expected = set()
        for module_name, module in self.named_modules():
            if isinstance(module, LMHead) and module.tied:
                continue
            for p, _ in module.named_parameters(recurse=False):
                name = f"{module_name}.{p}"
                if isinstance(module, MergedLinear):
                    expected |= {f"{name}#{i}" for i in range(len(module.out_sizes))}
                else:
                    expected.add(name)
        return expected
