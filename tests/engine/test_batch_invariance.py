"""Each prompt's greedy output is the same alone, batched with mixed lengths, with tiny
prefill chunks, with prefix-cache hits, and under forced preemption."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams

NUM_TOKENS = 10
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
TEXTS = [
    "The capital of France is", "Water boils at", "def add(a, b):",
    "In 1492, Columbus", "The best way to learn a language is",
    "A haiku about autumn:\n", "SELECT name FROM users WHERE", "Photosynthesis is the process",
    "My favourite colour is", "The mitochondria is", "Once upon a time there was a dragon who",
    "import numpy as np\n", "The square root of 144 is", "Dear hiring manager,",
    "Bonjour, je m'appelle", "List three fruits:",
]


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer):
    return [{"prompt_token_ids": smollm2_tokenizer(t).input_ids} for t in TEXTS]


@pytest.fixture(scope="module")
def solo_outputs(smollm2_llm, prompts):
    return [smollm2_llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_batch_of_mixed_lengths(smollm2_llm, prompts, solo_outputs):
    assert tokens(smollm2_llm.generate(prompts, GREEDY)) == solo_outputs


def test_small_prefill_chunks(smollm2_llm, prompts, solo_outputs):
    config = smollm2_llm.engine.core.scheduler.config
    saved = config.max_num_batched_tokens
    config.max_num_batched_tokens = 7
    try:
        assert tokens(smollm2_llm.generate(prompts, GREEDY)) == solo_outputs
    finally:
        config.max_num_batched_tokens = saved


def test_prefix_cache_hits(smollm2_llm, smollm2_tokenizer, solo_outputs):
    shared = smollm2_tokenizer(
        "You are a concise assistant. Answer in one sentence. " * 4).input_ids
    with_prefix = [{"prompt_token_ids": shared + smollm2_tokenizer(t).input_ids} for t in TEXTS[:6]]
    stats = smollm2_llm.engine.core.scheduler.kv.stats
    first = tokens(smollm2_llm.generate(with_prefix[:1], GREEDY))
    hits_before = stats.hits
    batched = tokens(smollm2_llm.generate(with_prefix, GREEDY))
    assert stats.hits - hits_before >= 5 * (len(shared) // 16) * 16
    assert batched[0] == first[0]
    solo_uncached = []
    for p in with_prefix[1:]:
        smollm2_llm.engine.core.reset_prefix_cache()
        solo_uncached += tokens(smollm2_llm.generate([p], GREEDY))
    assert batched[1:] == solo_uncached


def test_forced_preemption(smollm2_dir, prompts, solo_outputs):
    block_bytes = 2 * 30 * 3 * 64 * 4 * 16
    llm = LLM(str(smollm2_dir), max_model_len=64, kv_cache_memory=12 * block_bytes,
              max_num_seqs=16, quantization="none")  # smollm2_llm's float32 weights
    outputs = llm.generate(prompts, GREEDY)
    core = llm.engine.core
    assert core.scheduler.num_preemptions > 0
    assert tokens(outputs) == solo_outputs
    assert core.kv_manager.num_free_blocks == core.kv_manager.pool.num_usable_blocks
