"""Which quantization a checkpoint is loaded with: detected from its quantization_config or
its GGUF tensor types, checked against --quantization (a mismatch is one ConfigError)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagoda.errors import ConfigError, UnsupportedModelError
from pagoda.models.hf_config import HFConfig
from pagoda.models.quantization import (
    checkpoint_kv_cache_dtype,
    checkpoint_quantization,
    holds_float8_weights,
    resolve_kv_cache_dtype,
    resolve_quantization,
)
from pagoda.models.source import ModelSource, resolve_model


def hf_source(quantization_config: dict | None) -> ModelSource:
    values = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
              "num_attention_heads": 4, "num_hidden_layers": 1, "vocab_size": 128}
    if quantization_config is not None:
        values["quantization_config"] = quantization_config
    return ModelSource("tiny", Path("/nowhere"), "safetensors", HFConfig.from_dict(values))


@pytest.mark.parametrize("stored, name", [
    ({"quant_method": "awq", "bits": 4}, "awq"), ({"quant_method": "gptq"}, "gptq"),
    ({"quant_method": "fp8"}, "fp8"),
    ({"quant_method": "compressed-tensors", "config_groups": {"group_0": {}}},
     "compressed-tensors"), (None, None)])
def test_the_checkpoint_says_its_format(stored, name):
    assert checkpoint_quantization(hf_source(stored)) == name
    assert resolve_quantization(None, hf_source(stored)) == name
    assert resolve_quantization(name, hf_source(stored)) == name


@pytest.mark.parametrize("flag, stored", [("awq_marlin", "awq"), ("gptq_marlin", "gptq"),
                                          ("compressed_tensors", "compressed-tensors")])
def test_vllm_s_other_names_of_a_format_are_taken(flag, stored):
    source = hf_source({"quant_method": stored, "config_groups": {"g": {}}})
    assert resolve_quantization(flag, source) == stored


def test_an_unknown_format_is_refused_by_name():
    with pytest.raises(UnsupportedModelError, match="'bitsandbytes' is not supported"):
        checkpoint_quantization(hf_source({"quant_method": "bitsandbytes"}))


@pytest.mark.parametrize("flag, stored, words", [
    ("gptq", {"quant_method": "awq"}, "holds awq-quantized weights; drop --quantization or "
                                      "pass --quantization awq"),
    ("awq", None, "holds unquantized weights; only fp8 quantizes"),
    ("gguf", None, "holds unquantized weights"),
    ("int3", None, "unknown --quantization 'int3'"),
])
def test_a_flag_the_checkpoint_disagrees_with_is_one_error(flag, stored, words):
    with pytest.raises(ConfigError) as caught:
        resolve_quantization(flag, hf_source(stored))
    assert words in str(caught.value) and "\n" not in str(caught.value)


FLOAT8_KV = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
             "symmetric": True}


def test_a_scheme_for_the_kv_cache_alone_leaves_the_weights_floats():
    source = hf_source({"quant_method": "compressed-tensors", "config_groups": {},
                        "kv_cache_scheme": FLOAT8_KV})
    assert checkpoint_quantization(source) is None
    assert checkpoint_kv_cache_dtype(source) == "fp8"


@pytest.mark.parametrize("scheme, calibrated", [
    (FLOAT8_KV, "fp8"), ({**FLOAT8_KV, "strategy": "attn_head"}, "fp8"),
    ({"num_bits": 8, "type": "int"}, None), (None, None)])
def test_the_kv_cache_a_checkpoint_was_calibrated_for(scheme, calibrated):
    source = hf_source({"quant_method": "compressed-tensors", "config_groups": {"g": {}},
                        "kv_cache_scheme": scheme})
    assert checkpoint_kv_cache_dtype(source) == calibrated


def test_auto_takes_the_calibrated_float8_cache_where_the_device_holds_one():
    calibrated = hf_source({"quant_method": "compressed-tensors", "config_groups": {},
                            "kv_cache_scheme": FLOAT8_KV})
    assert resolve_kv_cache_dtype("auto", calibrated, float8_cache=True) == "fp8"
    assert resolve_kv_cache_dtype("auto", calibrated, float8_cache=False) == "auto"
    assert resolve_kv_cache_dtype("fp8_e5m2", calibrated, float8_cache=False) == "fp8_e5m2"
    assert resolve_kv_cache_dtype("auto", hf_source(None), float8_cache=True) == "auto"


def _compressed_tensors(weights: dict) -> dict:
    return {"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": weights}}}


@pytest.mark.parametrize("quantization, stored, float8", [
    ("fp8", None, True), ("fp8", {"quant_method": "fp8"}, True),
    ("compressed-tensors", _compressed_tensors({"type": "float", "num_bits": 8}), True),
    ("compressed-tensors", _compressed_tensors({"type": "int", "num_bits": 4}), False),
    ("compressed-tensors", _compressed_tensors({"type": "int", "num_bits": 8}), False),
    ("awq", {"quant_method": "awq", "bits": 4}, False), ("gguf", None, False),
    (None, None, False)])
def test_which_models_hold_float8_weights(quantization, stored, float8):
    """The roofline counts these models' products at the float8 rate: FP8 at load or in
    the checkpoint, and compressed-tensors' 8-bit float weights; not integers."""
    assert holds_float8_weights(quantization, hf_source(stored).hf_config) is float8


def test_fp8_quantizes_a_16_bit_checkpoint_at_load():
    assert resolve_quantization("fp8", hf_source(None)) == "fp8"


def test_a_quantized_gguf_is_gguf(smollm2_dir):
    source = resolve_model(str(smollm2_dir))
    assert checkpoint_quantization(source) == "gguf"
    assert resolve_quantization("GGUF", source) == "gguf"
    with pytest.raises(ConfigError, match="holds gguf-quantized weights"):
        resolve_quantization("awq", source)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_gguf_is_kept_quantized_on_every_device_unless_none_asks(smollm2_dir, device,
                                                                     caplog):
    import torch

    from pagoda.models.loader.checkpoint import _log_gguf_kept, model_quantization
    source = resolve_model(str(smollm2_dir))
    _log_gguf_kept.cache_clear()
    with caplog.at_level("INFO", logger="pagoda"):
        assert model_quantization(None, source, torch.device(device)) == "gguf"
    assert ("GGUF blocks kept quantized on the GPU" in caplog.text) == (device == "cuda")
    assert model_quantization("none", source, torch.device(device)) is None
