"""Where the host time of a batched workload goes: cProfile of the 1B host-overhead workload
(256 requests, input and output lengths uniform in [100, 1024]) on the GPU."""

import cProfile
import pstats
import time

from workload import host_overhead_llm, host_overhead_requests

llm = host_overhead_llm()
prompts, params = host_overhead_requests()
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
