"""Async scheduling (step N+1 scheduled and launched before step N's tokens are back) gives
exactly the outputs of the synchronous loop: greedy and seeded sampling, logprobs, stops
that the host only learns of a step late, chunked prefill, preemption, aborts, and requests
(penalties, min_tokens) that make the engine fall back to one step at a time.

On a tiny random Llama with SmolLM2's tokenizer (large initial weights: peaked logits, so
that no greedy choice is a near tie), which takes milliseconds a step."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams
from tests.utils import tiny_chat_model

TEXTS = ["The capital of France is", "Water boils at", "def add(a, b):", "In 1492, Columbus",
         "Once upon a time there was a dragon who", "List three fruits:", "Dear hiring manager,",
         "SELECT name FROM users WHERE"]


NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM = 2, 2, 16


def make_llm(path, async_scheduling: bool, **kwargs) -> LLM:
    kwargs.setdefault("max_num_seqs", 4)
    return LLM(str(path), async_scheduling=async_scheduling, **kwargs)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_dir):
    return tiny_chat_model(tmp_path_factory.mktemp("tiny"), smollm2_dir, initializer_range=0.2,
                           num_hidden_layers=NUM_LAYERS, num_key_value_heads=NUM_KV_HEADS,
                           hidden_size=4 * HEAD_DIM)


@pytest.fixture(scope="module")
def engines(tiny_model):
    """(sync, async) engines on the same weights, with a small token budget so prompts
    are prefilled in chunks while others decode."""
    return (make_llm(tiny_model, False, max_num_batched_tokens=9),
            make_llm(tiny_model, True, max_num_batched_tokens=9))


def results(llm: LLM, params) -> list[tuple]:
    outs = llm.generate(TEXTS, params)
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason)
            for o in outs]


def assert_all_blocks_free(llm: LLM) -> None:
    kv = llm.engine.core.kv_manager
    assert kv.num_free_blocks == kv.pool.num_usable_blocks
    assert not llm.engine.core.scheduler.has_unfinished_requests()


def test_greedy_outputs_match_the_synchronous_loop(engines):
    params = [SamplingParams(temperature=0, max_tokens=1 + 2 * i, ignore_eos=True)
              for i in range(len(TEXTS))]
    sync, overlapped = engines
    assert results(overlapped, params) == results(sync, params)
    assert_all_blocks_free(overlapped)


def test_stop_tokens_found_a_step_late_end_the_request_the_same(engines):
    sync, overlapped = engines
    free = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    reference = results(sync, free)
    # stop each request at the token it produced fourth: the async engine learns of it only
    # after it has already launched the request's next step
    params = [SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[tokens[3]])
              for tokens, _, _ in reference]
    expected = results(sync, params)
    assert all(reason == "stop" for _, reason, _ in expected)
    assert results(overlapped, params) == expected
    assert_all_blocks_free(overlapped)


def test_seeded_sampling_and_logprobs_match(engines):
    sync, overlapped = engines
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=i, max_tokens=12,
                             ignore_eos=True, logprobs=3) for i in range(len(TEXTS))]
    a, b = sync.generate(TEXTS, params), overlapped.generate(TEXTS, params)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for lx, ly in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            assert lx.keys() == ly.keys()
            assert all(lx[t].logprob == pytest.approx(ly[t].logprob, abs=1e-5) for t in lx)


def test_the_engine_overlaps_steps_and_falls_back_for_token_dependent_sampling(engines):
    _, overlapped = engines
    core = overlapped.engine
    core.add_request("plain", "Hello", SamplingParams(max_tokens=8, temperature=0))
    core.step()  # prefill: launched, its token not back yet
    assert core.core._in_flight
    core.add_request("penalised", "Hi",
                     SamplingParams(max_tokens=8, temperature=0, repetition_penalty=1.3))
    core.step()  # a penalised request needs its tokens on the host before each step
    assert not core.core._in_flight
    while core.has_unfinished_requests():
        core.step()
    assert_all_blocks_free(overlapped)


def test_penalties_and_min_tokens_in_the_batch_match(engines):
    sync, overlapped = engines
    params = [SamplingParams(temperature=0, max_tokens=10, presence_penalty=1.0),
              SamplingParams(temperature=0, max_tokens=10, min_tokens=8)] + \
        [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)] * (len(TEXTS) - 2)
    assert results(overlapped, params) == results(sync, params)


def test_stop_strings_and_prompt_logprobs_match(engines):
    sync, overlapped = engines
    free = sync.generate(TEXTS, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    # each request stops at three characters of what it writes about halfway
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, prompt_logprobs=1,
                             stop=[text[len(text) // 2:len(text) // 2 + 3]])
              for text in (o.outputs[0].text for o in free)]
    a, b = sync.generate(TEXTS, params), overlapped.generate(TEXTS, params)
    assert {o.outputs[0].finish_reason for o in a} == {"stop"}
    assert [o.outputs[0].text for o in a] == [o.outputs[0].text for o in b]
    assert [o.outputs[0].finish_reason for o in a] == [o.outputs[0].finish_reason for o in b]
    for x, y in zip(a, b):
        assert [list(p or {}) for p in x.prompt_logprobs] == \
            [list(p or {}) for p in y.prompt_logprobs]
    assert_all_blocks_free(overlapped)


def test_abort_while_a_step_is_in_flight(engines):
    sync, overlapped = engines
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = results(sync, params)
    engine = overlapped.engine
    for i, text in enumerate(TEXTS):
        engine.add_request(f"abort-{i}", text, params)
    finished = {}
    for step in range(200):
        if step == 6:
            engine.abort_request("abort-1")
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
        if not engine.has_unfinished_requests():
            break
    assert "abort-1" not in finished
    assert [finished[f"abort-{i}"] for i in range(len(TEXTS)) if i != 1] == \
        [tokens for i, (tokens, _, _) in enumerate(expected) if i != 1]
    assert_all_blocks_free(overlapped)


def test_preemption_with_tokens_in_flight(tiny_model):
    block_bytes = 2 * NUM_LAYERS * NUM_KV_HEADS * HEAD_DIM * 4 * 16  # K and V, float32, 16 tokens
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outputs = {}
    for mode in (False, True):
        llm = make_llm(tiny_model, mode, max_model_len=64, kv_cache_memory=10 * block_bytes,
                       max_num_seqs=8)
        outputs[mode] = results(llm, params)
        assert llm.engine.core.scheduler.num_preemptions > 0
        assert_all_blocks_free(llm)
    assert outputs[True] == outputs[False]


def test_max_model_len_reached_with_a_token_in_flight(tiny_model):
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    outputs = {}
    for mode in (False, True):
        llm = make_llm(tiny_model, mode, max_model_len=24)
        outputs[mode] = results(llm, params)
        assert_all_blocks_free(llm)
    assert outputs[True] == outputs[False]
    assert all(reason == "length" for _, reason, _ in outputs[True])
