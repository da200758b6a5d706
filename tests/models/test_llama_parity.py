"""pagoda's Llama against transformers on the same weights: greedy tokens and logprobs.

Tolerance: float32 on both sides; per-token logprobs agree within 2e-3 (the two
implementations order their float32 reductions differently; observed differences are ~1e-5).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

from pagoda import LLM, SamplingParams

from tests.utils import save_random_checkpoint

LOGPROB_TOL = 2e-3
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away,",
    "1, 2, 3, 4, 5,",
    "Les fleurs du jardin sont",
]


def hf_greedy(model, ids: list[int], n: int, ignore_eos: bool = True) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n,
                         min_new_tokens=n if ignore_eos else 0, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def hf_prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def check_parity(llm: LLM, hf_model, prompts: list[list[int]], num_tokens: int) -> None:
    params = SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True,
                            prompt_logprobs=0, logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for ids, out in zip(prompts, outputs):
        assert out.outputs[0].token_ids == hf_greedy(hf_model, ids, num_tokens)
        ours = torch.tensor([pos[ids[i + 1]].logprob
                             for i, pos in enumerate(out.prompt_logprobs[1:])])
        theirs = hf_prompt_logprobs(hf_model, ids)
        assert (ours - theirs).abs().max().item() < LOGPROB_TOL


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf: Path):
    return AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()


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


@pytest.mark.parametrize("name", sorted(RANDOM_CONFIGS))
def test_random_checkpoint_matches_transformers(name, tmp_path, smollm2_dir):
    path = save_random_checkpoint(RANDOM_CONFIGS[name], tmp_path / name, smollm2_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), kv_cache_memory=32 << 20, max_num_batched_tokens=64)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 49152, (n,), generator=gen).tolist() for n in (5, 37, 90)]
    check_parity(llm, hf_model, prompts, num_tokens=16)
