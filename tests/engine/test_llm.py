"""The offline API on SmolLM2: prefix caching, abort, sampling, stops, logprobs, errors."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams
from pagoda.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    ModelNotFoundError,
)


def ids(tokenizer, text):
    return {"prompt_token_ids": tokenizer(text).input_ids}


def assert_pool_free(llm):
    kv = llm.engine.core.kv_manager
    assert kv.num_free_blocks == kv.pool.num_usable_blocks
    assert not kv.req_blocks


def test_prefix_hit_computes_only_new_tokens(smollm2_llm, smollm2_tokenizer):
    core = smollm2_llm.engine.core
    core.reset_prefix_cache()
    shared = smollm2_tokenizer(
        "Background: " + "the quick brown fox jumps over the lazy dog. " * 8).input_ids
    first = shared + smollm2_tokenizer(" Question one?").input_ids
    second = shared + smollm2_tokenizer(" And what about question two?").input_ids
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    smollm2_llm.generate([{"prompt_token_ids": first}], params)
    before = core.stats()
    out = smollm2_llm.generate([{"prompt_token_ids": second}], params)[0]
    after = core.stats()
    common = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    hit = common // 16 * 16
    assert out.num_cached_tokens == hit and hit >= len(shared) - 16
    assert after.prefix_cache_hits - before.prefix_cache_hits == hit
    computed = after.num_computed_tokens_total - before.num_computed_tokens_total
    assert computed == len(second) - hit + (4 - 1)
    core.reset_prefix_cache()
    assert smollm2_llm.generate([{"prompt_token_ids": second}], params)[0].outputs[0].token_ids \
        == out.outputs[0].token_ids


def test_abort_at_every_step_frees_every_block(smollm2_llm, smollm2_tokenizer):
    engine = smollm2_llm.engine
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for abort_after in range(4):
        for i, text in enumerate(["Hello there", "A long time ago " * 10, "Numbers: 1 2 3"]):
            engine.add_request(f"abort-{abort_after}-{i}", ids(smollm2_tokenizer, text), params)
        for _ in range(abort_after):
            engine.step()
        for i in range(3):
            final = engine.abort_request(f"abort-{abort_after}-{i}")
            assert final is None or final.outputs[0].finish_reason in ("abort", "length")
        assert not engine.has_unfinished_requests()
        assert_pool_free(smollm2_llm)


def test_seeded_sampling_reproducible_across_batches(smollm2_llm, smollm2_tokenizer):
    target = ids(smollm2_tokenizer, "Write a short poem about the sea:")
    seeded = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=12, seed=1234, ignore_eos=True)
    alone = smollm2_llm.generate([target], seeded)[0].outputs[0].token_ids
    others = [ids(smollm2_tokenizer, t) for t in ("Hi", "Tell me a joke", "2 + 2 =")]
    noisy = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    batch = smollm2_llm.generate([others[0], target, others[1], others[2]],
                                 [noisy, seeded, noisy, noisy])
    assert batch[1].outputs[0].token_ids == alone
    unseeded = [smollm2_llm.generate([target], noisy)[0].outputs[0].token_ids for _ in range(2)]
    assert unseeded[0] != unseeded[1]


def test_n_completions_share_prompt_blocks(smollm2_llm, smollm2_tokenizer):
    prompt = ids(smollm2_tokenizer, "Give me a name for a cat. " * 6)
    stats_before = smollm2_llm.engine.core.stats()
    out = smollm2_llm.generate([prompt], SamplingParams(n=3, temperature=1.0, max_tokens=8,
                                                         seed=7, ignore_eos=True))[0]
    stats_after = smollm2_llm.engine.core.stats()
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    prompt_len = len(prompt["prompt_token_ids"])
    shared = (prompt_len - 1) // 16 * 16
    assert stats_after.prefix_cache_hits - stats_before.prefix_cache_hits >= 2 * shared


def test_stop_strings_are_cut_and_not_leaked(smollm2_llm, smollm2_tokenizer):
    prompt = ids(smollm2_tokenizer, "Count: 1, 2, 3, 4, 5, 6,")
    free = smollm2_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16))[0]
    text = free.outputs[0].text
    stop = text[3:6]  # a stop string that starts mid-output, likely spanning tokens
    out = smollm2_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16,
                                                        stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:text.index(stop)]
    kept = smollm2_llm.generate([prompt], SamplingParams(
        temperature=0, max_tokens=16, stop=[stop], include_stop_str_in_output=True))[0]
    assert kept.outputs[0].text == text[:text.index(stop) + len(stop)]
    streamed = "".join(_deltas(smollm2_llm.stream(
        prompt, SamplingParams(temperature=0, max_tokens=16, stop=[stop]))))
    assert streamed == out.text


def _deltas(stream):
    seen = ""
    for out in stream:
        text = out.outputs[0].text
        assert text.startswith(seen)
        yield text[len(seen):]
        seen = text


def test_stop_token_ids_min_tokens_and_max_tokens(smollm2_llm, smollm2_tokenizer):
    prompt = ids(smollm2_tokenizer, "The capital of France is")
    free = smollm2_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8,
                                                         ignore_eos=True))[0].outputs[0]
    stop_id = free.token_ids[2]
    out = smollm2_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8,
                                                        stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == free.token_ids[:3] and out.stop_reason == stop_id
    assert out.finish_reason == "stop"
    forced = smollm2_llm.generate([prompt], SamplingParams(
        temperature=0, max_tokens=8, min_tokens=6, stop_token_ids=[stop_id]))[0].outputs[0]
    assert len(forced.token_ids) >= 6 and stop_id not in forced.token_ids[:5]
    short = smollm2_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2))[0]
    assert len(short.outputs[0].token_ids) == 2 and short.outputs[0].finish_reason == "length"


def test_logprobs_shapes(smollm2_llm, smollm2_tokenizer):
    prompt = ids(smollm2_tokenizer, "Hello, my name is")
    out = smollm2_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=5, logprobs=3,
                                                        prompt_logprobs=2, ignore_eos=True))[0]
    completion = out.outputs[0]
    assert len(completion.logprobs) == 5
    for token, position in zip(completion.token_ids, completion.logprobs):
        assert token in position and 3 <= len(position) <= 4
        assert position[token].rank == 1  # greedy picks the top token
        assert max(lp.logprob for lp in position.values()) == position[token].logprob
    assert completion.cumulative_logprob == pytest.approx(
        sum(p[t].logprob for t, p in zip(completion.token_ids, completion.logprobs)))
    prompt_ids = prompt["prompt_token_ids"]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt_ids)
    for token, position in zip(prompt_ids[1:], out.prompt_logprobs[1:]):
        assert token in position and 2 <= len(position) <= 3


@pytest.mark.parametrize("kwargs, param", [
    ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": -0.1}, "temperature"),
    ({"n": 0}, "n"), ({"logprobs": 21}, "logprobs"), ({"top_k": -2}, "top_k"),
    ({"min_p": 2.0}, "min_p"), ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"stop": [""]}, "stop"), ({"logit_bias": {"x": 1.0}}, "logit_bias"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"), ({"seed": 1.5}, "seed"),
])
def test_bad_sampling_params_raise_typed_errors(kwargs, param):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param


def test_bad_requests_are_rejected_before_scheduling(smollm2_llm, smollm2_tokenizer):
    engine = smollm2_llm.engine
    too_long = {"prompt_token_ids": [42] * engine.model_info.max_model_len}
    with pytest.raises(ContextLengthExceededError, match="maximum context length is 2048 tokens"):
        smollm2_llm.generate([too_long])
    with pytest.raises(InvalidRequestError, match="out of vocabulary"):
        smollm2_llm.generate([{"prompt_token_ids": [1, 10**9]}])
    with pytest.raises(InvalidRequestError, match="empty"):
        smollm2_llm.generate([""])
    with pytest.raises(InvalidRequestError, match="out of vocabulary"):
        smollm2_llm.generate(["hi"], SamplingParams(logit_bias={10**7: 1.0}))
    with pytest.raises(InvalidRequestError):  # one bad prompt rejects the whole batch
        smollm2_llm.generate(["fine", {"prompt_token_ids": []}])
    assert not engine.has_unfinished_requests()
    assert_pool_free(smollm2_llm)


def test_unknown_model_path_raises_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError):
        LLM(str(tmp_path / "no-such-model"))


@pytest.fixture
def config_only_model(tmp_path) -> str:
    """A directory with a tiny Llama config and nothing else: a model for dummy weights."""
    from transformers import LlamaConfig
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300, max_position_embeddings=256
                ).save_pretrained(tmp_path)
    return str(tmp_path)


def test_random_weights_without_tokenizer_run_on_token_ids(config_only_model):
    llm = LLM(config_only_model, load_format="dummy", kv_cache_memory=4 << 20)
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 5 and out[0].outputs[0].text == ""
    with pytest.raises(InvalidRequestError, match="no tokenizer"):
        llm.generate(["text needs a tokenizer"])


def test_startup_is_logged_phase_by_phase(config_only_model):
    from pagoda.bench.cold_start import engine_phases
    from tests.utils import logged_messages
    with logged_messages("pagoda.engine.core") as messages:
        LLM(config_only_model, load_format="dummy", kv_cache_memory=4 << 20)
    phases = engine_phases(messages)
    assert list(phases) == ["model config", "device init", "weights", "memory profile", "KV cache"]
    assert all(seconds >= 0 for seconds in phases.values())
