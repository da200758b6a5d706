"""HFConfig reads config.json as transformers does, for every field pagoda's models read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoConfig

from pagoda.errors import UnsupportedModelError
from pagoda.models.hf_config import HFConfig, rope_parameters
from pagoda.models.registry import ARCH_SPECS

MODEL_TYPE_DEFAULTS = {model_type: defaults for spec in ARCH_SPECS
                       for model_type, defaults in spec.config_defaults.items()}

BENCH_CONFIGS = sorted(Path(__file__).parents[2].glob("bench/configs/*/config.json"))
# every config field pagoda reads (models, loader, estimate, roofline, engine limits)
READ_FIELDS = (
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "attention_bias", "mlp_bias", "sliding_window", "bos_token_id", "eos_token_id",
    "pad_token_id", "layer_types", "hidden_activation", "query_pre_attn_scalar",
    "final_logit_softcapping", "attn_logit_softcapping", "num_experts", "num_local_experts",
    "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
    "mlp_only_layers",
)
PARTIAL_CONFIGS = [
    {"model_type": "llama"},
    {"model_type": "mistral"},
    {"model_type": "llama", "num_key_value_heads": None, "hidden_size": 512,
     "num_attention_heads": 8},
    {"model_type": "mistral", "sliding_window": None, "rope_theta": 1e6},
    {"model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2.0}},
    {"model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
     "dtype": "float16"},
    {"model_type": "qwen2", "sliding_window": 32768, "max_window_layers": 70},
    {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64,
     "max_window_layers": 3, "num_hidden_layers": 5},
    {"model_type": "qwen3", "rope_theta": 1e6, "head_dim": 64, "tie_word_embeddings": True},
    {"model_type": "gemma3_text"},
    {"model_type": "gemma3_text", "sliding_window_pattern": 3, "num_hidden_layers": 7,
     "rope_theta": 5e5, "rope_local_base_freq": 2e4,
     "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
    {"model_type": "qwen3_moe"},
    {"model_type": "qwen3_moe", "num_experts": 64, "mlp_only_layers": [0, 3],
     "use_sliding_window": True, "sliding_window": 128},
    {"model_type": "qwen3_moe", "num_local_experts": 16, "norm_topk_prob": True},
    {"model_type": "mixtral"},
    {"model_type": "mixtral", "num_local_experts": 4, "rope_theta": 1e4, "sliding_window": 64},
    {"model_type": "llama", "torch_dtype": "bfloat16", "eos_token_id": [5, 7],
     "tie_word_embeddings": True, "head_dim": 96},
]


def transformers_view(values: dict[str, Any]) -> Any:
    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def their_field(theirs: Any, name: str) -> Any:
    """A field of transformers' config; head_dim derived where the class has none (Qwen2)."""
    value = getattr(theirs, name, None)
    if name == "head_dim" and value is None:
        return theirs.hidden_size // theirs.num_attention_heads
    return value


def same_fields(ours: HFConfig, theirs: Any) -> None:
    for name in READ_FIELDS:
        assert getattr(ours, name, None) == their_field(theirs, name), name
    assert ours.rope_parameters == theirs.rope_parameters
    assert rope_parameters(ours) == rope_parameters(theirs)
    their_dtype = getattr(theirs, "dtype", None)
    assert getattr(ours, "dtype", None) == (their_dtype and str(their_dtype).removeprefix("torch."))


@pytest.mark.parametrize("path", BENCH_CONFIGS, ids=lambda p: p.parent.name)
def test_bench_configs_read_as_transformers_reads_them(path: Path) -> None:
    same_fields(HFConfig.from_dir(path.parent), AutoConfig.from_pretrained(path.parent))


@pytest.mark.parametrize("values", PARTIAL_CONFIGS, ids=lambda v: ",".join(v)[:60])
def test_missing_fields_get_transformers_defaults(values: dict[str, Any]) -> None:
    same_fields(HFConfig.from_dict(values), transformers_view(values))


@pytest.mark.parametrize("model_type", sorted(MODEL_TYPE_DEFAULTS))
def test_defaults_are_transformers_defaults(model_type: str) -> None:
    theirs = transformers_view({"model_type": model_type})
    for name, value in MODEL_TYPE_DEFAULTS[model_type].items():
        assert getattr(theirs, name) == value, name


def test_pulled_model_config(smollm2_dir: Path) -> None:
    same_fields(HFConfig.from_dir(smollm2_dir), AutoConfig.from_pretrained(smollm2_dir))


def test_saved_config_reads_back_in_both(tmp_path: Path) -> None:
    config = HFConfig.from_dict(PARTIAL_CONFIGS[-1] | {"architectures": ["LlamaForCausalLM"]})
    config.save(tmp_path)
    assert HFConfig.from_dir(tmp_path) == config
    same_fields(config, AutoConfig.from_pretrained(tmp_path))


def test_to_transformers_keeps_the_fields() -> None:
    config = HFConfig.from_dict(PARTIAL_CONFIGS[4])
    converted = config.to_transformers()
    assert type(converted).__name__ == "LlamaConfig"
    same_fields(config, converted)


def test_unknown_model_type_gets_no_defaults() -> None:
    config = HFConfig.from_dict({"model_type": "gpt2", "n_embd": 768})
    assert config.to_dict() == {"model_type": "gpt2", "n_embd": 768}


@pytest.mark.parametrize("text", ["", "{not json", "[1, 2]"])
def test_unreadable_config_is_an_unsupported_model(tmp_path: Path, text: str) -> None:
    if text:
        (tmp_path / "config.json").write_text(text)
    with pytest.raises(UnsupportedModelError, match="config.json"):
        HFConfig.from_dir(tmp_path)


def test_rope_parameters_merge_the_legacy_pair() -> None:
    config = HFConfig(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 4.0})
    assert rope_parameters(config) == {"rope_theta": 5e5, "type": "linear", "factor": 4.0,
                                       "rope_type": "linear"}
    assert rope_parameters(HFConfig()) == {"rope_theta": 10000.0, "rope_type": "default"}
