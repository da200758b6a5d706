"""`pagoda bench structured` end to end on a tiny model with SmolLM2's tokenizer."""

from __future__ import annotations

import pytest

from pagoda.bench.structured import run_structured
from pagoda.bench.throughput import ThroughputConfig
from tests.utils import tiny_chat_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_dir):
    return str(tiny_chat_model(tmp_path_factory.mktemp("tiny"), smollm2_dir))


def test_both_runs_generate_the_same_tokens(tiny_model):
    cfg = ThroughputConfig(model=tiny_model, num_prompts=4, input_len=16, output_len=24,
                           engine_kwargs={"kv_cache_memory": 16 << 20})
    result = run_structured(cfg, "json-object")
    tokens = result["workload"]["output_tokens"]
    assert 4 <= tokens <= 4 * 24
    for run in ("constrained", "free"):
        assert result[run]["output_tokens_per_s"] == pytest.approx(
            tokens / result[run]["elapsed_s"])
    assert result["constrained_over_free"] == pytest.approx(
        result["free"]["elapsed_s"] / result["constrained"]["elapsed_s"])
