"""KV cache sizing: bytes, a fraction of available memory, and refusing a useless cache."""

from __future__ import annotations

import pytest
import torch

from pagoda.config import CacheConfig
from pagoda.errors import ConfigError
from pagoda.runner.memory import (
    KVCacheSpec,
    available_host_memory,
    describe_kv_budget,
    kv_budget_bytes,
    num_blocks_for,
)

CPU = torch.device("cpu")
SPEC = KVCacheSpec(num_layers=30, block_size=16, num_kv_heads=3, head_dim=64,
                   dtype=torch.float32)


def test_spec_bytes():
    assert SPEC.bytes_per_token == 2 * 30 * 3 * 64 * 4
    assert SPEC.bytes_per_block == 16 * SPEC.bytes_per_token


def test_explicit_bytes_win():
    cache = CacheConfig(kv_cache_memory=123 << 20, memory_utilization=0.5)
    assert kv_budget_bytes(cache, CPU, non_kv_peak=0) == 123 << 20


def test_fraction_of_available_host_memory():
    budget = kv_budget_bytes(CacheConfig(memory_utilization=0.1), CPU, non_kv_peak=0)
    assert budget == pytest.approx(0.1 * available_host_memory(), rel=0.05)


def test_cpu_default_is_capped(monkeypatch):
    monkeypatch.setattr("pagoda.runner.memory.available_host_memory", lambda: 64 << 30)
    assert kv_budget_bytes(CacheConfig(), CPU, non_kv_peak=0) == 4 << 30
    monkeypatch.setattr("pagoda.runner.memory.available_host_memory", lambda: 6 << 30)
    assert kv_budget_bytes(CacheConfig(), CPU, non_kv_peak=0) == 3 << 30


def test_blocks_for_budget_and_cap():
    assert num_blocks_for(100 * SPEC.bytes_per_block, SPEC, max_model_len=160) == 100
    assert num_blocks_for(100 * SPEC.bytes_per_block, SPEC, 160, cap=40) == 40


def test_a_cache_that_cannot_hold_one_sequence_is_refused():
    with pytest.raises(ConfigError, match="cannot hold one sequence of max_model_len=8192"):
        num_blocks_for(10 * SPEC.bytes_per_block, SPEC, max_model_len=8192)


def test_a_sliding_window_group_needs_only_its_window_and_a_chunk():
    spec = KVCacheSpec(num_layers=4, block_size=16, num_kv_heads=1, head_dim=256,
                       dtype=torch.bfloat16, windows=(None, 512))
    per_seq = 32768 // 16 + (-(-(511 + 2048) // 16) + 1)  # full group + window and chunk
    assert spec.blocks_per_seq(32768, 2048) == per_seq
    budget = (per_seq + 1) * spec.bytes_per_block
    assert num_blocks_for(budget, spec, 32768, chunk=2048) == per_seq + 1
    with pytest.raises(ConfigError, match="cannot hold one sequence"):
        num_blocks_for(budget, spec, 32768)  # the whole sequence in one step: 2 x 2048 blocks


def test_a_gpu_fraction_on_cpu_never_takes_more_than_half_the_ram():
    budget = kv_budget_bytes(CacheConfig(memory_utilization=0.9), CPU, non_kv_peak=0)
    assert budget == pytest.approx(0.5 * available_host_memory(), rel=0.05)
    note = describe_kv_budget(CacheConfig(memory_utilization=0.9), CPU, budget)
    assert "0.5 of the" in note and "--gpu-memory-utilization 0.9 is capped at 0.5 on CPU" in note


def test_the_budget_note_names_its_source():
    assert describe_kv_budget(CacheConfig(kv_cache_memory=1 << 30), CPU, 1 << 30) == \
        "KV cache budget 1.00 GiB as given (--kv-cache-memory, or a memory plan)"
    assert "the CPU default, min(4 GiB" in describe_kv_budget(CacheConfig(), CPU, 4 << 30)
