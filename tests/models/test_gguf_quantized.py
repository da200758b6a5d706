"""SmolLM2 (Q4_1) served with its linear weights in 4-bit form on CPU: every projection on
the int4 kernel, its weights at most 0.4x the dequantized model's, and greedy tokens equal to
the dequantized engine's (the shared `smollm2_llm`) over 32 tokens."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams
from pagoda.layers.linear import LinearBase
from pagoda.layers.quantization.gguf import GGUFLinearMethod

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
NUM_TOKENS = 32


@pytest.fixture(scope="module")
def quantized_llm(smollm2_dir):
    return LLM(str(smollm2_dir), quantization="gguf", kv_cache_memory=64 << 20,
               max_model_len=256)


def _model(llm: LLM):
    return llm.engine.core.executor.worker.runner.model


def test_every_projection_runs_on_the_int4_kernel(quantized_llm):
    layers = [m for m in _model(quantized_llm).modules() if isinstance(m, LinearBase)]
    assert len(layers) == 30 * 4  # qkv, o, gate_up, down per layer
    assert all(isinstance(m.method, GGUFLinearMethod) for m in layers)
    assert {m.method.kernel(m) for m in layers} == {"int4pack_mm_for_cpu"}


def test_weights_take_at_most_0_4x_the_dequantized_bytes(quantized_llm, smollm2_llm):
    quantized = quantized_llm.engine.model_info.weight_bytes
    dequantized = smollm2_llm.engine.model_info.weight_bytes
    assert quantized <= 0.4 * dequantized


def test_greedy_tokens_equal_the_dequantized_engines(quantized_llm, smollm2_llm):
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in quantized_llm.generate(PROMPTS, params)]
    theirs = [o.outputs[0].token_ids for o in smollm2_llm.generate(PROMPTS, params)]
    assert ours == theirs
