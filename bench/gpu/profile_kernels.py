"""Where a decode step's GPU time goes: torch.profiler over single-stream decode (CUDA graphs
on), kernel time summed by name, per step, against the step's wall time.

    python3 bench/gpu/profile_kernels.py [MODEL [BATCH]] [--quantization Q] [--kv-cache-dtype D]
        [--load-format gguf --tokenizer DIR] [--by-grid]

--by-grid also sums the kernels by name and launch grid (telling apart a kernel's launches
for different projections).

MODEL is a config directory whose weights are drawn at random (the default load format,
dummy), or a checkpoint with `--load-format` (a random GGUF of bench/gpu/run.sh's $GGUF8
and the word tokenizer beside it).
"""

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from pagoda import LLM, SamplingParams

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("model", nargs="?", default="bench/configs/llama-3.1-8b")
parser.add_argument("batch", nargs="?", type=int, default=1)
parser.add_argument("--quantization", default=None)
parser.add_argument("--kv-cache-dtype", default="auto")
parser.add_argument("--load-format", default="dummy")
parser.add_argument("--tokenizer", default=None)
parser.add_argument("--by-grid", action="store_true")
args = parser.parse_args()
batch = args.batch
llm = LLM(args.model, load_format=args.load_format, tokenizer=args.tokenizer, dtype="bfloat16",
          max_model_len=4096, device="cuda", max_num_seqs=max(batch, 8),
          quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
prompts = [{"prompt_token_ids": list(range(1000 + i, 2024 + i))} for i in range(batch)]
steps = 64
params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, detokenize=False)
llm.generate(prompts, params)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
    llm.generate(prompts, params)
    torch.cuda.synchronize()
kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
for e in kernels:
    entry = by_name[e.name[:90]]
    entry[0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    entry[1] += 1
total_us = sum(v[0] for v in by_name.values())
span_us = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels))
print(f"batch {batch}: {steps} steps, kernel time {total_us / 1e3:.1f} ms over a GPU span of "
      f"{span_us / 1e3:.1f} ms ({100 * total_us / span_us:.1f}% busy); "
      f"{total_us / steps / 1e3:.3f} ms of kernels per step, {len(kernels) / steps:.0f} kernels")
for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]:
    print(f"{us / steps:9.1f} us/step {n // steps:5d}x/step  {100 * us / total_us:5.1f}%  {name}")

if args.by_grid:  # the trace's kernel events carry their grids
    import json
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        with open(trace.name) as written:
            events = json.load(written)["traceEvents"]
    by_grid: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("cat") == "kernel":
            entry = by_grid[(e["name"][:40], str(e.get("args", {}).get("grid")))]
            entry[0] += e.get("dur", 0.0)
            entry[1] += 1
    print("by name and grid:")
    for (name, grid), (us, n) in sorted(by_grid.items(), key=lambda kv: -kv[1][0])[:30]:
        print(f"{us / steps:9.1f} us/step {n / steps:6.1f}x/step {us / n:8.2f} us each  "
              f"{name} grid {grid}")
