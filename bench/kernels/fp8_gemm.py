"""FP8 tensor-core products at a few hundred tokens: torch._scaled_mm (cuBLAS) against
pagoda's Triton kernel (`triton_fp8_gemm`), each projection of a Llama-3.1-8B layer alone,
measured in one run.

For each token count and projection: cuBLAS's time, the Triton kernel's at its shipped
configuration (`fp8_config`) and at every configuration of the grid (tile, warps, stages,
input splits), CUDA-graph medians over enough copies of the weights that L2 holds none of
them from one call to the next. The activations are float8 already (the per-token
quantization, `fp8_rows`, is the same launch before either). bfloat16's cuBLAS product is
timed beside them for scale. The summary gives, per token count, the layer's four products
by cuBLAS, by the shipped Triton configuration and by the best configuration of each.

    PYTHONPATH=. python bench/kernels/fp8_gemm.py [--tokens N ...] [--output-json PATH]
        [--grid JSON]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from datetime import datetime, timezone

import torch
from torch.nn import functional as F
from triton.testing import do_bench_cudagraph

from pagoda.layers.quantization.group_gemm import FP8
from pagoda.layers.quantization.triton_fp8_gemm import fp8_config, fp8_gemm
from pagoda.layers.quantization.triton_group_gemm import _multiprocessors

PROJECTIONS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
               "down": (4096, 14336)}
TOKENS = [64, 128, 256, 512, 1024]
GRID = {"tile": [(64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 128, 8), (128, 256, 8),
                 (64, 256, 4)],
        "num_stages": [3, 4, 5], "splits": [1, 2, 4]}
L2_FLUSH_BYTES = 256 << 20


def weights(outputs: int, inputs: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of one projection's float8 weights and row scales, enough to flush L2."""
    copies = -(-L2_FLUSH_BYTES // (outputs * inputs))
    return [((torch.randn(outputs, inputs, device="cuda") * 0.5).to(FP8),
             torch.rand(outputs, device="cuda") * 1e-2 + 1e-3) for _ in range(copies)]


def timed(call, copies: int) -> float:
    """Microseconds a call (over `copies` weights), CUDA-graph median."""
    return 1e3 * do_bench_cudagraph(call, rep=30) / copies


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--grid", type=json.loads, default=None,
                        help="the sweep as JSON, keys as GRID's")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)
    grid = args.grid or GRID
    multiprocessors = _multiprocessors(torch.cuda.current_device())
    result = {"device": torch.cuda.get_device_name(), "date":
              datetime.now(timezone.utc).isoformat(), "argv": sys.argv, "rows": []}
    held = {name: weights(*shape) for name, shape in PROJECTIONS.items()}
    for tokens in args.tokens:
        for name, (outputs, inputs) in PROJECTIONS.items():
            result["rows"].append(_projection(name, tokens, outputs, inputs, held[name], grid,
                                              multiprocessors))
        _summary(result["rows"], tokens)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=1)


def _projection(name: str, tokens: int, outputs: int, inputs: int, held: list, grid: dict,
                multiprocessors: int) -> dict:
    a = (torch.randn(tokens, inputs, device="cuda") * 0.5).to(FP8)
    a_scale = torch.rand(tokens, 1, device="cuda") * 1e-2 + 1e-3
    dense = (torch.randn(tokens, inputs, device="cuda", dtype=torch.bfloat16),
             [torch.randn(outputs, inputs, device="cuda", dtype=torch.bfloat16)
              for _ in range(max(1, len(held) // 2))])
    row = {"projection": name, "tokens": tokens,
           "bf16_us": timed(lambda: [F.linear(dense[0], w) for w in dense[1]], len(dense[1])),
           "cublas_us": timed(lambda: [torch._scaled_mm(
               a, w.t(), scale_a=a_scale, scale_b=s.view(1, -1), out_dtype=torch.bfloat16,
               use_fast_accum=True) for w, s in held], len(held)),
           "shipped": fp8_config(tokens, outputs, inputs, multiprocessors)}
    row["shipped_us"] = timed(lambda: [fp8_gemm(a, a_scale, w, s, torch.bfloat16)
                                       for w, s in held], len(held))
    row["sweep"] = []
    for (block_m, block_n, warps), stages, splits in itertools.product(*grid.values()):
        if inputs % (splits * 128):
            continue
        config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 128, "num_warps": warps,
                  "num_stages": stages, "splits": splits}
        try:
            us = timed(lambda: [fp8_gemm(a, a_scale, w, s, torch.bfloat16, config)
                                for w, s in held], len(held))
        except Exception as error:  # e.g. a tile past the shared memory
            print(f"  {name} {tokens} {config}: {type(error).__name__}")
            continue
        row["sweep"].append({**config, "us": us})
    best = min(row["sweep"], key=lambda entry: entry["us"])
    row["best"] = best
    print(f"{name:>8} {tokens:>5}: bf16 {row['bf16_us']:7.1f}  cublas {row['cublas_us']:7.1f}  "
          f"triton shipped {row['shipped_us']:7.1f}  best {best['us']:7.1f} "
          f"({best['BLOCK_M']}x{best['BLOCK_N']}, {best['num_warps']}w, "
          f"{best['num_stages']}s, {best['splits']} splits)", flush=True)
    return row


def _summary(rows: list[dict], tokens: int) -> None:
    at = [row for row in rows if row["tokens"] == tokens]
    totals = {key: sum(row[key] for row in at) for key in ("bf16_us", "cublas_us",
                                                            "shipped_us")}
    best = sum(row["best"]["us"] for row in at)
    print(f"layer at {tokens} tokens: bf16 {totals['bf16_us']:.1f}  cublas "
          f"{totals['cublas_us']:.1f}  triton shipped {totals['shipped_us']:.1f}  "
          f"best of each {best:.1f} us", flush=True)


if __name__ == "__main__":
    main()
