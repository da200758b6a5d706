"""--kv-cache-dtype bfloat16 under a float32 model (CPU): K and V rounded to bfloat16 as they
are stored, in half the bytes of the float32 cache (twice its tokens for the same memory; the
estimate agrees), read back by the CPU decode-attention kernel and replayed from CPU plans:
greedy tokens stay those of the float32 cache. On a GPU such a cache must be the model's
own dtype (one clear error otherwise)."""

from __future__ import annotations

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.errors import ConfigError
from pagoda.layers.attention import cpu_decode_attention
from pagoda.models.estimate import estimate
from pagoda.models.source import resolve_model
from pagoda.runner.cpu_plans import CpuPlanRunner
from pagoda.runner.memory import check_kv_cache_dtype, kv_cache_torch_dtype
from tests.models.parity import random_prompts
from tests.runner.test_cpu_plans import counted_replays, runner_of

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_a_bfloat16_cache_holds_twice_the_tokens_and_decodes_as_float32(checkpoint,
                                                                         monkeypatch):
    prompts = random_prompts(512, (5, 17, 33, 64, 90, 120, 3, 48))
    exact = LLM(checkpoint, kv_cache_memory=8 << 20, max_model_len=256)
    expected = greedy(exact, prompts)
    float32_blocks = runner_of(exact).kv_cache.shape[2]
    del exact
    calls = []
    kernel = cpu_decode_attention.decode_attention
    monkeypatch.setattr(cpu_decode_attention, "decode_attention",
                        lambda *args, **kwargs: calls.append(args[1].dtype)
                        or kernel(*args, **kwargs))
    llm = LLM(checkpoint, kv_cache_memory=8 << 20, max_model_len=256,
              kv_cache_dtype="bfloat16")
    cache = runner_of(llm).kv_cache
    assert cache.dtype == torch.bfloat16 and cache.shape[2] == 2 * float32_blocks
    got = greedy(llm, prompts)
    if cpu_decode_attention.available():
        assert calls and set(calls) == {torch.bfloat16}  # the kernel read the bfloat16 cache
    # keys and values with 8 mantissa bits could move a random model's flat logits past a
    # tie here and there (here all 8 sequences' 12 tokens agree)
    same = sum(g == e for g, e in zip(got, expected))
    assert same >= len(prompts) - 1, (got, expected)


def test_plans_over_a_bfloat16_cache_decode_the_eager_tokens(smollm2_dir, monkeypatch):
    options = dict(max_model_len=256, max_num_seqs=8, kv_cache_dtype="bfloat16")
    prompts = random_prompts(1000, (7, 30, 12))
    eager = greedy(LLM(str(smollm2_dir), enforce_eager=True, **options), prompts)
    llm = LLM(str(smollm2_dir), **options)
    plans = runner_of(llm).graphs
    assert isinstance(plans, CpuPlanRunner)
    replayed = counted_replays(plans, monkeypatch)
    assert greedy(llm, prompts) == eager
    assert replayed  # the decode steps ran from the plans


def test_the_estimate_counts_a_bfloat16_cache(checkpoint):
    source = resolve_model(checkpoint)
    full = estimate(source, max_model_len=256, concurrency=3)
    half = estimate(source, max_model_len=256, concurrency=3, kv_cache_dtype="bfloat16")
    assert half.kv_bytes_per_token * 2 == full.kv_bytes_per_token  # float32 model
    assert half.kv_dtype == "bfloat16" and full.kv_dtype is None


def test_a_16_bit_cache_apart_from_the_models_dtype_runs_on_cpu_only():
    assert kv_cache_torch_dtype("bfloat16", torch.float32) == torch.bfloat16
    assert kv_cache_torch_dtype("auto", torch.float16) == torch.float16
    check_kv_cache_dtype(torch.bfloat16, torch.float32, torch.device("cpu"))
    check_kv_cache_dtype(torch.bfloat16, torch.bfloat16, torch.device("cuda"))
    check_kv_cache_dtype(torch.float8_e4m3fn, torch.float16, torch.device("cuda"))
    with pytest.raises(ConfigError, match="--kv-cache-dtype bfloat16 under a float16 model"):
        check_kv_cache_dtype(torch.bfloat16, torch.float16, torch.device("cuda"))
