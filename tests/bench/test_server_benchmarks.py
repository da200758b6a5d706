"""The server-side benchmark programs run end to end on a tiny model."""

from __future__ import annotations

import pytest

from pagoda.bench.cold_start import measure_cold_start
from pagoda.bench.http_overhead import run_overhead
from pagoda.bench.throughput import ThroughputConfig
from tests.utils import free_port, tiny_chat_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_dir):
    return str(tiny_chat_model(tmp_path_factory.mktemp("tiny"), smollm2_dir))


def test_cold_start_reaches_a_first_token(tiny_model):
    result = measure_cold_start(tiny_model, ["--kv-cache-memory", "16MiB"], port=free_port(),
                                timeout=120)
    assert 0 < result["seconds_to_first_token"] < 120
    assert any("ready" in line for line in result["server_log_tail"])
    phases = result["engine_startup_s"]
    assert {"process start", "imports", "weights", "KV cache"} <= phases.keys()
    assert all(seconds >= 0 for seconds in phases.values())


def test_http_overhead_counts_the_same_tokens(tiny_model):
    cfg = ThroughputConfig(model=tiny_model, num_prompts=4, input_len=16, output_len=8,
                           engine_kwargs={"kv_cache_memory": 16 << 20})
    result = run_overhead(cfg, port=free_port())
    offline, http = result["systems"]["offline"], result["systems"]["http"]
    assert offline["output_tokens"] == http["output_tokens"] == 4 * 8
    assert offline["prompt_tokens"] == http["prompt_tokens"]
    assert result["http_over_offline"]["output_tokens_per_s"] > 0
