"""Roofline arithmetic against the figures computed by hand for Llama-3.1-8B."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from pagoda.bench.roofline import (
    Ceilings,
    HeldWeights,
    ModelShape,
    decode_step_floor,
    prefill_floor,
    workload_floor,
)

H200 = Ceilings("H200", bandwidth=4.3e12, matmul_flops=807e12)


@pytest.fixture(scope="module")
def llama8b() -> ModelShape:
    return ModelShape.from_config(AutoConfig.from_pretrained("bench/configs/llama-3.1-8b"),
                                  torch.bfloat16)


def test_model_shape_matches_the_reference(llama8b):
    # 8.03B minus the 525M input embedding (the 266k norm weights included)
    assert llama8b.matmul_params == 7_504_658_432 + 266_240
    assert llama8b.kv_bytes_per_token == 131_072  # 128 KiB per token
    assert llama8b.weight_bytes_read == pytest.approx(15.01e9, rel=1e-3)


def test_a_quantized_model_streams_the_bytes_it_holds_less_the_input_table(llama8b):
    config = AutoConfig.from_pretrained("bench/configs/llama-3.1-8b")
    table = config.vocab_size * config.hidden_size * 2  # untied, bfloat16, gathered
    held = 5_700_000_000  # e.g. 4-bit projections, a bfloat16 LM head and input table
    quantized = llama8b.holding(HeldWeights(held), config)
    assert quantized.weight_bytes_read == held - table
    assert quantized.matmul_params == llama8b.matmul_params  # the same FLOPs
    assert decode_step_floor(quantized, H200, [1024]) < decode_step_floor(llama8b, H200, [1024])


def test_a_float8_kv_cache_halves_the_kv_bytes_read(llama8b):
    fp8 = llama8b.with_kv_dtype(torch.float8_e4m3fn)
    assert fp8.kv_bytes_per_token * 2 == llama8b.kv_bytes_per_token
    assert fp8.kv_bytes_read(4096) * 2 == llama8b.kv_bytes_read(4096)
    assert fp8.weight_bytes_read == llama8b.weight_bytes_read
    assert decode_step_floor(fp8, H200, [4096]) < decode_step_floor(llama8b, H200, [4096])


def test_decode_floor_is_bandwidth_bound(llama8b):
    one = decode_step_floor(llama8b, H200, [1024])
    assert one == pytest.approx((15.01e9 + 1024 * 131_072) / 4.3e12, rel=1e-3)  # ~3.5 ms
    batch = decode_step_floor(llama8b, H200, [1024] * 256)
    assert batch == pytest.approx((15.01e9 + 256 * 1024 * 131_072) / 4.3e12, rel=1e-3)


def test_prefill_floor_is_compute_bound(llama8b):
    floor = prefill_floor(llama8b, H200, [1024])
    flops = 2 * (7_504_658_432 + 266_240) * 1024 + 4 * 32 * 4096 * 1024 * 1024 / 2
    assert floor == pytest.approx(flops / 807e12)


def test_float8_weights_products_count_at_the_float8_rate(llama8b):
    """An FP8 model's products but the 16-bit LM head's run at the float8 rate where it
    was measured; attention stays at the model dtype's; with no float8 rate, as before."""
    config = AutoConfig.from_pretrained("bench/configs/llama-3.1-8b")
    fp8 = llama8b.with_float8_products(config)
    head = 128_256 * 4096
    assert fp8.float8_params == llama8b.matmul_params - head
    with_float8 = Ceilings("H200", bandwidth=4.3e12, matmul_flops=807e12,
                           float8_matmul_flops=1600e12)
    attention = 4 * 32 * 4096 * 1024 * 1024 / 2
    expected = (2 * fp8.float8_params * 1024 / 1600e12
                + (2 * head * 1024 + attention) / 807e12)
    assert prefill_floor(fp8, with_float8, [1024]) == pytest.approx(expected)
    assert prefill_floor(fp8, with_float8, [1024]) < prefill_floor(fp8, H200, [1024])
    assert prefill_floor(fp8, H200, [1024]) == prefill_floor(llama8b, H200, [1024])
    assert prefill_floor(llama8b, with_float8, [1024]) == prefill_floor(llama8b, H200, [1024])
    # decode stays bound by the bytes it streams
    assert decode_step_floor(fp8, with_float8, [1024]) == decode_step_floor(llama8b, H200,
                                                                            [1024])


