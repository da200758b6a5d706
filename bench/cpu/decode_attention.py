"""Decode attention on CPU: pagoda's kernel against the torch path it replaced (each sequence's
slots gathered into a padded copy, one masked SDPA call), both through the torch backend's
decode of one layer, in one process on this machine: microseconds per layer call (the mean of
`--calls` calls after 3 warm-up calls) for several model shapes, sequence counts and context
lengths, on `--threads` threads, and the kernel's speed-up. With `--layers N` the calls go
to N layers' caches in turn, as a step's do (N = 30 puts most shapes' caches past the L3
cache; with the default, 1, the small ones stay in it); `--cache-dtype` picks the cache's
elements (float32, bfloat16, or fp8: E4M3 bytes).

    python bench/cpu/decode_attention.py --output bench/results/cpu-decode-attention.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from pagoda.layers.attention import cpu_decode_attention
from pagoda.layers.attention.metadata import CommonAttentionMetadata
from pagoda.layers.attention.torch_ref import TorchAttentionBackend

# (shape, heads, kv heads, head dim)
SHAPES = (("SmolLM2-135M", 9, 3, 64), ("Llama-3.2-1B", 32, 8, 64), ("Llama-3.1-8B", 32, 8, 128))
# (sequences, context length)
BATCHES = ((1, 128), (1, 4096), (16, 128), (16, 1024))
BLOCK_SIZE = 16
CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "fp8": torch.float8_e4m3fn}  # --cache-dtype's (fp8: as --kv-cache-dtype's)


def decode_step(sequences: int, context: int, kv_heads: int, dim: int):
    """A step of `sequences` single-token decodes at `context` positions each, their blocks
    shuffled over a float32 cache; returns the backend's metadata and the cache."""
    gen = torch.Generator().manual_seed(0)
    blocks_each = -(-context // BLOCK_SIZE)
    blocks = sequences * blocks_each + 1
    cache = torch.randn(2, blocks, BLOCK_SIZE, kv_heads, dim, generator=gen)
    order = torch.randperm(blocks - 1, generator=gen).add(1).to(torch.int32)
    tables = order.reshape(sequences, blocks_each)
    lens = [context] * sequences
    ends = list(range(sequences + 1))
    last = torch.tensor(lens) - 1
    slots = tables.long().gather(1, (last // BLOCK_SIZE)[:, None])[:, 0] * BLOCK_SIZE \
        + last % BLOCK_SIZE
    common = CommonAttentionMetadata(
        num_tokens=sequences, num_seqs=sequences, max_query_len=1, max_seq_len=context,
        query_start_loc=torch.tensor(ends, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32), block_tables=tables,
        slot_mapping=slots, query_start_loc_cpu=ends, seq_lens_cpu=lens,
        block_size=BLOCK_SIZE)
    return TorchAttentionBackend().build_metadata(common), cache


def time_layer(path: str, heads: int, kv_heads: int, dim: int, sequences: int, context: int,
               calls: int, layers: int, dtype: torch.dtype) -> float:
    """Microseconds per layer call of the backend's forward on `path` (kernel or sdpa), the
    calls going to `layers` caches of `dtype` in turn."""
    os.environ[cpu_decode_attention.VARIABLE] = "auto" if path == "kernel" else "0"
    cpu_decode_attention._library.cache_clear()
    metadata, cache = decode_step(sequences, context, kv_heads, dim)
    caches = [cache.to(dtype)] + [torch.randn_like(cache).to(dtype) for _ in range(layers - 1)]
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(sequences, heads, dim, generator=gen)
    k, v = (torch.randn(sequences, kv_heads, dim, generator=gen) for _ in range(2))
    backend = TorchAttentionBackend()

    def call(index: int):
        return backend.forward(q, k, v, caches[index % layers], metadata, dim ** -0.5)
    for index in range(max(3, layers)):
        call(index)
    start = time.perf_counter()
    for index in range(calls):
        call(index)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--layers", type=int, default=1,
                        help="caches the calls go to in turn (a step's layers)")
    parser.add_argument("--cache-dtype", choices=CACHE_DTYPES, default="float32")
    args = parser.parse_args()
    if cpu_decode_attention._library() is None:
        sys.exit("the decode-attention kernel does not build on this machine")
    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    report = {"benchmark": "cpu-decode-attention", "command": [sys.executable, *sys.argv],
              "git": commit, "threads": args.threads, "calls": args.calls, "layers": args.layers,
              "block_size": BLOCK_SIZE, "cache_dtype": args.cache_dtype,
              "machine": {"cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(),
                          "platform": platform.platform(), "torch": torch.__version__},
              "us_per_layer_call": {}}
    for shape, heads, kv_heads, dim in SHAPES:
        for sequences, context in BATCHES:
            times = {path: time_layer(path, heads, kv_heads, dim, sequences, context,
                                      args.calls, args.layers, CACHE_DTYPES[args.cache_dtype])
                     for path in ("kernel", "sdpa")}
            report["us_per_layer_call"][f"{shape} {sequences} x {context}"] = times
            kernel, sdpa = times["kernel"], times["sdpa"]
            print(f"{shape:13s} {sequences:2d} x {context:4d}: kernel {kernel:7.0f} us, "
                  f"gather + SDPA {sdpa:7.0f} us ({sdpa / kernel:4.2f}x)", flush=True)
    report["machine"]["loadavg_end"] = os.getloadavg()
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
