"""pagoda against transformers on the same weights: greedy tokens and per-token logprobs,
for one prompt alone, several batched, on prefix-cache hits and in tiny prefill chunks.

Tolerance: float32 on both sides; per-token logprobs agree within 2e-3 (the two
implementations order their float32 reductions differently; observed differences are ~1e-5).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from pagoda import LLM, SamplingParams
from tests.utils import save_random_checkpoint

LOGPROB_TOL = 2e-3


def hf_greedy(model, ids: list[int], n: int, ignore_eos: bool = True) -> list[int]:
    # an explicit mask: generate() would otherwise mask every prompt token equal to the pad id
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n,
                         min_new_tokens=n if ignore_eos else 0, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def hf_prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def check_parity(llm: LLM, hf_model, prompts: list[list[int]], num_tokens: int,
                 prompt_logprobs: bool = True) -> None:
    """Greedy tokens equal transformers', and prompt logprobs (requests that ask for them
    skip the prefix cache) agree within LOGPROB_TOL."""
    params = SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True,
                            prompt_logprobs=0 if prompt_logprobs else None)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for ids, out in zip(prompts, outputs):
        assert out.outputs[0].token_ids == hf_greedy(hf_model, ids, num_tokens)
        if not prompt_logprobs:
            continue
        ours = torch.tensor([pos[ids[i + 1]].logprob
                             for i, pos in enumerate(out.prompt_logprobs[1:])])
        theirs = hf_prompt_logprobs(hf_model, ids)
        assert (ours - theirs).abs().max().item() < LOGPROB_TOL


def random_prompts(vocab_size: int, lengths: tuple[int, ...], seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def check_random_checkpoint(config, path: Path, num_tokens: int = 32,
                            original_format: bool = True) -> None:
    """A random checkpoint of `config` served by pagoda matches transformers: alone, batched,
    with prefix-cache hits (the same prompts again, and a shared prefix), and with prefill
    split into 8-token chunks. `original_format` False: saved as transformers 5 holds the
    tensors (packed experts)."""
    path = save_random_checkpoint(config, path, None, original_format=original_format)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = random_prompts(config.vocab_size, (5, 37, 90))
    shared = prompts[2][:64] + random_prompts(config.vocab_size, (9,), seed=2)[0]
    llm = LLM(str(path), kv_cache_memory=32 << 20, max_num_batched_tokens=64)
    check_parity(llm, hf_model, prompts[1:2], num_tokens, prompt_logprobs=False)  # alone
    check_parity(llm, hf_model, prompts, num_tokens)  # batched
    hits = llm.engine.core.kv_manager.stats.hits
    check_parity(llm, hf_model, [prompts[1], shared], num_tokens, prompt_logprobs=False)
    assert llm.engine.core.kv_manager.stats.hits - hits >= 32 + 64  # both hit the cache
    chunked = LLM(str(path), kv_cache_memory=32 << 20, max_num_batched_tokens=8,
                  max_num_seqs=4, enable_prefix_caching=False)
    check_parity(chunked, hf_model, prompts, num_tokens)
