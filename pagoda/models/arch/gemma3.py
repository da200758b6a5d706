"""Gemma 3 text: config defaults (local/global layer pattern, two RoPE bases), llama.cpp's
GGUF layout (norm weights stored as 1 + w), parameter count."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

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
from pagoda.models.loader.gguf import decoder_config

if TYPE_CHECKING:
    from pagoda.models.hf_config import HFConfig
    from pagoda.models.loader.gguf import GGUFMeta

GLOBAL_THETA, LOCAL_THETA = 1_000_000.0, 10_000.0
SLIDING_PATTERN = 6  # every sixth layer is global
END_OF_TURN = "<end_of_turn>"

# transformers' defaults (Gemma3TextConfig) for the fields pagoda's model reads
GEMMA3_DEFAULTS = frozen({
    "vocab_size": 262208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
})


def complete_config(values: dict[str, Any]) -> None:
    """layer_types from the sliding-window pattern, and rope_parameters per layer type (the
    global layers' base and scaling, the local layers' own base), as transformers does."""
    pattern = values.pop("sliding_window_pattern", None) or SLIDING_PATTERN
    if values.get("layer_types") is None and "num_hidden_layers" in values:
        values["layer_types"] = [SLIDING if (i + 1) % pattern else FULL
                                 for i in range(values["num_hidden_layers"])]
    rope = dict(values.get("rope_parameters") or {})
    if FULL not in rope and SLIDING not in rope:  # older flat fields
        full = {"rope_type": "default", **rope, **(values.pop("rope_scaling", None) or {})}
        full.setdefault("rope_theta", values.pop("rope_theta", None) or GLOBAL_THETA)
        local = {"rope_type": "default",
                 "rope_theta": values.pop("rope_local_base_freq", None) or LOCAL_THETA}
        rope = {FULL: full, SLIDING: local}
    for params in rope.values():
        if "type" in params:
            params.setdefault("rope_type", params.pop("type"))
    values["rope_parameters"] = rope
    values.pop("rope_theta", None)
    values.pop("rope_scaling", None)
    values.pop("rope_local_base_freq", None)


def count_parameters(config: HFConfig) -> int:
    return decoder_parameters(config, DecoderShape(qk_norm=True, norms_per_layer=4))


def gguf_config(meta: GGUFMeta) -> HFConfig:
    from pagoda.models.hf_config import HFConfig
    values = decoder_config(meta)
    full: dict[str, Any] = {"rope_type": "default",
                            "rope_theta": float(meta.get("{arch}.rope.freq_base", GLOBAL_THETA))}
    factor = meta.get("{arch}.rope.scaling.factor")
    if meta.get("{arch}.rope.scaling.type") == "linear" and factor:
        full |= {"rope_type": "linear", "factor": float(factor)}
    return HFConfig.from_dict(dict(
        values,
        eos_token_id=_stop_ids(meta, values["eos_token_id"]),
        model_type="gemma3_text",
        architectures=["Gemma3ForCausalLM"],
        sliding_window=int(meta.require("{arch}.attention.sliding_window")),
        query_pre_attn_scalar=values["head_dim"],  # llama.cpp scales by head_dim
        final_logit_softcapping=meta.get("{arch}.final_logit_softcapping"),
        rope_parameters={FULL: full, SLIDING: {"rope_type": "default", "rope_theta": LOCAL_THETA}},
    ))


def _stop_ids(meta: GGUFMeta, eos: int | list[int] | None) -> int | list[int] | None:
    """The file's end-of-sequence ids and Gemma's end of turn, which GGUF files do not list
    (llama.cpp, like Gemma's generation config, stops on it too)."""
    stops = [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
    end_of_turn = meta.token_id(END_OF_TURN)
    if end_of_turn is not None and end_of_turn not in stops:
        stops.append(end_of_turn)
    return stops[0] if len(stops) == 1 else (stops or None)


def _unshift_norms(name: str, weight: np.ndarray, config: HFConfig) -> np.ndarray:
    """llama.cpp stores Gemma's norm weights as 1 + w; HF checkpoints hold w."""
    return weight - 1.0 if name.endswith("norm.weight") else weight


GEMMA3_BLOCK_NAMES = frozen({
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
})

GEMMA3 = ArchSpec(
    architectures=("Gemma3ForCausalLM",),
    model_types=("gemma3_text",),
    model_class="pagoda.models.gemma3:Gemma3ForCausalLM",
    count_parameters=count_parameters,
    layer_attention=uniform_layers,
    config_defaults=frozen({"gemma3_text": GEMMA3_DEFAULTS}),
    complete_config=complete_config,
    gguf=frozen({"gemma3": GGUFLayout(
        build_config=gguf_config,
        global_names=frozen({"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                             "output": "lm_head"}),
        block_names=GEMMA3_BLOCK_NAMES,
        transform=_unshift_norms,
    )}),
    default_chat_template="gemma3.jinja",  # Gemma's turns, pythonic tool calls
)
