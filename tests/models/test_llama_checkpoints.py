"""Llama-architecture checkpoints users serve (TinyLlama, Yi): their config.json files load
as transformers reads them, resolve to pagoda's Llama, and count the published parameters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig

from pagoda.models.estimate import estimate
from pagoda.models.registry import arch_spec
from pagoda.models.source import resolve_model
from tests.models.test_hf_config import same_fields

LLAMA_FIELDS = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "attention_bias": False, "hidden_act": "silu", "initializer_range": 0.02,
                "pretraining_tp": 1, "rope_scaling": None, "tie_word_embeddings": False,
                "torch_dtype": "bfloat16", "use_cache": True, "bos_token_id": 1,
                "eos_token_id": 2, "rms_norm_eps": 1e-05}
CHECKPOINTS = {  # config.json as published (TinyLlama-1.1B-Chat-v1.0, Yi-6B)
    "tinyllama-1.1b": (LLAMA_FIELDS | {
        "hidden_size": 2048, "intermediate_size": 5632, "max_position_embeddings": 2048,
        "num_attention_heads": 32, "num_hidden_layers": 22, "num_key_value_heads": 4,
        "rope_theta": 10000.0, "vocab_size": 32000}, 1.10e9),
    "yi-6b": (LLAMA_FIELDS | {
        "hidden_size": 4096, "intermediate_size": 11008, "max_position_embeddings": 4096,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 4,
        "pad_token_id": 0, "rope_theta": 5000000.0, "vocab_size": 64000}, 6.06e9),
}


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_config_loads_as_llama_with_its_heads_and_rope(name: str, tmp_path: Path) -> None:
    values, params = CHECKPOINTS[name]
    (tmp_path / "config.json").write_text(json.dumps(values))
    source = resolve_model(str(tmp_path), "dummy")
    config = source.hf_config
    same_fields(config, AutoConfig.from_pretrained(tmp_path))
    assert arch_spec(config).model_class == "pagoda.models.llama:LlamaForCausalLM"
    assert config.num_key_value_heads == 4
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": values["rope_theta"]}
    assert estimate(source, 2048).num_parameters == pytest.approx(params, rel=0.01)
