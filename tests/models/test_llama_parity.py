"""pagoda's Llama against transformers on the same weights: greedy tokens and logprobs
(tests/models/parity.py has the checks and their tolerance)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

from pagoda import LLM, SamplingParams
from tests.models.parity import check_parity, check_random_checkpoint, hf_greedy
from tests.utils import save_random_checkpoint

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Les fleurs du jardin sont",
]


def test_smollm2_gguf_matches_transformers(smollm2_llm, smollm2_hf, smollm2_tokenizer):
    prompts = [smollm2_tokenizer(p).input_ids for p in PROMPTS]
    check_parity(smollm2_llm, smollm2_hf, prompts, num_tokens=24)


def test_smollm2_chat_matches_transformers(smollm2_llm, smollm2_hf, smollm2_tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]
    out = smollm2_llm.chat(messages, SamplingParams(temperature=0, max_tokens=16))[0]
    assert out.prompt_token_ids == list(ids)
    assert out.outputs[0].token_ids == hf_greedy(smollm2_hf, list(ids), 16, ignore_eos=False)
    assert "Paris" in out.outputs[0].text


RANDOM_CONFIGS = {
    "llama-gqa-llama3-rope": LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=49152, max_position_embeddings=1024,
        initializer_range=0.2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64}),
    "mistral-style": MistralConfig(
        hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, head_dim=32, vocab_size=49152, max_position_embeddings=1024,
        initializer_range=0.2, sliding_window=None, rope_theta=10000.0),
}
WINDOWED_MISTRAL = MistralConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, initializer_range=0.2,
    sliding_window=24)


@pytest.mark.parametrize("name", sorted(RANDOM_CONFIGS))
def test_random_checkpoint_matches_transformers(name, tmp_path, smollm2_dir):
    path = save_random_checkpoint(RANDOM_CONFIGS[name], tmp_path / name, smollm2_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), kv_cache_memory=32 << 20, max_num_batched_tokens=64)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 49152, (n,), generator=gen).tolist() for n in (5, 37, 90)]
    check_parity(llm, hf_model, prompts, num_tokens=16)


def test_mistral_sliding_window_shorter_than_the_prompt_matches_transformers(tmp_path):
    check_random_checkpoint(WINDOWED_MISTRAL, tmp_path / "mistral-window")
