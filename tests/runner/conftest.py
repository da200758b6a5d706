"""Fixtures of the runner's tests."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from tests.utils import save_random_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny random Llama (2 layers, 4 query and 2 KV heads of 32, a 512-token vocabulary)
    in float32, for the KV cache's element types."""
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                         max_position_embeddings=512)
    return str(save_random_checkpoint(config, tmp_path_factory.mktemp("llama"), None))
