"""Qwen2, Qwen3 and Gemma 3 GGUF files (written the way llama.cpp's converter writes them:
its tensor names and metadata keys, no q/k permutation for these NEOX-rope families, Gemma's
norm weights stored as 1 + w) load in pagoda as transformers loads them: same greedy tokens
and prompt logprobs. A Qwen3-MoE GGUF (experts stacked per projection) matches the
transformers model it was written from."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

from pagoda import LLM
from pagoda.bench.dummy_gguf import add_decoder_metadata
from pagoda.models.arch.gemma3 import GEMMA3_BLOCK_NAMES
from pagoda.models.arch.llama import DECODER_BLOCK_NAMES, DECODER_GLOBAL_NAMES
from pagoda.models.arch.moe import QWEN3_MOE_BLOCK_NAMES
from pagoda.models.arch.qwen import QWEN3_BLOCK_NAMES
from pagoda.models.loader.gguf import gguf_hf_config
from tests.models.gguf_files import write_gguf
from tests.models.parity import check_parity, random_prompts
from tests.models.test_qwen import CONFIGS as QWEN_CONFIGS

# llama.cpp scales Gemma 3's attention by head_dim ** -0.5 and stores no
# query_pre_attn_scalar; transformers reads a GGUF with its default, 256: the released
# models have head_dim = query_pre_attn_scalar = 256, and so does this one
GEMMA3 = Gemma3TextConfig(num_hidden_layers=7, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=256, query_pre_attn_scalar=256, sliding_window=8,
                          hidden_size=64, intermediate_size=128, vocab_size=512,
                          max_position_embeddings=512, initializer_range=0.2)
# transformers reads no head_dim from a qwen3 GGUF (its default, 128, is every released
# Qwen3's); pagoda reads attention.key_length
QWEN3 = Qwen3Config(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                    head_dim=128, hidden_size=64, intermediate_size=128, vocab_size=512,
                    max_position_embeddings=512, initializer_range=0.2, rope_theta=1e6)
# (HF config, GGUF architecture, its per-block names)
CASES = {
    "qwen2": (QWEN_CONFIGS["qwen2-gqa2-tied"], "qwen2", DECODER_BLOCK_NAMES),
    "qwen3": (QWEN3, "qwen3", QWEN3_BLOCK_NAMES),
    "gemma3": (GEMMA3, "gemma3", GEMMA3_BLOCK_NAMES),
}


def gguf_name(hf_name: str, block_names) -> str | None:
    stem, kind = hf_name.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, layer, module = stem.split(".", 3)
        gguf_stem = {v: k for k, v in block_names.items()}[module]
        return f"blk.{layer}.{gguf_stem}.{kind}"
    gguf_stem = {v: k for k, v in DECODER_GLOBAL_NAMES.items()}.get(stem)
    return None if gguf_stem is None else f"{gguf_stem}.{kind}"


def write_arch_gguf(path: Path, config, arch: str, block_names,
                    state: dict[str, torch.Tensor], extra_metadata=None,
                    types: dict[str, str] | None = None,
                    blocks: dict[str, tuple[str, np.ndarray]] | None = None) -> Path:
    """`extra_metadata`: a function adding the architecture's own keys to the writer;
    `types`: GGUF tensor name -> the block type it is stored in (default float32);
    `blocks`: GGUF tensor name -> (type, its blocks), written in place of the state's."""
    def add_metadata(writer: gguf.GGUFWriter) -> None:
        add_decoder_metadata(writer, config)
        if extra_metadata is not None:
            extra_metadata(writer)
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        writer.add_key_length(dim)
        writer.add_value_length(dim)
        writer.add_vocab_size(config.vocab_size)
        rope = config.rope_parameters
        writer.add_rope_freq_base((rope.get("full_attention") or rope)["rope_theta"])
        if arch == "gemma3":
            writer.add_sliding_window(config.sliding_window)

    tensors = {}
    for name, tensor in state.items():
        target = gguf_name(name, block_names)
        if target is None:  # a tied lm_head
            continue
        array = tensor.float().numpy()
        if arch == "gemma3" and name.endswith("norm.weight"):
            array = array + 1.0
        tensors[target] = array
    return write_gguf(path, arch, tensors, add_metadata, types, blocks)


@pytest.mark.parametrize("case", sorted(CASES))
def test_gguf_matches_transformers_loading_the_same_file(case, tmp_path):
    config, arch, block_names = CASES[case]
    torch.manual_seed(0)
    source_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.detach() for k, v in source_model.state_dict().items()}
    path = write_arch_gguf(tmp_path / f"{case}.gguf", config, arch, block_names, state)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                    dtype=torch.float32).eval()
    ours = gguf_hf_config(path)
    assert ours.architectures == [type(hf_model).__name__]
    llm = LLM(str(path), kv_cache_memory=32 << 20, max_num_batched_tokens=64)
    check_parity(llm, hf_model, random_prompts(config.vocab_size, (5, 37, 90)), num_tokens=32)


QWEN3_MOE = Qwen3MoeConfig(num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=32, hidden_size=64, intermediate_size=96,
                           moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                           norm_topk_prob=True, mlp_only_layers=[1], vocab_size=512,
                           max_position_embeddings=512, initializer_range=0.2, rope_theta=1e6)


def stacked_experts(state: dict[str, torch.Tensor], inter: int) -> dict[str, torch.Tensor]:
    """transformers' packed experts as llama.cpp stores them: one [experts, ...] stack per
    projection (gate, up, down)."""
    out = {}
    for name, tensor in state.items():
        prefix, _, kind = name.rpartition(".")
        if kind == "gate_up_proj":
            out[f"{prefix}.gate_proj.weight"] = tensor[:, :inter]
            out[f"{prefix}.up_proj.weight"] = tensor[:, inter:]
        elif kind == "down_proj" and prefix.endswith(".experts"):
            out[f"{prefix}.down_proj.weight"] = tensor
        else:
            out[name] = tensor
    return out


def test_qwen3moe_gguf_matches_the_model_it_was_written_from(tmp_path):
    config = QWEN3_MOE
    torch.manual_seed(0)
    source_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = stacked_experts({k: v.detach() for k, v in source_model.state_dict().items()},
                            config.moe_intermediate_size)
    assert "model.layers.0.mlp.experts.up_proj.weight" in state

    def experts(writer):
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)

    path = write_arch_gguf(tmp_path / "qwen3moe.gguf", config, "qwen3moe",
                           QWEN3_MOE_BLOCK_NAMES, state, experts)
    ours = gguf_hf_config(path)
    assert ours.architectures == ["Qwen3MoeForCausalLM"]
    assert (ours.num_experts, ours.num_experts_per_tok, ours.moe_intermediate_size,
            ours.norm_topk_prob, ours.mlp_only_layers) == (8, 2, 32, True, [1])
    llm = LLM(str(path), kv_cache_memory=32 << 20, max_num_batched_tokens=64)
    check_parity(llm, source_model, random_prompts(config.vocab_size, (5, 37, 90)),
                 num_tokens=32)
