"""pagoda with LoRA adapters against transformers + PEFT on random-weight checkpoints with
random non-zero adapters (Llama, Qwen3, Gemma 3, Qwen3-MoE): the same greedy tokens, the
base model unchanged, adapters and the
base in one batch as alone, slots and the host cache swapping, prefix caching per adapter,
and an adapter unloaded while its requests run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

from pagoda import LLM, SamplingParams
from pagoda.errors import InvalidRequestError
from tests.lora.adapters import greedy, peft_model, save_random_adapter
from tests.models.parity import random_prompts
from tests.utils import save_random_checkpoint

NUM_TOKENS = 32
COMMON = {"hidden_size": 64, "intermediate_size": 128, "vocab_size": 512,
          "max_position_embeddings": 512, "initializer_range": 0.2}
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("llama-lora")
    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         **COMMON)
    base = save_random_checkpoint(config, root / "base", None)
    return {"base": base,
            "q_v_down_r8": save_random_adapter(base, root / "a1", 8, ["q_proj", "v_proj",
                                                                      "down_proj"], seed=1),
            "all_r16_rslora": save_random_adapter(base, root / "a2", 16, ALL_SEVEN, seed=2,
                                                  alpha=32, use_rslora=True)}


@pytest.fixture(scope="module")
def llama_llm(llama) -> LLM:
    """One engine with both adapters for the tests that leave it idle."""
    llm = engine(llama["base"])
    for name in ("q_v_down_r8", "all_r16_rslora"):
        llm.add_lora(name, str(llama[name]))
    return llm


def engine(base: Path, **kwargs) -> LLM:
    options = {"kv_cache_memory": 32 << 20, "max_num_batched_tokens": 64, "enable_lora": True,
               "max_loras": 2} | kwargs
    return LLM(str(base), **options)


def generate(llm: LLM, prompts: list[list[int]], lora) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, lora=lora)
    return [o.outputs[0].token_ids for o in outs]


def oracle_tokens(base: Path, adapter: Path | None, prompts: list[list[int]]) -> list[list[int]]:
    model = (peft_model(base, adapter) if adapter is not None else
             AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval())
    return [greedy(model, p, NUM_TOKENS) for p in prompts]


def test_llama_adapters_match_peft_and_the_base_is_unchanged(llama, llama_llm):
    prompts = random_prompts(512, (5, 37, 70))
    for name in ("q_v_down_r8", "all_r16_rslora"):
        assert generate(llama_llm, prompts, name) == oracle_tokens(llama["base"], llama[name],
                                                                   prompts)
    assert generate(llama_llm, prompts, None) == oracle_tokens(llama["base"], None, prompts)


def test_two_adapters_and_the_base_in_one_batch_equal_their_runs_alone(llama_llm):
    prompts = random_prompts(512, (9, 40, 23, 61, 14, 33), seed=3)
    loras = ["q_v_down_r8", None, "all_r16_rslora", "q_v_down_r8", None, "all_r16_rslora"]
    llm = llama_llm
    mixed = generate(llm, prompts, loras)
    alone = [generate(llm, [p], lora)[0] for p, lora in zip(prompts, loras)]
    assert mixed == alone
    assert mixed[0] != generate(llm, prompts[:1], None)[0]  # the adapter does change tokens


def test_one_slot_and_one_host_copy_swap_adapters_in_and_out(llama):
    """--max-loras 1, --max-cpu-loras 1: the two adapters' requests never share a step; the
    one not in host memory is read from disk again."""
    prompts = random_prompts(512, (12, 30), seed=4)
    llm = engine(llama["base"], max_loras=1, max_cpu_loras=1)
    for name in ("q_v_down_r8", "all_r16_rslora"):
        llm.add_lora(name, str(llama[name]))
    lora = llm.engine.core.executor.worker.runner.lora
    assert len(lora.host) == 1
    both = generate(llm, prompts * 2, ["q_v_down_r8", "q_v_down_r8", "all_r16_rslora",
                                       "all_r16_rslora"])
    assert both[:2] == oracle_tokens(llama["base"], llama["q_v_down_r8"], prompts)
    assert both[2:] == oracle_tokens(llama["base"], llama["all_r16_rslora"], prompts)
    assert len(lora.host) == 1 and len(lora.slot_lru) == 1


def test_prefix_cache_blocks_are_keyed_by_adapter(llama, llama_llm):
    prompt = random_prompts(512, (64,), seed=5)
    llm = llama_llm
    stats = llm.engine.core.kv_manager.stats
    base_tokens = generate(llm, prompt, None)
    hits = stats.hits
    adapted = generate(llm, prompt, "q_v_down_r8")
    assert stats.hits == hits  # the base model's blocks are not the adapter's
    assert adapted == oracle_tokens(llama["base"], llama["q_v_down_r8"], prompt)
    assert generate(llm, prompt, "q_v_down_r8") == adapted
    assert stats.hits > hits  # its own blocks are
    assert generate(llm, prompt, None) == base_tokens


def test_unloading_lets_running_requests_finish_and_refuses_new_ones(llama):
    prompts = random_prompts(512, (10, 20), seed=6)
    llm = engine(llama["base"])
    llm.add_lora("q_v_down_r8", str(llama["q_v_down_r8"]))
    engine_ = llm.engine
    for i, p in enumerate(prompts):
        engine_.add_request(f"r{i}", {"prompt_token_ids": p}, GREEDY, lora_name="q_v_down_r8")
    engine_.step()
    assert llm.remove_lora("q_v_down_r8") and not llm.remove_lora("q_v_down_r8")
    with pytest.raises(InvalidRequestError, match="not loaded"):
        engine_.add_request("late", {"prompt_token_ids": prompts[0]}, GREEDY,
                            lora_name="q_v_down_r8")
    finished = {}
    while engine_.has_unfinished_requests():
        for out in engine_.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
    assert [finished["r0"], finished["r1"]] == oracle_tokens(llama["base"],
                                                             llama["q_v_down_r8"], prompts)
    generate(llm, prompts[:1], None)  # the next step tells the runner they finished
    runner_lora = engine_.core.executor.worker.runner.lora
    assert not runner_lora.known and not runner_lora.slot_lru  # gone once they finished


def test_qwen3_adapter_matches_peft(tmp_path):
    config = Qwen3Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, tie_word_embeddings=True, rope_theta=1e6, **COMMON)
    base = save_random_checkpoint(config, tmp_path / "base", None)
    adapter = save_random_adapter(base, tmp_path / "a", 16, ["k_proj", "o_proj", "gate_proj",
                                                             "up_proj"], seed=7)
    prompts = random_prompts(512, (6, 45), seed=8)
    llm = engine(base)
    llm.add_lora("qwen-adapter", str(adapter))
    assert generate(llm, prompts, "qwen-adapter") == oracle_tokens(base, adapter, prompts)
    assert generate(llm, prompts, None) == oracle_tokens(base, None, prompts)


def adapter_matches_peft(base: Path, adapter: Path, seed: int) -> LLM:
    """pagoda with the adapter and without one gives PEFT's tokens and transformers'
    (returns the engine)."""
    prompts = random_prompts(512, (6, 29), seed=seed)
    llm = engine(base)
    llm.add_lora("adapter", str(adapter))
    adapted = generate(llm, prompts, "adapter")
    assert adapted == oracle_tokens(base, adapter, prompts)
    base_tokens = generate(llm, prompts, None)
    assert base_tokens == oracle_tokens(base, None, prompts)
    assert adapted != base_tokens
    return llm


def test_gemma3_adapter_matches_peft(tmp_path):
    """Local and global layers, q/k norms after the adapted q and k projections (smaller
    random weights: at 0.2 the scaled embedding drowns the layers and every token repeats)."""
    config = Gemma3TextConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=16, sliding_window=8, sliding_window_pattern=2,
                              query_pre_attn_scalar=16, **(COMMON | {"initializer_range": 0.05}))
    base = save_random_checkpoint(config, tmp_path / "base", None)
    adapter_matches_peft(base, save_random_adapter(base, tmp_path / "a", 8, ALL_SEVEN, seed=10),
                         seed=10)


def test_moe_adapter_on_attention_matches_peft_and_one_on_experts_is_refused(tmp_path):
    """Qwen3-MoE: an adapter on q/k/v/o serves; PEFT turns gate/up/down targets into its
    experts' parameters (target_parameters), which pagoda refuses, naming them."""
    config = Qwen3MoeConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, moe_intermediate_size=32, num_experts=4,
                            num_experts_per_tok=2, norm_topk_prob=True, **COMMON)
    base = save_random_checkpoint(config, tmp_path / "base", None)
    llm = adapter_matches_peft(base, save_random_adapter(base, tmp_path / "a", 8,
                                                         ALL_SEVEN[:4], seed=12), seed=12)
    experts = save_random_adapter(base, tmp_path / "experts", 8, ALL_SEVEN, seed=13)
    with pytest.raises(InvalidRequestError, match="target_parameters.*mixture-of-experts"):
        llm.add_lora("experts", str(experts))


def test_an_adapter_for_another_model_is_refused(llama, tmp_path):
    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         **(COMMON | {"hidden_size": 32}))
    other = save_random_checkpoint(config, tmp_path / "other", None)
    foreign = save_random_adapter(other, tmp_path / "foreign", 8, ["q_proj"], seed=9)
    llm = engine(llama["base"])
    with pytest.raises(InvalidRequestError, match="model.layers.0.self_attn.q_proj"):
        llm.add_lora("foreign", str(foreign))
    assert llm.engine.core.list_loras() == []
