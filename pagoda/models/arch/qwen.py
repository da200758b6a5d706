"""Qwen2 / Qwen2.5 and Qwen3: config defaults, GGUF layout, parameter count. Qwen2 has a
bias on q/k/v (not o); Qwen3 has none but a per-head RMSNorm on q and k."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pagoda.models.arch.base import (
    FULL,
    SLIDING,
    ArchSpec,
    DecoderShape,
    GGUFLayout,
    decoder_parameters,
    frozen,
    uniform_layers,
)
from pagoda.models.arch.llama import DECODER_BLOCK_NAMES, DECODER_GLOBAL_NAMES
from pagoda.models.loader.gguf import decoder_config

if TYPE_CHECKING:
    from pagoda.models.hf_config import HFConfig
    from pagoda.models.loader.gguf import GGUFMeta

# transformers' defaults for the fields pagoda's models read
QWEN2_DEFAULTS = frozen({
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 28,
    "pad_token_id": None,
    "bos_token_id": None,
    "eos_token_id": None,
})
QWEN3_DEFAULTS = frozen({**QWEN2_DEFAULTS, "head_dim": 128, "attention_bias": False})


def complete_config(values: dict[str, Any]) -> None:
    """transformers' reading: the window applies only with use_sliding_window, and then to
    the layers from max_window_layers on."""
    from pagoda.models.hf_config import merge_rope_fields
    merge_rope_fields(values)
    if not values.get("use_sliding_window"):
        values["sliding_window"] = None
    if values.get("layer_types") is None and "num_hidden_layers" in values:
        window, first = values.get("sliding_window"), values.get("max_window_layers", 28)
        values["layer_types"] = [SLIDING if window is not None and i >= first else FULL
                                 for i in range(values["num_hidden_layers"])]


def qwen2_parameters(config: HFConfig) -> int:
    return decoder_parameters(config, DecoderShape(qkv_bias=True))


def qwen3_parameters(config: HFConfig) -> int:
    bias = bool(getattr(config, "attention_bias", False))
    return decoder_parameters(config, DecoderShape(qkv_bias=bias, o_bias=bias, qk_norm=True))


def _gguf_config(model_type: str, architecture: str):
    def build(meta: GGUFMeta) -> HFConfig:
        from pagoda.models.hf_config import HFConfig
        values = decoder_config(meta)
        values["rope_parameters"] = {"rope_type": "default",
                                     "rope_theta": float(meta.get("{arch}.rope.freq_base", 1e6))}
        return HFConfig.from_dict(dict(values, model_type=model_type,
                                       architectures=[architecture]))
    return build


QWEN3_BLOCK_NAMES = frozen({**DECODER_BLOCK_NAMES, "attn_q_norm": "self_attn.q_norm",
                            "attn_k_norm": "self_attn.k_norm"})

QWEN2 = ArchSpec(
    architectures=("Qwen2ForCausalLM",),
    model_types=("qwen2",),
    model_class="pagoda.models.qwen:Qwen2ForCausalLM",
    count_parameters=qwen2_parameters,
    layer_attention=uniform_layers,
    config_defaults=frozen({"qwen2": QWEN2_DEFAULTS}),
    complete_config=complete_config,
    gguf=frozen({"qwen2": GGUFLayout(build_config=_gguf_config("qwen2", "Qwen2ForCausalLM"),
                                     global_names=DECODER_GLOBAL_NAMES,
                                     block_names=DECODER_BLOCK_NAMES)}),
)
QWEN3 = ArchSpec(
    architectures=("Qwen3ForCausalLM",),
    model_types=("qwen3",),
    model_class="pagoda.models.qwen:Qwen3ForCausalLM",
    count_parameters=qwen3_parameters,
    layer_attention=uniform_layers,
    config_defaults=frozen({"qwen3": QWEN3_DEFAULTS}),
    complete_config=complete_config,
    gguf=frozen({"qwen3": GGUFLayout(build_config=_gguf_config("qwen3", "Qwen3ForCausalLM"),
                                     global_names=DECODER_GLOBAL_NAMES,
                                     block_names=QWEN3_BLOCK_NAMES)}),
)
