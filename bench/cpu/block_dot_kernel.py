"""pagoda's CPU block-dot kernel against float32 `mm` and torch's int4 kernel at SmolLM2's
layer shapes, in one process on this machine: microseconds per call (the mean of `--calls`
calls after 5 warm-up calls) at 1, 4, 16 and 64 token rows, on `--threads` threads, and
each kernel's speed-up over float32; the block-dot kernel with its scales held as float16s
too (the scales are float16 values, as GGUF's legacy types' are), and in groups of 16 (GGUF
Q2_K/Q3_K/Q6_K's: 4-bit codes as the kernel holds Q2_K's and Q3_K's, 8-bit as Q6_K's and,
before they were narrowed to nibbles, Q2_K's and Q3_K's), and, where the inputs are whole
super-blocks of 256, with the k-quants' scales factored as they store them (int8 a group
times a float a super-block: Q6_K's codes 0..63 as 6-bit codes, as the kernel holds them,
and as bytes, as it held them before); pagoda's float8 kernel (cpu_fp8_dot) beside them
where it runs (the same weights as float8 with a scale per row). `--gemma3-head` adds
Gemma 3 270M's tied LM head (262,144 x 640); `--shapes llama-3.2-1b` takes Llama 3.2 1B's
layers instead of SmolLM2's (their inputs all whole super-blocks).

    python bench/cpu/block_dot_kernel.py --output bench/results/cpu-block-dot-kernel.json
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

from pagoda.layers.quantization import cpu_block_dot, cpu_fp8_dot
from pagoda.layers.quantization.cpu_block_dot import BlockDotWeight, ScaleFactors
from pagoda.layers.quantization.cpu_fp8_dot import Fp8DotWeight
from pagoda.layers.quantization.int4 import Int4PackedWeight

# (name, out, in): SmolLM2's fused qkv, gate_up, down and o projections and its LM head
LLAMA_1B_SHAPES = (("qkv_proj", 3072, 2048), ("gate_up_proj", 16384, 2048),
                   ("down_proj", 2048, 8192), ("o_proj", 2048, 2048))
SHAPES = (("qkv_proj", 960, 576), ("gate_up_proj", 3072, 576), ("down_proj", 576, 1536),
          ("o_proj", 576, 576), ("lm_head", 49152, 576))
TOKENS = (1, 4, 16, 64)
GROUP = 32


def mean_us(call, calls: int) -> float:
    for _ in range(5):
        call()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1e6


def kernels(out_features: int, in_features: int) -> dict:
    """Each way to hold one random [out, in] layer, by name."""
    gen = torch.Generator().manual_seed(0)
    groups = in_features // GROUP
    scale = (torch.rand(out_features, groups, generator=gen) * 0.01).half().float()
    low = -8 * scale
    codes4 = torch.randint(0, 16, (out_features, in_features), generator=gen, dtype=torch.uint8)
    codes8 = torch.randint(0, 256, (out_features, in_features), generator=gen,
                           dtype=torch.uint8)
    codes6 = codes8 % 64
    dense = torch.randn(out_features, in_features, generator=gen)
    held = {
        "float32 mm": lambda x: x @ dense.t(),
        "torch int4": Int4PackedWeight(codes4, scale, low, GROUP),
        **{f"block-dot {bits}-bit, {passes} pass{'es' if passes > 1 else ''}":
           BlockDotWeight(codes, scale, low, GROUP, bits, activation_passes=passes)
           for bits, codes in ((4, codes4), (8, codes8)) for passes in (1, 2)},
        **{f"block-dot {bits}-bit, 2 passes, float16 scales":
           BlockDotWeight(codes, scale, low, GROUP, bits, activation_passes=2, half_scales=True)
           for bits, codes in ((4, codes4), (8, codes8))},
        # GGUF Q2_K/Q3_K's layout (a scale and min a 16 inputs), held as nibbles or bytes
        **{f"block-dot {bits}-bit, groups of 16, 2 passes":
           BlockDotWeight(codes, sixteens(scale), sixteens(low), 16, bits, activation_passes=2)
           for bits, codes in ((4, codes4), (8, codes8))},
    }
    # the k-quants' scales as they store them, against float32 ones above: Q4_K's (4-bit,
    # groups of 32, own mins), Q6_K's (groups of 16, lows of the scales; bytes, 6-bit codes)
    if in_features % 256 == 0:
        held["block-dot 4-bit, 2 passes, factored scales"] = factored_kernel(codes4, GROUP, 4,
                                                                             True)
        held["block-dot 8-bit, groups of 16, 2 passes, factored scales"] = \
            factored_kernel(codes8, 16, 8, False)
        held["block-dot 6-bit, groups of 16, 2 passes, factored scales"] = \
            factored_kernel(codes6, 16, 6, False)
    if cpu_fp8_dot.available():
        row_scale = dense.abs().amax(dim=1, keepdim=True) / 448
        held["float8"] = Fp8DotWeight((dense / row_scale).to(torch.float8_e4m3fn), row_scale)
    return held


def factored_kernel(codes: torch.Tensor, group: int, bits: int, own_lows: bool
                    ) -> BlockDotWeight:
    """The kernel holding random k-quant scales factored: int8 sub-scales (and sub-mins) a
    group, float16-valued factors a super-block of 256 inputs."""
    out_features, in_features = codes.shape
    gen = torch.Generator().manual_seed(1)
    groups, supers = in_features // group, in_features // 256
    sub_scale = torch.randint(0, 64, (out_features, groups), generator=gen).to(torch.int8)
    d = (torch.rand(out_features, supers, generator=gen) * 1e-3).half().float()
    sub_low = sub_scale.flip(1) if own_lows else None
    factors = ScaleFactors(sub_scale, sub_low, d, -d if own_lows else -32 * d, 256 // group)
    scale, low = factors.products()
    return BlockDotWeight(codes, scale, low, group, bits, activation_passes=2, factors=factors)


def sixteens(per_group: torch.Tensor) -> torch.Tensor:
    """[out, in / GROUP] scales as [out, in / 16] (each group's twice)."""
    return per_group.repeat_interleave(GROUP // 16, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--gemma3-head", action="store_true")
    parser.add_argument("--shapes", choices=["smollm2", "llama-3.2-1b"], default="smollm2")
    args = parser.parse_args()
    if not cpu_block_dot.available():
        sys.exit("the block-dot kernel does not run on this machine")
    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    report = {"benchmark": "cpu-block-dot-kernel", "command": [sys.executable, *sys.argv],
              "git": commit, "threads": args.threads, "calls": args.calls,
              "machine": {"cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(),
                          "platform": platform.platform(), "torch": torch.__version__},
              "us_per_call": {}}
    shapes = SHAPES if args.shapes == "smollm2" else LLAMA_1B_SHAPES
    shapes += (("gemma3 lm_head", 262144, 640),) if args.gemma3_head else ()
    for name, out_features, in_features in shapes:
        held = kernels(out_features, in_features)
        for tokens in TOKENS:
            x = torch.randn(tokens, in_features)
            times = {kernel: mean_us(lambda: call(x), args.calls)
                     for kernel, call in held.items()}
            report["us_per_call"][f"{name} {tokens}"] = times
            base = times["float32 mm"]
            print(f"{name:14s} {tokens:3d} tokens: " + ", ".join(
                f"{k} {v:8.0f} us ({base / v:4.2f}x)" for k, v in times.items()), flush=True)
    report["machine"]["loadavg_end"] = os.getloadavg()
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
