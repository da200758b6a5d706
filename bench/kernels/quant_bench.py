"""Microbenchmark of the quantized linear kernels on CUDA against bfloat16 (cuBLAS), measured
in one run, at one decoder layer of Llama-3.1-8B (qkv 4096->6144, o 4096->4096, gate_up
4096->28672, down 14336->4096).

For each weight layout and token count: the four projections' time (CUDA-graph medians,
triton.testing.do_bench_cudagraph), the bytes of weights they read over that time as a
fraction of the device-copy bandwidth measured in the same run, and the speed-up over
bfloat16. Layouts: FP8 with a scale per row (above 32 tokens: torch._scaled_mm) or per
128x128 block, 4-bit codes in groups of 128 (AWQ/GPTQ) or 32 with a min (GGUF Q4_0/Q4_1/
Q4_K), 8-bit codes in groups of 32 (Q8_0, Q5_K) or 16 (Q6_K). Every timed call reads enough
distinct weights (copies of the layer) that the L2 cache holds none of them from one call
to the next.

    PYTHONPATH=. python bench/kernels/quant_bench.py [--tokens N ...] [--output-json PATH] [--pdl]
        [--layouts LAYOUT ...]

The kernels launch without programmatic dependent launch unless --pdl is given: a timed call
launches the group kernels back to back, and with it they measured 9-26 % slower per layer
on the H200 at one token than without, alternated in one call (int4 groups of 128: 85.4
against 78.5 us; 8-bit groups of 16: 162.1 against 128.7 us). A decode step's gain from it
is measured end to end (`bench/gpu/run.sh pdl-decode1`). Results record which was used.

`--sweep LAYOUT ...` times the few-token kernel (calls of at most FEW_TOKENS tokens) over a
grid of its launch settings instead (token tile, tile width, warps, pipeline stages, programs
per multiprocessor; `--grid JSON` replaces SWEEP's) at the first of --tokens, after the
shipped settings' time;
`--sweep-one-token LAYOUT ...` likewise the one-token GEMVs (4-bit codes in halves, 8-bit
codes a byte each: words and rows a step, warps, programs per multiprocessor).

Calls of many tokens on planes decode their weights first (`triton_plane_decode`; with
PAGODA_DECODE_FROM=1 every call does, with 0 none); `--decoded-slice-mib N` sets the slice of
weights they decode at a time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from datetime import datetime, timezone

import torch
from torch.nn import functional as F
from triton.testing import do_bench_cudagraph

from pagoda.bench.roofline import measure_ceilings
from pagoda.layers.quantization.fp8 import runs_on_tensor_cores, scaled_mm
from pagoda.layers.quantization.group_gemm import CHUNK, FP8, GroupQuantWeight
from pagoda.layers.quantization.triton_group_gemm import group_gemm
from pagoda.models.loader.checkpoint import weight_bytes

PROJECTIONS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
               "down": (4096, 14336)}
# name -> (group (None: the whole row), bits, each min -this times the scale (0: none),
# float8 values[, codes below this: "int6-g16" holds GGUF Q6_K's 0..63, which byte planes
# take (PAGODA_BYTE_PLANES=1)]); "int8-g32-centred" holds GGUF Q8_0's codes, centred on 128
# (held without mins)
LAYOUTS = {"fp8-row": (None, 8, 0, True), "fp8-block128": (128, 8, 0, True),
           "int4-g128": (128, 4, 1, False), "int4-g32": (32, 4, 1, False),
           "int8-g32": (32, 8, 1, False), "int8-g32-centred": (32, 8, 128, False),
           "int8-g16": (16, 8, 1, False), "int6-g16": (16, 8, 1, False, 64)}
TOKENS = [1, 4, 8, 16, 32, 64, 256, 2048]
L2_FLUSH_BYTES = 256 << 20  # weights read per timed call: several times the H200's L2


def quantized(outputs: int, inputs: int, group: int | None, bits: int, min_scales: int,
              float8: bool, codes_below: int | None = None) -> GroupQuantWeight:
    group = group or inputs
    if float8:
        codes = torch.randn(outputs, inputs, device="cuda").to(FP8)
    else:
        codes = torch.randint(0, codes_below or 2 ** bits, (outputs, inputs), device="cuda",
                              dtype=torch.uint8)
    scale = torch.full((outputs, inputs // group), 1e-3, device="cuda")
    return GroupQuantWeight(codes, scale, -min_scales * scale if min_scales else None, group,
                            bits)


def layer_weights(layout: str | None) -> dict:
    """One decoder layer's four weights in `layout` (None: bfloat16)."""
    if layout is None:
        return {n: torch.randn(o, i, device="cuda", dtype=torch.bfloat16) * 0.02
                for n, (o, i) in PROJECTIONS.items()}
    return {n: quantized(o, i, *LAYOUTS[layout]) for n, (o, i) in PROJECTIONS.items()}