def test_workload_floor_waves(llama8b):
    one_wave = workload_floor(llama8b, H200, [100] * 4, [3] * 4, max_batch=4)
    two_waves = workload_floor(llama8b, H200, [100] * 4, [3] * 4, max_batch=2)
    assert two_waves["decode_s"] == pytest.approx(2 * one_wave["decode_s"], rel=0.01)
    assert one_wave["total_s"] == pytest.approx(one_wave["prefill_s"] + one_wave["decode_s"])


def test_sliding_window_layers_read_and_attend_only_their_window():
    config = AutoConfig.from_pretrained("bench/configs/gemma-3-4b")
    shape = ModelShape.from_config(config, torch.bfloat16)
    per_layer = 2 * 4 * 256 * 2  # K and V, 4 KV heads of 256, bf16
    assert shape.kv_bytes_per_token == 34 * per_layer
    local, total = 29, 34  # every sixth of 34 layers is global
    assert shape.kv_bytes_read(8192) == per_layer * (local * 1024 + (total - local) * 8192)
    assert shape.attention_flops(100) == 4.0 * 8 * 256 * 34 * 100
    assert shape.prefill_attention_flops(4096) == 4.0 * 8 * 256 * (
        local * (1024 * 1024 / 2 + 3072 * 1024) + (total - local) * 4096 * 4096 / 2)


@pytest.fixture(scope="module")
def qwen3_30b_a3b() -> ModelShape:
    return ModelShape.from_config(AutoConfig.from_pretrained("bench/configs/qwen3-30b-a3b"),
                                  torch.bfloat16)


def test_mixture_of_experts_decodes_one_token_at_its_active_size(qwen3_30b_a3b):
    embedding = 151936 * 2048
    per_expert = 3 * 2048 * 768
    total = 30_532_122_624  # every expert of every layer
    active = total - 48 * (128 - 8) * per_expert
    assert qwen3_30b_a3b.matmul_params == active - embedding
    assert qwen3_30b_a3b.step_weight_bytes(1) == 2 * (active - embedding)
    one = decode_step_floor(qwen3_30b_a3b, H200, [1024])
    kv = 1024 * 48 * 2 * 4 * 128 * 2
    assert one == pytest.approx((2 * (active - embedding) + kv) / 4.3e12)


def test_mixture_of_experts_batches_touch_more_experts_up_to_all(qwen3_30b_a3b):
    embedding = 151936 * 2048
    every_expert = 2 * (30_532_122_624 - embedding)
    two = qwen3_30b_a3b.step_weight_bytes(2)
    expected_two = 128 * (1 - (1 - 8 / 128) ** 2)  # 15.5 distinct experts per layer
    assert two == pytest.approx(qwen3_30b_a3b.weight_bytes_read
                                + 2 * 48 * (expected_two - 8) * 3 * 2048 * 768)
    assert qwen3_30b_a3b.step_weight_bytes(1) < two < qwen3_30b_a3b.step_weight_bytes(16)
    assert qwen3_30b_a3b.step_weight_bytes(256) == pytest.approx(every_expert, rel=1e-6)


def test_a_quantized_mixture_of_experts_streams_its_routed_experts_bytes(qwen3_30b_a3b):
    """Float8 experts (a byte a parameter and a float32 scale a row) among weights held in
    31.3 GB: one token streams them less the input table and the 120 experts a layer it is
    not routed to, at the experts' bytes a parameter; a batch its touched experts at that
    rate."""
    config = AutoConfig.from_pretrained("bench/configs/qwen3-30b-a3b")
    expert_params = 48 * 128 * 3 * 2048 * 768
    expert_bytes = expert_params + 48 * 128 * (2 * 768 + 2048) * 4
    held = HeldWeights(31_300_000_000, expert_bytes)
    shape = qwen3_30b_a3b.holding(held, config)
    per_param = expert_bytes / expert_params
    idle = 48 * (128 - 8) * 3 * 2048 * 768
    table = 151936 * 2048 * 2
    assert shape.weight_bytes_read == round(held.total - table - idle * per_param)
    touched = 128 * (1 - (1 - 8 / 128) ** 2)
    assert shape.step_weight_bytes(2) == pytest.approx(
        shape.weight_bytes_read + 48 * (touched - 8) * 3 * 2048 * 768 * per_param)
    assert qwen3_30b_a3b.holding(HeldWeights(held.total), config).weight_bytes_read == \
        held.total - table  # the experts not counted apart: every byte


def test_dense_models_stream_the_same_bytes_at_any_batch(llama8b):
    assert llama8b.step_weight_bytes(256) == llama8b.step_weight_bytes(1) \
        == llama8b.weight_bytes_read
