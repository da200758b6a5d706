"""Tensor and pipeline parallelism on CPU (gloo worker processes) against one device, on
random checkpoints of every architecture family: Llama with biases on every projection, three
layers (split 2 + 1 over two stages) and a vocabulary that does not split evenly (padded LM
head and embedding shards), Qwen3 with one KV head (replicated on both ranks) and a tied head,
Gemma 3 with sliding-window and global layers and soft-capped logits, Qwen3-MoE with every
expert split across the ranks (or, with expert parallelism, its experts).

TP=2, PP=2 and TP=2 x PP=2 must give the same greedy tokens and the same seeded samples as
one device, and their prompt and sampled logprobs agree within LOGPROB_TOL (the all-reduce
sums the ranks' partial products in another order than one matmul does)."""

from __future__ import annotations

import pytest
from transformers import Gemma3TextConfig, LlamaConfig, Qwen3Config, Qwen3MoeConfig

from pagoda import LLM, SamplingParams
from pagoda.errors import ConfigError
from pagoda.models.estimate import estimate
from pagoda.models.source import resolve_model
from tests.models.parity import random_prompts
from tests.utils import save_random_checkpoint

LOGPROB_TOL = 1e-4
COMMON = dict(hidden_size=64, intermediate_size=128, max_position_embeddings=256,
              initializer_range=0.2)
CONFIGS = {
    "llama-biases-odd-vocab": LlamaConfig(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=509,
        attention_bias=True, mlp_bias=True, **COMMON),
    "qwen3-one-kv-head-tied": Qwen3Config(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        vocab_size=512, tie_word_embeddings=True, **COMMON),
    "gemma3-window-softcap": Gemma3TextConfig(
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        sliding_window=8, sliding_window_pattern=2, final_logit_softcapping=5.0,
        query_pre_attn_scalar=16, vocab_size=512, **COMMON),
    "qwen3moe-experts-split": Qwen3MoeConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
        vocab_size=512, **COMMON),
}
ENGINE = dict(kv_cache_memory=4 << 20, max_model_len=128, max_num_batched_tokens=32,
              max_num_seqs=4)


CASES = [(name, 2, 1, False) for name in sorted(CONFIGS)] + [
    ("llama-biases-odd-vocab", 1, 2, False), ("gemma3-window-softcap", 1, 2, False),
    ("qwen3moe-experts-split", 1, 2, False), ("llama-biases-odd-vocab", 2, 2, False),
    ("qwen3moe-experts-split", 2, 1, True)]  # expert parallel: two whole experts per rank


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """name -> (checkpoint, prompts, one device's outputs, its weight bytes), made once."""
    made = {}

    def get(name: str):
        if name not in made:
            config = CONFIGS[name]
            path = save_random_checkpoint(config, tmp_path_factory.mktemp(name), None)
            prompts = random_prompts(config.vocab_size, (5, 41))  # 41: prefill in two chunks
            made[name] = (path, prompts, *generate(path, prompts))
        return made[name]
    return get


def generate(path, prompts: list[list[int]], **parallel):
    """The outputs of the prompts (greedy) and of the first again (seeded sample), and the
    weight bytes one rank holds."""
    llm = LLM(str(path), **parallel, **ENGINE)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2,
                            prompt_logprobs=0)
    seeded = SamplingParams(temperature=1.0, top_k=20, seed=7, max_tokens=6, ignore_eos=True)
    try:
        requests = [{"prompt_token_ids": p} for p in prompts]
        outputs = llm.generate(requests + requests[:1], [greedy] * len(prompts) + [seeded])
        return outputs, llm.engine.model_info.weight_bytes
    finally:
        llm.engine.core.shutdown()


def sampled_logprobs(completion) -> list[float]:
    return [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]


def prompt_logprobs(output, prompt: list[int]) -> list[float]:
    return [pos[prompt[i + 1]].logprob for i, pos in enumerate(output.prompt_logprobs[1:])]


@pytest.mark.parametrize(("name", "tp", "pp", "ep"), CASES,
                         ids=[f"{n}-tp{tp}-pp{pp}{'-ep' * ep}" for n, tp, pp, ep in CASES])
def test_ranks_match_one_device(name, tp, pp, ep, reference):
    path, prompts, one, one_bytes = reference(name)
    two, two_bytes = generate(path, prompts, tensor_parallel_size=tp,
                              pipeline_parallel_size=pp, enable_expert_parallel=ep)
    if tp > 1:  # each rank holds its shard (norms and router whole)
        assert two_bytes < 0.6 * one_bytes
    if pp > 1:  # the first stage holds its layers only (embedding and head on every stage)
        assert two_bytes < one_bytes
    if tp == 1:  # what `pagoda estimate --pp` says the first stage holds
        assert estimate(resolve_model(str(path)), 128, pp=pp).weight_bytes == two_bytes
    for prompt, a, b in zip(prompts, one, two):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        for ours, theirs in ((sampled_logprobs(b.outputs[0]), sampled_logprobs(a.outputs[0])),
                             (prompt_logprobs(b, prompt), prompt_logprobs(a, prompt))):
            assert max(abs(x - y) for x, y in zip(ours, theirs)) < LOGPROB_TOL
    assert two[-1].outputs[0].token_ids == one[-1].outputs[0].token_ids  # seeded sample


def test_stages_with_different_kv_groups_are_refused(tmp_path):
    config = Gemma3TextConfig(num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=16, sliding_window=8, sliding_window_pattern=2,
                              vocab_size=128, hidden_size=32, intermediate_size=64)
    path = save_random_checkpoint(config, tmp_path / "gemma3", None)  # stages: SF | S
    with pytest.raises(ConfigError, match="different KV cache groups"):
        LLM(str(path), pipeline_parallel_size=2, **ENGINE)


def test_a_pipeline_keeps_a_step_of_other_requests_per_stage_in_flight(reference):
    """PP=2: a step is launched while the one before is still in the pipeline, and the two
    never hold the same request's decode; the outputs stay those of one device."""
    path, prompts, one, _ = reference("llama-biases-odd-vocab")
    llm = LLM(str(path), pipeline_parallel_size=2, **ENGINE)
    core = llm.engine.core
    execute, overlaps = core.executor.execute_model, []

    def execute_and_look(sched_out):
        running = [s for s in core._in_flight if not s.is_empty]  # launched, not collected
        if running and not sched_out.is_empty:
            earlier = running[-1]
            both = earlier.num_scheduled_tokens.keys() & sched_out.num_scheduled_tokens.keys()
            # only a prompt's next chunk may follow the one before into the pipeline: there,
            # the earlier step ended inside the prompt (it sampled nothing to wait for)
            requests = core.scheduler.requests
            overlaps.append({r: _chunk_end(earlier, r) < requests[r].num_prompt_tokens
                             for r in both})
        execute(sched_out)

    core.executor.execute_model = execute_and_look
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy)
    finally:
        core.shutdown()
    assert len(overlaps) > 4
    assert all(all(within_prompt.values()) for within_prompt in overlaps), overlaps
    assert [o.outputs[0].token_ids for o in outputs] == \
        [o.outputs[0].token_ids for o in one[:len(prompts)]]


def _chunk_end(step, request_id: str) -> int:
    """Where the request's part of the step ends: its tokens computed after it."""
    for data in (*step.new_requests, *step.cached_requests):
        if data.request_id == request_id:
            return data.num_computed_tokens + step.num_scheduled_tokens[request_id]
    raise KeyError(request_id)
