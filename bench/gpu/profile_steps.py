"""Where the GPU waits in a batched workload: CUDA events around every launched step give
each step's device time and the device's idle time before it; grouped by step kind and batch
size, that says which steps the host cannot keep up with. Default workload: the 1B
host-overhead one (256 requests, input and output lengths uniform in [100, 1024]).

    python3 bench/gpu/profile_steps.py [MODEL] [--sync] [--sync-debug] [--quantization Q]
        [--kv-cache-dtype D] [--fixed COUNT INPUT OUTPUT]

--fixed: COUNT requests of INPUT -> OUTPUT tokens instead (issue 18's throughput workload of
the 8B is `bench/configs/llama-3.1-8b --fixed 1000 1024 512`)."""

import argparse
import time
from collections import defaultdict

import torch
from workload import host_overhead_llm, host_overhead_requests

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("model", nargs="?")  # (read by host_overhead_llm)
parser.add_argument("--sync", action="store_true", help="async scheduling off")
parser.add_argument("--sync-debug", action="store_true",
                    help="warn (with a stack) at every op that waits for the device")
parser.add_argument("--quantization", default=None)
parser.add_argument("--kv-cache-dtype", default="auto")
parser.add_argument("--fixed", type=int, nargs=3, default=None,
                    metavar=("COUNT", "INPUT", "OUTPUT"))
args = parser.parse_args()
llm = host_overhead_llm(quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                        **({"async_scheduling": False} if args.sync else {}))
prompts, params = host_overhead_requests(detokenize=False,
                                         fixed=tuple(args.fixed) if args.fixed else None)
llm.generate(prompts[:8], params[:8])

core = llm.engine.core
real_execute = core._execute  # forward pass, grammar bitmask, sampling: one step's launch
steps = []  # (start event, end event, num seqs, num tokens, host seconds in launch)


def timed_execute(sched_out):
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    real_execute(sched_out)
    host = time.perf_counter() - t0
    end.record()
    steps.append((start, end, len(sched_out.num_scheduled_tokens),
                  sched_out.total_num_scheduled_tokens, host))


core._execute = timed_execute
if args.sync_debug:
    torch.cuda.set_sync_debug_mode("warn")
stats_before = torch.cuda.memory_stats()
t0 = time.perf_counter()
llm.generate(prompts, params)
torch.cuda.synchronize()
wall = time.perf_counter() - t0
torch.cuda.set_sync_debug_mode(0)
stats = torch.cuda.memory_stats()
print("allocator during the run:", {k: stats.get(k, 0) - stats_before.get(k, 0) for k in
                                     ("num_alloc_retries", "num_device_alloc",
                                      "num_device_free", "num_sync_all_streams")})

groups = defaultdict(lambda: [0, 0.0, 0.0, 0.0])  # steps, gpu ms, idle-before ms, host ms
prev_end = None
for start, end, seqs, tokens, host in steps:
    if tokens == 0:
        continue
    kind = "decode" if tokens == seqs else "mixed"
    bucket = 1 << max(seqs - 1, 0).bit_length()
    g = groups[(kind, bucket)]
    g[0] += 1
    g[1] += start.elapsed_time(end)
    g[2] += prev_end.elapsed_time(start) if prev_end is not None else 0.0
    g[3] += host * 1e3
    prev_end = end
gpu = sum(g[1] for g in groups.values())
idle = sum(g[2] for g in groups.values())
print(f"{len(steps)} steps in {wall:.2f} s: device in steps {gpu / 1e3:.2f} s, idle between "
      f"steps {idle / 1e3:.2f} s ({100 * gpu / 1e3 / wall:.1f}% of wall in steps)")
print(f"{'kind':>7} {'seqs<=':>6} {'steps':>6} {'gpu ms/step':>11} {'idle ms/step':>12} "
      f"{'launch host ms':>14} {'idle total s':>12}")
for (kind, bucket), (n, g_ms, i_ms, h_ms) in sorted(groups.items()):
    print(f"{kind:>7} {bucket:>6} {n:>6} {g_ms / n:>11.3f} {i_ms / n:>12.3f} {h_ms / n:>14.3f} "
          f"{i_ms / 1e3:>12.3f}")
