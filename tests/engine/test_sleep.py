"""Sleep and wake of one engine: outputs after waking equal those before, sleeping is refused
with requests in flight, and a request that reaches a sleeping engine wakes it."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams
from pagoda.request import EngineCoreRequest

PROMPTS = ["The capital of France is", "Water boils at"]
GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def llm(smollm2_dir) -> LLM:
    return LLM(str(smollm2_dir), max_model_len=256, kv_cache_memory=64 << 20)


def texts(llm: LLM) -> list[str]:
    return [out.outputs[0].text for out in llm.generate(PROMPTS, GREEDY)]


def test_outputs_after_waking_equal_those_before(llm):
    before = texts(llm)
    core = llm.engine.core
    assert core.kv_manager.pool.cached  # the prompts' blocks are cached
    core.sleep()
    runner = core.executor.worker.runner
    assert core.is_sleeping() and runner.asleep and runner.kv_cache is None
    assert all(layer.kv_cache is None for layer in runner.model.attention_layers())
    core.wake_up()
    assert not core.is_sleeping() and not runner.asleep
    assert runner.kv_cache.shape[2] == core.model_info.num_kv_blocks  # same capacity
    assert not core.kv_manager.pool.cached  # the cached prefixes went with the memory
    assert texts(llm) == before


def test_nothing_to_prepare_on_cpu(llm):
    assert not llm.engine.core.prepare_sleep()  # the weights already live in host memory
    assert llm.engine.core.executor.worker.runner.weight_sleeper.host is None


def test_sleep_is_refused_while_requests_run(llm):
    core = llm.engine.core
    core.add_request(EngineCoreRequest("busy", [1, 2, 3], GREEDY.clone(max_tokens=4)))
    with pytest.raises(RuntimeError, match="in flight"):
        core.sleep()
    assert not core.is_sleeping()
    while core.has_unfinished_requests():
        core.step()


def test_a_request_reaching_a_sleeping_engine_wakes_it(llm):
    before = texts(llm)
    llm.engine.core.sleep()
    assert texts(llm) == before
    assert not llm.engine.core.is_sleeping()
