"""A candidate layout and kernel for 4-bit weights at decode sizes, not wired into the engine:
timed here against the shipped kernels (`triton_group_gemm`) at one decoder layer of
Llama-3.1-8B, for the next session with a GPU to measure.

Why: the shipped few-token kernel, compiled for sm_90 (Triton's own ptxas, no GPU), spends
7.8 instructions per weight in its loop (4-bit codes, groups of 128 or 32, 64 outputs by 16
tokens), one of them a conversion (I2F, a quarter-rate pipe) per code; the one-token GEMV
spends 3.2 and reads 35-38 % of the bandwidth.

The layout: codes as int16 [in / 4, out]; within each step of 4 S inputs, row j of the
step holds input q S + j in nibble q (q = 0..3). A tile of rows loads as int16 (two codes
per thread register pair along the inputs, as the tensor-core operand wants them), and
plane q of a register is two bfloat16 values 128 + code in one LOP3 (the nibbles OR-ed into
the mantissa of 128; a shift first for q > 0), so no conversion instruction: each plane is
one [BLOCK_N, S] operand of `tl.dot` with its S inputs' activations. Compiled for sm_90 here
(S = 32, 8 tokens, 4 warps), instructions per weight in the loop, no conversion among them:
groups of 128 3.4 (64 outputs) and 2.9 (128 outputs), groups of 32 (GGUF's 4-bit types)
4.1 and 3.6. None of this has run on a GPU: whether it reads more of the bandwidth than the
shipped kernels is what this script is for.

    PYTHONPATH=. python bench/kernels/int4_planes.py [--tokens 1 4 16] [--output-json P]
    TRITON_INTERPRET=1 PYTHONPATH=. python bench/kernels/int4_planes.py --check   # CPU

`--check` runs the kernel's plain (no inline assembly) float16 path under Triton's
interpreter against the dense product of the decoded weights.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
import triton
import triton.language as tl
from torch.nn import functional as F

from pagoda.layers.dependent_launch import wait_for_previous_kernel
from pagoda.layers.quantization.group_gemm import GroupQuantWeight, unpack_int4_halves
from pagoda.layers.quantization.triton_group_gemm import _splits, _store_split_sums
from pagoda.layers.tile_counters import tile_counters

PROJECTIONS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
               "down": (4096, 14336)}
LAYERS = 3  # copies of the layer per timed call: 340 MB, several times the H200's L2


def pack_planes(codes: torch.Tensor, s: int) -> torch.Tensor:
    """[out, in] codes 0..15 -> int16 [in / 4, out]: within each step of 4 s inputs, row j
    holds input q s + j in nibble q."""
    out_features, in_features = codes.shape
    c = codes.to(torch.int32).reshape(out_features, in_features // (4 * s), 4, s)
    word = c[:, :, 0] | (c[:, :, 1] << 4) | (c[:, :, 2] << 8) | (c[:, :, 3] << 12)
    word = word.reshape(out_features, in_features // 4)
    word = torch.where(word >= 32768, word - 65536, word)  # as int16 bits
    return word.to(torch.int16).t().contiguous()


@triton.jit
def _plane_asm(packed, Q: tl.constexpr):
    """bfloat16 128 + nibble Q of each int16, two codes per instruction."""
    if Q == 0:
        return tl.inline_asm_elementwise(
            "lop3.b32 $0, $1, 0x000F000F, 0x43004300, 0xea;",
            "=r,r", [packed], dtype=tl.bfloat16, is_pure=True, pack=2)
    elif Q == 1:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; shr.b32 t, $1, 4; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xea; }",
            "=r,r", [packed], dtype=tl.bfloat16, is_pure=True, pack=2)
    elif Q == 2:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; shr.b32 t, $1, 8; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xea; }",
            "=r,r", [packed], dtype=tl.bfloat16, is_pure=True, pack=2)
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; shr.b32 t, $1, 12; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xea; }",
            "=r,r", [packed], dtype=tl.bfloat16, is_pure=True, pack=2)


@triton.jit
def _plane(packed, Q: tl.constexpr, ASM: tl.constexpr, HALF: tl.constexpr):
    """Nibble Q of each int16 in the product's type: bfloat16 (or with HALF float16) 128
    (1024) + code, the code OR-ed into the power of two's mantissa, less the power of two
    (exact)."""
    if ASM:
        return _plane_asm(packed, Q) - 128.0
    if HALF:
        magic = (((packed >> (4 * Q)) & 15) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        return magic - 1024.0
    magic = (((packed >> (4 * Q)) & 15) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return magic - 128.0


@triton.jit
def _scale_and_min(scale_ptr, low_ptr, group, n, n_ok, N, dtype: tl.constexpr):
    scale = tl.load(scale_ptr + group * N + n, mask=n_ok, other=0.0).to(dtype)
    low = tl.load(low_ptr + group * N + n, mask=n_ok, other=0.0).to(dtype)
    return scale, low


@triton.jit
def _planes_kernel(x_ptr, codes_ptr, scale_ptr, low_ptr, out_ptr, partial_ptr, count_ptr,
                   M, N, stride_xm, K_SPLIT: tl.constexpr, SPLITS: tl.constexpr,
                   GROUP: tl.constexpr, S: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_T: tl.constexpr, ASM: tl.constexpr, HALF: tl.constexpr,
                   PDL: tl.constexpr):
    """out[t, n] for BLOCK_N outputs by BLOCK_T tokens over one split of the inputs, as
    W x^T: per step of 4 S inputs one int16 tile, four planes, four products."""
    wait_for_previous_kernel(PDL)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    split = tl.program_id(2)
    n_ok, t_ok = n < N, t < M
    rows = tl.arange(0, S)
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    for offset in range(0, K_SPLIT, 4 * S):
        k = split * K_SPLIT + offset
        first_row = tl.multiple_of(k // 4, S)
        packed = tl.load(codes_ptr + (first_row + rows)[None, :] * N + n[:, None],
                         mask=n_ok[:, None])
        if GROUP >= 4 * S:  # the step lies in one group
            scale, low = _scale_and_min(scale_ptr, low_ptr, k // GROUP, n, n_ok, N,
                                        x_ptr.dtype.element_ty)
        for q in tl.static_range(4):
            if GROUP < 4 * S:
                scale, low = _scale_and_min(scale_ptr, low_ptr, (k + q * S) // GROUP, n,
                                            n_ok, N, x_ptr.dtype.element_ty)
            weights = _plane(packed, q, ASM, HALF) * scale[:, None] + low[:, None]
            x = tl.load(x_ptr + t[None, :] * stride_xm + (k + q * S + rows)[:, None],
                        mask=t_ok[None, :], other=0.0)
            acc = tl.dot(weights, x, acc)
    tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    _store_split_sums(acc, out_ptr, t[None, :] * N + n[:, None], t_ok[None, :] & n_ok[:, None],
                      partial_ptr, M * N, count_ptr, tile, split, SPLITS)


def planes_gemm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
                group: int, s: int, block_n: int = 64, block_t: int = 8, warps: int = 4,
                stages: int = 3, programs_per_sm: int = 4, asm: bool = True) -> torch.Tensor:
    """x [tokens, in] (bfloat16 or float16) times the planes-packed weights; scale and low
    [in / group, out]."""
    tokens, in_features = x.shape
    out_features = codes.shape[1]
    out = torch.empty(tokens, out_features, dtype=x.dtype, device=x.device)
    multiprocessors = torch.cuda.get_device_properties(x.device).multi_processor_count \
        if x.is_cuda else 132
    tiles = triton.cdiv(tokens, block_t) * triton.cdiv(out_features, block_n)
    splits = _splits(tiles, in_features, 4 * s, multiprocessors, programs_per_sm)
    partial = out if splits == 1 else torch.empty(splits, tokens, out_features,
                                                  dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(out_features, block_n), triton.cdiv(tokens, block_t), splits)
    _planes_kernel[grid](x, codes, scale, low, out, partial,
                         tile_counters(x.device, grid[0] * grid[1]), tokens, out_features,
                         x.stride(0), K_SPLIT=in_features // splits, SPLITS=splits,
                         GROUP=group, S=s, BLOCK_N=block_n, BLOCK_T=block_t,
                         ASM=asm and x.dtype == torch.bfloat16, HALF=x.dtype == torch.float16,
                         PDL=False, num_warps=warps, num_stages=stages)
    return out


def check() -> None:
    """The float16 path under the interpreter against the dense product (steps of one and
    of several groups, split inputs, outputs not a multiple of the tile)."""
    torch.manual_seed(0)
    for tokens, outputs, inputs, group, s in [(1, 64, 512, 128, 32), (5, 96, 256, 32, 16),
                                              (20, 64, 1024, 64, 16), (3, 40, 256, 128, 32)]:
        codes = torch.randint(0, 16, (outputs, inputs), dtype=torch.uint8)
        scale = torch.rand(outputs, inputs // group) * 0.01 + 0.001
        low = -8 * scale + torch.randn(outputs, inputs // group) * 1e-3
        x = torch.randn(tokens, inputs).half()
        dense = (codes.float().reshape(outputs, -1, group) * scale[..., None]
                 + low[..., None]).reshape(outputs, inputs)
        expected = F.linear(x.float(), dense)
        got = planes_gemm(x, pack_planes(codes, s), scale.t().contiguous().half(),
                          low.t().contiguous().half(), group, s, block_n=32, block_t=16)
        error = ((got.float() - expected).abs().max() / expected.abs().max()).item()
        print(f"{tokens} tokens, {outputs} x {inputs}, groups of {group}, S {s}: "
              f"relative error {error:.1e}")
        assert error < 2e-3, error


def layer(group: int) -> dict[str, GroupQuantWeight]:
    weights = {}
    for name, (outputs, inputs) in PROJECTIONS.items():
        codes = torch.randint(0, 16, (outputs, inputs), device="cuda", dtype=torch.uint8)
        scale = torch.rand(outputs, inputs // group, device="cuda") * 2e-3 + 1e-3
        weights[name] = GroupQuantWeight(codes, scale, -8 * scale, group, 4)
    return weights


def time_all(tokens: int, group: int, grid: list[tuple]) -> list[dict]:
    """Per 8B layer at `tokens` tokens: the shipped kernels and the planes kernel in each
    launch setting of `grid`, after checking its products against the shipped kernel's."""
    from triton.testing import do_bench_cudagraph

    from pagoda.layers.quantization import triton_group_gemm as shipped
    layers = [layer(group) for _ in range(LAYERS)]
    nbytes = sum(w.codes.numel() + 4 * w.scale.numel() for w in layers[0].values())
    xs = {name: torch.randn(tokens, inputs, device="cuda", dtype=torch.bfloat16)
          for name, (_, inputs) in PROJECTIONS.items()}
    planes = {s: [{name: pack_planes(unpack_int4_halves(w.codes), s) for name, w in one.items()}
                  for one in layers] for s in sorted({setting[0] for setting in grid})}
    rows = []

    def record(kernel: str, call, **settings) -> None:
        ms = do_bench_cudagraph(call, rep=100) / LAYERS
        rows.append({"tokens": tokens, "group": group, "kernel": kernel, **settings,
                     "us": 1e3 * ms, "gb_s": nbytes / ms / 1e6})
        print(f"  {kernel} {settings or ''}: {1e3 * ms:.1f} us, {nbytes / ms / 1e6:.0f} GB/s",
              flush=True)
    print(f"{tokens} tokens, groups of {group}:")
    record("shipped", lambda: [shipped.group_gemm(xs[n], w) for one in layers
                               for n, w in one.items()])
    routed = shipped.takes_one_token_int4
    shipped.takes_one_token_int4 = lambda tokens, weight: False
    record("few-token", lambda: [shipped.group_gemm(xs[n], w) for one in layers
                                 for n, w in one.items()])
    shipped.takes_one_token_int4 = routed
    for s, block_n, warps, stages, programs in grid:
        settings = dict(S=s, BLOCK_N=block_n, num_warps=warps, num_stages=stages,
                        programs_per_sm=programs)
        block_t = 8 if tokens <= 8 else 16 if tokens <= 16 else 32

        def call(s=s, block_n=block_n, warps=warps, stages=stages, programs=programs):
            return [planes_gemm(xs[n], planes[s][i][n], w.scale, w.low, group, s, block_n,
                                block_t, warps, stages, programs)
                    for i, one in enumerate(layers) for n, w in one.items()]
        got, expected = call()[0].float(), shipped.group_gemm(xs["qkv"],
                                                              layers[0]["qkv"]).float()
        error = ((got - expected).abs().max() / expected.abs().max()).item()
        if error > 2e-2:
            print(f"  {settings}: wrong (relative error {error:.1e})")
            continue
        record("planes", call, **settings)
    return rows


# S, BLOCK_N, warps, stages, programs per multiprocessor
GRID = [setting for setting in itertools.product((16, 32), (64, 128), (4, 8), (3, 5), (4, 8))
        if not (setting[2] == 8 and setting[1] == 64)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--groups", type=int, nargs="+", default=[128, 32])
    parser.add_argument("--check", action="store_true",
                        help="check the float16 path under TRITON_INTERPRET=1 (CPU)")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    if args.check:
        check()
        return
    os.environ["PAGODA_PDL"] = "0"
    rows = [row for group in args.groups for tokens in args.tokens
            for row in time_all(tokens, group, GRID)]
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
