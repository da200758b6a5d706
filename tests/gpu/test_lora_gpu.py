"""LoRA on CUDA (device only): the Triton shrink/expand kernels against the torch path at 8B
widths with 16 slots, and PEFT parity through the engine with CUDA graphs captured (adapters
mixed with the base model in decode steps replayed from graphs), on one GPU and, with two,
over TP=2 (NCCL all-reduces inside the graphs) and PP=2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagoda.lora.layers import LoRAStepState, lora_torch
from tests.lora.test_triton_ops import compare_all, random_weights

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
LLAMA_8B = {"qkv": ([4096, 1024, 1024], 4096), "o": ([4096], 4096),
            "gate_up": ([14336, 14336], 4096), "down": ([4096], 14336)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernels_match_torch_on_small_shapes(dtype, gpu_report):
    errors = compare_all("cuda", dtype)
    gpu_report(dtype=str(dtype).removeprefix("torch."), **errors)
    for name, error in errors.items():
        assert error <= TOLERANCE[dtype], (name, error)


@pytest.mark.parametrize("tokens", [1, 16, 300])
@pytest.mark.parametrize("layer", sorted(LLAMA_8B))
def test_kernels_match_torch_at_8b_widths(layer, tokens, gpu_report):
    from pagoda.lora.triton_ops import lora_triton
    sizes, in_features = LLAMA_8B[layer]
    weights = random_weights(sizes, in_features, 16, 16, torch.bfloat16, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    slots = torch.randint(-1, 16, (tokens,), generator=gen, device="cuda", dtype=torch.int32)
    x = torch.randn(tokens, in_features, generator=gen, device="cuda", dtype=torch.bfloat16)
    base = torch.randn(tokens, sum(sizes), generator=gen, device="cuda", dtype=torch.bfloat16)
    state = LoRAStepState(tokens, 16, torch.device("cuda"))
    state.set(slots.cpu().numpy())
    expected, got = base.clone(), base.clone()
    lora_torch(weights, x, expected, slots)
    lora_triton(weights, x, got, state)
    error = ((got.float() - expected.float()).abs() / (1 + expected.float().abs())).max().item()
    gpu_report(layer=layer, tokens=tokens, error=error)
    assert error <= TOLERANCE[torch.bfloat16]


def test_kernels_capture_in_a_cuda_graph():
    """Slots changed between replays take effect: nothing was baked in at capture."""
    from pagoda.lora.triton_ops import lora_triton
    weights = random_weights([64, 32, 32], 48, 4, 16, torch.float32, "cuda")
    x = torch.randn(8, 48, device="cuda")
    y = torch.zeros(8, 128, device="cuda")
    state = LoRAStepState(8, 4, torch.device("cuda"))
    lora_triton(weights, x, y, state)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y.zero_()
        lora_triton(weights, x, y, state)
    slots = np.array([0, 1, 2, 3, -1, 3, 2, 1], dtype=np.int32)
    state.set(slots)
    graph.replay()
    expected = torch.zeros(8, 128, device="cuda")
    lora_torch(weights, x, expected, torch.from_numpy(slots).cuda())
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


def test_engine_with_cuda_graphs_matches_peft(tmp_path):
    """Greedy tokens of two adapters and the base in one batch equal PEFT's (run on the
    CPU), with decode steps replayed from captured graphs."""
    from transformers import LlamaConfig

    from pagoda import LLM, SamplingParams
    from tests.lora.adapters import greedy, peft_model, save_random_adapter
    from tests.models.parity import random_prompts
    from tests.utils import save_random_checkpoint
    config = LlamaConfig(hidden_size=64, intermediate_size=128, vocab_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, initializer_range=0.2)
    base = save_random_checkpoint(config, tmp_path / "base", None)
    adapters = {"a": save_random_adapter(base, tmp_path / "a", 8, ["q_proj", "v_proj"], 1),
                "b": save_random_adapter(base, tmp_path / "b", 16,
                                         ["o_proj", "gate_proj", "down_proj"], 2)}
    llm = LLM(str(base), device="cuda", dtype="float32", kv_cache_memory=64 << 20,
              enable_lora=True, max_loras=2, max_num_seqs=8)
    assert llm.engine.core.executor.worker.runner.graphs is not None
    for name, path in adapters.items():
        llm.add_lora(name, str(path))
    prompts = random_prompts(512, (7, 19, 33), seed=3)
    loras = ["a", None, "b"]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), lora=loras)
    for prompt, lora, out in zip(prompts, loras, outs):
        oracle = (peft_model(base, adapters[lora]) if lora else
                  __import__("transformers").AutoModelForCausalLM.from_pretrained(base))
        assert out.outputs[0].token_ids == greedy(oracle.eval(), prompt, 32), lora


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_ranks_with_adapters_match_one_gpu_and_peft(tmp_path):
    """Two adapters of different ranks on all seven projections and the base in one batch:
    TP=2 (eager and with graphs) and PP=2 give one GPU's tokens, which are PEFT's."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from pagoda import LLM, SamplingParams
    from tests.lora.adapters import greedy, peft_model, save_random_adapter
    from tests.models.parity import random_prompts
    from tests.utils import save_random_checkpoint
    config = LlamaConfig(hidden_size=256, intermediate_size=512, vocab_size=1024,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=512, initializer_range=0.1)
    base = save_random_checkpoint(config, tmp_path / "base", None)
    seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapters = {"r8": save_random_adapter(base, tmp_path / "r8", 8, seven, 1),
                "r16": save_random_adapter(base, tmp_path / "r16", 16, seven, 2)}
    prompts = random_prompts(1024, (7, 19, 33, 60), seed=3)
    loras = ["r8", None, "r16", "r8"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    def tokens(**parallel) -> list[list[int]]:
        llm = LLM(str(base), device="cuda", dtype="float32", kv_cache_memory=256 << 20,
                  enable_lora=True, max_loras=2, max_num_seqs=8, **parallel)
        try:
            for name, path in adapters.items():
                llm.add_lora(name, str(path))
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                lora=loras)
            return [o.outputs[0].token_ids for o in outs]
        finally:
            llm.engine.core.shutdown()

    one = tokens()
    oracles = {name: peft_model(base, path) for name, path in adapters.items()}
    oracles[None] = AutoModelForCausalLM.from_pretrained(base).eval()
    assert one == [greedy(oracles[lora], p, 24) for p, lora in zip(prompts, loras)]
    for eager in (True, False):
        assert tokens(tensor_parallel_size=2, enforce_eager=eager) == one, eager
    assert tokens(pipeline_parallel_size=2) == one
