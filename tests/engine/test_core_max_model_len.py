"""max_model_len: the model's by default; a sliding window does not cap it (the window only
bounds what its layers attend to); beyond the model's limit, one clear error."""

from __future__ import annotations

import pytest

from pagoda.config import resolve_max_model_len
from pagoda.errors import ConfigError
from pagoda.models.hf_config import HFConfig

MISTRAL = HFConfig.from_dict({
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 32768,
    "sliding_window": 4096})


def test_a_sliding_window_does_not_cap_the_context():
    assert resolve_max_model_len(MISTRAL, None) == 32768
    assert resolve_max_model_len(MISTRAL, 8192) == 8192  # twice the window


def test_beyond_the_limit_is_one_plain_error():
    with pytest.raises(ConfigError, match=r"max_model_len=40000 exceeds the model's limit of "
                                          r"32768 \(max_position_embeddings in its config\)"):
        resolve_max_model_len(MISTRAL, 40000)
