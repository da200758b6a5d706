"""The dummy GGUF writer: llama.cpp's Q4_K_M block types per layer, blocks that decode to
finite weights of the intended size, and a file pagoda loads and generates from."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from pagoda.bench.dummy_gguf import (
    WEIGHT_STD,
    pack_q4_k_scales,
    planned_bytes,
    use_more_bits,
    write_dummy_gguf,
)
from pagoda.bench.word_tokenizer import with_word_tokenizer
from pagoda.models.hf_config import HFConfig

LAYERS = 8  # use_more_bits picks layers 0 (the first eighth), 3 and 6 (every third), 7 (last)
MORE_BITS_LAYERS = {0, 3, 6, 7}
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
        "intermediate_size": 512, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "bos_token_id": 1, "eos_token_id": [2, 3], "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-config")
    (path / "config.json").write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def q4_k_m_file(config_dir, tmp_path_factory):
    return write_dummy_gguf(config_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def tensor_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def test_llama_cpp_picks_the_same_layers_for_32():
    picked = [i for i in range(32) if use_more_bits(i, 32)]
    assert picked == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert {i for i in range(LAYERS) if use_more_bits(i, LAYERS)} == MORE_BITS_LAYERS


def test_q4_k_m_types_per_layer(q4_k_m_file):
    types = tensor_types(q4_k_m_file)
    assert types["token_embd.weight"] == "Q4_K" and types["output.weight"] == "Q6_K"
    assert types["rope_freqs.weight"] == types["output_norm.weight"] == "F32"
    for layer in range(LAYERS):
        wide = "Q6_K" if layer in MORE_BITS_LAYERS else "Q4_K"
        assert types[f"blk.{layer}.attn_v.weight"] == types[f"blk.{layer}.ffn_down.weight"] == wide
        for stem in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert types[f"blk.{layer}.{stem}.weight"] == "Q4_K"
        assert types[f"blk.{layer}.attn_norm.weight"] == "F32"


def test_q4_k_mix_and_the_file_size(config_dir, tmp_path):
    path = write_dummy_gguf(config_dir, tmp_path / "q4_k.gguf", mix="q4_k")
    types = tensor_types(path)
    linear = {name: kind for name, kind in types.items() if kind != "F32"}
    assert linear.pop("output.weight") == "Q6_K"
    assert set(linear.values()) == {"Q4_K"} and len(linear) == 1 + 7 * LAYERS
    header_room = 64 << 10
    data = planned_bytes(HFConfig.from_dir(config_dir), "q4_k")
    assert data < path.stat().st_size < data + header_room


def test_q8_0_mix_holds_every_table_in_q8_0_blocks_of_the_intended_size(config_dir, tmp_path):
    path = write_dummy_gguf(config_dir, tmp_path / "q8_0.gguf", mix="q8_0")
    reader = gguf.GGUFReader(path)
    linear = [t for t in reader.tensors if t.tensor_type.name != "F32"]
    assert {t.tensor_type.name for t in linear} == {"Q8_0"} and len(linear) == 2 + 7 * LAYERS
    assert int(reader.fields["general.file_type"].parts[-1][0]) == \
        gguf.LlamaFileType.MOSTLY_Q8_0
    values = gguf.quants.dequantize(linear[0].data, linear[0].tensor_type)
    assert values.std() == pytest.approx(WEIGHT_STD, rel=0.05)
    assert abs(values.mean()) < 0.05 * WEIGHT_STD


def test_iq4_xs_mix_holds_its_linear_weights_in_iq4_xs_of_the_intended_size(config_dir,
                                                                             tmp_path):
    path = write_dummy_gguf(config_dir, tmp_path / "iq4_xs.gguf", mix="iq4_xs")
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors if t.tensor_type.name != "F32"}
    assert types.pop("output.weight") == "Q6_K"
    assert set(types.values()) == {"IQ4_XS"} and len(types) == 1 + 7 * LAYERS
    assert int(reader.fields["general.file_type"].parts[-1][0]) == \
        gguf.LlamaFileType.MOSTLY_IQ4_XS
    for tensor in reader.tensors:
        if tensor.tensor_type.name == "IQ4_XS":
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            assert values.std() == pytest.approx(WEIGHT_STD, rel=0.05)
            assert abs(values.mean()) < 0.05 * WEIGHT_STD


def test_blocks_decode_to_finite_centred_weights(q4_k_m_file):
    for tensor in gguf.GGUFReader(q4_k_m_file).tensors:
        if tensor.tensor_type.name == "F32":
            continue
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        assert np.isfinite(values).all()
        assert np.abs(values).max() < 3 * WEIGHT_STD
        assert values.std() == pytest.approx(WEIGHT_STD, rel=0.1)
        assert abs(values.mean()) < 0.05 * WEIGHT_STD


def test_q4_k_scales_unpack_as_gguf_reads_them():
    rng = np.random.default_rng(0)
    scales, mins = (rng.integers(0, 64, size=(5, 8), dtype=np.uint8) for _ in range(2))
    unpacked = gguf.quants.Q4_K.get_scale_min(pack_q4_k_scales(scales, mins))
    assert np.array_equal(unpacked[0], scales) and np.array_equal(unpacked[1], mins)


def test_the_same_seed_writes_the_same_file(config_dir, q4_k_m_file, tmp_path):
    again = write_dummy_gguf(config_dir, tmp_path / "again.gguf")
    assert again.read_bytes() == q4_k_m_file.read_bytes()


def test_pagoda_loads_it_and_generates_with_a_word_tokenizer(config_dir, q4_k_m_file,
                                                            tmp_path):
    from pagoda import LLM, SamplingParams
    from pagoda.models.loader.gguf import gguf_hf_config

    config = gguf_hf_config(q4_k_m_file)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (256, LAYERS, 512)
    assert config.rope_parameters["rope_type"] == "llama3"
    tokenizer = with_word_tokenizer(config_dir, tmp_path / "tokenizer")
    llm = LLM(str(q4_k_m_file), tokenizer=str(tokenizer), device="cpu",
              kv_cache_memory=4 << 20, max_num_batched_tokens=64)
    out = llm.generate(["w7 w8 w9 w10"], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 6
    assert all(word.startswith(("w", "<")) for word in out.outputs[0].text.split())


def test_a_qwen3_moe_file_stacks_its_experts_and_pagoda_serves_it(tmp_path):
    """Experts stacked per projection in Q4_K (down in Q6_K where llama.cpp gives ffn_down
    more bits), a random float32 router; pagoda reads the config back and generates."""
    from pagoda import LLM, SamplingParams
    from pagoda.models.loader.gguf import gguf_hf_config
    moe = {**TINY, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
           "num_hidden_layers": 2, "head_dim": 64, "num_experts": 4, "num_experts_per_tok": 2,
           "moe_intermediate_size": 256, "norm_topk_prob": True, "mlp_only_layers": []}
    del moe["rope_scaling"]
    (tmp_path / "config.json").write_text(json.dumps(moe))
    path = write_dummy_gguf(tmp_path, tmp_path / "moe.gguf")
    types = tensor_types(path)
    assert types["blk.1.ffn_gate_exps.weight"] == types["blk.1.ffn_up_exps.weight"] == "Q4_K"
    assert types["blk.0.ffn_down_exps.weight"] == "Q4_K"
    assert types["blk.1.ffn_down_exps.weight"] == "Q6_K"  # the last of 2 layers: more bits
    assert types["blk.0.ffn_gate_inp.weight"] == types["blk.0.attn_q_norm.weight"] == "F32"
    router = next(t for t in gguf.GGUFReader(path).tensors
                  if t.name == "blk.0.ffn_gate_inp.weight")
    assert router.data.std() == pytest.approx(WEIGHT_STD, rel=0.1)
    config = gguf_hf_config(path)
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == \
        (4, 2, 256)
    llm = LLM(str(path), device="cpu", kv_cache_memory=4 << 20, max_num_batched_tokens=64)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}],
                       SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4


def test_a_gguf_floor_counts_the_files_blocks_less_the_gathered_table(q4_k_m_file,
                                                                      config_dir):
    """A quantized GGUF's decode floor reads the file's blocks, however pagoda holds them
    (its float16 scales take more), less the untied token table's blocks (a step gathers
    one row), not that table's parameters at bfloat16."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoConfig

    from pagoda.bench.roofline import HeldWeights, ModelShape
    from pagoda.bench.throughput import floor_weights
    reader = gguf.GGUFReader(q4_k_m_file)
    stored = {t.name: int(t.n_bytes) for t in reader.tensors}
    held = floor_weights(SimpleNamespace(gguf_file=q4_k_m_file), 0, 0)
    assert held.table == stored["token_embd.weight"] > 0 and held.experts == 0
    assert held.total == sum(stored.values()) - stored["rope_freqs.weight"]  # (not a weight)
    config = AutoConfig.from_pretrained(config_dir)
    shape = ModelShape.from_config(config, torch.bfloat16).holding(held, config)
    assert shape.weight_bytes_read == held.total - stored["token_embd.weight"]
    assert floor_weights(SimpleNamespace(gguf_file=None), 10, 2) == HeldWeights(10, 2)
