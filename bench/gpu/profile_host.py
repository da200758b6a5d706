"""Where the host time of a batched workload goes: cProfile of the 1B host-overhead workload
(256 requests, input and output lengths uniform in [100, 1024]) on the GPU."""

import cProfile
import pstats
import sys
import time

from pagoda import LLM, SamplingParams
from pagoda.bench.datasets import random_requests

model = sys.argv[1] if len(sys.argv) > 1 else "bench/configs/llama-3.2-1b"
llm = LLM(model, load_format="dummy", dtype="bfloat16", max_model_len=4096, device="cuda",
          max_num_seqs=256, max_num_batched_tokens=8192)
requests = random_requests(256, vocab_size=128000, input_len_range=(100, 1024),
                           output_len_range=(100, 1024), seed=0)
prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True)
          for r in requests]
llm.generate(prompts[:8], params[:8])
start = time.perf_counter()
llm.generate(prompts, params)
print(f"unprofiled: {time.perf_counter() - start:.2f} s")
profiler = cProfile.Profile()
profiler.enable()
llm.generate(prompts, params)
profiler.disable()
stats = pstats.Stats(profiler)
stats.sort_stats("tottime").print_stats(28)
stats.sort_stats("cumulative").print_stats("pagoda", 30)
