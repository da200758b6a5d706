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
(The figures of bench/results/README.md for this mode were taken with programmatic
dependent launch on, before `--pdl` existed.)

    PYTHONPATH=. python bench/kernels/fp8_gemm.py [--tokens N ...] [--output-json PATH]
        [--grid JSON] [--pdl] [--few-tokens N [--planes]]

`--few-tokens N` times instead, projection by projection, the weight-only few-token kernel
that calls of up to 32 tokens take (`triton_group_gemm.few_tokens_config`), at its shipped
settings and over FEW_GRID's (tile width, warps, stages, programs a multiprocessor): each
setting's time and its rate of weight bytes against the device-copy bandwidth measured in
the same run. With `--planes` the same for 4-bit codes in planes, groups of 128 with mins
(AWQ's layout; the settings replace `triton_group_gemm.PLANES_FEW`). Programmatic dependent
launch is off unless `--pdl`. With it on, an H100 timed the float8 gate-up product at one
token in 42.9 us at 64 outputs by 4 warps against 52.2 at the shipped 32 by 2, yet the 8B's
decode step with that tile took 3.70 ms a token against 3.69 (bench/results/README.md):
launched back to back, a copy's programs may wait on the multiprocessors while the copy
before runs, which a decode step's products (each after a small kernel) do not meet (a
reading, not profiled).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from datetime import datetime, timezone

import torch
from quant_bench import (  # this script's directory
    L2_FLUSH_BYTES,
    LAYOUTS,
    PROJECTIONS,
    quantized,
    sweep_config,
)
from torch.nn import functional as F
from triton.testing import do_bench_cudagraph

from pagoda.layers.quantization.group_gemm import FP8
from pagoda.layers.quantization.triton_fp8_gemm import fp8_config, fp8_gemm
from pagoda.layers.quantization.triton_group_gemm import multiprocessor_count
from pagoda.models.loader.checkpoint import weight_bytes

TOKENS = [64, 128, 256, 512, 1024]
GRID = {"tile": [(64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 128, 8), (128, 256, 8),
                 (64, 256, 4)],
        "num_stages": [3, 4, 5], "splits": [1, 2, 4]}
FEW_GRID = {"BLOCK_N": [32, 64], "num_warps": [2, 4], "num_stages": [3, 4, 6],
            "programs_per_sm": [2, 4, 8, 16]}
PLANES_GRID = {"BLOCK_N": [32, 64, 128], "num_warps": [2, 4], "num_stages": [3, 4],
               "programs_per_sm": [4, 8, 16]}


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
    parser.add_argument("--few-tokens", type=int, default=None,
                        help="sweep the few-token kernel per projection at this many tokens")
    parser.add_argument("--pdl", action="store_true",
                        help="launch the Triton kernels with programmatic dependent launch")
    parser.add_argument("--planes", action="store_true",
                        help="--few-tokens: the planes kernel on 4-bit codes in groups of 128")
    args = parser.parse_args(argv)
    os.environ["PAGODA_PDL"] = "1" if args.pdl else "0"  # read at the first launch
    if args.few_tokens:
        grid = args.grid or (PLANES_GRID if args.planes else FEW_GRID)
        _write(_few_token_sweep(args.few_tokens, grid, args.planes, args.pdl),
               args.output_json)
        return
    grid = args.grid or GRID
    multiprocessors = multiprocessor_count(torch.cuda.current_device())
    result = {"device": torch.cuda.get_device_name(), "date":
              datetime.now(timezone.utc).isoformat(), "argv": sys.argv, "rows": []}
    held = {name: weights(*shape) for name, shape in PROJECTIONS.items()}
    for tokens in args.tokens:
        for name, (outputs, inputs) in PROJECTIONS.items():
            result["rows"].append(_projection(name, tokens, outputs, inputs, held[name], grid,
                                              multiprocessors))
        _summary(result["rows"], tokens)
    _write(result, args.output_json)


def _write(result: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def _few_token_sweep(tokens: int, grid: dict, planes: bool, pdl: bool) -> dict:
    """Each projection's few-token product at `tokens` tokens, shipped and over `grid`."""
    from pagoda.bench.roofline import measure_ceilings
    from pagoda.layers.quantization import triton_group_gemm as kernels
    ceilings = measure_ceilings(torch.device("cuda"))
    result = {"device": ceilings.device, "bandwidth_gb_s": ceilings.bandwidth / 1e9,
              "date": datetime.now(timezone.utc).isoformat(), "argv": sys.argv,
              "tokens": tokens, "layout": "int4-g128 planes" if planes else "fp8-row", "pdl": pdl,
              "rows": []}
    for name, (outputs, inputs) in PROJECTIONS.items():
        held = _few_token_weights(outputs, inputs, planes)
        x = torch.randn(tokens, inputs, device="cuda", dtype=torch.bfloat16)
        rate = weight_bytes(held[0]) / ceilings.bandwidth * 1e6  # us at the copy bandwidth
        shipped = timed(lambda: [kernels.group_gemm(x, w) for w in held], len(held))
        print(f"{name:>8}: shipped {shipped:6.2f} us ({100 * rate / shipped:.1f}% of the copy "
              "bandwidth)", flush=True)
        for settings in itertools.product(*grid.values()):
            restore = _set_few_settings(kernels, planes, **dict(zip(grid, settings)))
            try:
                us = timed(lambda: [kernels.group_gemm(x, w) for w in held], len(held))
            except Exception as error:  # e.g. a tile past the shared memory
                print(f"  {settings}: {type(error).__name__}")
                continue
            finally:
                restore()
            result["rows"].append({"projection": name, **dict(zip(grid, settings)), "us": us,
                                   "shipped_us": shipped, "fraction_of_bandwidth": rate / us})
        best = sorted((r for r in result["rows"] if r["projection"] == name),
                      key=lambda r: r["us"])[:3]
        for row in best:
            print(f"    {row['us']:6.2f} us ({100 * row['fraction_of_bandwidth']:.1f}%) "
                  f"{ {key: row[key] for key in grid} }", flush=True)
    return result


def _few_token_weights(outputs: int, inputs: int, planes: bool) -> list:
    """Copies of a projection as float8 rows, or as 4-bit planes in groups of 128 with mins
    (quant_bench's layouts), enough to flush L2."""
    layout = LAYOUTS["int4-g128" if planes else "fp8-row"]
    first = quantized(outputs, inputs, *layout)
    copies = -(-L2_FLUSH_BYTES // weight_bytes(first))
    return [first] + [quantized(outputs, inputs, *layout) for _ in range(copies - 1)]


def _set_few_settings(kernels, planes: bool, **settings):
    """Point the kernel module's few-token settings at `settings`; returns their undoing."""
    if planes:
        shipped = kernels.PLANES_FEW
        kernels.PLANES_FEW = (settings["BLOCK_N"], settings["num_warps"],
                              settings["num_stages"], settings["programs_per_sm"])
        return lambda: setattr(kernels, "PLANES_FEW", shipped)
    shipped = kernels.few_tokens_config
    kernels.few_tokens_config = sweep_config(None, settings["BLOCK_N"], settings["num_warps"],
                                             settings["num_stages"],
                                             settings["programs_per_sm"])
    return lambda: setattr(kernels, "few_tokens_config", shipped)


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
