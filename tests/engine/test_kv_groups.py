"""Sliding-window layers give their old KV blocks back: a random Gemma 3 checkpoint (a full
group and two local groups) and a windowed Mistral (one local group) run a batch that fits
their KV budget only because of it, with no preemption, and still match transformers; the
layers are bound to their group's slab, and sleep and wake keep the outputs; with half that
budget, requests are preempted and recomputed, and still match."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, MistralConfig

from pagoda import LLM, SamplingParams
from pagoda.kv_cache.groups import group_layers, seq_blocks
from pagoda.models.arch.base import LayerAttention, head_dim, layer_windows
from tests.models.parity import check_parity, random_prompts
from tests.utils import save_random_checkpoint

BLOCK, CHUNK, MAX_LEN, SEQS = 16, 8, 160, 4
PROMPT_LENS = (90, 97, 110, 120)
NEW_TOKENS = 32
CONFIGS = {
    "gemma3": Gemma3TextConfig(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        sliding_window=20, sliding_window_pattern=2, hidden_size=64, intermediate_size=128,
        vocab_size=512, max_position_embeddings=512, initializer_range=0.2),
    "mistral": MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=512,
        initializer_range=0.2, sliding_window=24),
}


def layout_of(config):
    heads = config.num_key_value_heads
    return group_layers([LayerAttention(heads, head_dim(config), w)
                         for w in layer_windows(config)])


def tight_budget(config) -> tuple[int, int, int]:
    """(bytes, blocks with freeing, blocks without) for SEQS sequences of MAX_LEN tokens:
    the bytes buy the blocks the batch needs with freeing (+ the null block), far fewer
    than it would hold with every block kept."""
    layout = layout_of(config)
    block_bytes = 2 * layout.slots * layout.num_kv_heads * layout.head_dim * BLOCK * 4
    with_freeing = SEQS * layout.blocks_per_seq(MAX_LEN, CHUNK, BLOCK)
    without = SEQS * len(layout.groups) * seq_blocks(None, MAX_LEN, CHUNK, BLOCK)
    return (with_freeing + 1) * block_bytes, with_freeing, without


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def served(request, tmp_path_factory):
    config = CONFIGS[request.param]
    path = save_random_checkpoint(config, tmp_path_factory.mktemp(request.param), None)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    budget, _, _ = tight_budget(config)
    return config, make(path, budget), hf_model, path


def make(path, kv_bytes: int) -> LLM:
    return LLM(str(path), kv_cache_memory=kv_bytes, max_model_len=MAX_LEN, max_num_seqs=SEQS,
               max_num_batched_tokens=CHUNK, block_size=BLOCK)


def test_the_batch_fits_only_because_windows_free_their_blocks(served):
    config, llm, hf_model, _ = served
    _, with_freeing, without = tight_budget(config)
    assert llm.engine.core.model_info.num_kv_blocks == with_freeing + 1
    assert with_freeing < without
    prompts = random_prompts(config.vocab_size, PROMPT_LENS)
    core = llm.engine.core
    peaks = track_unfreed_blocks(core)
    check_parity(llm, hf_model, prompts, NEW_TOKENS)
    assert core.scheduler.num_preemptions == 0
    # at some step the running requests' tables were longer than the whole cache
    assert max(peaks) > core.kv_manager.pool.num_usable_blocks
    assert core.kv_manager.num_free_blocks == core.kv_manager.pool.num_usable_blocks


def track_unfreed_blocks(core) -> list[int]:
    """After every schedule: the blocks the running requests would hold if no group freed any."""
    peaks, schedule, kv = [], core.scheduler.schedule, core.kv_manager

    def tracked():
        out = schedule()
        peaks.append(sum(len(t[0]) * len(t) for t in kv.req_blocks.values()))
        return out
    core.scheduler.schedule = tracked
    return peaks


def test_prefix_hits_of_the_window_match_transformers(served):
    """Hits need only the window before their end in a local group (its older blocks may be
    gone): the same prompt again, then another sharing its first 80 tokens."""
    config, llm, hf_model, _ = served
    prompt = random_prompts(config.vocab_size, (90,), seed=7)[0]
    shared = prompt[:80] + random_prompts(config.vocab_size, (30,), seed=8)[0]
    stats = llm.engine.core.kv_manager.stats
    for ids, hit in ((prompt, 0), (prompt, 80), (shared, 80)):
        before = stats.hits
        check_parity(llm, hf_model, [ids], 8, prompt_logprobs=False)
        assert stats.hits - before == hit


def test_each_layer_is_bound_to_its_groups_slab(served):
    config, llm, _, _ = served
    runner = llm.engine.core.executor.worker.runner
    layout = layout_of(config)
    assert runner.kv_layout == layout
    assert llm.engine.core.kv_manager.windows == layout.windows  # as the executor reported
    assert runner.kv_cache.shape[0] == layout.slots
    for i, layer in enumerate(runner.model.attention_layers()):
        group, slot = layout.places()[i]
        assert layer.kv_group == group
        assert layer.sliding_window == layout.groups[group].sliding_window
        assert layer.kv_cache.data_ptr() == runner.kv_cache[slot].data_ptr()


def test_sleep_and_wake_keep_the_outputs(served):
    config, llm, _, _ = served
    prompts = [{"prompt_token_ids": p} for p in random_prompts(config.vocab_size, (70, 40), 3)]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    before = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    llm.engine.core.sleep()
    llm.engine.core.wake_up()
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)] == before


def test_preempted_requests_recompute_and_match_transformers(served):
    """Room for two of the four sequences at their peak: the others wait or are preempted,
    then resume from their own cached blocks (a local group needing only its window)."""
    config, _, hf_model, path = served
    layout = layout_of(config)
    block_bytes = 2 * layout.slots * layout.num_kv_heads * layout.head_dim * BLOCK * 4
    llm = make(path, (2 * layout.blocks_per_seq(MAX_LEN, CHUNK, BLOCK) + 1) * block_bytes)
    prompts = random_prompts(config.vocab_size, PROMPT_LENS, seed=5)
    check_parity(llm, hf_model, prompts, NEW_TOKENS, prompt_logprobs=False)
    core = llm.engine.core
    assert core.scheduler.num_preemptions > 0
    assert core.kv_manager.num_free_blocks == core.kv_manager.pool.num_usable_blocks
