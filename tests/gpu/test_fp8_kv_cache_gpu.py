"""A float8 KV cache on CUDA (--kv-cache-dtype fp8 / fp8_e5m2): the Triton store writes the
rounded K and V (divided by a checkpoint's KV scales when it has them), the attention
kernels read them back (decode, split and mixed prefill batches) as the dense reference over
the same rounded values; end to end, an engine with a float8 cache (CUDA graphs on) keeps a
bfloat16 cache's next tokens, with a calibrated checkpoint's keys and values past float8's
range too."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from pagoda import LLM
from pagoda.layers.attention.backend import KVScales
from pagoda.layers.attention.triton_backend import TritonAttentionBackend
from tests.layers.test_triton_attention import (
    check_against_dense,
    dense_outputs,
    make_batch,
    reference_attention,
    round_kv_to,
    run_triton,
    scale_kv_to_float8,
)
from tests.models.parity import random_prompts
from tests.runner.test_fp8_kv_cache import first_tokens
from tests.runner.test_fp8_kv_cache_scales import PROMPTS, agreement, checkpoints  # noqa: F401
from tests.utils import save_random_checkpoint

ELEMENTS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
DECODES = [(c, 1) for c in (8300, 17, 1000, 4095, 64, 2500, 300, 7000)]
# 8 decodes split the KV into segments; 40 fill the GPU unsplit, in the float8 tile setting
STEPS = {"decode": DECODES, "decode_batch": DECODES * 5,
         "mixed": [(0, 2048), (6000, 512), (300, 1000), (100, 33), (4000, 1), (77, 1)]}


@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("element", sorted(ELEMENTS))
def test_a_float8_cache_reads_back_its_rounded_values(element, step, gpu_report):
    dtype, fp8 = torch.bfloat16, ELEMENTS[element]
    batch = make_batch(STEPS[step], block_size=16, heads=32, kv_heads=8, head_dim=128,
                       dtype=dtype, device="cuda", seed=3)
    round_kv_to(batch, fp8)
    scale = 128 ** -0.5
    expected = dense_outputs(batch, scale)
    batch.kv_cache = batch.kv_cache.to(fp8)
    out = run_triton(batch, scale)
    slots = batch.meta.slot_mapping
    keep = slots >= 0
    stored = batch.kv_cache.flatten(1, 2)[0, slots[keep]]
    assert torch.equal(stored.view(torch.uint8), batch.k[keep].to(fp8).view(torch.uint8))
    error = check_against_dense(batch, out, scale, expected)
    gpu_report(element=element, step=step, max_err=error)


def test_queries_past_float16s_range_saturate_over_a_float8_cache():
    """bfloat16 queries over a float8 cache multiply in float16: a query past float16's range
    counts as +-65504 (its scores stay finite), not as infinity."""
    dtype, fp8 = torch.bfloat16, torch.float8_e4m3fn
    batch = make_batch([(300, 1), (40, 1), (0, 5)], block_size=16, heads=8, kv_heads=2,
                       head_dim=128, dtype=dtype, device="cuda", seed=5)
    batch.q[0, 3] = 1e6
    batch.q[1, 0, ::2] = -3e5
    round_kv_to(batch, fp8)
    scale = 128 ** -0.5
    saturated = batch.q.float().clamp(-65504, 65504)
    qsl = batch.meta.query_start_loc_cpu
    expected = [reference_attention(saturated[qsl[i]:qsl[i + 1]], keys, values, scale)
                for i, (keys, values) in enumerate(zip(batch.keys, batch.values))]
    batch.kv_cache = batch.kv_cache.to(fp8)
    out = run_triton(batch, scale)
    assert torch.isfinite(out[:qsl[-1]]).all()
    check_against_dense(batch, out, scale, expected)


def test_an_engine_with_a_float8_cache_keeps_the_next_tokens(tmp_path):
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                         max_position_embeddings=1024)
    path = str(save_random_checkpoint(config, tmp_path, None))
    prompts = random_prompts(512, (5, 17, 33, 64, 90, 120, 300, 700) * 2)
    options = {"device": "cuda", "dtype": "bfloat16", "kv_cache_memory": 64 << 20,
               "max_model_len": 1024}
    expected = first_tokens(LLM(path, **options), prompts)
    llm = LLM(path, kv_cache_dtype="fp8", **options)
    assert llm.engine.core.executor.worker.runner.kv_cache.dtype == torch.float8_e4m3fn
    got = first_tokens(llm, prompts)
    assert sum(g[0] == e[0] for g, e in zip(got, expected)) >= 0.75 * len(prompts)


@pytest.mark.parametrize("step", sorted(STEPS))
def test_a_scaled_float8_cache_reads_back_its_values(step, gpu_report):
    """With a checkpoint's scales (k 4, v 0.5) the store writes K / k and V / v, and the
    kernels (unsplit, split and reduced, prefill) attend as over K and V."""
    fp8, scales, scale = torch.float8_e4m3fn, KVScales(k=4.0, v=0.5), 128 ** -0.5
    batch = make_batch(STEPS[step], block_size=16, heads=32, kv_heads=8, head_dim=128,
                       dtype=torch.bfloat16, device="cuda", seed=4)
    scale_kv_to_float8(batch, fp8, scales)
    expected = dense_outputs(batch, scale)
    backend = TritonAttentionBackend()
    out = backend.forward(batch.q, batch.k, batch.v, batch.kv_cache,
                          backend.build_metadata(batch.meta), scale, kv_scales=scales)
    slots = batch.meta.slot_mapping
    keep = slots >= 0
    stored = batch.kv_cache.flatten(1, 2)[:, slots[keep]]
    assert torch.equal(stored[0].view(torch.uint8),
                       (batch.k[keep].float() / scales.k).to(fp8).view(torch.uint8))
    assert torch.equal(stored[1].view(torch.uint8),
                       (batch.v[keep].float() / scales.v).to(fp8).view(torch.uint8))
    gpu_report(step=step, max_err=check_against_dense(batch, out, scale, expected))


def test_a_calibrated_checkpoint_keeps_its_loud_keys_on_the_gpu(checkpoints):  # noqa: F811
    """The calibrated loud model of tests/runner/test_fp8_kv_cache_scales.py in bfloat16 with
    CUDA graphs: `auto` holds a float8 cache with its scales and keeps the quiet model's
    next tokens as a float8 cache of the quiet model does."""
    options = {"device": "cuda", "dtype": "bfloat16", "kv_cache_memory": 64 << 20,
               "max_model_len": 256}
    expected = first_tokens(LLM(checkpoints["quiet"], **options), PROMPTS)
    llm = LLM(checkpoints["calibrated"], **options)
    assert llm.engine.core.executor.worker.runner.kv_cache.dtype == torch.float8_e4m3fn
    same, _ = agreement(first_tokens(llm, PROMPTS), expected)
    assert same >= 0.75 * len(PROMPTS)
