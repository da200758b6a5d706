"""Qwen2/2.5 and Qwen3 against transformers on random checkpoints of several shapes."""

from __future__ import annotations

import pytest
from transformers import Qwen2Config, Qwen3Config

from pagoda.models.arch.base import layer_windows
from pagoda.models.hf_config import HFConfig
from tests.models.parity import check_random_checkpoint

COMMON = dict(hidden_size=64, intermediate_size=128, vocab_size=512, max_position_embeddings=512,
              initializer_range=0.2, rope_theta=1e6)
CONFIGS = {
    "qwen2-gqa2-tied": Qwen2Config(num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=True, **COMMON),
    "qwen2-window-after-layer-1": Qwen2Config(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        use_sliding_window=True, sliding_window=12, max_window_layers=1, **COMMON),
    "qwen3-gqa4-wide-heads-untied": Qwen3Config(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
        tie_word_embeddings=False, **COMMON),
    "qwen3-narrow-heads-tied": Qwen3Config(
        num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3, head_dim=8,
        tie_word_embeddings=True, **COMMON),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_random_checkpoint_matches_transformers(name, tmp_path):
    check_random_checkpoint(CONFIGS[name], tmp_path / name)


def test_window_only_with_use_sliding_window_and_from_max_window_layers():
    raw = {"model_type": "qwen2", "num_hidden_layers": 4, "sliding_window": 4096,
           "max_window_layers": 2}
    assert layer_windows(HFConfig.from_dict(raw)) == [None] * 4
    windowed = HFConfig.from_dict(raw | {"use_sliding_window": True})
    assert layer_windows(windowed) == [None, None, 4096, 4096]


def test_old_flat_rope_theta_and_new_rope_parameters_read_alike():
    old = HFConfig.from_dict({"model_type": "qwen3", "rope_theta": 1e6})
    new = HFConfig.from_dict({"model_type": "qwen3",
                              "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert old.rope_parameters == new.rope_parameters == {"rope_type": "default",
                                                          "rope_theta": 1e6}
