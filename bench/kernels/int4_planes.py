"""4-bit weights in planes (`triton_group_gemm._planes_kernel`) against the same weights in
halves (the one-token GEMV, the few-token and the larger kernel) at one decoder layer of
Llama-3.1-8B, per token count and group size, in one process. The planes run twice: their
mins as mins (a multiplication and an addition a weight: GGUF Q4_1/Q4_K, and every format by
default), and as integer zero points (`GroupQuantWeight(zero_points=True)`: AWQ, GPTQ,
compressed-tensors, Q4_0; the sums scaled, not the weights). `--sweep-large` also times the
planes kernel's candidate tiles for calls of more than 32 tokens (PLANES_LARGE),
`--sweep-few` those for at most 32 (PLANES_FEW), both ways.

    PYTHONPATH=. python bench/kernels/int4_planes.py [--tokens 1 4 16 64 512 2048]
        [--groups 128 32] [--sweep-large] [--sweep-few [--few-tiles 64,4,3,8 ...]]
        [--output-json P]

Each timing checks the call's products against the halves kernels' first.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from pagoda.layers.quantization import triton_group_gemm
from pagoda.layers.quantization.group_gemm import GroupQuantWeight

PROJECTIONS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
               "down": (4096, 14336)}
LAYERS = 3  # copies of the layer per timed call: 340 MB, several times the H200's L2
# PLANES_LARGE candidates: outputs, tokens, warps, stages a program
LARGE_TILES = [(128, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3), (128, 64, 8, 4),
               (256, 64, 8, 3)]
# PLANES_FEW candidates: outputs, warps, stages a program, programs a multiprocessor (the
# deeper 64-output ones: more loads in flight, where a profile found warps waiting on memory)
FEW_TILES = [(64, 4, 3, 8), (64, 4, 4, 8), (64, 4, 5, 8), (64, 2, 3, 16), (128, 4, 3, 8),
             (128, 4, 4, 4), (128, 2, 3, 8), (128, 2, 4, 8), (128, 2, 3, 4), (256, 4, 3, 4),
             (256, 4, 4, 4), (256, 4, 3, 2), (256, 8, 3, 4)]


def layer(group: int, planes: bool, zero_points: bool = False) -> dict[str, GroupQuantWeight]:
    """One random 8B layer with mins of -8 scales (the same codes and scales for every
    layout: seeded by group); zero_points: planes hold them as zero points."""
    gen = torch.Generator(device="cuda").manual_seed(group)
    weights = {}
    for name, (outputs, inputs) in PROJECTIONS.items():
        codes = torch.randint(0, 16, (outputs, inputs), device="cuda", dtype=torch.uint8,
                              generator=gen)
        scale = torch.rand(outputs, inputs // group, device="cuda", generator=gen) * 2e-3 + 1e-3
        scale = scale.half().float()
        weights[name] = GroupQuantWeight(codes, scale, -8 * scale, group, 4, planes=planes,
                                         zero_points=zero_points)
        assert weights[name].holds_zero_points == (planes and zero_points)
    return weights


def time_calls(tokens: int, group: int, sweep_large: bool, sweep_few: bool,
               few_tiles: list[tuple[int, ...]] = FEW_TILES) -> list[dict]:
    from triton.testing import do_bench_cudagraph
    halves = [layer(group, False) for _ in range(LAYERS)]
    planes = [layer(group, True) for _ in range(LAYERS)]
    zero_points = [layer(group, True, zero_points=True) for _ in range(LAYERS)]
    nbytes = sum(w.codes.numel() * w.codes.element_size() + 4 * w.scale.numel()
                 for w in halves[0].values())
    xs = {name: torch.randn(tokens, inputs, device="cuda", dtype=torch.bfloat16)
          for name, (_, inputs) in PROJECTIONS.items()}
    expected = {n: triton_group_gemm.group_gemm(x, halves[0][n]).float() for n, x in xs.items()}
    rows = []

    def record(kernel: str, layers: list, **settings) -> None:
        try:
            got = {n: triton_group_gemm.group_gemm(x, layers[0][n]).float()
                   for n, x in xs.items()}
        except Exception as failure:  # e.g. a tile past the shared memory or registers
            print(f"  {kernel} {settings or ''}: {type(failure).__name__}")
            return
        error = max(((got[n] - expected[n]).abs().max() / expected[n].abs().max()).item()
                    for n in xs)
        if error > 2e-2:
            print(f"  {kernel} {settings or ''}: wrong (relative error {error:.1e})")
            return
        ms = do_bench_cudagraph(lambda: [triton_group_gemm.group_gemm(xs[n], w)
                                         for one in layers for n, w in one.items()],
                                rep=100) / LAYERS
        rows.append({"tokens": tokens, "group": group, "kernel": kernel, **settings,
                     "us": 1e3 * ms, "gb_s": nbytes / ms / 1e6, "error": error})
        print(f"  {kernel} {settings or ''}: {1e3 * ms:.1f} us, {nbytes / ms / 1e6:.0f} GB/s",
              flush=True)
    print(f"{tokens} tokens, groups of {group}:")
    record("halves", halves)
    record("planes", planes)
    record("planes-zero-points", zero_points)
    if sweep_few and tokens <= triton_group_gemm.FEW_TOKENS:
        shipped = triton_group_gemm.PLANES_FEW
        try:
            for tile in few_tiles:
                triton_group_gemm.PLANES_FEW = tile
                record("planes", planes, tile=tile)
                record("planes-zero-points", zero_points, tile=tile)
        finally:
            triton_group_gemm.PLANES_FEW = shipped
    if sweep_large and tokens > triton_group_gemm.FEW_TOKENS:
        shipped = triton_group_gemm.PLANES_LARGE
        try:
            for tile in LARGE_TILES:
                triton_group_gemm.PLANES_LARGE = tile
                record("planes", planes, tile=tile)
        finally:
            triton_group_gemm.PLANES_LARGE = shipped
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 512, 2048])
    parser.add_argument("--groups", type=int, nargs="+", default=[128, 32])
    parser.add_argument("--sweep-large", action="store_true")
    parser.add_argument("--sweep-few", action="store_true")
    parser.add_argument("--few-tiles", nargs="+", default=FEW_TILES,
                        type=lambda tile: triton_group_gemm.parse_tile(tile, 4),
                        metavar="N,WARPS,STAGES,PER_SM",
                        help="the --sweep-few candidates (default: FEW_TILES)")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    os.environ["PAGODA_PDL"] = "0"
    rows = [row for group in args.groups for tokens in args.tokens
            for row in time_calls(tokens, group, args.sweep_large, args.sweep_few,
                                  args.few_tiles)]
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
