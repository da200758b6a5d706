"""Which host calls take the time in the first steps of the 1B host-overhead workload (the
prefill-heavy ones): torch.profiler with CPU activity over those steps, ops by self CPU time."""

import sys

import torch
from torch.profiler import ProfilerActivity, profile
from workload import host_overhead_llm, host_overhead_requests

num_steps = int(sys.argv[2]) if len(sys.argv) > 2 else 12
llm = host_overhead_llm()
prompts, params = host_overhead_requests(detokenize=False)
llm.generate(prompts[:8], params[:8])
engine = llm.engine
for i, (prompt, p) in enumerate(zip(prompts, params)):
    engine.add_request(f"p{i}", prompt, p)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(num_steps):
        engine.step(final_only=True)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22,
                                max_name_column_width=60))
for request_id in list(engine.output_processor.requests):
    engine.abort_request(request_id)
