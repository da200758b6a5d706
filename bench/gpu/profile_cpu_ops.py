"""Which host calls take the time in the first steps of the 1B host-overhead workload (the
prefill-heavy ones): torch.profiler with CPU activity over those steps, ops by self CPU time."""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from pagoda import LLM, SamplingParams
from pagoda.bench.datasets import random_requests

model = sys.argv[1] if len(sys.argv) > 1 else "bench/configs/llama-3.2-1b"
num_steps = int(sys.argv[2]) if len(sys.argv) > 2 else 12
llm = LLM(model, load_format="dummy", dtype="bfloat16", max_model_len=4096, device="cuda",
          max_num_seqs=256, max_num_batched_tokens=8192)
requests = random_requests(256, vocab_size=128000, input_len_range=(100, 1024),
                           output_len_range=(100, 1024), seed=0)
params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True,
                         detokenize=False) for r in requests]
llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in requests[:8]], params[:8])
engine = llm.engine
for i, (r, p) in enumerate(zip(requests, params)):
    engine.add_request(f"p{i}", {"prompt_token_ids": r.prompt_token_ids}, p)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(num_steps):
        engine.step(final_only=True)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))
for request_id in list(engine.output_processor.requests):
    engine.abort_request(request_id)
