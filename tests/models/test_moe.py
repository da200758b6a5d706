"""Qwen3-MoE and Mixtral against transformers on random checkpoints: top-k 2 and 8,
norm_topk_prob on and off, dense MLP layers mixed in (mlp_only_layers, decoder_sparse_step),
experts saved one tensor each (the original format) and packed (as transformers 5 holds them);
plus the parameter counts the architectures declare."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

from pagoda.models.arch.moe import expert_layout, is_moe_layer
from pagoda.models.hf_config import HFConfig
from pagoda.models.registry import arch_spec
from tests.models.parity import check_random_checkpoint
from tests.utils import save_random_checkpoint

COMMON = dict(hidden_size=64, vocab_size=512, max_position_embeddings=512,
              initializer_range=0.2)
CONFIGS = {
    "qwen3moe-top2-norm-dense-layer-1": Qwen3MoeConfig(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=[1], **COMMON),
    "qwen3moe-top8-of-16-unnormed-sparse-step-2": Qwen3MoeConfig(
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
        intermediate_size=80, moe_intermediate_size=24, num_experts=16, num_experts_per_tok=8,
        norm_topk_prob=False, decoder_sparse_step=2, tie_word_embeddings=True, **COMMON),
    # no end-of-sequence id: transformers' min_new_tokens would mask it, pagoda's ignore_eos not
    "mixtral-top2-of-4": MixtralConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, eos_token_id=None,
        **COMMON),
}
CASES = [(name, original) for name in sorted(CONFIGS) for original in (True, False)]


@pytest.mark.parametrize(("name", "original_format"), CASES,
                         ids=[f"{n}-{'per-expert' if o else 'packed'}" for n, o in CASES])
def test_random_checkpoint_matches_transformers(name, original_format, tmp_path):
    check_random_checkpoint(CONFIGS[name], tmp_path / name, original_format=original_format)


def tensor_names(path: Path) -> list[str]:
    with open(path / "model.safetensors", "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        return list(json.loads(f.read(size)))


@pytest.mark.parametrize(("name", "original_format", "expert_tensor"), [
    ("qwen3moe-top2-norm-dense-layer-1", True, "model.layers.0.mlp.experts.7.up_proj.weight"),
    ("qwen3moe-top2-norm-dense-layer-1", False, "model.layers.0.mlp.experts.gate_up_proj"),
    ("mixtral-top2-of-4", True, "model.layers.1.block_sparse_moe.experts.3.w3.weight"),
    ("mixtral-top2-of-4", False, "model.layers.1.mlp.experts.down_proj"),
])
def test_checkpoints_hold_the_expert_forms_the_loader_reads(name, original_format,
                                                            expert_tensor, tmp_path):
    """The parity cases really cover both forms (transformers decides what it writes)."""
    path = save_random_checkpoint(CONFIGS[name], tmp_path, None, original_format=original_format)
    assert expert_tensor in tensor_names(path)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_count_is_what_transformers_allocates(name, tmp_path):
    config = CONFIGS[name]
    theirs = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    ours = HFConfig.from_dict(config.to_dict())
    spec = arch_spec(ours)
    assert spec.count_parameters(ours) == sum(p.numel() for p in theirs.parameters())
    experts = expert_layout(ours)
    idle = experts.moe_layers * (experts.num_experts - experts.top_k) \
        * experts.params_per_expert
    assert spec.count_active_parameters(ours) == spec.count_parameters(ours) - idle > 0


def test_dense_layers_are_where_transformers_puts_them():
    config = HFConfig.from_dict(CONFIGS["qwen3moe-top8-of-16-unnormed-sparse-step-2"].to_dict()
                                | {"mlp_only_layers": [3]})
    assert [is_moe_layer(config, i) for i in range(4)] == [False, True, False, False]


def test_qwen3_30b_a3b_counts_30b_total_and_3b_active():
    config = HFConfig.from_dir(Path(__file__).parents[2] / "bench/configs/qwen3-30b-a3b")
    spec = arch_spec(config)
    assert spec.count_parameters(config) == pytest.approx(30.5e9, rel=0.01)
    assert spec.count_active_parameters(config) == pytest.approx(3.3e9, rel=0.03)


def test_mixtral_8x7b_counts_47b_total_and_13b_active():
    config = HFConfig.from_dir(Path(__file__).parents[2] / "bench/configs/mixtral-8x7b")
    spec = arch_spec(config)
    assert spec.count_parameters(config) == pytest.approx(46.7e9, rel=0.01)
    assert spec.count_active_parameters(config) == pytest.approx(12.9e9, rel=0.01)
