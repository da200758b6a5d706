"""Where a decode step's host time goes: cProfile of single-stream decode on the GPU."""

import cProfile
import pstats
import sys
import time

from pagoda import LLM, SamplingParams

model = sys.argv[1] if len(sys.argv) > 1 else "bench/configs/llama-3.1-8b"
llm = LLM(model, load_format="dummy", dtype="bfloat16", max_model_len=4096, device="cuda")
prompt = {"prompt_token_ids": list(range(1000, 2024))}
params = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True, detokenize=False)
llm.generate([prompt], params)
start = time.perf_counter()
llm.generate([prompt], params)
print(f"256 tokens in {time.perf_counter() - start:.3f} s")
profiler = cProfile.Profile()
profiler.enable()
llm.generate([prompt], params)
profiler.disable()
pstats.Stats(profiler).sort_stats("tottime").print_stats(22)
