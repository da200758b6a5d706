"""LoRA across ranks (gloo worker processes on CPU): two adapters of different ranks on all
seven projections and the base model in one batch give the same greedy tokens with tensor
parallelism (each rank holding its shard of every adapter) and over two pipeline stages (each
stage its own layers' modules) as on one device, and as transformers + PEFT."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from pagoda import LLM, SamplingParams
from tests.lora.adapters import greedy, peft_model, save_random_adapter
from tests.models.parity import random_prompts
from tests.utils import save_random_checkpoint

NUM_TOKENS = 16
ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
ADAPTERS = {"all_r8": (8, 1), "all_r16": (16, 2)}  # name: (rank, seed)
LORAS = ["all_r8", None, "all_r16", "all_r16", "all_r8"]  # one batch: both and the base


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lora-tp")
    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         hidden_size=64, intermediate_size=128, vocab_size=512,
                         max_position_embeddings=256, initializer_range=0.2)
    base = save_random_checkpoint(config, root / "base", None)
    made = {"base": base, "prompts": random_prompts(512, (7, 30, 19, 41, 12), seed=11)}
    for name, (rank, seed) in ADAPTERS.items():
        made[name] = save_random_adapter(base, root / name, rank, ALL_SEVEN, seed=seed)
    return made


def generate(checkpoint: dict, **parallel) -> list[list[int]]:
    llm = LLM(str(checkpoint["base"]), kv_cache_memory=4 << 20, max_model_len=128,
              max_num_batched_tokens=64, enable_lora=True, max_loras=2, **parallel)
    try:
        for name in ADAPTERS:
            llm.add_lora(name, str(checkpoint[name]))
        outs = llm.generate([{"prompt_token_ids": p} for p in checkpoint["prompts"]], GREEDY,
                            lora=LORAS)
        return [o.outputs[0].token_ids for o in outs]
    finally:
        llm.engine.core.shutdown()


def oracle_models(checkpoint: dict) -> dict:
    """adapter name (None: the base) -> transformers (+ PEFT) model."""
    models = {name: peft_model(checkpoint["base"], checkpoint[name]) for name in ADAPTERS}
    models[None] = AutoModelForCausalLM.from_pretrained(checkpoint["base"],
                                                        dtype=torch.float32).eval()
    return models


@pytest.fixture(scope="module")
def one_device(checkpoint) -> list[list[int]]:
    """One device's tokens, checked against PEFT's."""
    tokens, models = generate(checkpoint), oracle_models(checkpoint)
    prompts = checkpoint["prompts"]
    assert tokens == [greedy(models[lora], p, NUM_TOKENS) for p, lora in zip(prompts, LORAS)]
    for name in ADAPTERS:  # each adapter does change the tokens
        row = LORAS.index(name)
        assert tokens[row] != greedy(models[None], prompts[row], NUM_TOKENS)
    return tokens


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_adapters_across_ranks_match_one_device_and_peft(checkpoint, one_device, tp, pp):
    assert generate(checkpoint, tensor_parallel_size=tp, pipeline_parallel_size=pp) == \
        one_device
