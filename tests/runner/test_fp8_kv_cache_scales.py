"""A checkpoint calibrated for a float8 KV cache (llm-compressor's `kv_cache_scheme`, with a
`k_scale` and `v_scale` per layer): `--kv-cache-dtype auto` holds its cache in float8 and
divides K and V by the scales, so keys and values past float8's range (448) keep their
size; without the scales they would be cut to 448. The model here is a random Llama made
loud: k_proj and v_proj times LOUD, q_proj and o_proj divided by it, the same function as
the quiet model, with cached keys and values in the thousands."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from compressed_tensors.modeling.kvcache import register_key_hook, register_value_hook
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationStatus,
    apply_quantization_config,
)
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from pagoda import LLM
from pagoda.models.estimate import estimate
from pagoda.models.source import resolve_model
from tests.models.parity import random_prompts
from tests.runner.test_fp8_kv_cache import first_tokens
from tests.utils import save_random_checkpoint

LOUD = 4000.0
FLOAT8_MAX = 448.0
PROMPTS = random_prompts(512, (5, 17, 33, 64, 90, 120, 3, 48) * 2)


def made_loud(path) -> None:
    weights = load_file(path / "model.safetensors")
    for name, tensor in weights.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            tensor.mul_(LOUD)
        elif name.endswith(("q_proj.weight", "o_proj.weight")):
            tensor.div_(LOUD)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def calibrated(path) -> tuple[dict[str, torch.Tensor], dict]:
    """The checkpoint's KV scales and quantization_config as llm-compressor writes them,
    made with compressed-tensors: its kv_cache_scheme applied to the transformers model
    (which registers each layer's `k_scale` and `v_scale`), its hooks on the KV cache
    observing the largest |K| (after RoPE) and |V| over the prompts, each scale that over
    float8's largest value."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = QuantizationConfig(config_groups={}, kv_cache_scheme=QuantizationArgs(
        num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True))
    apply_quantization_config(model, config)
    peaks: dict[str, float] = {}

    def observer(name: str):
        def hook(module, states: torch.Tensor) -> None:
            peaks[name] = max(peaks.get(name, 0.0), states.abs().max().item())
        return hook
    for i, layer in enumerate(model.model.layers):
        register_key_hook(layer.self_attn, observer(f"model.layers.{i}.self_attn.k_scale"))
        register_value_hook(layer.self_attn, observer(f"model.layers.{i}.self_attn.v_scale"))
    with torch.no_grad():
        for prompt in PROMPTS:
            model(torch.tensor([prompt]), use_cache=True)
        scales = {}
        for name, param in model.named_parameters():
            if name.endswith(("k_scale", "v_scale")):
                param.fill_(peaks[name] / FLOAT8_MAX)
                scales[name] = param.detach().clone()
    config.quantization_status = QuantizationStatus.FROZEN
    return scales, json.loads(config.model_dump_json())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                         max_position_embeddings=512)
    root = tmp_path_factory.mktemp("loud")
    quiet = save_random_checkpoint(config, root / "quiet", None)
    loud = root / "loud"
    shutil.copytree(quiet, loud)
    made_loud(loud)
    scales, quantization_config = calibrated(loud)
    target = root / "calibrated"
    shutil.copytree(loud, target)
    weights = load_file(target / "model.safetensors")
    save_file(weights | scales, target / "model.safetensors", metadata={"format": "pt"})
    config_file = target / "config.json"
    values = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(values | {"quantization_config": quantization_config}))
    return {"quiet": str(quiet), "loud": str(loud), "calibrated": str(target)}


def agreement(got, expected) -> tuple[int, float]:
    """Choices equal to the expected ones, and the largest logprob drift among those."""
    same = [(g, e) for g, e in zip(got, expected) if g[0] == e[0]]
    return len(same), max((abs(g[1] - e[1]) for g, e in same), default=float("inf"))


def engine(path: str, **kwargs) -> LLM:
    return LLM(path, kv_cache_memory=8 << 20, max_model_len=256, **kwargs)


def test_the_checkpoint_s_scales_keep_loud_keys_and_values(checkpoints):
    expected = first_tokens(engine(checkpoints["quiet"]), PROMPTS)
    loud_exact = first_tokens(engine(checkpoints["loud"]), PROMPTS)
    same, drift = agreement(loud_exact, expected)
    assert same == len(PROMPTS) and drift < 1e-3  # the same function, only louder inside
    llm = engine(checkpoints["calibrated"])  # --kv-cache-dtype auto
    worker = llm.engine.core.executor.worker
    assert worker.runner.kv_cache.dtype == torch.float8_e4m3fn
    assert llm.engine.core.model_info.kv_cache_dtype == "fp8"  # as /metrics' cache_dtype
    scales = [layer.kv_scales for layer in worker.runner.model.attention_layers()]
    assert all(s.k > 1.0 and s.v > 1.0 for s in scales), scales
    same, drift = agreement(first_tokens(llm, PROMPTS), expected)
    # as an unscaled float8 cache of the quiet model does (tests/runner/test_fp8_kv_cache.py)
    assert same >= 0.75 * len(PROMPTS) and drift < 0.05, (same, drift)
    del llm
    unscaled = first_tokens(engine(checkpoints["loud"], kv_cache_dtype="fp8"), PROMPTS)
    cut_same, cut_drift = agreement(unscaled, expected)
    # (seen: 15 of 16 the same with the scales, drift 0.016; 7 without, drift 0.14)
    assert cut_same < 0.75 * len(PROMPTS) < same, (cut_same, cut_drift, same, drift)


def test_the_estimate_counts_the_float8_cache_the_checkpoint_asks_for(checkpoints):
    calibrated, loud = resolve_model(checkpoints["calibrated"]), resolve_model(checkpoints["loud"])
    assert estimate(calibrated, max_model_len=256).kv_dtype == "float8_e4m3fn"
    assert estimate(loud, max_model_len=256).kv_dtype is None
    # an A100's attention kernels hold no E4M3: the model's dtype there, as the engine does
    assert estimate(calibrated, max_model_len=256, device="A100").kv_dtype is None
    assert estimate(calibrated, max_model_len=256, device="H100").kv_dtype == "float8_e4m3fn"
    assert estimate(calibrated, max_model_len=256,
                    kv_cache_dtype="fp8_e5m2").kv_dtype == "float8_e5m2"


def test_two_tensor_parallel_ranks_hold_the_scales_too(checkpoints):
    """Each rank's workers load the model themselves: the scales reach every rank's layers
    (one KV head each here), and the ranks give one device's next tokens."""
    one = first_tokens(engine(checkpoints["calibrated"]), PROMPTS)
    llm = engine(checkpoints["calibrated"], tensor_parallel_size=2)
    try:
        assert llm.engine.model_info.kv_cache_dtype == "fp8"
        two = first_tokens(llm, PROMPTS)
    finally:
        llm.engine.core.shutdown()
    same, drift = agreement(two, one)
    assert same >= len(PROMPTS) - 1 and drift < 0.01, (same, drift)