def product(x: torch.Tensor, weight) -> torch.Tensor:
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight)
    return scaled_mm(x, weight) if runs_on_tensor_cores(x, weight) else group_gemm(x, weight)


def layers_call(layout: str | None):
    """(the four products of enough distinct layers that the L2 cache holds none of them
    between calls, as a function of x; the layers; bytes of weights one layer reads)."""
    first = layer_weights(layout)
    nbytes = sum(w.numel() * 2 if isinstance(w, torch.Tensor) else weight_bytes(w)
                 for w in first.values())
    layers = [first] + [layer_weights(layout) for _ in range(-(-L2_FLUSH_BYTES // nbytes) - 1)]

    def call(xs):
        return [product(xs[n], w) for layer in layers for n, w in layer.items()]
    return call, len(layers), nbytes


# the few-token kernel's launch settings a sweep tries (--grid replaces them); a BLOCK_T of
# None keeps the shipped token tile
SWEEP = {"BLOCK_T": (None,), "BLOCK_N": (64, 128, 256), "num_warps": (4, 8),
         "num_stages": (3, 5), "programs_per_sm": (4, 8)}


def sweep_config(block_t: int | None, block_n: int, num_warps: int, num_stages: int,
                 programs_per_sm: int):
    """A replacement for few_tokens_config with these settings (steps as shipped; the input
    splits recomputed for the tiles and programs per SM)."""
    from pagoda.layers.quantization import triton_group_gemm as kernels
    shipped = kernels.few_tokens_config

    def config(tokens, weight, multiprocessors):
        chosen = shipped(tokens, weight, multiprocessors)
        tile_t = block_t or chosen["BLOCK_T"]
        tiles = -(-tokens // tile_t) * -(-weight.out_features // block_n)
        unit = CHUNK if weight.bits == 4 else chosen["STEP"]
        splits = kernels._splits(tiles, weight.in_features, unit, multiprocessors,
                                 programs_per_sm)
        return {**chosen, "BLOCK_T": tile_t, "BLOCK_N": block_n, "num_warps": num_warps,
                "num_stages": num_stages, "splits": splits}
    return config


def sweep(layouts: list[str], tokens: int, bandwidth: float, grid: dict, config_name: str,
          make_config) -> list[dict]:
    """Time each layout's layer with the kernel config function `config_name` of
    triton_group_gemm replaced by make_config(*settings), for every settings in `grid`."""
    from pagoda.layers.quantization import triton_group_gemm as kernels
    shipped = getattr(kernels, config_name)
    xs, rows = inputs(tokens), []
    for layout in layouts:
        call, layers, nbytes = layers_call(layout)
        shipped_ms = do_bench_cudagraph(lambda: call(xs), rep=50) / layers
        print(f"{layout} at {tokens} tokens: shipped {1e3 * shipped_ms:.1f} us")
        for settings in itertools.product(*grid.values()):
            setattr(kernels, config_name, make_config(*settings))
            try:
                ms = do_bench_cudagraph(lambda: call(xs), rep=50) / layers
            except Exception as error:  # e.g. a tile past the shared memory
                print(f"  {settings}: {type(error).__name__}")
                continue
            finally:
                setattr(kernels, config_name, shipped)
            row = {"layout": layout, "tokens": tokens, **dict(zip(grid, settings)),
                   "us": 1e3 * ms, "shipped_us": 1e3 * shipped_ms,
                   "fraction_of_bandwidth": nbytes / (ms / 1e3) / bandwidth}
            rows.append(row)
            print(f"  {settings}: {row['us']:.1f} us, "
                  f"{100 * row['fraction_of_bandwidth']:.1f}% bw", flush=True)
    return rows


# the one-token GEMVs' launch settings a sweep tries
ONE_TOKEN_SWEEP = {"words": (32, 64), "rows": (8, 16), "num_warps": (1, 2),
                   "programs_per_sm": (8, 16, 32)}


def one_token_config(words: int, rows: int, num_warps: int, programs_per_sm: int):
    """A replacement for one_token_gemv_config with these settings."""
    from pagoda.layers.quantization import triton_group_gemm as kernels
    shipped = kernels.one_token_gemv_config

    def config(weight, multiprocessors):
        return shipped(weight, multiprocessors, words=words, rows=rows, num_warps=num_warps,
                       programs_per_sm=programs_per_sm)
    return config


def inputs(tokens: int) -> dict[str, torch.Tensor]:
    return {n: torch.randn(tokens, i, device="cuda", dtype=torch.bfloat16)
            for n, (_, i) in PROJECTIONS.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=None,
                        help="time only these layouts (and bfloat16)")
    parser.add_argument("--sweep", nargs="+", choices=sorted(LAYOUTS), default=None,
                        help="sweep the few-token kernel's settings for these layouts")
    parser.add_argument("--sweep-one-token", nargs="+", default=None,
                        choices=[name for name in LAYOUTS if not LAYOUTS[name][3]],
                        help="sweep the one-token GEMVs' settings for these layouts")
    parser.add_argument("--grid", type=json.loads, default=None,
                        help="--sweep's settings as JSON, e.g. '{\"BLOCK_T\": [8], ...}' "
                             "(every key of SWEEP)")
    parser.add_argument("--pdl", action="store_true",
                        help="launch with programmatic dependent launch, as the engine does")
    parser.add_argument("--decoded-slice-mib", type=int, default=None,
                        help="the workspace of calls that decode their weights first "
                             "(group_gemm.DECODED_SLICE_BYTES), in MiB")
    args = parser.parse_args(argv)
    os.environ["PAGODA_PDL"] = "1" if args.pdl else "0"  # read at the first launch
    from pagoda.layers.quantization import group_gemm as layouts
    if args.decoded_slice_mib:
        layouts.DECODED_SLICE_BYTES = args.decoded_slice_mib << 20
    ceil = measure_ceilings(torch.device("cuda"), torch.bfloat16)
    result = {"device": ceil.device, "bandwidth_gb_s": ceil.bandwidth / 1e9,
              "date": datetime.now(timezone.utc).isoformat(), "argv": sys.argv,
              "pdl": args.pdl,
              "decoded_slice_bytes": layouts.DECODED_SLICE_BYTES, "rows": []}
    if args.sweep or args.sweep_one_token:
        result["rows"] = (
            sweep(args.sweep, args.tokens[0], ceil.bandwidth, args.grid or SWEEP,
                  "few_tokens_config",
                  sweep_config) if args.sweep
            else sweep(args.sweep_one_token, 1, ceil.bandwidth, ONE_TOKEN_SWEEP,
                       "one_token_gemv_config", one_token_config))
        _write(result, args.output_json)
        return
    print(f"{ceil.device}: copy bandwidth {ceil.bandwidth / 1e9:.0f} GB/s")
    print(f"{'layout':>13} {'tokens':>6} {'us':>8} {'GB/s':>7} {'%bw':>6} {'x bf16':>7}")
    for tokens in args.tokens:
        xs = inputs(tokens)
        base_ms = None
        for layout in [None, *(args.layouts or LAYOUTS)]:
            call, layers, nbytes = layers_call(layout)
            ms = do_bench_cudagraph(lambda: call(xs), rep=50) / layers
            base_ms = base_ms or ms
            row = {"layout": layout or "bf16", "tokens": tokens, "us": 1e3 * ms,
                   "weight_bytes": nbytes, "gb_s": nbytes / ms / 1e6,
                   "fraction_of_bandwidth": nbytes / (ms / 1e3) / ceil.bandwidth,
                   "speedup_over_bf16": base_ms / ms}
            result["rows"].append(row)
            print(f"{row['layout']:>13} {tokens:>6} {row['us']:>8.1f} {row['gb_s']:>7.0f} "
                  f"{100 * row['fraction_of_bandwidth']:>5.1f}% {row['speedup_over_bf16']:>6.2f}x",
                  flush=True)
    _write(result, args.output_json)


def _write(result: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
