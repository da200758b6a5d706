"""--kv-cache-dtype fp8 / fp8_e5m2: K and V held in one byte each (unscaled), on the CPU's
torch attention path: the cache is allocated in float8 at a quarter of a float32 cache's
bytes (the estimate agrees), and the model reads it back: next-token choices and logprobs
stay close to the same engine with a float32 cache. The Triton kernels reading a float8
cache run on the GPU (tests/gpu/test_triton_attention.py)."""

from __future__ import annotations

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.errors import ConfigError
from pagoda.models.estimate import estimate
from pagoda.models.source import resolve_model
from tests.models.parity import random_prompts

NEXT = SamplingParams(temperature=0, max_tokens=1, logprobs=0)


def first_tokens(llm: LLM, prompts: list[list[int]]) -> list[tuple[int, float]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], NEXT)
    return [(o.outputs[0].token_ids[0], o.outputs[0].cumulative_logprob) for o in outs]


@pytest.mark.parametrize("kv_cache_dtype, element", [("fp8", torch.float8_e4m3fn),
                                                     ("fp8_e5m2", torch.float8_e5m2)])
def test_a_float8_cache_is_allocated_and_read_back(checkpoint, kv_cache_dtype, element):
    prompts = random_prompts(512, (5, 17, 33, 64, 90, 120, 3, 48) * 2)
    exact = LLM(checkpoint, kv_cache_memory=8 << 20, max_model_len=256)
    expected = first_tokens(exact, prompts)
    del exact
    llm = LLM(checkpoint, kv_cache_memory=8 << 20, max_model_len=256,
              kv_cache_dtype=kv_cache_dtype)
    cache = llm.engine.core.executor.worker.runner.kv_cache
    assert cache.dtype == element
    got = first_tokens(llm, prompts)
    same = sum(g[0] == e[0] for g, e in zip(got, expected))
    # one-byte keys and values (3 or 2 mantissa bits) move a random model's flat logits
    # a little: most choices stay, and the chosen tokens' logprobs stay near
    assert same >= 0.75 * len(prompts), (got, expected)
    drift = [abs(g[1] - e[1]) for g, e in zip(got, expected) if g[0] == e[0]]
    assert max(drift) < 0.05, drift


def test_the_estimate_counts_a_float8_cache(checkpoint):
    source = resolve_model(checkpoint)
    full = estimate(source, max_model_len=256, concurrency=3)
    small = estimate(source, max_model_len=256, concurrency=3, kv_cache_dtype="fp8")
    assert small.kv_bytes_per_token * 4 == full.kv_bytes_per_token  # float32 model
    assert small.kv_dtype == "float8_e4m3fn" and full.kv_dtype is None
    llm = LLM(checkpoint, kv_cache_memory=small.kv_bytes, max_model_len=256,
              kv_cache_dtype="fp8")
    cache = llm.engine.core.executor.worker.runner.kv_cache
    assert cache.numel() * cache.element_size() == pytest.approx(small.kv_bytes, rel=0.05)


def test_an_unknown_kv_cache_dtype_is_refused(checkpoint):
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        LLM(checkpoint, kv_cache_dtype="int8")


def test_every_kv_cache_dtype_name_has_an_element_type():
    from pagoda.config import KV_CACHE_DTYPES
    from pagoda.runner.memory import FLOAT8_KV, SIXTEEN_BIT_KV
    assert set(KV_CACHE_DTYPES) == {"auto"} | set(FLOAT8_KV) | set(SIXTEEN_BIT_KV)
