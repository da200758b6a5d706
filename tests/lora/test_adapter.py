"""Reading PEFT adapters: scaling, and every refusal names what is wrong."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from pagoda.lora.adapter import ModuleShape, load_adapter
from pagoda.lora.request import LoRAAdapterError, LoRARequest

SHAPES = {"model.layers.0.self_attn.q_proj": ModuleShape(8, 8),
          "model.layers.0.mlp.down_proj": ModuleShape(16, 8)}
Q = "base_model.model.model.layers.0.self_attn.q_proj"


def write_adapter(path, config=None, tensors=None):
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(cfg | (config or {})))
    tensors = tensors if tensors is not None else {
        f"{Q}.lora_A.weight": torch.ones(4, 8), f"{Q}.lora_B.weight": torch.ones(8, 4)}
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def load(path, max_rank=16):
    return load_adapter(LoRARequest(1, "a", str(path)), SHAPES, max_rank, torch.float32)


def test_scaling_is_folded_into_b(tmp_path):
    adapter = load(write_adapter(tmp_path / "a"))
    a, b = adapter.weights["model.layers.0.self_attn.q_proj"]
    assert adapter.scaling == 2.0 and torch.equal(b, torch.full((8, 4), 2.0))
    assert torch.equal(a, torch.ones(4, 8))


def test_rslora_scales_by_the_square_root_of_the_rank(tmp_path):
    adapter = load(write_adapter(tmp_path / "a", {"use_rslora": True}))
    assert adapter.scaling == pytest.approx(8 / math.sqrt(4))


@pytest.mark.parametrize("config, message", [
    ({"r": 32}, "exceeds --max-lora-rank 16"),
    ({"use_dora": True}, "use_dora"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
    ({"target_parameters": ["gate_up_proj"]}, "target_parameters.*mixture-of-experts"),
])
def test_unsupported_configs_are_refused(tmp_path, config, message):
    with pytest.raises(LoRAAdapterError, match=message):
        load(write_adapter(tmp_path / "a", config))


def test_a_shape_mismatch_names_the_module(tmp_path):
    bad = {f"{Q}.lora_A.weight": torch.ones(4, 9), f"{Q}.lora_B.weight": torch.ones(8, 4)}
    with pytest.raises(LoRAAdapterError, match="model.layers.0.self_attn.q_proj"):
        load(write_adapter(tmp_path / "a", tensors=bad))


def test_a_module_the_model_lacks_is_named(tmp_path):
    name = "base_model.model.model.layers.7.self_attn.q_proj"
    tensors = {f"{name}.lora_A.weight": torch.ones(4, 8), f"{name}.lora_B.weight": torch.ones(8, 4)}
    with pytest.raises(LoRAAdapterError, match="layers.7.self_attn.q_proj.*does not exist"):
        load(write_adapter(tmp_path / "a", tensors=tensors))


def test_lora_on_the_lm_head_is_refused(tmp_path):
    name = "base_model.model.lm_head"
    tensors = {f"{name}.lora_A.weight": torch.ones(4, 8), f"{name}.lora_B.weight": torch.ones(8, 4)}
    with pytest.raises(LoRAAdapterError, match="lm_head"):
        load(write_adapter(tmp_path / "a", tensors=tensors))


def test_pickled_weights_are_refused_with_a_way_out(tmp_path):
    path = tmp_path / "a"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    (path / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(LoRAAdapterError, match="adapter_model.bin.*refused.*safetensors"):
        load(path)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_a_malformed_config_is_refused(tmp_path, content):
    path = write_adapter(tmp_path / "a")
    (path / "adapter_config.json").write_text(content)
    with pytest.raises(LoRAAdapterError, match="adapter_config.json"):
        load(path)


def test_a_corrupt_weights_file_is_refused(tmp_path):
    path = write_adapter(tmp_path / "a")
    (path / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(LoRAAdapterError, match="cannot read adapter_model.safetensors"):
        load(path)


def test_a_missing_directory_is_refused(tmp_path):
    with pytest.raises(LoRAAdapterError, match="does not exist"):
        load(tmp_path / "nowhere")


def lora_pair(module: str, a_shape=(4, 8), b_shape=(8, 4)) -> dict[str, torch.Tensor]:
    name = f"base_model.model.{module}"
    return {f"{name}.lora_A.weight": torch.ones(*a_shape),
            f"{name}.lora_B.weight": torch.ones(*b_shape)}


def test_lora_on_moe_experts_is_refused_as_such(tmp_path):
    tensors = lora_pair("model.layers.0.mlp.experts.3.gate_proj", b_shape=(16, 4))
    with pytest.raises(LoRAAdapterError, match="experts.3.gate_proj.*mixture-of-experts"):
        load(write_adapter(tmp_path / "a", tensors=tensors))


def test_modules_of_another_pipeline_stage_are_left_to_it(tmp_path):
    """Stage 0 holds layer 0: layer 1's module is not its to check; layer 7 is nobody's."""
    tensors = lora_pair("model.layers.0.self_attn.q_proj") | lora_pair(
        "model.layers.1.self_attn.q_proj", a_shape=(4, 99))
    path = write_adapter(tmp_path / "a", tensors=tensors)
    adapter = load_adapter(LoRARequest(1, "a", str(path)), SHAPES, 16, torch.float32,
                           elsewhere=("model.layers.1.",))
    assert list(adapter.weights) == ["model.layers.0.self_attn.q_proj"]
    tensors |= lora_pair("model.layers.7.self_attn.q_proj")
    path = write_adapter(tmp_path / "b", tensors=tensors)
    with pytest.raises(LoRAAdapterError, match="layers.7.self_attn.q_proj.*does not exist"):
        load_adapter(LoRARequest(1, "b", str(path)), SHAPES, 16, torch.float32,
                     elsewhere=("model.layers.1.",))
