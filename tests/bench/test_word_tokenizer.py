"""The word tokenizer that lets random-weight checkpoints serve text."""

from __future__ import annotations

import json

import numpy as np

from pagoda.bench.word_tokenizer import with_word_tokenizer


def test_ids_round_trip_through_text_and_the_engine_serves_text(tmp_path):
    from transformers import AutoTokenizer

    from pagoda import LLM, SamplingParams

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 500,
              "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": [2, 3]}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(config))
    model = with_word_tokenizer(tmp_path / "cfg", tmp_path / "model")

    tokenizer = AutoTokenizer.from_pretrained(model)
    assert len(tokenizer) == 500
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    ids = np.random.default_rng(0).integers(4, 500, size=200).tolist()
    assert tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False) == ids

    llm = LLM(str(model), load_format="dummy", kv_cache_memory=4 << 20, max_model_len=128)
    out = llm.generate(["w7 w8 w9"], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    words = out.outputs[0].text.split()
    assert len(words) >= 5 and all(w.startswith(("w", "<")) for w in words)
