"""The LoRA benchmark runs end to end on a tiny random model (the GPU run uses 8B shapes)."""

from __future__ import annotations

import json

from transformers import LlamaConfig

from pagoda.bench import lora


def test_lora_benchmark_reports_every_run(tmp_path):
    config = LlamaConfig(hidden_size=64, intermediate_size=128, vocab_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512)
    config.save_pretrained(tmp_path / "model")
    out = tmp_path / "result.json"
    lora.main(["--model", str(tmp_path / "model"), "--num-prompts", "6", "--input-len", "16",
               "--output-len", "4", "--adapters", "1", "2", "--max-loras", "2",
               "--max-num-seqs", "8", "--output-json", str(out)])
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"base_without_lora", "decode1_base", "base_on_lora_engine",
                                   "adapters_1", "adapters_2", "decode1_adapter"}
    assert all(v > 0 for v in result["ratios_to_base"].values())
    assert result["decode1_ratio"] > 0
