"""Mixture-of-experts decoders: Qwen3-MoE (Qwen3 attention, routed SwiGLU experts, dense MLP
layers where `mlp_only_layers` / `decoder_sparse_step` say) and Mixtral (Mistral attention,
8 experts, 2 active): config defaults, parameter counts (all experts, and the ones a token
runs) and llama.cpp's `qwen3moe` GGUF layout (experts stacked per projection)."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from pagoda.models.arch.base import (
    ArchSpec,
    DecoderShape,
    ExpertLayout,
    GGUFLayout,
    decoder_parameters,
    frozen,
    head_dim,
    uniform_layers,
)
from pagoda.models.arch.llama import DECODER_GLOBAL_NAMES
from pagoda.models.arch.qwen import QWEN3_BLOCK_NAMES
from pagoda.models.loader.gguf import decoder_config

if TYPE_CHECKING:
    from pagoda.models.hf_config import HFConfig
    from pagoda.models.loader.gguf import GGUFMeta

# transformers' defaults (Qwen3MoeConfig, MixtralConfig) for the fields pagoda reads
QWEN3_MOE_DEFAULTS = frozen({
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "use_sliding_window": False,
    "sliding_window": None,
    "decoder_sparse_step": 1,
    "moe_intermediate_size": 768,
    "num_experts_per_tok": 8,
    "norm_topk_prob": False,
    "mlp_only_layers": [],
    "pad_token_id": None,
    "bos_token_id": None,
    "eos_token_id": None,
})
MIXTRAL_DEFAULTS = frozen({
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 4096 * 32,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "sliding_window": None,
    "num_experts_per_tok": 2,
    "pad_token_id": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
})
MIXTRAL_ROPE_THETA = 1e6
# the expert count, under either of its names (see _both_expert_names)
QWEN3_MOE_EXPERTS, MIXTRAL_EXPERTS = 128, 8


def num_experts(config: Any) -> int:
    """Routed experts per MoE layer (config.json says num_experts or num_local_experts)."""
    value = getattr(config, "num_experts", None)
    return int(value if value is not None else config.num_local_experts)


def is_moe_layer(config: Any, layer: int) -> bool:
    """transformers' rule: routed experts unless the layer is in mlp_only_layers or off the
    decoder_sparse_step grid (Mixtral: every layer)."""
    only_mlp = getattr(config, "mlp_only_layers", None) or []
    step = getattr(config, "decoder_sparse_step", None) or 1
    return layer not in only_mlp and num_experts(config) > 0 and (layer + 1) % step == 0


def moe_intermediate_size(config: Any) -> int:
    """One expert's intermediate size (Mixtral's experts use intermediate_size)."""
    return getattr(config, "moe_intermediate_size", None) or config.intermediate_size


def expert_layout(config: Any) -> ExpertLayout:
    layers = sum(is_moe_layer(config, i) for i in range(config.num_hidden_layers))
    return ExpertLayout(moe_layers=layers, num_experts=num_experts(config),
                        top_k=int(config.num_experts_per_tok),
                        params_per_expert=3 * config.hidden_size * moe_intermediate_size(config))


def moe_parameters(config: Any) -> int:
    """Embedding, attention, norms and head as a dense decoder counts them, plus each MoE
    layer's router and every expert, and each dense layer's MLP."""
    bias = bool(getattr(config, "attention_bias", False))
    qk_norm = getattr(config, "model_type", None) == "qwen3_moe"
    no_mlp = SimpleNamespace(
        hidden_size=config.hidden_size, intermediate_size=0,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=head_dim(config),
        vocab_size=config.vocab_size, num_hidden_layers=config.num_hidden_layers,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)))
    base = decoder_parameters(no_mlp, DecoderShape(qkv_bias=bias, o_bias=bias, qk_norm=qk_norm))
    experts = expert_layout(config)
    routed = experts.moe_layers * experts.num_experts * (experts.params_per_expert
                                                         + config.hidden_size)
    dense = (config.num_hidden_layers - experts.moe_layers) * 3 * config.hidden_size \
        * config.intermediate_size
    return base + routed + dense


def complete_qwen3_moe(values: dict[str, Any]) -> None:
    """The window applies only with use_sliding_window (then to every layer)."""
    from pagoda.models.hf_config import merge_rope_fields
    merge_rope_fields(values)
    if not values.get("use_sliding_window"):
        values["sliding_window"] = None
    _both_expert_names(values, QWEN3_MOE_EXPERTS)


def complete_mixtral(values: dict[str, Any]) -> None:
    from pagoda.models.hf_config import merge_rope_fields
    if not values.get("rope_parameters") and values.get("rope_theta") is None:
        values["rope_theta"] = MIXTRAL_ROPE_THETA
    merge_rope_fields(values)
    _both_expert_names(values, MIXTRAL_EXPERTS)


def _both_expert_names(values: dict[str, Any], default: int) -> None:
    """num_experts and num_local_experts name one field (transformers maps one to the
    other; Qwen's config.json files say num_experts, transformers 5 saves num_local_experts)."""
    count = values.get("num_experts", values.get("num_local_experts", default))
    values["num_experts"] = values["num_local_experts"] = count


def gguf_config(meta: GGUFMeta) -> HFConfig:
    """llama.cpp's qwen3moe: expert count, active count and expert width in metadata;
    routed weights always renormalised; a block without a router is a dense layer."""
    from pagoda.models.hf_config import HFConfig
    values = decoder_config(meta, experts=True)
    blocks = values["num_hidden_layers"]
    routed = {int(m[1]) for t in meta.reader.tensors
              if (m := re.fullmatch(r"blk\.(\d+)\.ffn_gate_inp\.weight", t.name))}
    return HFConfig.from_dict(dict(
        values,
        model_type="qwen3_moe",
        architectures=["Qwen3MoeForCausalLM"],
        rope_parameters={"rope_type": "default",
                         "rope_theta": float(meta.get("{arch}.rope.freq_base", 1e6))},
        num_experts=int(meta.require("{arch}.expert_count")),
        num_experts_per_tok=int(meta.require("{arch}.expert_used_count")),
        moe_intermediate_size=int(meta.require("{arch}.expert_feed_forward_length")),
        norm_topk_prob=bool(meta.get("{arch}.expert_weights_norm", True)),
        decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(blocks) if i not in routed],
    ))


QWEN3_MOE_BLOCK_NAMES = frozen({
    **QWEN3_BLOCK_NAMES,
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",  # [experts, inter, hidden]
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",  # [experts, hidden, inter]
})

QWEN3_MOE = ArchSpec(
    architectures=("Qwen3MoeForCausalLM",),
    model_types=("qwen3_moe",),
    model_class="pagoda.models.moe:Qwen3MoeForCausalLM",
    count_parameters=moe_parameters,
    layer_attention=uniform_layers,
    config_defaults=frozen({"qwen3_moe": QWEN3_MOE_DEFAULTS}),
    complete_config=complete_qwen3_moe,
    gguf=frozen({"qwen3moe": GGUFLayout(build_config=gguf_config,
                                        global_names=DECODER_GLOBAL_NAMES,
                                        block_names=QWEN3_MOE_BLOCK_NAMES)}),
    experts=expert_layout,
)
MIXTRAL = ArchSpec(
    architectures=("MixtralForCausalLM",),
    model_types=("mixtral",),
    model_class="pagoda.models.moe:MixtralForCausalLM",
    count_parameters=moe_parameters,
    layer_attention=uniform_layers,
    config_defaults=frozen({"mixtral": MIXTRAL_DEFAULTS}),
    complete_config=complete_mixtral,
    experts=expert_layout,
)
