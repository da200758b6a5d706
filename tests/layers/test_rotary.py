"""RoPE frequencies for each scaling type equal transformers' own initialisation."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pagoda.errors import UnsupportedModelError
from pagoda.layers.rotary import RotaryEmbedding, inv_freq_for, shared_rotary_tables
from pagoda.models.hf_config import rope_parameters

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": 2048},
}


def config_for(rope: dict) -> LlamaConfig:
    return LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=32768,
                       rope_parameters=dict(rope))


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_inverse_frequencies_match_transformers(kind):
    config = config_for(ROPES[kind])
    params = rope_parameters(config)
    ours, our_scale = inv_freq_for(params, 64, config.max_position_embeddings)
    init = ROPE_INIT_FUNCTIONS[kind] if kind != "default" else None
    if init is None:
        theirs, their_scale = 1.0 / (10000.0 ** (torch.arange(0, 64, 2).double() / 64)), 1.0
    else:
        theirs, their_scale = init(config, "cpu")
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-5, atol=1e-9)
    assert our_scale == pytest.approx(their_scale)


def test_rotation_is_rotate_half_and_preserves_norm():
    rope = RotaryEmbedding(8, 16, {"rope_type": "default", "rope_theta": 100.0})
    q = torch.randn(3, 2, 8)
    k = torch.randn(3, 1, 8)
    positions = torch.tensor([0, 5, 15])
    q2, k2 = rope(positions, q.clone(), k.clone())  # (in place where a kernel runs it)
    torch.testing.assert_close(q2[0], q[0])  # position 0 is the identity
    torch.testing.assert_close(q2.norm(dim=-1), q.norm(dim=-1))
    inv = 1.0 / (100.0 ** (torch.arange(0, 8, 2).float() / 8))
    angle = 5 * inv
    x1, x2 = q[1, 0, :4], q[1, 0, 4:]
    expected = torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()])
    torch.testing.assert_close(q2[1, 0], expected)


def test_unknown_scaling_type_is_rejected():
    with pytest.raises(UnsupportedModelError):
        inv_freq_for({"rope_type": "mystery", "rope_theta": 1.0}, 8, 16)


def test_layers_built_together_share_a_table_per_configuration():
    local, full = ROPES["default"], ROPES["llama3"]
    with shared_rotary_tables():
        ropes = [RotaryEmbedding(64, 128, params) for params in (local, full, local, full)]
        partial = RotaryEmbedding(64, 128, local, rotary_dim=32)
    assert ropes[0].cos_sin is ropes[2].cos_sin and ropes[1].cos_sin is ropes[3].cos_sin
    assert ropes[0].cos_sin is not ropes[1].cos_sin
    assert partial.cos_sin.shape == (128, 32) and ropes[0].cos_sin.shape == (128, 64)
    alone = RotaryEmbedding(64, 128, local)  # outside: a table of its own, the same values
    assert alone.cos_sin is not ropes[0].cos_sin
    assert torch.equal(alone.cos_sin, ropes[0].cos_sin)
