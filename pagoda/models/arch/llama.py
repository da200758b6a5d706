"""Llama and Mistral (and Llama-architecture checkpoints: SmolLM, TinyLlama, Yi): config
defaults, llama.cpp's GGUF layout and rope encodings, parameter count."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from pagoda.errors import UnsupportedModelError
from pagoda.models.arch.base import (
    ArchSpec,
    DecoderShape,
    GGUFLayout,
    decoder_parameters,
    frozen,
    uniform_layers,
)
from pagoda.models.loader.gguf import decoder_config, dequantize

if TYPE_CHECKING:
    from pagoda.models.hf_config import HFConfig
    from pagoda.models.loader.gguf import GGUFMeta

# transformers' defaults for the fields pagoda's models read, per model_type
LLAMA_DEFAULTS = frozen({
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "pad_token_id": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
})
MISTRAL_DEFAULTS = frozen({
    **{k: v for k, v in LLAMA_DEFAULTS.items() if k not in ("attention_bias", "mlp_bias")},
    "intermediate_size": 14336,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096 * 32,
    "sliding_window": 4096,
})


def count_parameters(config: HFConfig) -> int:
    bias = bool(getattr(config, "attention_bias", False))
    return decoder_parameters(config, DecoderShape(
        qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(config, "mlp_bias", False))))


def gguf_config(meta: GGUFMeta) -> HFConfig:
    from pagoda.models.hf_config import HFConfig
    values = decoder_config(meta, rms_eps_default=1e-5)
    values["rope_parameters"] = _llama_rope(meta, values["head_dim"])
    return HFConfig.from_dict(dict(values, model_type="llama",
                                   architectures=["LlamaForCausalLM"]))


def _llama_rope(meta: GGUFMeta, head_dim: int) -> dict[str, Any]:
    theta = float(meta.get("{arch}.rope.freq_base", 10000.0))
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    freqs = meta.tensor("rope_freqs.weight")
    if freqs is not None:
        return params | _llama3_rope(meta, dequantize(freqs), theta, head_dim)
    legacy_linear = meta.get("{arch}.rope.scale_linear")  # pre-2024 files: linear factor only
    kind = meta.get("{arch}.rope.scaling.type") or ("linear" if legacy_linear else "none")
    factor = meta.get("{arch}.rope.scaling.factor") or legacy_linear
    if kind == "none":
        return params
    if kind not in ("linear", "yarn") or not factor:
        raise UnsupportedModelError(
            f"{meta.path}: rope scaling {kind!r} (factor {factor}) is not supported")
    if kind == "linear":
        return params | {"rope_type": "linear", "factor": float(factor)}
    return params | _yarn_rope(meta, float(factor))


def _yarn_rope(meta: GGUFMeta, factor: float) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "yarn", "factor": factor}
    original = meta.get("{arch}.rope.scaling.original_context_length")
    if original:
        params["original_max_position_embeddings"] = int(original)
    for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        value = meta.get("{arch}.rope.scaling." + key)
        if value is not None:
            params[name] = float(value)
    return params


def _llama3_rope(meta: GGUFMeta, factors: np.ndarray, theta: float,
                 head_dim: int) -> dict[str, Any]:
    """Recover Llama 3.1-style rope parameters from llama.cpp's per-frequency divisors."""
    params = {"rope_type": "llama3", "factor": round(float(factors.max()), 4),
              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    if not np.allclose(llama3_rope_factors(params, theta, head_dim), factors, rtol=1e-4, atol=1e-6):
        raise UnsupportedModelError(f"{meta.path}: rope_freqs do not match Llama 3 rope scaling")
    return params


def llama3_rope_factors(params: Mapping[str, Any], theta: float, head_dim: int) -> np.ndarray:
    """Per-frequency divisors llama.cpp stores as rope_freqs for Llama 3 rope scaling."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    old_len = params["original_max_position_embeddings"]
    low, high, factor = params["low_freq_factor"], params["high_freq_factor"], params["factor"]
    smooth = np.clip((old_len / wavelen - low) / (high - low), 0.0, 1.0)
    return (1.0 / ((1 - smooth) / factor + smooth)).astype(np.float32)


def _unpermute_qk(name: str, weight: np.ndarray, config: HFConfig) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of q_proj / k_proj."""
    if ".self_attn.q_proj." in name:
        return unpermute_rope_rows(weight, config.num_attention_heads)
    if ".self_attn.k_proj." in name:
        return unpermute_rope_rows(weight, config.num_key_value_heads)
    return weight


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's permute: per head, rows (pair i, half h) -> row h*half + i.

    llama.cpp stores each head's rotary rows interleaved (x0, y0, x1, y1, ...); HF keeps
    them split in halves (x0, x1, ..., y0, y1, ...) for rotate_half.
    """
    rows = weight.shape[0]
    per_head = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return np.ascontiguousarray(per_head.swapaxes(1, 2).reshape(weight.shape))


# llama.cpp's per-block tensor stems shared by its decoder architectures
DECODER_BLOCK_NAMES = frozen({
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
})
DECODER_GLOBAL_NAMES = frozen({
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
})

LLAMA = ArchSpec(
    architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    model_types=("llama", "mistral"),
    model_class="pagoda.models.llama:LlamaForCausalLM",
    count_parameters=count_parameters,
    layer_attention=uniform_layers,
    config_defaults=frozen({"llama": LLAMA_DEFAULTS, "mistral": MISTRAL_DEFAULTS}),
    gguf=frozen({"llama": GGUFLayout(
        build_config=gguf_config,
        global_names=DECODER_GLOBAL_NAMES,
        block_names=DECODER_BLOCK_NAMES,
        transform=_unpermute_qk,
        skipped=frozenset({"rope_freqs.weight"}),
    )}),
)
