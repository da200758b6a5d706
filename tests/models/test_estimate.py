"""`pagoda estimate`: weights and KV computed from the config equal what the engine then
allocates; fit verdicts and the command line."""

from __future__ import annotations

import json

import pytest
from transformers import MistralConfig

from pagoda import LLM
from pagoda.cli.main import main
from pagoda.errors import ConfigError
from pagoda.models.estimate import estimate
from pagoda.models.loader import weight_bytes
from pagoda.models.source import resolve_model
from tests.utils import save_random_checkpoint


def allocated(llm: LLM) -> tuple[int, int]:
    core = llm.engine.core
    kv = core.runner.kv_cache
    return weight_bytes(core.runner.model), kv.numel() * kv.element_size()


def check_matches(spec: str, **engine_kwargs) -> None:
    source = resolve_model(spec, engine_kwargs.get("load_format", "auto"))
    e = estimate(source, max_model_len=256, concurrency=3)
    llm = LLM(spec, kv_cache_memory=e.kv_bytes, max_model_len=256, **engine_kwargs)
    weights, kv = allocated(llm)
    assert weights == pytest.approx(e.weight_bytes, rel=0.05)
    assert kv == pytest.approx(e.kv_bytes, rel=0.05)
    assert llm.engine.core.model_info.kv_capacity_tokens >= 3 * 256


def test_smollm2_estimate_matches_the_engine(smollm2_dir):
    check_matches(str(smollm2_dir))


def test_untied_gqa_checkpoint_with_head_dim_matches_the_engine(tmp_path):
    config = MistralConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                           vocab_size=300, max_position_embeddings=512,
                           tie_word_embeddings=False)
    check_matches(str(save_random_checkpoint(config, tmp_path, None)))


def test_fit_verdicts_and_tensor_parallel():
    source = resolve_model("bench/configs/llama-3.1-8b", "dummy")
    h100 = estimate(source, 8192, concurrency=32, device="H100")
    assert h100.dtype == "bfloat16" and h100.fits
    assert h100.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    assert h100.num_parameters == pytest.approx(8.03e9, rel=0.01)
    l4 = estimate(source, 131072, concurrency=4, device="L4", tp=2)
    assert l4.weight_bytes == h100.weight_bytes // 2 and not l4.fits
    with pytest.raises(ConfigError, match="unknown device"):
        estimate(source, 1024, device="TPU")


def test_the_command(capsys, smollm2_dir):
    assert main(["estimate", "smollm2", "--max-model-len", "2048", "--concurrency", "4",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kv_bytes"] == (4 * 2048 // 16 + 1) * 16 * result["kv_bytes_per_token"]
    assert main(["estimate", "bench/configs/llama-3.1-8b", "--max-model-len", "131072",
                 "--concurrency", "8", "--device", "L4"]) == 3  # does not fit
    assert "does NOT fit" in capsys.readouterr().out
