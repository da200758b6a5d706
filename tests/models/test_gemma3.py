"""Gemma 3 text against transformers on random checkpoints: local layers with a window
shorter than the prompts, global layers, q/k norms, soft-capped logits."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3TextConfig

from pagoda.models.arch.base import FULL, SLIDING, layer_windows
from pagoda.models.hf_config import HFConfig
from pagoda.models.loader.checkpoint import load_model
from pagoda.models.source import resolve_model
from tests.models.parity import check_random_checkpoint

COMMON = dict(hidden_size=64, intermediate_size=128, vocab_size=512, max_position_embeddings=512,
              initializer_range=0.2)
CONFIGS = {
    "gemma3-window-8-pattern-6": Gemma3TextConfig(
        num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        sliding_window=8, query_pre_attn_scalar=24, **COMMON),
    "gemma3-mqa-softcap-scaled-rope": Gemma3TextConfig(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        sliding_window=20, final_logit_softcapping=5.0, sliding_window_pattern=2,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                            "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        **COMMON),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_random_checkpoint_matches_transformers(name, tmp_path):
    check_random_checkpoint(CONFIGS[name], tmp_path / name)


def test_every_sixth_layer_is_global_with_its_own_rope_base():
    config = HFConfig.from_dict({"model_type": "gemma3_text", "num_hidden_layers": 12,
                                 "sliding_window": 512, "rope_theta": 1e6,
                                 "rope_local_base_freq": 1e4})
    assert layer_windows(config) == ([512] * 5 + [None]) * 2
    assert config.rope_parameters[FULL]["rope_theta"] == 1e6
    assert config.rope_parameters[SLIDING]["rope_theta"] == 1e4


def test_layers_hold_one_rope_table_per_base(tmp_path):
    CONFIGS["gemma3-mqa-softcap-scaled-rope"].save_pretrained(tmp_path)
    model = load_model(resolve_model(str(tmp_path), "dummy"), torch.float32,
                       torch.device("cpu"), max_position=64)
    tables = {id(layer.self_attn.rotary_emb.cos_sin) for layer in model.model.layers}
    assert len(model.model.layers) == 3 and len(tables) == 2  # local and global bases


def test_the_real_gemma3_gguf_stops_at_end_of_turn(gemma3_270m_dir):
    """The file lists only <eos> (1); Gemma's turns end with <end_of_turn> (106)."""
    from pagoda.models.loader.gguf import gguf_hf_config
    config = gguf_hf_config(next(gemma3_270m_dir.glob("*.gguf")))
    assert config.eos_token_id == [1, 106]
