"""The 1B host-overhead workload the GPU profilers share: Llama-3.2-1B shape (dummy bf16),
256 requests with input and output lengths uniform in [100, 1024], all at once."""

from __future__ import annotations

import sys

from pagoda import LLM, SamplingParams
from pagoda.bench.datasets import random_requests

DEFAULT_MODEL = "bench/configs/llama-3.2-1b"


def host_overhead_llm(device: str = "cuda", **engine) -> LLM:
    """The engine for it, on the model named by the first command-line argument if any."""
    model = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") \
        else DEFAULT_MODEL
    return LLM(model, load_format="dummy", dtype="bfloat16", max_model_len=4096, device=device,
               max_num_seqs=256, max_num_batched_tokens=8192, **engine)


def host_overhead_requests(detokenize: bool = True, fixed: tuple[int, int, int] | None = None
                           ) -> tuple[list[dict], list[SamplingParams]]:
    """Its prompts (token ids) and their sampling parameters (greedy, each its length);
    `fixed` (count, input length, output length): that many requests of those lengths
    instead (issue 18's throughput workload is (1000, 1024, 512))."""
    count, input_range, output_range = 256, (100, 1024), (100, 1024)
    if fixed is not None:
        count, input_range, output_range = fixed[0], (fixed[1],) * 2, (fixed[2],) * 2
    requests = random_requests(count, vocab_size=128000, input_len_range=input_range,
                               output_len_range=output_range, seed=0)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True,
                             detokenize=detokenize) for r in requests]
    return prompts, params
