"""Qwen2, Qwen3, Gemma 3, Qwen3-MoE and Mixtral on CUDA (Triton attention with sliding windows,
fused q/k norms and GELU, the fused MoE kernel, CUDA graphs) against transformers on the same
GPU and weights (device only)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    MixtralConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from pagoda import LLM, SamplingParams
from tests.models.parity import LOGPROB_TOL
from tests.utils import save_random_checkpoint

COMMON = dict(hidden_size=256, intermediate_size=512, vocab_size=2048,
              max_position_embeddings=4096, initializer_range=0.1)
CONFIGS = {
    "qwen2": Qwen2Config(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                         tie_word_embeddings=True, rope_theta=1e6, **COMMON),
    "qwen3": Qwen3Config(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=64, tie_word_embeddings=False, rope_theta=1e6, **COMMON),
    "gemma3": Gemma3TextConfig(num_hidden_layers=6, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=128, sliding_window=100,
                               query_pre_attn_scalar=128, final_logit_softcapping=30.0,
                               **COMMON),
    "qwen3-moe": Qwen3MoeConfig(num_hidden_layers=3, num_attention_heads=8,
                                num_key_value_heads=2, head_dim=64, num_experts=16,
                                num_experts_per_tok=4, moe_intermediate_size=96,
                                norm_topk_prob=True, mlp_only_layers=[1], rope_theta=1e6,
                                **COMMON),
    "mixtral": MixtralConfig(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                             num_local_experts=8, num_experts_per_tok=2, eos_token_id=None,
                             **COMMON),
}
PROMPTS = [[(7 * i + 3 * j) % 2000 + 5 for j in range(n)] for i, n in
           enumerate((3, 17, 150, 400, 1000, 33))]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graphs"])
def test_float32_greedy_matches_transformers(name, enforce_eager, tmp_path, gpu_report):
    path = save_random_checkpoint(CONFIGS[name], tmp_path / name, None)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    llm = LLM(str(path), device="cuda", dtype="float32", kv_cache_memory=1 << 30,
              max_num_seqs=16, enforce_eager=enforce_eager)
    assert (llm.engine.core.executor.worker.runner.graphs is None) == enforce_eager
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    worst = 0.0
    for ids, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_model, ids, 48)
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids], device="cuda")).logits[0].float()
        theirs = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1),
                                               torch.tensor(ids[1:])].cpu()
        ours = torch.tensor([pos[ids[i + 1]].logprob for i, pos in
                             enumerate(out.prompt_logprobs[1:])])
        worst = max(worst, (ours - theirs).abs().max().item())
    gpu_report(model=name, graphs=not enforce_eager, max_logprob_diff=worst)
    assert worst < LOGPROB_TOL
