"""The warm-up (run on CUDA at engine start) leaves no trace: the engine's queues, KV blocks,
prefix cache and counters are untouched, the workers forget its requests, and outputs are
those of an engine that never ran it. On CPU, where it does not run by itself, it is called
directly (EngineCore.warm_up, what the engine calls at start on CUDA); tests/gpu runs it at
every engine start."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams
from tests.utils import tiny_chat_model

TEXTS = ["The capital of France is", "Water boils at", "def add(a, b):", "List three fruits:"]
PARAMS = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
          SamplingParams(temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_dir):
    return tiny_chat_model(tmp_path_factory.mktemp("tiny"), smollm2_dir, initializer_range=0.2,
                           num_hidden_layers=2, num_key_value_heads=2, hidden_size=64)


def outputs(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for p in PARAMS for o in llm.generate(TEXTS, p)]


@pytest.mark.parametrize("engine_args", [
    {"max_num_seqs": 8},
    # a token budget that chunks the warm-up's prompts, and room for only a few requests
    {"max_num_seqs": 8, "max_num_batched_tokens": 9, "kv_cache_memory": 8 * 8192,
     "max_model_len": 64},
])
def test_the_warm_up_leaves_no_trace(tiny_model, engine_args):
    cold = LLM(str(tiny_model), **engine_args)
    warmed = LLM(str(tiny_model), **engine_args)
    assert warmed.engine.core.warm_up() >= 4
    core = warmed.engine.core
    assert not core.scheduler.requests and not core.scheduler.has_unfinished_requests()
    assert core.kv_manager.num_free_blocks == core.kv_manager.pool.num_usable_blocks
    stats = core.stats()
    assert (stats.prefix_cache_queries, stats.num_computed_tokens_total) == (0, 0)
    assert not core.executor.worker.runner.batch.requests  # the worker forgot them
    assert outputs(warmed) == outputs(cold)


def test_the_warm_up_fits_a_context_shorter_than_its_prompts(tiny_model):
    llm = LLM(str(tiny_model), max_num_seqs=4, max_model_len=8)
    assert llm.engine.core.warm_up() >= 4
    core = llm.engine.core
    assert core.kv_manager.num_free_blocks == core.kv_manager.pool.num_usable_blocks
    assert not core.executor.worker.runner.batch.requests
